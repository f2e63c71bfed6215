# python -m pytest tests/test_prompts.py -q
"""prompts.py, SAM's interactive rounds: the follow-up point from the error region and the mask
prompt from the previous round (a scripted head), teacher and student given the same prompts in
every round, round 0 exactly the prompt that is evaluated, and L_SAM vanishing over all rounds when
the student equals the teacher."""

import os

import pytest
import torch

import data
import heads
import losses
import prompts
import train
from toy import layouts


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny preset's kind of data: 24 D_CLIP and 6 SA-1B toy scenes."""
    root = str(tmp_path_factory.mktemp("data"))
    clip_dir = layouts.write_clip_images(os.path.join(root, "clip"), 24)
    return os.path.join(clip_dir, "images"), layouts.write_sa1b(os.path.join(root, "sa1b"), 6)


def distill(model):
    """The student's side of a distill step, with the distill row's loss weights."""
    return losses.MultiTaskLoss(model, train.STAGES["distill"]["losses"])


class ScriptedHead:
    """Stands in for SAM's head: call i returns logits +8 on script[i] (4, H', W') bool and -8
    elsewhere, for every prompt set, and records the prompts it was given."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def all_outputs(self, image_embeddings, points=None, boxes=None, masks=None):
        out = self.script[len(self.calls)]
        self.calls.append({"points": points, "boxes": boxes, "masks": masks})
        n = image_embeddings.shape[0]
        return (torch.where(out, 8.0, -8.0).expand(n, -1, -1, -1).clone(), torch.zeros(n, 4))


def test_follow_up_point_from_error_region_and_mask_prompt_from_previous_round():
    # an 8 x 8 low-res grid (a 32 px frame, 4 px per cell) of an image resized to 32 (h) x 24 (w):
    # columns 6 and 7 are padding. The object: rows 2-5, columns 1-4.
    H = W = 8
    gt = torch.zeros(H, W, dtype=torch.bool)
    gt[2:6, 1:5] = True
    near = gt.clone()  # round 0's best multimask output: misses (2, 1), adds (6, 2) and,
    near[2, 1], near[6, 2], near[0, 7] = (
        False,
        True,
        True,
    )  # in the padding, (0, 7), which must not count
    everything, nothing = torch.ones(H, W, dtype=torch.bool), torch.zeros(H, W, dtype=torch.bool)
    round0 = torch.stack(
        [everything, nothing, near, nothing]
    )  # token 0 (single mask) and multimask tokens 1-3
    round1 = torch.stack([gt, nothing, nothing, nothing])  # token 0 now matches the object exactly
    for draw, cell, label in (
        (0.25, (2, 1), 1),
        (0.75, (6, 2), 0),
    ):  # 2 error cells, row-major: k = 0, then 1
        head = ScriptedHead([round0, round1, round1])
        batch = {
            "has_box": torch.tensor([[False]]),
            "valid": torch.tensor([[True]]),
            "boxes": torch.zeros(1, 1, 4),
            "point_coords": torch.tensor([[[[10.0, 14.0]]]]),
            "point_labels": torch.tensor([[[1]]]),
            "gt_masks": gt[None, None],
            "input_size": torch.tensor([[32, 24]]),
            "error_draws": torch.full((1, 1, data.SAM_POINT_ROUNDS), draw),
        }
        (group,) = prompts.teacher_rounds(head, torch.zeros(1, 1, 1, 1), batch, rounds=3)
        r, c = cell
        # one point prompt: round 0 is the point alone, each later round one point more
        assert group["points_per_round"] == [1, 2, 3]
        assert group["labels"][0].tolist() == [1, label, -1]
        # the cell's centre, (c + 0.5) * 4, minus SA1B's 0.5 (the prompt encoder adds it back)
        assert group["coords"][0, 1].tolist() == [(c + 0.5) * 4 - 0.5, (r + 0.5) * 4 - 0.5]
        assert group["coords"][0, 2].tolist() == [
            0.0,
            0.0,
        ]  # round 1 matched the object: no new point
        # the mask prompt: none in round 0, then the previous round's chosen logits (token 2,
        # then token 0)
        masks = [call["masks"] for call in head.calls]
        assert masks[0] is None
        assert torch.equal(masks[1][0, 0], torch.where(near, 8.0, -8.0))
        assert torch.equal(masks[2][0, 0], torch.where(gt, 8.0, -8.0))
        assert torch.equal(
            group["mask_inputs"][:, 0, 0], torch.stack([masks[1][0, 0], masks[2][0, 0]])
        )
        for i, call in enumerate(head.calls):  # the teacher saw exactly the prompts it returns
            assert torch.equal(call["points"][0], group["coords"][:, : i + 1])
            assert torch.equal(call["points"][1], group["labels"][:, : i + 1])


def _tiny_setup(tiny_data, images=4, masks_per_image=4):
    torch.manual_seed(0)
    teachers = train.build_teachers(train.parse_args(["--preset", "tiny"]))
    model = train.SAMCLIP.from_modules(teachers)  # the tiny student starts as the teacher
    sam_enc = teachers["sam_encoder"]
    sam_head = teachers["sam_head"]
    teacher = teachers["clip"]
    ds = data.SA1B(tiny_data[1], img_size=160, masks_per_image=masks_per_image)
    sb = data.collate_sam([ds[(i, 0)] for i in range(images)])
    cb = data.collate(
        [data.CLIPImages(tiny_data[0], teacher_size=64)[(i, 48, 0)] for i in range(2)]
    )
    with torch.no_grad():
        clip_target = teacher.visual(cb["teacher"])
    return sam_enc, sam_head, model, sb, cb, clip_target


def test_student_and_teacher_get_identical_prompts_every_round(tiny_data, monkeypatch):
    sam_enc, sam_head, model, sb, cb, clip_target = _tiny_setup(tiny_data)
    calls, original = [], heads.HeadSAM.all_outputs

    def record(self, image_embeddings, points=None, boxes=None, masks=None):
        out = original(self, image_embeddings, points, boxes, masks)
        calls.append({"head": self, "points": points, "boxes": boxes, "masks": masks, "out": out})
        return out

    monkeypatch.setattr(heads.HeadSAM, "all_outputs", record)
    R = 4
    with torch.no_grad():
        emb = sam_enc(sb["image"])
        torch.manual_seed(1)
        groups = prompts.teacher_rounds(sam_head, emb, sb, R)
        torch.manual_seed(2)  # no global random state: the same targets again
        again = prompts.teacher_rounds(sam_head, emb, sb, R)
    assert groups[0]["boxes"] is not None and groups[-1]["boxes"] is None  # both prompt kinds
    for g, h in zip(groups, again):
        assert all(torch.equal(g[k], h[k]) for k in ("coords", "labels", "mask_inputs", "logits"))
    assert any((g["labels"][:, -1] >= 0).any() for g in groups)  # follow-up points drawn
    teacher_calls = calls[: R * len(groups)]
    calls.clear()
    distill(model)({"clip": cb, "sam": sb}, {"loss_clip": clip_target, "loss_sam": groups})
    student_calls = calls
    assert all(c["head"] is sam_head for c in teacher_calls)
    assert all(c["head"] is model.head_sam for c in student_calls)
    assert len(student_calls) == len(teacher_calls)  # every round its own call

    def call_prompt(c):
        points = c["points"] if c["points"] is not None else (None, None)
        return [points[0], points[1], c["boxes"], c["masks"]]

    for s, t in zip(student_calls, teacher_calls):
        for a, b in zip(call_prompt(s), call_prompt(t)):
            assert (a is None and b is None) or torch.equal(a, b)
    for j, g in enumerate(groups):
        rounds = teacher_calls[j * R : (j + 1) * R]
        for r in range(1, R):  # round r's mask prompt: one of round r-1's outputs (token 0 after 0)
            prev, mask = rounds[r - 1]["out"][0], rounds[r]["masks"][:, 0]
            if r > 1:
                assert torch.equal(mask, prev[:, 0])
            else:
                assert all(
                    any(torch.equal(mask[i], prev[i, k]) for k in range(4))
                    for i in range(len(mask))
                )


def test_round_zero_is_exactly_the_prompt_that_is_evaluated(tiny_data):
    """Round 0 of every slot is the prompt as evaluate.py instseg and SAM's predictor give it: a box
    alone (no padding point for the follow-up points of later rounds), or the sampled points plus
    SAM's one padding point. The reference is the per-image call those make."""
    sam_enc, sam_head, model, sb, cb, clip_target = _tiny_setup(tiny_data)
    with torch.no_grad():
        emb = sam_enc(sb["image"])
        groups = prompts.teacher_rounds(sam_head, emb, sb, rounds=4)
    kinds = set()
    for g in groups:
        for j, b in enumerate(g["image"].tolist()):
            if g["boxes"] is not None:  # evaluate.py instseg: HeadSAM(embeddings, boxes=box)
                kinds.add("box")
                with torch.no_grad():
                    ref, _ = sam_head(
                        emb[b : b + 1], boxes=g["boxes"][j : j + 1], multimask_output=False
                    )
                torch.testing.assert_close(g["logits"][0, j, :1], ref[0], rtol=1e-4, atol=1e-4)
            else:  # the predictor: the n points, it adds the padding point
                P0 = g["points_per_round"][0]
                kinds.add(P0)
                points = (g["coords"][j : j + 1, :P0], g["labels"][j : j + 1, :P0])
                with torch.no_grad():
                    ref, _ = sam_head(emb[b : b + 1], points=points, multimask_output=True)
                torch.testing.assert_close(g["logits"][0, j, 1:], ref[0], rtol=1e-4, atol=1e-4)
    assert "box" in kinds and 1 in kinds, kinds


def test_loss_sam_vanishes_over_all_rounds_when_student_equals_teacher(tiny_data):
    sam_enc, sam_head, model, sb, cb, clip_target = _tiny_setup(tiny_data)
    with torch.no_grad():
        emb = sam_enc(sb["image"])
        targets = {R: prompts.teacher_rounds(sam_head, emb, sb, R) for R in (1, 4)}
    step = distill(model)
    batches = {"clip": cb, "sam": sb}
    for R in (1, 4):
        out = step(batches, {"loss_clip": clip_target, "loss_sam": targets[R]})
        assert out["loss_sam"].abs() < 1e-6 and out["loss_sam_iou"] < 1e-10, R
    # a different mask-prompt path in the student changes only the rounds with a mask prompt
    with torch.no_grad():
        for p in model.head_sam.prompt_encoder.mask_downscaling.parameters():
            p.add_(0.5 * torch.randn_like(p))
    same = step(batches, {"loss_clip": clip_target, "loss_sam": targets[1]})
    moved = step(batches, {"loss_clip": clip_target, "loss_sam": targets[4]})
    assert same["loss_sam"].abs() < 1e-6 and moved["loss_sam"] > 1e-4


def test_padding_slots_of_an_image_with_few_masks_take_part_without_a_prompt(tiny_data):
    """More prompt slots than an image has masks: the padding slots (valid False, no point, no
    box) still form a prompt HeadSAM takes, one output each, and add nothing to L_SAM (the README
    main job's distill stage hit this with 8 slots on scenes of fewer masks)."""
    sam_enc, sam_head, model, sb, cb, clip_target = _tiny_setup(tiny_data, masks_per_image=64)
    assert not sb["valid"].all()                                  # padding slots exist
    with torch.no_grad():
        groups = prompts.teacher_rounds(sam_head, sam_enc(sb["image"]), sb, 3)
    assert sum(len(g["valid"]) for g in groups) == sb["valid"].numel()   # every slot, once
    for g in groups:
        assert g["logits"].shape[:2] == (3, len(g["valid"]))
    out = distill(model)({"clip": cb, "sam": sb}, {"loss_clip": clip_target, "loss_sam": groups})
    assert out["loss_sam"].abs() < 1e-6                           # the student is the teacher
