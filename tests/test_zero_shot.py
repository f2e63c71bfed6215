# python -m pytest tests/test_zero_shot.py -q
"""Zero-shot segmentation by text (zero_shot.py; SAM-CLIP Sec. 4.2, 4.4, App. C):
the 80 OpenAI templates, CLIP's template-averaged class embeddings against a hand-built average,
dense logits against an independent einsum, the point-prompt draw on hand-made probability maps
(importance sampling on the confidence, Sec. 4.4), and the Table 5 pipeline's wiring (points from
above-threshold cells, log-odds mask prompt)."""

import math
import types

import numpy as np

import pytest
import torch
from PIL import Image

import clip
import data
import model as samclip_model
import zero_shot


@pytest.fixture(scope="module")
def tiny():
    return samclip_model.build_samclip("tiny", seed=0).eval()


def test_templates_are_the_80_openai_imagenet_ones():
    t = zero_shot.OPENAI_IMAGENET_TEMPLATES
    assert isinstance(t, tuple) and len(t) == 80 and len(set(t)) == 80
    assert all(s.count("{}") == 1 for s in t)
    assert t[0] == "a bad photo of a {}." and t[1] == "a photo of many {}."
    assert t[-1] == "a tattoo of the {}."
    assert "itap of my {}." in t and "a {} in a video game." in t


def test_class_embeddings_equal_a_hand_built_template_average(tiny):
    templates = ("a photo of a {}.", "a drawing of the {}.")
    got = zero_shot.class_embeddings(tiny, ["cat", "traffic light"], templates)  # (2, D)
    assert got.shape == (2, tiny.cfg.clip.embed_dim)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)
    with torch.no_grad():  # by hand: full 77-token rows, one prompt at a time
        want = []
        for name in ["cat", "traffic light"]:
            e = [tiny.encode_text(clip.tokenize(t.format(name)))[0] for t in templates]  # T x (D,)
            e = torch.stack([v / v.norm() for v in e]).mean(0)
            want.append(e / e.norm())
    assert torch.allclose(got, torch.stack(want), atol=1e-5)


def test_class_embeddings_batches_do_not_change_the_result(tiny):
    names = ["cat", "dog", "a red car"]
    templates = zero_shot.OPENAI_IMAGENET_TEMPLATES[:7]
    a = zero_shot.class_embeddings(tiny, names, templates, batch_size=256)
    b = zero_shot.class_embeddings(tiny, names, templates, batch_size=5)
    assert torch.allclose(a, b, atol=1e-6)


def test_cached_embeddings_embed_each_name_once_and_match(tiny, monkeypatch):
    templates = zero_shot.OPENAI_IMAGENET_TEMPLATES[:3]
    embed = zero_shot.CachedEmbeddings(templates)
    texts = []  # every text the text tower is asked to embed
    encode_text = tiny.encode_text
    monkeypatch.setattr(tiny, "encode_text", lambda t: texts.extend(t) or encode_text(t))
    first = embed(tiny, ["cat", "dog"])
    assert len(texts) == 2 * 3
    again = embed(tiny, ["dog", "car", "cat"])  # one new name: its 3 prompts alone
    assert len(texts) == 3 * 3
    want = zero_shot.class_embeddings(tiny, ["dog", "car", "cat"], templates)
    assert torch.allclose(again, want, atol=1e-6)
    assert torch.equal(again[2], first[0]) and torch.equal(again[0], first[1])
    other = samclip_model.build_samclip("tiny", seed=1).eval()  # another model: re-embedded
    want = zero_shot.class_embeddings(other, ["cat"], templates)
    assert torch.allclose(embed(other, ["cat"]), want, atol=1e-6)


EMPTY_NAMES = [
    (["cat", ""], "class name 1 is empty"),
    (["cat", "dog", "   "], "class name 2 is empty"),
    ([], "no class names given"),
]


@pytest.mark.parametrize("names, message", EMPTY_NAMES)
def test_class_embeddings_rejects_empty_names(tiny, names, message):
    with pytest.raises(ValueError, match=message):
        zero_shot.class_embeddings(tiny, names)


def test_class_embeddings_rejects_names_longer_than_the_context(tiny):
    tok = clip.get_tokenizer()
    long_name = " ".join(["zebra"] * 80)
    n = len(tok.encode("a bad photo of a " + long_name + ".")) + 2  # counted before truncation
    with pytest.raises(ValueError) as e:
        zero_shot.class_embeddings(tiny, ["cat", long_name])
    msg = str(e.value)
    assert "class name 1" in msg and "'a bad photo of a zebra" in msg
    assert f"{n} tokens" in msg and "77" in msg
    assert "\n" not in msg
    # the longest name that fits every template is accepted, one word more is not
    templates = zero_shot.OPENAI_IMAGENET_TEMPLATES
    longest_template = max(len(tok.encode(t.format("zebra"))) for t in templates)
    words = 77 - 2 - (longest_template - 1)
    zero_shot.check_class_names([" ".join(["zebra"] * words)])
    with pytest.raises(ValueError, match="too long"):
        zero_shot.check_class_names([" ".join(["zebra"] * (words + 1))])


def test_dense_logits_match_an_independent_einsum(tiny):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    class_emb = torch.randn(3, tiny.cfg.clip.embed_dim)  # deliberately not normalised
    with torch.no_grad():
        got = zero_shot.dense_logits(tiny, x, class_emb)  # (2, 3, 4, 4)
        dense = tiny.clip_features(x)[1]  # (2, 4, 4, D)
    dense = dense / dense.norm(dim=-1, keepdim=True)
    cls = class_emb / class_emb.norm(dim=-1, keepdim=True)
    want = torch.einsum("bijd,kd->bkij", dense, cls) * tiny.logit_scale.exp()
    assert got.shape == (2, 3, 4, 4)
    assert torch.allclose(got, want, atol=1e-4)


def test_clip_mode_side_is_448_at_full_size_and_scaled_for_tiny(tiny):
    full = types.SimpleNamespace(cfg=samclip_model.PRESETS["vit_b"]())
    assert zero_shot.clip_mode_side(full) == 448  # Sec. 4.2: 28 x 28 patches
    assert zero_shot.clip_mode_side(tiny) == 80  # 448 * 160 / 1024 = 70 -> 80


# ----------------------------------------------------------------------------- point prompts


def cell_of(xy, p):
    """Pixel (x, y) -> grid cell (r, c) of patch size p."""
    return int(xy[1] // p), int(xy[0] // p)


def test_draw_points_picks_only_above_threshold_cells():
    prob = torch.zeros(10, 10)
    hot = {(2, 3), (7, 1), (5, 5), (0, 9)}
    for r, c in hot:
        prob[r, c] = 0.9
    prob[4, 4] = 0.5  # not above 0.5: never drawn
    counts = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        coords, labels = zero_shot.draw_points(prob, 0.5, 3, g, 16)
        assert coords.shape == (3, 2) and labels.shape == (3,)
        n = int((labels == 1).sum())
        assert 1 <= n <= 3 and (labels[n:] == -1).all()  # drawn points first, then padding
        cells = [cell_of(xy, 16) for xy in coords[:n].tolist()]
        assert set(cells) <= hot and len(set(cells)) == n  # without replacement
        for (x, y), (r, c) in zip(coords[:n].tolist(), cells):  # exactly the cell centre
            assert (x, y) == ((c + 0.5) * 16, (r + 0.5) * 16)
        counts.add(n)
    assert counts == {1, 2, 3}  # "1 to 3 points" (App. C)


def test_draw_points_falls_back_to_the_argmax_cell_and_is_seeded():
    prob = torch.full((6, 8), 0.1)
    prob[4, 2] = 0.3  # nothing above 0.5
    coords, labels = zero_shot.draw_points(prob, 0.5, 3, torch.Generator().manual_seed(0), 16)
    assert labels.tolist() == [1, -1, -1]
    assert coords[0].tolist() == [2.5 * 16, 4.5 * 16]  # (x, y) of cell (4, 2)
    prob = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    a = zero_shot.draw_points(prob, 0.3, 3, torch.Generator().manual_seed(7), 16)
    b = zero_shot.draw_points(prob, 0.3, 3, torch.Generator().manual_seed(7), 16)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_draw_points_importance_samples_by_confidence():
    """Sec. 4.4: points are drawn by importance sampling on the confidence. On a hand-made map,
    one cell holds most of the above-threshold mass; the first point of each draw (drawn with
    probability p_i / sum p over the cells above the threshold) lands on each cell as often as
    its normalised confidence says, within 5 standard deviations of a binomial count."""
    prob = torch.zeros(4, 5)
    # dyadic values, exact in float32, so "at the threshold" is exactly at it
    weights = {(1, 1): 0.875, (0, 4): 0.25, (3, 2): 0.125, (2, 0): 0.09375}  # above threshold
    for (r, c), p in weights.items():
        prob[r, c] = p
    threshold = 0.0625
    prob[3, 4] = 0.03125  # under the threshold: never drawn
    prob[0, 0] = threshold  # exactly at it: never drawn either
    total = sum(weights.values())
    first = {cell: 0 for cell in weights}
    draws = 3000
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        coords, labels = zero_shot.draw_points(prob, threshold, 3, g, 16)
        n = int((labels == 1).sum())
        cells = [cell_of(xy, 16) for xy in coords[:n].tolist()]
        assert set(cells) <= set(weights) and len(set(cells)) == n  # distinct, above threshold
        first[cells[0]] += 1
    for cell, p in weights.items():
        want = p / total  # 0.65, 0.19, 0.09, 0.07
        sd = (want * (1 - want) / draws) ** 0.5
        assert abs(first[cell] / draws - want) < 5 * sd, (cell, first[cell] / draws, want)


# ----------------------------------------------------------------------------- both heads (Table 5)


def test_refine_with_sam_wires_points_and_mask_prompt_from_the_coarse_map(tiny, monkeypatch):
    """Control HeadCLIP's coarse logits, record what reaches HeadSAM."""
    K = 3
    h = tiny.cfg.encoder.grid  # 10 x 10 grid at 160 px
    coarse = torch.zeros(K, h, h)
    coarse[0, :3, :3] = 20.0  # class 0 owns the top-left corner
    coarse[1, 6:, 6:] = 20.0  # class 1 the bottom-right
    coarse[2, 5, 0] = 0.5  # class 2: at best p = 0.45, at (5, 0)
    monkeypatch.setattr(zero_shot, "_cosine_logits", lambda model, dense, emb: coarse[None])
    seen = {}
    real_head = tiny.head_sam.forward

    def spy(emb, points=None, boxes=None, masks=None, multimask_output=True):
        seen.update(emb=emb, points=points, masks=masks, multimask_output=multimask_output)
        return real_head(
            emb, points=points, boxes=boxes, masks=masks, multimask_output=multimask_output
        )

    monkeypatch.setattr(tiny.head_sam, "forward", spy)
    x = torch.randn(1, 3, 160, 160)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        masks, got_coarse = zero_shot.refine_with_sam(
            tiny, x, torch.randn(K, 32), input_size=(160, 160), generator=g
        )
    assert masks.shape == (K, 4 * h, 4 * h) and got_coarse.shape == (K, h, h)
    assert torch.equal(got_coarse, coarse)
    assert seen["emb"].shape[0] == 1  # one shared embedding
    assert seen["multimask_output"] is False
    coords, labels = seen["points"]  # (K, 3, 2), (K, 3)
    prob = coarse.softmax(0)
    for k in range(K):
        above = {tuple(rc) for rc in (prob[k] > 0.5).nonzero().tolist()}
        points = zip(coords[k].tolist(), labels[k].tolist())
        drawn = [cell_of(xy, 16) for xy, label in points if label == 1]
        assert drawn and (set(drawn) <= above if above else len(drawn) == 1)
    assert not (prob[2] > 0.5).any()  # class 2: the argmax fallback
    assert cell_of(coords[2, 0].tolist(), 16) == (5, 0) and labels[2].tolist() == [1, -1, -1]
    # mask prompt: log-odds of the class probability, upsampled to 4h x 4w; > 0 exactly where
    # p > 0.5
    mp = seen["masks"]
    assert mp.shape == (K, 1, 4 * h, 4 * h)
    centre = mp[:, 0, 1::4, 1::4] + mp[:, 0, 2::4, 2::4]  # 2 px around each cell centre
    assert torch.equal(centre > 0, prob > 0.5)
    assert mp.abs().max() <= torch.logit(torch.tensor(1 - zero_shot.MASK_PROMPT_EPS)) + 1e-3


def test_cosine_logits_stay_float32_under_bf16_autocast(tiny):
    """bf16 autocast (segment_demo.py's auto dtype on AMX / AVX-512 BF16 CPUs) would run the
    einsum in bf16; the logits must be the float32 ones."""
    dense = torch.randn(1, 3, 4, tiny.cfg.clip.embed_dim)
    emb = torch.randn(5, tiny.cfg.clip.embed_dim)
    want = zero_shot._cosine_logits(tiny, dense, emb)
    with torch.no_grad(), samclip_model.autocast("cpu", "bf16"):
        got = zero_shot._cosine_logits(tiny, dense, emb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_refine_with_sam_mask_prompt_stays_finite_under_bf16(tiny, monkeypatch):
    """Under bf16 autocast, with a temperature so high that every cell's winner has p = 1 in
    bf16, the mask prompt must still be the clipped log-odds +-9.2, not inf, and the masks
    finite."""
    monkeypatch.setattr(tiny, "logit_scale", torch.tensor(math.log(1e5)))  # a buffer
    seen = {}
    real_head = tiny.head_sam.forward

    def spy(emb, points=None, boxes=None, masks=None, multimask_output=True):
        seen["masks"] = masks
        return real_head(
            emb, points=points, boxes=boxes, masks=masks, multimask_output=multimask_output
        )

    monkeypatch.setattr(tiny.head_sam, "forward", spy)
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, tiny.cfg.clip.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), samclip_model.autocast("cpu", "bf16"):
        masks, _ = zero_shot.refine_with_sam(
            tiny, x, emb, input_size=(160, 160), generator=torch.Generator()
        )
    floor = math.log(zero_shot.MASK_PROMPT_EPS / (1 - zero_shot.MASK_PROMPT_EPS))  # -9.2
    mp = seen["masks"].float()
    assert torch.isfinite(mp).all() and torch.isfinite(masks).all()
    assert mp.abs().max() <= abs(floor) + 0.1  # bf16 keeps 9.2 to within 0.04
    assert mp.max() > 9 and mp.min() < -9  # saturated cells of both signs, clipped


def test_refine_with_sam_prompts_only_from_the_image_not_the_padding(tiny, monkeypatch):
    """A 160 x 72 image in the 160 x 160 frame (input_size (72, 160)): rows 72.. are SAM's zero
    padding. Class 0's coarse map is hottest in the padding and only lukewarm in the image."""
    K = 2
    h = tiny.cfg.encoder.grid  # 10 x 10 cells of 16 px
    coarse = torch.zeros(K, h, h)
    coarse[0, 5:, :] = 20.0  # cells 5.. start at row 80 > 72: padding
    coarse[0, 4, :] = 20.0  # row 4: centre at y = 72, not inside either
    coarse[0, 2, 7] = 1.0  # the image's best cell for class 0
    monkeypatch.setattr(zero_shot, "_cosine_logits", lambda model, dense, emb: coarse[None])
    seen = {}
    real_head = tiny.head_sam.forward

    def spy(emb, points=None, boxes=None, masks=None, multimask_output=True):
        seen.update(points=points, masks=masks)
        return real_head(
            emb, points=points, boxes=boxes, masks=masks, multimask_output=multimask_output
        )

    monkeypatch.setattr(tiny.head_sam, "forward", spy)
    for seed in range(10):
        x = torch.randn(1, 3, 160, 160)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            zero_shot.refine_with_sam(
                tiny, x, torch.randn(K, 32), input_size=(72, 160), generator=g
            )
        coords, labels = seen["points"]
        ys = coords[labels == 1][:, 1]
        assert (ys < 72).all(), ys  # every point inside the image
        assert cell_of(coords[0, 0].tolist(), 16) == (2, 7) and labels[0].tolist() == [1, -1, -1]
    mp = seen["masks"][:, 0]  # (K, 40, 40): 72 px -> 18 low-res rows
    floor = torch.logit(torch.tensor(zero_shot.MASK_PROMPT_EPS))
    # the padding says "not this class"; the image rows keep the coarse map
    assert torch.allclose(mp[:, 18:], floor.expand_as(mp[:, 18:]))
    assert (mp[0, 8:10] > 0).any()


def test_refine_with_sam_subset_of_classes_and_input_checks(tiny):
    emb = torch.randn(4, 32)
    x = torch.randn(1, 3, 160, 160)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        masks, coarse = zero_shot.refine_with_sam(
            tiny, x, emb, classes=[2, 0], input_size=(160, 160), generator=g
        )
    assert masks.shape == (2, 40, 40) and coarse.shape == (4, 10, 10)
    with pytest.raises(ValueError, match=r"\(1, 3, 160, 160\)"):
        zero_shot.refine_with_sam(tiny, torch.randn(1, 3, 64, 64), emb, input_size=(64, 64))
    with pytest.raises(ValueError, match="input_size"):
        zero_shot.refine_with_sam(tiny, x, emb, input_size=(0, 160))


@pytest.mark.parametrize("mode", ["clip", "sam"])
def test_segment_by_text_returns_original_size_maps(tiny, mode):
    img = Image.new("RGB", (53, 37), (90, 140, 200))
    img.paste((200, 40, 40), (10, 5, 30, 25))
    g = torch.Generator().manual_seed(0)
    out = zero_shot.segment_by_text(tiny, img, ["red square", "sky"], mode=mode, generator=g)
    assert out["probs"].shape == (2, 37, 53) and out["labels"].shape == (37, 53)
    assert out["labels"].dtype == torch.long and out["confidence"].shape == (2,)
    assert out["probs"].min() >= 0 and out["probs"].max() <= 1
    assert set(out["labels"].unique().tolist()) <= {-1, 0, 1}
    best, arg = out["probs"].max(0)  # the background rule, checked back
    assert torch.equal(out["labels"], torch.where(best >= 0.5, arg, torch.full_like(arg, -1)))


def test_segment_by_text_one_prompt_competes_with_background(tiny):
    img = Image.new("RGB", (40, 30), (120, 120, 120))
    out = zero_shot.segment_by_text(tiny, img, ["cat"], mode="clip")
    p = out["probs"][0]
    assert p.max() < 1 - 1e-6  # not the trivial softmax over one class
    assert p.shape == (30, 40)
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        zero_shot.segment_by_text(tiny, img, ["cat", " "])
    with pytest.raises(ValueError, match="mode"):
        zero_shot.segment_by_text(tiny, img, ["cat"], mode="both")


def test_segment_by_text_lets_the_unprompted_vocabulary_compete(tiny, monkeypatch):
    """A closed-world model (model.cfg.vocabulary) adds its names that are not prompts (case
    aside) to "background" as competitors: clip-mode probabilities are the softmax over all of
    them, by hand."""
    import dataclasses

    closed = samclip_model.build_samclip("tiny", seed=0).eval()
    closed.cfg = dataclasses.replace(closed.cfg, vocabulary=("dog", "sky"))
    seen = []
    real = zero_shot.class_embeddings

    def recording_class_embeddings(model, names, *args, **kwargs):
        seen.append(names)
        return real(model, names)

    monkeypatch.setattr(zero_shot, "class_embeddings", recording_class_embeddings)
    img = Image.new("RGB", (40, 30), (120, 60, 30))
    out = zero_shot.segment_by_text(closed, img, ["cat", "SKY"], mode="clip")
    assert seen == [["cat", "SKY", "background", "dog"]]
    x = data.square_resize(img, zero_shot.clip_mode_side(closed))[None]
    with torch.no_grad():
        logits = zero_shot.dense_logits(closed, x, real(closed, seen[0]))  # (1, 4, h, w)
    logits = torch.nn.functional.interpolate(logits, (30, 40), mode="bilinear", align_corners=False)
    want = logits[0].softmax(0)
    torch.testing.assert_close(out["probs"], want[:2])


def test_paint_greys_the_scene_blends_each_label_and_outlines_its_region():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 1] = 200  # a green scene: grey level 0.587 * 200 = 117.4 (PIL's "L" weights)
    labels = np.full((4, 5), -1)
    labels[:, :2] = 0  # label 0: columns 0-1; its border with -1 is column 1
    labels[3, 4] = 255
    out = np.asarray(zero_shot.paint(Image.fromarray(rgb), labels, alpha=0.5)).astype(int)
    grey = 117
    assert out[0, 3].tolist() == [grey] * 3  # -1: the scene, without its green
    # column 0 is inside: (117 + tab10 blue (31, 119, 180)) / 2; column 1 touches -1: pure blue
    assert out[1, 0].tolist() == [round((grey + 31) / 2), round((grey + 119) / 2), 148]
    assert out[1, 1].tolist() == [31, 119, 180]
    assert out[3, 4].tolist() == [255, 255, 255]  # 255: white, a region of one pixel: its border
    assert np.asarray(zero_shot.colorize(np.array([[2]])))[0, 0].tolist() == [44, 160, 44]
    # no palette colour is a grey, which the painted scene could show
    tab = zero_shot.PALETTE[:10].astype(int)
    assert (tab.max(1) - tab.min(1)).min() > 60
