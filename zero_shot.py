"""Zero-shot use of SAM-CLIP: text -> class embeddings -> dense logits -> masks (Sec. 4.2, 4.4,
App. C).

Everything the demo (segment_demo.py) and the evaluation (evaluate.py) share to turn class names
into per-pixel scores, in the order a prompt travels:
  1. class_embeddings: every name in CLIP's 80 ImageNet templates, through the frozen text tower,
     averaged (CLIP Sec. 3.1.4).
  2. dense_logits, the CLIP head alone (Sec. 4.2, zero-shot semantic segmentation): a square
     448 px input gives a 28 x 28 grid of HeadCLIP patch embeddings; each is compared with every
     class embedding, and the logits are upsampled bilinearly to the image.
  3. refine_with_sam, both heads (Sec. 4.4, App. C, Table 5): one 1024 px backbone forward;
     HeadCLIP's coarse per-class map (its 64 x 64 patch grid) picks 1 to 3 point prompts by
     importance sampling on the class's confidence and serves as the mask prompt;
     HeadSAM returns a sharp 256 x 256 mask per class.
  4. segment_by_text: either pipeline on a PIL image, back at the image's size.

Shape legend: K classes, T templates, D CLIP embedding size, B batch, h w HeadCLIP grid, P points
per class, S the encoder's native input side, H W the original image size.
"""

import math
import os
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip
import data
import heads
import vit_det

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021, Sec. 3.1.4; OpenAI's notebook
# "Prompt_Engineering_for_ImageNet.ipynb"), in the notebook's order. SAM-CLIP uses them for
# zero-shot classification and segmentation (Sec. 4.2). Three a line, as a table.
# fmt: off
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
# fmt: on

BACKGROUND = "background"  # the implicit extra class of segment_by_text (see there)
CLIP_SEMSEG_SIDE = 448  # Sec. 4.2: zero-shot semantic segmentation runs at 448 x 448
MASK_PROMPT_EPS = 1e-4  # log-odds of the mask prompt are clipped at logit(1 - eps) = 9.2


def _short(text, n=60):
    return text if len(text) <= n else text[: n - 3] + "..."


def check_class_names(
    class_names, templates=OPENAI_IMAGENET_TEMPLATES, context_length=77, what="class name", first=0
):
    """Raise ValueError (one line) for an empty or whitespace-only name, or for a name that makes
    some template longer than CLIP's context. The length is measured on the untruncated tokens:
    `clip.tokenize` silently cuts a long text to its first 75 tokens, which would embed a
    different prompt than the one asked for. Names are numbered from `first` in the messages."""
    names = list(class_names)
    if not names:
        raise ValueError(f"no {what}s given")
    tok = clip.get_tokenizer()
    for i, name in enumerate(names, start=first):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{what} {i} is empty ({name!r})")
        for template in templates:
            n = len(tok.encode(template.format(name))) + 2  # + start and end tokens
            if n > context_length:
                raise ValueError(
                    f"{what} {i} ({_short(name)!r}) is too long: the prompt "
                    f"{_short(template.format(name))!r} has {n} tokens, CLIP's text tower reads "
                    f"at most {context_length} (start and end included)"
                )


@torch.no_grad()
def class_embeddings(model, class_names, templates=OPENAI_IMAGENET_TEMPLATES, batch_size=1024):
    """CLIP's zero-shot classifier (CLIP Sec. 3.1.4): every class name is put into every template,
    each prompt is embedded by the frozen text tower and L2-normalised, the T embeddings of a class
    are averaged and the mean re-normalised. Returns (K, D) unit rows, on the model's device.
    `model`: the merged SAMCLIP, or a bare clip.CLIP (the teacher, for baselines). The prompts go
    through the text tower in batches of up to `batch_size` texts of one token length
    (clip.encode_text_by_length): the demo's few classes take one pass per length.
    """
    names = list(class_names)
    templates = list(templates)
    ctx = (model.cfg.clip if hasattr(model, "cfg") else model.config).context_length
    check_class_names(names, templates, ctx)
    prompts = [t.format(name) for name in names for t in templates]  # K*T texts
    tokens = clip.tokenize(prompts, ctx)  # (K*T, L)
    device = model.logit_scale.device

    def encode(batch):  # (n, L) tokens of one length -> (n, D)
        return model.encode_text(batch.to(device))

    feats = clip.encode_text_by_length(encode, tokens, batch_size)  # (K*T, D)
    emb = F.normalize(feats.float(), dim=-1)
    emb = emb.reshape(len(names), len(templates), -1)  # (K*T, D) -> (K, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (K, D)


class CachedEmbeddings:
    """class_embeddings, memoised per name for one model: a class's embedding depends on its name
    and the templates only, so a scorer that segments many images with the same vocabulary
    (toy.claims.demo_iou) embeds each name's 80 prompts once instead of once per image."""

    def __init__(self, templates=OPENAI_IMAGENET_TEMPLATES):
        self.templates = list(templates)
        self.model = None
        self.rows = {}  # name -> (D,)

    def __call__(self, model, class_names):
        if model is not self.model:  # another model: its text tower, other embeddings
            self.model = model
            self.rows = {}
        names = list(class_names)
        new = [n for n in dict.fromkeys(names) if n not in self.rows]
        if new:
            self.rows.update(zip(new, class_embeddings(model, new, self.templates)))
        return torch.stack([self.rows[n] for n in names])  # (K, D)


def _cosine_logits(model, dense, class_emb):
    """dense HeadCLIP features (B, h, w, D) x class embeddings (K, D) -> (B, K, h, w): cosine
    similarity times CLIP's temperature exp(logit_scale) (CLIP Sec. 2.3), as in classification."""
    dense = F.normalize(dense.float(), dim=-1)
    class_emb = F.normalize(class_emb.to(dense), dim=-1)
    # float32 even under bf16 autocast, which would run the einsum in bf16: there a class that wins
    # a cell outright gets p = 1 exactly (1 - 1e-4 rounds to 1), and refine_with_sam's clipped
    # log-odds of it would be inf, its mask prompt and masks NaN
    with torch.autocast(dense.device.type, enabled=False):
        cosine = torch.einsum("bhwd,kd->bkhw", dense, class_emb)  # (B, K, h, w)
    return model.logit_scale.exp() * cosine


def dense_logits(model, images, class_emb):
    """Zero-shot per-patch classification (Sec. 4.2): images (B, 3, s, s), SAM-normalised, s a
    multiple of the patch size -> logits (B, K, s/16, s/16). Gradients flow unless the caller
    wraps the call in torch.no_grad()."""
    return _cosine_logits(model, model.clip_features(images)[1], class_emb)


def clip_mode_side(model):
    """The square input side of the CLIP-head pipeline: the paper's 448 px (a 28 x 28 grid)."""
    return vit_det.scaled_side(CLIP_SEMSEG_SIDE, model.cfg.encoder)


def draw_points(prob, threshold, max_points, generator=None, patch_size=16, valid=None):
    """Point prompts for one class from its coarse probability map (Sec. 4.4, App. C).

    prob (h, w): the class's per-cell probability; valid (h, w) bool: the cells a point may come
    from (default all; refine_with_sam passes the cells of the image, not of SAM's zero padding).
    Sec. 4.4 draws the points by importance sampling on the confidence: among the valid cells
    with prob > threshold, a cell is drawn with probability proportional to its prob, so a
    confident cell is drawn more often but every passing cell can be drawn. A number n of points,
    uniform in 1..max_points (the paper's "1 to 3"), is drawn WITHOUT replacement: n distinct
    cells, each next one proportional to prob among the cells not yet drawn (torch.multinomial's
    successive sampling). Two positive points on one cell would be a single point counted twice,
    so distinct points are the reading that gives SAM n prompts. The first point's cell therefore
    has probability exactly prob / (sum of passing prob). When no cell passes, the single most
    probable valid cell is used. All draws come from `generator`, so a seed fixes them.
    A cell (r, c) becomes the pixel (x, y) = ((c + 0.5) * patch_size, (r + 0.5) * patch_size),
    its centre in the encoder's input frame; SAM takes points as (x, y).
    Returns coords (max_points, 2) float and labels (max_points,) long: 1 for the n drawn points,
    -1 (SAM's "not a point") for the padding that lets all classes share one batched decoder
    call."""
    prob = prob.detach().float().cpu()
    if valid is not None:
        prob = prob.masked_fill(~valid.cpu(), float("-inf"))  # padding cells never pass
    floor = max(threshold, 0.0)  # a cell of confidence 0 has no weight to be drawn
    cells = (prob > floor).nonzero()  # (C, 2) rows of (r, c)
    if len(cells) == 0:
        pick = (prob == prob.max()).nonzero()[:1]  # argmax cell, (1, 2)
    else:
        n = 1 + int(torch.randint(min(max_points, len(cells)), (1,), generator=generator))
        confidence = prob[cells[:, 0], cells[:, 1]]  # (C,) sampling weights
        drawn = torch.multinomial(confidence, n, replacement=False, generator=generator)
        pick = cells[drawn]  # (n, 2) as (r, c)
    n = len(pick)
    coords = torch.zeros(max_points, 2)
    coords[:n] = (pick.flip(1).float() + 0.5) * patch_size  # (r, c) -> (x, y) pixels
    labels = torch.full((max_points,), -1, dtype=torch.long)
    labels[:n] = 1
    return coords, labels


def refine_with_sam(
    model,
    image_1024,
    class_emb,
    classes=None,
    threshold=0.5,
    max_points=3,
    generator=None,
    *,
    input_size,
):
    """Both heads from one forward (Sec. 4.4, App. C, Table 5).

    image_1024 (1, 3, S, S): SAM-preprocessed at the encoder's native side S (1024 for vit_b);
    input_size (h', w'): the resized image inside that frame (data.sam_preprocess returns it), the
    rest is SAM's zero padding. class_emb (K, D); classes: indices of the classes to refine
    (default all K; the softmax below still runs over all K). Returns (mask_logits (K', 4h, 4w),
    coarse (K, h, w)): HeadSAM's logits for each refined class (256 x 256 at 1024 px) and
    HeadCLIP's coarse logits.

    Choices the paper leaves open, made here:
      - The coarse map is HeadCLIP's own patch grid, 64 x 64 for ViT-B/16 at 1024 px, not the
        32 x 32 Sec. 4.4 names. HeadCLIP applies its LayerNorm + MLP to every patch token and the
        paper describes no pooling step, so 32 x 32 would need an operator (mean? max?) it does
        not state; and SAM's mask prompt is 256 x 256 = 4 x 64, which SAM's mask encoder brings
        back to the 64 x 64 image-embedding grid, so a 64 x 64 map meets the decoder cell for cell
        where a 32 x 32 one would only be a blurrier copy of it.
      - Points come from the softmax over classes (not from raw logits, whose offset is
        arbitrary), so `threshold` = 0.5 means "this class wins the cell with more than half".
      - SAM's mask prompt is expected to be SAM's own low-res logits, where 0 is the mask border.
        The coarse map is fed as the log-odds log(p / (1 - p)) of that per-class probability,
        which puts the same 0.5 border at SAM's 0; it is clipped to +-9.2 (p within 1e-4 of 0 or
        1) so saturated cells do not dominate the prompt, then upsampled bilinearly (h, w) ->
        (4h, 4w). Temperature-scaled CLIP logits themselves (about 100 x cosine) are neither
        centred nor on SAM's scale.
      - All classes go through the decoder in one batch with the single image embedding shared;
        point sets are padded to max_points with SAM's padding label -1.
      - Only the image, never SAM's padding, prompts: points come from cells whose centre lies
        inside input_size, and the mask prompt is "surely not" (-9.2) on the padded rows and
        columns of its 4h x 4w grid. HeadCLIP's logits there describe black padding, which can
        win a class's softmax (every VOC image is non-square)."""
    S = model.cfg.encoder.img_size
    p = model.cfg.encoder.patch_size
    if image_1024.ndim != 4 or image_1024.shape[0] != 1 or tuple(image_1024.shape[2:]) != (S, S):
        raise ValueError(
            f"refine_with_sam takes one image at the encoder's native size (1, 3, {S}, {S}), "
            f"got {list(image_1024.shape)}"
        )
    in_h, in_w = (int(v) for v in input_size)
    if not (0 < in_h <= S and 0 < in_w <= S):
        raise ValueError(
            f"refine_with_sam: input_size {tuple(input_size)} must lie inside the {S} x {S} frame"
        )
    emb, tokens = model.encoder.forward_features(image_1024)  # (1, C', h, w), (1, h, w, C)
    # the encoder's grid, 64 x 64 at 1024 px, not the paper's 32 x 32: see "Choices" above
    coarse = _cosine_logits(model, model.head_clip(tokens)[1], class_emb)  # (1, K, h, w)
    coarse = coarse[0]  # (1, K, h, w) -> (K, h, w)
    classes = list(range(coarse.shape[0])) if classes is None else [int(k) for k in classes]
    prob = coarse.softmax(dim=0)[classes]  # (K', h, w)
    h, w = coarse.shape[1:]
    centre = (torch.arange(max(h, w)) + 0.5) * p  # cell centres in input pixels
    valid = (centre[:h, None] < in_h) & (centre[None, :w] < in_w)  # (h, w): the image's cells
    coords = []
    labels = []
    for i in range(len(classes)):
        class_coords, class_labels = draw_points(
            prob[i], threshold, max_points, generator, p, valid
        )
        coords.append(class_coords)
        labels.append(class_labels)
    coords = torch.stack(coords).to(emb.device)  # (K', P, 2)
    labels = torch.stack(labels).to(emb.device)  # (K', P)
    mask_prompt = torch.logit(prob, eps=MASK_PROMPT_EPS)[:, None]  # (K', h, w) -> (K', 1, h, w)
    mask_prompt = F.interpolate(mask_prompt, (4 * h, 4 * w), mode="bilinear", align_corners=False)
    floor = math.log(MASK_PROMPT_EPS / (1 - MASK_PROMPT_EPS))  # -9.2: "surely not"
    mask_prompt[..., math.ceil(in_h * 4 * h / S) :, :] = floor  # padded rows of the 4h x 4w grid
    mask_prompt[..., :, math.ceil(in_w * 4 * w / S) :] = floor  # padded columns
    masks, _ = model.head_sam(
        emb, points=(coords, labels), masks=mask_prompt.to(emb.dtype), multimask_output=False
    )  # (K', 1, 4h, 4w)
    return masks[:, 0], coarse  # (K', 4h, 4w), (K, h, w)


@torch.no_grad()
def segment_by_text(model, img, prompts, mode="sam", threshold=0.5, generator=None, embed=None):
    """Segment a PIL RGB image by free-text prompts; what segment_demo.py runs.

    mode "clip": the Sec. 4.2 pipeline (square resize to `clip_mode_side`, dense_logits, logits
    upsampled bilinearly to the image, softmax over classes). mode "sam": the Table 5 pipeline
    (SAM's resize + pad to the native side, refine_with_sam, SAM's postprocessing back to the
    original size, sigmoid of each class's mask logits).

    Background rule: an implicit class "background" (its 80 template prompts) joins the softmax
    unless a prompt is already "background", and so does every name of the model's closed
    vocabulary (model.cfg.vocabulary, the toy world's classes) that is not a prompt. With one
    prompt a softmax over it alone would be 1 everywhere, and with two a winner always has >= 0.5,
    so without them no pixel could be left out. A pixel is labelled with its most probable prompt if
    that probability is >= 0.5 (in sam mode: inside that class's SAM mask), else -1 (background).
    Background classes get no SAM decode and no output row.

    `embed(model, names) -> (n, D)` makes the class embeddings: class_embeddings by default, or a
    memoised one (CachedEmbeddings) when the same names come back image after image.

    Returns a dict: probs (K, H, W) in 0..1 at the original size, labels (H, W) long in -1..K-1,
    confidence (K,): the mean probability of prompt k over the pixels labelled k (0 if none)."""
    prompts = list(prompts)
    if mode not in ("sam", "clip"):
        raise ValueError(f"mode must be 'sam' or 'clip', got {mode!r}")
    context_length = model.cfg.clip.context_length
    check_class_names(prompts, context_length=context_length, what="prompt", first=1)
    K = len(prompts)
    W, H = img.size
    asked = {q.strip().lower() for q in prompts}
    others = [w for w in (BACKGROUND, *model.cfg.vocabulary) if w.lower() not in asked]
    embed = embed or class_embeddings
    class_emb = embed(model, prompts + others)  # (K + background classes, D)
    device = model.logit_scale.device
    if mode == "clip":
        x = data.square_resize(img, clip_mode_side(model))[None].to(device)  # (1, 3, s, s)
        logits = dense_logits(model, x, class_emb)  # (1, K+B, h, w)
        logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
        probs = logits[0].softmax(dim=0)[:K]  # (1, K+B, H, W) -> (K, H, W)
    else:
        S = model.cfg.encoder.img_size
        x, input_size = data.sam_preprocess(img, S)  # (3, S, S), (h', w')
        masks, _ = refine_with_sam(
            model,
            x[None].to(device),
            class_emb,
            classes=range(K),
            threshold=threshold,
            generator=generator,
            input_size=input_size,
        )  # (K, 4h, 4w)
        masks = heads.postprocess_masks(masks[None], input_size, (H, W), img_size=S)  # (1, K, H, W)
        probs = masks[0].sigmoid()  # (K, H, W)
    best, labels = probs.max(dim=0)  # (H, W), (H, W)
    labels[best < 0.5] = -1
    confidence = probs.new_zeros(K)  # (K,)
    for k in range(K):
        if (labels == k).any():
            confidence[k] = probs[k][labels == k].mean()
    return {
        "probs": probs.float().cpu(),
        "labels": labels.cpu(),
        "confidence": confidence.float().cpu(),
    }


# ----------------------------------------------------------------------------- pictures

# One colour per label for every picture the repository draws (the demo's overlay, evaluate.py's
# --visualize panels, the toy world's figures): matplotlib's tab10 with its grey replaced by gold
# (paint draws the scene itself in grey), then fixed random colours; 255, the "ignore" label of
# segmentation maps, is white.
# fmt: off
_TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (255, 200, 0), (188, 189, 34), (23, 190, 207)]
# fmt: on
_RANDOM = np.random.default_rng(0).integers(0, 256, (246, 3), np.uint8)
PALETTE = np.concatenate([np.array(_TAB10, np.uint8), _RANDOM])  # (256, 3)
PALETTE[255] = 255


def paint(img, labels, alpha=0.6):
    """The one overlay painter: RGB PIL image (W, H) and integer labels (H, W) -> a new RGB image.
    The scene is drawn in grey (its luminance, PIL's "L"), so that no colour of its own can be
    taken for a label's: a green sky painted as "sky" would otherwise sit beside real green grass.
    Every pixel of label k >= 0 is blended with PALETTE[k] (alpha: the colour's weight), and the
    pixels on the border of a label's region take the colour itself, so that two touching regions
    stay apart; label -1 leaves the grey scene."""
    grey = np.asarray(img.convert("L"), dtype=np.float32)  # (H, W)
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (H, W, 3)
    lab = np.asarray(labels, dtype=np.int64)
    on = lab >= 0
    colour = PALETTE[lab % 256].astype(np.float32)  # (H, W, 3)
    rgb[on] = (1 - alpha) * rgb[on] + alpha * colour[on]  # (n, 3) painted pixels
    # a border pixel: labelled, with a 4-neighbour of another label (the image edge is no border)
    padded = np.pad(lab, 1, mode="edge")  # (H + 2, W + 2)
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    border = on & np.any([n != lab for n in neighbours], axis=0)  # (H, W)
    rgb[border] = colour[border]
    return Image.fromarray(rgb.round().astype(np.uint8))


def colorize(labels):
    """(H, W) integer labels -> an RGB PIL image, label k in PALETTE[k]."""
    return Image.fromarray(PALETTE[np.asarray(labels, dtype=np.int64) % 256])


def overlay(img, masks):
    """Bool instance masks (N, H, W) painted onto an RGB image, instance i in colour i (a later
    mask over an earlier one)."""
    labels = np.full(np.shape(masks)[1:], -1, np.int64)  # (H, W), -1: no instance
    for i, mk in enumerate(np.asarray(masks, dtype=bool)):
        labels[mk] = i
    return paint(img, labels)


def text_panel(text, size=(256, 256)):
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).multiline_text((8, 8), textwrap.fill(text, 36), fill="black")
    return im


def panels_row(panels, titles, height=256):
    """Panels (PIL images) scaled to one height, side by side, a title strip above each -> RGB
    image."""
    panels = [
        p.resize((max(1, round(p.width * height / p.height)), height), Image.NEAREST)
        for p in panels
    ]
    canvas = Image.new("RGB", (sum(p.width for p in panels), height + 20), "white")
    x = 0
    for p, t in zip(panels, titles):
        canvas.paste(p.convert("RGB"), (x, 20))
        ImageDraw.Draw(canvas).text((x + 4, 4), t[:48], fill="black")
        x += p.width
    return canvas


def save_panels(path, panels, titles=("image", "prediction", "ground truth"), height=256):
    """panels_row saved as `path` (its folder created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    panels_row(panels, titles, height).save(path)
