"""SAM's interactive prompts (SAM App. A, "Training algorithm"), as SAM-CLIP's L_SAM replays them.

SAM was trained by simulating an interactive session: a first prompt (a box, or points in the
mask), then rounds that each add a point where the previous mask is wrong, with that mask's logits
as a dense prompt. Eq. 2 of SAM-CLIP distils the frozen SAM's answers z to every such prompt g, so
the same sessions are replayed here:

  - first_prompt: a mask's first prompt, 1-3 points in the mask or its jittered box; data.SA1B
    calls it with the sample's own seeded generator, and also draws the uniform numbers that
    place the later error points ("error_draws").
  - sample_error_points: the next point of a round, from the error region of the previous mask.
  - teacher_rounds: the frozen SAM runs the whole session (each round needs the previous round's
    mask) and records every prompt it was given and every answer z.
  - student_rounds: the student's HeadSAM answers exactly the same prompts. They are fixed in
    advance, so no round waits for the one before.
  - prompt_args: the one translation from a round's prompt to HeadSAM's keyword arguments, shared
    by teacher and student so that both see the same tokens.

Shape legend: B images, K prompt slots per image, n slots of one group, R rounds, N points,
h w the image-embedding grid (SAM's low-res mask grid is 4h x 4w).
"""

import numpy as np
import torch

import data


def first_prompt(mask, scale, input_size, side, generator, point_prob=0.5, max_points=3,
                 box_jitter=0.1):
    """SAM's first prompt for one mask (SAM App. A, "Training algorithm"): with probability
    `point_prob` 1..max_points foreground points drawn uniformly from the mask, else the mask's
    box, each coordinate moved by N(0, (box_jitter * box side)^2) noise capped at
    data.MAX_BOX_JITTER px of a 1024 frame, then kept inside the resized image.

    mask (h, w) bool at the original size, not empty; scale (sx, sy) from the original to the
    resized frame (SAM's ResizeLongestSide); input_size (h', w') the resized image inside the
    padded (side, side) frame; generator the sample's torch.Generator, drawn from in a fixed order
    (the kind, then the count and the pixels, or the box's 4 noises), so a seed gives one prompt.
    Coordinates follow SAM's PromptEncoder, which adds 0.5 (pixel index -> centre): a point is
    the resized pixel centre minus 0.5, a box the mask's pixel extent [x0, x1) scaled.
    -> (points (n, 2) float32 x, y with n = 0 for a box, box (4,) x0 y0 x1 y1 or None)."""
    sx, sy = scale
    h2, w2 = input_size
    if torch.rand(1, generator=generator).item() < point_prob:
        fg = np.flatnonzero(mask)                                         # (area,) into (h, w)
        n = torch.randint(1, max_points + 1, (1,), generator=generator).item()
        picked = fg[torch.randint(0, len(fg), (n,), generator=generator).numpy()]   # (n,)
        ys, xs = np.divmod(picked, mask.shape[1])
        points = np.stack([(xs + 0.5) * sx - 0.5, (ys + 0.5) * sy - 0.5], 1)     # (n, 2) x, y
        return torch.from_numpy(points).float(), None
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    box = torch.tensor([cols[0] * sx, rows[0] * sy, (cols[-1] + 1) * sx, (rows[-1] + 1) * sy])
    box_side = (box[2:] - box[:2]).repeat(2)                              # (w, h, w, h)
    cap = data.MAX_BOX_JITTER * side / 1024
    noise = (torch.randn(4, generator=generator) * box_jitter * box_side).clamp(-cap, cap)
    frame = torch.tensor([w2, h2, w2, h2]).float()
    box = torch.minimum((box + noise).clamp(min=0), frame)
    corners = [torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])]
    return torch.zeros(0, 2), torch.cat(corners)


def prompt_args(coords, labels, boxes=None, mask_inputs=None):
    """HeadSAM's keyword arguments for one prompt group, the same for teacher and student. A box
    with no follow-up points passes no points: SAM's box-only prompt is its 2 corner tokens."""
    points = (coords, labels) if coords.shape[1] else None
    return dict(points=points, boxes=boxes, masks=mask_inputs)


def sample_error_points(pred, gt, inside, draws, stride):
    """SAM App. A: the next point is drawn uniformly from the error region between the previous
    mask and the ground truth, foreground (1) where the mask misses the object (false negative),
    background (0) where it spills over (false positive). pred, gt, inside (n, H', W') bool on SAM's
    low-res grid (inside: cells of the resized image, not the padding); draws (n,) in [0, 1).
    -> coords (n, 2) x, y in the input frame, labels (n,). Where the mask already matches the ground
    truth there is nothing to correct: the point is SAM's padding token (label -1), and the round
    keeps only its mask prompt, like SAM's mask-only rounds."""
    n, H, W = gt.shape
    error = ((pred ^ gt) & inside).flatten(1)                                    # (n, H'*W')
    count = error.sum(1)                                                          # (n,)
    k = torch.minimum((draws * count).long(), (count - 1).clamp(min=0))   # (n,) which error cell
    # the k-th error cell: the first position whose running count of error cells reaches k + 1
    idx = torch.searchsorted(error.cumsum(1), (k + 1)[:, None]).squeeze(1)   # (n,)
    idx = idx.clamp(max=H * W - 1)
    r = idx // W
    c = idx % W
    # cell (r, c) covers input pixels [stride * c, stride * (c + 1)), centre (c + 0.5) * stride;
    # SA1B's points are pixel centre - 0.5 (SAM's prompt encoder adds the 0.5 back), so the point
    # hits the centre
    x = (c + 0.5) * stride - 0.5
    y = (r + 0.5) * stride - 0.5
    coords = torch.stack([x, y], dim=-1).float()                           # (n, 2)
    # inside the object: a missed cell -> 1; outside: a spilled one -> 0
    labels = gt.flatten(1).gather(1, idx[:, None]).squeeze(1).long()      # (n,)
    empty = count == 0
    return coords.masked_fill(empty[:, None], 0.0), labels.masked_fill(empty, -1)


@torch.no_grad()
def teacher_rounds(head, embeddings, batch, rounds):
    """The frozen SAM's targets z of Eq. 2 under SAM's interactive training recipe (SAM App. A,
    "Training algorithm"); the one definition the training step, train-speed and the tests share.

    Round 0 is exactly the D_SAM prompt, as SAM's predictor and evaluate.py give it: a box alone
    (its 2 corner tokens), or the 1-3 sampled points plus the one padding point SAM's prompt
    encoder adds when there is no box. Every later round gets the previous round's low-res logits
    as the mask prompt and, for the first SAM_POINT_ROUNDS of them, one more point from the error
    region of the previous mask (sample_error_points); rounds after those add no point (SAM's 2
    mask-only rounds; SAM puts one of them at a random round, here both come last). Round r holds
    exactly the points drawn so far: no round carries padding tokens for points not yet drawn,
    because SAM's padding tokens take part in the decoder's attention and change its masks.
    The previous mask follows SAM: for one prompt (a box or a single point) SAM predicts 3 masks and
    trains the one with the lowest loss, here the one with the highest IoU with the ground truth;
    for more prompts it is the single-mask output (token 0).

    Slots whose first prompts have the same token count (a box; 1, 2 or 3 points) form a group,
    so each round of a group is one decoder call. Every round only appends points, so round r's
    points are the first `points_per_round[r]` of the group's final point list.

    embeddings (B, C, h, w) from the teacher's encoder; batch from data.collate_sam; rounds R >= 1.
    Returns one dict per group present, n slots each:
      "image" (n,) row of `embeddings`, "valid" (n,), "boxes" (n, 4) or None,
      "coords" (n, N, 2), "labels" (n, N): the first prompt's points (none for a box), then the F
        follow-up points, F = min(R - 1, SAM_POINT_ROUNDS),
      "points_per_round": R ints, how many of those points round r gives the decoder,
      "mask_inputs" (R-1, n, 1, 4h, 4w): the mask prompt of rounds 1.. (None when R = 1),
      "logits" (R, n, 4, 4h, 4w), "iou" (R, n, 4): the teacher's outputs, every output token."""
    if rounds < 1:
        raise ValueError(f"--sam-rounds must be at least 1, got {rounds}")
    B, K = batch["has_box"].shape
    F = min(rounds - 1, data.SAM_POINT_ROUNDS)
    dev = embeddings.device
    stride = data.LOW_RES_STRIDE
    gt = batch["gt_masks"].flatten(0, 1)                                   # (B*K, 4h, 4w)
    H, W = gt.shape[-2:]
    # no follow-up point may land in the padding: keep cells whose centre lies in the resized image
    h2, w2 = batch["input_size"].repeat_interleave(K, 0).unbind(1)        # (B*K,) each
    rows = (torch.arange(H, device=dev) + 0.5) * stride                   # (4h,) cell centres, y
    cols = (torch.arange(W, device=dev) + 0.5) * stride                   # (4w,) cell centres, x
    inside = (rows[None, :, None] < h2[:, None, None]) & (cols[None, None, :] < w2[:, None, None])
    image = torch.arange(B, device=dev).repeat_interleave(K)              # (B*K,) each slot's image
    coords = batch["point_coords"].flatten(0, 1)                          # (B*K, P, 2)
    labels = batch["point_labels"].flatten(0, 1)                          # (B, K, P) -> (B*K, P)
    boxes = batch["boxes"].flatten(0, 1)                                  # (B*K, 4)
    has_box = batch["has_box"].flatten()                                  # (B*K,)
    draws = batch["error_draws"].flatten(0, 1)                            # (B*K, SAM_POINT_ROUNDS)
    valid = batch["valid"].flatten()                                      # (B*K,)
    # the sampled points come first in a slot, SA1B's padding (-1) after them
    # points of each slot's first prompt, 0 for a box. A padding slot (an image with fewer masks
    # than K, or a skipped one: no prompt, valid False) keeps one padding point (label -1), so
    # that its group is still a prompt HeadSAM takes, with one output per slot; its loss is masked
    first_points = torch.where(has_box, 0, (labels >= 0).sum(1).clamp(min=1))   # (B*K,)
    groups = []
    for box_kind in (True, False):
        for count in range(coords.shape[1] + 1):
            sel = torch.nonzero((has_box == box_kind) & (first_points == count)).squeeze(1)  # (n,)
            if len(sel) == 0:
                continue
            groups.append(_group_rounds(
                head, embeddings[image[sel]], image[sel], valid[sel],
                boxes[sel] if box_kind else None,
                coords[sel, :count], labels[sel, :count], gt[sel], inside[sel], draws[sel],
                rounds, F))
    return groups


def _group_rounds(head, emb, image, valid, boxes, coords, labels, gt, inside, draws, rounds, F):
    """One group of teacher_rounds: n slots with the same first-prompt token count.
    emb (n, C, h, w); boxes (n, 4) or None; coords (n, P0, 2), labels (n, P0) the first points;
    gt, inside (n, 4h, 4w) bool; draws (n, SAM_POINT_ROUNDS). -> the group's dict."""
    n = emb.shape[0]
    dev = emb.device
    P0 = coords.shape[1]
    # the final point list: the first points, then F follow-up slots filled round by round
    coords = torch.cat([coords, coords.new_zeros(n, F, 2)], 1)            # (n, P0 + F, 2)
    labels = torch.cat([labels, labels.new_full((n, F), -1)], 1)          # (n, P0 + F)
    one_prompt = boxes is not None or P0 == 1                             # SAM's ambiguous prompts
    points_per_round = [P0 + min(r, F) for r in range(rounds)]
    logits = []
    ious = []
    mask_inputs = []
    mask_input = None
    for r in range(rounds):
        if 1 <= r <= F:
            prev_mask = mask_input[:, 0] > 0                              # (n, 4h, 4w)
            xy, lab = sample_error_points(prev_mask, gt, inside, draws[:, r - 1],
                                          data.LOW_RES_STRIDE)
            coords[:, P0 + r - 1] = xy
            labels[:, P0 + r - 1] = lab
        t = points_per_round[r]
        # a view, no copy: later rounds write only the columns past t
        prompt = prompt_args(coords[:, :t], labels[:, :t], boxes, mask_input)
        m, i = head.all_outputs(emb, **prompt)                            # (n, 4, 4h, 4w), (n, 4)
        logits.append(m)
        ious.append(i)
        choice = torch.zeros(n, dtype=torch.long, device=dev)   # token 0: the single-mask output
        if r == 0 and one_prompt:   # of the 3 multimask outputs (tokens 1..3), the closest to gt
            pred = m[:, 1:] > 0                                           # (n, 3, 4h, 4w)
            target = gt[:, None]                                          # (n, 1, 4h, 4w)
            inter = (pred & target).flatten(2).sum(-1)                    # (n, 3)
            union = (pred | target).flatten(2).sum(-1).clamp(min=1)       # (n, 3)
            choice = 1 + (inter / union).argmax(1)
        prev = m[torch.arange(n, device=dev), choice]                     # (n, 4h, 4w) logits
        mask_input = prev[:, None]                                        # (n, 1, 4h, 4w)
        if r < rounds - 1:
            mask_inputs.append(mask_input)
    return {"image": image, "valid": valid, "boxes": boxes, "coords": coords, "labels": labels,
            "points_per_round": points_per_round,
            "mask_inputs": torch.stack(mask_inputs) if mask_inputs else None,
            "logits": torch.stack(logits), "iou": torch.stack(ious)}


def student_rounds(head, embeddings, group):
    """The student's HeadSAM on one group's prompts from teacher_rounds, every round. They are
    fixed in advance, so no round waits for the one before; each round is one call on exactly the
    tokens the teacher saw (rounds differ in their point count, so they cannot share a call).
    embeddings (B, C, h, w) -> logits (R, n, 4, 4h, 4w), IoU (R, n, 4), in the teacher's order."""
    emb = embeddings[group["image"]]                                      # (n, C, h, w)
    masks = []
    ious = []
    for r, t in enumerate(group["points_per_round"]):
        mask_input = group["mask_inputs"][r - 1] if r > 0 else None       # (n, 1, 4h, 4w)
        prompt = prompt_args(group["coords"][:, :t], group["labels"][:, :t], group["boxes"],
                                 mask_input)
        m, i = head.all_outputs(emb, **prompt)                            # (n, 4, 4h, 4w), (n, 4)
        masks.append(m)
        ious.append(i)
    return torch.stack(masks), torch.stack(ious)                          # (R, n, ...)
