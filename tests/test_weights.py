# python -m pytest tests/test_weights.py -q
"""Secure and strict checkpoint loading: malicious pickles, truncated files, wrong kinds, missing
keys; the meta-device skeleton a merged checkpoint loads into."""
import os

import pytest
import torch

import heads
import vit_det
import weights


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, sam_fixture):
    marker = tmp_path / "pwned"
    bad = tmp_path / "sam_vit_b_evil.pth"
    sd = dict(sam_fixture["state_dict"])
    sd["image_encoder.payload"] = _RunsCode(str(marker))
    torch.save(sd, bad)
    for loader in (vit_det.load_sam_encoder, heads.load_sam_head, weights.read_state_dict):
        with pytest.raises(weights.CheckpointError, match="sam_vit_b_evil.pth"):
            loader(str(bad))
    assert not marker.exists()


def test_truncated_file(tmp_path, sam_fixture):
    good = tmp_path / "sam.pth"
    torch.save(sam_fixture["state_dict"], good)
    data = good.read_bytes()
    cut = tmp_path / "sam_cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="sam_cut.pth"):
        vit_det.load_sam_encoder(str(cut))
    assert vit_det.load_sam_encoder(str(good), verbose=False) is not None


def test_wrong_kind_and_missing_keys(clip_fixture, sam_fixture):
    wrong_kind = "expected a SAM checkpoint.*it is a CLIP checkpoint"
    with pytest.raises(weights.CheckpointError, match=wrong_kind):
        vit_det.load_sam_encoder(clip_fixture["state_dict"])
    with pytest.raises(weights.CheckpointError, match=wrong_kind):
        heads.load_sam_head(clip_fixture["state_dict"])
    sd = dict(sam_fixture["state_dict"])
    del sd["image_encoder.blocks.2.mlp.lin2.bias"]
    missing = r"1 missing keys, first \['blocks.2.mlp.lin2.bias'\]"
    with pytest.raises(weights.CheckpointError, match=missing):
        vit_det.load_sam_encoder(sd)
    sd = dict(sam_fixture["state_dict"])
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 33)
    with pytest.raises(weights.CheckpointError, match="shape mismatches.*iou_token"):
        heads.load_sam_head(sd)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(weights.CheckpointError, match="nowhere.pth: SAM checkpoint file not found"):
        vit_det.load_sam_encoder(str(tmp_path / "nowhere.pth"))


def _write_safetensors(path, tensors, dtype_name):
    """An independent writer of the format (header length, JSON header, raw bytes)."""
    import json
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype_name, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_safetensors_reader(tmp_path, sam_fixture):
    sd = sam_fixture["state_dict"]                          # float16
    path = tmp_path / "sam.safetensors"
    _write_safetensors(path, sd, "F16")
    back = weights.read_state_dict(str(path))
    assert set(back) == set(sd)
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], sd[k].float()) for k in sd)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        weights.read_state_dict(str(path))


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    weights.atomic_save({"step": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        weights.atomic_save({"step": 2, "x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]              # no temporary file left behind


def test_skeleton_builds_shapes_without_running_initialisers():
    """weights.skeleton(): the full-size merged model's tensors are all on the meta device, with
    the shapes of the randomly initialised model, and no initialiser ran. Checked in a fresh
    interpreter, where running one would have imported torch._dynamo or sympy (torch's Python meta
    kernels of normal_ and randn pull them in: seconds of the demo's start-up)."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, torch, model, weights\n"
            "with weights.skeleton():\n"
            "    m = model.SAMCLIP(model.make_config())\n"
            "assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])\n"
            "print(sum(p.numel() for p in m.parameters()), 'torch._dynamo' in sys.modules,\n"
            "      'sympy' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    params, dynamo, sympy = run.stdout.split()
    with torch.device("meta"):
        import model
        reference = model.SAMCLIP(model.make_config())
    n_reference = sum(p.numel() for p in reference.parameters())
    assert int(params) == n_reference > 200e6               # vit_b + HeadCLIP + ViT-L text
    assert dynamo == sympy == "False"
    with weights.skeleton():
        small = vit_det.build_vit_det("tiny")
    assert [(n, p.shape) for n, p in small.named_parameters()] == \
        [(n, p.shape) for n, p in vit_det.build_vit_det("tiny").named_parameters()]


def test_skeleton_skips_only_initialisers_of_meta_tensors():
    """Inside skeleton() a tensor made on purpose off the meta device is still initialised, and
    ops other than torch.nn.init's initialisers run on meta tensors as usual."""
    with weights.skeleton():
        torch.manual_seed(0)
        real = torch.nn.init.normal_(torch.empty(3, device="cpu"))
        meta = torch.nn.init.normal_(torch.empty(3))
        doubled = torch.ones(2) * 2
    torch.manual_seed(0)
    assert torch.equal(real, torch.randn(3))
    assert meta.is_meta and doubled.is_meta and doubled.shape == (2,)
