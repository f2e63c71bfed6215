"""The shared image encoder EncSAM-CLIP: SAM's ViT-Det backbone (SAM Sec. 3, App. A; Li et al.
2022).

SAM-CLIP (Sec. 3, Fig. 2) keeps SAM's image encoder as the base model and distils CLIP into it,
so this file is SAM's encoder, rebuilt module by module so the official checkpoints load as they
are:

    image [B,3,1024,1024] -> 16x16 patch embedding -> + absolute position embedding (64x64 grid)
      -> 12 / 24 / 32 ViT blocks: windowed attention (14x14 windows, padded) everywhere except a
         few global-attention blocks; every attention adds decomposed relative positions (MViTv2)
      -> token grid [B,64,64,C]  ......................... feeds HeadCLIP (heads.py)
      -> neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d -> [B,256,64,64]  ... feeds HeadSAM

SAM-CLIP also feeds 224 and 448 px images (Sec. 4.1), so the encoder runs at any multiple of the
patch size: the absolute position grid is resized bicubically (as ViT-Det's `get_abs_pos` does) and
the global blocks' relative-position tables linearly (as SAM's `get_rel_pos` does).

Entry points: `build_vit_det(preset_or_config)`, `load_sam_encoder(checkpoint)`; `enc(x)` returns
the neck output and `enc.forward_features(x)` returns `(neck output, last block's token grid)`.

Shape legend: B batch, H W token grid, C channels (embed_dim), nh heads, hd head dim, ws window
size, nW windows per image, N = H*W tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import weights


# ----------------------------------------------------------------------------- config

@dataclass
class ViTDetConfig:
    img_size: int = 1024              # native input side in pixels (SAM: 1024)
    patch_size: int = 16              # patch side in pixels; token grid = img_size // patch_size
    embed_dim: int = 768              # token width C
    depth: int = 12                   # number of transformer blocks
    num_heads: int = 12               # attention heads per block
    mlp_ratio: float = 4.0            # MLP hidden width = mlp_ratio * C
    out_chans: int = 256              # neck output channels (the mask decoder's width)
    window_size: int = 14             # side of the attention windows of non-global blocks
    global_attn_indexes: tuple = (2, 5, 8, 11)  # blocks that attend over the whole grid
    layer_norm_eps: float = 1e-6      # SAM uses eps 1e-6 in the encoder's LayerNorms

    @property
    def grid(self):
        return self.img_size // self.patch_size


# Official SAM sizes (segment_anything/build_sam.py) and the tiny fixture configuration.
PRESETS = {
    "vit_b": ViTDetConfig(embed_dim=768, depth=12, num_heads=12,
                          global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ViTDetConfig(embed_dim=1024, depth=24, num_heads=16,
                          global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ViTDetConfig(embed_dim=1280, depth=32, num_heads=16,
                          global_attn_indexes=(7, 15, 23, 31)),
    "tiny": ViTDetConfig(img_size=160, embed_dim=64, depth=4, num_heads=4, out_chans=32,
                         window_size=4, global_attn_indexes=(1, 3)),
    # the toy SAM teacher (toy/teachers.py, toy/weights/toy_sam.pth): 256 px, a 16 x 16 grid,
    # head dim 32; the neck (the mask decoder's width) 64 wide
    "toy": ViTDetConfig(img_size=256, embed_dim=128, depth=4, num_heads=4, out_chans=64,
                        window_size=8, global_attn_indexes=(1, 3)),
}


def scaled_side(side, cfg: ViTDetConfig):
    """A resolution of the paper (stated for the 1024 px ViT-B) for an encoder of native side S:
    side * S / 1024, rounded up to a multiple of the patch size. The identity for the paper's
    model; for the tiny preset (160 px) 224 -> 48, 336 -> 64, 448 -> 80, 1024 -> 160. Training,
    evaluation and the demo read every resolution of the paper through it."""
    S = cfg.img_size
    p = cfg.patch_size
    return max(p, math.ceil(side * S / 1024 / p) * p)


# ----------------------------------------------------------------------------- building blocks

class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a [B,C,H,W] map (used by the neck and the SAM head)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):                                   # x: (B, C, H, W)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (transformer feed-forward)."""

    def __init__(self, dim, hidden_dim, act=nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                                   # (B, 3, H*p, W*p)
        return self.proj(x).permute(0, 2, 3, 1)             # (B, C, H, W) -> (B, H, W, C)


def resize_rel_pos(rel_pos, length):
    """Linearly resize a relative-position table [2S-1, hd] to [length, hd] (SAM's get_rel_pos)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    t = rel_pos.t().unsqueeze(0)                                          # (1, hd, 2S-1)
    return F.interpolate(t, size=length, mode="linear").squeeze(0).t()    # (length, hd)


def get_rel_pos(q_size, k_size, rel_pos):
    """Embeddings R[i, j] of the relative offset between query row i and key row j: [q, k, hd].
    Offsets are rescaled when query and key sizes differ, exactly as MViTv2 / SAM do."""
    rel_pos = resize_rel_pos(rel_pos, int(2 * max(q_size, k_size) - 1))
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]                         # (q, k, hd)


def add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    """SAM's add_decomposed_rel_pos (from MViTv2): the attention logits plus the decomposed
    relative-position bias, attn[(i, j), (k, l)] += q_(i,j) . Rh[i, k] + q_(i,j) . Rw[j, l], on the
    *unscaled* query, so the bias is a height term plus a width term instead of a full table.
    attn (B, nh, q_h*q_w, k_h*k_w), q (B, nh, q_h*q_w, hd) -> attn with the bias added."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)                               # (q_h, k_h, hd)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)                               # (q_w, k_w, hd)
    r_q = q.unflatten(2, (q_h, q_w))                                    # (B, nh, q_h, q_w, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)                   # (B, nh, q_h, q_w, k_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)                   # (B, nh, q_h, q_w, k_w)
    attn = attn.unflatten(3, (k_h, k_w)).unflatten(2, (q_h, q_w))   # (B, nh, q_h, q_w, k_h, k_w)
    attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
    return attn.flatten(4).flatten(2, 3)                                # (B, nh, q_h*q_w, k_h*k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a token grid with decomposed relative-position bias, SAM's
    image-encoder attention: softmax(q k^T / sqrt(hd) + bias) v, the bias from
    add_decomposed_rel_pos. Every block, windowed or global, runs it through
    chunked_rel_pos_attention (below): the same numbers, faster and in less memory."""

    chunked = True  # False: the formula as written in forward (the tests compare the two)

    def __init__(self, dim, num_heads, rel_pos_size):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # one table entry per relative offset -(S-1)..(S-1) along each axis (S: window or grid side)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def forward(self, x):                                   # x: (B, H, W, C)
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1)     # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 x (B, nh, N, hd)
        if self.chunked:
            x = chunked_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W))
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)              # (B, nh, N, N)
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
            attn = attn.softmax(dim=-1)
            x = attn @ v                                               # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, H, W, C)           # (B, nh, N, hd) -> (B, H, W, C)
        return self.proj(x)


# Queries per scaled_dot_product_attention call in chunked_rel_pos_attention. A global block's bias
# at 1024 px is (B, nh, 4096, 4096), 0.8 GB for ViT-B in fp32; in runs of 1024 queries only a
# quarter of it exists at once in inference. (Folding the bias into q and k instead,
# q' = [q/sqrt(hd), q.Rh, q.Rw] and k' = [k, one-hot row, one-hot column], is exact too and needs
# no bias at all, but its 3x wider q.k product was slower on CPU than the bias it saves.)
QUERY_CHUNK = 1024


def decomposed_rel_pos_bias(q, Rh, Rw, start, W, out=None):
    """add_decomposed_rel_pos's bias on its own, for a run of queries: bias[(i, j), (k, l)] =
    q_(i,j) . Rh[i, k] + q_(i,j) . Rw[j, l].
    q: (..., n, hd), the queries of tokens start .. start+n-1 of the row-major H x W grid;
    Rh (H, H, hd), Rw (W, W, hd) from get_rel_pos -> bias (..., n, H*W), written into `out` if
    given (a bias of the same shape that is no longer needed; without gradients only)."""
    n = q.shape[-2]
    token = torch.arange(start, start + n, device=q.device)     # (n,) the queries' grid positions
    rel_h = torch.einsum("...qc,qkc->...qk", q, Rh[token // W])  # (..., n, H): row i of each query
    rel_w = torch.einsum("...qc,qkc->...qk", q, Rw[token % W])   # (..., n, W): column j
    if out is not None:
        out = out.unflatten(-1, (-1, W))                         # (..., n, H, W)
        return torch.add(rel_h[..., :, None], rel_w[..., None, :], out=out).flatten(-2)
    bias = rel_h[..., :, None] + rel_w[..., None, :]            # (..., n, H, W)
    return bias.flatten(-2)                                      # (..., n, H*W)


def chunked_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, size):
    """Attention's formula, softmax(q k^T / sqrt(hd) + bias) v, computed faster and in less memory:
    the bias goes into `scaled_dot_product_attention` as its additive mask, so the fused kernel
    does the scaling (its default scale hd**-0.5 is SAM's), the softmax and the product with v;
    queries go in runs of QUERY_CHUNK, so only a run's bias exists at once. Every query's row is
    computed as in the formula, so the result is the same up to float rounding (tested).
    Without gradients the runs write their bias into one shared buffer: a fresh buffer per run
    costs page faults (about half of the encoder's in a forward).
    q, k, v (B, nh, N, hd) over an H x W grid, size (H, W) -> (B, nh, N, hd)."""
    H, W = size
    N = H * W
    Rh = get_rel_pos(H, H, rel_pos_h)                       # (H, H, hd)
    Rw = get_rel_pos(W, W, rel_pos_w)                       # (W, W, hd)
    out = []
    bias = None
    for start in range(0, N, QUERY_CHUNK):
        q_run = q[:, :, start:start + QUERY_CHUNK]          # (B, nh, n, hd)
        same_shape = bias is not None and bias.shape[2] == q_run.shape[2]
        reuse = bias if same_shape and not torch.is_grad_enabled() else None
        bias = decomposed_rel_pos_bias(q_run, Rh, Rw, start, W, out=reuse)      # (B, nh, n, N)
        run = F.scaled_dot_product_attention(q_run, k, v, attn_mask=bias.to(q.dtype))
        out.append(run)                                                         # (B, nh, n, hd)
    return torch.cat(out, dim=2)                            # (B, nh, N, hd)


def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws, ws, C), zero-padding H and W up to multiples of ws."""
    B, H, W, C = x.shape
    pad_h = (ws - H % ws) % ws
    pad_w = (ws - W % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))                # (B, Hp, Wp, C)
    Hp = H + pad_h
    Wp = W + pad_w
    x = x.reshape(B, Hp // ws, ws, Wp // ws, ws, C)         # (B, Hp/ws, ws, Wp/ws, ws, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)  # (B*nW, ws, ws, C)
    return windows, (Hp, Wp)


def window_unpartition(windows, ws, padded_hw, hw):
    """(B*nW, ws, ws, C) -> (B, H, W, C), dropping the padding window_partition added."""
    Hp, Wp = padded_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // ws) * (Wp // ws))
    x = windows.reshape(B, Hp // ws, Wp // ws, ws, ws, -1)  # (B, Hp/ws, Wp/ws, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # (B, Hp, Wp, C)
    return x[:, :H, :W, :]


class Block(nn.Module):
    """Pre-LayerNorm transformer block; window_size 0 means global attention over the whole grid.
    `rel_pos_size` is the side the relative-position tables are stored for (window or grid)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, window_size=0, rel_pos_size=14, eps=1e-6):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, window_size if window_size > 0 else rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x):                                   # x: (B, H, W, C)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1:3]
            x, padded_hw = window_partition(x, self.window_size)   # (B*nW, ws, ws, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (H, W))  # (B, H, W, C)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- the encoder

class ImageEncoderViT(nn.Module):
    """SAM's ViT-Det image encoder. `forward` -> neck output [B,out,H,W];
    `forward_features` -> (neck output [B,out,H,W], last block's tokens [B,H,W,C])."""

    def __init__(self, cfg: ViTDetConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.grid
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.embed_dim))  # (1, H, W, C), native
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                  window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                  rel_pos_size=g, eps=cfg.layer_norm_eps)
            for i in range(cfg.depth))
        # SAMCLIP.set_grad_checkpointing sets this while the encoder trains: each block's
        # activations are then recomputed in the backward instead of stored, about a third more
        # compute for a fraction of the memory (the 1024 px D_SAM forward of a distill step kept
        # every block's, ~13 GB for ViT-B).
        self.grad_checkpointing = False
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def abs_pos(self, H, W):
        """The absolute position embedding for an H x W grid: (1, H, W, C); bicubic resize of the
        native grid when the input is not img_size (ViT-Det's get_abs_pos).

        One rule with clip.VisionTower.position_embedding_for: bicubic WITH antialiasing, where
        ViT-Det resizes without it. Why: on a stand-in for SAM's table (MAE's 14 x 14 sin-cos table
        upsampled to 64 x 64, how SAM's was initialised) both rules keep the smooth part of the
        table (within 2% of the exact sin-cos table at 14 and 28, tests/test_vit_det.py), but the
        detail a trained table holds above the small grid's Nyquist rate is averaged out by the
        antialiased resize, while plain bicubic point-samples it into wrong low-frequency
        positions (aliasing). CLIP only upsamples (16 -> 24 at 336 px), where the two rules are
        identical. The parity fixtures run at the native grid and are unaffected."""
        pos = self.pos_embed
        if pos.shape[1:3] == (H, W):
            return pos
        pos = pos.permute(0, 3, 1, 2)                       # (1, H0, W0, C) -> (1, C, H0, W0)
        pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
        return pos.permute(0, 2, 3, 1)                      # (1, C, H, W) -> (1, H, W, C)

    def forward_tokens(self, x):
        """(B, 3, H*p, W*p) -> the last block's token grid (B, H, W, C), without the neck.
        What HeadCLIP needs at 224 / 448 px, where HeadSAM is not used."""
        p = self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image encoder input must be [B,3,H,W] with H and W multiples of "
                             f"{p}, got {list(x.shape)}")
        x = self.patch_embed(x)                             # (B, H, W, C)
        x = x + self.abs_pos(x.shape[1], x.shape[2])
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x):
        """One forward serving both heads: (neck output (B, out, H, W), tokens (B, H, W, C))."""
        tokens = self.forward_tokens(x)
        return self.neck(tokens.permute(0, 3, 1, 2)), tokens  # neck input (B, C, H, W)

    def forward(self, x):
        return self.forward_features(x)[0]


def build_vit_det(cfg="vit_b"):
    """Build a randomly initialised encoder from a preset name or a ViTDetConfig."""
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    enc = ImageEncoderViT(cfg)
    nn.init.trunc_normal_(enc.pos_embed, std=0.02)
    return enc


# ----------------------------------------------------------------------------- official weights

# Official key -> ours: our module names follow segment_anything's, so the table only strips the
# prefix under which the encoder sits inside a full SAM checkpoint.
SAM_ENCODER_REMAP = [("image_encoder.", "")]
SAM_ENCODER_PREFIX = "image_encoder."


def config_from_state_dict(sd, source="<state dict>"):
    """Read a ViTDetConfig from the shapes of an encoder state dict (our key names)."""
    needed = ["patch_embed.proj.weight", "pos_embed", "blocks.0.attn.rel_pos_h", "neck.0.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        official = [SAM_ENCODER_PREFIX + k for k in missing]
        raise weights.CheckpointError(
            f"{source}: not a SAM image-encoder checkpoint: missing {official} "
            f"(found keys like {list(sd)[:3]})")
    C, _, p, _ = sd["patch_embed.proj.weight"].shape
    grid = sd["pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = sd["blocks.0.attn.rel_pos_h"].shape[1]
    tables = [sd.get(f"blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    lengths = [None if t is None else t.shape[0] for t in tables]
    global_idx = tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1)
    window = [n for n in lengths if n is not None and n != 2 * grid - 1]
    lin1 = sd.get("blocks.0.mlp.lin1.weight")
    return ViTDetConfig(
        img_size=grid * p, patch_size=p, embed_dim=C, depth=depth, num_heads=C // head_dim,
        mlp_ratio=4.0 if lin1 is None else lin1.shape[0] / C,
        out_chans=sd["neck.0.weight"].shape[0],
        window_size=(window[0] + 1) // 2 if window else 0, global_attn_indexes=global_idx)


def load_sam_encoder(checkpoint, verbose=True, source=None):
    """Load SAM's image encoder from an official SAM file (e.g. sam_vit_b_01ec64.pth), or from its
    state dict, in eval mode. The preset is recognised from the shapes and named."""
    source = source or weights.source_name(checkpoint)  # `source` names an already-read file
    sd = weights.read_state_dict(checkpoint, "SAM checkpoint")
    if not any(k.startswith(SAM_ENCODER_PREFIX) for k in sd):
        raise weights.CheckpointError(
            f"{source}: expected a SAM checkpoint with '{SAM_ENCODER_PREFIX}*' keys, "
            f"but it is {weights.guess_kind(sd)}")
    sd = weights.remap(sd, SAM_ENCODER_REMAP, keep_prefixes=[SAM_ENCODER_PREFIX])
    cfg = config_from_state_dict(sd, source)
    name = weights.match_preset(cfg, PRESETS)
    if verbose:
        print(f"vit_det.load_sam_encoder: {source} is SAM {name}" if name else
              f"vit_det.load_sam_encoder: {source} matches no preset; read from its shapes: {cfg}")
    enc = ImageEncoderViT(cfg)
    weights.load_checked(enc, sd, source, f"SAM image encoder ({name or 'custom'})")
    return enc.eval()
