"""Train SAM-CLIP (Sec. 3, 4.1, App. A): head probing -> multi-task distillation -> resolution
adaptation.

    probe    HeadCLIP alone on L_CLIP, backbone frozen
    distill  L_CLIP + lam * L_SAM on the backbone, HeadCLIP and the mask decoder
    adapt    HeadCLIP alone on L_CLIP at 224/448/1024 px, backbone frozen

Each stage is one row of STAGES: its loss terms with their weights, the modules it trains with
their learning-rate multipliers, its lr, epochs and D_CLIP resolutions. One loop (`run_stage`)
runs every row: it derives the parameter groups, the loss and the log line from the row.

A distill step (Sec. 4.1): a D_CLIP batch at the step's resolution (2048 images at 224 px, fewer
at 448: constant pixels) gives L_CLIP against the frozen CLIP ViT-L/14 image tower, a D_SAM batch
(32 images at 1024 px, 32 prompts each, replayed over SAM's interactive rounds) gives L_SAM against
the frozen SAM; one backward of their sum (the paper's two accumulated backwards), one optimizer
step. Losses and targets: losses.py; SAM's prompt rounds: prompts.py; data: data.py; which
sample each rank reads in which step: sampling.py; the CLIP teacher's cache: teacher_cache.py.

Run (one device, or torchrun; nccl on GPU, gloo on CPU):
    python -m toy.prepare && python train.py --preset toy --out runs/toy   # ~6 min on a CPU
    torchrun --nproc_per_node 8 train.py --stage distill --sam-checkpoint sam_vit_b_01ec64.pth \\
        --clip-checkpoint open_clip_pytorch_model.bin --clip-data /data/cc12m \\
        --sam-data /data/sa1b --init runs/probe/samclip.pt --out runs/distill
Everything a run writes is in --out: ckpt_<stage>.pt (atomic, every --save-every steps, at the end
and on SIGTERM/SIGINT), metrics.jsonl (a JSON object per logging step), samclip.pt (the merged
model after each stage, for evaluate.py and segment_demo.py). --resume continues exactly; running
a finished run again with the same settings does nothing.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip
import data
import losses
import sampling
import shards
import teacher_cache
import vit_det
import weights
from model import SAMCLIP, autocast as model_autocast, build_samclip, compile_modules, load_teachers

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- config

# App. A, one row per stage and the only place its numbers live:
#   losses  the loss terms (losses.py) and their weights: L = sum of weight * term
#   trains  the modules that train and their lr multipliers (App. A: backbone and mask decoder
#           at 1/10 of HeadCLIP's lr); everything else stays frozen
#   lr      HeadCLIP's learning rate; epochs over D_CLIP; the D_CLIP resolutions one of which each
#           step draws (the paper's pixels for the 1024 px encoder; smaller encoders scale them
#           with vit_det.scaled_side)
STAGES = {
    "probe": dict(
        losses={"loss_clip": 1.0},
        trains={"head_clip": 1.0},
        lr=8e-4,
        epochs=20,
        resolutions=(224, 448),
    ),
    "distill": dict(
        losses={"loss_clip": 1.0, "loss_sam": losses.LAM},
        trains={"head_clip": 1.0, "encoder": 0.1, "head_sam.mask_decoder": 0.1},
        lr=4e-5,
        epochs=16,
        resolutions=(224, 448),
    ),
    "adapt": dict(
        losses={"loss_clip": 1.0},
        trains={"head_clip": 1.0},
        lr=8e-4,
        epochs=3,
        resolutions=(224, 448, 1024),
    ),
}


@dataclass
class TrainConfig:
    stage: str = "distill"            # probe | distill | adapt (--stage all: the three in order)
    preset: str = "vit_b"             # a row of PRESETS: vit_b (official weights), toy, tiny
    sam_checkpoint: str = ""          # SAM file (teacher and initialisation), sam_vit_b_01ec64.pth
    clip_checkpoint: str = ""         # OpenCLIP ViT-L/14 file (teacher, text tower)
    init: str = ""                    # merged checkpoint to start from (a samclip.pt)
    clip_data: str = ""               # D_CLIP: image folder, text file of paths, or tar shards
    clip_samples: int = 0             # D_CLIP shards: samples per epoch (0: their size files')
    sam_data: str = ""                # D_SAM: SA-1B extracted or its tars (data.sa1b_parts)
    out: str = "runs/samclip"         # everything the run writes
    # the stage's row of STAGES
    losses: dict = field(default_factory=dict)    # loss term -> weight
    trains: dict = field(default_factory=dict)    # module -> lr multiplier
    lr: float = 0.0                   # HeadCLIP's learning rate
    epochs: int = 0                   # passes over D_CLIP
    resolutions: tuple = ()           # student D_CLIP sides in px (the stage's, scaled)
    # the same for every stage
    max_steps: int = 0                # stop after this many steps (0: no cap); schedule unchanged
    weight_decay: float = 0.05        # AdamW, on linear/conv weights only (not stated in the paper)
    warmup_steps: int = 500           # linear warm-up, then cosine decay to 0 (not in the paper)
    clip_batch: int = 2048            # global D_CLIP images per step, smallest side (Sec. 4.1)
    teacher_size: int = None          # CLIP teacher's input side (None: native, 224 for ViT-L/14)
    crop_scale: tuple = (0.5, 1.0)    # D_CLIP crop area range, a share of the image (not in paper)
    sam_batch: int = 32               # global D_SAM images per step, at the encoder's 1024 px
    masks_per_image: int = 32         # prompts per D_SAM image (Sec. 4.1)
    sam_rounds: int = 4               # SAM's interactive prompt rounds (SAM App. A: 11)
    grad_clip: float = 1.0            # max global gradient norm
    accum_steps: int = 1              # micro-batches per step (the global batch on fewer GPUs)
    seed: int = 0
    log_every: int = 10               # optimizer steps between metrics lines
    save_every: int = 500             # optimizer steps between checkpoints
    workers: int = 8                  # DataLoader worker processes per rank
    dtype: str = ""                   # fp32 | bf16 (autocast); "": bf16 on CUDA, fp32 on CPU
    grad_checkpointing: bool = True   # recompute encoder and decoder while the encoder trains
    cache_teacher: str = ""           # folder for cached CLIP-teacher embeddings (fixed crops)
    compile: bool = False             # torch.compile encoder blocks, neck, HeadCLIP


# Settings that change how a run is carried out, not what it trains: a finished run asked again
# with other values of these is still the same run.
HOW_NOT_WHAT = ("out", "max_steps", "log_every", "save_every", "workers", "compile")

# The built-in runs, as plain data: teacher files, data folders (paths relative to the repository;
# `python -m toy.prepare` writes the data), the merged model's vocabulary, settings for every
# stage and per stage. `lam`, `backbone_lr_ratio` and `decoder_lr_ratio` act as the flags of the
# same name.
# tiny: random teachers of the tiny sizes, seconds (the tests). toy: the shipped toy teachers,
# the README's main job (< 5 min on 2 cores); its distill lr is 25x the paper's and the backbone
# trains at HeadCLIP's lr: at 4e-5 a few hundred steps barely move it. The toy settings were chosen
# on a validation set of train-hand scenes (never the heldout set the README reports): crops down
# to a tenth of a scene (clip mode +5 mIoU: a crop one object fills gives the teacher's embedding
# of that object), a long probe (14 -> 40 epochs: +4), a shorter distill (12 -> 8 epochs: no
# loss), two SAM rounds instead of three (no loss, a sixth less time). With today's toy CLIP
# (2500 steps): crops down to a twentieth of a scene lost 5 clip-mode mIoU against a tenth; the
# probe at 60 epochs gained 4 over 40 (clip mode and --refine sam), at 80 it gained 2.
# Later trials (distill at lr 1e-3 or 16 epochs, adapt 2 to 10 epochs, 1600 D_CLIP scenes instead
# of 400) beat none of this by more than the 3 clip-mode points that another seed of the adapt
# stage alone moves it (docs/history.md). With the retrained toy SAM (paste_shapes + restyle),
# every stage's lr went to 1e-3 (probe and adapt from 8e-4, distill from 4e-4): validation clip
# mode 42.8 -> 46.8 and 44.4 -> 46.0 at seeds 0 and 1, --refine sam 51.4 -> 54.5 and 52.5 -> 53.3;
# the distill lr alone at 1e-3 gave 43.7 and 51.8 at seed 0. With the 6000-step toy SAM since,
# the preset was kept as it is (validation clip mode 54.9 / 56.2 at seeds 0 / 1). With the
# two-stage toy SAM (stage 2: paste_bands), a distill of 16 epochs instead of 8, stage by stage
# at seeds 0 / 1 (validation clip mode / --refine sam / demo IoU): 54.4 -> 57.5 / 54.3 -> 56.9,
# 65.1 -> 67.8 / 62.5 -> 65.8, 68.5 -> 69.7 / 67.2 -> 69.9; 12 epochs 56.6 / 54.8, 66.8 / 64.2,
# 69.6 / 67.6. With the three-stage toy SAM (stage 3: its heads on the frame's pixels) the preset
# was kept: validation 58.6 / 69.2 / 72.7 at seed 0, 53.2 / 63.8 / 68.8 at seed 1.
PRESETS = {
    "vit_b": dict(),
    "toy": dict(
        sam_checkpoint="toy/weights/toy_sam.pth",
        clip_checkpoint="toy/weights/toy_clip.bin",
        clip_data="data/toy/clip",
        sam_data="data/toy/sa1b",
        vocabulary=("sky", "sun", "cloud", "grass", "road", "house", "tree", "car"),
        settings=dict(clip_batch=32, sam_batch=2, masks_per_image=8, sam_rounds=2,
                      crop_scale=(0.1, 1.0), warmup_steps=20, log_every=10, save_every=100,
                      workers=0, grad_checkpointing=False),
        stages={"probe": dict(epochs=60, lr=1e-3),
                "distill": dict(epochs=16, lr=1e-3, backbone_lr_ratio=1.0),
                "adapt": dict(epochs=3, lr=1e-3)},
    ),
    "tiny": dict(
        random_teachers="tiny",
        clip_data="data/tiny/clip",
        sam_data="data/tiny/sa1b",
        settings=dict(clip_batch=8, sam_batch=2, masks_per_image=4, warmup_steps=2, log_every=1,
                      save_every=4, workers=0, grad_checkpointing=False),
        stages={"probe": dict(epochs=2), "distill": dict(epochs=2), "adapt": dict(epochs=1)},
    ),
}


def preset_path(path):
    """A preset's file or folder, relative to the repository (absolute paths stay)."""
    return os.path.join(ROOT, path) if path else path


def with_shorthands(cfg, lam=None, backbone_lr_ratio=None, decoder_lr_ratio=None):
    """--lam: the weight of L_SAM where a stage uses it; --backbone-lr-ratio: the lr multiplier of
    every module a stage trains other than HeadCLIP (App. A: 0.1); --decoder-lr-ratio, applied
    after it: HeadSAM's mask decoder's alone (0 freezes it, as lam = 0 does), so that the backbone
    can move fast while the decoder SAM trained stays where it is."""
    loss_weights = dict(cfg.losses)
    trains = dict(cfg.trains)
    if lam is not None and "loss_sam" in loss_weights:
        loss_weights["loss_sam"] = lam
    if backbone_lr_ratio is not None:
        for name in trains:
            if name != "head_clip":
                trains[name] = backbone_lr_ratio
    if decoder_lr_ratio is not None and "head_sam.mask_decoder" in trains:
        trains["head_sam.mask_decoder"] = decoder_lr_ratio
    if decoder_lr_ratio == 0 or loss_weights.get("loss_sam") == 0:
        # frozen: at lam = 0 no loss trains the decoder, and AdamW's weight decay alone would
        # shrink it (a forgetting that is not the backbone's). L_SAM is still computed, at weight 0:
        # the log shows it grow, and DDP sees the neck used (its zero gradients only decay its two
        # convolutions, each followed by a LayerNorm2d that undoes a uniform shrink)
        trains.pop("head_sam.mask_decoder", None)
    return replace(cfg, losses=loss_weights, trains=trains)


def resolve_config(args, stage, encoder_cfg, teacher_cfg):
    """TrainConfig <- the stage's row of STAGES <- the preset's settings (all stages, then this
    one) <- the flags given. Resolutions are the paper's scaled to the encoder
    (vit_det.scaled_side: 224 -> 48 at 160 px) unless --resolutions names them; the teacher runs
    at its native side unless --teacher-size."""
    row = dict(STAGES[stage])
    row["resolutions"] = tuple(vit_det.scaled_side(r, encoder_cfg) for r in row["resolutions"])
    cfg = TrainConfig(stage=stage, teacher_size=teacher_cfg.image_size, **row)
    preset = PRESETS[args.preset]
    overrides = {**preset.get("settings", {}), **preset.get("stages", {}).get(stage, {})}
    names = ("lam", "backbone_lr_ratio", "decoder_lr_ratio")
    shorthands = {k: overrides.pop(k) for k in names if k in overrides}
    cfg = with_shorthands(replace(cfg, **overrides), **shorthands)
    given = {}
    for name, value in vars(args).items():
        if value is not None and name in TrainConfig.__dataclass_fields__ and name != "stage":
            given[name] = tuple(value) if isinstance(value, list) else value   # --resolutions
    cfg = replace(cfg, **given)
    return with_shorthands(cfg, args.lam, args.backbone_lr_ratio, args.decoder_lr_ratio)


# ----------------------------------------------------------------------------- teachers

def build_teachers(args):
    """The frozen teachers by name (model.load_teachers): {"sam_encoder", "sam_head", "clip"}. A
    preset with random teachers builds them seeded like the student, which so starts as an exact
    copy of this SAM. A fork loads its new teacher here and adds it to the dict."""
    random_sizes = PRESETS[args.preset].get("random_teachers")
    if random_sizes:
        ref = build_samclip(random_sizes, seed=args.seed or 0)
        torch.manual_seed(args.seed or 0)
        teachers = {"sam_encoder": ref.encoder, "sam_head": ref.head_sam,
                    "clip": clip.build_clip(ref.cfg.clip)}
        return {name: t.requires_grad_(False).eval() for name, t in teachers.items()}
    if not args.sam_checkpoint or not args.clip_checkpoint:
        raise SystemExit("train.py: --sam-checkpoint and --clip-checkpoint are required for real "
                         "runs (see README, 'Using the real weights'), or use --preset toy")
    return load_teachers(args.sam_checkpoint, args.clip_checkpoint)


# ----------------------------------------------------------------------------- optimisation

def lr_factor(step, total, warmup):
    """The schedule as a pure function of the step: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def set_trainable(model: SAMCLIP, cfg):
    """Freeze all, unfreeze the modules the stage trains; the text tower, the prompt encoder and
    the teachers never train. Gradient checkpointing saves memory while the encoder trains."""
    model.requires_grad_(False)
    for name in cfg.trains:
        model.get_submodule(name).requires_grad_(True)
    model.set_grad_checkpointing(cfg.grad_checkpointing and "encoder" in cfg.trains)


DECAYED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)   # AdamW decays these


def param_groups(model: SAMCLIP, cfg):
    """AdamW groups from the stage's `trains`: each module at lr * its multiplier (App. A: HeadCLIP
    at lr, backbone and mask decoder at lr / 10); weight decay only on the weights of linear and
    convolution layers, none on biases, norms, position tables, relative-position tables, tokens
    and embeddings (ViT-Det/MAE practice). Decided by the layer a parameter belongs to, not its
    shape: pos_embed, rel_pos_h/w and the IoU/mask tokens are matrices too."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    groups = []
    for name, multiplier in cfg.trains.items():
        lr = cfg.lr * multiplier
        params = [p for p in model.get_submodule(name).parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (id(p) in decayed) == decay]
            if chosen:
                groups.append({"params": chosen, "base_lr": lr, "lr": lr, "module": name,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return groups


# ----------------------------------------------------------------------------- data

def data_loaders(cfg, model, world, rank, device):
    """The D_CLIP loader (always: the step count is epochs over D_CLIP) and, when a loss term
    reads D_SAM, the D_SAM loader, each split across ranks. -> {"clip": (loader, sampler), "sam":
    ...}."""
    per_rank = world * cfg.accum_steps
    for flag, batch in (("clip_batch", cfg.clip_batch), ("sam_batch", cfg.sam_batch)):
        if batch % per_rank:
            raise SystemExit(f"train.py: --{flag.replace('_', '-')} {batch} must be divisible by "
                             f"world size x --accum-steps = {per_rank}")
    loader_args = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                       pin_memory=device.type == "cuda")
    if shards.is_shard_spec(cfg.clip_data):   # a stream of tar shards, its own batch plan
        clip_ds = shards.ShardImages(cfg.clip_data, cfg.clip_batch // per_rank, cfg.resolutions,
                                     cfg.clip_samples or None, cfg.teacher_size, cfg.seed,
                                     scale=cfg.crop_scale, fixed_crops=bool(cfg.cache_teacher),
                                     native_size=model.cfg.encoder.img_size, num_replicas=world,
                                     rank=rank, workers=cfg.workers)
        clip_ds.check_size(min_images=cfg.clip_batch)
        clip_sampler = clip_ds
        # workers start anew each epoch: the epoch and the readers' positions travel with them
        clip_loader = torch.utils.data.DataLoader(clip_ds, batch_size=None,
                                                  num_workers=cfg.workers,
                                                  pin_memory=loader_args["pin_memory"])
    else:
        clip_ds = data.CLIPImages(cfg.clip_data, teacher_size=cfg.teacher_size, seed=cfg.seed,
                                  scale=cfg.crop_scale,
                                  fixed_crops=bool(cfg.cache_teacher),   # a cached target
                                  native_size=model.cfg.encoder.img_size)   # 1024: SAM's frame
        clip_ds.check_readable(min_images=cfg.clip_batch)   # else no step, or only placeholders
        clip_sampler = sampling.VariableResolutionSampler(len(clip_ds),
                                                          cfg.clip_batch // per_rank,
                                                          cfg.resolutions, None, world, rank,
                                                          cfg.seed)
        clip_loader = torch.utils.data.DataLoader(clip_ds, batch_sampler=clip_sampler,
                                                  collate_fn=data.collate, **loader_args)
    loaders = {"clip": (clip_loader, clip_sampler)}
    if "loss_sam" in cfg.losses:
        sam_ds = data.SA1B(cfg.sam_data, model.cfg.encoder.img_size, cfg.masks_per_image,
                           seed=cfg.seed)
        sam_sampler = sampling.FixedBatchSampler(len(sam_ds), cfg.sam_batch // per_rank, world,
                                                 rank, cfg.seed)
        if not sam_sampler.drop_last:
            log0(rank, f"stage {cfg.stage}: --sam-data {cfg.sam_data} holds {len(sam_ds)} images, "
                       f"fewer than one D_SAM batch of {cfg.sam_batch // cfg.accum_steps}: every "
                       "batch repeats images")
        sam_loader = torch.utils.data.DataLoader(sam_ds, batch_sampler=sam_sampler,
                                                 collate_fn=data.collate_sam, **loader_args)
        loaders["sam"] = (sam_loader, sam_sampler)
    return loaders


# ----------------------------------------------------------------------------- one stage

def run_stage(cfg: TrainConfig, model: SAMCLIP, teachers, env, stop):
    rank = env["rank"]
    world = env["world"]
    device = env["device"]
    ckpt_path = os.path.join(cfg.out, f"ckpt_{cfg.stage}.pt")
    state = None
    if os.path.exists(ckpt_path):
        state = weights.safe_load(ckpt_path, "training checkpoint")
        model.load_state_dict(state["model"])
        if state["done"]:
            log0(rank, f"stage {cfg.stage}: already finished in {ckpt_path}")
            return model
    log0(rank, f"stage {cfg.stage}: {json.dumps(asdict(cfg))}")
    loaders = data_loaders(cfg, model, world, rank, device)
    clip_sampler = loaders["clip"][1]
    total = sum(len(clip_sampler.plan(e)) for e in range(cfg.epochs)) // cfg.accum_steps
    last = min(total, cfg.max_steps) if cfg.max_steps else total

    # --- model, optimizer, DDP
    set_trainable(model, cfg)
    compile_modules(model.to(device).train(), cfg.compile)
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log0(rank, f"stage {cfg.stage}: resumed from {ckpt_path} at step {step}")
    shard_positions = None      # D_CLIP shards: where each reader stands, saved for --resume
    if isinstance(clip_sampler, shards.ShardImages):
        resumed = state.get("clip_shards") if state is not None else None
        if resumed is not None:
            clip_sampler.resume(resumed)
        shard_positions = shards.ReaderPositions(clip_sampler.readers, resumed)
    trim_metrics(cfg, step, rank)
    student = losses.MultiTaskLoss(model, cfg.losses)
    # DDP needs no find_unused_parameters: every trainable parameter is used in every step (the
    # stage's terms reach each module it trains, all of SAM's output tokens are distilled)
    if world > 1:
        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cache = None
    if cfg.cache_teacher:   # EncCLIP(x) of every D_CLIP image, computed once before the first step
        clip_ds = loaders["clip"][0].dataset
        sharded = isinstance(clip_ds, shards.ShardImages)
        meta = {"clip_data": cfg.clip_data if sharded else os.path.abspath(cfg.clip_data),
                "n": clip_ds.num_samples if sharded else len(clip_ds), "seed": cfg.seed,
                "teacher": cfg.clip_checkpoint or cfg.preset, "teacher_size": cfg.teacher_size}
        with model_autocast(device, dtype):     # as the loop would have run the teacher
            cache = teacher_cache.build(cfg.cache_teacher, clip_ds, teachers["clip"].visual, meta,
                                        rank, world, device, cfg.workers)

    def save(done=False):
        checkpoint = {"config": asdict(cfg), "stage": cfg.stage, "step": step, "done": done}
        if shard_positions is not None:     # every rank: each knows only its own readers
            checkpoint["clip_shards"] = shard_positions.state(epoch, world, device)
        if rank == 0:   # once per job (RANK 0), into --out: every node reads it on --resume
            weights.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 **checkpoint}, ckpt_path)
        if world > 1:   # no rank may leave while rank 0 writes: torchrun tears the group down
            dist.barrier()

    def end_epoch(epoch, tally):
        """Report the epoch's unreadable D_CLIP images; stop, saved, if none could be read."""
        if epoch is not None and tally.report(epoch, rank, world, device):
            save()
            raise SystemExit(f"train.py: --clip-data {cfg.clip_data}: no image could be read in "
                             f"epoch {epoch}; checkpoint {ckpt_path} saved at step {step}, "
                             "continue with --resume once they can")

    # --- the loop: one optimizer step = accum_steps micro-batches of each data source
    streams = {}
    for source, (loader, sampler) in loaders.items():
        epochs = cfg.epochs if source == "clip" else None         # D_CLIP's epochs end the stage
        streams[source] = sampling.stream(loader, sampler, step * cfg.accum_steps, epochs)
    bar = tqdm(total=last, initial=step, disable=rank != 0, desc=cfg.stage, dynamic_ncols=True,
               mininterval=2)
    epoch = None
    tally = sampling.EpochTally()
    sam_skipped = 0
    while step < last:
        t0 = time.time()
        logs = {}
        images = {source: 0 for source in streams}
        for group in opt.param_groups:                           # the learning rate of this step
            group["lr"] = group["base_lr"] * lr_factor(step, total, cfg.warmup_steps)
        for micro in range(cfg.accum_steps):
            # the batches; a new D_CLIP epoch first closes the last one
            batches = {}
            for source, batch_stream in streams.items():
                batch_epoch, batch = next(batch_stream)
                if source == "clip" and batch_epoch != epoch:
                    end_epoch(epoch, tally)
                    epoch = batch_epoch
                    tally = sampling.EpochTally()
                if source == "clip":
                    tally.count(batch)
                    if shard_positions is not None:
                        shard_positions.update(batch_epoch, batch)
                if source == "sam":
                    sam_skipped += int((~batch["ok"]).sum())
                images[source] += len(batch["ok"])
                batches[source] = data.to_device(batch, device)
            # the frozen teachers' targets for each term (Eq. 1: EncCLIP(x); Eq. 2: z per round)
            with torch.no_grad(), model_autocast(device, dtype):
                targets = losses.teacher_targets(teachers, batches, cfg.losses, cfg.sam_rounds,
                                                 cache)
            # the student: every term in one forward, one backward (DDP syncs on the last micro)
            sync = micro == cfg.accum_steps - 1 or world == 1
            with contextlib.nullcontext() if sync else student.no_sync():
                with model_autocast(device, dtype):
                    out = student(batches, targets)
                    (out["loss"] / cfg.accum_steps).backward()
            for name, value in out.items():
                logs[name] = logs.get(name, 0.0) + value.detach().float() / cfg.accum_steps
        # clip, step
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if cfg.compile and step == bar.initial + 1:             # torch.compile ran in this step
            log0(rank, f"stage {cfg.stage}: --compile: first step {time.time() - t0:.1f} s "
                       "(a new side compiles again)")
        # one metrics line with every loss term, the lr and the step time
        if step % cfg.log_every == 0 or step == last:
            values = {name: all_ranks(value, world, device) for name, value in logs.items()}
            dt = time.time() - t0
            record = {"stage": cfg.stage, "step": step, "epoch": epoch,
                      "lr": opt.param_groups[0]["lr"], **values, "grad_norm": float(grad_norm),
                      "resolution": batches["clip"]["student"].shape[-1], "step_time": dt}
            for source, count in images.items():
                record[f"{source}_img_per_s"] = count * world / dt
            if "sam" in streams:
                record["sam_skipped"] = all_ranks(sam_skipped, world, device, "sum")
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in values.items()})
            if rank == 0:   # once per job (RANK 0)
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
        # checkpoint; on SIGTERM/SIGINT (any rank) all ranks save and leave together
        stopping = all_ranks(stop["signal"] is not None, world, device, "max") > 0
        if step % cfg.save_every == 0 or stopping:
            save()
        if stopping:
            bar.close()
            log0(rank, f"stage {cfg.stage}: interrupted at step {step}; checkpoint {ckpt_path} "
                       "saved, continue with --resume")
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()
    end_epoch(epoch, tally)
    if sam_skipped:
        log0(rank, f"stage {cfg.stage}: skipped {sam_skipped} unreadable D_SAM sample(s) on rank "
                   f"{rank} (each named in a warning above)")
    save(done=step >= total)
    if rank == 0:   # once per job (RANK 0)
        model.save(os.path.join(cfg.out, "samclip.pt"), stage=cfg.stage, step=step)
    if world > 1:
        dist.barrier()                  # as in save(): all ranks leave once samclip.pt is written
    log0(rank, f"stage {cfg.stage}: done at step {step}/{total}; merged model in "
               f"{os.path.join(cfg.out, 'samclip.pt')}")
    return model


# ----------------------------------------------------------------------------- bookkeeping

def log0(rank, msg):
    """Print once per job: on RANK 0, whichever node holds it."""
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def all_ranks(value, world, device, op="mean"):
    """A float of this rank -> its mean, sum or maximum over all ranks, on every rank."""
    t = torch.tensor([float(value)], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        return t.item() / world
    return t.item()


def trim_metrics(cfg, step, rank):
    """On resume, drop metrics lines of this stage logged after the checkpoint (redone)."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if rank != 0 or not os.path.exists(path):   # RANK 0's file (once per job)
        return
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in lines if r["stage"] != cfg.stage or r["step"] <= step]
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def existing_run(out, configs):
    """What --out already holds for the stages about to run (configs: stage -> TrainConfig).
    -> "new" (no checkpoint), "finished" (every stage done with these settings) or "unfinished"
    (same settings, some stage not done). Raises SystemExit naming what differs when a
    checkpoint was written with other settings (HOW_NOT_WHAT aside): a run is never silently
    continued or reported finished with settings it did not train with."""
    found = {}
    for stage, cfg in configs.items():
        path = os.path.join(out, f"ckpt_{stage}.pt")
        if os.path.exists(path):
            found[stage] = (path, weights.safe_load(path, "training checkpoint", mmap=True))
    if not found:
        return "new"
    for stage, (path, ckpt) in found.items():
        now = json.loads(json.dumps(asdict(configs[stage])))     # tuples -> lists on both sides
        saved = json.loads(json.dumps(ckpt["config"]))
        differs = [f"{name} {saved.get(name)!r} -> {value!r}" for name, value in now.items()
                   if name not in HOW_NOT_WHAT and saved.get(name) != value]
        if differs:
            raise SystemExit(f"train.py: --out {out} holds a run with other settings ({path}: "
                             f"{'; '.join(differs)}); choose another --out or the same settings")
    done = all(stage in found and found[stage][1]["done"] for stage in configs)
    return "finished" if done else "unfinished"


def setup_distributed(device="auto"):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` runs as rank 0 of 1.
    RANK numbers the processes of the whole job, LOCAL_RANK those of one node (README, "Many
    nodes"). The GPU is LOCAL_RANK's. What happens once per job is RANK 0's: checkpoints,
    metrics.jsonl and samclip.pt into --out, which every rank reads back (existing_run, --resume)
    and so must be a folder every node sees. Nothing happens once per node (LOCAL_RANK 0):
    train.py writes nothing to node-local disk.
    device (--device): "cuda" (NCCL between ranks, one GPU per process), "cpu" (gloo), or "auto":
    cuda where torch sees a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.py: --device cuda, but torch sees no CUDA GPU here "
                         f"(torch {torch.__version__}); pass --device cpu")
    if "RANK" not in os.environ:
        return {"rank": 0, "world": 1, "device": torch.device(device)}
    local = int(os.environ.get("LOCAL_RANK", 0))   # this process's GPU on its node
    if device == "cuda" and local >= torch.cuda.device_count():
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") only after both started
        n = torch.cuda.device_count()
        raise SystemExit(f"train.py: LOCAL_RANK {local}, but this node has {n} GPU(s): NCCL "
                         f"needs one GPU per process, so launch at most {n} per node "
                         f"(torchrun --nproc_per_node {n}), or pass --device cpu (gloo)")
    # env://: torchrun's agents, after their rendezvous (--rdzv-endpoint on many nodes), set
    # MASTER_ADDR and MASTER_PORT (RANK 0's node), RANK and WORLD_SIZE
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "device": torch.device(device)}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    d = TrainConfig()   # --help's defaults come from here or from STAGES: each lives once
    rows = "; ".join(f"{s}: lr {r['lr']:g}, {r['epochs']} epochs, "
                     f"{'/'.join(map(str, r['resolutions']))} px, losses {r['losses']}"
                     for s, r in STAGES.items())
    p = argparse.ArgumentParser(description="Train SAM-CLIP: probe -> distill -> adapt (Sec. 3, "
                                            f"4.1, App. A). Per stage (App. A): {rows}.")
    p.add_argument("--stage", default="all", choices=["probe", "distill", "adapt", "all"],
                   help="training stage; 'all': probe, distill and adapt in order (default all)")
    p.add_argument("--preset", default="vit_b", choices=list(PRESETS),
                   help="vit_b: the paper's model, official weights given by flags; toy: the "
                        "shipped toy teachers on toy-world data (write it first: python -m "
                        "toy.prepare); tiny: random teachers, seconds (python -m toy.prepare "
                        "tiny) (default vit_b)")
    p.add_argument("--out", default=d.out,
                   help=f"folder for checkpoints, metrics.jsonl, samclip.pt (default {d.out})")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (same settings)")
    p.add_argument("--sam-checkpoint", help="official SAM ViT-B file, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--clip-checkpoint",
                   help="official OpenCLIP ViT-L/14 file (.bin or .safetensors)")
    p.add_argument("--init", help="merged checkpoint (samclip.pt) to start the first stage from")
    p.add_argument("--clip-data",
                   help="D_CLIP: folder of images (recursive), a text file of image paths, or "
                        "WebDataset tar shards as img2dataset writes them: brace ranges "
                        "('/data/cc12m/{00000..01242}.tar'), several joined with ::, pipe:CMD "
                        "(read from CMD's output); see shards.py")
    p.add_argument("--clip-samples", type=int,
                   help="D_CLIP shards: samples per epoch (default: from OpenCLIP's sizes.json or "
                        "img2dataset's *_stats.json beside the shards; pipe: shards need it)")
    p.add_argument("--sam-data",
                   help="D_SAM: SA-1B extracted (a folder of sa_N.jpg + sa_N.json) or as it "
                        "ships: a folder of its tars, a .tar, a brace range "
                        "('/data/sa1b/sa_{000000..000049}.tar'), a text file listing tars, or "
                        "several joined with ::. Each tar is indexed once (sa_N.tar.index.json "
                        "beside it, where writable) and read by seeking; a truncated or corrupt "
                        "tar is read up to the damage, the rest skipped, named in one line")
    p.add_argument("--epochs", type=int, help="epochs over D_CLIP (default: the stage's, above)")
    p.add_argument("--max-steps", type=int,
                   help="stop a stage after this many optimizer steps (smoke runs)")
    p.add_argument("--lr", type=float, help="HeadCLIP learning rate (default: the stage's, above)")
    p.add_argument("--backbone-lr-ratio", type=float,
                   help="lr multiplier of every trained module but HeadCLIP: the backbone and the "
                        "mask decoder (default: the stage's, App. A: 0.1)")
    p.add_argument("--decoder-lr-ratio", type=float,
                   help="lr multiplier of HeadSAM's mask decoder alone, after --backbone-lr-ratio; "
                        "0 freezes it (default: the backbone's)")
    p.add_argument("--weight-decay", type=float,
                   help=f"AdamW decay of linear/conv weights (default {d.weight_decay})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warm-up steps, then cosine (default {d.warmup_steps})")
    p.add_argument("--clip-batch", type=int,
                   help=f"global D_CLIP batch at the smallest side (default {d.clip_batch})")
    p.add_argument("--resolutions", type=int, nargs="+",
                   help="D_CLIP student sides, px, one per step (default: the stage's, above)")
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="D_CLIP's random crops cover MIN to MAX of the image's area "
                        f"(default {d.crop_scale[0]} {d.crop_scale[1]})")
    p.add_argument("--teacher-size", type=int,
                   help="CLIP teacher input side (default: native, 224 for ViT-L/14)")
    p.add_argument("--sam-batch", type=int,
                   help=f"global D_SAM images per step (default {d.sam_batch})")
    p.add_argument("--masks-per-image", type=int,
                   help=f"prompts per D_SAM image (default {d.masks_per_image})")
    p.add_argument("--sam-rounds", type=int,
                   help=f"SAM's interactive prompt rounds (App. A: 11; default {d.sam_rounds})")
    p.add_argument("--lam", type=float,
                   help=f"weight of L_SAM in L_CLIP + lam * L_SAM (default {losses.LAM:g})")
    p.add_argument("--grad-clip", type=float, help=f"max gradient norm (default {d.grad_clip})")
    p.add_argument("--accum-steps", type=int,
                   help=f"micro-batches per optimizer step (default {d.accum_steps})")
    p.add_argument("--seed", type=int,
                   help=f"seed of data order, crops, prompts and tiny weights (default {d.seed})")
    p.add_argument("--log-every", type=int,
                   help=f"optimizer steps between metrics lines (default {d.log_every})")
    p.add_argument("--save-every", type=int,
                   help=f"optimizer steps between checkpoints (default {d.save_every})")
    p.add_argument("--workers", type=int,
                   help=f"DataLoader workers per rank (default {d.workers}); D_CLIP shards are "
                        "read by world size x max(1, workers) readers, each owning whole shards: "
                        "fewer shards than readers is refused, not split by sample")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: each rank on its node's GPU LOCAL_RANK, NCCL between ranks; cpu: "
                        "gloo; auto (default): cuda where torch sees a GPU")
    p.add_argument("--dtype", choices=("fp32", "bf16"),
                   help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-teacher",
                   help="folder of the CLIP teacher's embeddings of every D_CLIP image, computed "
                        "there before the first step if missing (fixes each image's crop)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile (first step's time logged)")
    args = p.parse_args(argv)
    if args.crop_scale and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        p.error(f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g}: expected "
                "0 < MIN <= MAX <= 1 (shares of the image's area)")
    for flag in ("backbone_lr_ratio", "decoder_lr_ratio"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            p.error(f"--{flag.replace('_', '-')} {value:g}: expected a multiplier >= 0")
    return args


def fill_from_preset(args):
    """The preset's teacher files and data folders where no flag names them; one line naming
    the data step when the preset's data is missing."""
    preset = PRESETS[args.preset]
    for name in ("sam_checkpoint", "clip_checkpoint", "clip_data", "sam_data"):
        if getattr(args, name) is None and preset.get(name):
            setattr(args, name, preset_path(preset[name]))
    for name in ("clip_data", "sam_data"):
        path = getattr(args, name)
        if preset.get(name) and path == preset_path(preset[name]) and not os.path.exists(path):
            raise SystemExit(f"train.py: --preset {args.preset} reads {path}, which is missing: "
                             f"write it first with `python -m toy.prepare {args.preset}`")


def main(argv=None):
    args = parse_args(argv)
    fill_from_preset(args)
    stages = ["probe", "distill", "adapt"] if args.stage == "all" else [args.stage]
    missing = []
    if not args.clip_data:
        missing.append("--clip-data")
    if "distill" in stages and not args.sam_data:
        missing.append("--sam-data")
    if missing:
        raise SystemExit(f"train.py: {' and '.join(missing)} required (see README, 'Training'), "
                         "or use --preset toy")
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed or 0)
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    try:
        teachers = {name: t.to(env["device"]) for name, t in build_teachers(args).items()}
        if args.init:
            model = SAMCLIP.load(args.init)
        else:
            model = SAMCLIP.from_modules(teachers, PRESETS[args.preset].get("vocabulary", ()))
        configs = {stage: resolve_config(args, stage, model.cfg.encoder, teachers["clip"].config)
                   for stage in stages}
        state = existing_run(args.out, configs)   # on every rank: --out must be shared
        if state == "finished" and not args.resume:
            log0(env["rank"], f"--out {args.out} already holds this run, finished with these "
                              f"settings: {os.path.join(args.out, 'samclip.pt')}")
            return
        if state == "unfinished" and not args.resume:
            raise SystemExit(f"train.py: --out {args.out} holds this run, unfinished; pass "
                             "--resume to continue it, or choose another --out")
        os.makedirs(args.out, exist_ok=True)
        for stage in stages:
            model = run_stage(configs[stage], model, teachers, env, stop)
    except (ValueError, weights.CheckpointError) as e:   # bad data layout, wrong checkpoint
        raise SystemExit(f"train.py: {e}") from None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
