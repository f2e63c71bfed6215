# python -m pytest tests/test_vit_det.py -q
"""SAM's ViT-Det encoder against the official implementation's outputs, presets, odd resolutions."""
import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("preset", ["vit_b", "vit_l", "vit_h"])
def test_full_size_layout_and_preset(preset):
    sd = weights.remap(meta_state_dict(f"sam_{preset}_keys.tsv"), vit_det.SAM_ENCODER_REMAP,
                       keep_prefixes=[vit_det.SAM_ENCODER_PREFIX])
    cfg = vit_det.config_from_state_dict(sd)
    assert weights.match_preset(cfg, vit_det.PRESETS) == preset
    with torch.device("meta"):
        enc = vit_det.build_vit_det(preset)
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}


def _sincos(dim, pos):
    """MAE's 2-D sin-cos position table at (continuous) grid coordinates pos (g,) -> (g, g, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    gh, gw = torch.meshgrid(pos, pos, indexing="ij")
    parts = [f(g.reshape(-1, 1) * omega) for g in (gh, gw) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1).float().reshape(len(pos), len(pos), dim)


def test_abs_pos_resize_rule_keeps_smooth_tables_and_does_not_alias():
    """The rule chosen in abs_pos (antialiased bicubic), on the cases its docstring names."""
    enc = vit_det.build_vit_det("tiny")
    C = enc.cfg.embed_dim
    # SAM's table began as MAE's 14 x 14 sin-cos table upsampled to 64 x 64: resized back to the
    # 14 x 14 and 28 x 28 grids of 224 / 448 px it must stay close to the exact sin-cos table there.
    base = _sincos(C, torch.arange(14.0, dtype=torch.float64))                  # (14, 14, C)
    base = base.permute(2, 0, 1)[None]                                          # (1, C, 14, 14)
    up = F.interpolate(base, size=(64, 64), mode="bicubic", align_corners=False)
    enc.pos_embed = torch.nn.Parameter(up.permute(0, 2, 3, 1))                  # (1, 64, 64, C)
    for g in (14, 28):
        exact = _sincos(C, (torch.arange(g, dtype=torch.float64) + 0.5) * 14 / g - 0.5)
        got = enc.abs_pos(g, g)[0]
        assert (got - exact).norm() / exact.norm() < 0.02, g
    # Detail above the small grid's Nyquist rate (a one-cell checkerboard) is averaged out, not
    # point-sampled into a false pattern (plain bicubic keeps most of it: aliasing).
    cells = torch.arange(64)[:, None] + torch.arange(64)[None, :]               # (64, 64)
    checker = (cells % 2 * 2.0 - 1).expand(C, 64, 64)                           # (C, 64, 64)
    table = checker.permute(1, 2, 0)[None].contiguous()                         # (1, 64, 64, C)
    enc.pos_embed = torch.nn.Parameter(table)
    plain = F.interpolate(checker[None], size=(28, 28), mode="bicubic", align_corners=False)
    assert plain.abs().mean() > 0.3                             # what plain bicubic does
    assert enc.abs_pos(28, 28).abs().mean() < 0.05


def _attention_with_tables(seed=0):
    torch.manual_seed(seed)
    attn = vit_det.Attention(dim=16, num_heads=2, rel_pos_size=5)
    torch.nn.init.normal_(attn.rel_pos_h)                            # zero at init: no bias to test
    torch.nn.init.normal_(attn.rel_pos_w)
    return attn


def test_attention_formula_equals_a_bias_written_out():
    """Attention's formula (chunked off) against the bias written out entry by entry, independently:
    softmax(q.k / sqrt(hd) + q.Rh[i, k] + q.Rw[j, l]) v, as SAM's Attention computes it."""
    attn = _attention_with_tables()
    attn.chunked = False
    x = torch.randn(2, 5, 4, 16)                                     # (B, H, W, C): N = 20 tokens
    B, H, W, C = x.shape
    with torch.no_grad():
        ours = attn(x)
        qkv = attn.qkv(x).reshape(B, H * W, 3, 2, C // 2)            # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                         # 3 x (B, nh, N, hd)
        Rh = vit_det.get_rel_pos(H, H, attn.rel_pos_h)
        Rw = vit_det.get_rel_pos(W, W, attn.rel_pos_w)
        bias = torch.zeros(B, 2, H * W, H * W)
        for i in range(H):
            for j in range(W):
                for kk in range(H):
                    for ll in range(W):
                        r = Rh[i, kk] + Rw[j, ll]
                        bias[:, :, i * W + j, kk * W + ll] = (q[:, :, i * W + j] * r).sum(-1)
        weights = (q @ k.transpose(-1, -2) / (C // 2) ** 0.5 + bias).softmax(-1)
        reference = attn.proj((weights @ v).transpose(1, 2).reshape(B, H, W, C))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_chunked_attention_equals_the_formula(monkeypatch):
    """chunked_rel_pos_attention, in runs of 7 queries (runs that cross grid rows and a ragged last
    run), gives the formula's output and gradients; without gradients too, where the runs share
    one bias buffer."""
    monkeypatch.setattr(vit_det, "QUERY_CHUNK", 7)
    attn = _attention_with_tables()
    x = torch.randn(2, 5, 4, 16)
    results = []
    for chunked in (False, True):
        attn.chunked = chunked
        attn.zero_grad()
        x_in = x.clone().requires_grad_(True)
        out = attn(x_in)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
        with torch.no_grad():
            results.append((out.detach(), x_in.grad, grads, attn(x)))
    (out0, dx0, grads0, nograd0), (out1, dx1, grads1, nograd1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nograd1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nograd0, out0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    assert grads0.keys() == grads1.keys() == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                              "rel_pos_h", "rel_pos_w"}
    for name, grad in grads0.items():
        assert grad.abs().max() > 1e-3, name                         # every part gets a gradient
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_changes_no_number():
    """grad_checkpointing recomputes each block in the backward: the same output and the same
    gradients as storing the activations; under no_grad (the frozen teacher) it is not used."""
    torch.manual_seed(0)
    enc = vit_det.build_vit_det("tiny")
    x = torch.randn(2, 3, 160, 160)
    grads = []
    for checkpointing in (False, True):
        enc.zero_grad()
        enc.grad_checkpointing = checkpointing
        out = enc(x)
        (out ** 2).mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-6, atol=1e-7, msg=name)
