"""The merged model, SAM-CLIP (Wang et al. 2023, Sec. 3, Fig. 2), and its checkpoints.

    SAMCLIP = EncSAM-CLIP (vit_det.ImageEncoderViT, initialised from SAM)
            + HeadSAM  (heads.HeadSAM: SAM's prompt encoder, frozen, and mask decoder)
            + HeadCLIP (heads.HeadCLIP: 3 blocks copied from SAM's last block, max pool, LN, MLP)
            + TextEncCLIP (clip.TextTower, frozen, from the CLIP teacher) and CLIP's logit_scale

One backbone forward serves both heads (Sec. 4.4): `encoder.forward_features(x)` returns the neck
output for HeadSAM and the last block's token grid for HeadCLIP.

- `SAMCLIP.from_teachers(sam_checkpoint, clip_checkpoint)`: the starting point of training, built
  from the official files (encoder and HeadSAM from SAM, text tower from CLIP, HeadCLIP fresh with
  its blocks copied from SAM's last encoder block, App. A).
- `model.save(path)` / `SAMCLIP.load(path)`: one file `{"kind": "samclip", "config", "model"}`
  holding everything the demo and the evaluation need; read with `weights_only=True`.
- Zero-shot segmentation by text (last section, Sec. 4.2, 4.4, App. C): class embeddings over the
  80 OpenAI templates, HeadCLIP's dense logits, and the both-heads refinement of Table 5, shared
  by segment_demo.py and evaluate.py.

Shape legend: B batch, H W token grid, C backbone width, D CLIP embedding size, L text length.
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from torch import nn

import clip
import data
import heads
import vit_det
import weights


# ----------------------------------------------------------------------------- config

@dataclass
class SAMCLIPConfig:
    encoder: vit_det.ViTDetConfig     # the shared backbone (SAM's image encoder)
    head_sam: heads.SAMHeadConfig     # SAM's prompt encoder + mask decoder
    head_clip: heads.HeadCLIPConfig   # the new CLIP head
    clip: clip.CLIPConfig             # the CLIP teacher; its text tower is kept, frozen

    @staticmethod
    def from_dict(d):
        enc = dict(d["encoder"], global_attn_indexes=tuple(d["encoder"]["global_attn_indexes"]))
        return SAMCLIPConfig(vit_det.ViTDetConfig(**enc), heads.SAMHeadConfig(**d["head_sam"]),
                             heads.HeadCLIPConfig(**d["head_clip"]), clip.CLIPConfig(**d["clip"]))


def head_clip_config(enc: vit_det.ViTDetConfig, clip_cfg: clip.CLIPConfig, mlp_hidden=None):
    """HeadCLIP sized to copy the encoder's last block and to output the teacher's embedding."""
    return heads.HeadCLIPConfig(width=enc.embed_dim, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio,
                                rel_pos_size=enc.grid, mlp_hidden=mlp_hidden or enc.embed_dim,
                                out_dim=clip_cfg.embed_dim, eps=enc.layer_norm_eps)


def make_config(encoder="vit_b", head_sam="sam", teacher="openclip_vit_l_14"):
    enc, cl = vit_det.PRESETS[encoder], clip.PRESETS[teacher]
    return SAMCLIPConfig(enc, heads.SAM_HEAD_PRESETS[head_sam], head_clip_config(enc, cl), cl)


PRESETS = {
    "vit_b": lambda: make_config("vit_b", "sam", "openclip_vit_l_14"),   # the paper's model
    "tiny": lambda: make_config("tiny", "tiny", "tiny"),                  # CPU tests and the built-in demo
}


# ----------------------------------------------------------------------------- the model

class SAMCLIP(nn.Module):
    def __init__(self, cfg: SAMCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = vit_det.ImageEncoderViT(cfg.encoder)
        self.head_sam = heads.HeadSAM(cfg.head_sam)
        self.head_clip = heads.HeadCLIP(cfg.head_clip)
        self.text = clip.TextTower(cfg.clip)
        self.register_buffer("logit_scale", torch.tensor(4.6052))  # CLIP's learned log temperature
        self.text.requires_grad_(False)               # TextEncCLIP stays frozen (Sec. 3)
        self.head_sam.prompt_encoder.requires_grad_(False)  # so does SAM's prompt encoder

    # -- CLIP side ---------------------------------------------------------------------------
    def clip_features(self, images):
        """(B, 3, H, W) SAM-normalised -> pooled (B, D) and dense (B, H/16, W/16, D) HeadCLIP features."""
        return self.head_clip(self.encoder.forward_tokens(images))

    def encode_image(self, images):
        """The image embedding of Eq. 1 (unnormalised): Pool(HeadCLIP(Enc(x))), (B, D)."""
        return self.clip_features(images)[0]

    def encode_text(self, tokens):
        """(B, L) tokens from clip.tokenize -> (B, D), unnormalised, through the frozen text tower."""
        return self.text(tokens)

    # -- both heads from one forward (Sec. 4.4) ----------------------------------------------
    def forward(self, images, points=None, boxes=None, masks=None, multimask_output=False):
        """images (B, 3, S, S) SAM-normalised and padded at the encoder's native size S.
        Returns a dict: `clip_pooled` (B, D), `clip_dense` (B, H, W, D), `image_embeddings`
        (B, C', H, W), and when a prompt is given `masks` (B, M, 4H, 4W) logits and `iou` (B, M)."""
        emb, tokens = self.encoder.forward_features(images)
        pooled, dense = self.head_clip(tokens)
        out = {"clip_pooled": pooled, "clip_dense": dense, "image_embeddings": emb}
        if points is not None or boxes is not None or masks is not None:
            out["masks"], out["iou"] = self.head_sam(emb, points=points, boxes=boxes, masks=masks,
                                                     multimask_output=multimask_output)
        return out

    # -- construction and checkpoints --------------------------------------------------------
    @classmethod
    def from_teachers(cls, sam_checkpoint, clip_checkpoint, verbose=True):
        """The starting point of training: encoder + HeadSAM from SAM, text tower and logit scale
        from CLIP, HeadCLIP fresh with each block a copy of SAM's last encoder block (App. A)."""
        sam_sd = weights.read_state_dict(sam_checkpoint, "SAM checkpoint")  # read the file once
        src = weights.source_name(sam_checkpoint)
        enc = vit_det.load_sam_encoder(sam_sd, verbose=verbose, source=src)
        head = heads.load_sam_head(sam_sd, verbose=verbose, source=src)
        return cls.from_modules(enc, head, clip.load_clip(clip_checkpoint))

    @classmethod
    def from_modules(cls, enc, head, teacher):
        """As from_teachers, from already loaded modules (train.py keeps them as frozen teachers)."""
        cfg = SAMCLIPConfig(enc.cfg, head.cfg, head_clip_config(enc.cfg, teacher.config), teacher.config)
        model = cls(cfg)
        model.encoder.load_state_dict(enc.state_dict())
        model.head_sam.load_state_dict(head.state_dict())
        model.text.load_state_dict(teacher.text.state_dict())
        model.logit_scale.data.copy_(teacher.logit_scale.data)
        init_head_clip(model.head_clip)
        model.head_clip.init_from_block(model.encoder.blocks[-1])
        return model

    def save(self, path, **extra):
        """Write {"kind": "samclip", "config", "model", **extra} atomically to `path`."""
        weights.atomic_save({"kind": "samclip", "config": asdict(self.cfg), "model": self.state_dict(), **extra}, path)

    @classmethod
    def load(cls, path):
        """A merged checkpoint written by `save`, in eval mode. A SAM or CLIP file gets a clear error."""
        ckpt = weights.safe_load(path, "SAM-CLIP checkpoint")
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "samclip":
            kind = weights.guess_kind(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise weights.CheckpointError(f"{path}: expected a merged SAM-CLIP checkpoint (written by "
                                          f"SAMCLIP.save or train.py), but it is {kind}")
        model = cls(SAMCLIPConfig.from_dict(ckpt["config"]))
        weights.load_checked(model, {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()},
                             path, "SAM-CLIP")
        return model.eval()


def init_head_clip(head: heads.HeadCLIP):
    """Fresh LayerNorm + MLP of HeadCLIP: truncated-normal weights, zero biases."""
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def build_samclip(preset="tiny", seed=0):
    """A randomly initialised SAMCLIP of a preset (what `--preset tiny` trains without any weights)."""
    torch.manual_seed(seed)
    cfg = PRESETS[preset]()
    return SAMCLIP.from_modules(vit_det.build_vit_det(cfg.encoder), heads.build_head_sam(cfg.head_sam),
                                clip.build_clip(cfg.clip))


# ---- zero-shot segmentation by text (Sec. 4.2, 4.4, App. C)
#
# Everything the demo (segment_demo.py) and the evaluation (evaluate.py) share to turn class names
# into per-pixel scores. Two pipelines:
#   - CLIP head alone (Sec. 4.2, zero-shot semantic segmentation): a square 448 px input gives a
#     28 x 28 grid of HeadCLIP patch embeddings; each is compared with the text embedding of every
#     class (80 prompt templates averaged) and the logits are upsampled bilinearly to the image.
#   - Both heads (Sec. 4.4, App. C, Table 5): one 1024 px backbone forward; HeadCLIP's coarse
#     per-class map picks 1 to 3 point prompts and serves as the mask prompt; HeadSAM returns a
#     sharp 256 x 256 mask per class.
# Extra legend for this section: K classes, T templates, h w HeadCLIP grid, P points per class,
# S the encoder's native input side, H W the original image size.

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021, Sec. 3.1.4; OpenAI's notebook
# "Prompt_Engineering_for_ImageNet.ipynb"), in the notebook's order. SAM-CLIP uses them for
# zero-shot classification and segmentation (Sec. 4.2).
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

BACKGROUND = "background"   # the implicit extra class of segment_by_text (see there)
CLIP_SEMSEG_SIDE = 448      # Sec. 4.2: zero-shot semantic segmentation runs at 448 x 448
MASK_PROMPT_EPS = 1e-4      # log-odds of the mask prompt are clipped at logit(1 - eps) = 9.2


def _short(text, n=60):
    return text if len(text) <= n else text[:n - 3] + "..."


def check_class_names(class_names, templates=OPENAI_IMAGENET_TEMPLATES, context_length=77,
                      what="class name", first=0):
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
            n = len(tok.encode(template.format(name))) + 2      # + start and end tokens
            if n > context_length:
                raise ValueError(f"{what} {i} ({_short(name)!r}) is too long: the prompt "
                                 f"{_short(template.format(name))!r} has {n} tokens, CLIP's text "
                                 f"tower reads at most {context_length} (start and end included)")


@torch.no_grad()
def class_embeddings(model, class_names, templates=OPENAI_IMAGENET_TEMPLATES, batch_size=256):
    """CLIP's zero-shot classifier (CLIP Sec. 3.1.4): every class name is put into every template,
    each prompt is embedded by the frozen text tower and L2-normalised, the T embeddings of a class
    are averaged and the mean re-normalised. Returns (K, D) unit rows, on the model's device."""
    names, templates = list(class_names), list(templates)
    ctx = model.cfg.clip.context_length
    check_class_names(names, templates, ctx)
    prompts = [t.format(name) for name in names for t in templates]            # K*T texts
    tokens = clip.tokenize(prompts, ctx)                                        # (K*T, L)
    tokens = clip.trim_padding(tokens)                                          # (K*T, L')
    device = model.logit_scale.device
    feats = [F.normalize(model.encode_text(tokens[i:i + batch_size].to(device)).float(), dim=-1)
             for i in range(0, len(prompts), batch_size)]
    emb = torch.cat(feats).reshape(len(names), len(templates), -1)             # (K*T, D) -> (K, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)                                 # (K, D)


def _cosine_logits(model, dense, class_emb):
    """dense HeadCLIP features (B, h, w, D) x class embeddings (K, D) -> (B, K, h, w): cosine
    similarity times CLIP's temperature exp(logit_scale) (CLIP Sec. 2.3), as in classification."""
    dense = F.normalize(dense.float(), dim=-1)
    class_emb = F.normalize(class_emb.to(dense), dim=-1)
    return model.logit_scale.exp() * torch.einsum("bhwd,kd->bkhw", dense, class_emb)  # (B, K, h, w)


def dense_logits(model, images, class_emb):
    """Zero-shot per-patch classification (Sec. 4.2): images (B, 3, s, s), SAM-normalised, s a
    multiple of the patch size -> logits (B, K, s/16, s/16). Gradients flow unless the caller
    wraps the call in torch.no_grad()."""
    return _cosine_logits(model, model.clip_features(images)[1], class_emb)


def scaled_side(side, encoder_cfg):
    """A resolution of the paper (stated for the 1024 px ViT-B) for an encoder of native side S:
    side * S / 1024, rounded up to a multiple of the patch size. The identity for the paper's
    model; for the tiny preset (160 px) 224 -> 48, 336 -> 64, 448 -> 80, 1024 -> 160."""
    S, p = encoder_cfg.img_size, encoder_cfg.patch_size
    return max(p, math.ceil(side * S / 1024 / p) * p)


def clip_mode_side(model):
    """The square input side of the CLIP-head pipeline: the paper's 448 px (a 28 x 28 grid)."""
    return scaled_side(CLIP_SEMSEG_SIDE, model.cfg.encoder)


def draw_points(prob, threshold, max_points, generator=None, patch_size=16, valid=None):
    """Point prompts for one class from its coarse probability map (App. C).

    prob (h, w): the class's per-cell probability; valid (h, w) bool: the cells a point may come
    from (default all; refine_with_sam passes the cells of the image, not of SAM's zero padding).
    A number n of points, uniform in 1..max_points (the paper's "1 to 3"), is drawn without
    replacement from the valid cells with prob > threshold; when no cell passes, the single most
    probable valid cell is used. A cell (r, c)
    becomes the pixel (x, y) = ((c + 0.5) * patch_size, (r + 0.5) * patch_size), its centre in
    the encoder's input frame; SAM takes points as (x, y).
    Returns coords (max_points, 2) float and labels (max_points,) long: 1 for the n drawn points,
    -1 (SAM's "not a point") for the padding that lets all classes share one batched decoder call."""
    prob = prob.detach().float().cpu()
    if valid is not None:
        prob = prob.masked_fill(~valid.cpu(), float("-inf"))               # padding cells never pass
    cells = (prob > threshold).nonzero()                                   # (C, 2) rows of (r, c)
    if len(cells) == 0:
        cells = (prob == prob.max()).nonzero()[:1]                         # argmax cell, (1, 2)
    n_max = min(max_points, len(cells))
    n = 1 + int(torch.randint(n_max, (1,), generator=generator))
    pick = cells[torch.randperm(len(cells), generator=generator)[:n]]      # (n, 2) as (r, c)
    coords = torch.zeros(max_points, 2)
    coords[:n] = (pick.flip(1).float() + 0.5) * patch_size                 # (r, c) -> (x, y) pixels
    labels = torch.full((max_points,), -1, dtype=torch.long)
    labels[:n] = 1
    return coords, labels


def refine_with_sam(model, image_1024, class_emb, classes=None, threshold=0.5, max_points=3, generator=None, *,
                    input_size):
    """Both heads from one forward (Sec. 4.4, App. C, Table 5).

    image_1024 (1, 3, S, S): SAM-preprocessed at the encoder's native side S (1024 for vit_b);
    input_size (h', w'): the resized image inside that frame (data.sam_preprocess returns it), the
    rest is SAM's zero padding. class_emb (K, D); classes: indices of the classes to refine
    (default all K; the softmax below still runs over all K). Returns (mask_logits (K', 4h, 4w),
    coarse (K, h, w)): HeadSAM's logits for each refined class (256 x 256 at 1024 px) and
    HeadCLIP's coarse logits.

    Choices the paper leaves open, made here:
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
    S, p = model.cfg.encoder.img_size, model.cfg.encoder.patch_size
    if image_1024.ndim != 4 or image_1024.shape[0] != 1 or tuple(image_1024.shape[2:]) != (S, S):
        raise ValueError(f"refine_with_sam takes one image at the encoder's native size (1, 3, {S}, {S}), "
                         f"got {list(image_1024.shape)}")
    in_h, in_w = (int(v) for v in input_size)
    if not (0 < in_h <= S and 0 < in_w <= S):
        raise ValueError(f"refine_with_sam: input_size {tuple(input_size)} must lie inside the {S} x {S} frame")
    emb, tokens = model.encoder.forward_features(image_1024)              # (1, C', h, w), (1, h, w, C)
    coarse = _cosine_logits(model, model.head_clip(tokens)[1], class_emb)[0]  # (1, K, h, w) -> (K, h, w)
    classes = list(range(coarse.shape[0])) if classes is None else [int(k) for k in classes]
    prob = coarse.softmax(dim=0)[classes]                                 # (K', h, w)
    h, w = coarse.shape[1:]
    centre = (torch.arange(max(h, w)) + 0.5) * p                          # cell centres in input pixels
    valid = (centre[:h, None] < in_h) & (centre[None, :w] < in_w)         # (h, w): the image's cells
    pts = [draw_points(prob[i], threshold, max_points, generator, p, valid) for i in range(len(classes))]
    coords = torch.stack([c for c, _ in pts]).to(emb.device)              # (K', P, 2)
    labels = torch.stack([l for _, l in pts]).to(emb.device)              # (K', P)
    mask_prompt = torch.logit(prob, eps=MASK_PROMPT_EPS)[:, None]         # (K', h, w) -> (K', 1, h, w)
    mask_prompt = F.interpolate(mask_prompt, (4 * h, 4 * w), mode="bilinear", align_corners=False)
    floor = math.log(MASK_PROMPT_EPS / (1 - MASK_PROMPT_EPS))             # -9.2: "surely not"
    mask_prompt[..., math.ceil(in_h * 4 * h / S):, :] = floor             # padded rows of the 4h x 4w grid
    mask_prompt[..., :, math.ceil(in_w * 4 * w / S):] = floor             # padded columns
    masks, _ = model.head_sam(emb, points=(coords, labels), masks=mask_prompt.to(emb.dtype),
                              multimask_output=False)                     # (K', 1, 4h, 4w)
    return masks[:, 0], coarse                                            # (K', 4h, 4w), (K, h, w)


@torch.no_grad()
def segment_by_text(model, img, prompts, mode="sam", threshold=0.5, generator=None):
    """Segment a PIL RGB image by free-text prompts; what segment_demo.py runs.

    mode "clip": the Sec. 4.2 pipeline (square resize to `clip_mode_side`, dense_logits, logits
    upsampled bilinearly to the image, softmax over classes). mode "sam": the Table 5 pipeline
    (SAM's resize + pad to the native side, refine_with_sam, SAM's postprocessing back to the
    original size, sigmoid of each class's mask logits).

    Background rule: an implicit class "background" (its 80 template prompts) joins the softmax
    unless a prompt is already "background". With one prompt a softmax over it alone would be 1
    everywhere, and with two a winner always has >= 0.5, so without it no pixel could be left
    out. A pixel is labelled with its most probable prompt if that probability is >= 0.5 (in sam
    mode: inside that class's SAM mask), else -1 (background). The background class gets no SAM
    decode and no output row.

    Returns a dict: probs (K, H, W) in 0..1 at the original size, labels (H, W) long in -1..K-1,
    confidence (K,): the mean probability of prompt k over the pixels labelled k (0 if none)."""
    prompts = list(prompts)
    if mode not in ("sam", "clip"):
        raise ValueError(f"mode must be 'sam' or 'clip', got {mode!r}")
    check_class_names(prompts, context_length=model.cfg.clip.context_length, what="prompt", first=1)
    K, (W, H) = len(prompts), img.size
    add_background = BACKGROUND not in (q.strip().lower() for q in prompts)
    class_emb = class_embeddings(model, prompts + [BACKGROUND] * add_background)  # (K or K+1, D)
    device = model.logit_scale.device
    if mode == "clip":
        x = data.square_resize(img, clip_mode_side(model))[None].to(device)      # (1, 3, s, s)
        logits = dense_logits(model, x, class_emb)                               # (1, K+1, h, w)
        logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)  # (1, K+1, H, W)
        probs = logits[0].softmax(dim=0)[:K]                                     # (K, H, W)
    else:
        S = model.cfg.encoder.img_size
        x, input_size = data.sam_preprocess(img, S)                              # (3, S, S), (h', w')
        masks, _ = refine_with_sam(model, x[None].to(device), class_emb, classes=range(K), threshold=threshold,
                                   generator=generator, input_size=input_size)   # (K, 4h, 4w)
        masks = heads.postprocess_masks(masks[None], input_size, (H, W), img_size=S)  # (1, K, H, W)
        probs = masks[0].sigmoid()                                               # (K, H, W)
    best, labels = probs.max(dim=0)                                              # (H, W), (H, W)
    labels[best < 0.5] = -1
    confidence = torch.stack([probs[k][labels == k].mean() if (labels == k).any() else probs.new_zeros(())
                              for k in range(K)])                                # (K,)
    return {"probs": probs.float().cpu(), "labels": labels.cpu(), "confidence": confidence.float().cpu()}
