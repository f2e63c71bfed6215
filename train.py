"""Train SAM-CLIP (Sec. 3, 4.1, App. A): head probing -> multi-task distillation -> resolution adaptation.

    probe    HeadCLIP alone on L_CLIP, backbone frozen                 AdamW lr 8e-4, 20 epochs
    distill  L_CLIP + lam * L_SAM on backbone, HeadCLIP, mask decoder   lr 4e-5 (HeadCLIP), 4e-6 (rest), 16 epochs
    adapt    HeadCLIP alone on L_CLIP at 224/448/1024 px, backbone frozen   lr 8e-4, 3 epochs
Each distill step is one multi-task step (Sec. 4.1): a D_CLIP batch at the step's resolution
(2048 images at 224 px, fewer at 448: pixels per batch constant) gives L_CLIP against the frozen
CLIP ViT-L/14 image tower, a D_SAM batch (32 images at 1024 px, 32 prompts each) gives L_SAM
against the frozen SAM, and one optimizer step is taken on the summed gradients. The paper
back-propagates the two terms separately and accumulates; one backward of their sum gives the
same gradient.

Run (one device, or torchrun; nccl on GPU, gloo on CPU):
    python train.py --preset tiny --out runs/tiny          # built-in default: no weights, no data, ~1 min CPU
    torchrun --nproc_per_node 8 train.py --stage distill --sam-checkpoint sam_vit_b_01ec64.pth \\
        --clip-checkpoint open_clip_pytorch_model.bin --clip-data /data/cc12m --sam-data /data/sa1b \\
        --init runs/probe/samclip.pt --out runs/distill
Everything a run writes is in --out: ckpt_<stage>.pt (atomic, every --save-every steps, at the end
and on SIGTERM/SIGINT), metrics.jsonl (one JSON object per logging step) and samclip.pt (the
merged model after each stage, for evaluate.py and segment_demo.py). --resume continues exactly.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, asdict, field, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip
import data
import heads
import losses
import vit_det
import weights
from model import SAMCLIP, build_samclip


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    stage: str = "distill"            # probe | distill | adapt (--stage all runs the three in order)
    preset: str = "vit_b"             # vit_b: real run from official weights; tiny: built-in CPU demo
    sam_checkpoint: str = ""          # official SAM file (teacher and initialisation), e.g. sam_vit_b_01ec64.pth
    clip_checkpoint: str = ""         # official OpenCLIP ViT-L/14 file (teacher, text tower)
    init: str = ""                    # merged checkpoint to start from (the previous stage's samclip.pt)
    clip_data: str = ""               # D_CLIP: image folder (recursive) or a text file of paths
    sam_data: str = ""                # D_SAM: SA-1B layout (sa_N.jpg + sa_N.json)
    out: str = "runs/samclip"         # everything the run writes
    epochs: int = 16                  # passes over D_CLIP
    max_steps: int = 0                # stop after this many optimizer steps (0: no cap); the schedule is unchanged
    lr: float = 4e-5                  # HeadCLIP's learning rate
    backbone_lr_ratio: float = 0.1    # backbone and mask decoder at lr * this (App. A: 10x smaller)
    weight_decay: float = 0.05        # AdamW, on weight matrices only (not stated in the paper)
    warmup_steps: int = 500           # linear warm-up, then cosine decay to 0 (not stated in the paper)
    clip_batch: int = 2048            # global D_CLIP images per step at the smallest resolution (Sec. 4.1)
    resolutions: tuple = (224, 448)   # student resolutions of D_CLIP batches, one drawn per step
    teacher_size: int = 224           # CLIP teacher's input side (its native resolution)
    sam_batch: int = 32               # global D_SAM images per step, at the encoder's native 1024 px
    masks_per_image: int = 32         # prompts per D_SAM image (Sec. 4.1)
    lam: float = losses.LAM           # L_CLIP + lam * L_SAM, 10 (Sec. 4.1)
    grad_clip: float = 1.0            # max global gradient norm
    accum_steps: int = 1              # micro-batches per optimizer step (reach the global batch on fewer GPUs)
    seed: int = 0
    log_every: int = 10               # optimizer steps between metrics lines
    save_every: int = 500             # optimizer steps between checkpoints
    workers: int = 8                  # DataLoader worker processes per rank
    cache_teacher: str = ""           # folder for cached CLIP-teacher embeddings (fixed crops per image)


# Per-stage settings from the paper (App. A). `trains`: the modules that get gradients.
STAGES = {
    "probe": dict(lr=8e-4, epochs=20, resolutions=(224, 448)),
    "distill": dict(lr=4e-5, epochs=16, resolutions=(224, 448)),
    "adapt": dict(lr=8e-4, epochs=3, resolutions=(224, 448, 1024)),
}
TRAINS = {"probe": ("head_clip",), "distill": ("encoder", "head_clip", "head_sam.mask_decoder"),
          "adapt": ("head_clip",)}
# The built-in CPU run: resolutions scaled by 160/1024 (tiny encoder), a few steps per stage.
TINY = dict(clip_batch=8, sam_batch=2, masks_per_image=4, teacher_size=64, warmup_steps=2, log_every=1,
            save_every=4, workers=0, resolutions=(48, 96))
TINY_STAGES = {"probe": dict(epochs=2), "distill": dict(epochs=2), "adapt": dict(epochs=1, resolutions=(48, 96, 160))}


def resolve_config(args, stage):
    """TrainConfig defaults <- the stage's paper settings <- the tiny preset <- flags given."""
    cfg = replace(TrainConfig(), stage=stage, **STAGES[stage])
    if args.preset == "tiny":
        cfg = replace(cfg, **{**TINY, **TINY_STAGES[stage]})
    given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__
             and k != "stage"}
    return replace(cfg, **given)


# ----------------------------------------------------------------------------- the multi-task step

def sam_prompts_forward(head, embeddings, batch):
    """Run SAM's head on every prompt slot of a D_SAM batch: boxes and point sets are different
    token counts, so they go in two calls. embeddings (B, C, h, w) -> logits (B*K, 4, 4h, 4w) and
    IoU (B*K, 4) in a fixed order (box slots, then point slots), plus the (B*K,) valid mask."""
    B, K = batch["has_box"].shape
    img = torch.arange(B, device=embeddings.device).repeat_interleave(K)                 # (B*K,) image of each slot
    has_box, valid = batch["has_box"].flatten(), batch["valid"].flatten()               # (B*K,)
    coords, labels = batch["point_coords"].flatten(0, 1), batch["point_labels"].flatten(0, 1)  # (B*K, P, 2), (B*K, P)
    boxes = batch["boxes"].flatten(0, 1)                                                 # (B*K, 4)
    outs, order = [], []
    for sel, kwargs in ((has_box, lambda s: dict(boxes=boxes[s])),
                        (~has_box, lambda s: dict(points=(coords[s], labels[s])))):
        if sel.any():
            outs.append(head.all_outputs(embeddings[img[sel]], **kwargs(sel)))
            order.append(valid[sel])
    return torch.cat([m for m, _ in outs]), torch.cat([i for _, i in outs]), torch.cat(order)


class MultiTaskStep(torch.nn.Module):
    """The student's whole step as one forward, so DDP sees one forward and one backward per step
    and all-reduces the combined gradients once. Returns each loss term by name."""

    def __init__(self, model: SAMCLIP, lam):
        super().__init__()
        self.model, self.lam = model, lam

    def forward(self, clip_images, clip_targets, clip_ok, sam_batch=None, sam_targets=None):
        pooled, _ = self.model.clip_features(clip_images)                                 # (B, D)
        out = {"loss_clip": losses.loss_clip(pooled, clip_targets, clip_ok)}
        out["loss"] = out["loss_clip"]
        if sam_batch is not None:
            emb = self.model.encoder(sam_batch["image"])                                 # (B, C, h, w)
            masks, iou, valid = sam_prompts_forward(self.model.head_sam, emb, sam_batch)
            t_masks, t_iou = sam_targets
            l_sam, parts = losses.loss_sam(masks[valid], t_masks[valid], iou[valid], t_iou[valid])
            if not valid.any():  # no readable D_SAM image on this rank: a zero loss that still touches every weight
                l_sam = 0.0 * (masks.sum() + iou.sum())
            out.update(loss_sam=l_sam, **{f"loss_sam_{k}": v for k, v in parts.items()})
            out["loss"] = losses.loss_total(out["loss_clip"], l_sam, self.lam)
        return out


# ----------------------------------------------------------------------------- teachers

def build_teachers(args):
    """The frozen teachers: SAM's encoder + head (for L_SAM and the initialisation) and CLIP
    (EncCLIP for L_CLIP, TextEncCLIP for the merged model). Tiny: random weights, seeded."""
    if args.preset == "tiny":
        ref = build_samclip("tiny", seed=args.seed or 0)      # same seed -> student starts as the teacher
        torch.manual_seed(args.seed or 0)
        cl = clip.build_clip("tiny")
        sam_enc, sam_head = ref.encoder, ref.head_sam
    else:
        if not args.sam_checkpoint or not args.clip_checkpoint:
            raise SystemExit("train.py: --sam-checkpoint and --clip-checkpoint are required for real runs "
                             "(see README, 'Real weights'), or use --preset tiny")
        sam_sd = weights.read_state_dict(args.sam_checkpoint, "SAM checkpoint")
        sam_enc = vit_det.load_sam_encoder(sam_sd, source=args.sam_checkpoint)
        sam_head = heads.load_sam_head(sam_sd, source=args.sam_checkpoint)
        cl = clip.load_clip(args.clip_checkpoint)
    for m in (sam_enc, sam_head, cl):
        m.requires_grad_(False).eval()
    return sam_enc, sam_head, cl


class TeacherCache:
    """CLIP-teacher embeddings on disk (--cache-teacher), because the ViT-L/14 teacher costs more
    than the student. One float16 row per image in a .npy memmap plus a "filled" flag per row;
    rows are written by the rank that first meets the image. Caching fixes each image's crop
    (drawn with epoch 0) so the stored embedding stays the right target in every epoch."""

    def __init__(self, folder, num_samples, dim, meta, rank):
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, n) for n in ("teacher_emb.npy", "teacher_filled.npy", "meta.json")]
        if rank == 0 and not os.path.exists(paths[2]):
            np.lib.format.open_memmap(paths[0], "w+", np.float16, (num_samples, dim)).flush()
            np.lib.format.open_memmap(paths[1], "w+", np.bool_, (num_samples,)).flush()
            with open(paths[2], "w") as f:
                json.dump(meta, f)
        if dist.is_initialized():
            dist.barrier()
        with open(paths[2]) as f:
            if json.load(f) != meta:
                raise SystemExit(f"train.py: --cache-teacher {folder} was made for another teacher, data or seed; "
                                 "use a new folder")
        self.emb = np.load(paths[0], mmap_mode="r+")
        self.filled = np.load(paths[1], mmap_mode="r+")

    def __call__(self, index, ok, teacher_images, teacher):
        """Embeddings (B, D) for a batch: cached rows read, missing rows computed and stored.
        Placeholders of unreadable images are computed but never stored."""
        idx = index.numpy()
        todo = torch.from_numpy(~self.filled[idx])                                       # (B,) bool
        out = torch.from_numpy(np.asarray(self.emb[idx], dtype=np.float32)).to(teacher_images.device)
        if todo.any():
            out[todo.to(out.device)] = teacher(teacher_images[todo.to(out.device)]).half().float()  # as stored
            store = (todo & ok).numpy()
            self.emb[idx[store]] = out[torch.from_numpy(store).to(out.device)].cpu().numpy()
            self.filled[idx[store]] = True
        return out


# ----------------------------------------------------------------------------- optimisation

def lr_factor(step, total, warmup):
    """The schedule as a pure function of the step: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def set_trainable(model: SAMCLIP, stage):
    """Freeze everything, then unfreeze the stage's modules (TRAINS). The text tower, SAM's prompt
    encoder and the teachers are never trained."""
    model.requires_grad_(False)
    for name in TRAINS[stage]:
        model.get_submodule(name).requires_grad_(True)


def param_groups(model: SAMCLIP, cfg: TrainConfig):
    """AdamW groups: HeadCLIP at lr, backbone and mask decoder at lr * backbone_lr_ratio (App. A);
    weight decay on matrices, none on biases, norms and 1-d tables."""
    groups = []
    for module, lr in ((model.head_clip, cfg.lr), (model.encoder, cfg.lr * cfg.backbone_lr_ratio),
                       (model.head_sam, cfg.lr * cfg.backbone_lr_ratio)):
        params = [p for p in module.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "base_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
    return groups


def locate(sampler, micro, max_epochs=None):
    """Which (epoch, step within it) the `micro`-th micro-batch of a stream of epochs falls on."""
    epoch = 0
    while max_epochs is None or epoch < max_epochs:
        n = len(sampler.plan(epoch))
        if micro < n:
            return epoch, micro
        micro, epoch = micro - n, epoch + 1
    return epoch, 0


def stream(loader, sampler, start_micro, max_epochs=None):
    """Yield (epoch, batch) from `start_micro` on, over epochs; each epoch's order is fixed by
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""
    epoch, skip = locate(sampler, start_micro, max_epochs)
    while max_epochs is None or epoch < max_epochs:
        sampler.set_epoch(epoch, skip)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- one stage

def run_stage(cfg: TrainConfig, model: SAMCLIP, teachers, env, stop):
    rank, world, device = env["rank"], env["world"], env["device"]
    sam_enc, sam_head, teacher_clip = teachers
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
                              fixed_crops=bool(cfg.cache_teacher))  # a cached target needs the same crop every epoch
    clip_sampler = data.VariableResolutionSampler(len(clip_ds), cfg.clip_batch // (world * cfg.accum_steps),
                                                  cfg.resolutions, None, world, rank, cfg.seed)
    cache = None
    if cfg.cache_teacher:
        meta = {"clip_data": os.path.abspath(cfg.clip_data), "n": len(clip_ds), "seed": cfg.seed,
                "teacher": cfg.clip_checkpoint or "tiny", "teacher_size": cfg.teacher_size}
        cache = TeacherCache(cfg.cache_teacher, len(clip_ds), model.cfg.clip.embed_dim, meta, rank)
    clip_loader = torch.utils.data.DataLoader(clip_ds, batch_sampler=clip_sampler, num_workers=cfg.workers,
                                              collate_fn=data.collate, pin_memory=device.type == "cuda")
    micro_per_epoch = [len(clip_sampler.plan(e)) for e in range(cfg.epochs)]
    total = sum(micro_per_epoch) // cfg.accum_steps
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    if uses_sam:
        sam_ds = data.SA1B(cfg.sam_data, img_size=model.cfg.encoder.img_size, masks_per_image=cfg.masks_per_image,
                           seed=cfg.seed)
        sam_sampler = data.FixedBatchSampler(len(sam_ds), cfg.sam_batch // (world * cfg.accum_steps), world, rank, cfg.seed)
        sam_loader = torch.utils.data.DataLoader(sam_ds, batch_sampler=sam_sampler, num_workers=cfg.workers,
                                                 collate_fn=data.collate_sam, pin_memory=device.type == "cuda")

    # --- model, optimizer, DDP
    set_trainable(model, cfg.stage)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log0(rank, f"stage {cfg.stage}: resumed from {ckpt_path} at step {step}")
    trim_metrics(cfg, step, rank)
    student = MultiTaskStep(model, cfg.lam)
    # Every parameter that requires grad is used in every step (the IoU and all mask tokens are
    # distilled; frozen modules have requires_grad False and DDP ignores them), so DDP needs no
    # find_unused_parameters; probe/adapt wrap only HeadCLIP's parameters this way.
    if world > 1:
        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def save(done=False):
        if rank == 0:
            weights.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                                 "stage": cfg.stage, "step": step, "done": done}, ckpt_path)

    # --- the loop: one optimizer step = accum_steps micro-batches of (D_CLIP batch, D_SAM batch)
    clip_it = stream(clip_loader, clip_sampler, step * cfg.accum_steps, cfg.epochs)
    sam_it = stream(sam_loader, sam_sampler, step * cfg.accum_steps) if uses_sam else None
    bar = tqdm(total=last, initial=step, disable=rank != 0, desc=cfg.stage, dynamic_ncols=True, mininterval=2)
    skipped, cur_epoch = [0, []], None
    while step < last:
        t0, logs, n_clip, n_sam = time.time(), {}, 0, 0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup_steps)
        for micro in range(cfg.accum_steps):
            epoch, cb = next(clip_it)
            if epoch != cur_epoch:
                report_skipped(cur_epoch, skipped, rank, world, device)
                cur_epoch, skipped = epoch, [0, []]
            skipped[0] += int((~cb["ok"]).sum())
            skipped[1] += cb["bad_paths"]
            with torch.no_grad(), autocast():                       # frozen teachers
                timg, ok = cb["teacher"].to(device, non_blocking=True), cb["ok"].to(device)
                target = cache(cb["index"], cb["ok"], timg, teacher_clip.visual) if cache else teacher_clip.visual(timg)
                sb = st = None
                if uses_sam:
                    _, sb = next(sam_it)
                    sb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in sb.items()}
                    t_masks, t_iou, _ = sam_prompts_forward(sam_head, sam_enc(sb["image"]), sb)
                    st = (t_masks.float(), t_iou.float())
            sync = micro == cfg.accum_steps - 1 or world == 1
            with (contextlib.nullcontext() if sync else student.no_sync()), autocast():
                out = student(cb["student"].to(device, non_blocking=True), target.float(), ok, sb, st)
                (out["loss"] / cfg.accum_steps).backward()
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / cfg.accum_steps
            n_clip += cb["student"].shape[0]
            n_sam += sb["image"].shape[0] if uses_sam else 0
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == last:
            vals = {k: all_mean(v, world) for k, v in logs.items()}
            dt = time.time() - t0
            rec = {"stage": cfg.stage, "step": step, "epoch": cur_epoch, "lr": opt.param_groups[0]["lr"], **vals,
                   "grad_norm": float(grad_norm), "resolution": cb["student"].shape[-1], "step_time": dt,
                   "clip_img_per_s": n_clip * world / dt, "sam_img_per_s": n_sam * world / dt}
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in vals.items()})
            if rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
        stopping = agree(stop["signal"] is not None, world, device)
        if step % cfg.save_every == 0 or stopping:
            save()
        if stopping:
            bar.close()
            log0(rank, f"stage {cfg.stage}: interrupted at step {step}; checkpoint {ckpt_path} saved, "
                       "continue with --resume")
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()
    report_skipped(cur_epoch, skipped, rank, world, device)
    save(done=step >= total)
    if rank == 0:
        model.save(os.path.join(cfg.out, "samclip.pt"), stage=cfg.stage, step=step)
    log0(rank, f"stage {cfg.stage}: done at step {step}/{total}; merged model in {os.path.join(cfg.out, 'samclip.pt')}")
    return model


# ----------------------------------------------------------------------------- bookkeeping

def log0(rank, msg):
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def all_mean(t, world):
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return float(t)


def agree(flag, world, device):
    """True on every rank if any rank was asked to stop, so all of them save and leave together."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def report_skipped(epoch, skipped, rank, world, device):
    """At the end of an epoch: how many unreadable images were skipped (all ranks), and which."""
    if epoch is None:
        return
    n = int(all_mean(torch.tensor(float(skipped[0]), device=device), world) * world + 0.5)
    if n:
        print(f"[train] epoch {epoch}: skipped {n} unreadable image(s) (rank {rank} saw: {skipped[1][:5]})", flush=True)


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
    p = argparse.ArgumentParser(description="Train SAM-CLIP: probe -> distill -> adapt (Sec. 3, 4.1, App. A).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", default="all", choices=["probe", "distill", "adapt", "all"],
                   help="training stage; 'all' runs probe, distill and adapt in order")
    p.add_argument("--preset", default="vit_b", choices=["vit_b", "tiny"],
                   help="vit_b: the paper's model from official weights; tiny: built-in CPU run, no weights or data")
    p.add_argument("--out", default="runs/samclip", help="folder for checkpoints, metrics.jsonl and samclip.pt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--sam-checkpoint", help="official SAM ViT-B file, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--clip-checkpoint", help="official OpenCLIP ViT-L/14 file (.bin or .safetensors)")
    p.add_argument("--init", help="merged checkpoint (samclip.pt) to start the first stage from")
    p.add_argument("--clip-data", help="D_CLIP: folder of images (recursive) or a text file of image paths")
    p.add_argument("--sam-data", help="D_SAM: folder in the SA-1B layout (sa_N.jpg beside sa_N.json)")
    p.add_argument("--epochs", type=int, help="epochs over D_CLIP (default: the stage's, App. A)")
    p.add_argument("--max-steps", type=int, help="stop a stage after this many optimizer steps (smoke runs)")
    p.add_argument("--lr", type=float, help="HeadCLIP learning rate (default: the stage's, App. A)")
    p.add_argument("--backbone-lr-ratio", type=float, help="backbone and mask-decoder lr / HeadCLIP lr (0.1)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on weight matrices (0.05)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (500)")
    p.add_argument("--clip-batch", type=int, help="global D_CLIP batch at the smallest resolution (2048)")
    p.add_argument("--resolutions", type=int, nargs="+", help="D_CLIP student resolutions, one drawn per step")
    p.add_argument("--teacher-size", type=int, help="CLIP teacher input side (224)")
    p.add_argument("--sam-batch", type=int, help="global D_SAM images per step (32)")
    p.add_argument("--masks-per-image", type=int, help="prompts per D_SAM image (32)")
    p.add_argument("--lam", type=float, help="weight of L_SAM in L_CLIP + lam * L_SAM (10)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (1.0)")
    p.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step (1)")
    p.add_argument("--seed", type=int, help="seed of data order, crops, prompts and tiny weights (0)")
    p.add_argument("--log-every", type=int, help="optimizer steps between metrics lines (10)")
    p.add_argument("--save-every", type=int, help="optimizer steps between checkpoints (500)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (8)")
    p.add_argument("--cache-teacher", help="folder to cache CLIP-teacher embeddings in (fixes each image's crop)")
    args = p.parse_args(argv)
    if args.resolutions:
        args.resolutions = tuple(args.resolutions)
    return args


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed()
    torch.manual_seed(args.seed or 0)
    stages = ["probe", "distill", "adapt"] if args.stage == "all" else [args.stage]
    os.makedirs(args.out, exist_ok=True)
    existing = [s for s in ("probe", "distill", "adapt") if os.path.exists(os.path.join(args.out, f"ckpt_{s}.pt"))]
    if existing and not args.resume:
        raise SystemExit(f"train.py: --out {args.out} already holds checkpoints ({', '.join(existing)}); "
                         "pass --resume to continue them or choose another --out")
    if args.preset == "tiny" and not (args.clip_data and args.sam_data):
        args.clip_data, args.sam_data = data.make_synthetic_data(os.path.join(args.out, "data"), seed=args.seed or 0)
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    missing = [flag for flag, need in (("--clip-data", not args.clip_data),
                                       ("--sam-data", "distill" in stages and not args.sam_data)) if need]
    if missing:
        raise SystemExit(f"train.py: {' and '.join(missing)} required (see README, 'Training'), or use --preset tiny")
    try:
        teachers = tuple(t.to(env["device"]) for t in build_teachers(args))
        if args.init:
            model = SAMCLIP.load(args.init)
        else:
            model = SAMCLIP.from_modules(*teachers)   # encoder + HeadSAM from SAM, text tower from CLIP
        for stage in stages:
            model = run_stage(resolve_config(args, stage), model, teachers, env, stop)
    except (ValueError, weights.CheckpointError) as e:   # bad data layout, wrong checkpoint: one line
        raise SystemExit(f"train.py: {e}") from None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
