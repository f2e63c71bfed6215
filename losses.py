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
  - IoU head: SAM also trains its IoU prediction with an MSE; the paper does not say whether
    SAM-CLIP kept it. We distil it (MSE to the teacher's IoU predictions, weight 1), which also
    gives every mask-decoder parameter a gradient (DDP needs no find_unused_parameters).

Shape legend: B batch, D embedding size, M masks (prompts x outputs), h w low-res mask grid.
"""

import torch
import torch.nn.functional as F

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
