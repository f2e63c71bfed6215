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

Terms by name. Every loss term has a name (`loss_clip`, `loss_sam`) used everywhere: the
weights a training stage gives its terms (train.STAGES, e.g. {"loss_clip": 1, "loss_sam": 10}),
the targets `teacher_targets` computes for them, the terms `MultiTaskLoss` returns and the log
line. The total is the weighted sum of the terms a stage names; a stage without "loss_sam" never
runs SAM. A fork adds a term in the same three places: its target in teacher_targets, its value
in MultiTaskLoss, its weight in a STAGES row (README, "Adding a teacher").

The teachers travel by name too: a dict {"sam_encoder", "sam_head", "clip", ...}
(model.load_teachers).
SAM's interactive prompt rounds, whose answers are the z of Eq. 2, are replayed in prompts.py.

Shape legend: B batch, D embedding size, M masks (prompts x outputs), h w low-res mask grid,
R prompt rounds, n prompt slots of one kind.
"""

import torch
import torch.nn.functional as F

import prompts

LAM = 10.0            # Sec. 4.1: L_CLIP : L_SAM = 1 : 10
FOCAL_WEIGHT = 20.0   # SAM: focal : dice = 20 : 1
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


# ----------------------------------------------------------------------------- Eq. 1

def loss_clip(student, teacher, valid=None):
    """Eq. 1: mean over samples of 1 - cos(student (B, D), teacher (B, D)).
    `valid` (B,) bool drops samples whose image could not be read (placeholders)."""
    per_sample = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)   # (B,)
    return masked_mean(per_sample, valid)


def masked_mean(values, valid=None):
    """Mean of `values` (B,) over `valid` (B,) bool; 0 (with a graph) when nothing is valid, so a
    batch of unreadable images still back-propagates and every rank takes the same step."""
    if valid is None:
        return values.mean()
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- Eq. 2

def focal_soft(logits, target_prob, alpha=0.25, gamma=2.0):
    """Per-mask soft focal loss, mean over pixels: (M, h, w) logits, (M, h, w) targets -> (M,)."""
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target_prob, reduction="none")  # (M, h, w)
    weight = (target_prob - p).abs().pow(gamma)
    if alpha >= 0:
        weight = weight * (alpha * target_prob + (1 - alpha) * (1 - target_prob))
    return (weight * bce).flatten(1).mean(1)                                         # (M,)


def dice_soft(logits, target_prob, smooth=1.0):
    """Per-mask soft dice loss: (M, h, w), (M, h, w) -> (M,)."""
    p = torch.sigmoid(logits).flatten(1)                                             # (M, h*w)
    t = target_prob.flatten(1)
    return 1.0 - (2 * (p * t).sum(1) + smooth) / (p.pow(2).sum(1) + t.pow(2).sum(1) + smooth)


def loss_sam(student_logits, teacher_logits, student_iou=None, teacher_iou=None,
             focal_weight=FOCAL_WEIGHT, dice_weight=DICE_WEIGHT, iou_weight=IOU_WEIGHT):
    """Eq. 2 with L_FD = focal_weight * focal + dice_weight * dice (+ iou_weight * IoU MSE).
    Logits (..., h, w) of student and frozen teacher for the same prompts; IoU predictions (...).
    Returns (total, {"focal", "dice", "iou"}) averaged over masks."""
    s = student_logits.float().flatten(0, -3)                                        # (M, h, w)
    t = torch.sigmoid(teacher_logits.float()).flatten(0, -3)
    focal = focal_soft(s, t).mean()
    dice = dice_soft(s, t).mean()
    total = focal_weight * focal + dice_weight * dice
    parts = {"focal": focal, "dice": dice}
    if student_iou is not None:
        parts["iou"] = F.mse_loss(student_iou.float(), teacher_iou.float())
        total = total + iou_weight * parts["iou"]
    return total, parts


# ----------------------------------------------------------------------------- the targets

@torch.no_grad()
def teacher_targets(teachers, batches, terms, sam_rounds=1, cache=None):
    """What the student is distilled towards in one step, from the frozen teachers (Sec. 3), for
    each loss term named in `terms` (a stage's weights).
    teachers: {"sam_encoder", "sam_head", "clip"} (model.load_teachers); batches: {"clip": from
    data.collate, "sam": from data.collate_sam} (only those the terms read); cache: a
    teacher_cache.TeacherCache for EncCLIP(x), or None.
    -> {"loss_clip": EncCLIP(x) of the teacher's crops (B, D) float32,
        "loss_sam": the prompt groups of prompts.teacher_rounds (z for every prompt g)}."""
    targets = {}
    if "loss_clip" in terms:                                             # Eq. 1's EncCLIP(x)
        clip_batch = batches["clip"]
        tower = teachers["clip"].visual
        if cache is not None:
            ok = clip_batch["ok"].cpu()
            target = cache(clip_batch["key"], ok, clip_batch["teacher"], tower)  # rows by key
        else:
            target = tower(clip_batch["teacher"])                        # (B, D)
        targets["loss_clip"] = target.float()
    if "loss_sam" in terms:                                              # Eq. 2's z
        sam_batch = batches["sam"]
        embeddings = teachers["sam_encoder"](sam_batch["image"])        # (B, C, h, w)
        targets["loss_sam"] = prompts.teacher_rounds(teachers["sam_head"], embeddings, sam_batch,
                                                     sam_rounds)
    return targets


# ----------------------------------------------------------------------------- the student's step

class MultiTaskLoss(torch.nn.Module):
    """The student's side of one step (Sec. 3): the weighted sum of the named terms a stage uses,
    L = L_CLIP + lam * L_SAM for the distill stage, in one forward, so DDP sees one forward and
    one backward per step and all-reduces the combined gradients once (train.py wraps this
    module). A CLIP sample feeds only L_CLIP, a SAM sample only L_SAM.
    weights: {term name: weight}, e.g. {"loss_clip": 1.0, "loss_sam": 10.0}.
    forward(batches, targets) -> {"loss": the weighted sum, every term by name, and the parts of
    L_SAM as loss_sam_focal, loss_sam_dice, loss_sam_iou}."""

    def __init__(self, model, weights):
        super().__init__()
        self.model = model
        self.weights = dict(weights)

    def forward(self, batches, targets):
        out = {}
        clip_batch = batches["clip"]
        # one backbone forward on the D_CLIP images serves every head that reads them
        tokens = self.model.encoder.forward_tokens(clip_batch["student"])    # (B, H, W, C)
        if "loss_clip" in self.weights:                                  # Eq. 1
            pooled, _ = self.model.head_clip(tokens)                     # (B, D)
            out["loss_clip"] = loss_clip(pooled, targets["loss_clip"], clip_batch["ok"])
        if "loss_sam" in self.weights:                                   # Eq. 2
            out["loss_sam"], parts = self.sam_term(batches["sam"], targets["loss_sam"])
            for name, value in parts.items():
                out[f"loss_sam_{name}"] = value
        out["loss"] = sum(weight * out[name] for name, weight in self.weights.items())
        return out

    def sam_term(self, sam_batch, groups):
        """L_SAM of Eq. 2 over every prompt group and round of prompts.teacher_rounds, each round
        and prompt weighing the same. -> (L_SAM, its parts)."""
        embeddings = self.model.encoder(sam_batch["image"])                # (B, C, h, w)
        student_masks = []
        student_iou = []
        teacher_masks = []
        teacher_iou = []
        valid = []
        for group in groups:
            masks, iou = prompts.student_rounds(self.model.head_sam, embeddings, group)
            R = masks.shape[0]                                             # (R, n, 4, 4h, 4w)
            student_masks.append(masks.flatten(0, 1))                      # (R*n, 4, 4h, 4w)
            student_iou.append(iou.flatten(0, 1))                          # (R*n, 4)
            teacher_masks.append(group["logits"].flatten(0, 1))
            teacher_iou.append(group["iou"].flatten(0, 1))
            valid.append(group["valid"].repeat(R))                         # (R*n,)
        masks = torch.cat(student_masks)
        iou = torch.cat(student_iou)
        valid = torch.cat(valid)
        total, parts = loss_sam(masks[valid], torch.cat(teacher_masks)[valid],
                                iou[valid], torch.cat(teacher_iou)[valid])
        if not valid.any():
            # no readable D_SAM image on this rank: a zero loss that still touches every weight,
            # so DDP's all-reduce finds a gradient for each
            total = 0.0 * (masks.sum() + iou.sum())
        return total, parts
