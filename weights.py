"""Reading, remapping and writing checkpoints safely: the one loader every model file shares.

Why a file of its own: `vit_det.py`, `heads.py` and `clip.py` each load an official checkpoint
through their own fixed entry point, and `model.py` / `train.py` write merged checkpoints. The
mechanics are the same for all of them and belong to none, so they live here once:

- `read_state_dict(path_or_dict)`: `.pth/.pt/.bin` through `torch.load(weights_only=True)` (a
  pickle that tries to run code is refused before anything of it runs) and `.safetensors` through
  the small reader below (no extra package). Every tensor comes back as float32 if it was a
  floating type (fp16 / bf16 official files load into fp32 modules).
- `remap(state_dict, swaps)`: the official -> ours key translation as data, a list of substring
  swaps applied by one loop (STYLE.md, "Weights").
- `load_checked(module, state_dict, source)`: the exact sets of missing and unexpected keys and
  every shape are checked, and a mismatch is reported on one line naming the file and the first
  offending keys, before anything is copied.
- `atomic_save(obj, path)`: write to a temporary file in the same folder, fsync, rename; a crash
  mid-write never leaves a broken checkpoint behind.
- `skeleton()`: build a model whose every tensor a checkpoint will replace, on the meta device and
  without running its initialisers (fast start-up).
"""

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, of the wrong kind, or incomplete."""


# ----------------------------------------------------------------------------- reading

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path):
    """Read a `.safetensors` file: an 8-byte little-endian header length N, N bytes of JSON
    `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
    little-endian tensor bytes, offsets relative to the end of the header. Plain data, no code."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (length {n}, file {len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for s in shape:
            numel *= s
        if end > len(data) or end - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(
                f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        if numel:
            t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def safe_load(path, what="checkpoint", mmap=False):
    """torch.load(path, weights_only=True) with one-line errors: a missing file, a truncated one, or
    a pickle that names anything but tensors and plain containers (refused before any of it runs).
    mmap: the tensors stay in the file, mapped, and are read from disk when first touched (files
    of torch.save's zip format; an old-format file is read whole)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} file not found")
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError: an unsafe pickle; RuntimeError / EOFError: truncated
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a safe torch checkpoint ({first[:200]})") from None


def read_state_dict(checkpoint, what="checkpoint"):
    """Return `{key: tensor}` from a path (`.pth/.pt/.bin` pickle or `.safetensors`) or a dict.

    Pickles go through `torch.load(weights_only=True)`: only tensors and plain containers are
    rebuilt, and a file whose pickle names any other callable is refused with CheckpointError.
    Floating tensors are cast to float32 so fp16 / bf16 checkpoints load into fp32 modules.
    A dict wrapping the weights (`{"state_dict": ...}` or `{"model": ...}`) is unwrapped.
    """
    source = "<state dict>"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        if not os.path.isfile(source):
            raise CheckpointError(f"{source}: {what} file not found")
        if source.endswith(".safetensors"):
            sd = read_safetensors(source)
        else:
            sd = safe_load(source, what)
    else:
        sd = checkpoint
    if isinstance(sd, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"{source}: expected a state dict of tensors, found {type(sd).__name__}")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- remapping

def remap(state_dict, swaps, keep_prefixes=None):
    """Translate official keys into ours. `swaps` is a list of `(official, ours)` substrings,
    applied in order to every key; an `official` that starts with "^" only matches at the start of
    the key (CLIP's text "transformer." must not rewrite "visual.transformer."). `keep_prefixes`
    (official prefixes) drops keys of other parts (e.g. the mask decoder when only the image
    encoder is wanted)."""
    out = {}
    for key, value in state_dict.items():
        if keep_prefixes is not None and not key.startswith(tuple(keep_prefixes)):
            continue
        new = key
        for official, ours in swaps:
            if official.startswith("^"):
                if new.startswith(official[1:]):
                    new = ours + new[len(official) - 1:]
            else:
                new = new.replace(official, ours)
        out[new] = value
    return out


def check_keys(module, state_dict, source, expected_kind):
    """Compare the exact key sets and every shape; raise one line naming the first offenders."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, first {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches, first {wrong[:3]}")
    if problems:
        raise CheckpointError(
            f"{source}: not a complete {expected_kind} checkpoint: " + "; ".join(problems))


def load_checked(module: nn.Module, state_dict, source, expected_kind, assign=False):
    """Check keys and shapes exactly, then load strictly (assign: the tensors become the module's
    own, for a module built on the meta device). Returns the module."""
    check_keys(module, state_dict, source, expected_kind)
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


class _SkipInitialisers(torch.overrides.TorchFunctionMode):
    """Inside skeleton(): the in-place initialisers of torch.nn.init (normal_, uniform_,
    kaiming_uniform_, trunc_normal_, zeros_, ...: the public functions named `*_`) return a meta
    tensor untouched, since it holds no values to set. Every other op runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        public = name.endswith("_") and not name.startswith("_")
        if public and getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def skeleton():
    """`with weights.skeleton(): model = Model(cfg)` builds the module tree for a checkpoint that
    will replace every tensor (load_checked(..., assign=True), or to_empty then load): the standard
    `torch.device("meta")` (shapes, no memory), with the torch.nn.init initialisers skipped.
    Why skip them: torch's meta version of normal_ is Python code whose first use imports
    torch._dynamo (and randn's imports sympy), seconds of start-up for values that the
    checkpoint overwrites; the modules here initialise through torch.nn.init only."""
    with torch.device("meta"), _SkipInitialisers():
        yield


def guess_kind(sd):
    """What a state dict looks like, for error messages: which model family its keys belong to."""
    for wrapper in ("state_dict", "model"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    keys = list(sd)
    if any(k.startswith("image_encoder.") for k in keys):
        return "a SAM checkpoint"
    if any(k.startswith("visual.") for k in keys) or "token_embedding.weight" in sd:
        return "a CLIP checkpoint"
    if any(k.startswith("head_clip.") for k in keys):
        return "a SAM-CLIP merged checkpoint"
    return f"an unknown checkpoint (keys like {keys[:3]})"


def match_preset(cfg, presets):
    """The name of the preset whose config equals `cfg` field by field, or None. Every loader uses
    it to say which model it recognised from a checkpoint's shapes (STYLE.md, "Weights")."""
    return next((name for name, preset in presets.items() if asdict(preset) == asdict(cfg)), None)


def source_name(checkpoint):
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"


# ----------------------------------------------------------------------------- writing

def atomic_save(obj, path):
    """torch.save to `path` so that readers only ever see the old file or the complete new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
