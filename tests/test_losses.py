# python -m pytest tests/test_losses.py -q
"""Eq. 1 and Eq. 2 against hand-computed values; each loss vanishes when student equals teacher."""

import math

import torch

import losses


def test_loss_clip_hand_case():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    # cosines 1/sqrt(2) and 1 -> mean of (1 - cos) = (1 - 0.7071) / 2
    assert math.isclose(losses.loss_clip(s, t).item(), (1 - 1 / math.sqrt(2)) / 2, rel_tol=1e-6)
    # a placeholder sample (unreadable image) is left out of the mean
    assert math.isclose(
        losses.loss_clip(s, t, torch.tensor([True, False])).item(),
        1 - 1 / math.sqrt(2),
        rel_tol=1e-6,
    )


def test_focal_hand_case_and_hard_targets():
    # one pixel, logit 0 (p = 0.5), target 1: alpha (1-p)^2 (-log p) = 0.25 * 0.25 * ln 2
    v = losses.focal_soft(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    assert math.isclose(v.item(), 0.0625 * math.log(2), rel_tol=1e-6)
    # on 0/1 targets it is Lin et al.'s sigmoid focal loss, written out independently here
    torch.manual_seed(0)
    x, y = torch.randn(3, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    a_t = 0.25 * y + 0.75 * (1 - y)
    ref = (-a_t * (1 - p_t) ** 2 * torch.log(p_t)).flatten(1).mean(1)
    assert torch.allclose(losses.focal_soft(x, y), ref, atol=1e-6)


def test_dice_hand_case():
    # p = (0.5, 0.5), t = (1, 0): 1 - (2*0.5 + 1) / (0.25 + 0.25 + 1 + 0 + 1) = 0.2
    v = losses.dice_soft(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 0.0]]]))
    assert math.isclose(v.item(), 0.2, rel_tol=1e-6)


def test_losses_vanish_when_student_equals_teacher():
    torch.manual_seed(1)
    z, iou = torch.randn(2, 4, 16, 16) * 3, torch.rand(2, 4)
    total, parts = losses.loss_sam(z, z, iou, iou)
    assert abs(total.item()) < 1e-6 and all(abs(v.item()) < 1e-6 for v in parts.values())
    e = torch.randn(5, 12)
    assert losses.loss_clip(e, 3 * e).item() < 1e-6  # cosine ignores the scale
    # and they do not vanish otherwise
    assert losses.loss_sam(z, -z)[0].item() > 0.1 and losses.loss_clip(e, -e).item() > 1.9


def test_loss_sam_is_never_below_zero_beyond_rounding():
    """L_SAM subtracts no constant (losses.py docstring): soft-target cross-entropy, dice and the
    IoU MSE are each >= 0, so over any student and teacher it stays above -1e-6 (rounding only)."""
    g = torch.Generator().manual_seed(3)
    for scale in (0.1, 1.0, 10.0):
        s = torch.randn(6, 4, 8, 8, generator=g) * scale
        t = torch.randn(6, 4, 8, 8, generator=g) * scale
        for student, teacher in ((s, t), (t, t), (s, s + 1e-4)):
            total, parts = losses.loss_sam(student, teacher, torch.rand(6, 4), torch.rand(6, 4))
            assert total.item() > -1e-6 and all(v.item() > -1e-6 for v in parts.values())


def test_loss_sam_weights_and_total():
    s, t = torch.zeros(1, 1, 1, 2), torch.tensor([[[[20.0, -20.0]]]])  # teacher ~ (1, 0)
    total, parts = losses.loss_sam(s, t)
    # focal per pixel 0.0625 ln 2 (target 1) and 0.75 * 0.25 * ln 2 (target 0); dice as above
    focal = (0.0625 * math.log(2) + 0.1875 * math.log(2)) / 2
    assert math.isclose(parts["focal"].item(), focal, rel_tol=1e-4)
    assert math.isclose(parts["dice"].item(), 0.2, rel_tol=1e-4)
    assert math.isclose(total.item(), 20 * focal + 0.2, rel_tol=1e-4)


class ConstantTerms(torch.nn.Module):
    """A stand-in model for MultiTaskLoss: HeadCLIP gives a fixed pooled embedding."""

    def __init__(self, pooled):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.forward_tokens = lambda images: None
        self.head_clip = lambda tokens: (pooled, None)


def test_multitask_total_is_the_stage_weighted_sum_of_named_terms():
    """L = sum of weight * term over the terms a stage names (Sec. 3: L_CLIP + lam * L_SAM); a
    stage without loss_sam computes no L_SAM and needs no D_SAM batch."""
    pooled = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[1.0, 1.0]])
    batches = {"clip": {"student": torch.zeros(1, 3, 4, 4), "ok": torch.tensor([True])}}
    step = losses.MultiTaskLoss(ConstantTerms(pooled), {"loss_clip": 3.0})
    out = step(batches, {"loss_clip": teacher})
    # 1 - cos 45 degrees, weighted 3
    assert set(out) == {"loss", "loss_clip"}
    assert math.isclose(out["loss_clip"].item(), 1 - 1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), 3 * (1 - 1 / math.sqrt(2)), rel_tol=1e-6)
