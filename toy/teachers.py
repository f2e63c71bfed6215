"""The two toy teachers: a small SAM and a small CLIP, trained from scratch on toy scenes (issue 9).

SAM-CLIP merges two trained foundation models; in the toy world both are real too, small enough to
train on a laptop CPU in minutes and to ship in the repository, in the official file layouts, so
that vit_det.load_sam_encoder, heads.load_sam_head and clip.load_clip read them like the real ones:

  1. Toy SAM (SAM Sec. 3 and App. A, "Training algorithm"): the "toy" ViT-Det encoder and HeadSAM,
     trained jointly on the instance masks of train-hand scenes. Every mask gets a first prompt (with
     equal probability its box, jittered, or one point in it), then follow-up rounds, each adding a
     point from the error region of the previous mask (a missed pixel -> label 1, a spilled one -> 0)
     with the previous low-res logits as the mask prompt. Loss per round: focal : dice = 20 : 1 against
     the ground-truth mask, plus the MSE of the IoU head to the mask's actual IoU. A single point is
     ambiguous, so it gets SAM's 3 multimask outputs and only the one with the lowest loss is trained.
  2. Toy CLIP (CLIP Sec. 2.3): the "toy" towers trained with InfoNCE, a symmetric cross-entropy over
     the cosine similarities of a batch of (crop, caption) pairs times a learned temperature. Crops
     and captions come from toy.scenes.random_crop_with_caption, most of them centred on one object,
     so words bind to regions. Many crops share a caption ("grass"): identical captions are
     positives of each other, the target of a row spread evenly over the columns with its caption.
     Measured against plain InfoNCE this changes nothing here: the text tower gives equal captions
     equal embeddings, so the softmax already splits its mass evenly between them and the two losses
     agree in value and gradient (tests/test_toy_teachers.py); the targets state the intent and stay
     right were two copies ever embedded differently (text augmentation, dropout).
  3. Saving: SAM as a plain state dict with `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`
     keys (sam_vit_b_01ec64.pth's layout), CLIP with OpenCLIP's keys (clip.CLIP_REMAP, inverted), both
     in float16 (the readers cast to float32). The quality numbers are measured on the saved files.

Scenes are drawn on the fly into a pool that is partly redrawn every step: drawing one costs about as
much as training on a few, so every scene is used a few times, each time with other prompts or crops.

Run: python -m toy.teachers --seed 0 --out toy/weights     (57 min on 2 CPU cores: toy SAM 41, toy CLIP 16)

Shape legend: B images, S the SAM frame side (256), L its low-res mask side (S/4), n prompt slots,
R rounds, N points per prompt, C channels, D CLIP embedding size, T text length.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import data
import heads
import losses
import toy
import train
import vit_det
import weights
from toy import layouts, quality, scenes


@dataclass
class TeacherConfig:
    seed: int = 0
    # toy SAM (SAM App. A); SAM itself: batch 256 images, up to 64 masks each, 11 rounds, lr 8e-4
    sam_steps: int = 1200             # optimizer steps
    sam_images: int = 8               # scenes per step
    sam_prompts: int = 8              # masks prompted per scene (fewer if the scene has fewer)
    sam_rounds: int = 3               # first prompt + follow-up rounds (an error point + the mask prompt each)
    sam_lr: float = 1e-3              # AdamW peak learning rate (SAM's: 8e-4)
    sam_pool: int = 192               # scenes held at once
    sam_fresh: int = 2                # scenes redrawn per step: each scene is seen ~ images * pool / fresh / pool times
    # toy CLIP (CLIP Sec. 2.3); OpenAI's CLIP: batch 32768, lr 5e-4 (ViT-B), weight decay 0.2
    clip_steps: int = 600
    clip_batch: int = 256             # (crop, caption) pairs per step
    clip_lr: float = 1e-3
    clip_pool: int = 512
    clip_fresh: int = 8
    weight_decay: float = 0.05        # AdamW, linear/conv weights only
    grad_clip: float = 1.0            # max global gradient norm
    warmup: int = 60                  # linear warm-up steps, then cosine decay to 0
    bf16: bool = False                # autocast to bfloat16 (losses stay float32): 3x slower on a CPU without AMX


SAM_FILE, CLIP_FILE = os.path.basename(toy.SAM_WEIGHTS), os.path.basename(toy.CLIP_WEIGHTS)
REPORT_FILE = "teachers.json"
HYPERNETWORK_GAIN = 10.0   # see train_sam


def adamw(model, lr, weight_decay):
    """AdamW with decay on the weights of linear and convolution layers only (not on norms, biases,
    position tables, tokens, embeddings or the temperature), the rule of train.param_groups."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, train.DECAYED_LAYERS)}
    decay = [p for p in model.parameters() if id(p) in decayed]
    rest = [p for p in model.parameters() if id(p) not in decayed]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


# ----------------------------------------------------------------------------- 1. toy SAM

def low_res_masks(masks, original_hw, resized_hw, side):
    """Instance masks (K, H, W) bool at the original size -> SAM's low-res grid (K, side/4, side/4):
    cell (r, c) is the original pixel under the cell's centre in the resized frame, as data.SA1B does;
    cells in the padding are 0. -> (masks, inside (side/4, side/4) bool: cells of the image)."""
    L = side // data.LOW_RES_STRIDE
    rows, cols = data.low_res_cells(original_hw, resized_hw, side)
    out = np.zeros((len(masks), L, L), bool)
    out[:, :len(rows), :len(cols)] = masks[:, rows][:, :, cols]
    inside = np.zeros((L, L), bool)
    inside[:len(rows), :len(cols)] = True
    return torch.from_numpy(out), torch.from_numpy(inside)


def sam_scene(scene, side):
    """One scene in SAM's frame: {"image" (3, S, S) float16, SAM-normalised and padded; "gt" (K, L, L)
    bool; "boxes" (K, 4) x0 y0 x1 y1 in the frame; "inside" (L, L)}, for the masks that cover at
    least one low-res cell (a sliver that covers none cannot be prompted or scored)."""
    x, (h2, w2) = data.sam_preprocess(scene.image, side)
    masks = np.stack([inst.mask for inst in scene.instances])                     # (K, H, W)
    gt, inside = low_res_masks(masks, scene.class_map.shape, (h2, w2), side)
    keep = gt.flatten(1).any(1)
    sx, sy = w2 / scene.image.width, h2 / scene.image.height
    boxes = torch.tensor([[l * sx, t * sy, r * sx, b * sy] for l, t, r, b in map(scenes.mask_box, masks)]).float()
    return {"image": x.half(), "gt": gt[keep], "boxes": boxes[keep], "inside": inside}


class ScenePool:
    """`size` train-hand scenes, prepared by `prepare(scene)`; `refresh(k)` redraws the k oldest."""

    def __init__(self, size, prepare, rng):
        self.prepare, self.rng, self.next = prepare, rng, 0
        self.items = [prepare(scenes.draw_scene(rng, "train")) for _ in range(size)]

    def refresh(self, k):
        for _ in range(k):
            self.items[self.next % len(self.items)] = self.prepare(scenes.draw_scene(self.rng, "train"))
            self.next += 1

    def sample(self, k):
        return [self.items[i] for i in self.rng.choice(len(self.items), size=k, replace=False)]


def sam_prompts(items, per_image, generator):
    """SAM's first prompts for up to `per_image` masks of each scene: with equal probability the
    mask's box (each side moved by N(0, (0.1 * side)^2), capped at 20 px in a 1024 frame, App. A) or
    one point drawn uniformly from its cells. -> the batch {"image" (B, 3, S, S) float32, "slot_image"
    (n,), "gt" (n, L, L), "inside" (n, L, L), "is_box" (n,), "boxes" (n, 4), "points" (n, 1, 2)}."""
    side = items[0]["image"].shape[-1]
    slot_image, gt, inside, boxes, points, is_box = [], [], [], [], [], []
    for b, item in enumerate(items):
        K = len(item["gt"])
        for k in torch.randperm(K, generator=generator)[:per_image].tolist():
            mask = item["gt"][k]
            box = item["boxes"][k]
            size = (box[2:] - box[:2]).repeat(2)                                  # (w, h, w, h)
            cap = data.MAX_BOX_JITTER * side / 1024
            box = box + (torch.randn(4, generator=generator) * 0.1 * size).clamp(-cap, cap)
            box = torch.cat([torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])]).clamp(0, side)
            cells = torch.nonzero(mask)                                           # (cells, 2) rows, cols
            r, c = cells[torch.randint(len(cells), (1,), generator=generator)].unbind(1)
            # the cell's centre in the frame, minus SAM's 0.5 (its prompt encoder adds it back)
            point = torch.stack([(c + 0.5) * data.LOW_RES_STRIDE - 0.5, (r + 0.5) * data.LOW_RES_STRIDE - 0.5], -1)
            slot_image.append(b), gt.append(mask), inside.append(item["inside"]), boxes.append(box)
            points.append(point.float()), is_box.append(bool(torch.rand(1, generator=generator) < 0.5))
    return {"image": torch.stack([item["image"] for item in items]).float(), "slot_image": torch.tensor(slot_image),
            "gt": torch.stack(gt), "inside": torch.stack(inside), "is_box": torch.tensor(is_box),
            "boxes": torch.stack(boxes), "points": torch.stack(points)}


def mask_iou(logits, gt):
    """IoU of thresholded logits (n, M, L, L) with masks (n, L, L): (n, M)."""
    pred, target = logits > 0, gt[:, None]
    return (pred & target).flatten(2).sum(-1) / (pred | target).flatten(2).sum(-1).clamp(min=1)


def sam_round_losses(head, embeddings, batch, rounds, generator):
    """SAM's interactive training (App. A) on one batch of first prompts, R rounds each, all rounds
    back-propagated. Box prompts and point prompts are different token counts (no padding point
    with a box), so they run as two groups. -> (mean over slots and rounds of 20 focal + dice + IoU
    MSE, {"focal", "dice", "iou", "miou"} floats; miou: the trained masks' IoU in round 0)."""
    totals = {"focal": 0.0, "dice": 0.0, "iou": 0.0, "miou": 0.0}
    loss, count = 0.0, 0
    for box_group in (True, False):
        sel = torch.nonzero(batch["is_box"] == box_group).squeeze(1)              # (n,)
        n = len(sel)
        if n == 0:
            continue
        emb, gt, inside = embeddings[batch["slot_image"][sel]], batch["gt"][sel], batch["inside"][sel]
        target = gt.float()
        boxes = batch["boxes"][sel] if box_group else None
        coords = batch["points"][sel].new_zeros(n, 0, 2) if box_group else batch["points"][sel]  # (n, N, 2)
        labels = torch.ones(n, coords.shape[1], dtype=torch.long)                # (n, N): the first point is 1
        mask_input, prev = None, None
        rows = torch.arange(n)
        for r in range(rounds):
            if r > 0:   # a point from the error region of the previous mask (SAM App. A)
                draws = torch.rand(n, generator=generator)
                xy, lab = losses.sample_error_points(prev > 0, gt, inside, draws, data.LOW_RES_STRIDE)
                coords, labels = torch.cat([coords, xy[:, None]], 1), torch.cat([labels, lab[:, None]], 1)
            masks, iou_pred = head.all_outputs(emb, **losses.sam_prompt_args(coords, labels, boxes, mask_input))
            masks, iou_pred = masks.float(), iou_pred.float()                   # (n, 4, L, L), (n, 4)
            # one ambiguous prompt (a single point): the 3 multimask outputs, the best one trained
            outputs = slice(1, 4) if (r == 0 and not box_group) else slice(0, 1)
            m, p = masks[:, outputs], iou_pred[:, outputs]                       # (n, M, L, L), (n, M)
            M = m.shape[1]
            flat_t = target[:, None].expand_as(m).flatten(0, 1)                   # (n*M, L, L)
            focal = losses.focal_soft(m.flatten(0, 1), flat_t).view(n, M)       # hard 0/1 targets
            dice = losses.dice_soft(m.flatten(0, 1), flat_t).view(n, M)
            per_mask = losses.FOCAL_WEIGHT * focal + losses.DICE_WEIGHT * dice   # (n, M)
            best = per_mask.argmin(1)                                            # (n,)
            actual = mask_iou(m.detach(), gt)                                    # (n, M)
            iou_loss = F.mse_loss(p, actual, reduction="none").mean(1)           # every output's IoU is predicted
            loss = loss + (per_mask[rows, best] + iou_loss).sum()
            count += n
            totals["focal"] += focal[rows, best].sum().item()
            totals["dice"] += dice[rows, best].sum().item()
            totals["iou"] += iou_loss.sum().item()
            if r == 0:
                totals["miou"] += actual[rows, best].sum().item()
            prev = m[rows, best].detach()                                        # (n, L, L) the mask kept
            mask_input = prev[:, None]                                           # next round's mask prompt
    first = len(batch["is_box"])
    return loss / count, {k: v / (first if k == "miou" else count) for k, v in totals.items()}


def train_sam(cfg: TeacherConfig, encoder_preset="toy", head_preset="toy", log=print):
    """Train the toy SAM from scratch. -> (encoder, head), in eval mode."""
    torch.manual_seed(cfg.seed)
    encoder, head = vit_det.build_vit_det(encoder_preset), heads.build_head_sam(head_preset)
    with torch.no_grad():
        # Workaround: with PyTorch's default init every mask starts nearly flat (its logits vary by
        # ~0.05 over the pixels, the product of two small factors: the hypernetwork's 8 weights and
        # the upscaled features), a saddle that SAM, starting from an MAE encoder and training 90k
        # steps, can afford and a few minutes on a CPU cannot. Ten times larger last layers of the
        # hypernetworks (logit spread ~0.3) left it in ~60 steps instead of ~170 when fitting 16 masks.
        for mlp in head.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(HYPERNETWORK_GAIN)
    side = encoder.cfg.img_size
    model = torch.nn.ModuleDict({"image_encoder": encoder, "head": head})
    opt = adamw(model, cfg.sam_lr, cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    pool = ScenePool(cfg.sam_pool, lambda s: sam_scene(s, side), np.random.default_rng([cfg.seed, 1]))
    start = time.time()
    for step in range(cfg.sam_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.sam_lr * train.lr_factor(step, cfg.sam_steps, cfg.warmup)
        pool.refresh(cfg.sam_fresh)
        batch = sam_prompts(pool.sample(cfg.sam_images), cfg.sam_prompts, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            embeddings = encoder(batch["image"])                                 # (B, C, S/16, S/16)
            loss, parts = sam_round_losses(head, embeddings, batch, cfg.sam_rounds, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 50 == 0 or step == cfg.sam_steps - 1:
            log(f"toy SAM step {step:5d}/{cfg.sam_steps}  loss {loss.item():.4f}  focal {parts['focal']:.4f}  "
                f"dice {parts['dice']:.3f}  iou-mse {parts['iou']:.4f}  train mIoU {parts['miou']:.3f}  "
                f"grad norm {grad_norm:.2f}  lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:.0f} s")
    return encoder.eval(), head.eval()


# ----------------------------------------------------------------------------- 2. toy CLIP

def clip_crop(scene, rng, side):
    """One (crop, caption) pair in the CLIP tower's input: (3, side, side) uint8 (squashed to a square,
    as data.CLIPImages does; half of them mirrored, which no caption can tell), caption."""
    crop, text, _ = scenes.random_crop_with_caption(scene, rng)
    crop = crop.resize((side, side), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return data.to_tensor(crop).to(torch.uint8), text


def contrastive_loss(image_emb, text_emb, logit_scale, captions):
    """CLIP's symmetric InfoNCE (Sec. 2.3) with duplicate captions as positives: unit embeddings
    (B, D) x (B, D), logits = exp(logit_scale) * cosines; the target of image i is spread evenly over
    the texts equal to its own caption, and the same for texts (the matrix is symmetric). Equal to
    plain InfoNCE when equal captions have equal embeddings (see the file's docstring)."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()                        # (B, B)
    _, ids = np.unique(np.array(captions), return_inverse=True)                 # (B,) one id per distinct caption
    ids = torch.from_numpy(ids.reshape(-1))
    same = (ids[:, None] == ids[None, :]).float()                                # (B, B) 1 where captions agree
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def train_clip(cfg: TeacherConfig, preset="toy", log=print):
    """Train the toy CLIP from scratch. -> (model in eval mode, (V,) bool: the tokens seen in training)."""
    torch.manual_seed(cfg.seed)
    model = clip.build_clip(preset)
    side, ctx = model.config.image_size, model.config.context_length
    opt = adamw(model, cfg.clip_lr, cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 2])
    pool = ScenePool(cfg.clip_pool, lambda s: s, rng)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    start = time.time()
    for step in range(cfg.clip_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.clip_lr * train.lr_factor(step, cfg.clip_steps, cfg.warmup)
        pool.refresh(cfg.clip_fresh)
        pairs = [clip_crop(pool.items[i], rng, side) for i in rng.integers(len(pool.items), size=cfg.clip_batch)]
        images = data.normalize_clip(torch.stack([img for img, _ in pairs]).float())   # (B, 3, side, side)
        captions = [text for _, text in pairs]
        tokens = clip.trim_padding(clip.tokenize(captions, ctx))                  # (B, T)
        ends = tokens.argmax(1, keepdim=True)                                     # the end token of each row
        seen[tokens[torch.arange(tokens.shape[1])[None] <= ends]] = True          # padding after it is not read
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            image_emb, text_emb = model(images, tokens)
        loss = contrastive_loss(image_emb.float(), text_emb.float(), model.logit_scale, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():   # CLIP Sec. 2.5: the temperature is clipped at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == cfg.clip_steps - 1:
            log(f"toy CLIP step {step:5d}/{cfg.clip_steps}  loss {loss.item():.4f}  "
                f"scale {model.logit_scale.exp().item():.1f}  distinct captions {len(set(captions))}/{len(captions)}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:.0f} s")
    return model.eval(), seen


# ----------------------------------------------------------------------------- 3. official layouts

def sam_state_dict(encoder, head):
    """SAM's checkpoint layout (sam_vit_b_01ec64.pth): our encoder keys under `image_encoder.`,
    HeadSAM's `prompt_encoder.*` / `mask_decoder.*` as they are (vit_det.SAM_ENCODER_REMAP and
    heads.SAM_HEAD_REMAP, read backwards); float16."""
    sd = {vit_det.SAM_ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    sd.update(head.state_dict())
    return {k: v.detach().half().contiguous() for k, v in sd.items()}


# ours -> OpenCLIP's: clip.CLIP_REMAP read backwards, each swap anchored at the start of the key
TO_OPENCLIP = [("^" + ours, official.lstrip("^")) for official, ours in clip.CLIP_REMAP]


def clip_state_dict(model, seen):
    """OpenCLIP's checkpoint layout (open_clip_pytorch_model.bin), float16. Rows of the token
    embedding whose token never occurred in a training caption were never trained (they hold their
    random initialisation): they are set to zero, so the shipped file does not pretend to know them
    and git stores the ~49k untrained rows as almost nothing."""
    sd = weights.remap(model.state_dict(), TO_OPENCLIP)
    sd["token_embedding.weight"] = sd["token_embedding.weight"] * seen[:, None]
    return {k: v.detach().half().contiguous() for k, v in sd.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the toy SAM and toy CLIP teachers from a seed and save them "
                                            "in the official layouts (toy_sam.pth, toy_clip.bin).")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the scenes and every prompt")
    p.add_argument("--out", default="toy/weights", help="folder for toy_sam.pth, toy_clip.bin and teachers.json")
    p.add_argument("--sam-steps", type=int, default=TeacherConfig.sam_steps, help="toy SAM optimizer steps")
    p.add_argument("--clip-steps", type=int, default=TeacherConfig.clip_steps, help="toy CLIP optimizer steps")
    p.add_argument("--only", choices=("sam", "clip"), default=None, help="train one teacher only")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast; pays off on CPUs with AMX units only "
                                                       "(3x slower than float32 on an AVX-512 one without AMX)")
    args = p.parse_args(argv)
    cfg = TeacherConfig(seed=args.seed, sam_steps=args.sam_steps, clip_steps=args.clip_steps, bf16=args.bf16)
    print(f"toy.teachers: {cfg}  ({torch.get_num_threads()} threads)")
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, REPORT_FILE)
    report = layouts.read_json(report_path) if os.path.isfile(report_path) else {}
    if args.only in (None, "sam"):
        start = time.time()
        encoder, head = train_sam(cfg)
        minutes = (time.time() - start) / 60
        path = os.path.join(args.out, SAM_FILE)
        weights.atomic_save(sam_state_dict(encoder, head), path)
        sd = weights.read_state_dict(path)                                   # measure what is shipped
        encoder, head = vit_det.load_sam_encoder(sd, source=path), heads.load_sam_head(sd, source=path)
        scores = quality.sam_scores(encoder, head, quality.heldout_scenes(40, seed=args.seed))
        print(f"toy SAM: {minutes:.1f} min; heldout {scores}")
        report["sam"] = {"train_minutes": round(minutes, 2), "heldout": scores}
    if args.only in (None, "clip"):
        start = time.time()
        model, seen = train_clip(cfg)
        minutes = (time.time() - start) / 60
        path = os.path.join(args.out, CLIP_FILE)
        weights.atomic_save(clip_state_dict(model, seen), path)
        model = clip.load_clip(path)
        scores = quality.clip_scores(model, seed=args.seed)
        print(f"toy CLIP: {minutes:.1f} min; {int(seen.sum())} tokens trained; heldout {scores}")
        report["clip"] = {"train_minutes": round(minutes, 2), "tokens_trained": int(seen.sum()), "heldout": scores}
    report["config"] = asdict(cfg)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"toy.teachers: wrote {args.out}")


if __name__ == "__main__":
    main()
