"""Speed and memory of SAM-CLIP: the inference-cost claim (Sec. 1, 4.4) and one training step
(Sec. 4.1).

    python bench.py speed        [--preset vit_b|tiny] [--device cpu|cuda] [--dtype fp32|bf16]
                                 [--repeats 3] [--encoder-only]
    python bench.py train-speed  [--preset vit_b|tiny] [--clip-batch 4] [--sam-batch 1]
                                 [--masks 8] [--dtype ...]

speed: one 1024 px SAM-CLIP forward serving both heads against SAM ViT-B plus the CLIP ViT-L/14
image tower run separately (the paper's argument for merging), and the encoder alone at 1024 and
448 px, at 1024 px also against SAM's own attention algorithm (official_attention;
--encoder-only: just that).
train-speed: one distill step (both frozen teachers via losses.teacher_targets, the student's CLIP
and SAM branches over SAM's interactive rounds, backward, AdamW) per D_CLIP resolution, at constant
pixels per batch as the variable-resolution sampler keeps them; then what one DataLoader worker
decodes and augments per second on synthetic images of the real sets' sizes (D_CLIP from a folder
and from a WebDataset tar shard of the same images), and so how many workers a rank needs to keep
the step fed.

Weights and inputs are random: speed does not depend on them, and no download is needed. Each row
reports the median of --repeats timed runs after one warm-up, the parameter count and the peak
memory. Peak memory, measured the standard way for the device:
  - cuda: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats (tensors only).
  - cpu: the process's peak resident set (getrusage ru_maxrss, weights and Python included). It
    is a high-water mark that cannot be reset, so by default every row runs in a fresh process
    (multiprocessing, spawn) and the peak is that row's alone; "rise" is the growth of the mark
    over its value once the model is built (activations and workspace). --in-process runs every
    row in this process (faster, for smoke runs): the mark then only grows, and later rows
    inherit earlier peaks.
--dtype bf16 runs the forwards (and the training step) under torch.autocast with bfloat16.
Every row also counts its FLOPs (torch.utils.flop_counter: matmuls, convolutions, attention) and
prints the achieved TFLOP/s, and MFU against the device's dense bf16 peak (--peak-tflops, or a
known GPU's data-sheet value). A training step's FLOPs are the model's: counted in one more step
with gradient checkpointing off, so recomputation does not count as useful work.
"""

import argparse
import functools
import io
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils import flop_counter

import clip
import data
import heads
import losses
import model as samclip_model
import shards
import train
import vit_det

DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, SXM parts) for MFU; --peak-tflops
# overrides them, and is the only source on CPUs and other GPUs.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


# ----------------------------------------------------------------------------- measuring one row


def peak_rss_mb():
    """The process's peak resident set so far (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tflop(fn):
    """The floating-point work of one call of fn, in TFLOP, by torch's FLOP counter (matmuls,
    convolutions, attention; forward and backward)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _count_cpu_attention():
    """torch's FLOP counter knows the GPU attention kernels, not the CPU one: count it as it
    counts them."""
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return
    forward = ops._scaled_dot_product_flash_attention_for_cpu
    backward = ops._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_counter.flop_registry:
        return
    flop_counter.register_flop_formula(forward)(_cpu_attention_flops)
    flop_counter.register_flop_formula(backward)(_cpu_attention_backward_flops)


_count_cpu_attention()


def measure(build, repeats, device, dtype, peak_tflops=None):
    """build() -> (name, parameter count, fn, grad[, count_fn]): fn runs one forward (or step). Runs
    fn once to warm up, then `repeats` times, timed; then counts the FLOPs of one call of count_fn
    (default fn), after the peak memory is read: achieved TFLOP/s, and MFU against peak_tflops.
    Returns the row as a dict."""
    cuda = device.type == "cuda"
    name, params, fn, grad, *count_fn = build(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    built = torch.cuda.memory_allocated(device) / 2**20 if cuda else peak_rss_mb()
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None)
    times = []
    with torch.enable_grad() if grad else torch.no_grad(), autocast:
        for i in range(repeats + 1):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb()
    row = {
        "name": name,
        "latency_s": statistics.median(times[1:]),
        "times_s": times[1:],
        "params_M": params / 1e6,
        "peak_MB": peak,
        "rise_MB": peak - built,
        "device": str(device),
        "dtype": dtype,
    }
    if dtype != "fp32" and not grad:
        # the same forward in fp32, after the peak is read: how close bf16 stays
        with torch.no_grad():
            reference = flat(fn()).double()
        row["cosine_to_fp32"] = torch.nn.functional.cosine_similarity(
            flat(out).double(), reference, dim=0
        ).item()
    with torch.enable_grad() if grad else torch.no_grad(), autocast:
        row["tflop"] = count_tflop(count_fn[0] if count_fn else fn)
    row["tflops_per_s"] = row["tflop"] / row["latency_s"]
    if peak_tflops:
        row["mfu"] = row["tflops_per_s"] / peak_tflops
    line = (
        f"  {name:<58} {row['latency_s']:8.3f} s {row['params_M']:8.1f} M {peak:9.0f} MB "
        f"{peak - built:+9.0f} MB {row['tflops_per_s']:8.3f}"
    )
    if "mfu" in row:
        line += f"  MFU {100 * row['mfu']:.1f}%"
    if "cosine_to_fp32" in row:
        line += f"  cosine to fp32 {row['cosine_to_fp32']:.6f}"
    print(line, flush=True)
    return row


def flat(out):
    """Every tensor of a forward's output (a tensor, or tuples / dicts of them), as one flat
    vector."""
    if torch.is_tensor(out):
        return out.float().flatten()
    parts = out.values() if isinstance(out, dict) else out
    return torch.cat([flat(p) for p in parts])


def run_row(build, args):
    """One row, in a fresh process unless --in-process (see the docstring: a clean CPU peak)."""
    device = torch.device(args.device)
    peak = getattr(args, "peak_tflops", None)
    if args.in_process:
        return measure(build, args.repeats, device, args.dtype, peak)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(
            _child, build, args.repeats, args.device, args.dtype, args.threads, peak
        ).result()


def _child(build, repeats, device, dtype, threads, peak_tflops=None):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    return measure(build, repeats, torch.device(device), dtype, peak_tflops)


def count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------- speed: the rows
# Module-level functions (not closures), so a spawned process can unpickle them by name.

NAMES = {"vit_b": ("vit_b", "sam", "openclip_vit_l_14"), "tiny": ("tiny", "tiny", "tiny")}


def official_attention(attn, x):
    """SAM's own attention (segment_anything/modeling/image_encoder.py, Attention.forward with
    add_decomposed_rel_pos), re-typed as the baseline of the encoder row: the whole (B*heads, N, N)
    score matrix, the decomposed bias added to it through a (B*heads, H, W, H, W) view, a separate
    softmax. vit_det.Attention computes the same numbers (see encoder_head_to_head)."""
    B, H, W, _ = x.shape
    nh = attn.num_heads
    qkv = attn.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hd)
    q, k, v = qkv.reshape(3, B * nh, H * W, -1).unbind(0)  # (B*nh, N, hd) each
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B*nh, N, N)
    Rh = vit_det.get_rel_pos(H, H, attn.rel_pos_h)  # (H, H, hd)
    Rw = vit_det.get_rel_pos(W, W, attn.rel_pos_w)  # (W, W, hd)
    r_q = q.reshape(-1, H, W, q.shape[-1])  # (B*nh, N, hd) -> (B*nh, H, W, hd)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B*nh, H, W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B*nh, H, W, W)
    scores = scores.view(-1, H, W, H, W) + rel_h[..., None] + rel_w[..., None, :]
    scores = scores.view(-1, H * W, H * W)  # (B*nh, H, W, H, W) -> (B*nh, N, N)
    out = scores.softmax(dim=-1) @ v  # (B*nh, N, hd)
    out = out.view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)  # (B, H, W, C)
    return attn.proj(out)


def random_encoder(preset, device, official=False):
    """The preset's encoder with random relative-position tables (at init they are zero, which
    would make the bias vanish), built from seed 0 so the official and our rows hold the same
    weights; official=True swaps every block's attention for official_attention."""
    torch.manual_seed(0)
    enc = vit_det.build_vit_det(NAMES[preset][0])
    for blk in enc.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.02)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.02)
        if official:
            blk.attn.forward = functools.partial(official_attention, blk.attn)
    return enc.eval().requires_grad_(False).to(device)


def build_encoder(preset, side, device, official=False):
    enc = random_encoder(preset, device, official)
    x = torch.randn(1, 3, side, side, device=device)
    name = f"{NAMES[preset][0]} encoder @ {side} px"
    if official:
        name += ", SAM's official attention"
    return name, count(enc), lambda: enc(x), False


def encoder_head_to_head(preset, device, repeats, dtype="fp32"):
    """Our encoder against official_attention's, same weights, in one process: the largest
    |ours - official| of the neck output for one random image at the native side (both fp32, the
    exactness the encoder row claims), then `repeats` timed forwards of each, alternating: ours in
    `dtype` (bf16: under autocast), SAM's in fp32, the baseline. On a shared
    machine whose speed drifts, alternating is what keeps the ratio honest; the rows, one process
    each, give the peaks."""
    torch.manual_seed(1)
    device = torch.device(device)
    side = vit_det.PRESETS[NAMES[preset][0]].img_size
    x = torch.randn(1, 3, side, side, device=device)
    ours = random_encoder(preset, device)
    official = random_encoder(preset, device, official=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"ours": [], "official": []}
    with torch.no_grad():
        reference = official(x)  # these first forwards are the warm-ups
        difference = (ours(x) - reference).abs().max().item()
        magnitude = reference.abs().max().item()
        for _ in range(repeats):
            for name, enc in (("official", official), ("ours", ours)):
                sync()
                start = time.perf_counter()
                low_precision = name == "ours" and dtype != "fp32"
                with torch.autocast(device.type, DTYPES[dtype], enabled=low_precision):
                    enc(x)
                sync()
                times[name].append(time.perf_counter() - start)
    return {
        "max_abs_difference_fp32": difference,
        "output_max_abs": magnitude,
        "official_s": statistics.median(times["official"]),
        "ours_s": statistics.median(times["ours"]),
    }


def build_sam(preset, device):
    enc = vit_det.build_vit_det(NAMES[preset][0]).eval().requires_grad_(False).to(device)
    head = heads.build_head_sam(NAMES[preset][1]).eval().requires_grad_(False).to(device)
    S = enc.cfg.img_size
    x = torch.randn(1, 3, S, S, device=device)
    box = torch.tensor([[0.1, 0.1, 0.6, 0.7]], device=device) * S
    name = f"SAM {NAMES[preset][0]}: encoder + head @ {S} px"
    return name, count(enc, head), lambda: head(enc(x), boxes=box), False


def build_clip_tower(preset, device):
    tower = clip.build_clip(NAMES[preset][2]).visual  # the image tower
    tower = tower.eval().requires_grad_(False).to(device)
    side = tower.conv1.kernel_size[0] * round((tower.positional_embedding.shape[0] - 1) ** 0.5)
    x = torch.randn(1, 3, side, side, device=device)
    name = f"CLIP {NAMES[preset][2]} image tower @ {side} px"
    return name, count(tower), lambda: tower(x), False


def build_samclip(preset, device):
    merged = samclip_model.SAMCLIP(samclip_model.PRESETS[preset]()).eval().requires_grad_(False)
    del merged.text  # not part of an image forward
    merged.to(device)
    S = merged.cfg.encoder.img_size
    x = torch.randn(1, 3, S, S, device=device)
    box = torch.tensor([[0.1, 0.1, 0.6, 0.7]], device=device) * S
    name = f"SAM-CLIP: encoder + HeadCLIP + HeadSAM @ {S} px"
    return name, count(merged), lambda: merged(x, boxes=box), False


def cmd_speed(args):
    """Batch 1, eval, no_grad. Rows: encoder @ native with SAM's official attention and with ours,
    encoder @ 448 px, SAM, CLIP tower, SAM-CLIP."""
    enc_cfg = vit_det.PRESETS[NAMES[args.preset][0]]
    S = enc_cfg.img_size
    header(args, f"speed: batch 1, {args.dtype} on {args.device}", "latency")
    builds = [
        functools.partial(build_encoder, args.preset, S, official=True),
        functools.partial(build_encoder, args.preset, S),
        functools.partial(build_encoder, args.preset, vit_det.scaled_side(448, enc_cfg)),
        functools.partial(build_sam, args.preset),
        functools.partial(build_clip_tower, args.preset),
        functools.partial(build_samclip, args.preset),
    ]
    if args.encoder_only:
        builds = builds[:2]
    rows = [run_row(build, args) for build in builds]
    official, ours = rows[:2]
    if args.in_process:
        duel = encoder_head_to_head(args.preset, args.device, args.repeats, args.dtype)
    else:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            duel = pool.submit(
                encoder_head_to_head, args.preset, args.device, args.repeats, args.dtype
            ).result()
    summary = {
        "encoder_speedup_over_official": duel["official_s"] / duel["ours_s"],
        "encoder_peak_over_official": ours["peak_MB"] / official["peak_MB"],
        "encoder_head_to_head": duel,
    }
    print(
        f"  encoder, ours ({args.dtype}) vs official attention (fp32), alternating in one "
        f"process: {duel['ours_s']:.3f} s vs {duel['official_s']:.3f} s, "
        f"x{summary['encoder_speedup_over_official']:.2f} faster; peak "
        f"x{summary['encoder_peak_over_official']:.2f} (rows above); fp32 outputs differ by at "
        f"most {duel['max_abs_difference_fp32']:.1e} (output magnitude up to "
        f"{duel['output_max_abs']:.1f})"
    )
    if args.encoder_only:
        return finish(args, {"rows": rows, **summary})
    sam, tower, samclip = rows[3:]
    summary |= {
        "separate_latency_s": sam["latency_s"] + tower["latency_s"],
        "separate_params_M": sam["params_M"] + tower["params_M"],
    }
    summary |= {
        "latency_ratio_separate_over_samclip": summary["separate_latency_s"] / samclip["latency_s"],
        "params_ratio_separate_over_samclip": summary["separate_params_M"] / samclip["params_M"],
    }
    print(
        f"  {'SAM + CLIP run separately':<58} {summary['separate_latency_s']:8.3f} s "
        f"{summary['separate_params_M']:8.1f} M\n"
        f"  separate / SAM-CLIP: latency x{summary['latency_ratio_separate_over_samclip']:.2f}, "
        f"parameters x{summary['params_ratio_separate_over_samclip']:.2f}"
    )
    return finish(args, {"rows": rows, **summary})


# ----------------------------------------------------------------------------- train-speed


def build_distill_step(preset, resolution, clip_batch, sam_batch, masks, device):
    """One distill step, as train.py takes it, on random weights and random inputs."""
    torch.manual_seed(0)
    enc_name, head_name, clip_name = NAMES[preset]
    teachers = {
        "sam_encoder": vit_det.build_vit_det(enc_name),
        "sam_head": heads.build_head_sam(head_name),
        "clip": clip.build_clip(clip_name),
    }
    teachers = {name: t.requires_grad_(False).eval().to(device) for name, t in teachers.items()}
    student = samclip_model.SAMCLIP.from_modules(teachers).to(device)
    cfg = train.TrainConfig(stage="distill", **train.STAGES["distill"])  # the distill row
    train.set_trainable(student, cfg)
    step = losses.MultiTaskLoss(student, cfg.losses)
    opt = torch.optim.AdamW(train.param_groups(student, cfg))
    S = student.cfg.encoder.img_size
    T = teachers["clip"].config.image_size
    base = vit_det.scaled_side(224, student.cfg.encoder)
    n = max(1, round(clip_batch * (base / resolution) ** 2))  # constant pixels per batch
    g = torch.Generator().manual_seed(0)
    clip_in = {
        "student": torch.randn(n, 3, resolution, resolution, generator=g),
        "teacher": torch.randn(n, 3, T, T, generator=g),
        "index": torch.arange(n),
        "ok": torch.ones(n, dtype=torch.bool),
    }
    sam_in = random_sam_batch(sam_batch, masks, S, g)
    batches = {"clip": data.to_device(clip_in, device), "sam": data.to_device(sam_in, device)}

    def one_step():
        with torch.no_grad():
            targets = losses.teacher_targets(teachers, batches, cfg.losses, cfg.sam_rounds)
        out = step(batches, targets)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def model_flops_step():
        # MFU counts the model's FLOPs, not the recomputation of checkpointed blocks
        student.set_grad_checkpointing(False)
        one_step()
        student.set_grad_checkpointing(True)

    name = (
        f"distill: {n} x {resolution} px D_CLIP + {sam_batch} x {S} px D_SAM "
        f"({masks} prompts x {cfg.sam_rounds} rounds)"
    )
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return name, trained, one_step, True, model_flops_step


def random_sam_batch(B, K, S, g, P=3):
    """A D_SAM batch with data.collate_sam's keys: half box prompts, half point prompts, and one
    ground-truth object per prompt for the follow-up rounds to correct."""
    batch = {
        "image": torch.randn(B, 3, S, S, generator=g),
        "point_coords": torch.rand(B, K, P, 2, generator=g) * S,
        "point_labels": torch.randint(0, 2, (B, K, P), generator=g),
        "boxes": torch.tensor([0.1, 0.1, 0.6, 0.7]).repeat(B, K, 1) * S,
        "has_box": torch.arange(K).repeat(B, 1) % 2 == 0,
        "valid": torch.ones(B, K, dtype=torch.bool),
        "input_size": torch.tensor([S, S]).repeat(B, 1),
        "error_draws": torch.rand(B, K, data.SAM_POINT_ROUNDS, generator=g),
        "gt_masks": torch.zeros(B, K, S // 4, S // 4, dtype=torch.bool),
    }
    batch["gt_masks"][..., S // 16 : S // 8, S // 16 : S // 6] = True
    return batch


# Synthetic stand-ins for the training data, sized as the real sets are: decoding costs grow with
# the pixels of an image and with the masks decoded for its prompts.
CLIP_SIDES = (400, 700)  # D_CLIP: each side of a CC12M-like image drawn from 400 to 700 px
SA1B_HW = (1500, 2250)  # D_SAM: SA-1B's released images, shorter side 1500 px (SAM Sec. 5)
SA1B_MASKS = 100  # SA-1B: 1.1B masks on 11M images, about 100 an image (SAM Sec. 5)


def synthetic_photo(h, w, rng):
    """An (h, w) RGB PIL image: a smooth random colour field (one random colour every 48 px,
    bicubic in between) plus uniform pixel noise of +-6, so that its JPEG holds about as many
    bytes per pixel as a photo's (~1.5 bits at quality 90) and decodes about as slowly; a flat
    image would compress to little and decode faster."""
    coarse = rng.integers(0, 256, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def synthetic_annotations(h, w, n, rng):
    """n SA-1B annotations of an (h, w) image: rectangles and ellipses, each side log-uniform from
    2% to 50% of the image's (most SA-1B masks are small parts), as COCO RLE (data.rle_encode).
    -> [{"id", "segmentation", "area", "bbox" XYWH}]"""
    anns = []
    for i in range(n):
        mh = int(h * np.exp(rng.uniform(np.log(0.02), np.log(0.5))))
        mw = int(w * np.exp(rng.uniform(np.log(0.02), np.log(0.5))))
        top = int(rng.integers(0, h - mh + 1))
        left = int(rng.integers(0, w - mw + 1))
        mask = np.zeros((h, w), dtype=bool)
        if i % 2 == 0:
            mask[top : top + mh, left : left + mw] = True
        else:
            ys, xs = np.ogrid[:mh, :mw]
            inside = ((ys + 0.5) / mh - 0.5) ** 2 + ((xs + 0.5) / mw - 0.5) ** 2 <= 0.25
            mask[top : top + mh, left : left + mw] = inside
        rows = np.flatnonzero(mask.any(1))
        cols = np.flatnonzero(mask.any(0))
        bbox = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]  # XYWH
        anns.append(
            {
                "id": i,
                "segmentation": data.rle_encode(mask),
                "area": int(mask.sum()),
                "bbox": [int(v) for v in bbox],
            }
        )
    return anns


def write_synthetic_data(
    root, clip_images, sam_images, clip_sides=CLIP_SIDES, sam_hw=SA1B_HW, masks=SA1B_MASKS, seed=0
):
    """D_CLIP and D_SAM as the loaders read them, from synthetic_photo: root/clip/clip_<i>.jpg
    (data.CLIPImages; each side drawn from clip_sides) and root/sa1b/sa_<i>.jpg + sa_<i>.json
    (data.SA1B; sam_hw images), the JSON in SA-1B's schema: {"image": {image_id, width, height,
    file_name}, "annotations": [{id, segmentation, area, bbox}]}. Every SA-1B image carries the
    same `masks` annotations: decoding them costs the same, and encoding them once keeps the
    writing short. -> (clip folder, sa1b folder)"""
    rng = np.random.default_rng(seed)
    clip_folder = os.path.join(root, "clip")
    sam_folder = os.path.join(root, "sa1b")
    os.makedirs(clip_folder)
    os.makedirs(sam_folder)
    for i in range(clip_images):
        h, w = rng.integers(clip_sides[0], clip_sides[1] + 1, 2).tolist()
        synthetic_photo(h, w, rng).save(os.path.join(clip_folder, f"clip_{i}.jpg"), quality=90)
    h, w = sam_hw
    anns = synthetic_annotations(h, w, masks, rng)
    for i in range(sam_images):
        synthetic_photo(h, w, rng).save(os.path.join(sam_folder, f"sa_{i}.jpg"), quality=90)
        image = {"image_id": i, "width": w, "height": h, "file_name": f"sa_{i}.jpg"}
        with open(os.path.join(sam_folder, f"sa_{i}.json"), "w") as f:
            json.dump({"image": image, "annotations": anns}, f)
    return clip_folder, sam_folder


def write_synthetic_shard(clip_folder, path):
    """The D_CLIP images of write_synthetic_data as one WebDataset shard at `path`, as img2dataset
    writes them: <key>.jpg (the same bytes) + <key>.txt per image, key = the file's stem."""
    with tarfile.open(path, "w") as tar:
        for name in sorted(os.listdir(clip_folder)):
            key = name[: -len(".jpg")]
            tar.add(os.path.join(clip_folder, name), arcname=f"{key}.jpg")
            caption = tarfile.TarInfo(f"{key}.txt")
            caption.size = len(key)
            tar.addfile(caption, io.BytesIO(key.encode()))
    return path


def data_speed(preset, n=24, clip_sides=CLIP_SIDES, sam_hw=SA1B_HW, masks=SA1B_MASKS):
    """What one DataLoader worker delivers: D_CLIP samples (decode, random crop, student and
    teacher views) from a folder and from a tar shard of the same images (shards.ShardImages:
    tar reading and batching included), and D_SAM samples (decode, SAM's resize + pad, a mask
    decoded for each of 32 prompts) per second, in this process, on n D_CLIP and n // 3 D_SAM
    images that write_synthetic_data writes to a temporary folder.
    -> {"clip": img/s, "clip_shards": img/s, "sam": img/s}"""
    enc_name, _, clip_name = NAMES[preset]
    S = vit_det.PRESETS[enc_name].img_size
    T = clip.PRESETS[clip_name].image_size
    resolution = vit_det.scaled_side(224, vit_det.PRESETS[enc_name])  # the smallest D_CLIP side
    with tempfile.TemporaryDirectory() as root:
        clip_folder, sam_folder = write_synthetic_data(root, n, n // 3, clip_sides, sam_hw, masks)
        clip_items = [(i, resolution, 0) for i in range(n)]
        sam_items = [(i, 0) for i in range(n // 3)]
        loaders = {
            "clip": (data.CLIPImages(clip_folder, teacher_size=T), clip_items),
            "sam": (data.SA1B(sam_folder, S, masks_per_image=32), sam_items),
        }
        rates = {}
        for name, (dataset, items) in loaders.items():
            dataset[items[0]]  # warm-up
            start = time.perf_counter()
            for item in items:
                dataset[item]
            rates[name] = len(items) / (time.perf_counter() - start)
        shard = write_synthetic_shard(clip_folder, os.path.join(root, "00000.tar"))
        stream = shards.ShardImages(shard, 4, (resolution,), num_samples=n, teacher_size=T)
        start = time.perf_counter()
        read = sum(len(batch["key"]) for batch in stream.batches(0))  # n // 4 batches of 4
        rates["clip_shards"] = read / (time.perf_counter() - start)
    return rates


def cmd_train_speed(args):
    enc_cfg = vit_det.PRESETS[NAMES[args.preset][0]]
    title = "train-speed: one distill step (teachers + student forward/backward + AdamW)"
    header(args, f"{title}, {args.dtype} on {args.device}", "s/step")
    base = vit_det.scaled_side(224, enc_cfg)
    rows = []
    for r in (base, vit_det.scaled_side(448, enc_cfg)):
        build = functools.partial(
            build_distill_step, args.preset, r, args.clip_batch, args.sam_batch, args.masks
        )
        row = run_row(build, args)
        n = max(1, round(args.clip_batch * (base / r) ** 2))  # as build_distill_step takes it
        row |= {
            "clip_img_per_s": n / row["latency_s"],
            "sam_img_per_s": args.sam_batch / row["latency_s"],
            "resolution": r,
            "clip_images": n,
        }
        print(
            f"  {'':<58} {row['clip_img_per_s']:8.2f} D_CLIP img/s, "
            f"{row['sam_img_per_s']:.2f} D_SAM img/s"
        )
        rows.append(row)
    per_worker = data_speed(args.preset)
    # workers per rank to keep up
    need = max(
        max(r["clip_img_per_s"] for r in rows) / per_worker["clip"],
        rows[0]["sam_img_per_s"] / per_worker["sam"],
    )
    print(
        f"  data, one DataLoader worker (decode + augment): {per_worker['clip']:.1f} D_CLIP img/s "
        f"from a folder, {per_worker['clip_shards']:.1f} from a tar shard, "
        f"{per_worker['sam']:.1f} D_SAM img/s; the step needs about {need:.2f} workers per rank "
        "(--workers)"
    )
    results = {"rows": rows, "data_img_per_s_per_worker": per_worker, "workers_needed": need}
    return finish(args, results)


# ----------------------------------------------------------------------------- command line


def header(args, title, unit):
    print(
        f"{title}, {torch.get_num_threads()} CPU threads, median of {args.repeats} after 1 "
        f"warm-up, {'in this process' if args.in_process else 'each row in a fresh process'}\n"
        f"  {'':<58} {unit:>10} {'params':>10} {'peak':>12} {'rise':>12} {'TFLOP/s':>8}"
    )


def finish(args, results):
    results = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        **results,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn, help in (
        ("speed", cmd_speed, "latency / memory / parameters, SAM-CLIP vs SAM + CLIP"),
        ("train-speed", cmd_train_speed, "throughput and memory of one distill step"),
    ):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        p.add_argument(
            "--preset",
            choices=sorted(NAMES),
            default="vit_b",
            help="model sizes (tiny: a smoke run)",
        )
        p.add_argument(
            "--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)"
        )
        p.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default="fp32",
            help="fp32, or bf16 autocast (default fp32)",
        )
        p.add_argument(
            "--repeats", type=int, default=3, help="timed runs per row, median reported (default 3)"
        )
        p.add_argument(
            "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)"
        )
        p.add_argument(
            "--in-process",
            action="store_true",
            help="run every row in this process (quick; the CPU peak then accumulates over rows)",
        )
        p.add_argument("--out", help="write the results as JSON here")
        p.add_argument(
            "--peak-tflops",
            type=float,
            help="the device's dense bf16 peak, TFLOP/s, for MFU "
            "(default: known GPUs by name; CPU: none)",
        )
        if name == "speed":
            p.add_argument(
                "--encoder-only",
                action="store_true",
                help="only the encoder at its native side, official attention vs ours",
            )
        if name == "train-speed":
            p.add_argument(
                "--clip-batch",
                type=int,
                default=4,
                help="D_CLIP images per step at the smallest resolution (default 4)",
            )
            p.add_argument(
                "--sam-batch", type=int, default=1, help="D_SAM images per step (default 1)"
            )
            p.add_argument(
                "--masks",
                type=int,
                default=8,
                help="prompts per D_SAM image (default 8; the paper: 32)",
            )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_tflops is None and args.device == "cuda":
        gpu = torch.cuda.get_device_name()
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    return args.func(args)


if __name__ == "__main__":
    main()
