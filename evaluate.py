"""Evaluate a merged SAM-CLIP checkpoint with the paper's zero-shot protocols (Sec. 4.2-4.4).

One subcommand per protocol; each prints a table and, with --out, writes a JSON of its results (percent).
Each cmd_<name> below says how it follows the paper; speed and memory: bench.py; the metrics: metrics.py.

  classify  zero-shot classification, Table 1 (ImageNet, v2, Places365), 336 px -> top1, top5
  retrieve  zero-shot image-text retrieval, Table 1 (Flickr30K, COCO), 336 px -> t2i/i2t R@1/5/10
  semseg    zero-shot semantic segmentation, Table 2 (VOC, Context, ADE20k, COCO-Stuff), 448 px
            square input; `--refine sam` is Table 5 (HeadSAM refines at 1024 px) -> mIoU, per class
  instseg   box-prompted instance segmentation, Table 1 (COCO; LVIS via --save-predictions and the
            LVIS API), COCOeval's rules without pycocotools -> AP, AP50, AP75, mIoU_prompted
  probe     linear probing of frozen backbones, Tables 3 and 4: the merged encoder, SAM's or a CLIP
            tower, each on its last block's tokens -> top1/top5 (--task cls) or mIoU (--task seg)

Run (every flag has --help):
  python evaluate.py classify --checkpoint m.pt --data imagenet_val/ --out cls.json
  python evaluate.py retrieve --checkpoint m.pt --data flickr30k/ --out ret.json
  python evaluate.py semseg   --checkpoint m.pt --data VOCdevkit/VOC2012 --layout voc --out voc.json
  python evaluate.py semseg   --checkpoint m.pt --data ade/ --layout generic [--refine sam]
  python evaluate.py instseg  --checkpoint m.pt --data coco_val/ [--detections dets.json] [--save-predictions p.json]
  python evaluate.py probe    --checkpoint m.pt --data voc_generic/ --task seg --features sam --sam-checkpoint s.pth
Every subcommand also takes --limit N, --batch-size, --visualize K (K PNGs "image | prediction | ground
truth" in <out stem>_vis/ next to the JSON), --device, --dtype and --seed.

Dataset layouts: README ("Evaluation") and the read_* functions; a missing part is reported in one
line naming it (exit code 2). Choices the paper leaves open are stated where they are made (to_labels,
cmd_semseg, cmd_instseg, metrics.match_detections, cmd_probe).

Resolutions are in the paper's pixels for the 1024 px vit_b model; smaller presets scale them (`scaled`).

Shape legend: B batch, K classes, D embedding size, h w HeadCLIP / SAM grid, H W label (original
image) size, S the encoder's native side, N prompts (boxes) or texts, G ground-truth objects.
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import clip
import data
import heads
import metrics
import model
import vit_det
import weights
import zero_shot

# ----------------------------------------------------------------------------- shared helpers

class LayoutError(ValueError):
    """A dataset folder that does not have the layout a subcommand expects."""


def need(path, what):
    if not os.path.exists(path):
        raise LayoutError(f"{path} not found: {what}")
    return path


def scaled(res, m):
    """A paper resolution for model or encoder `m` (vit_det.scaled_side: the identity at full size)."""
    return vit_det.scaled_side(res, getattr(m.cfg, "encoder", m.cfg))


def center_square(img):
    """The largest centred square crop: with square_resize this is CLIP's resize + centre crop."""
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s))


def image_files(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(data.IMAGE_EXTENSIONS))


def read_label(path, num_classes=None):
    """A label PNG -> (H, W) int64 tensor of class indices. Palette ('P') PNGs give their palette
    indices, single-channel ones their values; an RGB label map is refused."""
    need(path, "label map for this image")
    img = Image.open(path)
    if img.mode not in ("P", "L") and not img.mode.startswith("I"):
        raise LayoutError(f"{path}: label map must hold class indices (palette or one channel), got mode {img.mode}")
    lab = torch.from_numpy(np.array(img).astype(np.int64))
    bad = lab[(lab != 255) & (lab >= num_classes)] if num_classes else lab[:0]
    if len(bad):
        raise LayoutError(f"{path}: class index {int(bad[0])} but only {num_classes} classes are named")
    return lab


def batches(items, load, batch_size, desc):
    """Yield (items, loaded) per batch under one progress bar; files are decoded by 4 threads."""
    with ThreadPoolExecutor(4) as pool, tqdm(total=len(items), desc=desc, unit="img") as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            yield chunk, list(pool.map(load, chunk))
            bar.update(len(chunk))


def load_model(args):
    m = model.compile_modules(model.SAMCLIP.load(args.checkpoint).to(args.device), args.compile)
    print(f"evaluate.py: {args.checkpoint} (encoder {m.cfg.encoder.img_size} px, patch {m.cfg.encoder.patch_size}) "
          f"on {args.device}")
    return m


def write_json(path, results):
    """JSON with NaN (a class or category without ground truth) written as null."""
    clean = lambda v: {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else \
        [clean(x) for x in v] if isinstance(v, list) else None if isinstance(v, float) and not math.isfinite(v) else v
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(results), f, indent=1)
    print(f"wrote {path}")


def finish(args, results, title):
    """Print the results as a table (one level of nesting, e.g. per-class IoU) and write the JSON."""
    print(f"\n{title}")
    for k, v in results.items():
        for name, x in (v.items() if isinstance(v, dict) else [(k, v)]):
            pad = "    " if isinstance(v, dict) else "  "
            print(f"{pad}{name:<24} " + (f"{x:8.2f}" if isinstance(x, float) else f"{x!s:>8}"))
    if args.out:
        write_json(args.out, results)
    return results


def visualizer(args):
    """-> show(name, panels, titles=...) that saves the first --visualize calls to <out stem>_vis/."""
    folder, count = os.path.splitext(args.out or f"{args.command}.json")[0] + "_vis", [0]

    def show(name, panels, *titles):
        if count[0] < args.visualize:
            pictures = [p() if callable(p) else p for p in panels]
            zero_shot.save_panels(os.path.join(folder, f"{name}.png"), pictures, *titles)
            count[0] += 1
    return show


# ----------------------------------------------------------------------------- dataset layouts

def read_image_folder(root):
    """DIR/<class>/*.jpg -> ([(path, label)], class names). --limit takes the list in round-robin
    class order, so a quick look still sees every class."""
    need(root, "dataset folder (DIR/<class>/*.jpg)")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not folders:
        raise LayoutError(f"{root}/<class>/ not found: no class sub-folders (expected DIR/<class>/*.jpg)")
    items = [(r, k, os.path.join(root, c, f)) for k, c in enumerate(folders)
             for r, f in enumerate(image_files(os.path.join(root, c)))]
    if not items:
        raise LayoutError(f"{root}/<class>/*.jpg not found: the class folders hold no images")
    names = [c.replace("_", " ") for c in folders]
    txt = os.path.join(root, "classnames.txt")
    if os.path.isfile(txt):
        # one format for every class list of the repository (classes.txt too): line i names class i
        lines = [l.strip() for l in open(txt, encoding="utf-8") if l.strip()]
        if len(lines) != len(folders):
            raise LayoutError(f"{txt}: {len(lines)} names for {len(folders)} class folders (want one readable "
                              "name per line, in the sorted order of the folders)")
        names = lines
    return [(p, k) for _, k, p in sorted(items)], names


def read_captions(root):
    """DIR/images + DIR/captions.json -> (image paths, captions, image index of each caption).
    Images without a caption are dropped (they would have no right answer in image->text)."""
    img_dir = need(os.path.join(root, "images"), "folder of the images named in captions.json")
    js = json.load(open(need(os.path.join(root, "captions.json"), "COCO-style captions file"), encoding="utf-8"))
    if "images" not in js or "annotations" not in js:
        raise LayoutError(f"{root}/captions.json: needs 'images' and 'annotations' lists")
    by_image = defaultdict(list)
    try:
        for a in js["annotations"]:
            by_image[a["image_id"]].append(a["caption"])
        images = [im for im in js["images"] if by_image[im["id"]]]
        paths = [need(os.path.join(img_dir, im["file_name"]), "image listed in captions.json") for im in images]
    except KeyError as e:
        raise LayoutError(f"{root}/captions.json: an entry has no {e} field") from None
    caps = [(c, i) for i, im in enumerate(images) for c in by_image[im["id"]]]
    return paths, [c for c, _ in caps], [i for _, i in caps]


VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
               "train", "tv monitor"]


def read_segmentation(root, layout, split):
    """-> ([(image path, label path)], class names). For VOC, names[0] is 'background'."""
    need(root, "dataset folder")
    if layout == "voc":
        ids_file = need(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "list of image ids")
        for sub in ("JPEGImages", "SegmentationClass"):
            need(os.path.join(root, sub), "a VOC folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
        ids = [l.strip() for l in open(ids_file) if l.strip()]
        pairs = [(os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(root, "SegmentationClass", i + ".png"))
                 for i in ids]
        names = VOC_CLASSES
    else:
        img_dir = need(os.path.join(root, "images"), "generic layout: DIR/images, DIR/labels, DIR/classes.txt")
        lab_dir = need(os.path.join(root, "labels"), "generic layout: DIR/labels/<image stem>.png")
        with open(need(os.path.join(root, "classes.txt"), "one class name per line"), encoding="utf-8") as f:
            names = f.read().rstrip().split("\n")                       # line i = class i
        pairs = [(os.path.join(img_dir, f), os.path.join(lab_dir, os.path.splitext(f)[0] + ".png"))
                 for f in image_files(img_dir)]
    if not pairs:
        raise LayoutError(f"{root}: no images listed")
    for img, lab in pairs:
        need(img, "image")
        need(lab, "label map of an image")
    return pairs, names


LVIS_IMAGE_KEYS = ("not_exhaustive_category_ids", "neg_category_ids")   # LVIS's federated annotation


def read_instances(root, annotations, allow_lvis=False):
    """COCO instances JSON -> (images [{id, path, height, width}] sorted by id; annotations per image
    id, crowds (iscrowd=1) last, both as COCOeval orders them; {category id: name}; is it LVIS).
    LVIS files (not-exhaustive / negative category lists, frequencies) are refused unless allow_lvis:
    their AP is federated. LVIS images without a file_name are found by their coco_url's name."""
    need(root, "dataset folder")
    img_dir = need(os.path.join(root, "images"), "folder of the images named in the instances JSON")
    ann_file = annotations or os.path.join(root, "instances.json")
    js = json.load(open(need(ann_file, "COCO instances JSON (--annotations)"), encoding="utf-8"))
    for key in ("images", "annotations", "categories"):
        if key not in js:
            raise LayoutError(f"{ann_file}: no '{key}' list")
    lvis = (any(k in im for im in js["images"] for k in LVIS_IMAGE_KEYS)
            or any("frequency" in c for c in js["categories"]))
    if lvis and not allow_lvis:
        raise LayoutError(f"{ann_file}: an LVIS file, whose AP is federated (not-exhaustive and negative categories) "
                          "and not computed here: add --save-predictions FILE and score FILE with the LVIS API "
                          "(github.com/lvis-dataset/lvis-api)")
    anns = defaultdict(list)
    try:
        name = lambda im: os.path.basename(im["coco_url"]) if lvis and "file_name" not in im else im["file_name"]
        images = [dict(im, path=need(os.path.join(img_dir, name(im)), "image of the instances JSON"))
                  for im in sorted(js["images"], key=lambda im: im["id"])]
        for a in sorted(js["annotations"], key=lambda a: bool(a.get("iscrowd", 0))):    # stable: crowds last
            anns[a["image_id"]].append({k: a[k] for k in ("category_id", "bbox", "segmentation")}
                                       | {"iscrowd": bool(a.get("iscrowd", 0))})
        return images, anns, {c["id"]: c["name"] for c in js["categories"]}, lvis
    except KeyError as e:
        raise LayoutError(f"{ann_file}: an entry has no {e} field") from None


def decode_mask(segm, h, w):
    """COCO segmentation (polygon list, or RLE with list or compressed counts) -> bool (h, w).
    Polygons are filled with PIL (boundary pixels may differ slightly from pycocotools)."""
    if isinstance(segm, dict):
        return torch.from_numpy(data.rle_decode(segm, (h, w)).copy())
    canvas = Image.new("L", (w, h), 0)
    for poly in segm:
        if len(poly) >= 6:
            ImageDraw.Draw(canvas).polygon([float(v) for v in poly], fill=1, outline=1)
    return torch.from_numpy(np.array(canvas, dtype=bool))


# ----------------------------------------------------------------------------- subcommands

@torch.no_grad()
def cmd_classify(args):
    """Table 1, zero-shot classification: images resized on the short side and centre-cropped to
    --resolution; cosine of the HeadCLIP embedding with each class's 80-template text embedding
    (CLIP Sec. 3.1.4); the argmax is the prediction."""
    items, names = read_image_folder(args.data)
    items = items[:args.limit] if args.limit else items
    m = load_model(args)
    res = scaled(args.resolution, m)
    class_emb = zero_shot.class_embeddings(m, names)                         # (K, D)
    logits, labels, show = [], [], visualizer(args)
    for chunk, imgs in batches(items, lambda it: data.load_image(it[0]), args.batch_size, "classify"):
        x = torch.stack([data.square_resize(center_square(im), res) for im in imgs]).to(args.device)  # (B, 3, r, r)
        lg = (F.normalize(m.encode_image(x).float(), dim=-1) @ class_emb.T).cpu()  # (B, K)
        logits.append(lg)
        labels += [k for _, k in chunk]
        for im, (path, k), p in zip(imgs, chunk, lg.argmax(1).tolist()):
            stem = os.path.splitext(os.path.basename(path))[0]
            show(f"{k:03d}_{stem}", [im, zero_shot.text_panel(names[p]), zero_shot.text_panel(names[k])])
    acc = metrics.topk_accuracy(torch.cat(logits), torch.tensor(labels))
    return finish(args, {"top1": acc[1], "top5": acc[5], "num_images": len(labels), "num_classes": len(names),
                         "resolution": res}, f"zero-shot classification, {args.data}")


@torch.no_grad()
def cmd_retrieve(args):
    """Table 1, zero-shot retrieval at --resolution (Sec. 4.2: 336 px, as classification): one cosine
    matrix between all captions and all images, read by rows (text -> image) and by columns
    (image -> text, right if any of its captions ranks)."""
    paths, caps, owner = read_captions(args.data)
    if args.limit:
        paths = paths[:args.limit]
        caps, owner = zip(*[(c, i) for c, i in zip(caps, owner) if i < len(paths)])
    m = load_model(args)
    res, ctx = scaled(args.resolution, m), m.cfg.clip.context_length
    img_emb, txt_emb, pics = [], [], []
    for chunk, imgs in batches(paths, data.load_image, args.batch_size, "images"):
        x = torch.stack([data.square_resize(center_square(im), res) for im in imgs]).to(args.device)  # (B, 3, r, r)
        img_emb.append(F.normalize(m.encode_image(x).float(), dim=-1).cpu())
        pics += imgs[:max(0, args.visualize - len(pics))]
    for i in tqdm(range(0, len(caps), args.batch_size), desc="captions"):
        tok = clip.tokenize(caps[i:i + args.batch_size], ctx)                # (B, L)
        emb = clip.encode_text_by_length(lambda t: m.encode_text(t.to(args.device)), tok)  # causal: padding can go
        txt_emb.append(F.normalize(emb.float(), dim=-1).cpu())
    sim = torch.cat(txt_emb) @ torch.cat(img_emb).T                          # (N_text, N_img)
    right = F.one_hot(torch.tensor(owner), len(paths)).bool()                # (N_text, N_img)
    t2i, i2t = metrics.recall_at_k(sim, right), metrics.recall_at_k(sim.T, right.T)
    show = visualizer(args)
    for i, im in enumerate(pics):
        show(f"{i:04d}", [im, zero_shot.text_panel(caps[int(sim[:, i].argmax())]),
                          zero_shot.text_panel(caps[owner.index(i)])],
             ["image", "best caption (i2t)", "a ground-truth caption"])
    recalls = {f"t2i_R@{k}": v for k, v in t2i.items()} | {f"i2t_R@{k}": v for k, v in i2t.items()}
    return finish(args, recalls | {"num_images": len(paths), "num_texts": len(caps), "resolution": res},
                  f"zero-shot retrieval, {args.data}")


def to_labels(logits, with_background, bg_threshold):
    """(K, H, W) class logits -> (H, W) labels. With a background class (VOC), the logits are the K
    foreground classes, labels shift by one and a pixel whose best softmax probability among them
    is below bg_threshold becomes 0, background (GroupViT's rule). GroupViT uses 0.95 on its peaky
    group-token probabilities; for patch logits the default is 0.5, "no foreground class holds a
    majority": a knob of the protocol, not a number from the paper."""
    if not with_background:
        return logits.argmax(0)
    prob, idx = logits.softmax(0).max(0)                                 # (H, W), (H, W)
    return torch.where(prob < bg_threshold, 0, idx + 1)


@torch.no_grad()
def cmd_semseg(args):
    """Table 2 (Sec. 4.2): 448 px square input, per-patch HeadCLIP logits, bilinear upsampling to
    the label map, argmax. Table 5 (Sec. 4.4, App. C) with --refine sam, one image at a time:
    HeadSAM decodes every class (zero_shot.refine_with_sam), but only classes that win a pixel of
    HeadCLIP's own 1024 px map compete in the per-pixel argmax; a pixel no refined mask covers
    (logit <= 0) is background on VOC and keeps HeadCLIP's label on other layouts (our choices)."""
    pairs, names = read_segmentation(args.data, args.layout, args.split)
    pairs = pairs[:args.limit] if args.limit else pairs
    voc = args.layout == "voc"
    m = load_model(args)
    class_emb = zero_shot.class_embeddings(m, names[1:] if voc else names)  # VOC: the 20 foreground classes
    K, S = len(names), m.cfg.encoder.img_size
    res = scaled(args.resolution, m)
    conf = torch.zeros(K, K, dtype=torch.int64)
    gen = torch.Generator().manual_seed(args.seed)                       # point prompts of --refine sam
    show = visualizer(args)
    load = lambda pr: (data.load_image(pr[0]), read_label(pr[1], K))
    for chunk, loaded in batches(pairs, load, 1 if args.refine == "sam" else args.batch_size, "semseg"):
        if args.refine == "none":                                        # Table 2: 448 px, HeadCLIP only
            x = torch.stack([data.square_resize(im, res) for im, _ in loaded]).to(args.device)  # (B, 3, 448, 448)
            logits = zero_shot.dense_logits(m, x, class_emb)                 # (B, K', 28, 28)
        for b, ((img, gt), (img_path, _)) in enumerate(zip(loaded, chunk)):
            H, W = gt.shape
            if args.refine == "none":
                up = F.interpolate(logits[b:b + 1], (H, W), mode="bilinear", align_corners=False)[0]  # (K', H, W)
                pred = to_labels(up, voc, args.bg_threshold)
            else:                                                        # Table 5: both heads, 1024 px
                x, input_size = data.sam_preprocess(img, S)              # (3, S, S), (h', w')
                masks, coarse = zero_shot.refine_with_sam(m, x[None].to(args.device), class_emb,  # (K',4h,4w),(K',h,w)
                                                      threshold=args.point_threshold, generator=gen,
                                                      input_size=input_size)
                post = lambda t: heads.postprocess_masks(t[None], input_size, (H, W), img_size=S)[0]  # (K', H, W)
                coarse_pred = to_labels(post(coarse), voc, args.bg_threshold)  # HeadCLIP's answer, (H, W)
                found = coarse_pred[coarse_pred > 0] - 1 if voc else coarse_pred
                present = torch.zeros(len(class_emb), dtype=torch.bool, device=masks.device)
                present[found.unique()] = True                           # only classes HeadCLIP found compete
                sam = post(masks).masked_fill(~present[:, None, None], float("-inf"))
                best, idx = sam.max(0)                                   # (H, W)
                # a pixel no refined mask claims (logit <= 0): background on VOC, else HeadCLIP's label
                pred = torch.where(best > 0, idx + 1, 0) if voc else torch.where(best > 0, idx, coarse_pred)
            pred = pred.cpu()
            conf += metrics.confusion_matrix(pred, gt, K)
            stem = os.path.splitext(os.path.basename(img_path))[0]
            if args.save_predictions:
                os.makedirs(args.save_predictions, exist_ok=True)
                Image.fromarray(pred.numpy().astype(np.uint8), mode="L").save(
                    os.path.join(args.save_predictions, stem + ".png"))
            show(stem, [img, zero_shot.colorize(pred), zero_shot.colorize(gt)])
    mean, per_class = metrics.miou(conf)
    results = {"mIoU": 100 * mean, "pixel_accuracy": 100 * conf.diagonal().sum().item() / max(1, conf.sum().item()),
               "per_class_IoU": {n: 100 * float(v) for n, v in zip(names, per_class)},
               "num_images": len(pairs), "layout": args.layout, "refine": args.refine,
               "resolution": S if args.refine == "sam" else res}
    if voc:
        results["bg_threshold"] = args.bg_threshold
    return finish(args, results, f"zero-shot semantic segmentation, {args.data}")


@torch.no_grad()
def cmd_instseg(args):
    """Table 1, box-prompted instance segmentation: SAM's resize + pad to the native side, one
    encoder forward per batch, then every box of an image through HeadSAM in one decoder call.
    Mask AP by COCOeval's rules (segm, all areas, 100 detections per image and category), crowd
    regions as ignored ground truth. --save-predictions writes one mask per prompt as a COCO results
    JSON for COCOeval (or the LVIS API). Ground-truth boxes: one mask per object, ranked by HeadSAM's
    predicted IoU. PIL fills polygons (pycocotools' boundary pixels differ; RLE gives its AP exactly)."""
    images, anns, cats, lvis = read_instances(args.data, args.annotations, allow_lvis=bool(args.save_predictions))
    images = images[:args.limit] if args.limit else images
    dets = None
    if args.detections:
        dets = defaultdict(list)
        for d in json.load(open(need(args.detections, "COCO results JSON (--detections)"))):
            if not all(k in d for k in ("image_id", "category_id", "bbox", "score")):
                raise LayoutError(f"{args.detections}: a detection lacks image_id, category_id, bbox or score")
            dets[d["image_id"]].append(d)
    m = load_model(args)
    S = m.cfg.encoder.img_size
    records = {c: [] for c in cats}                  # category -> [(scores (N,), ious (N, G), crowd (G,)) per image]
    prompted, predictions, show = [], [], visualizer(args)
    for chunk, imgs in batches(images, lambda im: data.load_image(im["path"]), args.batch_size, "instseg"):
        xs, sizes = zip(*[data.sam_preprocess(im, S) for im in imgs])   # (3, S, S), (h', w')
        emb = m.encoder(torch.stack(xs).to(args.device))                 # (B, C', h, w)
        for b, (info, img) in enumerate(zip(chunk, imgs)):
            H, W = img.height, img.width
            gts = anns[info["id"]]                                       # regular objects first, crowds last
            crowd = torch.tensor([a["iscrowd"] for a in gts], dtype=torch.bool)  # (G,)
            gt_masks = torch.stack([decode_mask(a["segmentation"], H, W) for a in gts]) if gts else \
                torch.zeros(0, H, W, dtype=torch.bool)                    # (G, H, W)
            prompts = [a for a in gts if not a["iscrowd"]] if dets is None else dets[info["id"]]
            boxes = torch.tensor([p["bbox"] for p in prompts], dtype=torch.float32).reshape(-1, 4)  # (N, 4) XYWH
            boxes[:, 2:] += boxes[:, :2]                                 # -> x0, y0, x1, y1
            boxes *= torch.tensor([sizes[b][1] / W, sizes[b][0] / H] * 2)  # into the resized frame
            if len(prompts):
                low, iou = m.head_sam(emb[b:b + 1], boxes=boxes.to(args.device),
                                      multimask_output=False)            # (N, 1, 4h, 4w), (N, 1)
                masks = heads.postprocess_masks(low, sizes[b], (H, W), img_size=S)[:, 0].cpu() > 0  # (N, H, W)
                # with ground-truth boxes every object gets one mask; HeadSAM's IoU guess ranks them.
                # float64 scores: the values COCOeval reads back from the results JSON
                scores = iou[:, 0].cpu().double() if dets is None else \
                    torch.tensor([p["score"] for p in prompts], dtype=torch.float64)
            else:
                masks, scores = torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
            ious = metrics.mask_iou(masks, gt_masks, crowd)                      # (N, G), crowd rule on crowd columns
            if dets is None:
                prompted += ious.diagonal().tolist()                     # prompt i is object i (regular first)
            p_cat = torch.tensor([p["category_id"] for p in prompts], dtype=torch.long)
            g_cat = torch.tensor([a["category_id"] for a in gts], dtype=torch.long)
            for c in set(p_cat.tolist()) | set(g_cat.tolist()):                 # per image and category
                if c not in records:
                    raise LayoutError(f"category_id {c} (image {info['id']}) is not in the categories list")
                records[c].append((scores[p_cat == c].numpy(), ious[p_cat == c][:, g_cat == c].numpy(),
                                   crowd[g_cat == c].numpy()))
            predictions += [{"image_id": info["id"], "category_id": p["category_id"],
                             "segmentation": data.rle_encode(mk.numpy()), "score": float(sc)}
                            for p, mk, sc in zip(prompts, masks, scores)]
            show(str(info["id"]), [img, lambda: zero_shot.overlay(img, masks),
                                   lambda: zero_shot.overlay(img, gt_masks)])
    results = {"mIoU_prompted": 100 * float(np.mean(prompted)) if prompted else float("nan"),
               "num_images": len(images), "num_prompts": len(predictions),
               "boxes": "detections" if dets is not None else "ground truth", "resolution": S}
    if args.save_predictions:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_predictions)), exist_ok=True)
        with open(args.save_predictions, "w") as f:
            json.dump(predictions, f)
        print(f"wrote {len(predictions)} predictions to {args.save_predictions}")
    if lvis:                                                             # never COCO-style AP on LVIS
        results["AP"] = f"not computed: LVIS is scored federated; run the LVIS API on {args.save_predictions}"
    else:
        ap, per_cat = metrics.coco_mask_ap(records)
        results = ap | results | {"per_category_AP": {cats[c]: 100 * float(v) for c, v in per_cat.items()}}
    return finish(args, results, f"box-prompted instance segmentation, {args.data}")


def patch_labels(label, side, grid):
    """(H, W) labels -> (grid, grid): each patch's majority label among non-255 pixels (255 if none),
    after a nearest resize of the label map to the (side, side) network input."""
    lab = F.interpolate(label[None, None].float(), (side, side), mode="nearest")[0, 0].long()
    p = side // grid
    lab = lab.reshape(grid, p, grid, p).permute(0, 2, 1, 3).reshape(grid * grid, p * p)  # (g*g, p*p)
    counts = F.one_hot(lab.clamp(max=255), 256)[..., :255].sum(1)       # (g*g, 255), 255 not counted
    return torch.where(counts.sum(1) > 0, counts.argmax(1), 255).reshape(grid, grid)


def feature_extractor(args, m, task):
    """The frozen image backbone's features (Sec. 4.3 probes the backbones), the same kind for every
    --features choice: the tokens out of the last transformer block, before any neck, head or
    projection. samclip: the merged encoder's forward_tokens; sam: the same of SAM's encoder; clip:
    the image tower's last block before ln_post and proj (its class token dropped). Width C: the
    backbone's (768 for ViT-B, 1024 for CLIP ViT-L/14), not the text-embedding size nor SAM's
    256-channel neck. cls: the mean of the patch tokens, (B, C); one pooling rule for all three, as
    ViT-Det has no class token. seg: per patch, (B, g, g, C). Classification inputs are centre-cropped.
    -> (input side, patch size, fn(list of PIL) -> features)."""
    dev = args.device
    crop = center_square if task == "cls" else (lambda im: im)
    if args.features == "clip":
        if not args.clip_checkpoint:
            raise ValueError("--features clip needs --clip-checkpoint (an OpenCLIP / OpenAI CLIP file)")
        teacher = clip.load_clip(args.clip_checkpoint)
        tower, side, p = teacher.visual.to(dev), teacher.config.image_size, teacher.config.patch_size

        def tokens(imgs):                                                # at CLIP's own native size
            x = torch.stack([data.square_resize(crop(im), side, data.normalize_clip) for im in imgs]).to(dev)
            t = tower.forward_tokens(x)[:, 1:]                           # (B, 1 + g*g, C) -> (B, g*g, C)
            return t.reshape(len(imgs), side // p, side // p, -1)        # (B, g*g, C) -> (B, g, g, C)
    else:
        if args.features == "sam" and not args.sam_checkpoint:
            raise ValueError("--features sam needs --sam-checkpoint (an official SAM file, e.g. sam_vit_b_01ec64.pth)")
        enc = vit_det.load_sam_encoder(args.sam_checkpoint).to(dev) if args.features == "sam" else m.encoder
        side, p = scaled(args.resolution or (224 if task == "cls" else 448), enc), enc.cfg.patch_size

        def tokens(imgs):
            x = torch.stack([data.square_resize(crop(im), side) for im in imgs]).to(dev)  # (B, 3, side, side)
            return enc.forward_tokens(x)                                 # (B, g, g, C)

    def extract(imgs):
        f = tokens(imgs)                                                 # (B, g, g, C)
        return f.mean((1, 2)) if task == "cls" else f                    # cls: (B, g, g, C) -> (B, C)
    return side, p, extract


@torch.no_grad()
def cmd_probe(args):
    """Extract frozen features once, split the images (seeded), train a linear layer on the
    standardised features of the training images, report top-1/5 or mIoU on the others. Every
    backbone gives the same kind of feature, its last transformer block's tokens (the paper probes
    "frozen image backbones" without naming the layer); image features are the mean of the patch
    tokens, patch labels the majority vote; AdamW (weight decay 1e-4), batches of 1024 rows."""
    cls = args.task == "cls"
    items, names = read_image_folder(args.data) if cls else read_segmentation(args.data, "generic", None)
    items = items[:args.limit] if args.limit else items
    if len(items) < 2:
        raise LayoutError(f"{args.data}: a probe needs at least 2 images (one to train, one to test)")
    K, m = len(names), load_model(args)
    side, p, extract = feature_extractor(args, m, args.task)
    g = side // p
    feats, targets = [], []                                              # per image: (1 or g*g, F), (1 or g*g,)
    for chunk, imgs in batches(items, lambda it: data.load_image(it[0]), args.batch_size, f"{args.features} features"):
        f = extract(imgs).float().cpu()
        for i, (_, target) in enumerate(chunk):
            feats.append(f[i].reshape(-1, f.shape[-1]))                  # (F,) or (g, g, F) -> (1 or g*g, F)
            targets.append(torch.tensor([target]) if cls else patch_labels(read_label(target, K), side, g).reshape(-1))
    # split by image, so patches of one image never straddle train and test
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(items), generator=gen).tolist()
    n_train = min(len(items) - 1, max(1, round(args.train_fraction * len(items))))
    train, test = order[:n_train], order[n_train:]
    X, y = torch.cat([feats[i] for i in train]), torch.cat([targets[i] for i in train])  # (N, F), (N,)
    X, y = X[y != 255], y[y != 255]
    mu, sd = X.mean(0), X.std(0).nan_to_num(1.0).clamp(min=1e-6)        # standardise with train statistics
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(X.shape[1], K)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in tqdm(range(args.epochs), desc="linear probe"):
            for idx in torch.randperm(len(X), generator=gen).split(1024):
                loss = F.cross_entropy(head((X[idx] - mu) / sd), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    results = {"features": args.features, "task": args.task, "num_train": len(train), "num_test": len(test)}
    conf = torch.zeros(K, K, dtype=torch.int64)
    logits = [head((feats[i] - mu) / sd) for i in test]                  # (1 or g*g, K) per test image
    show = visualizer(args)
    for j, i in enumerate(test):
        if cls:
            panels = [zero_shot.text_panel(names[int(logits[j].argmax())]), zero_shot.text_panel(names[items[i][1]])]
        else:
            gt = read_label(items[i][1], K)
            lg = logits[j].T.reshape(1, K, g, g)                         # (g*g, K) -> (1, K, g, g)
            pred = F.interpolate(lg, gt.shape, mode="bilinear", align_corners=False)[0].argmax(0)  # (H, W)
            conf += metrics.confusion_matrix(pred, gt, K)
            panels = [zero_shot.colorize(pred), zero_shot.colorize(gt)]
        show(f"{j:04d}", [lambda: data.load_image(items[i][0])] + panels)
    if cls:
        acc = metrics.topk_accuracy(torch.cat(logits), torch.cat([targets[i] for i in test]))
        results |= {"top1": acc[1], "top5": acc[5]}
    else:
        mean, per_class = metrics.miou(conf)
        results |= {"mIoU": 100 * mean, "per_class_IoU": {n: 100 * float(v) for n, v in zip(names, per_class)}}
    return finish(args, results, f"linear probe ({args.task}, {args.features} features), {args.data}")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def command(name, fn, help, res=None):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        p.add_argument("--checkpoint", required=True, help="merged SAM-CLIP checkpoint (model.SAMCLIP.save / train.py)")
        p.add_argument("--data", required=True, help="dataset folder (layouts: python evaluate.py --help)")
        p.add_argument("--out", help="write the results as JSON here (visualisations go to <stem>_vis/ beside it)")
        p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0: all)")
        p.add_argument("--batch-size", type=int, default=16, help="images per forward")
        p.add_argument("--visualize", type=int, default=0, help="save K PNGs: image | prediction | ground truth")
        p.add_argument("--device", default=dev, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice (point prompts, probe split)")
        p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (model.autocast)")
        p.add_argument("--compile", action="store_true", help="torch.compile the encoder blocks and HeadCLIP")
        if res is not None:
            p.add_argument("--resolution", type=int, default=res,
                           help=f"input side in the paper's pixels (default {res})")
        return p

    command("classify", cmd_classify, "zero-shot classification on DIR/<class>/*.jpg (Table 1)", 336)
    command("retrieve", cmd_retrieve, "zero-shot image-text retrieval, DIR/images + DIR/captions.json (Table 1)", 336)
    p = command("semseg", cmd_semseg,
                "zero-shot semantic segmentation, 448 px HeadCLIP (Table 2) or --refine sam (Table 5)", 448)
    p.add_argument("--layout", choices=["voc", "generic"], default="generic", help="dataset layout (README)")
    p.add_argument("--split", default="val", help="VOC: ImageSets/Segmentation/<split>.txt")
    p.add_argument("--refine", choices=["none", "sam"], default="none", help="sam: Table 5, HeadSAM refines at 1024 px")
    p.add_argument("--bg-threshold", type=float, default=0.5,
                   help="VOC: background where the best foreground softmax probability is below this (default 0.5)")
    p.add_argument("--point-threshold", type=float, default=0.5,
                   help="--refine sam: point prompts from cells whose class probability exceeds this (App. C: 0.5)")
    p.add_argument("--save-predictions", help="folder for predicted label maps (class index PNGs, same stem)")
    p = command("instseg", cmd_instseg, "box-prompted instance segmentation, mask AP (Table 1)")
    p.add_argument("--annotations", help="COCO instances JSON (default DIR/instances.json)")
    p.add_argument("--detections",
                   help="COCO results JSON (image_id, category_id, bbox XYWH, score); default: GT boxes")
    p.add_argument("--save-predictions",
                   help="write a COCO results JSON here (one RLE mask and score per prompt) for pycocotools' "
                        "COCOeval or the LVIS API; required for LVIS files (federated AP is not computed here)")
    p = command("probe", cmd_probe, "linear probe of a frozen backbone's last-block tokens (Tables 3, 4)", None)
    p.add_argument("--task", choices=["cls", "seg"], default="cls", help="cls: image folder, seg: generic segmentation")
    p.add_argument("--features", choices=["samclip", "sam", "clip"], default="samclip",
                   help="whose frozen backbone, always its last block's tokens: the merged encoder, SAM's "
                        "encoder (--sam-checkpoint) or a CLIP image tower (--clip-checkpoint)")
    p.add_argument("--resolution", type=int, default=None, help="input side, paper's pixels (default 224 cls, 448 seg)")
    p.add_argument("--clip-checkpoint", help="OpenCLIP / OpenAI CLIP file for --features clip (run at its native size)")
    p.add_argument("--sam-checkpoint", help="official SAM file for --features sam")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of the images (seeded split) to train on")
    p.add_argument("--epochs", type=int, default=100, help="passes over the training features")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the linear layer")
    args = ap.parse_args(argv)
    try:
        with model.autocast(args.device, args.dtype):
            return args.func(args)
    except (LayoutError, data.ImageError, weights.CheckpointError, ValueError) as e:
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
