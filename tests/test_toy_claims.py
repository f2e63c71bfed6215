# python -m pytest tests/test_toy_claims.py -q
"""The toy preset end to end, from the shipped teachers: a short probing run already segments
heldout scenes by text far better than the merged model it starts from (whose HeadCLIP is untrained),
and that starting model's masks are the SAM teacher's (the reference of toy/claims.py's claim 1)."""
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
    SAMCLIP.from_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS, verbose=False).save(start, stage="start", step=0)
    return {"root": root, "start": start, "clip": os.path.join(root, "data", "clip"),
            "sa1b": os.path.join(root, "data", "sa1b"),
            "semseg": layouts.write_semseg(os.path.join(root, "semseg"), 8, seed=5, style="heldout")}


def test_short_toy_run_improves_heldout_miou(world):
    run = os.path.join(world["root"], "run")
    train.main(["--preset", "toy", "--stage", "probe", "--out", run, "--clip-data", world["clip"],
                "--sam-data", world["sa1b"], "--max-steps", "120", "--epochs", "60"])
    semseg = ["semseg", "--data", world["semseg"], "--resolution", "1024"]         # the toy encoder's 256 px
    before = evaluate.main([*semseg, "--checkpoint", world["start"]])["mIoU"]
    after = evaluate.main([*semseg, "--checkpoint", os.path.join(run, "samclip.pt")])["mIoU"]
    assert after > before + 10, (before, after)


def test_start_model_masks_are_the_sam_teachers(world):
    """Claim 1's reference: the merged model before training answers box prompts exactly as the SAM
    teacher does (encoder and HeadSAM copied), so its instseg numbers are the teacher's."""
    start = SAMCLIP.load(world["start"])
    encoder, head, _ = load_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS, verbose=False)
    x = torch.randn(1, 3, 256, 256)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0]])
    with torch.no_grad():
        ours = start.head_sam(start.encoder(x), boxes=boxes)[0]
        theirs = head(encoder(x), boxes=boxes)[0]
    assert torch.equal(ours, theirs)

