# python -m pytest tests/test_heads.py -q
"""HeadSAM against the official prompt encoder + mask decoder; HeadCLIP's structure (App. A)."""
import pytest
import torch

import heads
import vit_det
import weights
from conftest import meta_state_dict


@pytest.fixture(scope="module")
def head(sam_fixture):
    return heads.load_sam_head(sam_fixture["state_dict"])


def test_every_official_head_case(head, sam_fixture):
    emb = sam_fixture["inputs"]["image_embeddings"]
    cases = zip(sam_fixture["inputs"]["head_cases"], sam_fixture["outputs"]["head_cases"])
    for case, ref in cases:
        with torch.no_grad():
            masks, iou = head(emb, points=case["points"], boxes=case["boxes"], masks=case["masks"],
                              multimask_output=case["multimask_output"])
        assert masks.shape == ref["low_res_masks"].shape, case["name"]
        assert torch.allclose(masks, ref["low_res_masks"], atol=1e-4, rtol=1e-4), case["name"]
        assert torch.allclose(iou, ref["iou_predictions"], atol=1e-4, rtol=1e-4), case["name"]


def test_inputs_untouched_and_shared_embedding(head, sam_fixture):
    case = next(c for c in sam_fixture["inputs"]["head_cases"] if c["name"].startswith("batch2"))
    emb = sam_fixture["inputs"]["image_embeddings"]
    coords, labels = case["points"]
    before = [t.clone() for t in (emb, coords, labels, case["boxes"])]
    with torch.no_grad():
        shared, _ = head(emb, points=(coords, labels), boxes=case["boxes"])
        per_set, _ = head(emb.expand(2, -1, -1, -1), points=(coords, labels), boxes=case["boxes"])
    assert all(torch.equal(a, b) for a, b in zip(before, (emb, coords, labels, case["boxes"])))
    assert torch.allclose(shared, per_set, atol=1e-6)
    with pytest.raises(ValueError, match="image embeddings"):
        head(emb.expand(3, -1, -1, -1), points=(coords, labels), boxes=case["boxes"])


def test_checkpointed_decoder_same_numbers_fewer_saved_activations(monkeypatch):
    """grad_checkpointing decodes the prompt sets in pieces of DECODE_CHUNK and recomputes them in
    the backward: outputs and gradients (of the decoder's weights and of the image embedding the
    encoder gets) equal the plain decode, while the bytes autograd keeps for the backward drop."""
    monkeypatch.setattr(heads, "DECODE_CHUNK", 3)             # 7 prompt sets: pieces of 3, 3, 1
    torch.manual_seed(0)
    head = heads.build_head_sam("tiny")
    for p in head.parameters():                     # SAM's zero-init convs would hide gradients
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    s = head.cfg.image_embedding_size
    emb = torch.randn(1, head.cfg.embed_dim, s, s, generator=g)
    S = head.cfg.input_image_size
    coords = torch.rand(7, 2, 2, generator=g) * S
    labels = torch.randint(0, 2, (7, 2), generator=g)
    saved = []

    def count_saved_bytes(t):                       # autograd's pack hook: what the backward keeps
        saved.append(t.numel() * t.element_size())
        return t
    results = []
    for checkpointing in (False, True):
        head.zero_grad()
        head.mask_decoder.grad_checkpointing = checkpointing
        e = emb.clone().requires_grad_(True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(count_saved_bytes, lambda t: t):
            masks, iou = head.all_outputs(e, points=(coords, labels))
        ((masks ** 2).mean() + iou.sum()).backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        results.append((masks.detach(), iou.detach(), e.grad, sum(saved), grads))
    (m0, i0, e0, saved0, g0), (m1, i1, e1, saved1, g1) = results
    torch.testing.assert_close(m1, m0, rtol=0, atol=1e-6)
    torch.testing.assert_close(i1, i0, rtol=0, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert saved1 < saved0 / 4, (saved1, saved0)


def test_full_size_head_layout():
    sd = meta_state_dict("sam_vit_b_keys.tsv")
    cfg = heads.head_config_from_state_dict(sd)
    assert cfg == heads.SAM_HEAD_PRESETS["sam"]
    with torch.device("meta"):
        head = heads.build_head_sam("sam")
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    official = weights.remap(sd, heads.SAM_HEAD_REMAP, keep_prefixes=heads.SAM_HEAD_PREFIXES)
    assert ours == {k: tuple(v.shape) for k, v in official.items()}


def head_clip_reference(head, block, tokens):
    """HeadCLIP written out independently, in plain tensor ops on its parameter tensors: `block`
    (the encoder block every head block copies, App. A) once per head block, the maximum over the
    patches, the layer-norm formula, and the MLP as matmuls with erf GELU.
    tokens (B, H, W, C) -> pooled (B, D), dense (B, H, W, D)."""
    x = tokens
    for _ in range(head.cfg.depth):
        x = block(x)
    pooled = x.reshape(x.shape[0], -1, x.shape[-1]).max(dim=1).values   # (B, H*W, C) -> (B, C)
    return _norm_mlp_reference(head, pooled), _norm_mlp_reference(head, x)


def _norm_mlp_reference(head, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + head.norm.eps) * head.norm.weight + head.norm.bias
    x = _erf_gelu(x @ head.mlp[0].weight.T + head.mlp[0].bias)
    x = _erf_gelu(x @ head.mlp[2].weight.T + head.mlp[2].bias)
    return x @ head.mlp[4].weight.T + head.mlp[4].bias


def _erf_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


def test_head_clip_pooling_and_dense_features(sam_fixture):
    torch.manual_seed(0)
    enc = vit_det.load_sam_encoder(sam_fixture["state_dict"], verbose=False)
    cfg = heads.HeadCLIPConfig(width=64, num_heads=4, rel_pos_size=10, mlp_hidden=48, out_dim=24)
    hc = heads.HeadCLIP(cfg).eval()
    hc.init_from_block(enc.blocks[-1])
    assert all(torch.equal(a, b) for a, b in zip(hc.blocks[2].state_dict().values(),
                                                 enc.blocks[-1].state_dict().values()))
    for p in [*hc.norm.parameters(), *hc.mlp.parameters()]:  # not ones and zeros: all are used
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randn(2, 7, 7, 64)                       # a 112 px image's grid
    with torch.no_grad():
        pooled, dense = hc(tokens)
        ref_pooled, ref_dense = head_clip_reference(hc, enc.blocks[-1], tokens)
    assert pooled.shape == (2, 24) and dense.shape == (2, 7, 7, 24)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-5, atol=1e-5)


def test_head_clip_adds_about_a_quarter_of_vit_b():
    with torch.device("meta"):
        enc = vit_det.build_vit_det("vit_b")
        hc = heads.HeadCLIP(heads.HeadCLIPConfig())
    ratio = sum(p.numel() for p in hc.parameters()) / sum(p.numel() for p in enc.parameters())
    assert 0.2 < ratio < 0.3, ratio                         # "about 25%" (App. A)


def test_head_clip_owns_its_initialisation():
    """A HeadCLIP built directly starts as the one training builds: ViT-style MLP (normal, std 0.02,
    zero biases), so forks that build it themselves get the same head."""
    torch.manual_seed(0)
    cfg = heads.HeadCLIPConfig(width=64, num_heads=4, rel_pos_size=10, mlp_hidden=256, out_dim=32)
    head = heads.HeadCLIP(cfg)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert abs(lin.weight.std().item() - 0.02) < 0.003   # nn.Linear's default: ~0.07 here
