# python -m pytest tests/test_train.py -q
"""train.py on the tiny preset: what trains and what stays frozen, the schedule, exact resume,
SIGTERM, a 2-process torchrun run against a 1-process run, and skipped corrupt images."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import heads
import losses
import sampling
import train
from conftest import ROOT
from toy import layouts

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args):
    """train.py in this process (imports and torch's one-time set-up are paid once per session), on
    the CPU even where a GPU is visible: these tests pin CPU numerics (exact resume, 1 rank == 2
    ranks on gloo); tests/test_cuda.py runs the GPU path."""
    train.main(["--preset", "tiny", "--device", "cpu", *args])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny preset's own data (train.builtin_data): 24 D_CLIP and 6 SA-1B toy scenes."""
    root = str(tmp_path_factory.mktemp("data"))
    clip_dir = layouts.write_clip_images(os.path.join(root, "clip"), 24)
    return os.path.join(clip_dir, "images"), layouts.write_sa1b(
        os.path.join(root, "sa1b"), 6
    )  # images only


def stage_config(stage, **settings):
    """The TrainConfig of a stage's STAGES row, as train.resolve_config starts it."""
    return train.TrainConfig(stage=stage, **train.STAGES[stage], **settings)


def test_lr_schedule_hand_values():
    assert train.lr_factor(0, 100, 4) == 0.25 and train.lr_factor(3, 100, 4) == 1.0
    assert train.lr_factor(4, 100, 4) == 1.0  # cosine starts at its top
    assert abs(train.lr_factor(52, 100, 4) - 0.5) < 1e-12  # halfway through the decay
    assert train.lr_factor(100, 100, 4) == 0.0


@pytest.mark.parametrize("stage", ["probe", "distill", "adapt"])
def test_what_trains_and_what_stays_frozen(stage, tiny_data):
    torch.manual_seed(0)
    args = train.parse_args(["--preset", "tiny"])
    teachers = train.build_teachers(args)
    model = train.SAMCLIP.from_modules(teachers)
    with torch.no_grad():  # move the student off the teacher
        for p in model.head_sam.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = stage_config(stage)
    train.set_trainable(model, cfg)
    cb = data.collate(
        [data.CLIPImages(tiny_data[0], teacher_size=64)[(i, 48, 0)] for i in range(2)]
    )
    ds = data.SA1B(tiny_data[1], img_size=160, masks_per_image=4)
    sb = data.collate_sam([ds[(0, 0)], ds[(1, 0)]])
    batches = {"clip": cb, "sam": sb}
    targets = losses.teacher_targets(teachers, batches, cfg.losses, sam_rounds=3)
    out = losses.MultiTaskLoss(model, cfg.losses)(batches, targets)
    use_sam = "loss_sam" in out  # only the distill stage's row
    assert use_sam == (stage == "distill")
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = (
        {
            n
            for n, _ in model.named_parameters()
            if n.split(".")[0] in ("encoder", "head_clip") or n.startswith("head_sam.mask_decoder")
        }
        if use_sam
        else {n for n, _ in model.named_parameters() if n.startswith("head_clip")}
    )
    assert trainable == expected
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    for t in teachers.values():  # teachers: frozen, eval, no grad
        assert not t.training and all(
            p.grad is None and not p.requires_grad for p in t.parameters()
        )


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_data):
    common = ["--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--save-every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run([*common, "--out", a, "--max-steps", "3"])
    run([*common, "--out", b, "--max-steps", "2"])
    with pytest.raises(SystemExit, match="--resume"):  # refuses to overwrite silently
        run([*common, "--out", b, "--max-steps", "3"])
    run([*common, "--out", b, "--max-steps", "3", "--resume"])
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for k in ("loss", "loss_clip", "loss_sam", "lr", "resolution"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    wa = torch.load(os.path.join(a, "samclip.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "samclip.pt"), weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_finished_run_asked_again_does_nothing(tmp_path, tiny_data, capsys):
    """The README's main job run twice: the second time says so in one line and returns (exit 0),
    so a following `&& segment_demo.py` runs; settings that only say how to run (--max-steps,
    --log-every) do not make it another run."""
    common = ["--stage", "probe", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--out", str(tmp_path / "r")]
    run(common)
    before = (tmp_path / "r" / "ckpt_probe.pt").stat().st_mtime_ns
    capsys.readouterr()
    run([*common, "--log-every", "3"])
    assert "already holds this run, finished with these settings" in capsys.readouterr().out
    assert (tmp_path / "r" / "ckpt_probe.pt").stat().st_mtime_ns == before  # nothing redone


def test_an_unfinished_run_is_refused_with_the_flag_to_pass(tmp_path, tiny_data):
    common = ["--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--out", str(tmp_path / "r")]
    run([*common, "--max-steps", "1"])
    with pytest.raises(SystemExit, match="unfinished; pass --resume"):
        run(common)


def test_other_settings_in_the_same_out_are_refused_naming_what_differs(tmp_path, tiny_data):
    common = ["--stage", "probe", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--out", str(tmp_path / "r")]
    run(common)
    for flags in ([], ["--resume"]):
        with pytest.raises(SystemExit, match=r"other settings .*lr 0\.0008 -> 0\.001"):
            run([*common, "--lr", "1e-3", *flags])


def test_a_preset_names_its_data_step_when_the_data_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "ROOT", str(tmp_path))  # a clone with no data/ yet
    with pytest.raises(
        SystemExit, match=r"missing: write it first with `python -m toy.prepare tiny`"
    ):
        train.main(["--preset", "tiny", "--out", str(tmp_path / "r")])


def test_the_core_does_not_import_the_toy_world():
    """toy/ depends on the core, never the reverse: no root .py file imports toy. The toy preset
    names the toy world's classes as plain data; they must be the world's own."""
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, name)) as f:
                source = f.read()
            assert "import toy" not in source and "from toy" not in source, name
    from toy.drawing import CLASSES

    assert tuple(train.PRESETS["toy"]["vocabulary"]) == tuple(CLASSES)


def test_sigterm_saves_and_resume_finishes(tmp_path, tiny_data):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--stage", "probe",
           "--device", "cpu", "--out", out, "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
           "--save-every", "1000", "--epochs", "50"]  # far more steps than the test waits for
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(path) and os.path.getsize(path) > 0) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = torch.load(os.path.join(out, "ckpt_probe.pt"), weights_only=True)
    assert ckpt["step"] >= 1 and not ckpt["done"] and "interrupted" in err + _
    run(
        ["--stage", "probe", "--out", out, "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
         "--epochs", "50", "--max-steps", str(ckpt["step"] + 2), "--resume"]
    )
    assert metrics(out)[-1]["step"] == ckpt["step"] + 2


def test_two_processes_match_one(tmp_path, tiny_data):
    """torchrun, gloo, 2 ranks with half the batch each == 1 process with the whole global batch."""
    # 48 and 96 px: the batch at 96 px is exactly a quarter (2 of 8), so it splits the same on 1
    # or 2 ranks; with the tiny preset's own 80 px, round(8 * 0.36) = 3 on one rank but
    # 2 x round(4 * 0.36) = 2
    common = ["--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--max-steps", "2", "--resolutions", "48", "96"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([*common, "--out", one])
    r2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29531", os.path.join(ROOT, "train.py"), "--preset", "tiny",
         "--device", "cpu", *common, "--out", two],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    for name in sorted(os.listdir(tiny_data[0]))[:7]:  # 7 good images + 1 broken = one batch of 8
        shutil.copy(os.path.join(tiny_data[0], name), clip_dir)
    with open(os.path.join(clip_dir, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    run(
        ["--stage", "probe", "--out", str(tmp_path / "run"), "--clip-data", clip_dir,
         "--sam-data", tiny_data[1], "--epochs", "1", "--resolutions", "48", "--clip-batch", "8"]
    )
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed and "broken.jpg" in printed


def test_teacher_cache_is_built_then_reused(tmp_path, tiny_data):
    cache = str(tmp_path / "cache")
    common = ["--stage", "probe", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--max-steps", "3", "--cache-teacher", cache]
    run([*common, "--out", str(tmp_path / "a")])  # builds the table, then trains
    table = np.load(os.path.join(cache, "embeddings.npy"))
    assert table.shape[0] == len(os.listdir(tiny_data[0])) and np.isfinite(table).all()
    run([*common, "--out", str(tmp_path / "b")])  # reads it back: same targets, losses
    a, b = metrics(str(tmp_path / "a")), metrics(str(tmp_path / "b"))
    assert [m["loss_clip"] for m in a] == pytest.approx([m["loss_clip"] for m in b], rel=1e-6)
    np.save(os.path.join(cache, "embeddings.npy"), -table)  # a table that is read changes targets
    run([*common, "--out", str(tmp_path / "n")])
    # step 1 sees the same batch: 1 - cos(s, -t) = 2 - (1 - cos(s, t)) for every sample
    assert metrics(str(tmp_path / "n"))[0]["loss_clip"] == pytest.approx(
        2 - a[0]["loss_clip"], rel=1e-5
    )
    with pytest.raises(SystemExit, match="another teacher"):
        run([*common, "--out", str(tmp_path / "c"), "--seed", "1"])



# ------------------------------------------------------------------ weight decay, data sizes, save


def test_weight_decay_only_on_linear_and_conv_weights():
    model = train.build_samclip("tiny")
    cfg = stage_config("distill", weight_decay=0.05)
    train.set_trainable(model, cfg)
    groups = train.param_groups(model, cfg)
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = [name[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    kept = [name[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert sorted(decayed + kept) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad
    )  # each once
    # by hand: the trainable matrices that are tables or tokens, not layer weights (tiny: 4
    # encoder blocks, 3 in HeadCLIP)
    tables = {
        "encoder.pos_embed",
        "head_sam.mask_decoder.iou_token.weight",
        "head_sam.mask_decoder.mask_tokens.weight",
    }
    tables |= {f"encoder.blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"}
    tables |= {f"head_clip.blocks.{i}.attn.rel_pos_{a}" for i in range(3) for a in "hw"}
    matrices = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    assert tables <= matrices
    assert (
        set(decayed) == matrices - tables
    )  # every other matrix is a layer weight; biases and norms are 1-d
    for n in (
        "encoder.patch_embed.proj.weight",
        "encoder.neck.0.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "head_sam.mask_decoder.output_upscaling.0.weight",
        "head_clip.mlp.0.weight",
    ):  # conv, linear, conv-T
        assert n in decayed


def _copy(names, src, dst):
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(src, name), dst)
    return str(dst)


def _broken_folder(folder, n):
    os.makedirs(folder)
    for i in range(n):
        with open(os.path.join(folder, f"broken_{i}.jpg"), "wb") as f:
            f.write(b"not a jpeg at all")
    return str(folder)


@contextlib.contextmanager
def deadline(seconds):
    """Turn a hang into a failure: SIGALRM raises in the main thread after `seconds`."""

    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_sam_folder_smaller_than_a_batch_trains_with_what_there_is(
    tmp_path, tiny_data, capsys, monkeypatch
):
    one = _copy(
        sorted(os.listdir(tiny_data[1]))[:2], tiny_data[1], tmp_path / "sa1b"
    )  # sa_N.jpg + sa_N.json
    native, real_init = [], data.CLIPImages.__init__

    def spy(self, *args, **kwargs):  # which native side train.py hands D_CLIP
        native.append(kwargs.get("native_size"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(data.CLIPImages, "__init__", spy)
    out = str(tmp_path / "run")
    with deadline(120):  # an empty D_SAM plan used to spin for ever
        run(
            ["--stage", "distill", "--out", out, "--clip-data", tiny_data[0], "--sam-data", one,
             "--max-steps", "1"]
        )
    assert "holds 1 images, fewer than one D_SAM batch of 2" in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == [1] and native == [
        160
    ]  # tiny encoder: 160 px native
    assert not sampling.FixedBatchSampler(
        1, 2
    ).drop_last  # D_SAM's sampler wraps rather than plan nothing
    sampler = sampling.VariableResolutionSampler(
        1, 2, (1,)
    )  # 1 image, batch 2, drop_last: no batch in any epoch
    with deadline(10), pytest.raises(ValueError, match="holds no batch"):
        next(sampling.stream([], sampler, 0))
    with deadline(10), pytest.raises(ValueError, match="holds no batch"):
        sampling.locate(sampler, 3)
    # 1 sample, sizes 2 (resolution 1) or 1 (resolution 2): an epoch has a batch only when its
    # first draw is 2
    mixed = sampling.VariableResolutionSampler(1, 2, (1, 2), seed=6)
    assert [len(mixed.plan(e)) for e in (0, 1)] == [1, 0]
    endless = sampling.stream(mixed, mixed, 0)  # the sampler is its own loader here
    assert next(endless)[0] == 0
    with deadline(10), pytest.raises(
        ValueError, match="epoch 1 of an endless batch stream holds no batch"
    ):
        next(endless)


def test_too_few_or_unreadable_clip_images_stop_at_once(tmp_path, tiny_data):
    few = _copy(sorted(os.listdir(tiny_data[0]))[:4], tiny_data[0], tmp_path / "few")
    common = ["--stage", "probe", "--sam-data", tiny_data[1], "--clip-batch", "8"]
    cases = (
        (few, r"image source .*few'? holds 4 images; one training step takes 8"),
        (
            _broken_folder(tmp_path / "broken", 8),
            r"broken'?: none of the 8 images tried could be read",
        ),
        (_copy([], "", tmp_path / "empty"), r"empty'? holds no images"),
    )  # an empty folder
    for i, (folder, message) in enumerate(cases):
        out = str(tmp_path / f"run{i}")
        with pytest.raises(SystemExit, match=message) as e:
            run([*common, "--out", out, "--clip-data", folder])
        assert "\n" not in str(e.value) and not os.path.exists(os.path.join(out, "samclip.pt"))


def test_epoch_without_one_readable_image_stops_saved(tmp_path, tiny_data, monkeypatch):
    broken = _broken_folder(tmp_path / "broken", 8)
    # the start-up probe passed
    monkeypatch.setattr(
        data.CLIPImages, "check_readable", lambda self, min_images=1, tries=16: None
    )
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="no image could be read in epoch 0"):
        run(
            ["--stage", "probe", "--out", out, "--clip-data", broken, "--sam-data", tiny_data[1],
             "--clip-batch", "8", "--resolutions", "48", "--epochs", "3"]
        )  # one step per epoch
    ckpt = torch.load(os.path.join(out, "ckpt_probe.pt"), weights_only=True)
    assert (
        ckpt["step"] == 1
        and not ckpt["done"]
        and not os.path.exists(os.path.join(out, "samclip.pt"))
    )


SLOW_SAVE = """
import sys, time
sys.path.insert(0, {root!r})
import train, weights
real_save = weights.atomic_save
def slow_save(obj, path):            # a large checkpoint on a slow filesystem
    time.sleep({delay})
    real_save(obj, path)
weights.atomic_save = slow_save
train.main(sys.argv[1:])
"""


def test_sigterm_on_two_ranks_waits_for_rank0_save(tmp_path, tiny_data):
    """Both ranks get SIGTERM; rank 0's save takes 2 s. The launcher here tears the group down the
    moment one rank exits (torchrun does so after a grace period, 30 s by default, which a big
    checkpoint can outlast): the checkpoint must be complete by then, so rank 1 must wait."""
    import socket

    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(root=ROOT, delay=2.0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    args = [sys.executable, str(script), "--preset", "tiny", "--device", "cpu", "--stage", "probe",
            "--out", out, "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
            "--save-every", "1000", "--epochs", "50"]
    procs = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                ENV,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
        )
        for r in range(2)
    ]
    path, give_up = os.path.join(out, "metrics.jsonl"), time.time() + 120
    try:
        while (
            not (os.path.exists(path) and os.path.getsize(path) > 0)
            and time.time() < give_up
            and all(p.poll() is None for p in procs)
        ):
            time.sleep(0.1)
        for p in procs:  # as a scheduler signals every process
            p.send_signal(signal.SIGTERM)
        while all(p.poll() is None for p in procs) and time.time() < give_up:
            time.sleep(0.02)
        first = [p.poll() for p in procs if p.poll() is not None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # the rest go at once, no grace
        errors = "".join(p.communicate()[1][-1500:] for p in procs)
    assert first and first[0] == 128 + signal.SIGTERM, errors
    ckpt = torch.load(os.path.join(out, "ckpt_probe.pt"), weights_only=True)
    assert ckpt["step"] >= 1 and not ckpt["done"]
    run(
        ["--stage", "probe", "--out", out, "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
         "--epochs", "50", "--max-steps", str(ckpt["step"] + 1), "--resume"]
    )
    assert metrics(out)[-1]["step"] == ckpt["step"] + 1


def test_compile_trains_the_same_numbers_and_keeps_checkpoint_keys(
    tmp_path, tiny_data, capsys, monkeypatch
):
    """--compile goes through torch.compile's graph capture (here with the "eager" backend, so the
    test takes seconds; inductor's code generation takes minutes on 2 cores and is measured in the
    README): the first step's time is logged, the losses equal an uncompiled run's, and samclip.pt
    keeps the plain parameter names, so evaluate.py and the demo load it."""
    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self: plain_compile(self, backend="eager")
    )
    torch._dynamo.reset()
    common = ["--stage", "distill", "--clip-data", tiny_data[0], "--sam-data", tiny_data[1],
              "--max-steps", "1"]
    run([*common, "--out", str(tmp_path / "eager")])
    run([*common, "--out", str(tmp_path / "compiled"), "--compile"])
    assert "--compile: first step" in capsys.readouterr().out
    (x,), (y,) = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    # the tiny student starts as a copy of the SAM teacher: L_SAM is zero in exact arithmetic, so
    # only its presence and its size are checked, never its sign (it came out -9.3e-10 on one CPU)
    assert abs(x["loss_sam"]) < 1e-5 and abs(y["loss_sam"]) < 1e-5
    saved = torch.load(tmp_path / "compiled" / "samclip.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in saved)
    torch._dynamo.reset()


def test_crop_scale_flag_reaches_the_d_clip_crops(tiny_data):
    """--crop-scale overrides the preset's D_CLIP crop area range, and the loader's dataset draws
    its crops with it."""
    args = train.parse_args(["--preset", "tiny", "--clip-data", tiny_data[0],
                             "--crop-scale", "0.2", "0.3"])
    teachers = train.build_teachers(args)
    model = train.SAMCLIP.from_modules(teachers)
    cfg = train.resolve_config(args, "probe", model.cfg.encoder, teachers["clip"].config)
    assert cfg.crop_scale == (0.2, 0.3)
    loader, _ = train.data_loaders(cfg, model, 1, 0, torch.device("cpu"))["clip"]
    assert loader.dataset.scale == (0.2, 0.3)
    default = train.resolve_config(train.parse_args(["--preset", "tiny"]), "probe",
                                   model.cfg.encoder, teachers["clip"].config)
    assert default.crop_scale == train.TrainConfig.crop_scale == (0.5, 1.0)
    with pytest.raises(SystemExit):  # argparse's one-line error, exit status 2
        train.parse_args(["--preset", "tiny", "--crop-scale", "0.8", "0.2"])


def test_decoder_lr_ratio_sets_the_mask_decoder_alone_and_zero_freezes_it(tiny_data):
    """--decoder-lr-ratio overrides --backbone-lr-ratio for HeadSAM's mask decoder only; 0 takes
    the decoder out of the stage's trained modules (no optimizer group, no gradient), as --lam 0
    does (no loss would train it: AdamW's decay alone would shrink it)."""
    base = ["--preset", "tiny", "--clip-data", tiny_data[0], "--lr", "1e-3"]
    args = train.parse_args(base + ["--backbone-lr-ratio", "1", "--decoder-lr-ratio", "0.1"])
    teachers = train.build_teachers(args)
    model = train.SAMCLIP.from_modules(teachers)
    clip_cfg = teachers["clip"].config
    cfg = train.resolve_config(args, "distill", model.cfg.encoder, clip_cfg)
    assert cfg.trains == {"head_clip": 1.0, "encoder": 1.0, "head_sam.mask_decoder": 0.1}
    lrs = {g["module"]: g["lr"] for g in train.param_groups(model, cfg)}
    assert lrs == {"head_clip": 1e-3, "encoder": 1e-3, "head_sam.mask_decoder": 1e-4}
    frozen = train.parse_args(base + ["--decoder-lr-ratio", "0"])
    cfg = train.resolve_config(frozen, "distill", model.cfg.encoder, clip_cfg)
    assert cfg.trains == {"head_clip": 1.0, "encoder": 0.1}   # App. A's backbone ratio stays
    train.set_trainable(model, cfg)
    assert not any(p.requires_grad for p in model.head_sam.mask_decoder.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    without_sam = train.parse_args(base + ["--lam", "0", "--backbone-lr-ratio", "1"])
    cfg = train.resolve_config(without_sam, "distill", model.cfg.encoder, clip_cfg)
    assert cfg.losses["loss_sam"] == 0   # lam = 0: nothing trains the decoder, so it is frozen
    assert cfg.trains == {"head_clip": 1.0, "encoder": 1.0}
    probe = train.resolve_config(args, "probe", model.cfg.encoder, clip_cfg)
    assert probe.trains == {"head_clip": 1.0}   # a stage without the decoder is left as it is
    with pytest.raises(SystemExit):  # argparse's one-line error, exit status 2
        train.parse_args(["--preset", "tiny", "--decoder-lr-ratio", "-0.5"])


def test_device_flag_refuses_what_cannot_run_in_one_line(monkeypatch):
    """--device cuda without a GPU, and more ranks on a node than it has GPUs (NCCL would stop
    both ranks with "Duplicate GPU detected" only after they started): one line each, naming the
    flag to pass instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda, but torch sees no CUDA GPU"):
        train.setup_distributed("cuda")
    assert train.setup_distributed("auto")["device"] == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"LOCAL_RANK 1, but this node has 1 GPU.*--device cpu"):
        train.setup_distributed("auto")
