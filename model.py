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
Zero-shot use of the model (class embeddings, dense logits, the Table 5 refinement, segmentation
by text) lives in zero_shot.py.

Shape legend: B batch, H W token grid, C backbone width, D CLIP embedding size, L text length.
"""

from dataclasses import asdict, dataclass, field, fields, is_dataclass

import torch
from torch import nn

import clip
import heads
import vit_det
import weights


# ----------------------------------------------------------------------------- config

@dataclass
class SAMCLIPConfig:
    encoder: vit_det.ViTDetConfig     # the shared backbone (SAM's image encoder)
    # One head per teacher; each field names the module its config builds (SAMCLIP.__init__), so a
    # fork's new head is one more field here, e.g. head_dino with default None (README, "Adding a
    # teacher"). A head whose config is None is not built.
    # SAM's prompt encoder (frozen) + mask decoder
    head_sam: heads.SAMHeadConfig = field(metadata={"module": heads.HeadSAM})
    # the new CLIP head
    head_clip: heads.HeadCLIPConfig = field(metadata={"module": heads.HeadCLIP})
    clip: clip.CLIPConfig             # the CLIP teacher; its text tower is kept, frozen
    # A closed world's class names (the toy's eight), empty for the open vocabulary of a real CLIP.
    # zero_shot.segment_by_text lets the names not prompted compete as background: a toy CLIP never
    # read the word "background", so alone it would leave the rest of a scene to the nearest prompt.
    vocabulary: tuple = ()

    @staticmethod
    def from_dict(d):
        """The config of a checkpoint (asdict of this class) back as dataclasses; fields missing
        from an older file take their defaults."""
        values = {}
        for f in fields(SAMCLIPConfig):
            value = d.get(f.name)
            if value is None:
                continue
            if is_dataclass(f.type):
                # JSON-like lists back to the tuples the configs hold (global_attn_indexes)
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                value = f.type(**value)
            else:
                value = tuple(value)
            values[f.name] = value
        return SAMCLIPConfig(**values)


def head_clip_config(enc: vit_det.ViTDetConfig, clip_cfg: clip.CLIPConfig, mlp_hidden=None):
    """HeadCLIP sized to copy the encoder's last block and to output the teacher's embedding."""
    return heads.HeadCLIPConfig(width=enc.embed_dim, num_heads=enc.num_heads,
                                mlp_ratio=enc.mlp_ratio,
                                rel_pos_size=enc.grid, mlp_hidden=mlp_hidden or enc.embed_dim,
                                out_dim=clip_cfg.embed_dim, eps=enc.layer_norm_eps)


def make_config(encoder="vit_b", head_sam="sam", teacher="openclip_vit_l_14"):
    enc = vit_det.PRESETS[encoder]
    cl = clip.PRESETS[teacher]
    return SAMCLIPConfig(enc, heads.SAM_HEAD_PRESETS[head_sam], head_clip_config(enc, cl), cl)


PRESETS = {
    "vit_b": lambda: make_config("vit_b", "sam", "openclip_vit_l_14"),   # the paper's model
    "tiny": lambda: make_config("tiny", "tiny", "tiny"),                  # CPU tests
}


# ----------------------------------------------------------------------------- the model

class SAMCLIP(nn.Module):
    def __init__(self, cfg: SAMCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = vit_det.ImageEncoderViT(cfg.encoder)
        # the heads: self.head_sam = heads.HeadSAM(cfg.head_sam), self.head_clip = ..., and any
        # head a fork declares in SAMCLIPConfig, built by the module its field names
        for f in fields(cfg):
            if "module" in f.metadata and getattr(cfg, f.name) is not None:
                self.add_module(f.name, f.metadata["module"](getattr(cfg, f.name)))
        self.text = clip.TextTower(cfg.clip)
        self.register_buffer("logit_scale", torch.tensor(4.6052))  # CLIP's learned log temperature
        self.text.requires_grad_(False)               # TextEncCLIP stays frozen (Sec. 3)
        self.head_sam.prompt_encoder.requires_grad_(False)  # so does SAM's prompt encoder

    # -- CLIP side ---------------------------------------------------------------------------
    def clip_features(self, images):
        """(B, 3, H, W) SAM-normalised -> HeadCLIP's pooled (B, D) and dense (B, H/16, W/16, D)
        features."""
        return self.head_clip(self.encoder.forward_tokens(images))

    def encode_image(self, images):
        """The image embedding of Eq. 1 (unnormalised): Pool(HeadCLIP(Enc(x))), (B, D)."""
        return self.clip_features(images)[0]

    def encode_text(self, tokens):
        """(B, L) tokens from clip.tokenize -> (B, D), unnormalised, by the frozen text tower."""
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

    def set_grad_checkpointing(self, enabled):
        """Recompute the encoder's blocks and the mask decoder's prompt sets in the backward instead
        of keeping their activations (training memory; the same numbers). train.py turns it on
        while the encoder trains."""
        self.encoder.grad_checkpointing = self.head_sam.mask_decoder.grad_checkpointing = enabled

    # -- construction and checkpoints --------------------------------------------------------
    @classmethod
    def from_teachers(cls, sam_checkpoint, clip_checkpoint, verbose=True):
        """The starting point of training: encoder + HeadSAM from SAM, text tower and logit scale
        from CLIP, HeadCLIP fresh with each block a copy of SAM's last encoder block (App. A)."""
        return cls.from_modules(load_teachers(sam_checkpoint, clip_checkpoint, verbose))

    @classmethod
    def from_modules(cls, teachers, vocabulary=(), **more_heads):
        """As from_teachers, from the teachers already loaded (train.py keeps them, frozen).
        teachers: {"sam_encoder", "sam_head", "clip"}; more_heads: configs of heads a fork adds
        (their fields in SAMCLIPConfig), which start from their own initialisation."""
        enc = teachers["sam_encoder"]
        teacher_clip = teachers["clip"]
        cfg = SAMCLIPConfig(enc.cfg, teachers["sam_head"].cfg,
                            head_clip_config(enc.cfg, teacher_clip.config), teacher_clip.config,
                            tuple(vocabulary), **more_heads)
        model = cls(cfg)
        model.encoder.load_state_dict(enc.state_dict())
        model.head_sam.load_state_dict(teachers["sam_head"].state_dict())
        model.text.load_state_dict(teacher_clip.text.state_dict())
        model.logit_scale.data.copy_(teacher_clip.logit_scale.data)
        model.head_clip.init_from_block(model.encoder.blocks[-1])
        return model

    def save(self, path, **extra):
        """Write {"kind": "samclip", "config", "model", **extra} atomically to `path`."""
        ckpt = {"kind": "samclip", "config": asdict(self.cfg), "model": self.state_dict(), **extra}
        weights.atomic_save(ckpt, path)

    @classmethod
    def load(cls, path):
        """A merged checkpoint written by `save`, in eval mode. A SAM or CLIP file gets a clear
        error."""
        # memory-mapped: read as the tensors are used
        ckpt = weights.safe_load(path, "SAM-CLIP checkpoint", mmap=True)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "samclip":
            kind = weights.guess_kind(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise weights.CheckpointError(
                f"{path}: expected a merged SAM-CLIP checkpoint (written by SAMCLIP.save or "
                f"train.py), but it is {kind}")
        with weights.skeleton():   # shapes only: no random init that the file would overwrite
            model = cls(SAMCLIPConfig.from_dict(ckpt["config"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        weights.load_checked(model, state, path, "SAM-CLIP", assign=True)
        return model.eval()


def load_teachers(sam_checkpoint, clip_checkpoint, verbose=True):
    """The frozen teachers of Sec. 3 from the official files, by name: "sam_encoder" and "sam_head"
    (the targets of L_SAM and the student's initialisation) and "clip" (EncCLIP for L_CLIP;
    TextEncCLIP, which the merged model keeps). No gradients, eval mode. A fork adds its teacher
    to this dict where train.py builds it (train.build_teachers)."""
    sam_sd = weights.read_state_dict(sam_checkpoint, "SAM checkpoint")    # read the file once
    src = weights.source_name(sam_checkpoint)
    teachers = {"sam_encoder": vit_det.load_sam_encoder(sam_sd, verbose=verbose, source=src),
                "sam_head": heads.load_sam_head(sam_sd, verbose=verbose, source=src),
                "clip": clip.load_clip(clip_checkpoint)}
    for teacher in teachers.values():
        teacher.requires_grad_(False).eval()
    return teachers


def fast_bf16(device):
    """Whether `device` runs bfloat16 matmuls faster than float32: a CUDA GPU of compute capability
    >= 8 (Ampere and later), or a CPU with AMX or AVX-512 BF16 units (elsewhere bf16 is emulated,
    slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast(device, dtype):
    """The context every inference entry point runs in: torch.autocast to bfloat16 on `device` for
    dtype "bf16" (matmuls and convolutions in bf16; softmax, norms and losses stay fp32 by
    autocast's own rules), a no-op for "fp32"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def compile_modules(model, enabled):
    """--compile: torch.compile, in place, what every path runs through (each encoder block, the
    neck, HeadCLIP) with nn.Module.compile, so parameter names and checkpoints stay as they are;
    HeadSAM's prompt-dependent shapes would recompile per call and stay eager. Compilation happens
    at the first call (and again for a new input shape), so callers time a warm-up to report it.
    -> model."""
    if enabled:
        for module in (*model.encoder.blocks, model.encoder.neck, model.head_clip):
            module.compile()
    return model


def build_samclip(preset="tiny", seed=0):
    """A randomly initialised SAMCLIP of a preset (what `--preset tiny` trains, no weights)."""
    torch.manual_seed(seed)
    cfg = PRESETS[preset]()
    teachers = {"sam_encoder": vit_det.build_vit_det(cfg.encoder),
                "sam_head": heads.build_head_sam(cfg.head_sam),
                "clip": clip.build_clip(cfg.clip)}
    return SAMCLIP.from_modules(teachers)
