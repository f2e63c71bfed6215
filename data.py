"""Data for SAM-CLIP (Sec. 3 and 4.1): images in, model-ready tensors out.

Sections, in the order a sample meets them:
  1. Images: open any file PIL reads (EXIF rotation applied; grayscale, palette, RGBA, 16-bit
     converted to 8-bit RGB) and the two normalisations of the two teachers: SAM's (resize the
     longest side to 1024, mean/std on the 0-255 scale, pad bottom-right) and CLIP's.
  2. D_CLIP (Sec. 3, Eq. 1): unlabeled images from a folder or a list file; one random crop per
     sample, seen by the student at the step's resolution and by the CLIP teacher at 224 px.
  3. D_SAM (Sec. 3, Eq. 2): SA-1B images and their masks (COCO run-length encoding, decoded here
     without pycocotools); every chosen mask becomes a point or box prompt, drawn by SAM's
     prompt simulation (prompts.first_prompt). SA-1B is read extracted (sa_N.jpg beside
     sa_N.json) or straight from the tars it ships as (sa_000000.tar ...), whose members are
     indexed once and then read by seeking, so D_SAM stays a map-style dataset either way.
Which sample each rank reads in which step is sampling.py's; the on-disk CLIP-teacher embeddings
(--cache-teacher) are teacher_cache.py's.

A sample whose file is unreadable or corrupt (an image PIL cannot decode, an SA-1B annotation
file that is not JSON or breaks the schema SA1B reads) does not raise: it comes back as zeros of
the right shapes with ok=False, so every rank keeps the same batch size, and the training loop
masks it out of the loss. Only those two errors, ImageError and BadAnnotation, are caught: any
other exception is a bug in our code and stops the run rather than silently dropping data.

Shape legend: H W image height and width, S square side, K prompts (masks) per image, P points
per prompt, B batch.
"""

import io
import json
import math
import os
import re
import tarfile
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

import clip
import prompts

# ----------------------------------------------------------------------------- 1. images

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's normalisation, on the 0-255 scale
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable or of an unsupported kind."""


def load_image(path):
    """Open `path` (a file, or a TarMember of an SA-1B tar) as an 8-bit RGB PIL image, whatever
    its mode: EXIF orientation applied; 16-bit images rescaled from 0-65535 (32-bit integer ones
    too when they exceed 255, float ones from 0-1) to 0-255; grayscale, palette and alpha images
    converted (alpha dropped). Raises ImageError for a missing file or one PIL cannot decode.
    Only reading, PIL's open and decode run inside the try, and those four exception types are
    how PIL reports a corrupt or truncated file (SyntaxError for some broken PNG chunks,
    ValueError for bad decoder arguments; OSError also for a tar member cut short), so a bug in
    the conversions below still raises as itself."""
    try:
        img = Image.open(path.open() if isinstance(path, TarMember) else path)
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
    if img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")  # palette and grey + alpha: their transparency via RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")  # alpha dropped
    return img


def to_tensor(img):
    """PIL RGB -> float32 tensor (3, H, W) on the 0-255 scale."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float()  # (H, W, 3) -> (3, H, W)


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
    x = normalize_sam(to_tensor(img.resize((w, h), Image.BILINEAR)))  # (3, h', w')
    return F.pad(x, (0, size - w, 0, size - h)), (h, w)  # (3, size, size)


def square_resize(img, size, normalize=normalize_sam):
    """Resize the whole image to (size, size) (bicubic; the aspect is not kept, as in the paper's
    448 x 448 zero-shot segmentation protocol) and normalise: (3, size, size)."""
    return normalize(to_tensor(img.resize((size, size), Image.BICUBIC)))


def to_device(batch, device):
    """A collated batch's tensors to `device` (the rest, e.g. paths, as they are)."""
    out = {}
    for key, value in batch.items():
        out[key] = value.to(device, non_blocking=True) if torch.is_tensor(value) else value
    return out


def derive_seed(*parts):
    """One 63-bit seed from a tuple of non-negative ints, e.g. (seed, epoch, index): the same on
    every machine and run (unlike Python's hash of a str), and well mixed, so neighbouring
    indices or epochs do not get correlated random streams. Every seeded draw of data.py and
    sampling.py starts from one."""
    state = np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # torch.Generator takes seeds below 2^63


# ----------------------------------------------------------------------------- 2. D_CLIP (Eq. 1)


def list_images(source):
    """`source`: a folder (searched recursively for IMAGE_EXTENSIONS, any case) or a text file with
    one image path per line (relative paths are taken from the list file's folder; blank lines and
    lines starting with # are skipped). -> sorted paths for a folder, the file's order for a
    list."""
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(d, f)
            for d, _, files in os.walk(source)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    elif os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            paths = [
                os.path.join(base, p)
                for p in (line.strip() for line in f)
                if p and not p.startswith("#")
            ]
    else:
        raise ValueError(
            f"image source {source!r} does not exist: expected a folder of images or a text file "
            "of image paths"
        )
    if not paths:
        raise ValueError(
            f"image source {source!r} holds no images: expected {'/'.join(IMAGE_EXTENSIONS)} files "
            "in the folder (recursively) or one path per line in the list file"
        )
    return paths


def random_resized_crop_box(h, w, g, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """The crop box (left, top, right, bottom) of torchvision's RandomResizedCrop: area a uniform
    fraction `scale` of the image, log-uniform aspect in `ratio`; 10 tries, then a centre crop."""
    for _ in range(10):
        area = h * w * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
        cw = int(round((area * aspect) ** 0.5))
        ch = int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, (1,), generator=g).item()
            left = torch.randint(0, w - cw + 1, (1,), generator=g).item()
            return left, top, left + cw, top + ch
    if w / h < ratio[0]:  # narrower than the narrowest aspect: the full width
        cw = w
        ch = min(h, round(w / ratio[0]))
    else:  # the full height, at most the widest aspect
        cw = min(w, round(h * ratio[1]))
        ch = h
    left = (w - cw) // 2
    top = (h - ch) // 2
    return left, top, left + cw, top + ch


class CLIPImages(torch.utils.data.Dataset):
    """D_CLIP for L_CLIP (Eq. 1): the student and the frozen CLIP teacher must see the SAME view of
    an image, so one crop is drawn and resized twice: to the step's resolution with SAM's
    normalisation for the student, to `teacher_size` (CLIP ViT-L/14's native 224) with CLIP's.
    At the encoder's native side (`native_size`, 1024 for ViT-B) the student sees the crop as SAM's
    inference does (sam_preprocess: longest side resized, zero padding bottom-right), because the
    only 1024 px user of HeadCLIP (Table 5, both heads from one forward) feeds that geometry; below
    it the crop is squashed to a square, as the 448 px zero-shot protocol feeds. The teacher always
    gets its square view of the same crop. The crop, RandomResizedCrop with scale 0.5-1 (`scale`,
    train.py --crop-scale) and aspect 3/4-4/3, is not stated in the paper.

    Items are `(index, resolution, epoch)` tuples, as VariableResolutionSampler yields them (a plain
    index means (index, teacher_size, 0)). The crop comes from a generator seeded with
    (seed, epoch, index): the same sample gives the same crop in any worker and after a resume.
    -> {"student" (3, r, r), "teacher" (3, T, T), "index", "ok", "path", "key"} (the key, the
    teacher cache's index, is the path); ok=False and zeros for an unreadable image. Skipped
    samples are not counted here: the loop counts (~batch["ok"]).sum()."""

    def __init__(
        self,
        source,
        teacher_size=224,
        seed=0,
        scale=(0.5, 1.0),
        fixed_crops=False,
        native_size=None,
    ):
        self.source = source
        self.paths = list_images(source)
        self.teacher_size = teacher_size
        self.seed = seed
        self.scale = scale
        self.native_size = native_size
        # every epoch's crop drawn as epoch 0 draws it, so that a cached teacher target fits it
        self.fixed_crops = fixed_crops

    def check_readable(self, min_images=1, tries=16):
        """Raise ValueError when the source holds fewer than `min_images` (one training step's
        worth: no epoch would hold a step) or none of `tries` images spread over the list can be
        read: a source of unreadable files would otherwise train on nothing but placeholders."""
        if len(self.paths) < min_images:
            raise ValueError(
                f"image source {self.source!r} holds {len(self.paths)} images; one training step "
                f"takes {min_images} (--clip-batch)"
            )
        spacing = max(1, len(self.paths) // tries)
        picks = range(0, len(self.paths), spacing)[:tries]  # spread over the list
        errors = []
        for i in picks:
            try:
                load_image(self.paths[i])
                return
            except ImageError as e:
                errors.append(str(e))
        raise ValueError(
            f"image source {self.source!r}: none of the {len(picks)} images tried could be read "
            f"(e.g. {errors[0]}); expected image files PIL can open"
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, resolution, epoch = item if isinstance(item, tuple) else (item, self.teacher_size, 0)
        path = self.paths[index]
        T = self.teacher_size
        try:
            img = load_image(path)
        except ImageError:
            return {
                "student": torch.zeros(3, resolution, resolution),
                "teacher": torch.zeros(3, T, T),
                "index": index,
                "ok": False,
                "path": path,
                "key": path,
            }
        crop_epoch = 0 if self.fixed_crops else epoch
        g = torch.Generator().manual_seed(derive_seed(self.seed, crop_epoch, index))
        student, teacher = clip_views(img, resolution, g, T, self.native_size, self.scale)
        return {
            "student": student,
            "teacher": teacher,
            "index": index,
            "ok": True,
            "path": path,
            "key": path,
        }


def clip_views(img, resolution, g, teacher_size, native_size=None, scale=(0.5, 1.0)):
    """The two views of one D_CLIP crop (CLIPImages says why), the crop box drawn from generator g:
    the student's at `resolution` (SAM's padded frame at native_size, else a square) with SAM's
    normalisation, the teacher's square at teacher_size with CLIP's. Shared by CLIPImages and
    shards.ShardImages. -> (student (3, r, r), teacher (3, T, T))"""
    box = random_resized_crop_box(img.height, img.width, g, scale)
    if resolution == native_size:  # SAM's inference geometry
        student, _ = sam_preprocess(img.crop(box), resolution)  # (3, r, r), zero-padded
    else:
        square = img.resize((resolution, resolution), Image.BICUBIC, box=box)  # crop + resize
        student = normalize_sam(to_tensor(square))
    teacher = img.resize((teacher_size, teacher_size), Image.BICUBIC, box=box)  # crop + resize
    return student, normalize_clip(to_tensor(teacher))


def collate(samples):
    """CLIPImages (or shards.ShardImages) samples, one resolution per batch -> {"student"
    (B, 3, r, r), "teacher" (B, 3, T, T), "index" (B,) int64, "ok" (B,) bool, "bad_paths" [paths
    of the ok=False ones], "key" [B sample keys]}."""
    return {
        "student": torch.stack([s["student"] for s in samples]),
        "teacher": torch.stack([s["teacher"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "ok": torch.tensor([s["ok"] for s in samples], dtype=torch.bool),
        "bad_paths": [s["path"] for s in samples if not s["ok"]],
        "key": [s["key"] for s in samples],
    }


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
        counts = []
        p = 0  # position in s
        while p < len(s):
            x = 0  # the number being read
            k = 0  # its 5-bit chunks read so far
            more = True
            while more:
                if p == len(s):
                    raise BadAnnotation(f"RLE string of {len(s)} chars ends inside a number")
                c = s[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)  # sign-extend a negative number
            counts.append(x + counts[-2] if len(counts) > 2 else x)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise BadAnnotation(f"RLE counts hold a negative run ({counts.min()}), expected runs >= 0")
    if counts.sum() != h * w:
        raise BadAnnotation(f"RLE counts sum to {counts.sum()}, expected h*w = {h}*{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)  # runs alternate 0, 1, 0, ...
    return np.ascontiguousarray(flat.reshape(w, h).T)  # column-major: (w, h) -> (h, w)


def rle_encode(mask):
    """bool mask (h, w) -> {"size": [h, w], "counts": str}, pycocotools' rleToString form."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)  # (h, w) -> (w*h,) column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # counts always start with zeros
    chars = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x = x >> 5  # Python's >> is arithmetic, as in C
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": [h, w], "counts": "".join(chars)}


# SA-1B ships as about 1000 uncompressed tars of ~11k sa_N.jpg + sa_N.json each; extracting the
# paper's 5.7% takes ~600 GB. So SA1B also reads the tars in place: a tar's member headers are
# read once (tarfile seeks over the data) into an index of byte spans, kept beside the tar, and a
# sample reads its two members by seeking. D_SAM stays a map-style dataset, so the sampling and
# the exact resume of sampling.FixedBatchSampler are those of the extracted layout.

SPEC_SEPARATOR = "::"  # joins several --sam-data specs, as OpenCLIP joins shard lists
INDEX_SUFFIX = ".index.json"  # the index of sa_000000.tar is sa_000000.tar.index.json
INDEX_VERSION = 1  # part of an index's key: an index written in another layout is rebuilt


def expand_braces(spec):
    """Bash's brace expansion, as OpenCLIP and WebDataset write lists of tars, left to right:
    "sa_{000..002}.tar" -> sa_000.tar sa_001.tar sa_002.tar (zero-padded when a bound is),
    "{2..0}" -> 2 1 0, "{a,b}.tar" -> a.tar b.tar; several braces multiply. A brace holding
    neither a range nor a list stays as it is. (shards.py reads D_CLIP's specs the same way.)"""
    match = re.search(r"\{([^{}]*)\}", spec)
    if match is None:
        return [spec]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        padded = any(len(n) > 1 and n.startswith("0") for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(k).zfill(width) for k in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = [match.group(0)]
    tails = expand_braces(spec[match.end() :])
    return [spec[: match.start()] + option + tail for option in options for tail in tails]


def find_sa1b(root):
    """One walk of the folder `root`, recursively -> (its *.tar files, its extracted pairs
    (sa_*.jpg, sa_*.json)), each sorted by path. Raises ValueError when it holds neither, or
    both, since a folder of tars beside their extracted files would read every image twice."""
    tars = []
    pairs = []
    for d, _, files in os.walk(root):
        names = set(files)  # `in` a list is quadratic: one extracted tar is ~22k files
        for f in files:
            if f.endswith(".tar"):
                tars.append(os.path.join(d, f))
            elif f.startswith("sa_") and f.lower().endswith(".jpg") and f[:-4] + ".json" in names:
                pairs.append((os.path.join(d, f), os.path.join(d, f[:-4] + ".json")))
    if not tars and not pairs:
        raise ValueError(
            f"SA-1B root {root!r} holds no data: expected sa_*.jpg images, each beside a "
            "matching sa_*.json annotation file, or SA-1B's *.tar files (sub-folders allowed)"
        )
    if tars and pairs:
        raise ValueError(
            f"SA-1B root {root!r} holds both {len(tars)} tar file(s) and {len(pairs)} extracted "
            "sa_*.jpg + sa_*.json pair(s); name one of them (e.g. 'DIR/sa_{000000..000009}.tar')"
        )
    return sorted(tars), sorted(pairs)


def sa1b_parts(spec):
    """The parts an --sam-data spec names, in its order: a list of extracted (image, json) pairs
    or the path of one tar each. A spec is one or several of these, joined with "::":
      a folder        its *.tar files (recursively, sorted) or, holding none, its extracted
                      pairs sa_N.jpg + sa_N.json (find_sa1b)
      a .tar file     that tar; a brace range names several: "/data/sa1b/sa_{000000..000049}.tar"
      another file    a list: one spec per line, relative to the list's folder (blank lines and
                      lines starting with # skipped)
    Raises ValueError naming the part that matches nothing."""
    parts = []
    for piece in spec.split(SPEC_SEPARATOR):
        paths = expand_braces(piece)
        missing = [path for path in paths if not os.path.exists(path)]
        if missing == paths:
            raise ValueError(f"SA-1B spec {piece!r} matches nothing: no such file or folder")
        if missing:
            raise ValueError(
                f"SA-1B spec {piece!r}: {len(missing)} of its {len(paths)} files do not exist "
                f"(first: {missing[0]})"
            )
        for path in paths:
            if os.path.isdir(path):
                tars, pairs = find_sa1b(path)
                parts += tars if tars else [pairs]
            elif path.endswith(".tar"):
                parts.append(path)
            else:
                parts += list_parts(path)
    return parts


def list_parts(path):
    """The parts of a list file (sa1b_parts): each line a spec, relative to the list's folder."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise ValueError(
            f"SA-1B spec {path!r}: not a folder, a .tar file or a text file listing them"
        ) from None
    specs = [line for line in lines if line and not line.startswith("#")]
    if not specs:
        raise ValueError(f"SA-1B list {path!r} names nothing: expected one tar or folder a line")
    parts = []
    for line in specs:
        parts += sa1b_parts(os.path.join(base, line))
    return parts


@dataclass(frozen=True)
class TarMember:
    """One file inside an uncompressed tar, read by seeking: its data is the `size` bytes from
    byte `offset` of the tar. Named "tar:member" in messages."""

    tar: str
    name: str
    offset: int
    size: int

    def __str__(self):
        return f"{self.tar}:{self.name}"

    def read(self):
        """The member's bytes; OSError when the tar now ends inside them."""
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            content = f.read(self.size)
        if len(content) < self.size:
            raise OSError(f"the tar ends {self.size - len(content)} bytes before this member does")
        return content

    def open(self):
        """The member's bytes as a binary file (for PIL)."""
        return io.BytesIO(self.read())


class SA1BTar:
    """The sa_N.jpg + sa_N.json pairs of one SA-1B tar, sorted by member name (the order
    find_sa1b gives the tar extracted into a folder of its own). names (n,): the images' member
    names; spans (n, 4) int64: image offset, image size, JSON offset, JSON size in bytes;
    problem: one line when the tar is truncated or corrupt (index_tar). Arrays, not a list of
    objects, so that forked DataLoader workers share them instead of copying them page by page
    as reference counts change."""

    def __init__(self, path, names, spans, problem=None):
        self.path = path
        self.names = np.asarray(names, dtype=str)
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 4)
        self.problem = problem

    def __len__(self):
        return len(self.names)

    def __getitem__(self, j):
        """-> (image, annotation) TarMembers of pair j."""
        name = str(self.names[j])
        image_offset, image_size, json_offset, json_size = self.spans[j].tolist()
        image = TarMember(self.path, name, image_offset, image_size)
        return image, TarMember(self.path, name[:-4] + ".json", json_offset, json_size)


def index_tar(path):
    """Read the member headers of one tar (tarfile seeks over the data) -> SA1BTar of its
    sa_*.jpg members that have a .json member beside them. A tar cut short or with a corrupt
    header is read up to the damage: the pairs before it are kept, and `problem` says where it
    broke (tarfile itself stops silently at a bad header, so its stopping block is checked to be
    tar's end-of-archive block)."""
    size = os.path.getsize(path)
    members = {}  # member name -> (data offset, data size)
    problem = None
    last = None  # the last member read whole
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                end = info.offset_data + info.size
                if end > size:
                    problem = f"cut short inside member {info.name} (ends at byte {end} of {size})"
                    break
                if info.isfile():
                    members[info.name] = (info.offset_data, info.size)
                last = info.name
            stop = tar.offset  # the block tarfile stopped at
    except tarfile.ReadError as e:
        if last is None:
            problem = f"not an uncompressed tar file ({e})"
        else:
            problem = f"unreadable after member {last} ({e})"
    if problem is None:
        with open(path, "rb") as f:
            f.seek(stop)
            block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            problem = f"cut short after member {last} (no end-of-archive block)"
        elif block != bytes(tarfile.BLOCKSIZE):
            problem = f"corrupt header at byte {stop}, after member {last}"
    names = sorted(
        name
        for name in members
        if os.path.basename(name).startswith("sa_")
        and name.lower().endswith(".jpg")
        and name[:-4] + ".json" in members
    )
    spans = [(*members[name], *members[name[:-4] + ".json"]) for name in names]
    return SA1BTar(path, names, spans, problem)


def load_tar_index(path):
    """The index of one tar -> (SA1BTar, stored): read from <tar>.index.json when that was made
    for this very file (same size and modification time), else built by index_tar and written
    there for the next run. The write is atomic (a temporary file, renamed), so any number of
    processes on any number of nodes may write it at once; stored is False where the folder is
    read-only, and the tar is then indexed again in every run."""
    stat = os.stat(path)
    key = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stored_path = path + INDEX_SUFFIX
    doc = None
    if os.path.exists(stored_path):
        try:
            with open(stored_path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = None  # not an index of ours: built again and overwritten
    if isinstance(doc, dict) and doc.get("key") == key:
        return SA1BTar(path, doc["names"], doc["spans"], doc["problem"]), True
    index = index_tar(path)
    doc = {
        "key": key,
        "names": index.names.tolist(),
        "spans": index.spans.tolist(),
        "problem": index.problem,
    }
    folder = os.path.dirname(os.path.abspath(stored_path))
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=folder, suffix=".tmp", delete=False
        ) as f:
            json.dump(doc, f)
        os.replace(f.name, stored_path)
    except OSError:
        return index, False
    return index, True


class SA1BPairs:
    """Sample index -> (image, annotation) over the parts of an --sam-data spec (sa1b_parts), one
    after another: a list of extracted (path, path) pairs or an SA1BTar (TarMembers)."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])  # (len(parts) + 1,)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1  # the part holding it
        return self.parts[k][index - int(self.starts[k])]

    def __iter__(self):
        for part in self.parts:
            for j in range(len(part)):
                yield part[j]


def sa1b_pairs(spec):
    """An --sam-data spec -> SA1BPairs, its tars indexed (load_tar_index). One warning line for
    each truncated or corrupt tar (its pairs before the damage are read, the rest skipped) and
    one for indexes that could not be stored. Raises ValueError when the spec holds no pair."""
    parts = sa1b_parts(spec)
    tars = list(dict.fromkeys(part for part in parts if isinstance(part, str)))
    # Neither once per job nor once per node: every rank indexes each tar it finds no stored
    # index for, and stores it (atomically, so any number of ranks may), because the tars may lie
    # on a disk shared by all nodes or on each node's own. Rank r of W (RANK, WORLD_SIZE from
    # torchrun) starts r/W of the way through the list: on a first run the ranks that share a
    # disk split the work and mostly find the rest of the indexes stored.
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    start = rank * len(tars) // world
    indexes = {}
    unstored = []
    for path in tars[start:] + tars[:start]:
        indexes[path], stored = load_tar_index(path)
        if not stored:
            unstored.append(path)
    for path in tars:
        if indexes[path].problem:
            warnings.warn(
                f"SA1B: {path}: {indexes[path].problem}; its {len(indexes[path])} pair(s) before "
                "that are read, the rest of the tar is skipped",
                stacklevel=2,
            )
    if unstored:
        warnings.warn(
            f"SA1B: could not store the index of {len(unstored)} tar(s) beside them (e.g. "
            f"{unstored[0]}{INDEX_SUFFIX}); they are indexed again in every run",
            stacklevel=2,
        )
    pairs = SA1BPairs([indexes[part] if isinstance(part, str) else part for part in parts])
    if len(pairs) == 0:
        raise ValueError(
            f"SA-1B spec {spec!r} holds no sa_*.jpg + sa_*.json pair (its tars are named in the "
            "warnings above)"
        )
    return pairs


def read_sa1b_annotations(path, image_hw):
    """The masks of one SA-1B annotation file (a path or a TarMember), checked against the schema
    SA1B reads:
        {"annotations": [{"segmentation": {"size": [h, w], "counts": str | [int >= 0, ...]}}, ...]}
    with [h, w] the image's size (image_hw) as two integers, and counts COCO's compressed string
    (SA-1B's form) or a list of run lengths. Other fields (bbox, point_coords, area, ...) are
    not read, so not checked: SA1B takes boxes and points from the masks themselves. Whether the
    runs sum to h * w is checked by rle_decode when a mask is decoded.
    -> list of the "segmentation" dicts. Raises BadAnnotation, one line naming the file and what
    was expected, so that a bad file is told apart from a bug in our code (which must raise)."""
    try:
        if isinstance(path, TarMember):
            text = path.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        doc = json.loads(text)
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
            raise BadAnnotation(
                f'{path}: annotations[{i}] has no "segmentation" object with "size" and "counts"'
            )
        size = rle["size"]
        counts = rle["counts"]
        two_ints = isinstance(size, list) and [type(v) for v in size] == [int, int]
        if not (two_ints and size == [h, w]):
            raise BadAnnotation(
                f"{path}: annotations[{i}]: segmentation size {size!r}, expected "
                f"the image's [h, w] = [{h}, {w}]"
            )
        runs = isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)
        if not (isinstance(counts, str) or runs):
            raise BadAnnotation(
                f"{path}: annotations[{i}]: segmentation counts {_head(counts)}, "
                "expected a COCO RLE string or a list of non-negative integers"
            )
        rles.append(rle)
    return rles


def _head(value, n=40):
    """repr(value) cut to n characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# SAM App. A: a box's corners move by at most 20 px ("to a maximum of 20 pixels") in a 1024 frame
MAX_BOX_JITTER = 20.0
# SAM App. A: after the first prompt, 8 rounds each add a point from the error region
SAM_POINT_ROUNDS = 8
# input pixels per cell of SAM's low-res mask logits (256 x 256 for a 1024 frame)
LOW_RES_STRIDE = 4


def low_res_cells(original_hw, resized_hw, side, stride=LOW_RES_STRIDE):
    """(rows, cols) of the original image under the centres of SAM's low-res cells that lie
    inside the resized image (h', w') of a (side, side) frame: the ground truth on SAM's grid
    (stride 1: on the frame's own pixels)."""
    centres = (np.arange(side // stride) + 0.5) * stride                  # resized frame
    rows = np.floor(centres[centres < resized_hw[0]] * original_hw[0] / resized_hw[0])
    cols = np.floor(centres[centres < resized_hw[1]] * original_hw[1] / resized_hw[1])
    return rows.astype(np.int64), cols.astype(np.int64)


class SA1B(torch.utils.data.Dataset):
    """D_SAM for L_SAM (Eq. 2): an SA-1B image in SAM's 1024 px frame and K of its masks turned
    into prompts g by SAM's prompt simulation (SAM App. A, prompts.first_prompt): with
    probability `point_prob` 1..P foreground points drawn uniformly from the mask, else the mask's
    box, each coordinate moved by N(0, (box_jitter * side)^2) noise capped at 20 px. The targets of
    Eq. 2 are the frozen SAM's logits z for the same prompts; the masks come along only on SAM's
    low-res grid ("gt_masks"), because SAM's follow-up rounds (prompts.teacher_rounds) draw their
    next point from the error
    region between the previous prediction and the ground truth. A cell (r, c) of that grid is the
    original pixel under its centre, ((c + 0.5) * 4, (r + 0.5) * 4) in the resized frame; cells
    whose centre falls in the padding are 0. "error_draws" are the uniform numbers that place those
    follow-up points, drawn here so that they too come from the sample's own generator.

    Items are `(index, epoch)` tuples as sampling.FixedBatchSampler yields them (a plain index
    means epoch 0); all random choices come from a generator seeded with (seed, epoch, index).
    Coordinates are (x, y) in the resized frame and follow SAM's PromptEncoder, which adds 0.5
    (pixel index -> centre): a point is the pixel centre minus 0.5, a box is the mask's pixel
    extent [x0, x1) scaled (SA-1B's XYWH -> x0, y0, x0 + w, y0 + h).

    Points and boxes are different token counts in SAM's prompt encoder (a point-only prompt gets
    one extra padding token; a box is two corner tokens), so they cannot share one call: has_box
    tells the training loop which rows go to the box call and which to the points call. Point
    prompts are padded to P with label -1, SAM's own padding token; teacher and student see the
    same tokens, which is all distillation needs.
    -> {"image" (3, S, S), "input_size" (2,) h' w', "original_size" (2,) h w,
        "point_coords" (K, P, 2), "point_labels" (K, P) int64 (1 fg, -1 pad), "boxes" (K, 4)
        x0 y0 x1 y1, "has_box" (K,), "gt_masks" (K, S/4, S/4) bool, "error_draws"
        (K, SAM_POINT_ROUNDS) in [0, 1), "valid" (K,), "num_prompts", "index", "ok", "path"};
        rows past num_prompts are padding.
    A pair whose image PIL cannot decode or whose JSON breaks the schema of read_sa1b_annotations
    comes back as placeholder(index) (ok=False), counted in self.skipped with a warning line
    naming the file (a tar's member as "tar:member"); any other exception is a bug and
    propagates.

    `source`: an --sam-data spec (sa1b_parts): an extracted folder, SA-1B's tars (a folder of
    them, a list, brace ranges) or several joined with "::". The samples are the spec's pairs in
    its order (sa1b_pairs), so a tar gives the samples, index for index, of the same tar
    extracted into a folder of its own."""

    def __init__(
        self,
        source,
        img_size=1024,
        masks_per_image=32,
        box_jitter=0.1,
        point_prob=0.5,
        max_points=3,
        seed=0,
    ):
        self.pairs = sa1b_pairs(source)  # index -> (image, annotation)
        self.img_size = img_size
        self.K = masks_per_image
        self.P = max_points
        self.box_jitter = box_jitter
        self.point_prob = point_prob
        self.seed = seed
        # Samples skipped for an unreadable image or a bad annotation file, in this process. A
        # DataLoader worker counts in its own copy, so a loop with workers counts ~batch["ok"]
        # and batch["bad_paths"] instead (collate_sam), as sampling.EpochTally does for D_CLIP.
        self.skipped = 0

    def __len__(self):
        return len(self.pairs)

    def placeholder(self, index):
        """The sample of `index` with no prompts: zeros of every shape, ok=False. A real sample
        starts from it (rows past num_prompts stay padding); a skipped one is returned as it is."""
        S = self.img_size
        K = self.K
        P = self.P
        L = S // LOW_RES_STRIDE  # side of SAM's low-res mask grid
        return {
            "image": torch.zeros(3, S, S),
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
            "path": str(self.pairs[index][0]),
        }

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
        S = self.img_size
        K = self.K
        image_path, json_path = self.pairs[index]
        out = self.placeholder(index)
        img = load_image(image_path)
        rles = read_sa1b_annotations(json_path, (img.height, img.width))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        order = torch.randperm(len(rles), generator=g).tolist()
        x, (h2, w2) = sam_preprocess(img, S)
        scale = (w2 / img.width, h2 / img.height)  # SAM's ResizeLongestSide.apply_coords
        gt_rows, gt_cols = low_res_cells((img.height, img.width), (h2, w2), S)  # gt masks' cells
        k = 0
        for j in order:
            if k == K:
                break
            try:
                mask = rle_decode(rles[j])  # (h, w) bool, size checked on reading
            except BadAnnotation as e:
                raise BadAnnotation(f"{json_path}: annotations[{j}]: {e}") from None
            if not mask.any():
                continue  # an empty mask makes no prompt
            points, box = prompts.first_prompt(
                mask, scale, (h2, w2), S, g, self.point_prob, self.P, self.box_jitter
            )
            n = len(points)  # 0 for a box
            out["point_coords"][k, :n] = points
            out["point_labels"][k, :n] = 1
            if box is not None:
                out["boxes"][k] = box
                out["has_box"][k] = True
            low_res = torch.from_numpy(mask[np.ix_(gt_rows, gt_cols)])  # (h'/4, w'/4) cells
            out["gt_masks"][k, : len(gt_rows), : len(gt_cols)] = low_res
            out["valid"][k] = True
            k += 1
        # a generator of its own, so that the prompt draws above stay what they were before
        g_error = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index, 1))
        out["error_draws"] = torch.rand(K, SAM_POINT_ROUNDS, generator=g_error)
        out.update(
            image=x,
            input_size=torch.tensor([h2, w2]),
            original_size=torch.tensor([img.height, img.width]),
            num_prompts=k,
            ok=True,
        )
        return out


def collate_sam(samples):
    """SA1B samples -> the same keys batched: "image" (B, 3, S, S), "input_size" and "original_size"
    (B, 2), "point_coords" (B, K, P, 2), "point_labels" (B, K, P), "boxes" (B, K, 4), "has_box" and
    "valid" (B, K), "gt_masks" (B, K, S/4, S/4), "error_draws" (B, K, SAM_POINT_ROUNDS),
    "num_prompts" "index" (B,) int64, "ok" (B,) bool, and "bad_paths"."""
    stacked = ("image", "input_size", "original_size", "point_coords", "point_labels", "boxes")
    stacked += ("has_box", "valid", "gt_masks", "error_draws")
    batch = {key: torch.stack([s[key] for s in samples]) for key in stacked}
    for key in ("num_prompts", "index", "ok"):
        batch[key] = torch.tensor([s[key] for s in samples])
    batch["bad_paths"] = [s["path"] for s in samples if not s["ok"]]
    return batch
