"""Train SAM-CLIP (Sec. 3, 4.1, App. A): head probing -> multi-task distillation -> resolution adaptation.

    probe    HeadCLIP alone on L_CLIP, backbone frozen                 AdamW lr 8e-4, 20 epochs
    distill  L_CLIP + lam * L_SAM on backbone, HeadCLIP, mask decoder   lr 4e-5 (HeadCLIP), 4e-6 (rest), 16 epochs
    adapt    HeadCLIP alone on L_CLIP at 224/448/1024 px, backbone frozen   lr 8e-4, 3 epochs
Each distill step is one multi-task step (Sec. 4.1): a D_CLIP batch at the step's resolution
(2048 images at 224 px, fewer at 448: pixels per batch constant) gives L_CLIP against the frozen
CLIP ViT-L/14 image tower, a D_SAM batch (32 images at 1024 px, 32 prompts each) gives L_SAM
against the frozen SAM, each prompt replayed over SAM's interactive rounds (--sam-rounds: points
from the error region, the previous mask as the mask prompt, SAM App. A), and one optimizer step
is taken on the summed gradients. The paper back-propagates the two terms separately and
accumulates; one backward of their sum gives the same gradient.

Run (one device, or torchrun; nccl on GPU, gloo on CPU):
    python train.py --preset tiny --out runs/tiny          # built-in default: no weights, no data, ~1 min CPU
    torchrun --nproc_per_node 8 train.py --stage distill --sam-checkpoint sam_vit_b_01ec64.pth \\
        --clip-checkpoint open_clip_pytorch_model.bin --clip-data /data/cc12m --sam-data /data/sa1b \\
        --init runs/probe/samclip.pt --out runs/distill
Everything a run writes is in --out: ckpt_<stage>.pt (atomic, every --save-every steps, at the end
and on SIGTERM/SIGINT), metrics.jsonl (one JSON object per logging step) and samclip.pt (the
merged model after each stage, for evaluate.py and segment_demo.py). --resume continues exactly.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, asdict, field, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip
import data
import heads
import losses
import vit_det
import weights
from model import SAMCLIP, build_samclip


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    stage: str = "distill"            # probe | distill | adapt (--stage all runs the three in order)
    preset: str = "vit_b"             # vit_b: real run from official weights; tiny: built-in CPU demo
    sam_checkpoint: str = ""          # official SAM file (teacher and initialisation), e.g. sam_vit_b_01ec64.pth
    clip_checkpoint: str = ""         # official OpenCLIP ViT-L/14 file (teacher, text tower)
    init: str = ""                    # merged checkpoint to start from (the previous stage's samclip.pt)
    clip_data: str = ""               # D_CLIP: image folder (recursive) or a text file of paths
    sam_data: str = ""                # D_SAM: SA-1B layout (sa_N.jpg + sa_N.json)
    out: str = "runs/samclip"         # everything the run writes
    epochs: int = 16                  # passes over D_CLIP
    max_steps: int = 0                # stop after this many optimizer steps (0: no cap); the schedule is unchanged
    lr: float = 4e-5                  # HeadCLIP's learning rate
    backbone_lr_ratio: float = 0.1    # backbone and mask decoder at lr * this (App. A: 10x smaller)
    weight_decay: float = 0.05        # AdamW, on linear/conv weights only (not stated in the paper)
    warmup_steps: int = 500           # linear warm-up, then cosine decay to 0 (not stated in the paper)
    clip_batch: int = 2048            # global D_CLIP images per step at the smallest resolution (Sec. 4.1)
    resolutions: tuple = (224, 448)   # student resolutions of D_CLIP batches, one drawn per step
    teacher_size: int = 224           # CLIP teacher's input side (its native resolution)
    sam_batch: int = 32               # global D_SAM images per step, at the encoder's native 1024 px
    masks_per_image: int = 32         # prompts per D_SAM image (Sec. 4.1)
    sam_rounds: int = 4               # SAM's interactive rounds per prompt (first prompt + follow-up points
                                      # with the mask prompt); SAM trains with 11, each round adds a teacher and
                                      # a student decoder pass: 4 already covers Table 5's points + mask prompt
    lam: float = losses.LAM           # L_CLIP + lam * L_SAM, 10 (Sec. 4.1)
    grad_clip: float = 1.0            # max global gradient norm
    accum_steps: int = 1              # micro-batches per optimizer step (reach the global batch on fewer GPUs)
    seed: int = 0
    log_every: int = 10               # optimizer steps between metrics lines
    save_every: int = 500             # optimizer steps between checkpoints
    workers: int = 8                  # DataLoader worker processes per rank
    cache_teacher: str = ""           # folder for cached CLIP-teacher embeddings (fixed crops per image)


# Per-stage settings from the paper (App. A). `trains`: the modules that get gradients.
STAGES = {
    "probe": dict(lr=8e-4, epochs=20, resolutions=(224, 448)),
    "distill": dict(lr=4e-5, epochs=16, resolutions=(224, 448)),
    "adapt": dict(lr=8e-4, epochs=3, resolutions=(224, 448, 1024)),
}
TRAINS = {"probe": ("head_clip",), "distill": ("encoder", "head_clip", "head_sam.mask_decoder"),
          "adapt": ("head_clip",)}
# The built-in CPU run: resolutions scaled by 160/1024 (tiny encoder), a few steps per stage.
TINY = dict(clip_batch=8, sam_batch=2, masks_per_image=4, teacher_size=64, warmup_steps=2, log_every=1,
            save_every=4, workers=0, resolutions=(48, 96))
TINY_STAGES = {"probe": dict(epochs=2), "distill": dict(epochs=2), "adapt": dict(epochs=1, resolutions=(48, 96, 160))}


def resolve_config(args, stage):
    """TrainConfig defaults <- the stage's paper settings <- the tiny preset <- flags given."""
    cfg = replace(TrainConfig(), stage=stage, **STAGES[stage])
    if args.preset == "tiny":
        cfg = replace(cfg, **{**TINY, **TINY_STAGES[stage]})
    given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__
             and k != "stage"}
    return replace(cfg, **given)


# ----------------------------------------------------------------------------- the multi-task step

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
    Round 0 is the D_SAM prompt (1-3 points or a box). Every later round gets the previous round's
    low-res logits as the mask prompt and, for the first SAM_POINT_ROUNDS of them, one more point
    from the error region of the previous mask (sample_error_points); rounds after those add no
    point (SAM's 2 mask-only rounds; SAM puts one of them at a random round, here both come last).
    The previous mask follows SAM: for one prompt (a box or a single point) SAM predicts 3 masks and
    trains the one with the lowest loss, here the one with the highest IoU with the ground truth;
    for more prompts it is the single-mask output (token 0).

    embeddings (B, C, h, w) from the teacher's encoder; batch from data.collate_sam; rounds R >= 1.
    Box slots and point slots are different token counts (SAM's prompt encoder adds one padding
    point when there is no box), so they form two groups. A group's point list is as long as in its
    last round, the points of later rounds being SAM's padding token (label -1) until drawn, so all
    its rounds have the same token count and the student runs them in one call (R = 1: exactly the
    first prompts). Returns one dict per group present, n slots each:
      "image" (n,) row of `embeddings`, "valid" (n,), "boxes" (n, 4) or None,
      "coords" (R, n, N, 2), "labels" (R, n, N): every round's points, N = P + F for point slots and
        F for box slots, F = min(R - 1, SAM_POINT_ROUNDS) follow-up points,
      "mask_inputs" (R-1, n, 1, 4h, 4w): the mask prompt of rounds 1.. (None when R = 1),
      "logits" (R, n, 4, 4h, 4w), "iou" (R, n, 4): the teacher's outputs, every output token."""
    if rounds < 1:
        raise ValueError(f"--sam-rounds must be at least 1, got {rounds}")
    B, K = batch["has_box"].shape
    F = min(rounds - 1, data.SAM_POINT_ROUNDS)
    dev, stride = embeddings.device, data.LOW_RES_STRIDE
    gt = batch["gt_masks"].flatten(0, 1)                                          # (B*K, 4h, 4w)
    H, W = gt.shape[-2:]
    # no follow-up point may land in the padding: keep cells whose centre lies in the resized image
    h2, w2 = batch["input_size"].repeat_interleave(K, 0).unbind(1)               # (B*K,) each
    rows, cols = (torch.arange(H, device=dev) + 0.5) * stride, (torch.arange(W, device=dev) + 0.5) * stride
    inside = (rows[None, :, None] < h2[:, None, None]) & (cols[None, None, :] < w2[:, None, None])  # (B*K, 4h, 4w)
    image = torch.arange(B, device=dev).repeat_interleave(K)                     # (B*K,) image of each slot
    coords, labels = batch["point_coords"].flatten(0, 1), batch["point_labels"].flatten(0, 1)  # (B*K, P, 2), (B*K, P)
    boxes, has_box = batch["boxes"].flatten(0, 1), batch["has_box"].flatten()   # (B*K, 4), (B*K,)
    draws, valid = batch["error_draws"].flatten(0, 1), batch["valid"].flatten()  # (B*K, SAM_POINT_ROUNDS), (B*K,)
    groups = []
    for box_kind in (True, False):
        sel = torch.nonzero(has_box == box_kind).squeeze(1)                       # (n,) slots of this kind
        n = len(sel)
        if n == 0:
            continue
        pad_xy, pad_lab = coords.new_zeros(n, F, 2), labels.new_full((n, F), -1)
        if box_kind:
            xy, lab, box = pad_xy, pad_lab, boxes[sel]                            # (n, F, 2), (n, F), (n, 4)
            single = torch.ones(n, dtype=torch.bool, device=dev)
        else:
            xy, lab, box = torch.cat([coords[sel], pad_xy], 1), torch.cat([labels[sel], pad_lab], 1), None  # N = P+F
            single = (labels[sel] >= 0).sum(1) == 1
        first = xy.shape[1] - F                                                   # index of the first follow-up point
        emb, gt_sel, inside_sel = embeddings[image[sel]], gt[sel], inside[sel]
        xys, labs, logits, ious, mask_inputs, mask_input = [], [], [], [], [], None
        for r in range(rounds):
            if 1 <= r <= F:
                xy, lab = xy.clone(), lab.clone()
                xy[:, first + r - 1], lab[:, first + r - 1] = sample_error_points(
                    prev > 0, gt_sel, inside_sel, draws[sel, r - 1], stride)
            m, i = head.all_outputs(emb, **sam_prompt_args(xy, lab, box, mask_input))  # (n, 4, 4h, 4w), (n, 4)
            xys.append(xy), labs.append(lab), logits.append(m), ious.append(i)
            choice = torch.zeros(n, dtype=torch.long, device=dev)                # token 0: the single-mask output
            if r == 0:   # one prompt: of the 3 multimask outputs (tokens 1..3), the closest to the ground truth
                pred, target = m[:, 1:] > 0, gt_sel[:, None]                     # (n, 3, 4h, 4w), (n, 1, 4h, 4w)
                iou_gt = (pred & target).flatten(2).sum(-1) / (pred | target).flatten(2).sum(-1).clamp(min=1)  # (n, 3)
                choice = torch.where(single, 1 + iou_gt.argmax(1), choice)
            prev = m[torch.arange(n, device=dev), choice]                        # (n, 4h, 4w) unthresholded logits
            mask_input = prev[:, None]                                           # (n, 1, 4h, 4w) next round's mask prompt
            if r < rounds - 1:
                mask_inputs.append(mask_input)
        groups.append({"image": image[sel], "valid": valid[sel], "boxes": box, "coords": torch.stack(xys),
                       "labels": torch.stack(labs), "mask_inputs": torch.stack(mask_inputs) if mask_inputs else None,
                       "logits": torch.stack(logits), "iou": torch.stack(ious)})
    return groups


def sam_prompts_forward(head, embeddings, group):
    """The student's HeadSAM on one group's prompts from sam_teacher_targets, every round. They are
    fixed in advance, so no round waits for the one before: round 0 (no mask prompt, SAM's
    no_mask_embed) is one call, rounds 1.. (a mask prompt each) one more.
    embeddings (B, C, h, w) -> logits (R, n, 4, 4h, 4w), IoU (R, n, 4), in the teacher's order."""
    R, n = group["labels"].shape[:2]
    emb, coords, labels, boxes = embeddings[group["image"]], group["coords"], group["labels"], group["boxes"]
    masks, iou = head.all_outputs(emb, **sam_prompt_args(coords[0], labels[0], boxes))   # (n, 4, 4h, 4w), (n, 4)
    if R == 1:
        return masks[None], iou[None]
    # rounds 1..R-1 as one batch: (R-1, n, ...) -> ((R-1)*n, ...), round-major as emb.repeat lays it out
    later_masks, later_iou = head.all_outputs(emb.repeat(R - 1, 1, 1, 1), **sam_prompt_args(
        coords[1:].flatten(0, 1), labels[1:].flatten(0, 1), None if boxes is None else boxes.repeat(R - 1, 1),
        group["mask_inputs"].flatten(0, 1)))
    return (torch.cat([masks[None], later_masks.unflatten(0, (R - 1, n))]),        # (R, n, 4, 4h, 4w)
            torch.cat([iou[None], later_iou.unflatten(0, (R - 1, n))]))            # (R, n, 4)


class MultiTaskStep(torch.nn.Module):
    """The student's whole step as one forward, so DDP sees one forward and one backward per step
    and all-reduces the combined gradients once. Returns each loss term by name."""

    def __init__(self, model: SAMCLIP, lam):
        super().__init__()
        self.model, self.lam = model, lam

    def forward(self, clip_images, clip_targets, clip_ok, sam_batch=None, sam_targets=None):
        pooled, _ = self.model.clip_features(clip_images)                                 # (B, D)
        out = {"loss_clip": losses.loss_clip(pooled, clip_targets, clip_ok)}
        out["loss"] = out["loss_clip"]
        if sam_batch is not None:
            emb = self.model.encoder(sam_batch["image"])                                 # (B, C, h, w)
            student, teacher = [], []
            for group in sam_targets:          # from sam_teacher_targets: the teacher's prompts, every round
                masks, iou = sam_prompts_forward(self.model.head_sam, emb, group)        # (R, n, 4, 4h, 4w), (R, n, 4)
                R = masks.shape[0]
                student.append((masks.flatten(0, 1), iou.flatten(0, 1), group["valid"].repeat(R)))  # (R*n, ...)
                teacher.append((group["logits"].flatten(0, 1), group["iou"].flatten(0, 1)))
            masks, iou, valid = (torch.cat(x) for x in zip(*student))
            t_masks, t_iou = (torch.cat(x) for x in zip(*teacher))
            # every round and prompt weighs the same in L_SAM
            l_sam, parts = losses.loss_sam(masks[valid], t_masks[valid], iou[valid], t_iou[valid])
            if not valid.any():  # no readable D_SAM image on this rank: a zero loss that still touches every weight
                l_sam = 0.0 * (masks.sum() + iou.sum())
            out.update(loss_sam=l_sam, **{f"loss_sam_{k}": v for k, v in parts.items()})
            out["loss"] = losses.loss_total(out["loss_clip"], l_sam, self.lam)
        return out


# ----------------------------------------------------------------------------- teachers

def build_teachers(args):
    """The frozen teachers: SAM's encoder + head (for L_SAM and the initialisation) and CLIP
    (EncCLIP for L_CLIP, TextEncCLIP for the merged model). Tiny: random weights, seeded."""
    if args.preset == "tiny":
        ref = build_samclip("tiny", seed=args.seed or 0)      # same seed -> student starts as the teacher
        torch.manual_seed(args.seed or 0)
        cl = clip.build_clip("tiny")
        sam_enc, sam_head = ref.encoder, ref.head_sam
    else:
        if not args.sam_checkpoint or not args.clip_checkpoint:
            raise SystemExit("train.py: --sam-checkpoint and --clip-checkpoint are required for real runs "
                             "(see README, 'Real weights'), or use --preset tiny")
        sam_sd = weights.read_state_dict(args.sam_checkpoint, "SAM checkpoint")
        sam_enc = vit_det.load_sam_encoder(sam_sd, source=args.sam_checkpoint)
        sam_head = heads.load_sam_head(sam_sd, source=args.sam_checkpoint)
        cl = clip.load_clip(args.clip_checkpoint)
    for m in (sam_enc, sam_head, cl):
        m.requires_grad_(False).eval()
    return sam_enc, sam_head, cl


def append_durable(path, payload):
    """Append bytes to `path` and return once they are on disk (flush + fsync), so that a write
    which depends on them (a cache row's index entry) can never reach the disk before them."""
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


class TeacherCache:
    """CLIP-teacher embeddings on disk (--cache-teacher), because the ViT-L/14 teacher costs more
    than the student. Caching fixes each image's crop (drawn with epoch 0) so a stored embedding
    stays the right target in every epoch.

    Each rank appends only to its own shard: rank<r>.rows (float16 rows of D values) and
    rank<r>.index (int64, the image of each row). An index entry is its row's "filled" flag and is
    appended only once the row is on disk, so no flag outlives its row; rows a crash left without
    an entry are cut off when the rank reopens its shard. No two writers share a file, so ranks on
    different nodes of a network filesystem cannot overwrite each other's pages. Every rank reads
    every shard (it looks for new entries when a batch holds an image it has no row for), so a cache
    made with another world size is read as it is and grows by the current ranks' shards. A row read
    back zero or non-finite (lost, or not yet visible on this node) counts as missing and is
    recomputed: a zero target trains nothing, since 1 - cos(x, 0) has no gradient."""

    def __init__(self, folder, num_samples, dim, meta, rank):
        os.makedirs(folder, exist_ok=True)
        meta = {**meta, "dim": dim, "layout": "rank shards"}    # a cache of the old single-file layout is refused
        meta_path = os.path.join(folder, "meta.json")
        if rank == 0 and not os.path.exists(meta_path):
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
        if dist.is_initialized():
            dist.barrier()
        with open(meta_path) as f:
            if json.load(f) != meta:
                raise SystemExit(f"train.py: --cache-teacher {folder} was made for another teacher, data, seed or "
                                 "cache layout; use a new folder")
        self.folder, self.dim, self.rank, self.row_bytes = folder, dim, rank, 2 * dim   # float16 rows
        rows, entries = self.path(rank, "rows"), self.path(rank, "index")
        for path in (rows, entries):
            open(path, "ab").close()
        self.count = min(os.path.getsize(rows) // self.row_bytes, os.path.getsize(entries) // 8)
        os.truncate(rows, self.count * self.row_bytes)   # a row a crash left without its entry
        os.truncate(entries, 8 * self.count)             # half an entry
        self.shard = np.full(num_samples, -1, np.int32)  # (N,) the shard holding image i's row, -1: none
        self.row = np.zeros(num_samples, np.int64)       # (N,) its row there
        self.seen = {}                                   # shard -> index entries taken in so far
        if dist.is_initialized():
            dist.barrier()                               # every shard trimmed before any rank reads it
        self.refresh()

    def path(self, shard, kind):
        return os.path.join(self.folder, f"rank{shard}.{kind}")

    def refresh(self):
        """Take in the index entries every shard gained since the last look; an image's later entry
        replaces an earlier one (a recomputed row replaces a bad one)."""
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("rank") and name.endswith(".index") and name[4:-6].isdigit()):
                continue
            shard = int(name[4:-6])
            start = self.seen.get(shard, 0)
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(8 * start)
                raw = f.read()
            new = np.frombuffer(raw[:len(raw) // 8 * 8], np.int64)   # a half-written entry waits for the next look
            last = len(new) - 1 - np.unique(new[::-1], return_index=True)[1]   # each image's latest entry
            last = last[(new[last] >= 0) & (new[last] < len(self.shard))]
            self.shard[new[last]], self.row[new[last]] = shard, start + last
            self.seen[shard] = start + len(new)

    def read(self, idx):
        """(B, D) float32 rows of images idx (B,); NaN where there is no row or it cannot be read whole."""
        out = np.full((len(idx), self.dim), np.nan, np.float32)
        shards = self.shard[idx]
        for shard in np.unique(shards[shards >= 0]):
            with open(self.path(shard, "rows"), "rb") as f:
                for j in np.flatnonzero(shards == shard):
                    f.seek(self.row_bytes * int(self.row[idx[j]]))
                    raw = f.read(self.row_bytes)
                    if len(raw) == self.row_bytes:
                        out[j] = np.frombuffer(raw, np.float16)
        return out

    def append(self, idx, rows):
        """Store rows (n, D) of images idx (n,) in this rank's shard: the rows, then, once they are
        on disk, their index entries."""
        append_durable(self.path(self.rank, "rows"), rows.astype(np.float16).tobytes())
        append_durable(self.path(self.rank, "index"), idx.astype(np.int64).tobytes())
        self.shard[idx], self.row[idx] = self.rank, self.count + np.arange(len(idx))
        self.count += len(idx)

    def __call__(self, index, ok, teacher_images, teacher):
        """Embeddings (B, D) for a batch: cached rows read, missing or bad rows computed and stored.
        Placeholders of unreadable images are computed but never stored."""
        idx = index.numpy()
        if (self.shard[idx] < 0).any():
            self.refresh()                               # another rank may have stored them since the last look
        rows = self.read(idx)                                                          # (B, D)
        todo = torch.from_numpy(~(np.isfinite(rows).all(1) & (rows != 0).any(1)))    # (B,) missing, zero, NaN
        out = torch.from_numpy(rows).to(teacher_images.device)
        if todo.any():
            out[todo.to(out.device)] = teacher(teacher_images[todo.to(out.device)]).half().float()  # as stored
            store = (todo & ok).numpy()
            if store.any():
                self.append(idx[store], out[torch.from_numpy(store).to(out.device)].cpu().numpy())
        return out


# ----------------------------------------------------------------------------- optimisation

def lr_factor(step, total, warmup):
    """The schedule as a pure function of the step: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def set_trainable(model: SAMCLIP, stage):
    """Freeze everything, then unfreeze the stage's modules (TRAINS). The text tower, SAM's prompt
    encoder and the teachers are never trained."""
    model.requires_grad_(False)
    for name in TRAINS[stage]:
        model.get_submodule(name).requires_grad_(True)


def param_groups(model: SAMCLIP, cfg: TrainConfig):
    """AdamW groups: HeadCLIP at lr, backbone and mask decoder at lr * backbone_lr_ratio (App. A);
    weight decay only on the weights of linear and convolution layers, none on biases, norms,
    position tables, relative-position tables, tokens and embeddings (ViT-Det/MAE practice).
    Decided by the layer a parameter belongs to, not its shape: pos_embed, rel_pos_h/w and the
    IoU/mask tokens are matrices too."""
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    groups = []
    for module, lr in ((model.head_clip, cfg.lr), (model.encoder, cfg.lr * cfg.backbone_lr_ratio),
                       (model.head_sam, cfg.lr * cfg.backbone_lr_ratio)):
        params = [p for p in module.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (id(p) in decayed) == decay]
            if chosen:
                groups.append({"params": chosen, "base_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
    return groups


def locate(sampler, micro, max_epochs=None):
    """Which (epoch, step within it) the `micro`-th micro-batch of a stream of epochs falls on."""
    epoch = 0
    while max_epochs is None or epoch < max_epochs:
        n = len(sampler.plan(epoch))
        if n == 0 and max_epochs is None:
            raise ValueError(empty_plan(sampler, epoch))
        if micro < n:
            return epoch, micro
        micro, epoch = micro - n, epoch + 1
    return epoch, 0


def stream(loader, sampler, start_micro, max_epochs=None):
    """Yield (epoch, batch) from `start_micro` on, over epochs; each epoch's order is fixed by
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""
    epoch, skip = locate(sampler, start_micro, max_epochs)
    while max_epochs is None or epoch < max_epochs:
        if max_epochs is None and not sampler.plan(epoch):    # an endless stream of empty epochs never yields
            raise ValueError(empty_plan(sampler, epoch))
        sampler.set_epoch(epoch, skip)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def empty_plan(sampler, epoch):
    return (f"epoch {epoch} of an endless batch stream holds no batch: {sampler.num_samples} samples, fewer than "
            f"one global batch of {sampler.num_replicas} x {sampler.batch_size(min(sampler.resolutions))}")


# ----------------------------------------------------------------------------- one stage

def run_stage(cfg: TrainConfig, model: SAMCLIP, teachers, env, stop):
    rank, world, device = env["rank"], env["world"], env["device"]
    sam_enc, sam_head, teacher_clip = teachers
    uses_sam = cfg.stage == "distill"
    ckpt_path = os.path.join(cfg.out, f"ckpt_{cfg.stage}.pt")
    state = weights.safe_load(ckpt_path, "training checkpoint") if os.path.exists(ckpt_path) else None
    if state is not None:
        model.load_state_dict(state["model"])
        if state["done"]:
            log0(rank, f"stage {cfg.stage}: already finished in {ckpt_path}")
            return model
    log0(rank, f"stage {cfg.stage}: {json.dumps(asdict(cfg))}")

    # --- data: D_CLIP at the step's resolution, D_SAM at the native size, split across ranks
    for flag, per in (("clip_batch", cfg.clip_batch), ("sam_batch", cfg.sam_batch)):
        if per % (world * cfg.accum_steps):
            raise SystemExit(f"train.py: --{flag.replace('_', '-')} {per} must be divisible by "
                             f"world size x --accum-steps = {world * cfg.accum_steps}")
    clip_ds = data.CLIPImages(cfg.clip_data, teacher_size=cfg.teacher_size, seed=cfg.seed,
                              fixed_crops=bool(cfg.cache_teacher),   # a cached target needs the same crop every epoch
                              native_size=model.cfg.encoder.img_size)   # at 1024 px: SAM's padded frame (Table 5)
    if len(clip_ds) < cfg.clip_batch:   # otherwise no epoch holds a step and the stage "finishes" untrained
        raise SystemExit(f"train.py: --clip-data {cfg.clip_data} holds {len(clip_ds)} images; one step takes "
                         f"{cfg.clip_batch} (--clip-batch, at {min(cfg.resolutions)} px)")
    clip_ds.check_readable()
    clip_sampler = data.VariableResolutionSampler(len(clip_ds), cfg.clip_batch // (world * cfg.accum_steps),
                                                  cfg.resolutions, None, world, rank, cfg.seed)
    cache = None
    if cfg.cache_teacher:
        meta = {"clip_data": os.path.abspath(cfg.clip_data), "n": len(clip_ds), "seed": cfg.seed,
                "teacher": cfg.clip_checkpoint or "tiny", "teacher_size": cfg.teacher_size}
        cache = TeacherCache(cfg.cache_teacher, len(clip_ds), model.cfg.clip.embed_dim, meta, rank)
    clip_loader = torch.utils.data.DataLoader(clip_ds, batch_sampler=clip_sampler, num_workers=cfg.workers,
                                              collate_fn=data.collate, pin_memory=device.type == "cuda")
    micro_per_epoch = [len(clip_sampler.plan(e)) for e in range(cfg.epochs)]
    total = sum(micro_per_epoch) // cfg.accum_steps
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    if uses_sam:
        sam_ds = data.SA1B(cfg.sam_data, img_size=model.cfg.encoder.img_size, masks_per_image=cfg.masks_per_image,
                           seed=cfg.seed)
        sam_per_rank = cfg.sam_batch // (world * cfg.accum_steps)
        fits = len(sam_ds) >= sam_per_rank * world     # else drop_last would leave no batch at all: wrap instead
        if not fits:
            log0(rank, f"stage {cfg.stage}: --sam-data {cfg.sam_data} holds {len(sam_ds)} images, fewer than one "
                       f"D_SAM batch of {sam_per_rank * world}: every batch repeats images")
        sam_sampler = data.FixedBatchSampler(len(sam_ds), sam_per_rank, world, rank, cfg.seed, drop_last=fits)
        sam_loader = torch.utils.data.DataLoader(sam_ds, batch_sampler=sam_sampler, num_workers=cfg.workers,
                                                 collate_fn=data.collate_sam, pin_memory=device.type == "cuda")

    # --- model, optimizer, DDP
    set_trainable(model, cfg.stage)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log0(rank, f"stage {cfg.stage}: resumed from {ckpt_path} at step {step}")
    trim_metrics(cfg, step, rank)
    student = MultiTaskStep(model, cfg.lam)
    # Every parameter that requires grad is used in every step (the IoU and all mask tokens are
    # distilled; frozen modules have requires_grad False and DDP ignores them), so DDP needs no
    # find_unused_parameters; probe/adapt wrap only HeadCLIP's parameters this way.
    if world > 1:
        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def save(done=False):
        if rank == 0:
            weights.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                                 "stage": cfg.stage, "step": step, "done": done}, ckpt_path)
        if world > 1:   # no rank may leave while rank 0 writes: torchrun tears down the group when one rank exits
            dist.barrier()

    def end_epoch(epoch, counts):
        """Report the epoch's unreadable D_CLIP images; stop, saved, if not one of them could be read."""
        if report_skipped(epoch, counts, rank, world, device):
            save()
            raise SystemExit(f"train.py: --clip-data {cfg.clip_data}: no image could be read in epoch {epoch}; "
                             f"checkpoint {ckpt_path} saved at step {step}, continue with --resume once they can")

    # --- the loop: one optimizer step = accum_steps micro-batches of (D_CLIP batch, D_SAM batch)
    clip_it = stream(clip_loader, clip_sampler, step * cfg.accum_steps, cfg.epochs)
    sam_it = stream(sam_loader, sam_sampler, step * cfg.accum_steps) if uses_sam else None
    bar = tqdm(total=last, initial=step, disable=rank != 0, desc=cfg.stage, dynamic_ncols=True, mininterval=2)
    skipped, cur_epoch = [0, [], 0], None            # this epoch's unreadable images, their paths, images seen
    while step < last:
        t0, logs, n_clip, n_sam = time.time(), {}, 0, 0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup_steps)
        for micro in range(cfg.accum_steps):
            epoch, cb = next(clip_it)
            if epoch != cur_epoch:
                end_epoch(cur_epoch, skipped)
                cur_epoch, skipped = epoch, [0, [], 0]
            skipped[0] += int((~cb["ok"]).sum())
            skipped[1] += cb["bad_paths"]
            skipped[2] += len(cb["ok"])
            with torch.no_grad(), autocast():                       # frozen teachers
                timg, ok = cb["teacher"].to(device, non_blocking=True), cb["ok"].to(device)
                target = cache(cb["index"], cb["ok"], timg, teacher_clip.visual) if cache else teacher_clip.visual(timg)
                sb = st = None
                if uses_sam:
                    _, sb = next(sam_it)
                    sb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in sb.items()}
                    st = sam_teacher_targets(sam_head, sam_enc(sb["image"]), sb, cfg.sam_rounds)
            sync = micro == cfg.accum_steps - 1 or world == 1
            with (contextlib.nullcontext() if sync else student.no_sync()), autocast():
                out = student(cb["student"].to(device, non_blocking=True), target.float(), ok, sb, st)
                (out["loss"] / cfg.accum_steps).backward()
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / cfg.accum_steps
            n_clip += cb["student"].shape[0]
            n_sam += sb["image"].shape[0] if uses_sam else 0
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == last:
            vals = {k: all_mean(v, world) for k, v in logs.items()}
            dt = time.time() - t0
            rec = {"stage": cfg.stage, "step": step, "epoch": cur_epoch, "lr": opt.param_groups[0]["lr"], **vals,
                   "grad_norm": float(grad_norm), "resolution": cb["student"].shape[-1], "step_time": dt,
                   "clip_img_per_s": n_clip * world / dt, "sam_img_per_s": n_sam * world / dt}
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in vals.items()})
            if rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
        stopping = agree(stop["signal"] is not None, world, device)
        if step % cfg.save_every == 0 or stopping:
            save()
        if stopping:
            bar.close()
            log0(rank, f"stage {cfg.stage}: interrupted at step {step}; checkpoint {ckpt_path} saved, "
                       "continue with --resume")
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()
    end_epoch(cur_epoch, skipped)
    save(done=step >= total)
    if rank == 0:
        model.save(os.path.join(cfg.out, "samclip.pt"), stage=cfg.stage, step=step)
    if world > 1:
        dist.barrier()                               # as in save(): all ranks leave once samclip.pt is written
    log0(rank, f"stage {cfg.stage}: done at step {step}/{total}; merged model in {os.path.join(cfg.out, 'samclip.pt')}")
    return model


# ----------------------------------------------------------------------------- bookkeeping

def log0(rank, msg):
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def all_mean(t, world):
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return float(t)


def agree(flag, world, device):
    """True on every rank if any rank was asked to stop, so all of them save and leave together."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def report_skipped(epoch, skipped, rank, world, device):
    """At the end of an epoch: how many unreadable images were skipped (all ranks), and which.
    `skipped` = [unreadable, their paths, images seen] on this rank. -> True if none was readable."""
    if epoch is None:
        return False
    n, seen = (int(all_mean(torch.tensor(float(x), device=device), world) * world + 0.5)   # sums over ranks
               for x in (skipped[0], skipped[2]))
    if n:
        print(f"[train] epoch {epoch}: skipped {n} unreadable image(s) (rank {rank} saw: {skipped[1][:5]})", flush=True)
    return n == seen > 0


def trim_metrics(cfg, step, rank):
    """On resume, drop metrics lines of this stage logged after the checkpoint (they will be redone)."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if rank != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in lines if r["stage"] != cfg.stage or r["step"] <= step]
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` runs as rank 0 of 1."""
    if "RANK" not in os.environ:
        return {"rank": 0, "world": 1, "device": torch.device("cuda" if torch.cuda.is_available() else "cpu")}
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(),
            "device": torch.device("cuda", local) if cuda else torch.device("cpu")}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SAM-CLIP: probe -> distill -> adapt (Sec. 3, 4.1, App. A).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", default="all", choices=["probe", "distill", "adapt", "all"],
                   help="training stage; 'all' runs probe, distill and adapt in order")
    p.add_argument("--preset", default="vit_b", choices=["vit_b", "tiny"],
                   help="vit_b: the paper's model from official weights; tiny: built-in CPU run, no weights or data")
    p.add_argument("--out", default="runs/samclip", help="folder for checkpoints, metrics.jsonl and samclip.pt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--sam-checkpoint", help="official SAM ViT-B file, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--clip-checkpoint", help="official OpenCLIP ViT-L/14 file (.bin or .safetensors)")
    p.add_argument("--init", help="merged checkpoint (samclip.pt) to start the first stage from")
    p.add_argument("--clip-data", help="D_CLIP: folder of images (recursive) or a text file of image paths")
    p.add_argument("--sam-data", help="D_SAM: folder in the SA-1B layout (sa_N.jpg beside sa_N.json)")
    p.add_argument("--epochs", type=int, help="epochs over D_CLIP (default: the stage's, App. A)")
    p.add_argument("--max-steps", type=int, help="stop a stage after this many optimizer steps (smoke runs)")
    p.add_argument("--lr", type=float, help="HeadCLIP learning rate (default: the stage's, App. A)")
    p.add_argument("--backbone-lr-ratio", type=float, help="backbone and mask-decoder lr / HeadCLIP lr (0.1)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on linear/conv weights (0.05)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (500)")
    p.add_argument("--clip-batch", type=int, help="global D_CLIP batch at the smallest resolution (2048)")
    p.add_argument("--resolutions", type=int, nargs="+", help="D_CLIP student resolutions, one drawn per step")
    p.add_argument("--teacher-size", type=int, help="CLIP teacher input side (224)")
    p.add_argument("--sam-batch", type=int, help="global D_SAM images per step (32)")
    p.add_argument("--masks-per-image", type=int, help="prompts per D_SAM image (32)")
    p.add_argument("--sam-rounds", type=int, help="SAM's interactive rounds per prompt: the first prompt, then "
                   "points from the error region plus the previous mask as the mask prompt (4; SAM uses 11)")
    p.add_argument("--lam", type=float, help="weight of L_SAM in L_CLIP + lam * L_SAM (10)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (1.0)")
    p.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step (1)")
    p.add_argument("--seed", type=int, help="seed of data order, crops, prompts and tiny weights (0)")
    p.add_argument("--log-every", type=int, help="optimizer steps between metrics lines (10)")
    p.add_argument("--save-every", type=int, help="optimizer steps between checkpoints (500)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (8)")
    p.add_argument("--cache-teacher", help="folder to cache CLIP-teacher embeddings in (fixes each image's crop)")
    args = p.parse_args(argv)
    if args.resolutions:
        args.resolutions = tuple(args.resolutions)
    return args


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed()
    torch.manual_seed(args.seed or 0)
    stages = ["probe", "distill", "adapt"] if args.stage == "all" else [args.stage]
    os.makedirs(args.out, exist_ok=True)
    existing = [s for s in ("probe", "distill", "adapt") if os.path.exists(os.path.join(args.out, f"ckpt_{s}.pt"))]
    if existing and not args.resume:
        raise SystemExit(f"train.py: --out {args.out} already holds checkpoints ({', '.join(existing)}); "
                         "pass --resume to continue them or choose another --out")
    if args.preset == "tiny" and not (args.clip_data and args.sam_data):
        args.clip_data, args.sam_data = data.make_synthetic_data(os.path.join(args.out, "data"), seed=args.seed or 0)
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    missing = [flag for flag, need in (("--clip-data", not args.clip_data),
                                       ("--sam-data", "distill" in stages and not args.sam_data)) if need]
    if missing:
        raise SystemExit(f"train.py: {' and '.join(missing)} required (see README, 'Training'), or use --preset tiny")
    try:
        teachers = tuple(t.to(env["device"]) for t in build_teachers(args))
        if args.init:
            model = SAMCLIP.load(args.init)
        else:
            model = SAMCLIP.from_modules(*teachers)   # encoder + HeadSAM from SAM, text tower from CLIP
        for stage in stages:
            model = run_stage(resolve_config(args, stage), model, teachers, env, stop)
    except (ValueError, weights.CheckpointError) as e:   # bad data layout, wrong checkpoint: one line
        raise SystemExit(f"train.py: {e}") from None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
