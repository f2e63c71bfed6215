"""A toy world: flat-colour outdoor scenes with exact labels and captions (issue 9).

SAM-CLIP needs two teachers, an unlabeled D_CLIP, an SA-1B-like D_SAM and five evaluation sets.
None of that fits on a laptop, so the `toy` package draws a miniature world in which the whole
method can be trained and evaluated in minutes: toy/drawing.py holds the classes, colours, hands and
the pen, this file composes and describes scenes, toy/layouts.py writes them in every dataset layout
the project reads, and toy/teachers.py trains the two toy teachers on them. Each scene comes with
everything a dataset of the real method would give: the picture, a class per pixel, a mask per
object and per stuff region, and a caption. Sections, in the order a scene meets them:

  1. The scene: sky, sun, clouds, grass, an optional road, then houses, trees and cars from back to
     front (by the y of their base), each 0-3 times, sizes growing towards the viewer. Blur, noise
     and a JPEG round trip (quality 60-95) are applied inside `draw_scene` (unless clean=True), so
     scenes generated on the fly look like the ones written to disk; the JPEG bytes are kept and the
     writers store exactly those bytes.
  2. Captions of a whole scene or of a crop ("a red house and two trees on the grass under a blue
     sky"): every class visible in the crop is named, objects with counts and often colours, stuff
     (sky, grass, road) when it covers a noticeable share.
  3. Crops: `random_crop_with_caption` is the (crop, text) pair the toy CLIP teacher is trained on,
     biased to crops centred on one object; `dominated_box` is a crop that one class dominates
     (zero-shot classification).

Coordinates are (x, y) in output pixels, boxes (left, top, right, bottom) as PIL's crop takes them.
Shape legend: H W image height and width.
"""

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from toy.drawing import (
    CAR,
    CLASSES,
    CLOUD,
    GRASS,
    HANDS,
    HOUSE,
    MIN_AREA,
    ROAD,
    SKY,
    STUFF,
    SUN,
    THINGS,
    TREE,
    Canvas,
    draw_car,
    draw_cloud,
    draw_grass,
    draw_house,
    draw_road,
    draw_sky,
    draw_sun,
    draw_tree,
)

# ----------------------------------------------------------------------------- 1. the scene


@dataclass
class Scene:
    """One drawn scene and its labels, as draw_scene returns it."""

    image: Image.Image  # RGB (W, H), blurred, noisy and JPEG-compressed unless drawn clean
    class_map: np.ndarray  # (H, W) uint8 class index under each pixel's centre, 0..7, no gaps
    instances: list  # [Instance]: every object and stuff region, masks disjoint
    caption: str  # a caption of the whole scene
    edge: np.ndarray  # (H, W) bool: pixels whose colour blends more than one class
    style: str  # the hand that drew it
    # the JPEG that `image` decodes from (None if clean)
    jpeg: bytes = field(default=None, repr=False)


HOUSE_COUNTS = (0.25, 0.4, 0.25, 0.1)  # P(0, 1, 2, 3 houses)
TREE_COUNTS = (0.2, 0.35, 0.3, 0.15)
CAR_COUNTS = (0.3, 0.4, 0.2, 0.1)  # with a road
CAR_COUNTS_NO_ROAD = (0.75, 0.2, 0.05, 0.0)
CLOUD_COUNTS = (0.25, 0.35, 0.25, 0.15)
SUN_PROB = 0.6
ROAD_PROB = 0.6


def random_size(rng):
    """(W, H): width 192-384 px, aspect W/H log-uniform between 3:4 (portrait) and 16:9."""
    width = int(rng.integers(192, 385))
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9)))
    return width, max(96, int(round(width / aspect)))


def pick_count(rng, probs):
    return int(rng.choice(len(probs), p=probs))


def sample_y(rng, zones):
    """A y drawn uniformly from the union of (y0, y1) zones, each weighed by its length."""
    zones = [(a, b) for a, b in zones if b - a > 1] or [(zones[0][0], zones[0][0] + 1)]
    lengths = np.array([b - a for a, b in zones])
    a, b = zones[rng.choice(len(zones), p=lengths / lengths.sum())]
    return rng.uniform(a, b)


def draw_scene(seed_or_rng, style="train", size=None, clean=False):
    """Draw one scene in `style`'s hand. seed_or_rng: an int (or a sequence of ints) to seed a
    numpy Generator, or the Generator itself. size: (W, H), random (random_size) if None.
    clean=True leaves out blur, noise and JPEG (for tests that compare pixels with labels).
    -> Scene."""
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    else:
        rng = np.random.default_rng(seed_or_rng)
    hand = HANDS[style]
    W, H = size or random_size(rng)
    c = Canvas(W, H)
    ref = (W * H) ** 0.5  # sizes scale with the picture's area, not one side
    horizon = H * rng.uniform(0.42, 0.68)
    sky = draw_sky(c, rng, hand, horizon)
    if rng.random() < SUN_PROB:  # drawn before the grass: a low sun sets behind the hills
        r = ref * rng.uniform(0.045, 0.09)
        sun_x = rng.uniform(0.05, 0.95) * W
        sun_y = rng.uniform(0.08 * H, horizon + 0.3 * r)
        draw_sun(c, rng, hand, sun_x, sun_y, r, sky == "orange")
    for _ in range(pick_count(rng, CLOUD_COUNTS)):
        cloud_x = rng.uniform(0, W)
        cloud_y = rng.uniform(0.08, 0.8) * horizon
        cloud_width = ref * rng.uniform(0.16, 0.35)
        draw_cloud(c, rng, hand, cloud_x, cloud_y, cloud_width, sky == "grey")
    ground = draw_grass(c, rng, hand, horizon)
    far = ground + 0.02 * H  # the y range objects stand in: far .. near
    near = H - 0.01 * H
    road = draw_road(c, rng, hand, ground) if rng.random() < ROAD_PROB else None
    if road:  # (y0, y1) zones behind and in front of the road
        behind = (far, road[0][0] + 2)
        front = (road[0][1] - 1, near)
    else:
        behind = (far, near)
        front = (0, 0)
    objects = []  # (base y, drawer, cx, size)

    def depth(y):  # nearer objects (lower base) are drawn larger
        return 0.6 + 0.7 * (y - ground) / max(1, H - ground)

    for _ in range(pick_count(rng, HOUSE_COUNTS)):
        y = sample_y(rng, [behind] if behind[1] - behind[0] > 0.04 * H else [front, (far, near)])
        x = rng.uniform(-0.05, 1.05) * W
        objects.append((y, draw_house, x, ref * rng.uniform(0.2, 0.36) * depth(y)))
    for _ in range(pick_count(rng, TREE_COUNTS)):
        y = sample_y(rng, [behind, front])
        objects.append((y, draw_tree, rng.uniform(0, W), ref * rng.uniform(0.3, 0.55) * depth(y)))
    for _ in range(pick_count(rng, CAR_COUNTS if road else CAR_COUNTS_NO_ROAD)):
        y, x = road[1]() if road else (sample_y(rng, [(far, near)]), rng.uniform(0, W))
        objects.append((y, draw_car, x, ref * rng.uniform(0.16, 0.26) * depth(y)))
    # back to front: nearer objects occlude
    for y, drawer, x, s in sorted(objects, key=lambda o: o[0]):
        drawer(c, rng, hand, x, y, s)
    image, class_map, edge, instances = c.finish()
    jpeg = None
    if not clean:
        image, jpeg = degrade(image, rng)
    return Scene(image, class_map, instances, caption(instances, None, rng), edge, style, jpeg)


def degrade(image, rng):
    """Mild camera-like damage: Gaussian blur (sigma 0.3-1.0 px, 70% of scenes), Gaussian noise
    (sigma 1-6 grey levels, 70%), JPEG at quality 60-95. -> (decoded image, JPEG bytes)."""
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.7:
        sigma = rng.uniform(1, 6)
        noise = rng.normal(0, sigma, (image.height, image.width, 3))
        noisy = np.asarray(image, np.float32) + noise
        image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), buf.getvalue()


# ----------------------------------------------------------------------------- 2. captions

THING_SHARE = 0.3  # an object counts in a crop if this share of its visible pixels is inside ...
THING_FILL = 0.1  # ... or it fills this share of the crop
# stuff is named when it covers this share of the crop (a road band is ~5-10% of a scene)
STUFF_SHARE = 0.04
COLOUR_PROB = {
    HOUSE: 0.85,
    CAR: 0.85,
    TREE: 0.25,
    CLOUD: 0.25,
    SUN: 0.3,
    SKY: 0.6,
    GRASS: 0.25,
    ROAD: 0.2,
}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
PREFIXES = ("", "", "", "a drawing of ", "a picture of ", "a cartoon of ", "an illustration of ")


def choose(rng, options):
    """The first option without a generator (a canonical caption), a random one with it."""
    return options[0] if rng is None else options[rng.integers(len(options))]


def say_colour(rng, cls):
    return COLOUR_PROB[cls] >= 0.5 if rng is None else rng.random() < COLOUR_PROB[cls]


def article(words):
    return ("an " if words[0] in "aeiou" else "a ") + words


def join(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def noun_phrase(cls, colours, rng):
    """'a red house', 'two trees', 'three white clouds', 'a red and a blue car'."""
    noun = CLASSES[cls]
    n = len(colours)
    colour = say_colour(rng, cls)
    if n == 1:
        return article(f"{colours[0]} {noun}" if colour else noun)
    count = NUMBERS.get(n, "several")
    if colour and len(set(colours)) == 1:
        return f"{count} {colours[0]} {noun}s"
    if colour and n == 2:
        return f"{article(colours[0])} and {article(colours[1])} {noun}"
    return f"{count} {noun}s"


def caption(instances, box=None, rng=None):
    """Describe what is visible in `box` (left, top, right, bottom; the whole image if None):
    objects with counts and often colours, stuff when it covers STUFF_SHARE of the box. Every class
    visible is named by its own word, because zero-shot prompts name classes by these words.
    rng picks among phrasings; without it the caption is canonical (the first phrasing)."""
    if not instances:
        return "an empty picture"
    H, W = instances[0].mask.shape
    left, top, right, bottom = box or (0, 0, W, H)
    box_area = max(1, (right - left) * (bottom - top))
    objects = {}  # class -> [(pixels in the box, colour)] of its objects that count as seen
    stuff = {}  # class -> its pixels in the box
    largest = {}  # class -> (pixels in the box, colour) of its most visible instance
    for cls, mask, attrs in instances:
        inside = int(mask[top:bottom, left:right].sum())
        if inside > largest.get(cls, (0, ""))[0]:
            largest[cls] = (inside, attrs.get("colour", ""))
        if cls in STUFF:
            stuff[cls] = stuff.get(cls, 0) + inside
        elif inside >= MIN_AREA and (
            inside >= THING_SHARE * attrs["area"] or inside >= THING_FILL * box_area
        ):
            objects.setdefault(cls, []).append((inside, attrs.get("colour", "")))
    present = {cls for cls, n in stuff.items() if n >= STUFF_SHARE * box_area}
    if not objects and not present:  # a sliver of something: name whatever holds most of the box
        cls = max(largest, key=lambda k: largest[k][0])
        if cls in STUFF:
            present.add(cls)
        else:
            objects[cls] = [largest[cls]]
    # the most visible first
    order = sorted(objects, key=lambda k: -sum(a for a, _ in objects[k]))
    if rng is not None and rng.random() < 0.3:
        order = [order[i] for i in rng.permutation(len(order))]
    colours_of = {k: [col for _, col in objects[k]] for k in objects}
    ground = [noun_phrase(k, colours_of[k], rng) for k in order if k in (HOUSE, TREE, CAR)]
    aloft = [noun_phrase(k, colours_of[k], rng) for k in order if k in (SUN, CLOUD)]
    colour = {k: largest[k][1] for k in STUFF if k in largest}
    grass = "grass"
    if GRASS in present and say_colour(rng, GRASS):
        grass = f"{colour[GRASS]} grass"
    road = "a road"
    if ROAD in present and say_colour(rng, ROAD):
        road = article(f"{colour[ROAD]} road")
    sky = "the sky"
    if SKY in present and say_colour(rng, SKY):
        sky = article(f"{colour[SKY]} sky")
    if ground:  # where the ground objects stand
        cars = any(k == CAR for k in objects)
        if ROAD in present and GRASS in present and cars:
            where = choose(rng, (f"on {road} through the {grass}", f"on the {grass} by {road}"))
        elif ROAD in present and GRASS in present:
            where = choose(rng, (f"on the {grass} by {road}", f"by {road} through the {grass}"))
        elif ROAD in present and cars:
            where = choose(rng, (f"on {road}", f"driving on {road}"))
        elif ROAD in present:
            where = choose(rng, (f"by {road}", f"next to {road}"))
        elif GRASS in present:
            where = choose(rng, (f"on the {grass}", f"in the {grass}", f"standing on {grass}"))
        else:
            where = ""
        low = (join(ground) + " " + where).strip()
    elif ROAD in present and GRASS in present:
        low = choose(rng, (f"{road} through the {grass}", f"{grass} and {road}"))
    elif ROAD in present:
        low = road
    elif GRASS in present:
        low = choose(rng, (grass, f"a field of {grass}", f"a patch of {grass}"))
    else:
        low = ""
    if aloft:
        high = join(aloft) + (f" in {sky}" if SKY in present else "")
    else:
        high = sky if SKY in present else ""
    if low and high:
        if aloft and SKY not in present:
            text = f"{low} and {high}"
        elif aloft:
            text = choose(rng, (f"{low} under {high}", f"{high} above {low}", f"{low} with {high}"))
        else:
            text = choose(
                rng, (f"{low} under {high}", f"{low} below {high}", f"{low} against {high}")
            )
    else:
        text = low or high
    return choose(rng, PREFIXES) + text


# ----------------------------------------------------------------------------- 3. crops


def mask_box(mask):
    """bool (H, W) -> its bounding box (left, top, right, bottom), right/bottom exclusive."""
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def fit_box(cx, cy, bw, bh, W, H):
    """A box of about bw x bh centred at (cx, cy), shifted (then clipped) to lie inside W x H."""
    bw, bh = int(round(min(max(bw, 16), W))), int(round(min(max(bh, 16), H)))
    left = int(np.clip(round(cx - bw / 2), 0, W - bw))
    top = int(np.clip(round(cy - bh / 2), 0, H - bh))
    return left, top, left + bw, top + bh


def random_crop_with_caption(scene, rng, object_prob=0.6, stuff_prob=0.15):
    """A (crop, caption, box) pair for contrastive training of a toy CLIP teacher. With probability
    `object_prob` the crop is centred on one object with a margin of 10-80% (so the caption's words
    bind to that region), with `stuff_prob` it sits inside a stuff region, else it is a random box
    of 25-100% of the image."""
    W, H = scene.image.size
    things = [inst for inst in scene.instances if inst.cls in THINGS]
    regions = [inst for inst in scene.instances if inst.cls in STUFF]
    u = rng.random()
    if u < object_prob and things:
        left, top, right, bottom = mask_box(things[rng.integers(len(things))].mask)
        m = rng.uniform(1.1, 1.8, 2)  # the box's width and height over the object's
        cx, cy = (left + right) / 2, (top + bottom) / 2
        box = fit_box(cx, cy, (right - left) * m[0], (bottom - top) * m[1], W, H)
    elif u < object_prob + stuff_prob and regions:
        ys, xs = np.nonzero(regions[rng.integers(len(regions))].mask)
        k = rng.integers(len(xs))
        side = rng.uniform(0.2, 0.5) * min(W, H)
        box = fit_box(xs[k], ys[k], side, side * rng.uniform(0.75, 1.33), W, H)
    else:
        area = rng.uniform(0.25, 1.0) * W * H
        aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
        bw, bh = (area * aspect) ** 0.5, (area / aspect) ** 0.5
        cx = rng.uniform(bw / 2, max(bw / 2, W - bw / 2))
        cy = rng.uniform(bh / 2, max(bh / 2, H - bh / 2))
        box = fit_box(cx, cy, bw, bh, W, H)
    return scene.image.crop(box), caption(scene.instances, box, rng), box


def dominated_box(scene, cls, rng):
    """A crop box in which class `cls` holds the largest share of the pixels (at least 60% for
    stuff): an object's bounding box with a 0-25% margin, or a square inside a stuff region.
    -> box, or None if the scene has no such crop."""
    W, H = scene.image.size
    if cls in THINGS:
        found = [inst for inst in scene.instances if inst.cls == cls and inst.attrs["area"] >= 100]
        if not found:
            return None
        left, top, right, bottom = mask_box(found[rng.integers(len(found))].mask)
        m = rng.uniform(1.0, 1.25)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        box = fit_box(cx, cy, (right - left) * m, (bottom - top) * m, W, H)
        need = 0.0
    else:
        ys, xs = np.nonzero(scene.class_map == cls)
        if len(xs) < 400:
            return None
        k = rng.integers(len(xs))
        side = rng.uniform(0.2, 0.45) * min(W, H)
        box = fit_box(xs[k], ys[k], side, side, W, H)
        need = 0.6
    inside = scene.class_map[box[1] : box[3], box[0] : box[2]]
    share = np.bincount(inside.ravel(), minlength=len(CLASSES))
    share = share / share.sum()
    return box if share.argmax() == cls and share[cls] >= need else None
