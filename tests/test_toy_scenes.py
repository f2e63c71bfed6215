# python -m pytest tests/test_toy_scenes.py -q
"""toy/drawing.py and toy/scenes.py: labels that agree with the drawn pixels, disjoint instance
masks, captions that name what is visible, determinism, and a heldout hand that really draws
differently."""

import colorsys
import re
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from toy import drawing, scenes
from toy.drawing import CAR, CLASSES, GRASS, HOUSE, SKY, SUN, THINGS, TREE, Instance

SIZE = (160, 120)  # small scenes keep every test well under a second or two


def colour_keys(rgb):
    """(..., 3) uint8 colours -> one int per colour, for exact matching."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


# ----------------------------------------------------------------------------- labels vs pixels


def colour_agreement(drawn, shift=0):
    """Drawn without blur, noise and JPEG, a pixel whose sub-samples all lie in one flat shape has
    exactly that shape's colour. -> (the smallest share of an instance's mask in colours painted for
    it, the share of all pixels in some instance's painted colours that lie in its own mask (things)
    or class (stuff, which is split into regions)). Masks and class map are moved `shift` px right
    first (shift=1 is the control that shows the measure can tell)."""
    worst = 1.0
    own_hits = 0
    all_hits = 0
    for scene in drawn:
        key = colour_keys(np.asarray(scene.image))
        class_map = np.roll(scene.class_map, shift, 1)
        for cls, mask, attrs in scene.instances:
            # the sky is a gradient; tiny ones are all edge
            if not attrs["parts"] or attrs["area"] < 300:
                continue
            mask = np.roll(mask, shift, 1)
            hit = np.isin(key, colour_keys(attrs["parts"]))
            worst = min(worst, hit[mask].mean())
            own = mask if cls in THINGS else class_map == cls
            own_hits = own_hits + (hit & own).sum()
            all_hits = all_hits + hit.sum()
    return worst, own_hits / all_hits


@pytest.mark.parametrize("style", drawing.STYLES)
def test_class_map_and_masks_match_the_pixels(style):
    # Most pixels of a mask carry its instance's colours (the rest are blended edges of its parts),
    # and the pixels in an instance's colours lie in its mask, up to rare coincidences of two
    # sampled colours. Masks off by a single pixel, or occlusion drawn in the wrong order, fail.
    drawn = [scenes.draw_scene(seed, style, size=SIZE, clean=True) for seed in range(10)]
    worst, own = colour_agreement(drawn)
    assert worst > 0.35 and own > 0.997, (worst, own)
    assert colour_agreement(drawn, shift=1)[1] < 0.995


@pytest.mark.parametrize("style", drawing.STYLES)
def test_instances_are_disjoint_and_agree_with_the_class_map(style):
    for seed in range(6):
        scene = scenes.draw_scene(seed, style)
        W, H = scene.image.size
        assert scene.class_map.shape == (H, W) and scene.class_map.dtype == np.uint8
        assert scene.class_map.max() < len(CLASSES) and scene.edge.shape == (H, W)
        cover = np.zeros((H, W), np.int64)
        for cls, mask, attrs in scene.instances:
            assert mask.shape == (H, W) and mask.dtype == bool
            assert attrs["area"] == mask.sum() >= drawing.MIN_AREA
            assert (scene.class_map[mask] == cls).all()
            if cls in drawing.STUFF:  # stuff comes as connected regions
                assert len(drawing.connected_regions(mask)) == 1
            cover += mask
        assert cover.max() == 1  # disjoint
        assert cover.mean() > 0.97  # only dropped slivers are left without an instance
        assert 0 < scene.edge.mean() < 0.15  # blended pixels: a thin band along class borders


def test_connected_regions_by_hand():
    m = np.array(
        [
            [1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1],
            [1, 1, 1, 0, 0],  # a U: its two arms meet only in this row
            [0, 0, 0, 1, 0],  # touches the U only diagonally: a region of its own
        ],
        dtype=bool,
    )
    regions = drawing.connected_regions(m)
    assert [int(r.sum()) for r in regions] == [7, 1, 1]
    assert regions[0][0, 0] and regions[0][0, 2] and not regions[0][3, 3]
    assert sum(r.astype(int) for r in regions).tolist() == m.astype(int).tolist()
    assert drawing.connected_regions(np.zeros((3, 3), bool)) == []


def test_degradation_leaves_labels_alone_and_is_what_is_saved():
    clean = scenes.draw_scene(3, "train", size=SIZE, clean=True)
    noisy = scenes.draw_scene(3, "train", size=SIZE)
    np.testing.assert_array_equal(clean.class_map, noisy.class_map)
    assert len(clean.instances) == len(noisy.instances)
    a = np.asarray(clean.image, np.float32)
    b = np.asarray(noisy.image, np.float32)
    assert 0 < np.abs(a - b).mean() < 12  # mild: the picture is still the same picture

    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(noisy.jpeg)).convert("RGB")), b)


def test_same_seed_same_scene_other_seed_other_scene():
    a = scenes.draw_scene(7, "heldout")
    b = scenes.draw_scene(7, "heldout")
    c = scenes.draw_scene(8, "heldout")
    assert a.jpeg == b.jpeg and a.caption == b.caption
    np.testing.assert_array_equal(a.class_map, b.class_map)
    assert a.jpeg != c.jpeg
    rng = np.random.default_rng(7)  # a Generator works the same as its seed
    assert scenes.draw_scene(rng, "heldout").jpeg == a.jpeg


def test_image_sizes_and_aspects_vary():
    sizes = [scenes.draw_scene(s, "train").image.size for s in range(12)]
    widths = [w for w, _ in sizes]
    aspects = [w / h for w, h in sizes]
    assert min(widths) >= 192 and max(widths) <= 384 and len(set(sizes)) > 8
    assert min(aspects) >= 0.74 and max(aspects) <= 1.79 and max(aspects) - min(aspects) > 0.4


# ----------------------------------------------------------------------------- captions


def rect_mask(H, W, top, bottom, left, right):
    m = np.zeros((H, W), bool)
    m[top:bottom, left:right] = True
    return m


def hand_scene(things):
    """Sky over the top half, grass below, and `things` [(cls, colour, (top, bottom, left, right))]
    painted over them; -> instances as draw_scene gives them."""
    H, W = 40, 60
    stuff = {SKY: rect_mask(H, W, 0, 20, 0, W), GRASS: rect_mask(H, W, 20, H, 0, W)}
    insts = []
    for cls, colour, (t, b, l, r) in things:
        m = rect_mask(H, W, t, b, l, r)
        insts.append(Instance(cls, m, {"colour": colour, "area": int(m.sum())}))
        for k in stuff:
            stuff[k] &= ~m
    colours = {SKY: "blue", GRASS: "green"}
    for k, m in stuff.items():
        insts.append(Instance(k, m, {"colour": colours[k], "area": int(m.sum()), "stuff": True}))
    return insts


def test_caption_by_hand():
    house = hand_scene([(HOUSE, "red", (10, 30, 5, 25))])
    assert scenes.caption(house) == "a red house on the grass under a blue sky"
    trees = hand_scene([(TREE, "green", (5, 30, 5, 12)), (TREE, "green", (5, 30, 30, 37))])
    assert "two trees" in scenes.caption(trees)
    cars = hand_scene(
        [
            (CAR, "red", (25, 30, 2, 12)),
            (CAR, "red", (25, 30, 20, 30)),
            (CAR, "red", (25, 30, 40, 50)),
        ]
    )
    assert "three red cars" in scenes.caption(cars)
    two_cars = hand_scene([(CAR, "red", (25, 30, 2, 12)), (CAR, "blue", (25, 30, 20, 30))])
    assert "a red and a blue car" in scenes.caption(two_cars)
    sun = hand_scene([(SUN, "yellow", (2, 10, 40, 48))])
    # a crop around the sun, and a crop of lawn only
    assert scenes.caption(sun, box=(36, 0, 52, 14)) == "a sun in a blue sky"
    assert scenes.caption(sun, box=(0, 25, 30, 40)) == "grass"


WORDS = {k: re.compile(rf"\b{name}s?\b") for k, name in enumerate(CLASSES)}


@pytest.mark.parametrize("style", drawing.STYLES)
def test_captions_name_what_is_visible_and_nothing_else(style):
    rng = np.random.default_rng(0)
    for seed in range(8):
        scene = scenes.draw_scene(seed, style, size=SIZE)
        for _ in range(6):
            crop, text, box = scenes.random_crop_with_caption(scene, rng)
            left, top, right, bottom = box
            assert 0 <= left < right <= SIZE[0] and 0 <= top < bottom <= SIZE[1]
            assert crop.size == (right - left, bottom - top)
            in_crop = scene.class_map[top:bottom, left:right]
            inside = np.bincount(in_crop.ravel(), minlength=len(CLASSES))
            named = {k for k, w in WORDS.items() if w.search(text)}
            # nothing invented
            assert named <= {k for k in range(len(CLASSES)) if inside[k]}, (text, inside)
            area = (right - left) * (bottom - top)
            for k in drawing.STUFF:
                if inside[k] >= 0.1 * area:
                    assert k in named, (CLASSES[k], text)
            for cls, mask, attrs in scene.instances:
                seen = mask[top:bottom, left:right].sum()
                if cls in THINGS and seen >= drawing.MIN_AREA and seen >= 0.5 * attrs["area"]:
                    assert cls in named, (CLASSES[cls], text)
    # the whole scene's caption: every object class that is there
    for seed in range(8):
        scene = scenes.draw_scene(seed, style, size=SIZE)
        named = {k for k, w in WORDS.items() if w.search(scene.caption)}
        assert {cls for cls, _, _ in scene.instances if cls in THINGS} <= named, scene.caption


def test_object_crops_are_centred_on_an_object():
    scene = scenes.draw_scene(2, "train", size=SIZE)
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, text, (left, top, right, bottom) = scenes.random_crop_with_caption(
            scene, rng, object_prob=1.0
        )
        cy, cx = (top + bottom) // 2, (left + right) // 2
        around = scene.class_map[max(0, cy - 8) : cy + 8, max(0, cx - 8) : cx + 8]
        assert np.isin(around, THINGS).any(), text


# ----------------------------------------------------------------------------- the two hands


def roof_top_width(style, count=20):
    """Mean over larger houses of (width of the mask's top tenth) / (mask's width): a gable roof
    ends in an apex, hip and flat roofs in a wide top."""
    ratios = []
    for seed in range(count):
        scene = scenes.draw_scene(seed, style, size=(256, 192), clean=True)
        for cls, mask, attrs in scene.instances:
            if cls == HOUSE and attrs["area"] >= 600:
                left, top, right, bottom = scenes.mask_box(mask)
                top_tenth = mask[top : top + max(1, (bottom - top) // 10)]
                ratios.append(top_tenth.any(0).sum() / (right - left))
    return np.mean(ratios)


def test_heldout_hand_draws_other_shapes_and_colours():
    assert roof_top_width("train") < 0.45 < roof_top_width("heldout")
    kinds = {style: set() for style in drawing.STYLES}  # style -> {(class, shape drawn)}
    for style in drawing.STYLES:
        for seed in range(10):
            for cls, _, attrs in scenes.draw_scene(seed, style, size=SIZE).instances:
                if cls in THINGS:
                    kinds[style].add((cls, attrs["kind"]))
    for cls in (HOUSE, TREE, CAR):
        train_kinds = {k for c, k in kinds["train"] if c == cls}
        heldout_kinds = {k for c, k in kinds["heldout"] if c == cls}
        assert not train_kinds & heldout_kinds
    # one colour name, disjoint parts of its range: inner half (train), outer half (heldout)
    for style, inner in (("train", True), ("heldout", False)):
        rng = np.random.default_rng(0)
        for _ in range(50):
            _, rgb = drawing.sample_colour(rng, drawing.CAR_COLOURS, drawing.HANDS[style], "blue")
            h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
            spread = drawing.SPREAD
            far = max(
                abs(h - 0.6) / spread[0], abs(s - 0.65) / spread[1], abs(v - 0.75) / spread[2]
            )
            assert (far <= 0.5 + 0.05) if inner else (0.5 - 0.05 <= far <= 1.05), (style, rgb, far)
