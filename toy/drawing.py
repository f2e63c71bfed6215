"""How the toy world is drawn: its eight classes, named colours, two drawing hands, the canvas that
paints a picture and its instance map together, and one drawer per class (issue 9).

The toy world (toy/scenes.py composes its scenes) is a miniature of the data SAM-CLIP needs, in the
style of assets/example.jpg (segment_demo.py's `draw_example_scene`), with exactly eight classes,
CLASSES below. This file holds the pen, in the order a shape meets it:

  1. Colours and hands. Every colour is a named range in HSV ("a red house" is any of many reds).
     A `Hand` is the drawing style: the shapes it draws and which part of each colour range it uses.
     The "train" hand draws gable roofs, blob trees, sedans, cloud puffs, plain suns, straight
     roads and smooth skies from the inner half of every colour range; the "heldout" hand draws hip
     and flat roofs, pines and round trees, vans and beetles, pill clouds, suns with rays,
     perspective roads, banded skies and rolling hills, more outlines, from the outer half. Same
     classes and spirit, a different hand: a model that memorised one shape or colour fails on it.
  2. The canvas. Every shape is drawn twice at SUPERSAMPLE x the output size: in colour on the
     picture and as its instance id on an id map, so later shapes overwrite earlier ones in both
     (occlusion is exact). The picture is box-downsampled (anti-aliased edges); a pixel's instance
     is the id under its centre, its class that instance's class. A pixel whose sub-samples hold
     more than one class has a blended colour: it is marked in `Scene.edge` (and is 255, ignore, in
     the semantic labels toy/layouts.py writes), the way VOC marks its object borders.
  3. The drawers: sky, sun, cloud, grass, road, house, tree, car, each in the hand it is given.

Coordinates are (x, y) in output pixels, boxes (left, top, right, bottom) as PIL's crop takes them.
Shape legend: H W image height and width, s the supersampling factor.
"""

import colorsys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("sky", "sun", "cloud", "grass", "road", "house", "tree", "car")
SKY, SUN, CLOUD, GRASS, ROAD, HOUSE, TREE, CAR = range(len(CLASSES))
STUFF = (SKY, GRASS, ROAD)  # regions, not countable objects
THINGS = (SUN, CLOUD, HOUSE, TREE, CAR)  # countable objects: COCO's "thing" classes
STYLES = ("train", "heldout")

SUPERSAMPLE = 3  # odd, so that one sub-sample sits exactly at each output pixel's centre
# px: an instance left with fewer visible pixels is not listed (its pixels keep their class)
MIN_AREA = 20

# ----------------------------------------------------------------------------- 1. colours and hands

# Named colours as HSV centres (hue, saturation, value in 0..1). A sample lies within SPREAD of the
# centre; the hand decides which part of that range (train: the inner half, heldout: the outer
# half).
SPREAD = (0.04, 0.2, 0.12)  # hue, saturation, value
GREY_SPREAD = (0.04, 0.05, 0.1)  # near-grey colours: a saturation swing of 0.2 would tint them
WALL_COLOURS = {
    "red": (0.0, 0.65, 0.75),
    "orange": (0.07, 0.7, 0.92),
    "yellow": (0.14, 0.6, 0.95),
    "green": (0.3, 0.4, 0.65),
    "blue": (0.6, 0.45, 0.8),
    "pink": (0.95, 0.35, 0.95),
    "white": (0.1, 0.04, 0.9),
    "brown": (0.07, 0.55, 0.5),
    "grey": (0.6, 0.05, 0.6),
}
ROOF_COLOURS = {
    "brown": (0.05, 0.6, 0.4),
    "red": (0.01, 0.7, 0.55),
    "grey": (0.6, 0.08, 0.4),
    "black": (0.6, 0.1, 0.22),
    "blue": (0.6, 0.4, 0.45),
}
DOOR_COLOURS = {
    "brown": (0.07, 0.6, 0.35),
    "red": (0.0, 0.6, 0.45),
    "blue": (0.6, 0.5, 0.4),
    "green": (0.35, 0.5, 0.35),
}
WINDOW_COLOURS = {
    "light blue": (0.55, 0.22, 0.95),
    "white": (0.6, 0.04, 0.95),
    "lit": (0.14, 0.45, 0.98),
}
CAR_COLOURS = {
    "red": (0.0, 0.75, 0.8),
    "blue": (0.6, 0.65, 0.75),
    "yellow": (0.14, 0.75, 0.95),
    "white": (0.6, 0.04, 0.92),
    "black": (0.6, 0.1, 0.18),
    "silver": (0.6, 0.05, 0.72),
    "green": (0.33, 0.6, 0.55),
    "orange": (0.07, 0.8, 0.95),
}
TYRE_COLOURS = {"black": (0.6, 0.1, 0.15)}
HUB_COLOURS = {"grey": (0.6, 0.04, 0.7)}
CANOPY_COLOURS = {
    "green": (0.3, 0.6, 0.55),
    "dark green": (0.33, 0.65, 0.38),
    "light green": (0.25, 0.55, 0.72),
}
AUTUMN_COLOURS = {"orange": (0.08, 0.75, 0.85)}
TRUNK_COLOURS = {"brown": (0.07, 0.6, 0.38)}
SUN_COLOURS = {"yellow": (0.14, 0.75, 1.0), "orange": (0.09, 0.75, 1.0)}
CLOUD_COLOURS = {"white": (0.6, 0.03, 0.97), "grey": (0.6, 0.06, 0.75)}
GRASS_COLOURS = {
    "green": (0.28, 0.6, 0.6),
    "light green": (0.24, 0.5, 0.75),
    "dark green": (0.32, 0.6, 0.42),
}
ROAD_COLOURS = {"grey": (0.6, 0.05, 0.45), "dark grey": (0.6, 0.05, 0.3)}
MARKING_COLOURS = {"white": (0.6, 0.02, 0.95), "yellow": (0.14, 0.8, 0.95)}
# A sky is a gradient from a top colour to a horizon colour; the name is the caption's colour word.
SKY_COLOURS = {
    "blue": ((0.6, 0.55, 0.85), (0.57, 0.25, 0.98)),
    "pale blue": ((0.57, 0.3, 0.95), (0.55, 0.1, 1.0)),
    "grey": ((0.6, 0.1, 0.62), (0.6, 0.05, 0.85)),
    "orange": ((0.68, 0.45, 0.6), (0.08, 0.6, 1.0)),
}
SKY_WEIGHTS = (0.55, 0.2, 0.12, 0.13)


@dataclass(frozen=True)
class Hand:
    """One drawing style. The two hands share classes, colour names and layout; they differ in
    the shapes and in which part of every colour range they draw from."""

    roofs: tuple  # roof shapes: "gable" (triangle), "hip" (trapezoid), "flat" (slab)
    trees: tuple  # "blobs" (a canopy of 1-4 ellipses), "pine" (stacked triangles), "round"
    cars: tuple  # "sedan" (body + cabin), "van" (tall box), "beetle" (half ellipse)
    clouds: str  # "puffs" (clusters of ellipses) or "pills" (stacked rounded rectangles)
    roads: tuple  # "band" (a straight strip across) or "perspective" (towards the horizon)
    sun_rays: float  # probability that a sun gets rays
    sky_bands: tuple  # (lo, hi) number of flat bands the sky gradient is cut into; (0, 0) = smooth
    hills: tuple  # (lo, hi) height of the horizon's waves, fraction of the image height
    outline: float  # probability that an object is drawn with dark outlines
    outline_width: tuple  # (lo, hi) outline width in output pixels
    colour_band: tuple  # (lo, hi): a colour sits |u| * SPREAD from its centre, u in this range
    stories: tuple  # (lo, hi) wall height of a house over its width


HANDS = {
    "train": Hand(
        roofs=("gable",),
        trees=("blobs",),
        cars=("sedan",),
        clouds="puffs",
        roads=("band",),
        sun_rays=0.0,
        sky_bands=(0, 0),
        hills=(0.0, 0.05),
        outline=0.15,
        outline_width=(0.7, 1.2),
        colour_band=(0.0, 0.5),
        stories=(0.55, 0.85),
    ),
    "heldout": Hand(
        roofs=("hip", "flat"),
        trees=("pine", "round"),
        cars=("van", "beetle"),
        clouds="pills",
        roads=("band", "perspective"),
        sun_rays=0.7,
        sky_bands=(4, 8),
        hills=(0.04, 0.1),
        outline=0.6,
        outline_width=(1.0, 2.2),
        colour_band=(0.5, 1.0),
        stories=(0.7, 1.15),
    ),
}


def sample_colour(rng, table, hand, name=None):
    """-> (name, (r, g, b)): the named colour (a random one of `table` if None) drawn from the part
    of its range that `hand` uses. Hue wraps around; a saturation or value centre is moved inside
    [spread, 1 - spread] so that no sample is clipped (clipping would fold both hands' bands onto
    the same pure black or white)."""
    name = name or list(table)[rng.integers(len(table))]
    spread = np.array(GREY_SPREAD if table[name][1] < 0.15 else SPREAD)
    centre = np.concatenate([table[name][:1], np.clip(table[name][1:], spread[1:], 1 - spread[1:])])
    # signed offsets, one per channel
    u = rng.uniform(*hand.colour_band, 3) * rng.choice((-1.0, 1.0), 3)
    h = (centre[0] + u[0] * spread[0]) % 1.0
    s, v = centre[1:] + u[1:] * spread[1:]
    return name, tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def shade(rgb, factor):
    """A darker (factor < 1) or lighter (> 1) version of a colour: outlines, halos, highlights."""
    if factor <= 1:
        return tuple(int(min(255, round(c * factor))) for c in rgb)
    return tuple(int(round(c + (255 - c) * (factor - 1))) for c in rgb)


# ----------------------------------------------------------------------------- 2. the canvas


class Instance(NamedTuple):
    """One object or stuff region; unpacks as (class index, mask, attributes)."""

    cls: int  # index into CLASSES
    mask: np.ndarray  # (H, W) bool, its visible pixels after occlusion
    # "colour" (the caption's word), "kind" (the shape drawn), "area" (visible px), "parts" (every
    # RGB colour painted for it), "stuff" (sky/grass/road)
    attrs: dict


class Canvas:
    """A picture and an instance-id map drawn with the same PIL calls at SUPERSAMPLE x the output
    size. `begin(cls, ...)` opens an instance; every shape after it is painted in its colour on the
    picture and in the instance's id on the id map, so both see the same occlusion."""

    def __init__(self, width, height):
        self.w = width
        self.h = height
        s = SUPERSAMPLE
        self.rgb = Image.new("RGB", (width * s, height * s))
        self.ids = Image.new("L", (width * s, height * s))  # instance ids 1..255, 0 = nothing drawn
        self.pen_rgb = ImageDraw.Draw(self.rgb)
        self.pen_ids = ImageDraw.Draw(self.ids)
        self.records = [(None, {})]  # id -> (class, attributes)
        self.parts = [set()]  # id -> every colour painted for it
        self.id = 0  # the instance being drawn
        self.outline = 0.0

    def begin(self, cls, outline=0.0, **attrs):
        """Open a new instance of class `cls`; `outline` (px) draws every shape of it with a dark
        rim of its own colour. -> the instance id."""
        self.records.append((cls, attrs))
        self.parts.append(set())
        self.id = len(self.records) - 1
        self.outline = outline
        return self.id

    def _scale(self, xy):
        s = SUPERSAMPLE
        if isinstance(xy[0], (tuple, list)):
            return [(x * s, y * s) for x, y in xy]
        x0, y0, x1, y1 = xy
        return (min(x0, x1) * s, min(y0, y1) * s, max(x0, x1) * s, max(y0, y1) * s)

    def shape(self, kind, xy, fill, outline=True, **kwargs):
        """Paint one ImageDraw shape ("ellipse", "rectangle", "polygon", "rounded_rectangle",
        "chord") of colour `fill` on both layers; the rim, if any, is a darker shade of the fill."""
        xy = self._scale(xy)
        if "radius" in kwargs:  # PIL needs the corner radius to fit the box
            largest = min((xy[2] - xy[0]) / 2, (xy[3] - xy[1]) / 2)  # half the shorter side
            kwargs["radius"] = max(0, min(kwargs["radius"] * SUPERSAMPLE, largest))
        width = int(round(self.outline * SUPERSAMPLE)) if outline else 0
        rim = shade(fill, 0.45) if width else None
        getattr(self.pen_rgb, kind)(xy, fill=fill, outline=rim, width=max(width, 1), **kwargs)
        getattr(self.pen_ids, kind)(
            xy, fill=self.id, outline=self.id if width else None, width=max(width, 1), **kwargs
        )
        self.parts[self.id].update([fill] + ([rim] if rim else []))

    def line(self, points, fill, width):
        """A polyline `width` output pixels wide (road markings, rays, window bars, grass tufts)."""
        w = max(1, int(round(width * SUPERSAMPLE)))
        self.pen_rgb.line(self._scale(points), fill=fill, width=w)
        self.pen_ids.line(self._scale(points), fill=self.id, width=w)
        self.parts[self.id].add(fill)

    def fill(self, rgb_rows):
        """Fill the whole canvas with the current instance, its colour varying per row:
        rgb_rows (H*s, 3) uint8 (a sky gradient)."""
        # (H*s, 3) -> (H*s, 1, 3)
        column = Image.fromarray(np.ascontiguousarray(rgb_rows[:, None, :]))
        self.rgb.paste(column.resize(self.rgb.size, Image.NEAREST))
        self.ids.paste(self.id, (0, 0) + self.ids.size)

    def finish(self):
        """-> (image PIL RGB (H, W), class_map (H, W) uint8, edge (H, W) bool, instances)."""
        s = SUPERSAMPLE
        h = self.h
        w = self.w
        image = self.rgb.reduce(s)  # box filter: anti-aliased edges
        sub = np.asarray(self.ids).reshape(h, s, w, s)  # (H*s, W*s) -> (H, s, W, s)
        ids = sub[:, s // 2, :, s // 2]  # (H, W) the id at each pixel's centre
        class_of = np.zeros(256, np.uint8)
        class_of[1 : len(self.records)] = [cls for cls, _ in self.records[1:]]
        class_map = class_of[ids]
        # (H, s, W, s) vs (H, 1, W, 1) -> (H, W): the pixel's sub-samples hold 2+ classes
        edge = (class_of[sub] != class_map[:, None, :, None]).any(axis=(1, 3))
        instances = []
        areas = np.bincount(ids.ravel(), minlength=len(self.records))
        for i in np.flatnonzero(areas[1:] >= MIN_AREA) + 1:
            cls, attrs = self.records[i]
            mask = ids == i
            # SAM's masks cover stuff as connected regions (grass cut in two by a road is two masks)
            for region in (connected_regions(mask) if cls in STUFF else [mask]):
                area = int(region.sum())
                if area >= MIN_AREA:
                    instances.append(
                        Instance(cls, region, dict(attrs, area=area, parts=sorted(self.parts[i])))
                    )
        return image, class_map, edge, instances


def connected_regions(mask):
    """The 4-connected regions of a bool mask (H, W), largest first, each a bool mask. The runs of
    each row are joined to the overlapping runs of the row above (union-find over runs, not
    pixels: a stuff region has a few runs per row, so this is quick without scipy)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # (H, W+1): +1 at a run's start, -1 past its end
    rows, starts = np.nonzero(step == 1)  # row-major: runs sorted by row, then x
    ends = np.nonzero(step == -1)[1]
    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row y: first[y] .. first[y+1]
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        for i in range(first[y], first[y + 1]):
            for j in range(first[y - 1], first[y]):
                # the runs overlap in x: same region
                if starts[j] < ends[i] and starts[i] < ends[j]:
                    parent[root(i)] = root(j)
    roots = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    if len(np.unique(roots)) <= 1:
        return [mask] if len(rows) else []
    label = np.zeros((h, w), np.int64)
    for r, s, e, k in zip(rows, starts, ends, roots):
        label[r, s:e] = k + 1
    regions = [label == k + 1 for k in np.unique(roots)]
    return sorted(regions, key=lambda m: -int(m.sum()))


# ----------------------------------------------------------------------------- 3. the drawers


def draw_sky(c, rng, hand, horizon):
    name = list(SKY_COLOURS)[rng.choice(len(SKY_COLOURS), p=SKY_WEIGHTS)]
    top_hsv, low_hsv = SKY_COLOURS[name]
    top = sample_colour(rng, {name: top_hsv}, hand)[1]
    low = sample_colour(rng, {name: low_hsv}, hand)[1]
    c.begin(SKY, colour=name, kind="gradient", stuff=True)
    rows = c.h * SUPERSAMPLE
    # 0 top .. 1 horizon
    t = np.clip(np.arange(rows) / (horizon * SUPERSAMPLE), 0, 1) ** rng.uniform(0.7, 1.5)
    if hand.sky_bands[1]:  # posterised: a few flat bands instead of a smooth ramp
        bands = int(rng.integers(*hand.sky_bands))
        t = np.minimum(np.floor(t * bands) / (bands - 1), 1.0)
    c.fill((np.array(top) + (np.array(low) - np.array(top)) * t[:, None]).round().astype(np.uint8))
    return name


def draw_sun(c, rng, hand, cx, cy, r, evening):
    name, colour = sample_colour(rng, SUN_COLOURS, hand, "orange" if evening else None)
    rays = rng.random() < hand.sun_rays
    c.begin(SUN, outline=outline_width(rng, hand), colour=name, kind="rays" if rays else "disc")
    if rays:
        n = int(rng.integers(8, 15))
        length = rng.uniform(1.5, 1.9)
        offset = rng.uniform(0, 2 * np.pi)
        for a in offset + 2 * np.pi * np.arange(n) / n:
            d = np.array([np.cos(a), np.sin(a)])
            inner = tuple((cx, cy) + 1.25 * r * d)
            outer = tuple((cx, cy) + length * r * d)
            c.line([inner, outer], colour, r * rng.uniform(0.12, 0.2))
    elif rng.random() < 0.3:  # a soft halo, one lighter ring
        c.shape(
            "ellipse",
            (cx - 1.3 * r, cy - 1.3 * r, cx + 1.3 * r, cy + 1.3 * r),
            shade(colour, 1.35),
            outline=False,
        )
    c.shape("ellipse", (cx - r, cy - r, cx + r, cy + r), colour)


def draw_cloud(c, rng, hand, cx, cy, width, grey_sky):
    wanted = "grey" if grey_sky and rng.random() < 0.6 else None
    name, colour = sample_colour(rng, CLOUD_COLOURS, hand, wanted)
    c.begin(CLOUD, outline=outline_width(rng, hand), colour=name, kind=hand.clouds)
    height = width * rng.uniform(0.3, 0.5)
    if hand.clouds == "puffs":  # a flat-bottomed base and 3-6 round puffs along it
        c.shape(
            "ellipse",
            (cx - width / 2, cy - height * 0.25, cx + width / 2, cy + height * 0.25),
            colour,
        )
        k = int(rng.integers(3, 7))
        xs = np.linspace(cx - width * 0.3, cx + width * 0.3, k) + rng.normal(0, width * 0.03, k)
        for x in xs:
            rad = height * rng.uniform(0.3, 0.55)
            y = cy - rad * rng.uniform(0.2, 0.8)
            c.shape("ellipse", (x - rad, y - rad, x + rad, y + rad), colour)
    else:  # 2-3 pills stacked, each narrower and shifted
        bottom = cy + height * 0.3
        w = width
        for _ in range(int(rng.integers(2, 4))):
            pill = height * rng.uniform(0.45, 0.65)
            x0 = cx - w / 2 + rng.uniform(-0.1, 0.1) * width
            c.shape(
                "rounded_rectangle", (x0, bottom - pill, x0 + w, bottom), colour, radius=pill / 2
            )
            bottom = bottom - pill * 0.65
            w = w * rng.uniform(0.5, 0.8)


def outline_width(rng, hand):
    return rng.uniform(*hand.outline_width) if rng.random() < hand.outline else 0.0


def draw_grass(c, rng, hand, horizon):
    """The ground: one grass region whose top edge tilts or rolls (the heldout hand adds a far,
    darker hill behind it, a region of its own). -> the lowest y of the grass's top edge."""
    xs = np.linspace(-2, c.w + 2, 33)
    name, colour = sample_colour(rng, GRASS_COLOURS, hand)
    if hand.hills[0] > 0:  # heldout: a far row of hills first
        c.begin(GRASS, colour=name, kind="far hill", stuff=True)
        amp = rng.uniform(0.05, 0.12) * c.h
        freq = rng.uniform(1, 2.5)
        phase = rng.uniform(0, 2 * np.pi)
        far = horizon - amp * (0.5 + 0.5 * np.sin(2 * np.pi * freq * xs / c.w + phase))
        c.shape(
            "polygon", list(zip(xs, far)) + [(c.w + 2, c.h + 2), (-2, c.h + 2)], shade(colour, 0.8)
        )
    tilt = rng.uniform(-0.05, 0.05) * c.h
    amp = rng.uniform(*hand.hills) * c.h
    freq = rng.uniform(0.5, 2)
    phase = rng.uniform(0, 2 * np.pi)
    top = horizon + tilt * (xs / c.w - 0.5) - amp * np.sin(2 * np.pi * freq * xs / c.w + phase)
    c.begin(GRASS, colour=name, kind="field", stuff=True)
    c.shape("polygon", list(zip(xs, top)) + [(c.w + 2, c.h + 2), (-2, c.h + 2)], colour)
    if rng.random() < 0.4:  # a few tufts: grass need not be one flat colour
        tuft = shade(colour, 0.75)
        for _ in range(int(rng.integers(8, 30))):
            x, y = rng.uniform(0, c.w), rng.uniform(top.max() + 4, c.h)
            s = rng.uniform(2, 4)
            c.line([(x - s, y - s), (x, y), (x + s, y - s)], tuft, 0.8)
    return float(top.max())


def draw_road(c, rng, hand, ground):
    """A road on the grass. -> ((y0, y1), base): the y extent the road covers near the viewer,
    and a function giving (y, x) for a car's base at a random point on the road."""
    kind = hand.roads[rng.integers(len(hand.roads))]
    name, colour = sample_colour(rng, ROAD_COLOURS, hand)
    mark_name = "white" if hand.roads == ("band",) else None
    mark = sample_colour(rng, MARKING_COLOURS, hand, mark_name)[1]
    c.begin(ROAD, colour=name, kind=kind, stuff=True)
    if kind == "band":
        depth = c.h - ground
        y0 = ground + depth * rng.uniform(0.2, 0.65)
        y1 = min(c.h + 2, y0 + max(10, depth * rng.uniform(0.15, 0.3)))
        c.shape("rectangle", (-2, y0, c.w + 2, y1), colour)
        if rng.random() < 0.85:  # dashed centre line
            dash = c.w * rng.uniform(0.04, 0.08)
            gap = rng.uniform(0.6, 1.2)
            thick = (y1 - y0) * rng.uniform(0.05, 0.09)
            ym = (y0 + y1) / 2
            x = rng.uniform(-dash, 0)
            while x < c.w:
                c.line([(x, ym), (x + dash, ym)], mark, thick)
                x += dash * (1 + gap)
        # the heldout hand also paints edge lines
        if hand.roads != ("band",) and rng.random() < 0.6:
            for y in (y0 + (y1 - y0) * 0.08, y1 - (y1 - y0) * 0.08):
                c.line([(-2, y), (c.w + 2, y)], mark, max(0.8, (y1 - y0) * 0.03))

        def band_base():
            return y0 + (y1 - y0) * rng.uniform(0.55, 0.95), rng.uniform(0, c.w)

        return (y0, y1), band_base

    # perspective: a trapezoid from the bottom edge to a vanishing point on the horizon
    bottom_x = c.w * rng.uniform(0.3, 0.7)
    half = c.w * rng.uniform(0.2, 0.4)
    top_x = c.w * rng.uniform(0.35, 0.65)
    top_y = ground + 1
    top_half = c.w * rng.uniform(0.01, 0.03)
    c.shape(
        "polygon",
        [
            (top_x - top_half, top_y),
            (top_x + top_half, top_y),
            (bottom_x + half, c.h + 2),
            (bottom_x - half, c.h + 2),
        ],
        colour,
    )

    def at(t):  # t = 0 at the horizon, 1 at the bottom edge -> (y, centre x, half width)
        return (
            top_y + t * (c.h + 2 - top_y),
            top_x + t * (bottom_x - top_x),
            top_half + t * (half - top_half),
        )

    t = 0.05
    while t < 1:  # centre dashes that grow towards the viewer
        ya, xa, ha = at(t)
        yb, xb, _ = at(t + 0.05 + 0.05 * t)
        c.line([(xa, ya), (xb, yb)], mark, max(0.6, 0.06 * ha))
        t += 0.12 + 0.12 * t

    def base():
        y, x, h = at(rng.uniform(0.5, 0.95))
        return y, x + rng.uniform(-0.6, 0.6) * h

    return (at(0.5)[0], c.h), base


def draw_house(c, rng, hand, cx, base, width):
    roof = hand.roofs[rng.integers(len(hand.roofs))]
    name, wall = sample_colour(rng, WALL_COLOURS, hand)
    roof_colour = sample_colour(rng, ROOF_COLOURS, hand)[1]
    door = sample_colour(rng, DOOR_COLOURS, hand)[1]
    window = sample_colour(rng, WINDOW_COLOURS, hand)[1]
    c.begin(HOUSE, outline=outline_width(rng, hand), colour=name, kind=roof)
    x0, x1 = cx - width / 2, cx + width / 2
    top = base - width * rng.uniform(*hand.stories)
    over = width * rng.uniform(0.0, 0.1)
    if roof == "gable":
        rise = width * rng.uniform(0.25, 0.55)
        if rng.random() < 0.4:  # a chimney, behind the roof
            chx = x0 + width * rng.uniform(0.6, 0.75)
            c.shape(
                "rectangle",
                (chx, top - rise * 0.85, chx + width * 0.09, top - rise * 0.2),
                shade(wall, 0.8),
            )
        c.shape("rectangle", (x0, top, x1, base), wall)
        c.shape("polygon", [(x0 - over, top), (cx, top - rise), (x1 + over, top)], roof_colour)
    elif roof == "hip":
        rise = width * rng.uniform(0.15, 0.3)
        inset = width * rng.uniform(0.15, 0.35)
        c.shape("rectangle", (x0, top, x1, base), wall)
        c.shape(
            "polygon",
            [
                (x0 - over, top),
                (x0 + inset, top - rise),
                (x1 - inset, top - rise),
                (x1 + over, top),
            ],
            roof_colour,
        )
    else:  # flat roof: a slab with an overhang
        c.shape("rectangle", (x0, top, x1, base), wall)
        c.shape(
            "rectangle",
            (x0 - over, top - width * rng.uniform(0.05, 0.1), x1 + over, top + 1),
            roof_colour,
        )
    dw, dh = width * rng.uniform(0.14, 0.22), (base - top) * rng.uniform(0.4, 0.6)
    dx = rng.uniform(x0 + 0.08 * width, x1 - 0.08 * width - dw)
    if hand.roofs == ("gable",) or rng.random() < 0.5:
        c.shape("rectangle", (dx, base - dh, dx + dw, base), door)
    else:  # an arched door
        c.shape("rectangle", (dx, base - dh + dw / 2, dx + dw, base), door)
        c.shape("ellipse", (dx, base - dh, dx + dw, base - dh + dw), door)
    size = width * rng.uniform(0.12, 0.2)
    n_rows = 1 if base - top < 1.6 * size + dh else int(rng.integers(1, 3))
    for row in range(n_rows):
        if n_rows > 1:
            wy = top + (base - top) * (0.2 + 0.35 * row)
        else:
            wy = top + (base - top - dh) * 0.5 - size / 2 + 2
        for wx in np.linspace(x0 + 0.1 * width, x1 - 0.1 * width - size, int(rng.integers(1, 4))):
            if row == n_rows - 1 and wx < dx + dw + 2 and dx - 2 < wx + size:
                continue  # no window over the door
            if hand.roofs != ("gable",) and rng.random() < 0.3:
                c.shape("ellipse", (wx, wy, wx + size, wy + size), window)
                continue
            c.shape("rectangle", (wx, wy, wx + size, wy + size), window)
            if rng.random() < (0.3 if hand.roofs == ("gable",) else 0.6):  # window bars
                bar = shade(window, 0.6)
                bar_width = max(0.6, size * 0.08)
                c.line([(wx + size / 2, wy), (wx + size / 2, wy + size)], bar, bar_width)
                c.line([(wx, wy + size / 2), (wx + size, wy + size / 2)], bar, bar_width)


def draw_tree(c, rng, hand, cx, base, height):
    kind = hand.trees[rng.integers(len(hand.trees))]
    autumn = kind != "pine" and rng.random() < 0.08  # evergreens stay green
    name, canopy = sample_colour(rng, AUTUMN_COLOURS if autumn else CANOPY_COLOURS, hand)
    trunk = sample_colour(rng, TRUNK_COLOURS, hand)[1]
    c.begin(TREE, outline=outline_width(rng, hand), colour=name, kind=kind)
    if kind == "blobs":  # a rectangular trunk under a canopy of 1-4 ellipses
        tw, th = height * rng.uniform(0.07, 0.12), height * rng.uniform(0.35, 0.5)
        c.shape("rectangle", (cx - tw / 2, base - th, cx + tw / 2, base), trunk)
        r = height * rng.uniform(0.24, 0.32)
        ccx, ccy = cx + rng.uniform(-0.1, 0.1) * r, base - height + r
        blobs = [(ccx, ccy, r, r * rng.uniform(0.85, 1.1))]
        for _ in range(int(rng.integers(0, 4))):
            a = rng.uniform(np.pi * 0.9, np.pi * 2.1)  # around the sides and top of the canopy
            rb = r * rng.uniform(0.5, 0.8)
            bx = ccx + np.cos(a) * r * 0.7
            by = ccy + np.sin(a) * r * 0.5
            blobs.append((bx, by, rb, rb * rng.uniform(0.8, 1.1)))
        varied = rng.random() < 0.3
        for x, y, rx, ry in blobs:
            colour = shade(canopy, rng.uniform(0.85, 1.0)) if varied else canopy
            c.shape("ellipse", (x - rx, y - ry, x + rx, y + ry), colour)
    elif kind == "pine":  # a short trunk under 2-4 stacked triangles
        tw, th = height * rng.uniform(0.08, 0.12), height * rng.uniform(0.12, 0.2)
        c.shape("rectangle", (cx - tw / 2, base - th, cx + tw / 2, base), trunk)
        tiers = int(rng.integers(2, 5))
        half = height * rng.uniform(0.22, 0.3)
        tier_h = (height - th) / (tiers * 0.7 + 0.3)
        for k in range(tiers):
            bottom = base - th - k * tier_h * 0.7 + tier_h * 0.15
            hw = half * (1 - 0.2 * k)
            c.shape(
                "polygon", [(cx - hw, bottom), (cx + hw, bottom), (cx, bottom - tier_h)], canopy
            )
    else:  # round: a tapered trunk and one round crown with highlights
        tw, th = height * rng.uniform(0.07, 0.11), height * rng.uniform(0.35, 0.5)
        c.shape(
            "polygon",
            [
                (cx - tw * 0.7, base),
                (cx + tw * 0.7, base),
                (cx + tw * 0.35, base - th),
                (cx - tw * 0.35, base - th),
            ],
            trunk,
        )
        rx = height * rng.uniform(0.22, 0.3)
        ry = rx * rng.uniform(1.0, 1.3)
        cy = base - height + ry
        c.shape("ellipse", (cx - rx, cy - ry, cx + rx, cy + ry), canopy)
        for _ in range(int(rng.integers(0, 3))):
            hx = cx + rng.uniform(-0.5, 0.3) * rx
            hy = cy + rng.uniform(-0.6, 0.2) * ry
            hr = rx * rng.uniform(0.12, 0.2)
            light = shade(canopy, 1.25)
            c.shape("ellipse", (hx - hr, hy - hr, hx + hr, hy + hr), light, outline=False)


def draw_car(c, rng, hand, cx, base, length):
    kind = hand.cars[rng.integers(len(hand.cars))]
    name, body = sample_colour(rng, CAR_COLOURS, hand)
    glass = sample_colour(rng, WINDOW_COLOURS, hand, "light blue")[1]
    tyre = sample_colour(rng, TYRE_COLOURS, hand)[1]
    hub = sample_colour(rng, HUB_COLOURS, hand)[1]
    c.begin(CAR, outline=outline_width(rng, hand), colour=name, kind=kind)
    face = rng.choice((-1.0, 1.0))  # +1 faces right

    def X(o):  # a position along the car, -0.5 (back) .. 0.5 (front)
        return cx + face * o * length

    wheel = length * rng.uniform(0.09, 0.12)
    bottom = base - wheel * 0.6
    if kind == "sedan":  # a low body and a trapezoid cabin with two panes
        top = bottom - length * rng.uniform(0.18, 0.25)
        c.shape("rounded_rectangle", (X(-0.5), top, X(0.5), bottom), body, radius=length * 0.05)
        roof = top - length * rng.uniform(0.15, 0.21)
        back = rng.uniform(0.25, 0.35)
        front = rng.uniform(0.15, 0.25)
        c.shape(
            "polygon",
            [
                (X(-back - 0.1), top + 1),
                (X(-back), roof),
                (X(front), roof),
                (X(front + 0.12), top + 1),
            ],
            body,
        )
        for a, b in ((-back + 0.02, -0.03), (0.02, front)):
            c.shape(
                "polygon",
                [
                    (X(a - 0.05), top),
                    (X(a), roof + 2),
                    (X(b), roof + 2),
                    (X(b + 0.05 if b == front else b), top),
                ],
                glass,
                outline=False,
            )
        c.shape(
            "rectangle",
            (X(0.47), top + 2, X(0.5), top + 2 + length * 0.04),
            (250, 230, 120),
            outline=False,
        )
    elif kind == "van":  # a tall box, windscreen at the front, side windows
        top = bottom - length * rng.uniform(0.38, 0.48)
        c.shape("rounded_rectangle", (X(-0.5), top, X(0.5), bottom), body, radius=length * 0.06)
        h = bottom - top
        c.shape(
            "polygon",
            [
                (X(0.32), top + h * 0.1),
                (X(0.46), top + h * 0.1),
                (X(0.49), top + h * 0.45),
                (X(0.32), top + h * 0.45),
            ],
            glass,
            outline=False,
        )
        for k in range(int(rng.integers(1, 4))):
            a = -0.42 + k * 0.24
            c.shape(
                "rectangle",
                (X(a), top + h * 0.12, X(a + 0.18), top + h * 0.42),
                glass,
                outline=False,
            )
    else:  # beetle: a half-ellipse body on a low base
        h = length * rng.uniform(0.35, 0.45)
        # the top half of an ellipse: its flat side at `bottom`
        c.shape("chord", (X(-0.5), bottom - h, X(0.5), bottom + h), body, start=180, end=360)
        c.shape(
            "rounded_rectangle",
            (X(-0.52), bottom - h * 0.3, X(0.52), bottom),
            body,
            radius=h * 0.12,
        )
        c.shape(
            "chord",
            (X(-0.28), bottom - h * 0.82, X(0.28), bottom - h * 0.08),
            glass,
            outline=False,
            start=180,
            end=360,
        )
    for o in (-0.3, 0.3):
        x = X(o * rng.uniform(0.95, 1.1))
        c.shape("ellipse", (x - wheel, base - 2 * wheel, x + wheel, base), tyre)
        c.shape(
            "ellipse",
            (x - wheel * 0.45, base - wheel * 1.45, x + wheel * 0.45, base - wheel * 0.55),
            hub,
            outline=False,
        )
