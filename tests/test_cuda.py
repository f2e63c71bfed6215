# python -m pytest tests/test_cuda.py -q        (where a CUDA GPU is present; skipped elsewhere)
"""The CUDA paths, on a machine with a GPU: the official fixtures on the GPU, bf16 autocast there
against fp32, the demo on the GPU against the CPU, and train.py under torchrun on NCCL. CI has no
GPU and skips this file; `.ci/gpu` runs it, with the benchmarks, where one is lent."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import heads
import model as samclip_model
import segment_demo
import vit_det
from conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture
def true_fp32():
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa, ~1e-3 relative): parity
    at the CPU tests' 1e-4 needs true fp32 kernels, so TF32 is off inside these tests."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(x, ref):
    """||x - ref|| / ||ref|| over the whole tensor, in fp32 on the CPU."""
    x, ref = x.float().cpu(), ref.float().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def test_sam_encoder_and_head_match_official_on_cuda(sam_fixture, true_fp32):
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"], verbose=False).to(CUDA)
    head = heads.load_sam_head(sam_fixture["state_dict"], verbose=False).to(CUDA)
    with torch.no_grad():
        emb = enc(sam_fixture["inputs"]["image"].to(CUDA))
    ref = sam_fixture["outputs"]["image_embeddings"]
    torch.testing.assert_close(emb.cpu(), ref, atol=1e-4, rtol=1e-4)
    emb = sam_fixture["inputs"]["image_embeddings"].to(CUDA)
    cases = zip(sam_fixture["inputs"]["head_cases"], sam_fixture["outputs"]["head_cases"])
    for case, ref in cases:
        prompts = {k: None if case[k] is None else case[k].to(CUDA) for k in ("boxes", "masks")}
        points = case["points"]
        if points is not None:
            points = tuple(t.to(CUDA) for t in points)
        with torch.no_grad():
            masks, iou = head(emb, points=points, **prompts,
                              multimask_output=case["multimask_output"])
        torch.testing.assert_close(masks.cpu(), ref["low_res_masks"], atol=1e-4, rtol=1e-4,
                                   msg=case["name"])
        torch.testing.assert_close(iou.cpu(), ref["iou_predictions"], atol=1e-4, rtol=1e-4,
                                   msg=case["name"])


def test_clip_towers_match_official_on_cuda(clip_fixture, true_fp32):
    model = clip.load_clip(clip_fixture["state_dict"]).to(CUDA)
    with torch.no_grad():
        image = model.encode_image(clip_fixture["inputs"]["image"].to(CUDA))
        text = model.encode_text(clip_fixture["inputs"]["tokens"].to(CUDA))
    torch.testing.assert_close(image.cpu(), clip_fixture["outputs"]["image_features"],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text.cpu(), clip_fixture["outputs"]["text_features"],
                               atol=1e-4, rtol=1e-4)


def test_bf16_autocast_stays_close_to_fp32_on_cuda(sam_fixture, true_fp32):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per operation); over the
    fixture's encoder and head the outputs stay within a few percent of fp32, the same budget the
    CPU bf16 path is held to. A wrong cast (fp16 overflow, a norm run in bf16) is far outside."""
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"], verbose=False).to(CUDA)
    head = heads.load_sam_head(sam_fixture["state_dict"], verbose=False).to(CUDA)
    x = sam_fixture["inputs"]["image"].to(CUDA)
    box = torch.tensor([[[8.0, 12.0, 40.0, 50.0]]], device=CUDA)  # (B=1, 1 box, 4) input px
    linear = next(m for m in enc.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    outs = {}
    for dtype in ("fp32", "bf16"):
        with torch.no_grad(), samclip_model.autocast(CUDA, dtype):
            emb = enc(x)
            masks, iou = head(emb, boxes=box.expand(len(x), -1, -1), multimask_output=False)
        outs[dtype] = emb, masks, iou
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16  # autocast really ran bf16
    for name, a, b in zip(("embeddings", "masks", "iou"), outs["bf16"], outs["fp32"]):
        assert relative_error(a, b) < 0.05, name


def test_demo_on_cuda_paints_what_the_cpu_paints(tmp_path, capsys, true_fp32):
    """The same random tiny model on the example scene, fp32 on both devices: the masks agree on
    all but a few pixels (near-ties of the class logits may flip between kernels)."""
    ckpt = str(tmp_path / "samclip.pt")
    samclip_model.build_samclip("tiny").save(ckpt)
    path = str(tmp_path / "scene.jpg")
    segment_demo.draw_example_scene().save(path, quality=90)
    names = ("house", "tree", "sky")
    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        rc = segment_demo.main([path, *names, "--checkpoint", ckpt, "--out", str(out),
                                "--device", device, "--dtype", "fp32"])
        assert rc == 0
        masks[device] = np.stack([np.asarray(Image.open(out / f"mask_{i + 1}_{n}.png")) > 0
                                  for i, n in enumerate(names)])
    assert "on cuda" in capsys.readouterr().out
    assert (masks["cpu"] == masks["cuda"]).mean() > 0.99


def test_torchrun_on_nccl_trains_as_one_process(tmp_path):
    """train.py under torchrun on this GPU: the process group is NCCL (train.setup_distributed
    picks it on CUDA), DDP wraps the student, the logged losses are all-reduced over NCCL. With one
    rank the numbers must equal a plain `python train.py` run on the same GPU (bf16 autocast on
    both, so up to kernel-order noise)."""
    from toy import layouts

    clip_dir = layouts.write_clip_images(str(tmp_path / "clip"), 24)
    sam_dir = layouts.write_sa1b(str(tmp_path / "sa1b"), 6)
    common = ["--preset", "tiny", "--stage", "distill", "--clip-data",
              os.path.join(clip_dir, "images"), "--sam-data", sam_dir, "--max-steps", "3",
              "--workers", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runs = {}
    for name, launcher in (
        ("plain", [sys.executable]),
        ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                      "--master_port", "29541"]),
    ):
        out = str(tmp_path / name)
        r = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *common, "--out", out],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
    assert len(runs["plain"]) == len(runs["torchrun"]) == 3
    for x, y in zip(runs["plain"], runs["torchrun"]):
        for k in ("loss", "loss_clip", "loss_sam"):
            assert x[k] == pytest.approx(y[k], rel=2e-2, abs=1e-3), (x["step"], k)
    assert os.path.exists(tmp_path / "torchrun" / "samclip.pt")
