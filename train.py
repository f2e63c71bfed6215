"""Train SAM-CLIP (Sec. 3, 4.1, App. A): head probing -> multi-task distillation -> resolution adaptation.

    probe    HeadCLIP alone on L_CLIP, backbone frozen
    distill  L_CLIP + lam * L_SAM on the backbone, HeadCLIP and the mask decoder
    adapt    HeadCLIP alone on L_CLIP at 224/448/1024 px, backbone frozen   (each one's lr, epochs, sides: STAGES)
A distill step (Sec. 4.1): a D_CLIP batch at the step's resolution (2048 images at 224 px, fewer at 448:
constant pixels) gives L_CLIP against the frozen CLIP ViT-L/14 image tower, a D_SAM batch (32 images at
1024 px, 32 prompts each, replayed over SAM's interactive rounds) gives L_SAM against the frozen SAM; one
backward of their sum (the paper's two accumulated backwards), one optimizer step. Losses, targets:
losses.py; data, samplers, stream, teacher cache: data.py.

Run (one device, or torchrun; nccl on GPU, gloo on CPU):
    python train.py --preset toy --out runs/toy            # built-in: the shipped toy teachers, ~3 min CPU
    torchrun --nproc_per_node 8 train.py --stage distill --sam-checkpoint sam_vit_b_01ec64.pth \\
        --clip-checkpoint open_clip_pytorch_model.bin --clip-data /data/cc12m --sam-data /data/sa1b \\
        --init runs/probe/samclip.pt --out runs/distill
Everything a run writes is in --out: ckpt_<stage>.pt (atomic, every --save-every steps, at the end and on
SIGTERM/SIGINT), metrics.jsonl (a JSON object per logging step), samclip.pt (the merged model after each
stage, for evaluate.py and segment_demo.py). --resume continues exactly.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip
import data
import losses
import toy
import vit_det
import weights
from model import SAMCLIP, build_samclip, compile_modules, load_teachers, autocast as model_autocast
from toy import layouts


# ----------------------------------------------------------------------------- config

# App. A, one row per stage and the only place its numbers live: the modules that train, HeadCLIP's
# learning rate (the backbone and mask decoder take lr * backbone_lr_ratio), epochs over D_CLIP,
# and the D_CLIP resolutions one of which each step draws (in the paper's pixels for the 1024 px
# encoder; smaller presets scale them with vit_det.scaled_side).
STAGES = {
    "probe": dict(trains=("head_clip",), lr=8e-4, epochs=20, resolutions=(224, 448)),
    "distill": dict(trains=("encoder", "head_clip", "head_sam.mask_decoder"), lr=4e-5, epochs=16,
                    resolutions=(224, 448)),
    "adapt": dict(trains=("head_clip",), lr=8e-4, epochs=3, resolutions=(224, 448, 1024)),
}


@dataclass
class TrainConfig:
    stage: str = "distill"            # probe | distill | adapt (--stage all runs the three in order)
    preset: str = "vit_b"             # vit_b: real run from official weights; toy, tiny: built-in CPU runs
    sam_checkpoint: str = ""          # official SAM file (teacher and initialisation), e.g. sam_vit_b_01ec64.pth
    clip_checkpoint: str = ""         # official OpenCLIP ViT-L/14 file (teacher, text tower)
    init: str = ""                    # merged checkpoint to start from (the previous stage's samclip.pt)
    clip_data: str = ""               # D_CLIP: image folder (recursive) or a text file of paths
    sam_data: str = ""                # D_SAM: SA-1B layout (sa_N.jpg + sa_N.json)
    out: str = "runs/samclip"         # everything the run writes
    epochs: int = STAGES["distill"]["epochs"]   # passes over D_CLIP (each stage's own: STAGES)
    max_steps: int = 0                # stop after this many optimizer steps (0: no cap); the schedule is unchanged
    lr: float = STAGES["distill"]["lr"]        # HeadCLIP's learning rate (each stage's own: STAGES)
    backbone_lr_ratio: float = 0.1    # backbone and mask decoder at lr * this (App. A: 10x smaller)
    weight_decay: float = 0.05        # AdamW, on linear/conv weights only (not stated in the paper)
    warmup_steps: int = 500           # linear warm-up, then cosine decay to 0 (not stated in the paper)
    clip_batch: int = 2048            # global D_CLIP images per step at the smallest resolution (Sec. 4.1)
    resolutions: tuple = STAGES["distill"]["resolutions"]   # student D_CLIP sides in px (the stage's, scaled)
    teacher_size: int = None          # CLIP teacher's input side (None: its native one, 224 for ViT-L/14)
    sam_batch: int = 32               # global D_SAM images per step, at the encoder's native 1024 px
    masks_per_image: int = 32         # prompts per D_SAM image (Sec. 4.1)
    sam_rounds: int = 4               # SAM's interactive prompt rounds (SAM App. A: 11); 4 covers points + mask prompt
    lam: float = losses.LAM           # L_CLIP + lam * L_SAM, 10 (Sec. 4.1)
    grad_clip: float = 1.0            # max global gradient norm
    accum_steps: int = 1              # micro-batches per optimizer step (reach the global batch on fewer GPUs)
    seed: int = 0
    log_every: int = 10               # optimizer steps between metrics lines
    save_every: int = 500             # optimizer steps between checkpoints
    workers: int = 8                  # DataLoader worker processes per rank
    dtype: str = ""                   # fp32 | bf16 (autocast); "": bf16 on CUDA, fp32 on CPU
    grad_checkpointing: bool = True   # encoder blocks, mask decoder recomputed in the backward when the encoder trains
    cache_teacher: str = ""           # folder for cached CLIP-teacher embeddings (fixed crops per image)
    compile: bool = False             # torch.compile encoder blocks, neck, HeadCLIP (model.compile_modules)


# Built-in CPU runs on toy-world scenes written to OUT/data: settings, per-stage ones, data sizes. tiny: random
# teachers, seconds (tests); toy: the shipped toy teachers, the README's main job (< 5 min on 2 cores), its distill lr
# 10x the paper's and 100x for the backbone: at 4e-5 in a few hundred steps it barely moved (lambda = 0: -0.1 mIoU).
BUILTIN = {
    "tiny": dict(settings=dict(clip_batch=8, sam_batch=2, masks_per_image=4, warmup_steps=2, log_every=1,
                               save_every=4, workers=0, grad_checkpointing=False),
                 sizes=dict(clip_images=24, sam_images=6),
                 stages={"probe": dict(epochs=2), "distill": dict(epochs=2), "adapt": dict(epochs=1)}),
    "toy": dict(settings=dict(clip_batch=32, sam_batch=2, masks_per_image=8, sam_rounds=3, warmup_steps=20,
                              log_every=10, save_every=100, workers=0, grad_checkpointing=False),
                sizes=dict(clip_images=400, sam_images=100),
                stages={"probe": dict(epochs=14), "distill": dict(epochs=12, lr=4e-4, backbone_lr_ratio=1.0),
                        "adapt": dict(epochs=3)}),
}


def resolve_config(args, stage, encoder_cfg, teacher_cfg):
    """TrainConfig defaults <- the stage's row of STAGES <- a built-in preset's settings <- flags given.
    Resolutions are the paper's scaled to the encoder (vit_det.scaled_side: 224 -> 48 at 160 px)
    unless --resolutions names them; the teacher runs at its native side unless --teacher-size."""
    row = STAGES[stage]
    cfg = replace(TrainConfig(), stage=stage, lr=row["lr"], epochs=row["epochs"], teacher_size=teacher_cfg.image_size,
                  resolutions=tuple(vit_det.scaled_side(r, encoder_cfg) for r in row["resolutions"]))
    if args.preset in BUILTIN:
        cfg = replace(cfg, **BUILTIN[args.preset]["settings"], **BUILTIN[args.preset]["stages"][stage])
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
             if v is not None and k in TrainConfig.__dataclass_fields__ and k != "stage"}   # lists: --resolutions
    return replace(cfg, **given)


# ----------------------------------------------------------------------------- teachers

def build_teachers(args):
    """The frozen teachers (model.load_teachers): SAM's encoder + head, CLIP; the toy preset's are the
    shipped toy files. The tiny preset has random ones, seeded like the student, which so starts as
    an exact copy of this SAM."""
    if args.preset == "toy":
        return load_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS)
    if args.preset == "tiny":
        ref = build_samclip("tiny", seed=args.seed or 0)
        torch.manual_seed(args.seed or 0)
        teachers = (ref.encoder, ref.head_sam, clip.build_clip("tiny"))
        return tuple(t.requires_grad_(False).eval() for t in teachers)
    if not args.sam_checkpoint or not args.clip_checkpoint:
        raise SystemExit("train.py: --sam-checkpoint and --clip-checkpoint are required for real runs "
                         "(see README, 'Using the real weights'), or use --preset tiny")
    return load_teachers(args.sam_checkpoint, args.clip_checkpoint)


# ----------------------------------------------------------------------------- optimisation

def lr_factor(step, total, warmup):
    """The schedule as a pure function of the step: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def set_trainable(model: SAMCLIP, stage, grad_checkpointing=True):
    """Freeze all, unfreeze the stage's modules (STAGES); text tower, prompt encoder, teachers never train."""
    model.requires_grad_(False)
    for name in STAGES[stage]["trains"]:
        model.get_submodule(name).requires_grad_(True)
    model.set_grad_checkpointing(grad_checkpointing and "encoder" in STAGES[stage]["trains"])   # memory


DECAYED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)   # AdamW decays their weights only


def param_groups(model: SAMCLIP, cfg: TrainConfig):
    """AdamW groups: HeadCLIP at lr, backbone and mask decoder at lr * backbone_lr_ratio (App. A);
    weight decay only on the weights of linear and convolution layers, none on biases, norms,
    position tables, relative-position tables, tokens and embeddings (ViT-Det/MAE practice).
    Decided by the layer a parameter belongs to, not its shape: pos_embed, rel_pos_h/w and the
    IoU/mask tokens are matrices too."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    groups = []
    for module, lr in ((model.head_clip, cfg.lr), (model.encoder, cfg.lr * cfg.backbone_lr_ratio),
                       (model.head_sam, cfg.lr * cfg.backbone_lr_ratio)):
        params = [p for p in module.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (id(p) in decayed) == decay]
            if chosen:
                groups.append({"params": chosen, "base_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay * decay})
    return groups


# ----------------------------------------------------------------------------- one stage

def run_stage(cfg: TrainConfig, model: SAMCLIP, teachers, env, stop):
    rank, world, device = env["rank"], env["world"], env["device"]
    uses_sam = cfg.stage == "distill"
    ckpt_path = os.path.join(cfg.out, f"ckpt_{cfg.stage}.pt")
    state = weights.safe_load(ckpt_path, "training checkpoint") if os.path.exists(ckpt_path) else None
    if state is not None:
        model.load_state_dict(state["model"])
        if state["done"]:
            log0(rank, f"stage {cfg.stage}: already finished in {ckpt_path}")
            return model
    log0(rank, f"stage {cfg.stage}: {json.dumps(asdict(cfg))}")

    # --- data: D_CLIP at the step's resolution, D_SAM at the native size, split across ranks
    for flag, per in (("clip_batch", cfg.clip_batch), ("sam_batch", cfg.sam_batch)):
        if per % (world * cfg.accum_steps):
            raise SystemExit(f"train.py: --{flag.replace('_', '-')} {per} must be divisible by "
                             f"world size x --accum-steps = {world * cfg.accum_steps}")
    clip_ds = data.CLIPImages(cfg.clip_data, teacher_size=cfg.teacher_size, seed=cfg.seed,
                              fixed_crops=bool(cfg.cache_teacher),   # a cached target needs the same crop every epoch
                              native_size=model.cfg.encoder.img_size)   # at 1024 px: SAM's padded frame (Table 5)
    clip_ds.check_readable(min_images=cfg.clip_batch)   # else no step, or only placeholders, would train
    clip_sampler = data.VariableResolutionSampler(len(clip_ds), cfg.clip_batch // (world * cfg.accum_steps),
                                                  cfg.resolutions, None, world, rank, cfg.seed)
    loader_args = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    clip_loader = torch.utils.data.DataLoader(clip_ds, batch_sampler=clip_sampler, collate_fn=data.collate,
                                              **loader_args)
    cache = None
    if cfg.cache_teacher:
        meta = {"clip_data": os.path.abspath(cfg.clip_data), "n": len(clip_ds), "seed": cfg.seed,
                "teacher": cfg.clip_checkpoint or cfg.preset, "teacher_size": cfg.teacher_size}
        cache = data.TeacherCache(cfg.cache_teacher, len(clip_ds), model.cfg.clip.embed_dim, meta, rank)
    total = sum(len(clip_sampler.plan(e)) for e in range(cfg.epochs)) // cfg.accum_steps
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    if uses_sam:
        sam_ds = data.SA1B(cfg.sam_data, model.cfg.encoder.img_size, cfg.masks_per_image, seed=cfg.seed)
        sam_sampler = data.FixedBatchSampler(len(sam_ds), cfg.sam_batch // (world * cfg.accum_steps), world, rank,
                                             cfg.seed)
        if not sam_sampler.drop_last:
            log0(rank, f"stage {cfg.stage}: --sam-data {cfg.sam_data} holds {len(sam_ds)} images, fewer than one "
                       f"D_SAM batch of {cfg.sam_batch // cfg.accum_steps}: every batch repeats images")
        sam_loader = torch.utils.data.DataLoader(sam_ds, batch_sampler=sam_sampler, collate_fn=data.collate_sam,
                                                 **loader_args)

    # --- model, optimizer, DDP
    set_trainable(model, cfg.stage, cfg.grad_checkpointing)
    compile_modules(model.to(device).train(), cfg.compile)
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log0(rank, f"stage {cfg.stage}: resumed from {ckpt_path} at step {step}")
    trim_metrics(cfg, step, rank)
    student = losses.MultiTaskLoss(model, cfg.lam)
    # DDP needs no find_unused_parameters: every trainable parameter is used in every step (all tokens distilled)
    if world > 1:
        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = lambda: model_autocast(device, cfg.dtype or ("bf16" if device.type == "cuda" else "fp32"))

    def save(done=False):
        if rank == 0:
            weights.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                                 "stage": cfg.stage, "step": step, "done": done}, ckpt_path)
        if world > 1:   # no rank may leave while rank 0 writes: torchrun tears down the group when one rank exits
            dist.barrier()

    def end_epoch(epoch, tally):
        """Report the epoch's unreadable D_CLIP images; stop, saved, if not one of them could be read."""
        if epoch is not None and tally.report(epoch, rank, world, device):
            save()
            raise SystemExit(f"train.py: --clip-data {cfg.clip_data}: no image could be read in epoch {epoch}; "
                             f"checkpoint {ckpt_path} saved at step {step}, continue with --resume once they can")

    # --- the loop: one optimizer step = accum_steps micro-batches of (D_CLIP batch, D_SAM batch)
    clip_stream = data.stream(clip_loader, clip_sampler, step * cfg.accum_steps, cfg.epochs)
    sam_stream = data.stream(sam_loader, sam_sampler, step * cfg.accum_steps) if uses_sam else None
    bar = tqdm(total=last, initial=step, disable=rank != 0, desc=cfg.stage, dynamic_ncols=True, mininterval=2)
    epoch, tally = None, data.EpochTally()
    while step < last:
        t0, logs, n_clip, n_sam = time.time(), {}, 0, 0
        for group in opt.param_groups:                           # the learning rate of this step
            group["lr"] = group["base_lr"] * lr_factor(step, total, cfg.warmup_steps)
        for micro in range(cfg.accum_steps):
            # the batches; a new D_CLIP epoch first closes the last one
            batch_epoch, clip_batch = next(clip_stream)
            if batch_epoch != epoch:
                end_epoch(epoch, tally)
                epoch, tally = batch_epoch, data.EpochTally()
            tally.count(clip_batch)
            clip_batch = data.to_device(clip_batch, device)
            sam_batch = data.to_device(next(sam_stream)[1], device) if uses_sam else None
            # the frozen teachers' targets (Eq. 1: EncCLIP(x); Eq. 2: z for every prompt round)
            with torch.no_grad(), autocast():
                clip_target, sam_target = losses.teacher_targets(teachers, clip_batch, sam_batch, cfg.sam_rounds, cache)
            # the student: both losses in one forward, one backward (DDP syncs on the last micro-batch)
            sync = micro == cfg.accum_steps - 1 or world == 1
            with (contextlib.nullcontext() if sync else student.no_sync()), autocast():
                out = student(clip_batch["student"], clip_target, clip_batch["ok"], sam_batch, sam_target)
                (out["loss"] / cfg.accum_steps).backward()
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / cfg.accum_steps
            n_clip += clip_batch["student"].shape[0]
            n_sam += sam_batch["image"].shape[0] if uses_sam else 0
        # clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if cfg.compile and step == bar.initial + 1:             # torch.compile ran inside this first step
            log0(rank, f"stage {cfg.stage}: --compile: first step {time.time() - t0:.1f} s (a new side compiles again)")
        # one metrics line with every loss term, the lr and the step time
        if step % cfg.log_every == 0 or step == last:
            vals = {k: all_ranks(v, world, device) for k, v in logs.items()}
            dt = time.time() - t0
            rec = {"stage": cfg.stage, "step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"], **vals,
                   "grad_norm": float(grad_norm), "resolution": clip_batch["student"].shape[-1], "step_time": dt,
                   "clip_img_per_s": n_clip * world / dt, "sam_img_per_s": n_sam * world / dt}
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in vals.items()})
            if rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
        # checkpoint; on SIGTERM/SIGINT (any rank) all ranks save and leave together
        stopping = all_ranks(stop["signal"] is not None, world, device, "max") > 0   # any rank asked
        if step % cfg.save_every == 0 or stopping:
            save()
        if stopping:
            bar.close()
            log0(rank, f"stage {cfg.stage}: interrupted at step {step}; checkpoint {ckpt_path} saved, "
                       "continue with --resume")
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()
    end_epoch(epoch, tally)
    save(done=step >= total)
    if rank == 0:
        model.save(os.path.join(cfg.out, "samclip.pt"), stage=cfg.stage, step=step)
    if world > 1:
        dist.barrier()                               # as in save(): all ranks leave once samclip.pt is written
    log0(rank, f"stage {cfg.stage}: done at step {step}/{total}; merged model in {os.path.join(cfg.out, 'samclip.pt')}")
    return model


# ----------------------------------------------------------------------------- bookkeeping

def log0(rank, msg):
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def all_ranks(value, world, device, op="mean"):
    """A float of this rank -> its mean ("mean") or maximum ("max") over all ranks, on every rank."""
    t = torch.tensor([float(value)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() / (world if op == "mean" else 1)


def trim_metrics(cfg, step, rank):
    """On resume, drop metrics lines of this stage logged after the checkpoint (they will be redone)."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if rank != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in lines if r["stage"] != cfg.stage or r["step"] <= step]
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` runs as rank 0 of 1."""
    if "RANK" not in os.environ:
        return {"rank": 0, "world": 1, "device": torch.device("cuda" if torch.cuda.is_available() else "cpu")}
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(),
            "device": torch.device("cuda", local) if cuda else torch.device("cpu")}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    d = TrainConfig()   # the defaults shown in --help come from here, or from STAGES: each number lives once
    rows = "; ".join(f"{s}: lr {r['lr']:g}, {r['epochs']} epochs, {'/'.join(map(str, r['resolutions']))} px"
                     for s, r in STAGES.items())
    p = argparse.ArgumentParser(description="Train SAM-CLIP: probe -> distill -> adapt (Sec. 3, 4.1, App. A). "
                                            f"Per stage (App. A): {rows}.")
    p.add_argument("--stage", default="all", choices=["probe", "distill", "adapt", "all"],
                   help="training stage; 'all' runs probe, distill and adapt in order (default all)")
    p.add_argument("--preset", default="vit_b", choices=["vit_b", "toy", "tiny"],
                   help="vit_b: the paper's model, official weights; toy: the shipped toy teachers, toy-world data; "
                        "tiny: random teachers, seconds (tests) (default vit_b)")
    p.add_argument("--out", default=d.out, help=f"folder for checkpoints, metrics.jsonl, samclip.pt (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--sam-checkpoint", help="official SAM ViT-B file, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--clip-checkpoint", help="official OpenCLIP ViT-L/14 file (.bin or .safetensors)")
    p.add_argument("--init", help="merged checkpoint (samclip.pt) to start the first stage from")
    p.add_argument("--clip-data", help="D_CLIP: folder of images (recursive) or a text file of image paths")
    p.add_argument("--sam-data", help="D_SAM: folder in the SA-1B layout (sa_N.jpg beside sa_N.json)")
    p.add_argument("--epochs", type=int, help="epochs over D_CLIP (default: the stage's, above)")
    p.add_argument("--max-steps", type=int, help="stop a stage after this many optimizer steps (smoke runs)")
    p.add_argument("--lr", type=float, help="HeadCLIP learning rate (default: the stage's, above)")
    p.add_argument("--backbone-lr-ratio", type=float,
                   help=f"backbone and mask-decoder lr / HeadCLIP lr (default {d.backbone_lr_ratio})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW decay of linear/conv weights (default {d.weight_decay})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps, then cosine (default {d.warmup_steps})")
    p.add_argument("--clip-batch", type=int, help=f"global D_CLIP batch at the smallest side (default {d.clip_batch})")
    p.add_argument("--resolutions", type=int, nargs="+", help="D_CLIP student sides, px, one per step (default: above)")
    p.add_argument("--teacher-size", type=int, help="CLIP teacher input side (default: native, 224 for ViT-L/14)")
    p.add_argument("--sam-batch", type=int, help=f"global D_SAM images per step (default {d.sam_batch})")
    p.add_argument("--masks-per-image", type=int, help=f"prompts per D_SAM image (default {d.masks_per_image})")
    p.add_argument("--sam-rounds", type=int, help=f"SAM's interactive prompt rounds (App. A: 11; here {d.sam_rounds})")
    p.add_argument("--lam", type=float, help=f"weight of L_SAM in L_CLIP + lam * L_SAM (default {d.lam:g})")
    p.add_argument("--grad-clip", type=float, help=f"max gradient norm (default {d.grad_clip})")
    p.add_argument("--accum-steps", type=int, help=f"micro-batches per optimizer step (default {d.accum_steps})")
    p.add_argument("--seed", type=int, help=f"seed of data order, crops, prompts and tiny weights (default {d.seed})")
    p.add_argument("--log-every", type=int, help=f"optimizer steps between metrics lines (default {d.log_every})")
    p.add_argument("--save-every", type=int, help=f"optimizer steps between checkpoints (default {d.save_every})")
    p.add_argument("--workers", type=int, help=f"DataLoader workers per rank (default {d.workers})")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-teacher", help="folder to cache CLIP-teacher embeddings in (fixes each image's crop)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile (first step's time logged)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed()
    torch.manual_seed(args.seed or 0)
    stages = ["probe", "distill", "adapt"] if args.stage == "all" else [args.stage]
    os.makedirs(args.out, exist_ok=True)
    existing = [s for s in STAGES if os.path.exists(os.path.join(args.out, f"ckpt_{s}.pt"))]
    if existing and not args.resume:
        raise SystemExit(f"train.py: --out {args.out} already holds checkpoints ({', '.join(existing)}); "
                         "pass --resume to continue them or choose another --out")
    if args.preset in BUILTIN and not (args.clip_data and args.sam_data):
        args.clip_data, args.sam_data = layouts.write_training_set(    # rank 0 writes, the others wait
            os.path.join(args.out, "data"), **BUILTIN[args.preset]["sizes"], seed=args.seed or 0, write=not env["rank"])
        if dist.is_initialized():
            dist.barrier()
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    missing = [flag for flag, need in (("--clip-data", not args.clip_data),
                                       ("--sam-data", "distill" in stages and not args.sam_data)) if need]
    if missing:
        raise SystemExit(f"train.py: {' and '.join(missing)} required (see README, 'Training'), or use --preset tiny")
    try:
        teachers = tuple(t.to(env["device"]) for t in build_teachers(args))
        vocabulary = toy.CLASSES if args.preset == "toy" else ()         # a closed world's names (SAMCLIPConfig)
        model = SAMCLIP.load(args.init) if args.init else SAMCLIP.from_modules(*teachers, vocabulary)
        for stage in stages:
            cfg = resolve_config(args, stage, model.cfg.encoder, teachers[2].config)
            model = run_stage(cfg, model, teachers, env, stop)
    except (ValueError, weights.CheckpointError) as e:   # bad data layout, wrong checkpoint: one line
        raise SystemExit(f"train.py: {e}") from None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
