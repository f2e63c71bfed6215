# python -m pytest tests/test_vit_det.py -q
"""SAM's ViT-Det encoder against the official implementation's outputs, presets, odd resolutions."""
import pytest
import torch

import vit_det
import weights
from conftest import meta_state_dict


def test_encoder_matches_official(sam_fixture):
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"])
    with torch.no_grad():
        out = enc(sam_fixture["inputs"]["image"])
    ref = sam_fixture["outputs"]["image_embeddings"]
    assert out.shape == ref.shape == (2, 32, 10, 10)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_one_forward_serves_both_heads(sam_fixture):
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"], verbose=False)
    x = sam_fixture["inputs"]["image"]
    with torch.no_grad():
        neck, tokens = enc.forward_features(x)
        ref = enc(x)
    assert tokens.shape == (2, 10, 10, 64)                  # (B, H, W, C), before the neck
    assert torch.equal(neck, ref)
    assert torch.allclose(enc.neck(tokens.permute(0, 3, 1, 2)), ref)


@pytest.mark.parametrize("side", [64, 96, 224])
def test_other_resolutions(sam_fixture, side):
    """224 / 448 px for HeadCLIP: the absolute grid and global relative tables are resized."""
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"], verbose=False)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, side, side))
    g = side // 16
    assert out.shape == (1, 32, g, g) and torch.isfinite(out).all()
    assert enc.abs_pos(10, 10) is enc.pos_embed           # native size: the table itself


def test_rel_pos_resize_hand_case():
    # linear resize of a 3-entry table to 5 entries (align_corners=False): hand-computed
    table = torch.tensor([[0.0], [3.0], [6.0]])
    out = vit_det.resize_rel_pos(table, 5)
    assert torch.allclose(out.squeeze(1), torch.tensor([0.0, 1.2, 3.0, 4.8, 6.0]))
    # offsets i - j + (k-1) index the table: row i, column j
    R = vit_det.get_rel_pos(2, 2, torch.arange(3.0)[:, None])
    assert R.squeeze(-1).tolist() == [[1.0, 0.0], [2.0, 1.0]]


def test_window_partition_roundtrip():
    x = torch.randn(2, 10, 7, 5)
    w, padded = vit_det.window_partition(x, 4)
    assert w.shape == (2 * 3 * 2, 4, 4, 5) and padded == (12, 8)
    assert torch.equal(vit_det.window_unpartition(w, 4, padded, (10, 7)), x)


@pytest.mark.parametrize("preset,tsv", [("vit_b", "sam_vit_b_keys.tsv"), ("vit_l", "sam_vit_l_keys.tsv"),
                                        ("vit_h", "sam_vit_h_keys.tsv")])
def test_full_size_layout_and_preset(preset, tsv):
    sd = weights.remap(meta_state_dict(tsv), vit_det.SAM_ENCODER_REMAP, keep_prefixes=[vit_det.SAM_ENCODER_PREFIX])
    cfg = vit_det.config_from_state_dict(sd)
    assert vit_det.preset_name(cfg) == preset
    with torch.device("meta"):
        enc = vit_det.build_vit_det(preset)
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}
