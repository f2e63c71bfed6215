"""CLIP (Radford et al. 2021): the teacher image tower `EncCLIP` and the frozen text tower
`TextEncCLIP`.

SAM-CLIP distils CLIP's image embeddings into the SAM backbone (SAM-CLIP Sec. 3, Eq. 1: the target
is `EncCLIP(x)`) and reuses CLIP's text tower, frozen, for zero-shot recognition. Both towers use
OpenCLIP's checkpoint layout (OpenAI's key names), so official files load with a five-line remap.

- Contrastive objective (CLIP Sec. 2.3): each tower ends in a linear projection into a shared
  D-dim space; cosine similarities times a learned temperature, kept as its log (`logit_scale`),
  are the logits of a symmetric cross-entropy.
- Architecture (CLIP Sec. 2.4): a ViT image tower with an extra LayerNorm (`ln_pre`) before the
  transformer, pooled at the class token after `ln_post`; a causally masked text transformer over
  byte-level BPE tokens, pooled at the end token. Both are stacks of pre-LN residual blocks.
- The tokenizer (last section) reproduces OpenCLIP's default one with the standard library only.

Shape legend: B batch, L text length (context, 77), C width of a tower, D joint embedding dim,
N tokens (1 class token + gh*gw patches in the image tower), H W image size, gh gw patch grid,
nh heads, hd head dim (= 64), V vocabulary size.
"""

import functools
import gzip
import html
import math
import os
import re
import unicodedata
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import weights

# Image normalisation of every OpenAI / OpenCLIP model (RGB in [0, 1], then (x - mean) / std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- config

@dataclass
class CLIPConfig:
    embed_dim: int                # D, the joint image-text embedding size (output of both towers)
    image_size: int               # native input resolution of the image tower (square)
    patch_size: int               # ViT patch size; the grid is image_size // patch_size per side
    vision_width: int             # C of the image tower
    vision_layers: int            # residual attention blocks in the image tower
    text_width: int               # C of the text tower
    text_layers: int              # residual attention blocks in the text tower
    context_length: int = 77      # L, tokens per text including start / end tokens
    vocab_size: int = 49408       # V, 256 bytes x 2 + 48894 BPE merges + 2 special tokens
    mlp_ratio: float = 4.0        # MLP hidden width / C, both towers
    quick_gelu: bool = False      # True: x * sigmoid(1.702 x), OpenAI's original weights;
                                  # False: exact (erf) GELU, OpenCLIP ViT-B-16 / ViT-L-14
    layer_norm_eps: float = 1e-5  # every LayerNorm of both towers

    @property
    def vision_heads(self):  # every OpenAI / OpenCLIP ViT uses 64-dim heads
        return self.vision_width // 64

    @property
    def text_heads(self):
        return self.text_width // 64

    @property
    def grid_size(self):
        return self.image_size // self.patch_size


PRESETS = {
    # OpenCLIP ViT-B-16 (e.g. DataComp-1B): the paper's CLIP baseline in Tables 1-5
    "openclip_vit_b_16": CLIPConfig(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                                    vision_layers=12, text_width=512, text_layers=12),
    # OpenCLIP ViT-L-14 DataComp-1B: the teacher EncCLIP / TextEncCLIP of SAM-CLIP (Sec. 4.1)
    "openclip_vit_l_14": CLIPConfig(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                                    vision_layers=24, text_width=768, text_layers=12),
    # the tiny fixture model of tests/fixtures/clip_tiny.pt
    "tiny": CLIPConfig(embed_dim=32, image_size=64, patch_size=16, vision_width=128,
                       vision_layers=2, text_width=64, text_layers=2),
    # the toy CLIP teacher (toy/teachers.py, toy/weights/toy_clip.bin); the full BPE vocabulary
    "toy": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128,
                      vision_layers=4, text_width=64, text_layers=4),
}


# ----------------------------------------------------------------------------- building blocks

class Attention(nn.Module):
    """Multi-head self-attention with the parameter names of `nn.MultiheadAttention` (one fused
    [3C, C] input projection, rows ordered q, k, v) so the official keys load unchanged."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        in_proj_weight = nn.init.normal_(torch.empty(3 * width, width), std=width ** -0.5)
        self.in_proj_weight = nn.Parameter(in_proj_weight)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        qkv = qkv.view(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, nh, N, hd) -> (B, N, C)
        return self.out_proj(x)


class MLP(nn.Module):
    def __init__(self, width, hidden, quick_gelu):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.quick_gelu = quick_gelu

    def forward(self, x):
        x = self.c_fc(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.c_proj(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), quick_gelu)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, config):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, config.mlp_ratio, config.quick_gelu,
                                   config.layer_norm_eps)
            for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


# ----------------------------------------------------------------------------- the two towers

class VisionTower(nn.Module):
    """ViT image tower, `EncCLIP`. Input: images normalised with CLIP_MEAN / CLIP_STD."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        C = config.vision_width
        p = config.patch_size
        self.conv1 = nn.Conv2d(3, C, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(nn.init.normal_(torch.empty(C), std=C ** -0.5))
        N = config.grid_size ** 2 + 1                       # patch tokens + class token
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(N, C), std=C ** -0.5))
        self.ln_pre = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.transformer = Transformer(C, config.vision_layers, config.vision_heads, config)
        self.ln_post = nn.LayerNorm(C, eps=config.layer_norm_eps)
        proj = nn.init.normal_(torch.empty(C, config.embed_dim), std=C ** -0.5)
        self.proj = nn.Parameter(proj)

    def position_embedding_for(self, gh, gw):
        """The (1 + gh*gw, C) position table for a gh x gw patch grid. At the native grid this is
        the learned table; at any other (the teacher run at 336 or 448 px, Sec. 4.2) the patch part
        is resized bicubically as a 2-D image and the class-token row kept, as OpenCLIP's
        `resize_pos_embed` does when it loads a checkpoint for a new resolution. The same rule as
        vit_det.ImageEncoderViT.abs_pos (antialiased bicubic; the reason is given there)."""
        pos = self.positional_embedding
        g0 = math.isqrt(pos.shape[0] - 1)
        if (gh, gw) == (g0, g0):
            return pos
        grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # (g0*g0, C) -> (1, C, g0, g0)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False,
                             antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)  # (1, C, gh, gw) -> (gh*gw, C)
        return torch.cat([pos[:1], grid], dim=0)

    def forward_tokens(self, x):
        """(B, 3, H, W) -> the last block's tokens (B, 1 + gh*gw, C), class token first, before
        ln_post and proj: the frozen backbone's own features (what `evaluate.py probe` reads)."""
        x = self.conv1(x)  # (B, 3, H, W) -> (B, C, gh, gw)
        B, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)  # (C,) -> (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.position_embedding_for(gh, gw)  # (B, N, C)
        return self.transformer(self.ln_pre(x))

    def forward(self, x, return_patch_tokens=False):
        """(B, 3, H, W) -> (B, D): ln_post(class token) @ proj. With `return_patch_tokens` also the
        patch tokens through the same ln_post and proj, (B, gh*gw, D); CLIP never trained these
        to align with text, so they are a cheap by-product, not a dense CLIP feature."""
        x = self.forward_tokens(x)  # (B, N, C)
        # LayerNorm per token, so the class token's result equals pooling first
        x = self.ln_post(x) @ self.proj  # (B, N, C) -> (B, N, D)
        return (x[:, 0], x[:, 1:]) if return_patch_tokens else x[:, 0]


class TextTower(nn.Module):
    """Causal text transformer, `TextEncCLIP`. Input: (B, L) int64 tokens from `tokenize`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        C = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, C)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        L = config.context_length
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(L, C), std=0.01))
        self.transformer = Transformer(C, config.text_layers, config.text_heads, config)
        self.ln_final = nn.LayerNorm(C, eps=config.layer_norm_eps)
        text_projection = nn.init.normal_(torch.empty(C, config.embed_dim), std=C ** -0.5)
        self.text_projection = nn.Parameter(text_projection)

    def forward(self, tokens):
        """(B, L) -> (B, D): the features at the end token, which has the largest id of each row.
        A row shorter than context_length gives the same result (the mask is causal)."""
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, C)
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, L, C) -> (B, C)
        return x @ self.text_projection  # (B, C) -> (B, D)


class CLIP(nn.Module):
    """Both towers and the temperature. `encode_*` return unnormalised features, equal to
    OpenCLIP's; `forward` returns them L2-normalised, so `logit_scale.exp() * img @ txt.T` are
    the logits of CLIP Sec. 2.3."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        # Sec. 2.5: the temperature tau starts at 0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, image):  # (B, 3, H, W) -> (B, D)
        return self.visual(image)

    def encode_text(self, tokens):  # (B, L) -> (B, D)
        return self.text(tokens)

    def forward(self, image, tokens):
        return (F.normalize(self.encode_image(image), dim=-1),
                F.normalize(self.encode_text(tokens), dim=-1))


# ----------------------------------------------------------------------------- builder

def build_clip(config) -> CLIP:
    """A randomly initialised CLIP from a CLIPConfig or a PRESETS name. The modules initialise
    themselves as OpenAI's code does (embeddings and projections normal, scaled by width**-0.5);
    here the residual branches' output layers are also scaled by depth, (2 * layers)**-0.5."""
    config = PRESETS[config] if isinstance(config, str) else config
    model = CLIP(config)
    for tower, C, layers in ((model.visual, config.vision_width, config.vision_layers),
                             (model.text, config.text_width, config.text_layers)):
        for block in tower.transformer.resblocks:
            nn.init.normal_(block.attn.out_proj.weight, std=C ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * C) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=C ** -0.5 * (2 * layers) ** -0.5)
    return model


# ----------------------------------------------------------------------------- official checkpoints

# Official (OpenCLIP / OpenAI) -> ours. The image tower's keys are identical; the text tower's sit
# at the top level of the official dict and move under `text.`. A leading "^" anchors a swap at
# the start of the key (plain text, not a regular expression), so "transformer." does not also
# rewrite "visual.transformer.".
CLIP_REMAP = [
    ("^token_embedding.", "text.token_embedding."),
    ("^positional_embedding", "text.positional_embedding"),
    ("^transformer.", "text.transformer."),
    ("^ln_final.", "text.ln_final."),
    ("^text_projection", "text.text_projection"),
]
# Integer entries of OpenAI's JIT state dicts that are no weights; dropped before the key check.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The tensors the config is read from, with their number of dimensions.
_SHAPE_KEYS = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2,
               "visual.transformer.resblocks.0.mlp.c_fc.weight": 2, "token_embedding.weight": 2,
               "positional_embedding": 2, "text_projection": 2}


def _count_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def clip_config_from_state_dict(state_dict, source="<state dict>", quick_gelu=False):
    """Read a CLIPConfig from the shapes of an official-layout state dict; return (config, the
    name of the matching preset or None). The activation cannot be read from shapes: pass
    quick_gelu=True for OpenAI's original weights."""
    missing = [k for k in _SHAPE_KEYS if k not in state_dict]
    if missing:
        raise weights.CheckpointError(
            f"{source}: not a CLIP ViT checkpoint in OpenCLIP layout: missing {missing[:3]}; "
            f"its first keys are {list(state_dict)[:3]}")
    wrong = [f"{k} {tuple(state_dict[k].shape)}" for k, ndim in _SHAPE_KEYS.items()
             if state_dict[k].ndim != ndim]
    if wrong:
        raise weights.CheckpointError(
            f"{source}: not a CLIP ViT checkpoint: unexpected shapes {wrong[:3]}")
    conv = state_dict["visual.conv1.weight"]
    vpos = state_dict["visual.positional_embedding"]
    grid = math.isqrt(vpos.shape[0] - 1)
    if grid * grid != vpos.shape[0] - 1:
        raise weights.CheckpointError(
            f"{source}: visual.positional_embedding has {vpos.shape[0]} rows, "
            "not 1 + a square patch grid")
    c_fc = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    config = CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_size=grid * conv.shape[-1],
        patch_size=conv.shape[-1],
        vision_width=conv.shape[0],
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        text_width=state_dict["token_embedding.weight"].shape[1],
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        mlp_ratio=c_fc.shape[0] / conv.shape[0],
        quick_gelu=quick_gelu,
    )
    presets = {name: replace(p, quick_gelu=quick_gelu) for name, p in PRESETS.items()}
    return config, weights.match_preset(config, presets)


def load_clip(checkpoint, quick_gelu=False) -> CLIP:
    """An official OpenCLIP / OpenAI ViT checkpoint (path to .bin/.pt/.pth/.safetensors, or a state
    dict) -> CLIP in eval mode, float32. Keys and shapes are checked exactly before loading."""
    source = weights.source_name(checkpoint)
    state_dict = weights.read_state_dict(checkpoint, what="CLIP checkpoint")
    state_dict = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}
    config, preset = clip_config_from_state_dict(state_dict, source, quick_gelu)
    if preset:
        print(f"clip.load_clip: {source} is {preset}")
    else:
        print(f"clip.load_clip: {source} matches no preset: embed {config.embed_dim}, "
              f"image {config.image_size} / patch {config.patch_size}, "
              f"vision {config.vision_width} x {config.vision_layers}, "
              f"text {config.text_width} x {config.text_layers}, "
              f"context {config.context_length}, vocab {config.vocab_size}, "
              f"mlp_ratio {config.mlp_ratio}")
    with weights.skeleton():  # no memory, no random init: the checkpoint overwrites every tensor
        model = CLIP(config)
    model = model.to_empty(device="cpu")  # uninitialised float32 storage, filled by load_checked
    weights.load_checked(model, weights.remap(state_dict, CLIP_REMAP), source, "CLIP")
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                        "bpe_simple_vocab_16e6.txt.gz")
# OpenCLIP's spelling of the special tokens; OpenAI's is <|startoftext|>, with the same ids
START = "<start_of_text>"
END = "<end_of_text>"
_SPACE = re.compile(r"[^\S\x1c-\x1f]+")  # the `regex` package's \s+, which OpenCLIP's cleaning uses


def _byte_alphabet():
    """The BPE works on strings of printable stand-ins for UTF-8 bytes: the 188 bytes that print
    as themselves keep their character, the other 68 (controls, space, ...) take code points 256,
    257, ... in byte order. Returned as (byte, char) pairs in vocabulary order: printable first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(others)]


def _pretokenizer():
    r"""CLIP splits text with the `regex` package's pattern
        's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+      (IGNORECASE)
    (letter runs, single digits, runs of other non-space characters). The stdlib `re` has no
    \p{..}: letters are written [^\W\d_] minus the numeric characters that are not decimal digits
    (categories No, Nl: '²', '½', 'Ⅻ', which Python counts as \w but `regex` as \p{N}); numbers
    are \d plus those. `re`'s \s also takes the separators \x1c-\x1f, `regex`'s does not, so they
    join the "other" class here. Checked against `regex` on every code point: the splits agree
    except for characters newer than Python's Unicode database and U+0345 (a combining mark that
    `regex` takes as a letter under IGNORECASE through its case fold, iota)."""
    numeric = "".join(c for c in map(chr, range(0x110000))
                      if c.isnumeric() and not c.isdecimal() and not c.isalpha())
    numeric = re.escape(numeric)
    return re.compile(rf"{re.escape(START)}|{re.escape(END)}|'s|'t|'re|'ve|'m|'ll|'d|"
                      rf"[^\W\d_{numeric}]+|[\d{numeric}]|(?:[^\s\w]|[_\x1c-\x1f])+", re.IGNORECASE)


class Tokenizer:
    """CLIP's byte-level BPE (Sennrich et al. 2016 on UTF-8 bytes, vocabulary 49408)."""

    def __init__(self, bpe_path=BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header, then the 48894 merges, best first
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        alphabet = _byte_alphabet()
        vocab = [c for _, c in alphabet] + [c + "</w>" for _, c in alphabet]
        vocab += ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # lower rank = merged earlier
        self.byte_char = dict(alphabet)
        self.start = self.encoder[START]
        self.end = self.encoder[END]
        self.pattern = _pretokenizer()
        self.cache = {START: [START], END: [END]}

    def bpe(self, word):
        """One pre-token (in byte stand-ins) -> its BPE symbols; '</w>' marks the word end."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged = []
            i = 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    @staticmethod
    def clean(text):
        """OpenCLIP's default cleaning: ftfy.fix_text, unescape HTML twice, collapse whitespace
        runs, strip, lower-case. Of ftfy only its final NFC normalisation is done here; its repairs
        of damaged text (mojibake, curly quotes, ligatures, full-width forms, control characters)
        are not, so such text may tokenize differently from OpenCLIP."""
        text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
        return _SPACE.sub(" ", text).strip().lower()

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))  # START, END: cached as themselves
        return ids


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The shared Tokenizer, built on first use (importing this file stays cheap)."""
    return Tokenizer()


def tokenize(texts, context_length=77):
    """str or list of str -> (N, context_length) int64: start token, BPE tokens, end token, zeros.
    A text that does not fit is cut and its last slot set to the end token, as OpenCLIP does."""
    tok = get_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.start] + tok.encode(text) + [tok.end]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tok.end
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def trim_padding(tokens):
    """(N, L) tokens from `tokenize` -> (N, L') with L' = 1 + the last end-token position of any
    row.
    The text tower is causal and reads each row at its end token, so the padding after the
    longest text changes nothing and can go (77 -> ~10 tokens, several times faster). The end
    token is found as the row's largest id (49407, the last of the vocabulary), exactly as the
    tower finds it; counting non-zero ids would be wrong, because id 0 is the BPE symbol "!"."""
    return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]


def encode_text_by_length(encode_text, tokens, batch_size=1024):
    """encode_text over (N, L) tokens from `tokenize`, texts of one length per call, each cut after
    its end token -> (N, D) in the order of the rows. The same numbers as one call on
    trim_padding(tokens) (the tower is causal and reads the end token), with fewer token rows when
    the lengths differ: the 80 templates with the demo's class names are 8.4 tokens long on average
    and 12 at most, so 30% less work than trimming them all to the longest."""
    ends = tokens.argmax(dim=-1)                                        # (N,) end-token positions
    out = None
    for end in ends.unique().tolist():
        same_length = (ends == end).nonzero().squeeze(1)                # texts of this length
        for rows in same_length.split(batch_size):                      # (n,)
            feats = encode_text(tokens[rows, :end + 1])                  # (n, end + 1) -> (n, D)
            if out is None:
                out = feats.new_empty(len(tokens), feats.shape[1])
            out[rows.to(out.device)] = feats
    return out
