# python -m pytest tests/test_train.py -q
"""train.py on the tiny preset: what trains and what stays frozen, the schedule, exact resume,
SIGTERM, a 2-process torchrun run against a 1-process run, and skipped corrupt images."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train
from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args):
    """train.py in this process (imports and torch's one-time set-up are paid once per session)."""
    train.main(["--preset", "tiny", *args])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return data.make_synthetic_data(str(tmp_path_factory.mktemp("data")))


def test_lr_schedule_hand_values():
    assert train.lr_factor(0, 100, 4) == 0.25 and train.lr_factor(3, 100, 4) == 1.0
    assert train.lr_factor(4, 100, 4) == 1.0                        # cosine starts at its top
    assert abs(train.lr_factor(52, 100, 4) - 0.5) < 1e-12           # halfway through the decay
    assert train.lr_factor(100, 100, 4) == 0.0


@pytest.mark.parametrize("stage", ["probe", "distill", "adapt"])
def test_what_trains_and_what_stays_frozen(stage, tiny_data):
    torch.manual_seed(0)
    args = train.parse_args(["--preset", "tiny"])
    sam_enc, sam_head, teacher = train.build_teachers(args)
    model = train.SAMCLIP.from_modules(sam_enc, sam_head, teacher)
    with torch.no_grad():                                           # move the student off the teacher
        for p in model.head_sam.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    train.set_trainable(model, stage)
    cb = data.collate([data.CLIPImages(tiny_data[0], teacher_size=64)[(i, 48, 0)] for i in range(2)])
    ds = data.SA1B(tiny_data[1], img_size=160, masks_per_image=4)
    sb = data.collate_sam([ds[(0, 0)], ds[(1, 0)]])
    with torch.no_grad():
        t_masks, t_iou, _ = train.sam_prompts_forward(sam_head, sam_enc(sb["image"]), sb)
        target = teacher.visual(cb["teacher"])
    use_sam = stage == "distill"
    out = train.MultiTaskStep(model, 10.0)(cb["student"], target, cb["ok"], sb if use_sam else None,
                                           (t_masks, t_iou) if use_sam else None)
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("encoder", "head_clip")
                or n.startswith("head_sam.mask_decoder")} if use_sam else \
        {n for n, _ in model.named_parameters() if n.startswith("head_clip")}
    assert trainable == expected
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    for t in (sam_enc, sam_head, teacher):                          # teachers: frozen, eval, no grad
        assert not t.training and all(p.grad is None and not p.requires_grad for p in t.parameters())


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_data):
    common = ["--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1], "--save-every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run([*common, "--out", a, "--max-steps", "3"])
    run([*common, "--out", b, "--max-steps", "2"])
    with pytest.raises(SystemExit, match="--resume"):               # refuses to overwrite silently
        run([*common, "--out", b, "--max-steps", "3"])
    run([*common, "--out", b, "--max-steps", "3", "--resume"])
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for k in ("loss", "loss_clip", "loss_sam", "lr", "resolution"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-9), (x["step"], k)
    wa = torch.load(os.path.join(a, "samclip.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "samclip.pt"), weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigterm_saves_and_resume_finishes(tmp_path, tiny_data):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--stage", "probe", "--out", out,
           "--clip-data", tiny_data[0], "--sam-data", tiny_data[1], "--save-every", "1000", "--epochs", "50"]  # far more steps than the test waits for
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(path) and os.path.getsize(path) > 0) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = torch.load(os.path.join(out, "ckpt_probe.pt"), weights_only=True)
    assert ckpt["step"] >= 1 and not ckpt["done"] and "interrupted" in err + _
    run(["--stage", "probe", "--out", out, "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
         "--epochs", "50", "--max-steps", str(ckpt["step"] + 2), "--resume"])
    assert metrics(out)[-1]["step"] == ckpt["step"] + 2


def test_two_processes_match_one(tmp_path, tiny_data):
    """torchrun, gloo, 2 ranks with half the batch each == 1 process with the whole global batch."""
    common = ["--preset", "tiny", "--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--max-steps", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([*common[2:], "--out", one])
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         "29531", os.path.join(ROOT, "train.py"), *common, "--out", two],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 2
    for x, y in zip(m1, m2):
        assert x["resolution"] == y["resolution"]
        for k in ("loss", "loss_clip", "loss_sam", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_corrupt_image_is_skipped_and_counted(tmp_path, tiny_data, capsys):
    import shutil
    clip_dir = str(tmp_path / "clip")
    os.makedirs(clip_dir)
    for name in sorted(os.listdir(tiny_data[0]))[:7]:               # 7 good images + 1 broken = one batch of 8
        shutil.copy(os.path.join(tiny_data[0], name), clip_dir)
    with open(os.path.join(clip_dir, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    run(["--stage", "probe", "--out", str(tmp_path / "run"), "--clip-data", clip_dir, "--sam-data", tiny_data[1],
         "--epochs", "1", "--resolutions", "48", "--clip-batch", "8"])
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed and "broken.jpg" in printed


def test_teacher_cache_is_filled_then_reused(tmp_path, tiny_data):
    import numpy as np
    cache = str(tmp_path / "cache")
    common = ["--stage", "probe", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1], "--max-steps", "3",
              "--cache-teacher", cache]
    run([*common, "--out", str(tmp_path / "a")])                    # computes and stores the teacher rows
    filled = np.load(os.path.join(cache, "teacher_filled.npy"))
    assert 0 < filled.sum() < len(filled)
    run([*common, "--out", str(tmp_path / "b")])                    # reads them back: same targets, same losses
    a, b = metrics(str(tmp_path / "a")), metrics(str(tmp_path / "b"))
    assert [m["loss_clip"] for m in a] == pytest.approx([m["loss_clip"] for m in b], rel=1e-6)
    emb = np.load(os.path.join(cache, "teacher_emb.npy"), mmap_mode="r+")
    emb[:] = -emb[:]                                                # a cache that is read changes the targets
    emb.flush()
    run([*common, "--out", str(tmp_path / "n")])
    # step 1 sees the same batch: 1 - cos(s, -t) = 2 - (1 - cos(s, t)) for every sample
    assert metrics(str(tmp_path / "n"))[0]["loss_clip"] == pytest.approx(2 - a[0]["loss_clip"], rel=1e-5)
    with pytest.raises(SystemExit, match="another teacher"):
        run([*common, "--out", str(tmp_path / "c"), "--seed", "1"])
