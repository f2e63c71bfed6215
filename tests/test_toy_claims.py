# python -m pytest tests/test_toy_claims.py -q
"""The toy preset end to end, from the shipped teachers: a short probing run already segments
heldout scenes by text far better than the merged model it starts from (whose HeadCLIP is
untrained), and that starting model's masks are the SAM teacher's (the reference of toy/claims.py's
claim 1). toy.claims' own machinery: evaluation sets written whole or not at all, the forgetting
curve trained in chunks for both lambdas and drawn, claim 3's side chosen on the validation set."""

import os

import numpy as np
import pytest
import torch

import evaluate
import toy
import train
from model import SAMCLIP, load_teachers
from toy import layouts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    layouts.write_training_set(os.path.join(root, "data"), clip_images=64, sam_images=4, seed=0)
    start = os.path.join(root, "start.pt")
    start_model = SAMCLIP.from_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS, verbose=False)
    start_model.save(start, stage="start", step=0)
    return {
        "root": root,
        "start": start,
        "clip": os.path.join(root, "data", "clip"),
        "sa1b": os.path.join(root, "data", "sa1b"),
        "semseg": layouts.write_semseg(os.path.join(root, "semseg"), 8, seed=5, style="heldout"),
    }


def test_short_toy_run_improves_heldout_miou(world):
    run = os.path.join(world["root"], "run")
    args = ["--preset", "toy", "--device", "cpu", "--stage", "probe", "--out", run]
    args += ["--clip-data", world["clip"], "--sam-data", world["sa1b"]]
    args += ["--max-steps", "120", "--epochs", "60"]
    train.main(args)
    # --resolution 1024: the toy encoder's 256 px
    semseg = ["semseg", "--data", world["semseg"], "--resolution", "1024"]
    before = evaluate.main([*semseg, "--checkpoint", world["start"]])["mIoU"]
    after = evaluate.main([*semseg, "--checkpoint", os.path.join(run, "samclip.pt")])["mIoU"]
    assert after > before + 10, (before, after)


def test_start_model_masks_are_the_sam_teachers(world):
    """Claim 1's reference: the merged model before training answers box prompts exactly as the SAM
    teacher does (encoder and HeadSAM copied), so its instseg numbers are the teacher's."""
    start = SAMCLIP.load(world["start"])
    teachers = load_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS, verbose=False)
    encoder = teachers["sam_encoder"]
    head = teachers["sam_head"]
    x = torch.randn(1, 3, 256, 256)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0]])
    with torch.no_grad():
        ours = start.head_sam(start.encoder(x), boxes=boxes)[0]
        theirs = head(encoder(x), boxes=boxes)[0]
    assert torch.equal(ours, theirs)


def test_an_interrupted_eval_set_is_written_again_not_scored_half_done(tmp_path, monkeypatch):
    """toy.claims writes each heldout set under a temporary name and renames it when complete: a
    write cut off midway leaves no set behind, and the next run writes the whole set."""
    from toy import claims

    sizes = {"semseg": 3, "instances": 2, "classify": 1, "validation": 2}
    monkeypatch.setattr(claims, "EVAL_SIZES", sizes)
    real = layouts.write_instances

    def cut_off(folder, *args):
        real(folder, 1, 0, "heldout")  # one image written, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(layouts, "write_instances", cut_off)
    with pytest.raises(KeyboardInterrupt):
        claims.write_eval_sets(str(tmp_path), seed=0)
    assert not (tmp_path / "instances").exists()
    monkeypatch.setattr(layouts, "write_instances", real)
    sets = claims.write_eval_sets(str(tmp_path), seed=0)
    assert len(os.listdir(os.path.join(sets["instances"], "images"))) == 2
    assert len(os.listdir(os.path.join(sets["semseg"], "images"))) == 3
    assert len(os.listdir(os.path.join(sets["validation"], "images"))) == 2


def fake_record(steps=(0, 4, 8)):
    """A forgetting record as forgetting_curve writes it, with scripted numbers."""
    curves = {
        "0": {"steps": list(steps), "mIoU": [60.0, 57.0, 54.0]},
        "10": {"steps": list(steps), "mIoU": [60.0, 60.5, 60.2]},
    }
    recipe = {"init": "x.pt", "flags": ["--stage", "distill", "--lr", "1e-3"], "epochs": 2}
    return {"sam_teacher": 61.2, "curves": curves, "recipe": recipe}


def test_forgetting_chart_has_its_size_both_lines_and_the_teacher_level(tmp_path):
    from PIL import Image

    from toy import chart, claims

    claims.forgetting_chart(fake_record()).save(tmp_path / "forgetting.png")
    img = Image.open(tmp_path / "forgetting.png").convert("RGB")
    assert img.size == chart.SIZE
    pixels = np.asarray(img)  # (H, W, 3)
    for colour in [*claims.FORGETTING_COLOURS.values(), claims.TEACHER_COLOUR]:
        assert (pixels == colour).all(-1).sum() > 100, colour
    # the teacher's level (above both curves) is drawn inside the plot, below the top margin
    plot = pixels[:, : chart.SIZE[0] - chart.MARGINS["right"]]
    rows = np.nonzero((plot == claims.TEACHER_COLOUR).all(-1))[0]
    assert rows.min() > chart.MARGINS["top"], rows.min()


def test_chart_ticks_cover_every_value():
    """The axes reach past the data at both ends: a reference level above every curve (the SAM
    teacher's) is inside the plot, not drawn over the title."""
    from toy import chart

    cases = [(47.98, 61.17), (0, 146), (58.5, 58.5), (-3.2, 0.4), (0.001, 0.0042)]
    for low, high in cases:
        ticks = chart.nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) >= 2, (low, high, ticks)
        assert len(ticks) <= 12, (low, high, ticks)
    assert chart.nice_ticks(47.98, 61.17) == [45, 50, 55, 60, 65]


def test_forgetting_curve_trains_in_chunks_and_records_both_lambdas(world, tmp_path, monkeypatch):
    """The real chunked distill runs on a small training set, 1 epoch (2 steps) per lambda, a point
    after every step; run again, nothing is trained and the same record comes back."""
    from toy import claims

    instances = layouts.write_instances(str(tmp_path / "instances"), 2, seed=0, style="heldout")
    small = ["--clip-data", world["clip"], "--sam-data", world["sa1b"], "--sam-batch", "1"]
    small += ["--masks-per-image", "2", "--sam-rounds", "1"]
    args = [world["start"], world["start"], instances, str(tmp_path / "forgetting")]
    record = claims.forgetting_curve(*args, epochs=1, every=1, scenes=2, train_flags=small)
    assert set(record["curves"]) == {"0", "10"}
    for curve in record["curves"].values():
        steps = curve["steps"]
        assert steps == [0, 1, 2], steps
        assert len(curve["mIoU"]) == len(steps)
    # the init model is the SAM teacher here: the curves start at its level
    assert record["curves"]["0"]["mIoU"][0] == record["sam_teacher"]
    assert record["curves"]["0"]["steps"] == record["curves"]["10"]["steps"]

    def no_training(argv):
        raise AssertionError(f"trained again: {argv}")

    monkeypatch.setattr(claims, "train_run", no_training)
    again = claims.forgetting_curve(*args, epochs=1, every=1, scenes=2, train_flags=small)
    assert again["curves"] == record["curves"]


def test_semseg_side_is_chosen_on_validation_not_heldout(monkeypatch):
    """Scripted numbers where validation and heldout disagree: the side follows validation, and
    the heldout set is scored at that side only."""
    from types import SimpleNamespace

    from toy import claims

    sets = {"validation": "val", "semseg": "held"}
    # (data folder, side) -> mIoU: validation prefers 448 (SAM-CLIP) and 64 (teacher)
    scripted = {
        ("val", 448): 30.0,
        ("val", 1024): 20.0,
        ("held", 448): 10.0,
        ("held", 1024): 40.0,
        ("val", 64): 8.0,
        ("val", 112): 5.0,
        ("held", 64): 3.0,
        ("held", 112): 9.0,
    }
    scored = []

    def fake_evaluate(argv):
        folder = argv[argv.index("--data") + 1]
        side = int(argv[argv.index("--resolution") + 1])
        scored.append((folder, side))
        return {"mIoU": scripted[folder, side], "resolution": side // 4}

    def fake_teacher_semseg(teacher, folder, side):
        scored.append((folder, side))
        return {"mIoU": scripted[folder, side], "resolution": side}

    monkeypatch.setattr(claims.evaluate, "main", fake_evaluate)
    monkeypatch.setattr(claims, "teacher_semseg", fake_teacher_semseg)
    teacher = SimpleNamespace(config=SimpleNamespace(image_size=64))
    results = claims.semseg_claims("m.pt", 112, teacher, sets)
    merged = results["samclip_semseg"]
    assert merged["mIoU"] == 10.0 and merged["resolution"] == 112
    assert merged["validation_mIoU"] == {"112": 30.0, "256": 20.0}
    assert results["clip_teacher_semseg"]["mIoU"] == 3.0
    assert [key for key in scored if key[0] == "held"] == [("held", 64), ("held", 448)]
    notes = claims.side_notes(results)
    assert "SAM-CLIP clip mode: 112 px" in notes and "CLIP teacher's dense features: 64 px" in notes


def test_demo_iou_prompts_the_classes_present_and_scores_each_mask(tmp_path, monkeypatch):
    """A 2 x 4 scene of classes 0 | 3 (ignored edge 255 in one pixel) and a scripted
    segment_by_text: the prompts are the names present, and each IoU is counted by hand."""
    from PIL import Image

    from toy import claims

    folder = tmp_path / "semseg"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    names = ["sky", "sun", "cloud", "grass"]
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    Image.new("RGB", (4, 2)).save(folder / "images" / "a.jpg")
    gt = np.array([[0, 0, 3, 3], [0, 255, 3, 3]], np.uint8)
    Image.fromarray(gt, mode="L").save(folder / "labels" / "a.png")
    asked = []

    def scripted(model, img, prompts, mode="sam", threshold=0.5, generator=None, embed=None):
        assert isinstance(embed, claims.zero_shot.CachedEmbeddings)  # one for every scene
        asked.append((list(prompts), mode))
        # "sky" (index 0) on 2 of its 3 pixels plus the ignored one; "grass" on all 4 and 1 sky
        labels = torch.tensor([[0, -1, 1, 1], [1, 0, 1, 1]])
        return {"labels": labels}

    monkeypatch.setattr(claims.zero_shot, "segment_by_text", scripted)
    result = claims.demo_iou(None, str(folder))
    assert asked == [(["sky", "grass"], "sam")]
    # sky: predicted {(0,0)} (the ignored pixel is not counted), true {(0,0),(0,1),(1,0)}: 1 / 3;
    # grass: predicted 5 pixels, true 4, all 4 inside: 4 / 5
    assert result["per_class"] == pytest.approx({"sky": 100 / 3, "grass": 80.0})
    assert result["IoU"] == pytest.approx((100 / 3 + 80.0) / 2)
    assert result["pairs"] == 2


def test_teacher_row_reports_each_target_and_needs_all_three():
    from toy import claims

    def report(box, point, acc):
        sam = {"box_miou": box, "point_miou": point, "point_random_miou": point - 0.1}
        return {"sam": {"heldout": sam}, "clip": {"heldout": {"zero_shot_acc": acc}}}

    (row,) = claims.teacher_rows(report(0.8123, 0.6, 0.9))
    assert "box 81.2 / single point 60.0 (SAM's centre point; 50.0 for a point" in row
    assert "accuracy 90.0%" in row
    assert row.endswith(": met |")
    (row,) = claims.teacher_rows(report(0.95, 0.59, 0.99))  # one target missed
    assert row.endswith("**not met** |")
    assert claims.teacher_rows({}) == []  # no report: no row


def test_forgetting_row_gives_where_each_curve_ends_and_the_verdict():
    from toy import claims

    row = claims.forgetting_row({**fake_record(), "reproduced": True})
    assert "alone, 8 steps (--lr 1e-3)" in row
    assert "lambda = 0 60.0 -> 54.0, lambda = 10 60.0 -> 60.2 (lowest 60.0)" in row
    assert "SAM teacher 61.2" in row and row.endswith(": reproduced |")
    row = claims.forgetting_row({**fake_record(), "reproduced": False})
    assert row.endswith("**not reproduced** |")
