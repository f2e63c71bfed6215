"""Segment an image by text with a merged SAM-CLIP model (SAM-CLIP Sec. 4.2, 4.4, App. C).

    python segment_demo.py assets/example.jpg "house" "tree" "sky"                # sam mode
    python segment_demo.py assets/example.jpg "house" "tree" --mode clip --out out/clip_demo

The default checkpoint, runs/toy/samclip.pt, is what the README's main job
`python -m toy.prepare && python train.py --preset toy --out runs/toy` writes (SAM-CLIP merged
from the shipped toy teachers in a few CPU minutes: it segments toy-world scenes such as
assets/example.jpg by the words sky, sun, cloud, grass, road, house, tree and car); give a merged
model trained from the real SAM and CLIP with --checkpoint.

Two modes, both implemented in zero_shot.py (`zero_shot.segment_by_text`); this script only reads
the inputs, calls it and writes the pictures:
  - clip: the paper's zero-shot semantic segmentation (Sec. 4.2). The image is squeezed to
    448 x 448, HeadCLIP's 28 x 28 patch embeddings are compared with each prompt's text
    embedding (80 templates averaged), the logits are upsampled to the image.
  - sam (default): both heads from one 1024 px forward (Sec. 4.4, App. C, Table 5). HeadCLIP's
    coarse map picks 1 to 3 point prompts per prompt and is the mask prompt; HeadSAM returns a
    sharp mask, pasted back to the original size (SAM's resize and padding undone).
An implicit "background" class competes with the prompts; pixels no prompt wins with >= 0.5 are
left unlabelled (see zero_shot.segment_by_text).

Outputs in --out: overlay.png (the image with each prompt's pixels tinted in its own colour and a
legend strip below) and mask_<i>_<slug>.png per prompt (0/255, L mode, the original image size,
after EXIF rotation). Bad inputs (missing or unreadable image, empty or over-long prompt,
missing or wrong checkpoint) end with one line on stderr and exit code 2.

assets/example.jpg (320 x 240) is generated, CC0: a sky, a sun, a house, a tree and a lawn drawn
by `draw_example_scene()` below and saved from the repository root with
    python -c "import segment_demo as s; s.draw_example_scene().save('assets/example.jpg',
    quality=90)"

Shape legend: K prompts, H W original image size.
"""

import argparse
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import weights
import zero_shot
from model import SAMCLIP, autocast, compile_modules, fast_bf16

DEFAULT_CHECKPOINT = os.path.join("runs", "toy", "samclip.pt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Segment an image by text prompts with a merged SAM-CLIP model."
    )
    p.add_argument(
        "image", help="any image PIL opens (grayscale, RGBA, palette, 16-bit, EXIF-rotated)"
    )
    p.add_argument("prompts", nargs="+", help="one or more text prompts, e.g. \"cat\" \"dog\"")
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help="merged SAM-CLIP checkpoint from train.py / SAMCLIP.save "
        f"(default {DEFAULT_CHECKPOINT})",
    )
    p.add_argument(
        "--mode",
        choices=("sam", "clip"),
        default="sam",
        help="sam: both heads at the native size, HeadSAM refines (Table 5); "
        "clip: HeadCLIP alone at 448 px (Sec. 4.2)",
    )
    p.add_argument(
        "--out",
        default=os.path.join("out", "segment_demo"),
        help="folder for overlay.png and the mask PNGs",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="sam mode: point prompts come from cells whose class probability exceeds this "
        "(App. C: 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the point-prompt draw (sam mode)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder blocks and HeadCLIP (a warm-up run compiles them; "
        "time reported)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 where the hardware runs it fast (CUDA compute capability >= 8, CPUs "
        "with AMX or AVX-512 BF16), else fp32",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    return p.parse_args(argv)


def slug(text, n=40):
    """A file-name-safe form of a prompt: 'Red car!' -> 'red-car'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def load_model(path, device):
    if path == DEFAULT_CHECKPOINT and not os.path.isfile(path):
        raise weights.CheckpointError(
            f"no checkpoint at the default {path}: make the toy one with `python -m toy.prepare && "
            "python train.py --preset toy --out runs/toy`, or train a real one (see README) and "
            "pass it with --checkpoint"
        )
    return SAMCLIP.load(path).to(device)


def draw_overlay(img, labels, prompts):
    """img PIL RGB (W, H), labels (H, W) in -1..K-1 -> a new RGB picture: the image with each
    prompt's pixels blended with its colour (zero_shot.paint), and below it a legend strip,
    prompt -> colour."""
    tinted = zero_shot.paint(img, labels)
    font = ImageFont.load_default()
    row = 14  # legend line height, px
    widths = [int(font.getlength(q)) for q in prompts]
    size = (max(img.width, 24 + max(widths)), img.height + 4 + row * len(prompts))
    canvas = Image.new("RGB", size, "white")
    canvas.paste(tinted, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, q in enumerate(prompts):
        y = img.height + 2 + row * k
        colour = tuple(int(c) for c in zero_shot.PALETTE[k])
        draw.rectangle((4, y + 2, 14, y + 12), fill=colour, outline="black")
        draw.text((20, y + 1), q, fill="black", font=font)
    return canvas


def fail(err):
    print(f"segment_demo.py: error: {err}", file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    try:  # every bad input ends here with one line; anything else is a bug and keeps its traceback
        img = data.load_image(args.image)
        zero_shot.check_class_names(args.prompts, what="prompt", first=1)  # before the slow load
        t0 = time.perf_counter()
        model = compile_modules(load_model(args.checkpoint, args.device), args.compile)
        t_load = time.perf_counter() - t0
    except ValueError as e:  # data.ImageError, weights.CheckpointError and prompt errors
        return fail(e)

    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if fast_bf16(args.device) else "fp32"

    def run():
        generator = torch.Generator().manual_seed(args.seed)
        return zero_shot.segment_by_text(
            model, img, args.prompts, mode=args.mode, threshold=args.threshold, generator=generator
        )

    if args.compile:
        t0 = time.perf_counter()
        with autocast(args.device, dtype):
            run()  # compiles on this first call
        print(f"compile: {time.perf_counter() - t0:.1f} s (torch.compile and a first run)")
    t0 = time.perf_counter()
    with autocast(args.device, dtype):
        out = run()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    latency = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    labels = out["labels"]  # (H, W)
    H = img.height
    W = img.width
    auto = " (auto: fast bf16 on this hardware)" if args.dtype == "auto" and dtype == "bf16" else ""
    print(
        f"{args.image}: {W} x {H} px, {args.mode} mode, {dtype}{auto}, "
        f"checkpoint {args.checkpoint}"
    )
    for k, q in enumerate(args.prompts):
        mask = (labels == k).numpy()  # (H, W) bool
        path = os.path.join(args.out, f"mask_{k + 1}_{slug(q)}.png")
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
        area = int(mask.sum())
        print(
            f"  {k + 1}. {q!r}: {area} px ({100 * area / (H * W):.1f}%), confidence "
            f"{float(out['confidence'][k]):.3f} -> {path}"
        )
    overlay = os.path.join(args.out, "overlay.png")
    draw_overlay(img, labels, args.prompts).save(overlay)
    print(f"overlay: {overlay}")
    print(
        f"latency: {latency * 1000:.0f} ms for segmentation on {args.device} "
        f"(model load {t_load * 1000:.0f} ms, not included)"
    )
    return 0


def draw_example_scene(width=320, height=240):
    """The example picture of assets/example.jpg: a sky gradient, a sun, a lawn, a red house with
    a brown roof and a door, and a tree. Plain PIL drawing, so it is ours to redistribute (CC0)."""
    sky = np.linspace([120, 170, 235], [200, 225, 250], height)  # (H, 3), top to bottom
    sky = np.repeat(sky[:, None], width, axis=1)  # (H, 1, 3) -> (H, W, 3)
    img = Image.fromarray(sky.round().astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = width / 320  # every coordinate below is for 320 x 240
    d.rectangle((0, 150 * s, width, height), fill=(70, 150, 60))  # lawn
    d.ellipse((250 * s, 20 * s, 290 * s, 60 * s), fill=(250, 210, 60))  # sun
    d.rectangle((60 * s, 100 * s, 160 * s, 175 * s), fill=(190, 50, 45))  # house walls
    roof = [(50 * s, 102 * s), (110 * s, 60 * s), (170 * s, 102 * s)]
    d.polygon(roof, fill=(110, 60, 40))  # roof
    d.rectangle((98 * s, 135 * s, 120 * s, 175 * s), fill=(80, 50, 30))  # door
    d.rectangle((125 * s, 115 * s, 148 * s, 135 * s), fill=(200, 230, 250))  # window
    d.rectangle((222 * s, 120 * s, 236 * s, 185 * s), fill=(100, 70, 40))  # trunk
    d.ellipse((195 * s, 70 * s, 263 * s, 135 * s), fill=(40, 110, 40))  # crown
    return img


if __name__ == "__main__":
    sys.exit(main())
