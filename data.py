"""Data for SAM-CLIP (Sec. 3 and 4.1): images in, model-ready tensors out.

Sections, in the order a sample meets them:
  1. Images: open any file PIL reads (EXIF rotation applied; grayscale, palette, RGBA, 16-bit
     converted to 8-bit RGB) and the two normalisations of the two teachers: SAM's (resize the
     longest side to 1024, mean/std on the 0-255 scale, pad bottom-right) and CLIP's.
  2. D_CLIP (Sec. 3, Eq. 1): unlabeled images from a folder or a list file; one random crop per
     sample, seen by the student at the step's resolution and by the CLIP teacher at 224 px.
  3. D_SAM (Sec. 3, Eq. 2): SA-1B images and their masks (COCO run-length encoding, decoded here
     without pycocotools); every chosen mask becomes a point or box prompt, as in SAM's training.
  4. Batch samplers (Sec. 4.1): the variable-resolution sampler of CVNets/MobileViT (Mehta et al.)
     for D_CLIP and a fixed-size one for D_SAM, both split across ranks and resumable mid-epoch.
  5. The stream of batches training reads: epochs in a fixed (seed, epoch) order, resumable at any
     micro-batch, and the on-disk cache of CLIP-teacher embeddings (--cache-teacher).

A sample whose file is unreadable or corrupt (an image PIL cannot decode, an SA-1B annotation
file that is not JSON or breaks the schema SA1B reads) does not raise: it comes back as zeros of
the right shapes with ok=False, so every rank keeps the same batch size, and the training loop
masks it out of the loss. Only those two errors, ImageError and BadAnnotation, are caught: any
other exception is a bug in our code and stops the run rather than silently dropping data.

Shape legend: H W image height and width, S square side, K prompts (masks) per image, P points per prompt, B batch.
"""

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

import clip

# ----------------------------------------------------------------------------- 1. images

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)   # SAM's normalisation, on the 0-255 scale
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable or of an unsupported kind."""


def load_image(path):
    """Open `path` as an 8-bit RGB PIL image, whatever its mode: EXIF orientation applied;
    16-bit images rescaled from 0-65535 (32-bit integer ones too when they exceed 255, float
    ones from 0-1) to 0-255; grayscale, palette and alpha images converted (alpha dropped).
    Raises ImageError for a missing file or one PIL cannot decode. Only PIL's open and decode
    run inside the try, and those four exception types are how PIL reports a corrupt or truncated
    file (SyntaxError for some broken PNG chunks, ValueError for bad decoder arguments), so a bug
    in the conversions below still raises as itself."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{path}: not a readable image ({reason})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float single channel
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")
    return img


def to_tensor(img):
    """PIL RGB -> float32 tensor (3, H, W) on the 0-255 scale."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()  # (H,W,3) -> (3,H,W)


def preprocess_shape(h, w, long_side):
    """SAM's ResizeLongestSide: the (h', w') with max(h', w') = long_side and the aspect kept."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def normalize_sam(x):
    """(..., 3, H, W) on 0-255 -> SAM's normalised input."""
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def normalize_clip(x):
    """(..., 3, H, W) on 0-255 -> CLIP's normalised input (mean/std on the 0-1 scale)."""
    mean = torch.tensor(clip.CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(clip.CLIP_STD, device=x.device).view(3, 1, 1)
    return (x / 255.0 - mean) / std


def sam_preprocess(img, size=1024):
    """SAM's input pipeline (segment_anything's predictor): resize the longest side to `size`
    (PIL bilinear), normalise, pad bottom-right with zeros to (size, size).
    Returns (x (3, size, size), (h', w') the resized image's size inside the padded frame)."""
    h, w = preprocess_shape(img.height, img.width, size)
    x = normalize_sam(to_tensor(img.resize((w, h), Image.BILINEAR)))   # (3, h', w')
    return F.pad(x, (0, size - w, 0, size - h)), (h, w)                # (3, size, size)


def square_resize(img, size, normalize=normalize_sam):
    """Resize the whole image to (size, size) (bicubic; the aspect is not kept, as in the paper's
    448 x 448 zero-shot segmentation protocol) and normalise: (3, size, size)."""
    return normalize(to_tensor(img.resize((size, size), Image.BICUBIC)))


def to_device(batch, device):
    """A collated batch's tensors to `device` (the rest, e.g. paths, as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _seed(*parts):
    """One 63-bit seed from a tuple of non-negative ints, e.g. (seed, epoch, index): the same on
    every machine and run (unlike Python's hash of a str), and well mixed, so neighbouring
    indices or epochs do not get correlated random streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- 2. D_CLIP (Eq. 1)

def list_images(source):
    """`source`: a folder (searched recursively for IMAGE_EXTENSIONS, any case) or a text file with
    one image path per line (relative paths are taken from the list file's folder; blank lines and
    lines starting with # are skipped). -> sorted paths for a folder, the file's order for a list."""
    if os.path.isdir(source):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            paths = [os.path.join(base, p) for p in (line.strip() for line in f) if p and not p.startswith("#")]
    else:
        raise ValueError(f"image source {source!r} does not exist: expected a folder of images or a text file "
                         "of image paths")
    if not paths:
        raise ValueError(f"image source {source!r} holds no images: expected {'/'.join(IMAGE_EXTENSIONS)} files "
                         "in the folder (recursively) or one path per line in the list file")
    return paths


def random_resized_crop_box(h, w, g, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """The crop box (left, top, right, bottom) of torchvision's RandomResizedCrop: area a uniform
    fraction `scale` of the image, log-uniform aspect in `ratio`; 10 tries, then a centre crop."""
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).item())
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, (1,), generator=g).item()
            left = torch.randint(0, w - cw + 1, (1,), generator=g).item()
            return left, top, left + cw, top + ch
    cw, ch = (w, min(h, round(w / ratio[0]))) if w / h < ratio[0] else (min(w, round(h * ratio[1])), h)
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


class CLIPImages(torch.utils.data.Dataset):
    """D_CLIP for L_CLIP (Eq. 1): the student and the frozen CLIP teacher must see the SAME view of
    an image, so one crop is drawn and resized twice: to the step's resolution with SAM's
    normalisation for the student, to `teacher_size` (CLIP ViT-L/14's native 224) with CLIP's.
    At the encoder's native side (`native_size`, 1024 for ViT-B) the student sees the crop as SAM's
    inference does (sam_preprocess: longest side resized, zero padding bottom-right), because the
    only 1024 px user of HeadCLIP (Table 5, both heads from one forward) feeds that geometry; below
    it the crop is squashed to a square, as the 448 px zero-shot protocol feeds. The teacher always
    gets its square view of the same crop. The crop, RandomResizedCrop with scale 0.5-1 and aspect
    3/4-4/3, is not stated in the paper.

    Items are `(index, resolution, epoch)` tuples, as VariableResolutionSampler yields them (a plain
    index means (index, teacher_size, 0)). The crop comes from a generator seeded with
    (seed, epoch, index): the same sample gives the same crop in any worker and after a resume.
    -> {"student" (3, r, r), "teacher" (3, T, T), "index", "ok", "path"}; ok=False and zeros for an
    unreadable image. Skipped samples are not counted here: the loop counts (~batch["ok"]).sum()."""

    def __init__(self, source, teacher_size=224, seed=0, scale=(0.5, 1.0), fixed_crops=False, native_size=None):
        self.source, self.paths = source, list_images(source)
        self.teacher_size, self.seed, self.scale, self.native_size = teacher_size, seed, scale, native_size
        self.fixed_crops = fixed_crops   # draw every epoch's crop as epoch 0 does (train.py's teacher cache)

    def check_readable(self, min_images=1, tries=16):
        """Raise ValueError when the source holds fewer than `min_images` (one training step's worth:
        no epoch would hold a step) or none of `tries` images spread over the list can be read: a
        source of unreadable files would otherwise train on nothing but placeholders."""
        if len(self.paths) < min_images:
            raise ValueError(f"image source {self.source!r} holds {len(self.paths)} images; one training step "
                             f"takes {min_images} (--clip-batch)")
        picks = range(0, len(self.paths), max(1, len(self.paths) // tries))[:tries]   # spread over the list
        errors = []
        for i in picks:
            try:
                load_image(self.paths[i])
                return
            except ImageError as e:
                errors.append(str(e))
        raise ValueError(f"image source {self.source!r}: none of the {len(picks)} images tried could be read "
                         f"(e.g. {errors[0]}); expected image files PIL can open")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, resolution, epoch = item if isinstance(item, tuple) else (item, self.teacher_size, 0)
        path, T = self.paths[index], self.teacher_size
        try:
            img = load_image(path)
        except ImageError:
            return {"student": torch.zeros(3, resolution, resolution), "teacher": torch.zeros(3, T, T),
                    "index": index, "ok": False, "path": path}
        g = torch.Generator().manual_seed(_seed(self.seed, 0 if self.fixed_crops else epoch, index))
        box = random_resized_crop_box(img.height, img.width, g, self.scale)
        if resolution == self.native_size:                                        # SAM's inference geometry
            student, _ = sam_preprocess(img.crop(box), resolution)                 # (3, r, r), zero-padded
        else:
            student = normalize_sam(to_tensor(img.resize((resolution, resolution), Image.BICUBIC, box=box)))
        teacher = img.resize((T, T), Image.BICUBIC, box=box)                       # crop + resize in one
        return {"student": student, "teacher": normalize_clip(to_tensor(teacher)),
                "index": index, "ok": True, "path": path}


def collate(samples):
    """CLIPImages samples (one resolution per batch) -> {"student" (B, 3, r, r), "teacher"
    (B, 3, T, T), "index" (B,) int64, "ok" (B,) bool, "bad_paths" [paths of the ok=False ones]}."""
    return {"student": torch.stack([s["student"] for s in samples]),
            "teacher": torch.stack([s["teacher"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "ok": torch.tensor([s["ok"] for s in samples], dtype=torch.bool),
            "bad_paths": [s["path"] for s in samples if not s["ok"]]}


# ----------------------------------------------------------------------------- 3. D_SAM (Eq. 2)

class BadAnnotation(ValueError):
    """An SA-1B annotation file that cannot be used: unreadable, not JSON, or a field SA1B reads
    missing or ill-typed (read_sa1b_annotations), or a run-length encoding that does not decode."""


def rle_decode(rle, shape=None):
    """COCO run-length encoding -> bool mask (h, w). `rle["counts"]` is either a list of ints or
    COCO's compressed string (SA-1B's form); `shape` stands in for a missing `rle["size"]`.
    Counts are run lengths over the mask read column by column (Fortran order), zeros first.
    The string form is pycocotools' rleFrString: each char minus 48 carries 5 bits of a number,
    least significant first, with 0x20 meaning "more chars follow"; bit 0x10 of the last char is
    the sign; from the fourth count on, a number is stored as the difference to counts[i - 2]."""
    h, w = rle.get("size") or shape
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        s = counts.encode() if isinstance(counts, str) else counts
        counts, p = [], 0
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                if p == len(s):
                    raise BadAnnotation(f"RLE string of {len(s)} chars ends inside a number")
                c = s[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more, p, k = bool(c & 0x20), p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)                    # sign-extend a negative number
            counts.append(x + counts[-2] if len(counts) > 2 else x)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise BadAnnotation(f"RLE counts hold a negative run ({counts.min()}), expected runs >= 0")
    if counts.sum() != h * w:
        raise BadAnnotation(f"RLE counts sum to {counts.sum()}, expected h*w = {h}*{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)    # runs alternate 0, 1, 0, ...
    return np.ascontiguousarray(flat.reshape(w, h).T)             # column-major: (w, h) -> (h, w)


def rle_encode(mask):
    """bool mask (h, w) -> {"size": [h, w], "counts": str}, pycocotools' rleToString form."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)              # (h, w) -> (w*h,) column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs                                          # counts always start with zeros
    chars = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:
            c, x = x & 0x1F, x >> 5                                # Python's >> is arithmetic, as in C
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": [h, w], "counts": "".join(chars)}


def find_sa1b(root):
    """Sorted (image, json) pairs `sa_*.jpg` + `sa_*.json` under `root`, recursively."""
    pairs = sorted((os.path.join(d, f), os.path.join(d, f[:-4] + ".json")) for d, _, files in os.walk(root)
                   for f in files if f.startswith("sa_") and f.lower().endswith(".jpg") and f[:-4] + ".json" in files)
    if not pairs:
        raise ValueError(f"SA-1B root {root!r} holds no data: expected sa_*.jpg images, each beside a "
                         "matching sa_*.json annotation file (sub-folders allowed)")
    return pairs


def read_sa1b_annotations(path, image_hw):
    """The masks of one SA-1B annotation file, checked against the schema SA1B reads:
        {"annotations": [{"segmentation": {"size": [h, w], "counts": str | [int >= 0, ...]}}, ...]}
    with [h, w] the image's size (image_hw) as two integers, and counts COCO's compressed string
    (SA-1B's form) or a list of run lengths. Other fields (bbox, point_coords, area, ...) are
    not read, so not checked: SA1B takes boxes and points from the masks themselves. Whether the
    runs sum to h * w is checked by rle_decode when a mask is decoded.
    -> list of the "segmentation" dicts. Raises BadAnnotation, one line naming the file and what
    was expected, so that a bad file is told apart from a bug in our code (which must raise)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadAnnotation(f"{path}: not a readable JSON file ({e})") from None
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise BadAnnotation(f'{path}: expected a JSON object with an "annotations" list')
    h, w = image_hw
    rles = []
    for i, ann in enumerate(anns):
        rle = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise BadAnnotation(f'{path}: annotations[{i}] has no "segmentation" object with '
                                '"size" and "counts"')
        size, counts = rle["size"], rle["counts"]
        two_ints = isinstance(size, list) and [type(v) for v in size] == [int, int]
        if not (two_ints and size == [h, w]):
            raise BadAnnotation(f"{path}: annotations[{i}]: segmentation size {size!r}, expected "
                                f"the image's [h, w] = [{h}, {w}]")
        runs = isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)
        if not (isinstance(counts, str) or runs):
            raise BadAnnotation(f"{path}: annotations[{i}]: segmentation counts {_head(counts)}, "
                                "expected a COCO RLE string or a list of non-negative integers")
        rles.append(rle)
    return rles


def _head(value, n=40):
    """repr(value) cut to n characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


MAX_BOX_JITTER = 20.0   # px in SAM's 1024 frame (SAM paper Sec. A, "to a maximum of 20 pixels")
SAM_POINT_ROUNDS = 8    # SAM App. A: after the first prompt, 8 rounds each add a point from the error region
LOW_RES_STRIDE = 4      # input pixels per cell of SAM's low-res mask logits (256 x 256 for a 1024 frame)


def low_res_cells(original_hw, resized_hw, side):
    """(rows, cols) of the original image under the centres of SAM's low-res cells inside the resized (h', w')."""
    centres = (np.arange(side // LOW_RES_STRIDE) + 0.5) * LOW_RES_STRIDE   # cell centres, resized frame
    return tuple(np.floor(centres[centres < r] * o / r).astype(np.int64) for o, r in zip(original_hw, resized_hw))


class SA1B(torch.utils.data.Dataset):
    """D_SAM for L_SAM (Eq. 2): an SA-1B image in SAM's 1024 px frame and K of its masks turned
    into prompts g, as in SAM's training (SAM Sec. A): with probability `point_prob` 1..P foreground
    points drawn uniformly from the mask, else the mask's box, each coordinate moved by
    N(0, (box_jitter * side)^2) noise capped at 20 px. The targets of Eq. 2 are the frozen SAM's
    logits z for the same prompts; the masks come along only on SAM's low-res grid ("gt_masks"),
    because SAM's follow-up rounds (train.sam_teacher_targets) draw their next point from the error
    region between the previous prediction and the ground truth. A cell (r, c) of that grid is the
    original pixel under its centre, ((c + 0.5) * 4, (r + 0.5) * 4) in the resized frame; cells
    whose centre falls in the padding are 0. "error_draws" are the uniform numbers that place those
    follow-up points, drawn here so that they too come from the sample's own generator.

    Items are `(index, epoch)` tuples as FixedBatchSampler yields them (a plain index means epoch 0);
    all random choices come from a generator seeded with (seed, epoch, index).
    Coordinates are (x, y) in the resized frame and follow SAM's PromptEncoder, which adds 0.5
    (pixel index -> centre): a point is the pixel centre minus 0.5, a box is the mask's pixel
    extent [x0, x1) scaled (SA-1B's XYWH -> x0, y0, x0 + w, y0 + h).

    Points and boxes are different token counts in SAM's prompt encoder (a point-only prompt gets
    one extra padding token; a box is two corner tokens), so they cannot share one call: has_box
    tells the training loop which rows go to the box call and which to the points call. Point
    prompts are padded to P with label -1, SAM's own padding token; teacher and student see the
    same tokens, which is all distillation needs.
    -> {"image" (3, S, S), "input_size" (2,) h' w', "original_size" (2,) h w, "point_coords" (K, P, 2),
        "point_labels" (K, P) int64 (1 fg, -1 pad), "boxes" (K, 4) x0 y0 x1 y1, "has_box" (K,),
        "gt_masks" (K, S/4, S/4) bool, "error_draws" (K, SAM_POINT_ROUNDS) in [0, 1), "valid" (K,),
        "num_prompts", "index", "ok", "path"}; rows past num_prompts are padding.
    A pair whose image PIL cannot decode or whose JSON breaks the schema of read_sa1b_annotations
    comes back as placeholder(index) (ok=False), counted in self.skipped with a warning line
    naming the file; any other exception is a bug and propagates."""

    def __init__(self, root, img_size=1024, masks_per_image=32, box_jitter=0.1, point_prob=0.5,
                 max_points=3, seed=0):
        self.pairs = find_sa1b(root)
        self.img_size, self.K, self.P = img_size, masks_per_image, max_points
        self.box_jitter, self.point_prob, self.seed = box_jitter, point_prob, seed
        # Samples skipped for an unreadable image or a bad annotation file, in this process. A
        # DataLoader worker counts in its own copy, so a loop with workers counts ~batch["ok"]
        # and batch["bad_paths"] instead (collate_sam), as EpochTally does for D_CLIP.
        self.skipped = 0

    def __len__(self):
        return len(self.pairs)

    def placeholder(self, index):
        """The sample of `index` with no prompts: zeros of every shape, ok=False. A real sample
        starts from it (rows past num_prompts stay padding); a skipped one is returned as it is."""
        S, K, P = self.img_size, self.K, self.P
        L = S // LOW_RES_STRIDE                                  # side of SAM's low-res mask grid
        return {"image": torch.zeros(3, S, S),
                "input_size": torch.tensor([S, S]),
                "original_size": torch.tensor([S, S]),
                "point_coords": torch.zeros(K, P, 2),
                "point_labels": torch.full((K, P), -1, dtype=torch.int64),
                "boxes": torch.zeros(K, 4),
                "has_box": torch.zeros(K, dtype=torch.bool),
                "gt_masks": torch.zeros(K, L, L, dtype=torch.bool),
                "error_draws": torch.zeros(K, SAM_POINT_ROUNDS),
                "valid": torch.zeros(K, dtype=torch.bool),
                "num_prompts": 0,
                "index": index,
                "ok": False,
                "path": self.pairs[index][0]}

    def __getitem__(self, item):
        """A sample with prompts; the placeholder, counted in self.skipped and named in one
        warning line, when the image cannot be decoded or the annotation file is malformed
        (ImageError, BadAnnotation). Any other exception is a bug and propagates."""
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            return self.sample(index, epoch)
        except (ImageError, BadAnnotation) as e:
            self.skipped += 1
            warnings.warn(f"SA1B: skipped sample {index} ({e})", stacklevel=2)
            return self.placeholder(index)

    def sample(self, index, epoch):
        """The sample of (index, epoch), drawn as the class docstring says; raises ImageError or
        BadAnnotation for a bad pair of files."""
        S, K, P = self.img_size, self.K, self.P
        image_path, json_path = self.pairs[index]
        out = self.placeholder(index)
        img = load_image(image_path)
        rles = read_sa1b_annotations(json_path, (img.height, img.width))
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, index))
        order = torch.randperm(len(rles), generator=g).tolist()
        x, (h2, w2) = sam_preprocess(img, S)
        sx, sy = w2 / img.width, h2 / img.height        # SAM's ResizeLongestSide.apply_coords
        gt_rows, gt_cols = low_res_cells((img.height, img.width), (h2, w2), S)   # gt masks' cells
        k = 0
        for j in order:
            if k == K:
                break
            try:
                mask = rle_decode(rles[j])                   # (h, w) bool, size checked on reading
            except BadAnnotation as e:
                raise BadAnnotation(f"{json_path}: annotations[{j}]: {e}") from None
            fg = np.flatnonzero(mask)                    # (area,) flat indices into (h, w)
            if len(fg) == 0:
                continue                                 # an empty mask makes no prompt
            if torch.rand(1, generator=g).item() < self.point_prob:
                n = torch.randint(1, P + 1, (1,), generator=g).item()
                picked = fg[torch.randint(0, len(fg), (n,), generator=g).numpy()]   # (n,) flat
                ys, xs = np.divmod(picked, img.width)
                pts = np.stack([(xs + 0.5) * sx - 0.5, (ys + 0.5) * sy - 0.5], 1)   # (n, 2) x, y
                out["point_coords"][k, :n] = torch.from_numpy(pts).float()
                out["point_labels"][k, :n] = 1
            else:
                cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
                box = torch.tensor([cols[0] * sx, rows[0] * sy,
                                    (cols[-1] + 1) * sx, (rows[-1] + 1) * sy])   # x0 y0 x1 y1
                side = (box[2:] - box[:2]).repeat(2)                 # (w, h, w, h) of the box
                cap = MAX_BOX_JITTER * S / 1024
                noise = (torch.randn(4, generator=g) * self.box_jitter * side).clamp(-cap, cap)
                frame = torch.tensor([w2, h2, w2, h2]).float()
                box = torch.minimum((box + noise).clamp(min=0), frame)
                corners = [torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])]
                out["boxes"][k] = torch.cat(corners)
                out["has_box"][k] = True
            low_res = torch.from_numpy(mask[np.ix_(gt_rows, gt_cols)])   # (h'/4, w'/4) cells
            out["gt_masks"][k, :len(gt_rows), :len(gt_cols)] = low_res
            out["valid"][k] = True
            k += 1
        # a generator of its own, so the prompt draws above stay what they were before these existed
        g_error = torch.Generator().manual_seed(_seed(self.seed, epoch, index, 1))
        out["error_draws"] = torch.rand(K, SAM_POINT_ROUNDS, generator=g_error)
        out.update(image=x, input_size=torch.tensor([h2, w2]),
                   original_size=torch.tensor([img.height, img.width]), num_prompts=k, ok=True)
        return out


def collate_sam(samples):
    """SA1B samples -> the same keys batched: "image" (B, 3, S, S), "input_size" and "original_size"
    (B, 2), "point_coords" (B, K, P, 2), "point_labels" (B, K, P), "boxes" (B, K, 4), "has_box" and
    "valid" (B, K), "gt_masks" (B, K, S/4, S/4), "error_draws" (B, K, SAM_POINT_ROUNDS),
    "num_prompts" "index" (B,) int64, "ok" (B,) bool, and "bad_paths"."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in
             ("image", "input_size", "original_size", "point_coords", "point_labels", "boxes", "has_box", "valid",
              "gt_masks", "error_draws")}
    batch.update({key: torch.tensor([s[key] for s in samples]) for key in ("num_prompts", "index", "ok")})
    batch["bad_paths"] = [s["path"] for s in samples if not s["ok"]]
    return batch


# ----------------------------------------------------------------------------- 4. batch samplers

class VariableResolutionSampler:
    """CVNets' variable batch sampler (Mehta et al., MobileViT), used for D_CLIP in SAM-CLIP
    Sec. 4.1: each step picks one resolution r from `resolutions` and a batch size that keeps the
    pixels per batch about constant, round(base_batch_size * (base_resolution / r)^2) per rank.

    Every rank builds the same plan for an epoch: a permutation of all indices from a generator
    seeded with (seed, epoch), and the steps' resolutions from a second generator seeded likewise.
    Each step takes the next batch_size(r) * num_replicas indices (the global batch) and gives rank
    i the slice [i::num_replicas], so ranks agree on r and batch size and never share a sample. The
    epoch ends at the first step whose global batch no longer fits (drop_last), or, without
    drop_last, that step is filled up from the start of the permutation.
    Yields lists of (index, resolution, epoch), the items CLIPImages takes; use as `batch_sampler=`.
    Resume: set_epoch(epoch, start_step) skips the steps already taken in that epoch."""

    def __init__(self, num_samples, base_batch_size, resolutions=(224, 448), base_resolution=None,
                 num_replicas=1, rank=0, seed=0, drop_last=True):
        self.num_samples, self.base_batch_size, self.resolutions = num_samples, base_batch_size, tuple(resolutions)
        self.base_resolution = base_resolution or min(self.resolutions)
        self.num_replicas, self.rank, self.seed, self.drop_last = num_replicas, rank, seed, drop_last
        self.epoch, self.start_step = 0, 0

    def batch_size(self, resolution):
        return max(1, round(self.base_batch_size * (self.base_resolution / resolution) ** 2))

    def set_epoch(self, epoch, start_step=0):
        """Call before each epoch; a resumed run passes the number of steps already taken in it."""
        self.epoch, self.start_step = epoch, start_step

    def plan(self, epoch):
        """[(resolution, global batch size)] per step of `epoch`, the same on all ranks; no permutation: cheap."""
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, 1))   # the steps' resolutions
        steps, pos = [], 0
        while pos < self.num_samples:
            r = self.resolutions[torch.randint(len(self.resolutions), (1,), generator=g).item()]
            n = self.batch_size(r) * self.num_replicas
            if pos + n > self.num_samples and self.drop_last:
                break
            steps.append((r, n))
            pos += n
        return steps

    def batches(self, epoch, start_step=0):
        """This rank's batches of `epoch` from step `start_step` on, one list at a time."""
        steps = self.plan(epoch)
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(_seed(self.seed, epoch, 0)))
        total = sum(n for _, n in steps)
        if total > self.num_samples:     # no drop_last: the last global batch wraps to the permutation's start
            perm = perm.repeat(-(-total // self.num_samples))
        pos = sum(n for _, n in steps[:start_step])
        for r, n in steps[start_step:]:
            yield [(i, r, epoch) for i in perm[pos:pos + n][self.rank::self.num_replicas].tolist()]
            pos += n

    def __iter__(self):
        return self.batches(self.epoch, self.start_step)

    def __len__(self):
        return max(0, len(self.plan(self.epoch)) - self.start_step)


class FixedBatchSampler(VariableResolutionSampler):
    """D_SAM's batches (Sec. 4.1: 1024 px only, so one batch size): the sampler above with a single
    resolution, `batch_size` per rank. Yields lists of (index, epoch), the items SA1B takes."""

    def __init__(self, num_samples, batch_size, num_replicas=1, rank=0, seed=0, drop_last=True):
        # fewer samples than one global batch: drop_last would leave no batch at all, so wrap instead
        drop_last = drop_last and num_samples >= batch_size * num_replicas
        super().__init__(num_samples, batch_size, (1,), None, num_replicas, rank, seed, drop_last)

    def batches(self, epoch, start_step=0):
        for batch in super().batches(epoch, start_step):
            yield [(i, e) for i, _, e in batch]


# ----------------------------------------------------------------------------- 5. the stream of batches

def locate(sampler, micro, max_epochs=None):
    """Which (epoch, step within it) the `micro`-th micro-batch of a stream of epochs falls on."""
    epoch = 0
    while max_epochs is None or epoch < max_epochs:
        n = len(sampler.plan(epoch))
        if n == 0 and max_epochs is None:
            raise ValueError(empty_plan(sampler, epoch))
        if micro < n:
            return epoch, micro
        micro, epoch = micro - n, epoch + 1
    return epoch, 0


def stream(loader, sampler, start_micro, max_epochs=None):
    """Yield (epoch, batch) from `start_micro` on, over epochs; each epoch's order is fixed by
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""
    epoch, skip = locate(sampler, start_micro, max_epochs)
    while max_epochs is None or epoch < max_epochs:
        if max_epochs is None and not sampler.plan(epoch):    # an endless stream of empty epochs never yields
            raise ValueError(empty_plan(sampler, epoch))
        sampler.set_epoch(epoch, skip)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def empty_plan(sampler, epoch):
    return (f"epoch {epoch} of an endless batch stream holds no batch: {sampler.num_samples} samples, fewer than "
            f"one global batch of {sampler.num_replicas} x {sampler.batch_size(min(sampler.resolutions))}")


def append_durable(path, payload):
    """Append bytes to `path` and return once they are on disk (flush + fsync), so that a write
    which depends on them (a cache row's index entry) can never reach the disk before them."""
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


class TeacherCache:
    """CLIP-teacher embeddings on disk (--cache-teacher), because the ViT-L/14 teacher costs more
    than the student. Caching fixes each image's crop (drawn with epoch 0) so a stored embedding
    stays the right target in every epoch.

    Each rank appends only to its own shard: rank<r>.rows (float16 rows of D values) and
    rank<r>.index (int64, the image of each row). An index entry is its row's "filled" flag and is
    appended only once the row is on disk, so no flag outlives its row; rows a crash left without
    an entry are cut off when the rank reopens its shard. No two writers share a file, so ranks on
    different nodes of a network filesystem cannot overwrite each other's pages. Every rank reads
    every shard (it looks for new entries when a batch holds an image it has no row for), so a cache
    made with another world size is read as it is and grows by the current ranks' shards. A row read
    back zero or non-finite (lost, or not yet visible on this node) counts as missing and is
    recomputed: a zero target trains nothing, since 1 - cos(x, 0) has no gradient."""

    def __init__(self, folder, num_samples, dim, meta, rank):
        os.makedirs(folder, exist_ok=True)
        meta = {**meta, "dim": dim, "layout": "rank shards"}    # a cache of the old single-file layout is refused
        meta_path = os.path.join(folder, "meta.json")
        if rank == 0 and not os.path.exists(meta_path):
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
        if dist.is_initialized():
            dist.barrier()
        with open(meta_path) as f:
            if json.load(f) != meta:
                raise ValueError(f"--cache-teacher {folder} was made for another teacher, data, seed or "
                                 "cache layout; use a new folder")
        self.folder, self.dim, self.rank, self.row_bytes = folder, dim, rank, 2 * dim   # float16 rows
        rows, entries = self.path(rank, "rows"), self.path(rank, "index")
        for path in (rows, entries):
            open(path, "ab").close()
        self.count = min(os.path.getsize(rows) // self.row_bytes, os.path.getsize(entries) // 8)
        os.truncate(rows, self.count * self.row_bytes)   # a row a crash left without its entry
        os.truncate(entries, 8 * self.count)             # half an entry
        self.shard = np.full(num_samples, -1, np.int32)  # (N,) the shard holding image i's row, -1: none
        self.row = np.zeros(num_samples, np.int64)       # (N,) its row there
        self.seen = {}                                   # shard -> index entries taken in so far
        if dist.is_initialized():
            dist.barrier()                               # every shard trimmed before any rank reads it
        self.refresh()

    def path(self, shard, kind):
        return os.path.join(self.folder, f"rank{shard}.{kind}")

    def refresh(self):
        """Take in the index entries every shard gained since the last look; an image's later entry
        replaces an earlier one (a recomputed row replaces a bad one)."""
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("rank") and name.endswith(".index") and name[4:-6].isdigit()):
                continue
            shard = int(name[4:-6])
            start = self.seen.get(shard, 0)
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(8 * start)
                raw = f.read()
            new = np.frombuffer(raw[:len(raw) // 8 * 8], np.int64)   # a half-written entry waits for the next look
            last = len(new) - 1 - np.unique(new[::-1], return_index=True)[1]   # each image's latest entry
            last = last[(new[last] >= 0) & (new[last] < len(self.shard))]
            self.shard[new[last]], self.row[new[last]] = shard, start + last
            self.seen[shard] = start + len(new)

    def read(self, idx):
        """(B, D) float32 rows of images idx (B,); NaN where there is no row or it cannot be read whole."""
        out = np.full((len(idx), self.dim), np.nan, np.float32)
        shards = self.shard[idx]
        for shard in np.unique(shards[shards >= 0]):
            with open(self.path(shard, "rows"), "rb") as f:
                for j in np.flatnonzero(shards == shard):
                    f.seek(self.row_bytes * int(self.row[idx[j]]))
                    raw = f.read(self.row_bytes)
                    if len(raw) == self.row_bytes:
                        out[j] = np.frombuffer(raw, np.float16)
        return out

    def append(self, idx, rows):
        """Store rows (n, D) of images idx (n,) in this rank's shard: the rows, then, once they are
        on disk, their index entries."""
        append_durable(self.path(self.rank, "rows"), rows.astype(np.float16).tobytes())
        append_durable(self.path(self.rank, "index"), idx.astype(np.int64).tobytes())
        self.shard[idx], self.row[idx] = self.rank, self.count + np.arange(len(idx))
        self.count += len(idx)

    def __call__(self, index, ok, teacher_images, teacher):
        """Embeddings (B, D) for a batch: cached rows read, missing or bad rows computed and stored.
        Placeholders of unreadable images are computed but never stored."""
        idx = index.numpy()
        if (self.shard[idx] < 0).any():
            self.refresh()                               # another rank may have stored them since the last look
        rows = self.read(idx)                                                          # (B, D)
        todo = torch.from_numpy(~(np.isfinite(rows).all(1) & (rows != 0).any(1)))    # (B,) missing, zero, NaN
        out = torch.from_numpy(rows).to(teacher_images.device)
        if todo.any():
            out[todo.to(out.device)] = teacher(teacher_images[todo.to(out.device)]).half().float()  # as stored
            store = (todo & ok).numpy()
            if store.any():
                self.append(idx[store], out[torch.from_numpy(store).to(out.device)].cpu().numpy())
        return out


@dataclass
class EpochTally:
    """This rank's D_CLIP images in the current epoch: how many it saw, how many were unreadable, which."""
    seen: int = 0
    unreadable: int = 0
    unreadable_paths: list = field(default_factory=list)

    def count(self, clip_batch):
        self.seen += len(clip_batch["ok"])
        self.unreadable += int((~clip_batch["ok"]).sum())
        self.unreadable_paths += clip_batch["bad_paths"]

    def report(self, epoch, rank, world, device):
        """At the end of an epoch: how many unreadable images were skipped (all ranks), and which.
        -> True if not one image of the epoch was readable."""
        counts = torch.tensor([float(self.unreadable), float(self.seen)], device=device)
        if world > 1:
            dist.all_reduce(counts)                                # sums over ranks
        unreadable, seen = (int(c) for c in counts.tolist())
        if unreadable:
            print(f"[train] epoch {epoch}: skipped {unreadable} unreadable image(s) "
                  f"(rank {rank} saw: {self.unreadable_paths[:5]})", flush=True)
        return unreadable == seen > 0
