"""The two distillation losses of SAM-CLIP (Sec. 3, Eq. 1 and Eq. 2) and their sum.

    L_CLIP = E_x [ 1 - cos( Pool(HeadCLIP(Enc(x))), EncCLIP(x) ) ]                      (Eq. 1)
    L_SAM  = E_(x,g) [ L_FD( HeadSAM(Enc(x), PromptEnc(g)), z ) ],
             z = MaskDec_SAM(Enc_SAM(x), PromptEnc(g)), the frozen SAM teacher's logits  (Eq. 2)
    L      = L_CLIP + lam * L_SAM,  lam = 10  (Sec. 4.1: 1 forgot SAM, 100 slowed CLIP)

L_FD is SAM's mask loss (SAM Sec. 3 / App. A: focal and dice, 20:1), adapted to soft targets,
because here the target is the teacher's probability t = sigmoid(z), not a 0/1 mask:
  - focal: the binary cross-entropy between p and t, weighted by |t - p|^gamma and by alpha on
    the target's side (alpha t + (1-alpha)(1-t)). For a hard target this is exactly the focal loss
    of Lin et al. (|t - p| = 1 - p_t); for soft targets it is the "quality focal loss" of Li et
    al. 2020 (Generalized Focal Loss), and it is zero when p = t.
  - dice: 1 - (2 sum p t + s) / (sum p^2 + sum t^2 + s), the squared-denominator soft dice of
    Milletari et al. (V-Net). It is zero when p = t, which SAM's form 1 - (2 sum p t + s) /
    (sum p + sum t + s) is not (for soft p = t, 2 sum p^2 < sum p + sum t). The two agree only
    when both p and t are 0/1; with a hard target and a soft prediction they differ, since
    sum p^2 < sum p.
  - sign: L_SAM >= 0 in exact arithmetic and is 0 only when p = t. No constant is subtracted:
    the cross-entropy of soft targets equals H(t) + KL(t || p) >= 0 and its focal weight is >= 0;
    the dice ratio is <= 1 because 2 p t <= p^2 + t^2; the IoU MSE is a square. A logged value like
    -1e-9 is float rounding of a zero loss (the dice ratio computed a hair above 1), not a bug: it
    means the student's masks equal the teacher's, as when the student starts as SAM's copy.
  - IoU head: SAM also trains its IoU prediction with an MSE; the paper does not say whether
    SAM-CLIP kept it. We distil it (MSE to the teacher's IoU predictions, weight 1), which also
    gives every mask-decoder parameter a gradient (DDP needs no find_unused_parameters).

MultiTaskLoss is the student's side of one training step (both terms, one forward). The rest of
the file makes the targets both losses are computed against, once for the training step, the
benchmark (bench.py) and the tests: `teacher_targets` runs the frozen CLIP image
tower on the D_CLIP batch (Eq. 1's EncCLIP(x)) and the frozen SAM over SAM's interactive prompt
rounds on the D_SAM batch (Eq. 2's z for every prompt g, SAM App. A), and `sam_prompts_forward`
runs the student's HeadSAM on exactly those prompts.

Shape legend: B batch, D embedding size, M masks (prompts x outputs), h w low-res mask grid,
R prompt rounds, n prompt slots of one kind, N points per prompt.
"""

import torch
import torch.nn.functional as F

import data

LAM = 10.0            # Sec. 4.1: L_CLIP : L_SAM = 1 : 10
FOCAL_WEIGHT = 20.0   # SAM: focal : dice = 20 : 1
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def loss_clip(student, teacher, valid=None):
    """Eq. 1: mean over samples of 1 - cos(student (B, D), teacher (B, D)).
    `valid` (B,) bool drops samples whose image could not be read (placeholders)."""
    per_sample = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)   # (B,)
    return masked_mean(per_sample, valid)


def focal_soft(logits, target_prob, alpha=0.25, gamma=2.0):
    """Per-mask soft focal loss, mean over pixels: (M, h, w) logits, (M, h, w) targets -> (M,)."""
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target_prob, reduction="none")      # (M, h, w)
    weight = (target_prob - p).abs().pow(gamma)
    if alpha >= 0:
        weight = weight * (alpha * target_prob + (1 - alpha) * (1 - target_prob))
    return (weight * bce).flatten(1).mean(1)                                             # (M,)


def dice_soft(logits, target_prob, smooth=1.0):
    """Per-mask soft dice loss: (M, h, w), (M, h, w) -> (M,)."""
    p = torch.sigmoid(logits).flatten(1)                                                 # (M, h*w)
    t = target_prob.flatten(1)
    return 1.0 - (2 * (p * t).sum(1) + smooth) / (p.pow(2).sum(1) + t.pow(2).sum(1) + smooth)


def loss_sam(student_logits, teacher_logits, student_iou=None, teacher_iou=None,
             focal_weight=FOCAL_WEIGHT, dice_weight=DICE_WEIGHT, iou_weight=IOU_WEIGHT):
    """Eq. 2 with L_FD = focal_weight * focal + dice_weight * dice (+ iou_weight * IoU MSE).
    Logits (..., h, w) of student and frozen teacher for the same prompts; IoU predictions (...).
    Returns (total, {"focal", "dice", "iou"}) averaged over masks."""
    s = student_logits.float().flatten(0, -3)                                            # (M, h, w)
    t = torch.sigmoid(teacher_logits.float()).flatten(0, -3)
    focal, dice = focal_soft(s, t).mean(), dice_soft(s, t).mean()
    total = focal_weight * focal + dice_weight * dice
    parts = {"focal": focal, "dice": dice}
    if student_iou is not None:
        parts["iou"] = F.mse_loss(student_iou.float(), teacher_iou.float())
        total = total + iou_weight * parts["iou"]
    return total, parts


def loss_total(l_clip, l_sam, lam=LAM):
    """The multi-task objective of Sec. 3: L_CLIP + lam * L_SAM."""
    return l_clip + lam * l_sam


def masked_mean(values, valid=None):
    """Mean of `values` (B,) over `valid` (B,) bool; 0 (with a graph) when nothing is valid, so a
    batch of unreadable images still back-propagates and every rank takes the same step."""
    if valid is None:
        return values.mean()
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- the student's step

class MultiTaskLoss(torch.nn.Module):
    """The student's side of a multi-task step (Sec. 3): L_CLIP + lam * L_SAM of the merged model
    against teacher_targets, in one forward, so DDP sees one forward and one backward per step and
    all-reduces the combined gradients once (train.py wraps this module). Returns each term by name."""

    def __init__(self, model, lam=LAM):
        super().__init__()
        self.model, self.lam = model, lam

    def forward(self, clip_images, clip_targets, clip_ok, sam_batch=None, sam_targets=None):
        pooled, _ = self.model.clip_features(clip_images)                                 # (B, D)
        out = {"loss_clip": loss_clip(pooled, clip_targets, clip_ok)}             # Eq. 1
        out["loss"] = out["loss_clip"]
        if sam_batch is not None:
            emb = self.model.encoder(sam_batch["image"])                                 # (B, C, h, w)
            student, teacher = [], []
            for group in sam_targets:          # the teacher's prompts, every round, one group per prompt kind
                masks, iou = sam_prompts_forward(self.model.head_sam, emb, group)  # (R, n, 4, 4h, 4w), (R, n, 4)
                R = masks.shape[0]
                student.append((masks.flatten(0, 1), iou.flatten(0, 1), group["valid"].repeat(R)))  # (R*n, ...)
                teacher.append((group["logits"].flatten(0, 1), group["iou"].flatten(0, 1)))
            masks, iou, valid = (torch.cat(x) for x in zip(*student))
            t_masks, t_iou = (torch.cat(x) for x in zip(*teacher))
            # Eq. 2, every round and prompt weighing the same
            l_sam, parts = loss_sam(masks[valid], t_masks[valid], iou[valid], t_iou[valid])
            if not valid.any():  # no readable D_SAM image on this rank: a zero loss that still touches every weight
                l_sam = 0.0 * (masks.sum() + iou.sum())
            out.update(loss_sam=l_sam, **{f"loss_sam_{k}": v for k, v in parts.items()})
            out["loss"] = loss_total(out["loss_clip"], l_sam, self.lam)
        return out


# ----------------------------------------------------------------------------- the targets

@torch.no_grad()
def teacher_targets(teachers, clip_batch, sam_batch=None, sam_rounds=1, cache=None):
    """What the student is distilled towards in one step, from the frozen teachers (Sec. 3).
    teachers = (SAM encoder, SAM head, CLIP); clip_batch from data.collate, sam_batch from
    data.collate_sam (or None when the stage has no L_SAM); cache: a data.TeacherCache or None.
    -> (EncCLIP(x) of the teacher's crops (B, D) float32, the SAM prompt groups of
    sam_teacher_targets or None)."""
    sam_encoder, sam_head, teacher_clip = teachers
    images = clip_batch["teacher"]
    if cache is not None:
        clip_target = cache(clip_batch["index"].cpu(), clip_batch["ok"].cpu(), images, teacher_clip.visual)
    else:
        clip_target = teacher_clip.visual(images)                                       # (B, D)
    sam_target = None
    if sam_batch is not None:
        sam_target = sam_teacher_targets(sam_head, sam_encoder(sam_batch["image"]), sam_batch, sam_rounds)
    return clip_target.float(), sam_target


def sam_prompt_args(coords, labels, boxes=None, mask_inputs=None):
    """HeadSAM's keyword arguments for one prompt group, the same for teacher and student. A box
    with no follow-up points passes no points: SAM's box-only prompt is its 2 corner tokens."""
    return dict(points=(coords, labels) if coords.shape[1] else None, boxes=boxes, masks=mask_inputs)


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
    k = torch.minimum((draws * count).long(), (count - 1).clamp(min=0))          # (n,) which error cell, 0-based
    # the k-th error cell: the first position whose running count of error cells reaches k + 1
    idx = torch.searchsorted(error.cumsum(1), (k + 1)[:, None]).squeeze(1).clamp(max=H * W - 1)  # (n,)
    r, c = idx // W, idx % W
    # cell (r, c) covers input pixels [stride * c, stride * (c + 1)), centre (c + 0.5) * stride; SA1B's
    # points are pixel centre - 0.5 (SAM's prompt encoder adds the 0.5 back), so the point hits the centre
    coords = torch.stack([(c + 0.5) * stride - 0.5, (r + 0.5) * stride - 0.5], dim=-1).float()   # (n, 2)
    labels = gt.flatten(1).gather(1, idx[:, None]).squeeze(1).long()            # in the object: missed -> 1
    empty = count == 0
    return coords.masked_fill(empty[:, None], 0.0), labels.masked_fill(empty, -1)


@torch.no_grad()
def sam_teacher_targets(head, embeddings, batch, rounds):
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
    image = torch.arange(B, device=dev).repeat_interleave(K)              # (B*K,) image of each slot
    coords = batch["point_coords"].flatten(0, 1)                          # (B, K, P, 2) -> (B*K, P, 2)
    labels = batch["point_labels"].flatten(0, 1)                          # (B, K, P) -> (B*K, P)
    boxes = batch["boxes"].flatten(0, 1)                                  # (B*K, 4)
    has_box = batch["has_box"].flatten()                                  # (B*K,)
    draws = batch["error_draws"].flatten(0, 1)                            # (B*K, SAM_POINT_ROUNDS)
    valid = batch["valid"].flatten()                                      # (B*K,)
    # the sampled points come first in a slot, SA1B's padding (-1) after them
    first_points = torch.where(has_box, 0, (labels >= 0).sum(1))          # (B*K,) 0 for a box
    groups = []
    for box_kind in (True, False):
        for count in range(coords.shape[1] + 1):
            sel = torch.nonzero((has_box == box_kind) & (first_points == count)).squeeze(1)  # (n,)
            if len(sel) == 0:
                continue
            groups.append(_teacher_rounds(
                head, embeddings[image[sel]], image[sel], valid[sel],
                boxes[sel] if box_kind else None,
                coords[sel, :count], labels[sel, :count], gt[sel], inside[sel], draws[sel],
                rounds, F))
    return groups


def _teacher_rounds(head, emb, image, valid, boxes, coords, labels, gt, inside, draws, rounds, F):
    """One group of sam_teacher_targets: n slots with the same first-prompt token count.
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
        prompt = sam_prompt_args(coords[:, :t].clone(), labels[:, :t].clone(), boxes, mask_input)
        m, i = head.all_outputs(emb, **prompt)                            # (n, 4, 4h, 4w), (n, 4)
        logits.append(m)
        ious.append(i)
        choice = torch.zeros(n, dtype=torch.long, device=dev)             # token 0: single-mask output
        if r == 0 and one_prompt:   # of the 3 multimask outputs (tokens 1..3), the closest to the truth
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


def sam_prompts_forward(head, embeddings, group):
    """The student's HeadSAM on one group's prompts from sam_teacher_targets, every round. They are
    fixed in advance, so no round waits for the one before; each round is one call on exactly the
    tokens the teacher saw (rounds differ in their point count, so they cannot share a call).
    embeddings (B, C, h, w) -> logits (R, n, 4, 4h, 4w), IoU (R, n, 4), in the teacher's order."""
    emb = embeddings[group["image"]]                                      # (n, C, h, w)
    masks = []
    ious = []
    for r, t in enumerate(group["points_per_round"]):
        mask_input = group["mask_inputs"][r - 1] if r > 0 else None       # (n, 1, 4h, 4w)
        prompt = sam_prompt_args(group["coords"][:, :t], group["labels"][:, :t], group["boxes"],
                                 mask_input)
        m, i = head.all_outputs(emb, **prompt)                            # (n, 4, 4h, 4w), (n, 4)
        masks.append(m)
        ious.append(i)
    return torch.stack(masks), torch.stack(ious)                          # (R, n, ...)
