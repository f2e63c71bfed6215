# python -m pytest tests/test_toy_claims.py -q
"""The toy preset end to end, from the shipped teachers: a short probing run already segments
heldout scenes by text far better than the merged model it starts from (whose HeadCLIP is
untrained), and that starting model's masks are the SAM teacher's (the reference of toy/claims.py's
claim 1)."""

import os

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
    args = ["--preset", "toy", "--stage", "probe", "--out", run]
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

    monkeypatch.setattr(claims, "EVAL_SIZES", {"semseg": 3, "instances": 2, "classify": 1})
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
