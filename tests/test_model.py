# python -m pytest tests/test_model.py -q
"""The assembled SAMCLIP: built from the official-format teachers, one forward for both heads,
merged checkpoints that round-trip and refuse other kinds of file."""
import os
from unittest import mock

import pytest
import torch

import clip
import heads
import model as samclip_model
import vit_det
import weights
from conftest import FIXTURES
from test_heads import head_clip_reference

SAM = os.path.join(FIXTURES, "sam_tiny.pt")
CLIP = os.path.join(FIXTURES, "clip_tiny.pt")


@pytest.fixture(scope="module")
def merged():
    torch.manual_seed(0)
    return samclip_model.SAMCLIP.from_teachers(SAM, CLIP, verbose=False).eval()


def test_from_teachers_takes_each_part_from_its_teacher(merged, sam_fixture, clip_fixture):
    enc = vit_det.load_sam_encoder(SAM, verbose=False)
    head = heads.load_sam_head(SAM, verbose=False)
    teacher = clip.load_clip(CLIP)
    pairs = [(merged.encoder, enc), (merged.head_sam, head), (merged.text, teacher.text)]
    for ours, theirs in pairs:
        theirs = theirs.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    last = enc.blocks[-1].state_dict()
    for blk in merged.head_clip.blocks:                     # App. A: copies of SAM's last block
        assert all(torch.equal(blk.state_dict()[k], last[k]) for k in last)
    tokens = clip_fixture["inputs"]["tokens"]
    with torch.no_grad():
        want = clip_fixture["outputs"]["text_features"]
        assert torch.allclose(merged.encode_text(tokens), want, atol=1e-4, rtol=1e-4)
    # frozen parts are frozen; the backbone and both trainable heads are not
    assert not any(p.requires_grad for p in merged.text.parameters())
    assert not any(p.requires_grad for p in merged.head_sam.prompt_encoder.parameters())
    assert all(p.requires_grad for p in merged.encoder.parameters())
    assert all(p.requires_grad for p in merged.head_sam.mask_decoder.parameters())


def test_one_forward_serves_both_heads(merged, sam_fixture):
    """SAMCLIP.forward runs the encoder once for both heads (Sec. 4.4), and each output matches a
    reference that is not computed by the merged model: the official encoder's image embeddings
    (fixture), the teacher's HeadSAM (loaded from the SAM file) on those official embeddings, and
    HeadCLIP written out in plain ops (test_heads.head_clip_reference) on the teacher's tokens."""
    x = sam_fixture["inputs"]["image"]
    boxes = torch.tensor([[10.0, 20.0, 90.0, 120.0], [0.0, 0.0, 60.0, 60.0]])
    patch_embed = merged.encoder.patch_embed
    with mock.patch.object(patch_embed, "forward", wraps=patch_embed.forward) as encoder_start:
        with torch.no_grad():
            out = merged(x, boxes=boxes)
    assert encoder_start.call_count == 1
    official = sam_fixture["outputs"]["image_embeddings"]                  # (2, 32, 10, 10)
    teacher_encoder = vit_det.load_sam_encoder(SAM, verbose=False)
    teacher_head = heads.load_sam_head(SAM, verbose=False)
    with torch.no_grad():
        masks, iou = teacher_head(official, boxes=boxes, multimask_output=False)
        tokens = teacher_encoder.forward_tokens(x)                          # (2, 10, 10, 64)
        pooled, dense = head_clip_reference(merged.head_clip, teacher_encoder.blocks[-1], tokens)
    torch.testing.assert_close(out["image_embeddings"], official, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["masks"], masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["iou"], iou, atol=1e-4, rtol=1e-4)
    # the fresh HeadCLIP's outputs are small (std 0.02 MLP): a tolerance relative to their size
    torch.testing.assert_close(out["clip_pooled"], pooled, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(out["clip_dense"], dense, atol=1e-7, rtol=1e-4)
    assert out["clip_pooled"].shape == (2, 32) and out["clip_dense"].shape == (2, 10, 10, 32)
    with torch.no_grad():
        low = merged.clip_features(torch.randn(1, 3, 64, 64))  # the CLIP side at a lower resolution
    assert low[1].shape == (1, 4, 4, 32)


def test_save_load_roundtrip(merged, tmp_path):
    path = tmp_path / "samclip.pt"
    merged.save(path)
    back = samclip_model.SAMCLIP.load(str(path))
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        box = torch.tensor([[5.0, 5.0, 50.0, 70.0]])
        a = merged(x, boxes=box)
        b = back(x, boxes=box)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.cfg == merged.cfg


def test_load_refuses_other_files(tmp_path):
    expected = "sam_tiny.pt: expected a merged SAM-CLIP checkpoint.*SAM checkpoint"
    with pytest.raises(weights.CheckpointError, match=expected):
        samclip_model.SAMCLIP.load(SAM)
    not_found = "missing.pt: SAM-CLIP checkpoint file not found"
    with pytest.raises(weights.CheckpointError, match=not_found):
        samclip_model.SAMCLIP.load(str(tmp_path / "missing.pt"))


def test_full_size_preset_shapes():
    """The paper's configuration, built without memory: ViT-B backbone, ViT-L/14 text tower."""
    cfg = samclip_model.PRESETS["vit_b"]()
    with torch.device("meta"):
        m = samclip_model.SAMCLIP(cfg)
    assert cfg.head_clip.out_dim == 768 and cfg.head_clip.width == 768 and cfg.encoder.grid == 64
    n_encoder = sum(p.numel() for p in m.encoder.parameters())
    assert 85e6 < n_encoder < 95e6                          # SAM ViT-B image encoder, ~89.7M


def test_bf16_autocast_stays_within_tolerance_of_fp32():
    """model.autocast("cpu", "bf16") runs the encoder, both heads and the text tower in bfloat16 (8
    mantissa bits): every output keeps a cosine >= 0.99 to fp32 and comes back in a float dtype
    the rest of the pipeline reads; "fp32" changes nothing."""
    m = samclip_model.build_samclip("tiny", seed=0)
    x = torch.randn(1, 3, 160, 160)
    points = (torch.tensor([[[40.0, 60.0]]]), torch.ones(1, 1, dtype=torch.long))
    tokens = clip.tokenize(["a photo of a cat"], m.cfg.clip.context_length)
    with torch.no_grad():
        ref = {**m(x, points=points), "text": m.encode_text(tokens)}
        with samclip_model.autocast("cpu", "fp32"):
            same = m(x, points=points)
        with samclip_model.autocast("cpu", "bf16"):
            low = {**m(x, points=points), "text": m.encode_text(tokens)}
    assert torch.equal(same["masks"], ref["masks"])
    for key in ("clip_pooled", "clip_dense", "image_embeddings", "masks", "iou", "text"):
        assert low[key].dtype in (torch.bfloat16, torch.float32)
        cos = torch.nn.functional.cosine_similarity(low[key].float().flatten(), ref[key].flatten(),
                                                    dim=0)
        assert cos > 0.99, (key, cos.item())
    # it ran in bf16
    assert low["clip_dense"].dtype == low["masks"].dtype == low["text"].dtype == torch.bfloat16

