"""The two heads on the shared backbone (SAM-CLIP Fig. 2): HeadSAM and HeadCLIP.

HeadSAM is SAM's own head (Kirillov et al. 2023, Sec. 3 and App. A), rebuilt so the official
weights load unchanged:
  - prompt encoder: points / box corners -> random-Fourier positional encoding (Tancik et al.) plus
    a learned embedding per kind (negative point, positive point, top-left, bottom-right, padding);
    a mask prompt [B,1,256,256] -> two stride-2 convs -> a dense embedding added to the image
    embedding; no mask -> a learned `no_mask_embed` broadcast over the grid.
  - mask decoder: output tokens (IoU token + 4 mask tokens) and prompt tokens go through a two-way
    transformer with the image embedding; the image embedding is upscaled 4x by transposed convs,
    and each mask token, through its own hypernetwork MLP, gives the weights of a dot product with
    every upscaled pixel -> mask logits [B,M,256,256]; the IoU token predicts each mask's IoU.
  In SAM-CLIP the prompt encoder stays frozen and the mask decoder is trained by L_SAM (Eq. 2).

HeadCLIP is SAM-CLIP's new head (Sec. 3, App. A): 3 transformer blocks on the backbone's C-wide
token grid (before SAM's neck), each a copy of SAM's last encoder block; max pooling over the
patch tokens, a LayerNorm and an MLP with two hidden layers to the CLIP embedding size. The same
LayerNorm + MLP on every patch token gives dense text-aligned features (zero-shot segmentation).

Entry point fixed by the project: `load_sam_head(checkpoint)(image_embeddings, points=None,
boxes=None, masks=None, multimask_output=True) -> (low_res_masks [B,M,4h,4w], iou_pred [B,M])`.

Shape legend: B prompt sets (batch), C channels, h w image-embedding grid, N prompt tokens,
T output + prompt tokens, M masks per prompt set, D CLIP embedding size.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import weights
from vit_det import Block, LayerNorm2d, MLPBlock


# ----------------------------------------------------------------------------- config

@dataclass
class SAMHeadConfig:
    embed_dim: int = 256              # prompt-token and mask-decoder width (= neck out_chans)
    image_embedding_size: int = 64    # side of the image-embedding grid h = w
    input_image_size: int = 1024      # side of the padded input frame in which prompts are given
    mask_in_chans: int = 16           # hidden channels of the mask-prompt downscaler
    decoder_depth: int = 2            # two-way transformer blocks
    decoder_mlp_dim: int = 2048       # their MLP hidden width
    decoder_heads: int = 8            # attention heads (8 in every official SAM)
    attention_downsample_rate: int = 2  # cross-attention inner width = embed_dim / this
    num_multimask_outputs: int = 3    # masks in multimask mode (plus one single-mask token)
    iou_head_depth: int = 3           # layers of the IoU-prediction MLP
    iou_head_hidden_dim: int = 256    # its hidden width


@dataclass
class HeadCLIPConfig:
    width: int = 768                  # backbone token width C (ViT-B)
    depth: int = 3                    # transformer blocks, each a copy of SAM's last block (App. A)
    num_heads: int = 12               # as in the copied block
    mlp_ratio: float = 4.0            # as in the copied block
    rel_pos_size: int = 64            # grid side the copied block's relative tables are stored for
    mlp_hidden: int = 768             # width of the MLP's two hidden layers (not in the paper)
    out_dim: int = 768                # CLIP embedding size D (768: the OpenCLIP ViT-L/14 teacher)
    eps: float = 1e-6                 # the copied blocks' LayerNorm eps (SAM's encoder: 1e-6)


SAM_HEAD_PRESETS = {
    "sam": SAMHeadConfig(),           # the same head for SAM vit_b, vit_l and vit_h
    "tiny": SAMHeadConfig(embed_dim=32, image_embedding_size=10, input_image_size=160,
                          mask_in_chans=8, decoder_mlp_dim=64, iou_head_hidden_dim=32),
    # the toy SAM teacher's head (toy/teachers.py); 8 attention heads as in SAM (shapes cannot
    # tell a head count)
    "toy": SAMHeadConfig(embed_dim=64, image_embedding_size=16, input_image_size=256,
                         mask_in_chans=16, decoder_mlp_dim=256, iou_head_hidden_dim=64),
}


# ----------------------------------------------------------------------------- prompt encoder

class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y): [sin(2 pi (2p-1) G), cos(2 pi (2p-1) G)]."""

    def __init__(self, num_pos_feats):
        super().__init__()
        gaussian = nn.init.normal_(torch.empty(2, num_pos_feats))  # torch.randn's numbers
        self.register_buffer("positional_encoding_gaussian_matrix", gaussian)

    def encode(self, coords):                               # (..., 2) in [0, 1]
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix  # (..., C/2)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)      # (..., C)

    def grid(self, h, w):
        """Encoding of every pixel centre of an h x w grid: (C, h, w)."""
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        xy = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)  # (h, w, 2)
        return self.encode(xy).permute(2, 0, 1)             # (h, w, C) -> (C, h, w)

    def points(self, coords, image_size):
        """Pixel coordinates (B, N, 2) in an image_size x image_size frame -> (B, N, C)."""
        return self.encode(coords.float() / image_size)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: SAMHeadConfig):
        super().__init__()
        C = cfg.embed_dim
        self.cfg = cfg
        self.pe_layer = PositionEmbeddingRandom(C // 2)
        # 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, C) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, C)
        c = cfg.mask_in_chans
        self.mask_downscaling = nn.Sequential(               # (B,1,4h,4w) -> (B,C,h,w)
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2), LayerNorm2d(c // 4), nn.GELU(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2), LayerNorm2d(c), nn.GELU(),
            nn.Conv2d(c, C, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, C)

    def get_dense_pe(self):
        s = self.cfg.image_embedding_size
        return self.pe_layer.grid(s, s).unsqueeze(0)        # (1, C, h, w)

    def embed_points(self, coords, labels, pad):
        coords = coords + 0.5                               # pixel index -> pixel centre
        if pad:  # SAM's rule: without a box, one padding point is appended to every prompt set
            padding_point = coords.new_zeros(coords.shape[0], 1, 2)
            padding_label = -labels.new_ones(labels.shape[0], 1)
            coords = torch.cat([coords, padding_point], dim=1)             # (B, N+1, 2)
            labels = torch.cat([labels, padding_label], dim=1)             # (B, N+1)
        emb = self.pe_layer.points(coords, self.cfg.input_image_size)     # (B, N, C)
        lab = labels[..., None]                                            # (B, N, 1)
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)   # padding: no position
        negative = (lab == 0) * self.point_embeddings[0].weight
        positive = (lab == 1) * self.point_embeddings[1].weight
        return emb + negative + positive

    def embed_boxes(self, boxes):
        corners = (boxes + 0.5).reshape(-1, 2, 2)           # (B, 4) -> (B, 2 corners, 2)
        emb = self.pe_layer.points(corners, self.cfg.input_image_size)     # (B, 2, C)
        top_left = self.point_embeddings[2].weight                        # (1, C)
        bottom_right = self.point_embeddings[3].weight                    # (1, C)
        return emb + torch.cat([top_left, bottom_right])                   # + (2, C)

    def forward(self, points=None, boxes=None, masks=None):
        """-> sparse (B, N, C) prompt tokens, dense (B, C, h, w) mask embedding."""
        if points is not None:
            B = points[0].shape[0]
        elif boxes is not None:
            B = boxes.shape[0]
        elif masks is not None:
            B = masks.shape[0]
        else:
            B = 1
        C = self.cfg.embed_dim
        s = self.cfg.image_embedding_size
        dev = self.no_mask_embed.weight.device
        sparse = [torch.empty(B, 0, C, device=dev)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, C, 1, 1).expand(B, C, s, s)
        return torch.cat(sparse, dim=1), dense


# ----------------------------------------------------------------------------- mask decoder

class TokenAttention(nn.Module):
    """Attention with separate q/k/v projections and an optional narrower inner width
    (SAM's `Attention` with downsample_rate), used for token<->image cross-attention."""

    def __init__(self, dim, num_heads, downsample_rate=1):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _separate_heads(self, x):                           # (B, N, c)
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, -1).transpose(1, 2)  # -> (B, nh, N, c/nh)

    def forward(self, q, k, v):                             # (B, Nq, C), (B, Nk, C), (B, Nk, C)
        q = self._separate_heads(self.q_proj(q))            # (B, nh, Nq, c/nh)
        k = self._separate_heads(self.k_proj(k))            # (B, nh, Nk, c/nh)
        v = self._separate_heads(self.v_proj(v))            # (B, nh, Nk, c/nh)
        x = F.scaled_dot_product_attention(q, k, v)         # (B, nh, Nq, c/nh)
        x = x.transpose(1, 2).flatten(2)                    # (B, nh, Nq, c/nh) -> (B, Nq, c)
        return self.out_proj(x)                             # (B, Nq, C)


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, tokens attend to the image, MLP on tokens, the image attends to tokens.
    Positional encodings are re-added to queries and keys at every attention (SAM App. A)."""

    def __init__(self, dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe):
        super().__init__()
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):     # (B, T, C), (B, h*w, C), same, same
        if self.skip_first_layer_pe:  # first layer: the tokens *are* their positional encoding
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, cfg: SAMHeadConfig):
        super().__init__()
        C = cfg.embed_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(C, cfg.decoder_heads, cfg.decoder_mlp_dim,
                                 cfg.attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(cfg.decoder_depth))
        self.final_attn_token_to_image = TokenAttention(C, cfg.decoder_heads,
                                                        cfg.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(C)

    def forward(self, image, image_pe, tokens):             # (B, C, h, w), (B, C, h, w), (B, T, C)
        keys = image.flatten(2).transpose(1, 2)             # (B, C, h, w) -> (B, h*w, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)        # (B, C, h, w) -> (B, h*w, C)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them (SAM's hypernetwork and IoU heads)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# Prompt sets per recomputed piece when the mask decoder trains with gradient checkpointing. Each
# prompt set's decode keeps ~100 MB of activations for the backward at 1024 px (the two-way
# transformer over 64 x 64 image tokens, the 256 x 256 upscaling); a distill step's 8 prompts x 4
# rounds kept ~3 GB. Checkpointed, only inputs and outputs stay, and the backward recomputes
# 8 prompt sets at a time.
DECODE_CHUNK = 8


def _rows(t, piece):
    """The rows `piece` of t, or t itself when its one row is shared by every prompt set."""
    return t if t.shape[0] == 1 else t[piece]


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SAMHeadConfig):
        super().__init__()
        self.grad_checkpointing = False         # set by SAMCLIP.set_grad_checkpointing (memory)
        C = cfg.embed_dim
        self.num_mask_tokens = cfg.num_multimask_outputs + 1  # token 0: single-mask output
        self.transformer = TwoWayTransformer(cfg)
        self.iou_token = nn.Embedding(1, C)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, C)
        self.output_upscaling = nn.Sequential(              # (B,C,h,w) -> (B,C/8,4h,4w)
            nn.ConvTranspose2d(C, C // 4, kernel_size=2, stride=2), LayerNorm2d(C // 4), nn.GELU(),
            nn.ConvTranspose2d(C // 4, C // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(C, C, C // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(C, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                       cfg.iou_head_depth)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings):
        """Every output token's mask and IoU: (B, 1+3, 4h, 4w), (B, 1+3); HeadSAM picks the single
        or the multimask outputs (SAM's `multimask_output`), L_SAM distils all of them.
        With grad_checkpointing (and gradients on) the prompt sets go in pieces of DECODE_CHUNK
        whose activations are recomputed in the backward: the same numbers, a fraction of the
        memory."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.decode(image_embeddings, image_pe, sparse_prompt_embeddings,
                               dense_prompt_embeddings)
        B = sparse_prompt_embeddings.shape[0]
        masks = []
        iou = []
        for i in range(0, B, DECODE_CHUNK):
            piece = slice(i, i + DECODE_CHUNK)
            piece_masks, piece_iou = torch.utils.checkpoint.checkpoint(
                self.decode, _rows(image_embeddings, piece), image_pe,
                sparse_prompt_embeddings[piece], _rows(dense_prompt_embeddings, piece),
                use_reentrant=False)
            masks.append(piece_masks)
            iou.append(piece_iou)
        return torch.cat(masks), torch.cat(iou)             # (B, 1+3, 4h, 4w), (B, 1+3)

    def decode(self, image_embeddings, image_pe, sparse_prompt_embeddings,
               dense_prompt_embeddings):
        B = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])   # (1+M', C)
        out_tokens = out_tokens.expand(B, -1, -1)                                  # (B, 1+M', C)
        tokens = torch.cat([out_tokens, sparse_prompt_embeddings], dim=1)          # (B, T, C)
        src = image_embeddings.expand(B, -1, -1, -1) + dense_prompt_embeddings     # (B, C, h, w)
        pos = image_pe.expand(B, -1, -1, -1)
        _, C, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)         # (B, T, C), (B, h*w, C)
        iou_token_out = hs[:, 0]                             # (B, C)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]  # (B, M', C)
        src = src.transpose(1, 2).reshape(B, C, h, w)        # (B, h*w, C) -> (B, C, h, w)
        up = self.output_upscaling(src)                      # (B, C/8, 4h, 4w)
        hyper = [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)]
        hyper = torch.stack(hyper, dim=1)                    # (B, M', C/8)
        masks = hyper @ up.flatten(2)                        # (B, M', 4h*4w)
        masks = masks.reshape(B, -1, up.shape[2], up.shape[3])  # (B, M', 4h, 4w)
        return masks, self.iou_prediction_head(iou_token_out)  # (B, M', 4h, 4w), (B, M')


class HeadSAM(nn.Module):
    """Prompt encoder + mask decoder. Called on image embeddings [1 or B, C, h, w] and B prompt
    sets; an embedding batch of 1 serves every prompt set, as in the official predictor."""

    def __init__(self, cfg: SAMHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)

    def forward(self, image_embeddings, points=None, boxes=None, masks=None, multimask_output=True):
        """points = (coords [B,N,2] pixels in the input frame, labels [B,N]: 1 fg, 0 bg,
        -1 padding); boxes [B,4] x0,y0,x1,y1; masks [B,1,4h,4w] logits.
        -> low-res mask logits [B,M,4h,4w], predicted IoU [B,M]; M = 3 if multimask_output
        else 1."""
        masks, iou = self.all_outputs(image_embeddings, points, boxes, masks)
        # token 0 is the single-mask output, tokens 1-3 the multimask outputs
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]

    def all_outputs(self, image_embeddings, points=None, boxes=None, masks=None):
        """Same inputs; every output token: (B, 1+3, 4h, 4w) logits, (B, 1+3) IoU predictions."""
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        if image_embeddings.shape[0] not in (1, sparse.shape[0]):
            raise ValueError(f"HeadSAM: {image_embeddings.shape[0]} image embeddings for "
                             f"{sparse.shape[0]} prompt sets; give 1 (shared) or one per "
                             "prompt set")
        image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder(image_embeddings, image_pe, sparse, dense)


def postprocess_masks(low_res, input_size, original_size, img_size=1024):
    """SAM's postprocessing: low-res logits [B,M,256,256] -> padded frame [img_size] -> crop the
    resized image region `input_size` (h, w) -> original image size (H, W). Bilinear throughout."""
    x = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., :input_size[0], :input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- HeadCLIP

class HeadCLIP(nn.Module):
    """SAM-CLIP's CLIP head (Sec. 3, App. A): tokens [B,H,W,C] -> (pooled [B,D], dense [B,H,W,D]).

    pooled = MLP(LN(max over patches of blocks(tokens))): the image embedding of Eq. 1;
    dense  = MLP(LN(blocks(tokens))) per patch: text-aligned features for zero-shot segmentation."""

    def __init__(self, cfg: HeadCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, window_size=0,
                  rel_pos_size=cfg.rel_pos_size, eps=cfg.eps)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_hidden), nn.GELU(),
                                 nn.Linear(cfg.mlp_hidden, cfg.mlp_hidden), nn.GELU(),
                                 nn.Linear(cfg.mlp_hidden, cfg.out_dim))
        for m in self.mlp:                                  # the new MLP: ViT's init, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def init_from_block(self, block):
        """Start every head block as a copy of SAM's last encoder block (App. A: converges
        faster than a random start)."""
        for own in self.blocks:
            own.load_state_dict(copy.deepcopy(block.state_dict()))

    def forward(self, tokens):                              # (B, H, W, C)
        for blk in self.blocks:
            tokens = blk(tokens)
        pooled = tokens.flatten(1, 2).amax(dim=1)       # (B, H*W, C) -> (B, C): max pool (App. A)
        return self.mlp(self.norm(pooled)), self.mlp(self.norm(tokens))  # (B, D), (B, H, W, D)


def build_head_sam(cfg="sam"):
    return HeadSAM(SAM_HEAD_PRESETS[cfg] if isinstance(cfg, str) else cfg)


# ----------------------------------------------------------------------------- official weights

# Official key -> ours. HeadSAM holds `prompt_encoder` and `mask_decoder` under their official
# names.
SAM_HEAD_REMAP = []  # our names are the official ones; only the encoder keys are dropped
SAM_HEAD_PREFIXES = ["prompt_encoder.", "mask_decoder."]


def head_config_from_state_dict(sd, source="<state dict>"):
    """Read a SAMHeadConfig from the shapes of a full SAM state dict (official keys). The image
    grid and input size come from the encoder's `pos_embed` and patch size when present."""
    need = ["prompt_encoder.no_mask_embed.weight", "prompt_encoder.mask_downscaling.3.weight",
            "mask_decoder.mask_tokens.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight",
            "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
            "mask_decoder.iou_prediction_head.layers.0.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise weights.CheckpointError(
            f"{source}: expected a SAM checkpoint with a prompt encoder and mask decoder, "
            f"but it is {weights.guess_kind(sd)} (missing {missing[:2]})")
    C = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    grid = 64                                     # SAM's defaults: 1024 px in 16 px patches
    img = 1024
    if "image_encoder.pos_embed" in sd and "image_encoder.patch_embed.proj.weight" in sd:
        grid = sd["image_encoder.pos_embed"].shape[1]
        img = grid * sd["image_encoder.patch_embed.proj.weight"].shape[-1]
    cross_attn_q = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
    return SAMHeadConfig(
        embed_dim=C, image_embedding_size=grid, input_image_size=img,
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count_layers(sd, "mask_decoder.transformer.layers."),
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=C // cross_attn_q.shape[0],
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count_layers(sd, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])


def _count_layers(sd, prefix):
    """1 + the largest layer index i among the keys `prefix` + "i." + ..."""
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))


def load_sam_head(checkpoint, verbose=True, source=None):
    """HeadSAM (prompt encoder + mask decoder) from an official SAM file or its state dict, in
    eval mode."""
    source = source or weights.source_name(checkpoint)  # `source` names an already-read file
    sd = weights.read_state_dict(checkpoint, "SAM checkpoint")
    cfg = head_config_from_state_dict(sd, source)
    name = weights.match_preset(cfg, SAM_HEAD_PRESETS)
    if verbose:
        print(f"heads.load_sam_head: {source} has the {name or 'custom'} SAM head"
              + ("" if name else f" read from its shapes: {cfg}"))
    head = HeadSAM(cfg)
    sd = weights.remap(sd, SAM_HEAD_REMAP, keep_prefixes=SAM_HEAD_PREFIXES)
    weights.load_checked(head, sd, source, "SAM prompt encoder + mask decoder")
    return head.eval()
