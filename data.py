"""Data for SAM-CLIP (Sec. 3 and 4.1): images in, model-ready tensors out.

Sections, in the order a sample meets them:
  1. Images: open any file PIL reads (EXIF rotation applied; grayscale, palette, RGBA, 16-bit
     converted to 8-bit RGB) and the two normalisations of the two teachers: SAM's (resize the
     longest side to 1024, mean/std on the 0-255 scale, pad bottom-right) and CLIP's.

Shape legend: H W image height and width, S square side, K masks per image, B batch.
"""

import numpy as np
import torch
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
    ones from 0-1) to 0-255; grayscale, palette and alpha images converted (alpha dropped)."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
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
