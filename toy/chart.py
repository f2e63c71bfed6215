"""A line chart drawn with PIL alone, for the toy world's curves (toy.claims' forgetting curve).

The repository has no plotting library among its requirements, and a curve needs little: a frame
with ticks and labels on both axes, one polyline per series with a dot at each measured point,
dashed horizontal lines for reference levels, and a legend. Lines are drawn without antialiasing,
so every series keeps its exact colour (the tests look for it).

Coordinates: data (x, y) -> pixels (u, v), u to the right, v downwards.
"""

import math

from PIL import Image, ImageDraw, ImageFont

SIZE = (720, 420)  # width, height of the whole picture, px
MARGINS = {"left": 64, "right": 190, "top": 36, "bottom": 52}  # the legend sits in the right one
DASH = (8, 6)  # px drawn, px skipped along a dashed line


def nice_ticks(low, high, count=6):
    """Round tick values covering [low, high]: a step of 1, 2 or 5 times a power of ten, chosen so
    that about `count` ticks fit -> the list of ticks (first <= low, last >= high, at least two)."""
    if high - low < 1e-9:  # a single value: a unit span around it
        low = low - 1
        high = high + 1
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step)
    last = math.ceil(high / step)
    return [round(k * step, 10) for k in range(first, last + 1)]


def tick_text(value):
    return f"{value:g}"


def dashed_hline(draw, u0, u1, v, colour, width=2):
    """A horizontal dashed line from u0 to u1 at height v."""
    u = u0
    while u < u1:
        draw.line((u, v, min(u + DASH[0], u1), v), fill=colour, width=width)
        u += DASH[0] + DASH[1]


def line_chart(series, levels=(), title="", x_label="", y_label="", size=SIZE):
    """series: [{"label", "x": [...], "y": [...], "colour": (r, g, b)}], each drawn as a polyline
    with a dot per point; levels: [{"label", "y", "colour"}], each a dashed line across the plot.
    Each axis spans every value given, out to the round ticks around them. -> a PIL RGB image of
    `size`."""
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left = MARGINS["left"]
    right = width - MARGINS["right"]
    top = MARGINS["top"]
    bottom = height - MARGINS["bottom"]
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for y in s["y"]] + [level["y"] for level in levels]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x_lo = x_ticks[0]
    x_hi = x_ticks[-1]
    y_lo = y_ticks[0]
    y_hi = y_ticks[-1]

    def to_pixel(x, y):
        u = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        v = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return u, v

    # the frame, a light grid at every tick, the tick labels
    grid = (225, 225, 225)
    for x in x_ticks:
        u, _ = to_pixel(x, y_lo)
        draw.line((u, top, u, bottom), fill=grid)
        draw.line((u, bottom, u, bottom + 4), fill="black")
        draw.text((u, bottom + 7), tick_text(x), fill="black", font=font, anchor="mt")
    for y in y_ticks:
        _, v = to_pixel(x_lo, y)
        draw.line((left, v, right, v), fill=grid)
        draw.line((left - 4, v, left, v), fill="black")
        draw.text((left - 7, v), tick_text(y), fill="black", font=font, anchor="rm")
    draw.rectangle((left, top, right, bottom), outline="black")
    # the axis labels and the title; the y label is drawn flat, then turned upright
    draw.text(((left + right) / 2, height - 14), x_label, fill="black", font=font, anchor="mm")
    draw.text(((left + right) / 2, top / 2), title, fill="black", font=font, anchor="mm")
    label_box = draw.textbbox((0, 0), y_label, font=font)
    flat = Image.new("RGB", (label_box[2] + 4, label_box[3] + 4), "white")
    ImageDraw.Draw(flat).text((2, 2), y_label, fill="black", font=font)
    upright = flat.rotate(90, expand=True)
    img.paste(upright, (8, int((top + bottom - upright.height) / 2)))
    # the reference levels, then the series over them
    for level in levels:
        _, v = to_pixel(x_lo, level["y"])
        dashed_hline(draw, left + 1, right - 1, v, level["colour"])
    for s in series:
        points = [to_pixel(x, y) for x, y in zip(s["x"], s["y"])]
        draw.line(points, fill=s["colour"], width=3)
        for u, v in points:
            draw.ellipse((u - 4, v - 4, u + 4, v + 4), fill=s["colour"])
    # the legend, right of the plot: a line sample (dashed for levels) and the label
    v = top + 8
    for entry in [*series, *levels]:
        u = right + 14
        if "x" in entry:
            draw.line((u, v, u + 26, v), fill=entry["colour"], width=3)
        else:
            dashed_hline(draw, u, u + 26, v, entry["colour"])
        draw.text((u + 34, v), entry["label"], fill="black", font=font, anchor="lm")
        v += 20
    return img
