"""The paper's claims, measured in the toy world (issue 9): the README's table, made by one command.

SAM-CLIP's claims (Sec. 1, 3, 4) and how each is measured here, on heldout-hand scenes (other roof,
tree, car, cloud and road shapes, the outer half of every colour range: toy/drawing.py) that neither
the teachers nor the merged model saw:

  1. SAM-CLIP keeps SAM's masks (Table 1, instance segmentation): `evaluate.py instseg` with the
     ground-truth boxes as prompts, mask AP and the mean IoU of the prompted masks, for the SAM
     teacher (the merged model before training: its encoder and HeadSAM are the teacher's, copied)
     and for the trained SAM-CLIP.
  2. It gains CLIP's zero-shot recognition (Table 1, classification): `evaluate.py classify` on
     crops dominated by one class, 80 templates; the CLIP teacher run the same way (its own tower at
     its native side, `teacher_classify`).
  3. Zero-shot semantic segmentation emerges (Table 2): `evaluate.py semseg` (HeadCLIP's per-patch
     logits) against the CLIP teacher's dense baseline: its patch tokens through ln_post and proj
     (the tower's own output map, never trained to align with text), cosine against the same class
     embeddings (`teacher_semseg`). Each at two sides, the better reported: SAM-CLIP at the 448 px
     protocol scaled to the toy encoder (112 px, a 7 x 7 grid) and at its native 256 px (16 x 16);
     the teacher at its native 64 px (8 x 8) and at 112 px (14 x 14).
  4. The SAM head sharpens it (Table 5): `evaluate.py semseg --refine sam`.
  5. Multi-task distillation prevents forgetting (Sec. 3): the same training with lambda = 0
     (`--lam 0`: L_CLIP alone moves the shared encoder), its masks measured as in 1.

Run: python -m toy.claims --out runs/claims --run runs/toy   (215 s on 2 CPU cores: the lambda = 0
training and the evaluations; without --run it trains OUT/toy too; a run already in --out is reused)
Writes OUT/claims.json, OUT/claims.md (the table) and OUT/heldout.png (image | clip mode | sam mode).
"""

import argparse
import json
import os
import shutil
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip
import data
import evaluate
import metrics
import toy
import train
import zero_shot
from model import SAMCLIP
from toy import layouts, prepare, scenes
from toy.drawing import CLASSES

EVAL_SIZES = {"semseg": 100, "instances": 100, "classify": 25}   # heldout scenes (classify: crops per class)


def write_eval_sets(root, seed):
    """The heldout evaluation sets, in the layouts evaluate.py reads; kept when already written. Each
    is written under a temporary name and renamed when complete, so an interrupted write is redone,
    never scored half-done."""
    parts = {"semseg": layouts.write_semseg, "instances": layouts.write_instances,
             "classify": layouts.write_class_folders}
    folders = {}
    for part, write in parts.items():
        folders[part] = os.path.join(root, part)
        if not os.path.isdir(folders[part]):
            partial = folders[part] + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            write(partial, EVAL_SIZES[part], seed, "heldout")
            os.replace(partial, folders[part])
    return folders


def trained(out, *flags):
    """`train.py --preset toy [flags]` into `out` with --resume: a finished run is reused, an
    interrupted one finished (samclip.pt is written after every stage, so its presence alone would
    not say the run is complete) -> the path of its samclip.pt."""
    start = time.time()
    prepare.prepare("toy")                       # the preset's data (kept when already written)
    train.main(["--preset", "toy", "--out", out, "--resume", *flags])
    print(f"toy.claims: {out} trained (or found finished) in {time.time() - start:.0f} s")
    return os.path.join(out, "samclip.pt")


@torch.no_grad()
def teacher_classify(teacher, folder):
    """evaluate.py classify's protocol on the CLIP teacher itself: centre square, its native side."""
    items, names = evaluate.read_image_folder(folder)
    class_emb = zero_shot.class_embeddings(teacher, names)                       # (K, D)
    side = teacher.config.image_size
    x = torch.stack([data.square_resize(evaluate.center_square(data.load_image(p)), side, data.normalize_clip)
                     for p, _ in items])                                         # (N, 3, side, side)
    logits = F.normalize(teacher.encode_image(x), dim=-1) @ class_emb.T           # (N, K)
    acc = metrics.topk_accuracy(logits, torch.tensor([k for _, k in items]))
    return {"top1": acc[1], "top5": acc[5], "resolution": side}


@torch.no_grad()
def teacher_semseg(teacher, folder, side):
    """The CLIP teacher's dense baseline with evaluate.py semseg's protocol: square resize to `side`,
    every patch token through ln_post and proj (B, g*g, D), cosine with the class embeddings,
    bilinear upsampling to the label map, argmax, mIoU of one confusion matrix."""
    pairs, names = evaluate.read_segmentation(folder, "generic", None)
    class_emb = zero_shot.class_embeddings(teacher, names)                       # (K, D)
    K, g = len(names), side // teacher.config.patch_size
    conf = torch.zeros(K, K, dtype=torch.int64)
    for img_path, label_path in pairs:
        img, gt = data.load_image(img_path), evaluate.read_label(label_path, K)
        x = data.square_resize(img, side, data.normalize_clip)[None]             # (1, 3, side, side)
        _, patches = teacher.visual(x, return_patch_tokens=True)                 # (1, g*g, D)
        dense = F.normalize(patches.reshape(1, g, g, -1), dim=-1)                # (1, g, g, D)
        logits = torch.einsum("bhwd,kd->bkhw", dense, class_emb)                 # (1, K, g, g)
        up = F.interpolate(logits, gt.shape, mode="bilinear", align_corners=False)[0]   # (K, H, W)
        conf += metrics.confusion_matrix(up.argmax(0), gt, K)
    return {"mIoU": 100 * metrics.miou(conf)[0], "resolution": side}


def heldout_figure(model, path, n=4, seed=0):
    """n heldout scenes (not in the evaluation sets), a row each: image | clip mode | sam mode, every
    class name a prompt (zero_shot.segment_by_text, as segment_demo.py runs it)."""
    rows = []
    for i in range(n):
        img = scenes.draw_scene(layouts.scene_rng(seed, "semseg", "heldout", 10_000 + i), "heldout").image
        painted = [zero_shot.paint(img, zero_shot.segment_by_text(
            model, img, CLASSES, mode=mode, generator=torch.Generator().manual_seed(seed))["labels"].numpy())
            for mode in ("clip", "sam")]
        rows.append(zero_shot.panels_row([img, *painted], ("image", "clip mode", "sam mode"), height=192))
    legend = Image.new("RGB", (max(r.width for r in rows), 20), "white")          # class -> colour
    draw = ImageDraw.Draw(legend)
    for k, name in enumerate(CLASSES):
        draw.rectangle((8 + 80 * k, 5, 18 + 80 * k, 15), fill=tuple(int(c) for c in zero_shot.PALETTE[k]))
        draw.text((22 + 80 * k, 4), name, fill="black")
    rows.append(legend)
    canvas = Image.new("RGB", (legend.width, sum(r.height for r in rows)), "white")
    for k, r in enumerate(rows):
        canvas.paste(r, (0, sum(q.height for q in rows[:k])))
    canvas.save(path)


def verdict(ok):
    return "reproduced" if ok else "**not reproduced**"


def table(r):
    """The README's table from the measured results, each row with the issue's target and whether
    it was met (targets: masks within 2 points of the teacher, lambda = 0 losing at least 5, clip
    mode 10 mIoU above the CLIP teacher, --refine sam above clip mode)."""
    t, s, z = r["sam_teacher"], r["samclip_masks"], r["lam0_masks"]
    ct, sc, cs, rf = r["clip_teacher_classify"], r["samclip_classify"], r["clip_teacher_semseg"], r["samclip_refine"]
    ss = r["samclip_semseg"]
    return "\n".join([
        "| claim (paper) | measured in the toy world (heldout hand) | target |",
        "|---|---|---|",
        f"| SAM-CLIP keeps SAM's masks (Table 1 instance seg) | box-prompted mask mIoU / AP: SAM teacher "
        f"{t['mIoU_prompted']:.1f} / {t['AP']:.1f}, SAM-CLIP {s['mIoU_prompted']:.1f} / {s['AP']:.1f} "
        f"| within 2 mIoU: {verdict(s['mIoU_prompted'] >= t['mIoU_prompted'] - 2)} |",
        f"| it gains CLIP's zero-shot recognition (Table 1) | zero-shot classification top-1 / top-5: CLIP teacher "
        f"{ct['top1']:.1f} / {ct['top5']:.1f}, SAM-CLIP {sc['top1']:.1f} / {sc['top5']:.1f} | (none) |",
        f"| zero-shot semantic segmentation emerges (Table 2) | semseg mIoU: CLIP teacher's dense features "
        f"{cs['mIoU']:.1f} ({cs['resolution']} px), SAM-CLIP clip mode {ss['mIoU']:.1f} ({ss['resolution']} px) "
        f"| +10: {verdict(ss['mIoU'] >= cs['mIoU'] + 10)} |",
        f"| the SAM head sharpens it (Table 5) | semseg mIoU with `--refine sam`: {rf['mIoU']:.1f} "
        f"(clip mode {ss['mIoU']:.1f}) | above clip mode: {verdict(rf['mIoU'] > ss['mIoU'])} |",
        f"| multi-task distillation prevents forgetting (Sec. 3) | the same run with lambda = 0: mask mIoU / AP "
        f"{z['mIoU_prompted']:.1f} / {z['AP']:.1f} (SAM teacher {t['mIoU_prompted']:.1f} / {t['AP']:.1f}, "
        f"lambda = 10 {s['mIoU_prompted']:.1f} / {s['AP']:.1f}) "
        f"| loses >= 5 mIoU: {verdict(z['mIoU_prompted'] <= t['mIoU_prompted'] - 5)} |",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the paper's claims in the toy world (README table).")
    p.add_argument("--out", default="runs/claims", help="folder for the data, the runs and the results")
    p.add_argument("--run", help="a finished `train.py --preset toy` folder to use (default: OUT/toy, trained here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation scenes")
    args = p.parse_args(argv)
    start = time.time()
    sets = write_eval_sets(os.path.join(args.out, "eval"), args.seed)
    runs = {"samclip": os.path.join(args.run, "samclip.pt") if args.run else trained(os.path.join(args.out, "toy")),
            "lam0": trained(os.path.join(args.out, "toy_lam0"), "--lam", "0"),
            "start": os.path.join(args.out, "start.pt")}
    if not os.path.isfile(runs["start"]):   # the merged model before training: SAM's encoder and head, exactly
        SAMCLIP.from_teachers(toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS).save(runs["start"], stage="start", step=0)
    teacher = clip.load_clip(toy.CLIP_WEIGHTS).eval()
    merged_side = zero_shot.clip_mode_side(SAMCLIP.load(runs["samclip"]))

    def ev(command, checkpoint, *flags):   # one evaluate.py subcommand on its heldout set -> its results
        folder = sets["instances" if command == "instseg" else command]
        return evaluate.main([command, "--checkpoint", checkpoint, "--data", folder, *flags])
    results = {
        "sam_teacher": ev("instseg", runs["start"]),
        "samclip_masks": ev("instseg", runs["samclip"]),
        "lam0_masks": ev("instseg", runs["lam0"]),
        "clip_teacher_classify": teacher_classify(teacher, sets["classify"]),
        "samclip_classify": ev("classify", runs["samclip"]),
        "clip_teacher_semseg": max((teacher_semseg(teacher, sets["semseg"], side)
                                    for side in (teacher.config.image_size, merged_side)), key=lambda r: r["mIoU"]),
        "samclip_semseg": max((ev("semseg", runs["samclip"], "--resolution", str(side)) for side in (448, 1024)),
                              key=lambda r: r["mIoU"]),
        "samclip_refine": ev("semseg", runs["samclip"], "--refine", "sam"),
    }
    md = table(results)
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "claims.md"), "w") as f:
        f.write(md + "\n")
    heldout_figure(SAMCLIP.load(runs["samclip"]), os.path.join(args.out, "heldout.png"), seed=args.seed)
    print(md)
    print(f"toy.claims: {time.time() - start:.0f} s; wrote {args.out}/claims.json, claims.md, heldout.png")


if __name__ == "__main__":
    main()
