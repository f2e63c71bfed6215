"""Evaluate a merged SAM-CLIP checkpoint with the paper's zero-shot protocols (Sec. 4.2-4.4).

One subcommand per protocol; each prints a table and, with --out, writes a JSON of its results
(percent). Each cmd_<name> below says how it follows the paper; speed and memory: bench.py; the
metrics: metrics.py.

  classify  zero-shot classification, Table 1 (ImageNet, v2, Places365), 336 px -> top1, top5
  retrieve  zero-shot image-text retrieval, Table 1 (Flickr30K, COCO), 336 px -> t2i/i2t R@1/5/10
  semseg    zero-shot semantic segmentation, Table 2 (VOC, Context, ADE20k, COCO-Stuff), 448 px
            square input; `--refine sam` is Table 5 (HeadSAM refines at 1024 px) -> mIoU, per class
  instseg   box-prompted instance segmentation, Table 1 (COCO; LVIS via --save-predictions and the
            LVIS API), COCOeval's rules without pycocotools -> AP, AP50, AP75, mIoU_prompted
  probe     linear probing of frozen backbones, Tables 3 and 4: the merged encoder, SAM's or a CLIP
            tower, each on its last block's tokens at its own resolution, fit on --train-data and
            scored on --data (PROBE_PROTOCOL) -> top1/top5 (--task cls) or mIoU (--task seg)

Run (every flag has --help):
  python evaluate.py classify --checkpoint m.pt --data imagenet_val/ --out cls.json
  python evaluate.py retrieve --checkpoint m.pt --data flickr30k/ --out ret.json
  python evaluate.py semseg   --checkpoint m.pt --data VOCdevkit/VOC2012 --layout voc --out voc.json
  python evaluate.py semseg   --checkpoint m.pt --data ade/ --layout generic [--refine sam]
  python evaluate.py instseg  --checkpoint m.pt --data coco_val/ [--detections dets.json] \\
                              [--save-predictions p.json]
  python evaluate.py probe    --checkpoint m.pt --train-data voc_train/ --data voc_val/ \\
                              --task seg --features sam --sam-checkpoint s.pth
Every subcommand also takes --limit N, --batch-size, --visualize K (K PNGs "image | prediction |
ground truth" in <out stem>_vis/ next to the JSON), --device, --dtype and --seed.

Dataset layouts: README ("Evaluation") and the read_* functions; a missing part is reported in one
line naming it (exit code 2). Choices the paper leaves open are stated where they are made
(to_labels, cmd_semseg, cmd_instseg, metrics.match_detections, cmd_probe).

Resolutions are in the paper's pixels for the 1024 px vit_b model; smaller presets scale them
(`scaled`).

Shape legend: B batch, K classes, D embedding size, h w HeadCLIP / SAM grid, H W label (original
image) size, S the encoder's native side, N prompts (boxes) or texts, G ground-truth objects;
probe: C a backbone's width, g its own token grid, grid the common grid of --grid.
"""

import argparse
import json
import math
import os
import re
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
    """A paper resolution for model or encoder `m` (vit_det.scaled_side: the identity at full
    size)."""
    return vit_det.scaled_side(res, getattr(m.cfg, "encoder", m.cfg))


def center_square(img):
    """The largest centred square crop: with square_resize this is CLIP's resize + centre crop."""
    s = min(img.size)
    left = (img.width - s) // 2
    top = (img.height - s) // 2
    return img.crop((left, top, left + s, top + s))


def image_files(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(data.IMAGE_EXTENSIONS))


def read_label(path, num_classes=None):
    """A label PNG -> (H, W) int64 tensor of class indices. Palette ('P') PNGs give their palette
    indices, single-channel ones their values; an RGB label map is refused."""
    need(path, "label map for this image")
    img = Image.open(path)
    if img.mode not in ("P", "L") and not img.mode.startswith("I"):
        raise LayoutError(
            f"{path}: label map must hold class indices (palette or one channel), got mode "
            f"{img.mode}"
        )
    lab = torch.from_numpy(np.array(img).astype(np.int64))
    bad = lab[(lab != 255) & (lab >= num_classes)] if num_classes else lab[:0]
    if len(bad):
        raise LayoutError(
            f"{path}: class index {int(bad[0])} but only {num_classes} classes are named"
        )
    return lab


def batches(items, load, batch_size, desc):
    """Yield (items, loaded) per batch under one progress bar; files are decoded by 4 threads."""
    with ThreadPoolExecutor(4) as pool, tqdm(total=len(items), desc=desc, unit="img") as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            yield chunk, list(pool.map(load, chunk))
            bar.update(len(chunk))


def load_first(item):
    """The image of an (image path, target) item."""
    return data.load_image(item[0])


def load_model(args):
    m = model.compile_modules(model.SAMCLIP.load(args.checkpoint).to(args.device), args.compile)
    print(
        f"evaluate.py: {args.checkpoint} (encoder {m.cfg.encoder.img_size} px, "
        f"patch {m.cfg.encoder.patch_size}) on {args.device}"
    )
    return m


def nan_to_none(value):
    """`value` with every non-finite float, in nested dicts and lists, replaced by None."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, results):
    """JSON with NaN (a class or category without ground truth) written as null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(nan_to_none(results), f, indent=1)
    print(f"wrote {path}")


def finish(args, results, title):
    """Print the results as a table (one level of nesting, e.g. per-class IoU) and write the
    JSON."""
    print(f"\n{title}")
    for k, v in results.items():
        for name, x in (v.items() if isinstance(v, dict) else [(k, v)]):
            pad = "    " if isinstance(v, dict) else "  "
            print(f"{pad}{name:<24} " + (f"{x:8.2f}" if isinstance(x, float) else f"{x!s:>8}"))
    if args.out:
        write_json(args.out, results)
    return results


class Visualizer:
    """show = Visualizer(args); show(name, panels[, titles]) saves the first --visualize calls as
    <out stem>_vis/<name>.png and ignores the rest. A panel may be a function that draws it, so
    the calls past the limit cost nothing."""

    def __init__(self, args):
        self.folder = os.path.splitext(args.out or f"{args.command}.json")[0] + "_vis"
        self.limit = args.visualize
        self.saved = 0

    def __call__(self, name, panels, *titles):
        if self.saved < self.limit:
            pictures = [p() if callable(p) else p for p in panels]
            zero_shot.save_panels(os.path.join(self.folder, f"{name}.png"), pictures, *titles)
            self.saved += 1


# ----------------------------------------------------------------------------- dataset layouts

WORDNET_ID = re.compile(r"n\d{8}")  # ImageNet's class folders: n01440764, ...


def read_image_folder(root, readable_names=False):
    """DIR/<class>/*.jpg -> ([(path, label)], class names); label k is the k-th folder in sorted
    order. --limit takes the list in round-robin class order, so a quick look sees every class.
    Names (class_names): DIR/classnames.txt, else ImageNet's DIR/LOC_synset_mapping.txt for
    folders named by WordNet ID, else the folder names. readable_names (classify, where names
    become prompts): WordNet-ID folders with neither file are refused."""
    folders = class_folders(root)
    items = [
        (r, k, os.path.join(root, c, f))
        for k, c in enumerate(folders)
        for r, f in enumerate(image_files(os.path.join(root, c)))
    ]
    if not items:
        raise LayoutError(f"{root}/<class>/*.jpg not found: the class folders hold no images")
    return [(p, k) for _, k, p in sorted(items)], class_names(root, folders, readable_names)


def class_folders(root):
    """The sorted class sub-folders of DIR/<class>/*.jpg (hidden ones skipped)."""
    need(root, "dataset folder (DIR/<class>/*.jpg)")
    folders = sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )
    if not folders:
        raise LayoutError(
            f"{root}/<class>/ not found: no class sub-folders (expected DIR/<class>/*.jpg)"
        )
    return folders


def class_names(root, folders, readable_names):
    """One readable name per class folder. ImageNet's validation layout names its folders by
    WordNet ID; as a prompt ("a photo of a n01440764.") such a name scores near chance without
    a word of warning, so classify refuses it unless the names are supplied."""
    txt = os.path.join(root, "classnames.txt")
    if os.path.isfile(txt):
        # one format for every class list of the repository (classes.txt too): line i names class i
        with open(txt, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) != len(folders):
            raise LayoutError(
                f"{txt}: {len(lines)} names for {len(folders)} class folders "
                "(want one readable name per line, in sorted folder order)"
            )
        return lines
    wordnet = [c for c in folders if WORDNET_ID.fullmatch(c)]
    mapping = os.path.join(root, "LOC_synset_mapping.txt")
    if wordnet and os.path.isfile(mapping):
        return read_synset_mapping(mapping, folders)
    if wordnet and readable_names:
        raise LayoutError(
            f"{root}: {len(wordnet)} class folders are WordNet IDs ({wordnet[0]}, "
            f"...), which would be prompted as 'a photo of a {wordnet[0]}.': put "
            "ImageNet's LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca' "
            "lines) or a classnames.txt (one readable name per line, in sorted "
            "folder order) in that folder"
        )
    return [c.replace("_", " ") for c in folders]


def read_synset_mapping(path, folders):
    """ImageNet's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line) -> the first
    name of each folder's list, in folder order ("tench"). OpenAI's hand-cleaned ImageNet names
    (CLIP's prompt-engineering notebook) score higher; supply them as classnames.txt."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, synonyms = line.strip().partition(" ")
            names[wnid] = synonyms.split(",")[0].strip()
    missing = [c for c in folders if not names.get(c)]
    if missing:
        raise LayoutError(
            f"{path}: no name for class folder {missing[0]} ({len(missing)} folders "
            "unnamed; want one 'n01440764 tench, Tinca tinca' line per folder)"
        )
    return [names[c] for c in folders]


def read_captions(root):
    """DIR/images + DIR/captions.json -> (image paths, captions, image index of each caption).
    Images without a caption are dropped (they would have no right answer in image->text)."""
    img_dir = need(os.path.join(root, "images"), "folder of the images named in captions.json")
    captions_file = need(os.path.join(root, "captions.json"), "COCO-style captions file")
    with open(captions_file, encoding="utf-8") as f:
        js = json.load(f)
    if "images" not in js or "annotations" not in js:
        raise LayoutError(f"{root}/captions.json: needs 'images' and 'annotations' lists")
    by_image = defaultdict(list)
    try:
        for a in js["annotations"]:
            by_image[a["image_id"]].append(a["caption"])
        images = [im for im in js["images"] if by_image[im["id"]]]
        paths = [
            need(os.path.join(img_dir, im["file_name"]), "image listed in captions.json")
            for im in images
        ]
    except KeyError as e:
        raise LayoutError(f"{root}/captions.json: an entry has no {e} field") from None
    caps = [(c, i) for i, im in enumerate(images) for c in by_image[im["id"]]]
    return paths, [c for c, _ in caps], [i for _, i in caps]


# fmt: off
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "dining table", "dog", "horse", "motorbike", "person",
               "potted plant", "sheep", "sofa", "train", "tv monitor"]
# fmt: on


def read_segmentation(root, layout, split):
    """-> ([(image path, label path)], class names). For VOC, names[0] is 'background'."""
    need(root, "dataset folder")
    if layout == "voc":
        ids_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        need(ids_file, "list of image ids")
        for sub in ("JPEGImages", "SegmentationClass"):
            need(
                os.path.join(root, sub),
                "a VOC folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)",
            )
        with open(ids_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        pairs = [
            (
                os.path.join(root, "JPEGImages", i + ".jpg"),
                os.path.join(root, "SegmentationClass", i + ".png"),
            )
            for i in ids
        ]
        names = VOC_CLASSES
    else:
        img_dir = os.path.join(root, "images")
        lab_dir = os.path.join(root, "labels")
        classes_file = os.path.join(root, "classes.txt")
        need(img_dir, "generic layout: DIR/images, DIR/labels, DIR/classes.txt")
        need(lab_dir, "generic layout: DIR/labels/<image stem>.png")
        with open(need(classes_file, "one class name per line"), encoding="utf-8") as f:
            names = f.read().rstrip().split("\n")  # line i = class i
        pairs = [
            (os.path.join(img_dir, f), os.path.join(lab_dir, os.path.splitext(f)[0] + ".png"))
            for f in image_files(img_dir)
        ]
    if not pairs:
        raise LayoutError(f"{root}: no images listed")
    for img, lab in pairs:
        need(img, "image")
        need(lab, "label map of an image")
    return pairs, names


LVIS_IMAGE_KEYS = ("not_exhaustive_category_ids", "neg_category_ids")  # LVIS's federated labels


def read_instances(root, annotations, allow_lvis=False):
    """COCO instances JSON -> (images [{id, path, height, width}] sorted by id; annotations per
    image id, crowds (iscrowd=1) last, both as COCOeval orders them; {category id: name}; is it
    LVIS). LVIS files (not-exhaustive / negative category lists, frequencies) are refused unless
    allow_lvis: their AP is federated. LVIS images without a file_name are found by their
    coco_url's name."""
    need(root, "dataset folder")
    img_dir = need(os.path.join(root, "images"), "folder of the images named in the instances JSON")
    ann_file = annotations or os.path.join(root, "instances.json")
    with open(need(ann_file, "COCO instances JSON (--annotations)"), encoding="utf-8") as f:
        js = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in js:
            raise LayoutError(f"{ann_file}: no '{key}' list")
    lvis = any(k in im for im in js["images"] for k in LVIS_IMAGE_KEYS) or any(
        "frequency" in c for c in js["categories"]
    )
    if lvis and not allow_lvis:
        raise LayoutError(
            f"{ann_file}: an LVIS file, whose AP is federated (not-exhaustive and negative "
            "categories) and not computed here: add --save-predictions FILE and score FILE with "
            "the LVIS API (github.com/lvis-dataset/lvis-api)"
        )

    def file_name(im):
        if lvis and "file_name" not in im:
            return os.path.basename(im["coco_url"])
        return im["file_name"]

    anns = defaultdict(list)
    try:
        images = []
        for im in sorted(js["images"], key=lambda im: im["id"]):
            path = need(os.path.join(img_dir, file_name(im)), "image of the instances JSON")
            images.append(dict(im, path=path))
        # a stable sort: crowds last, each group in file order
        for a in sorted(js["annotations"], key=lambda a: bool(a.get("iscrowd", 0))):
            ann = {k: a[k] for k in ("category_id", "bbox", "segmentation")}
            ann["iscrowd"] = bool(a.get("iscrowd", 0))
            anns[a["image_id"]].append(ann)
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
    items, names = read_image_folder(args.data, readable_names=True)
    items = items[: args.limit] if args.limit else items
    m = load_model(args)
    res = scaled(args.resolution, m)
    class_emb = zero_shot.class_embeddings(m, names)  # (K, D)
    logits = []
    labels = []
    show = Visualizer(args)
    for chunk, imgs in batches(items, load_first, args.batch_size, "classify"):
        x = [data.square_resize(center_square(im), res) for im in imgs]  # B x (3, r, r)
        x = torch.stack(x).to(args.device)  # (B, 3, r, r)
        lg = (F.normalize(m.encode_image(x).float(), dim=-1) @ class_emb.T).cpu()  # (B, K)
        logits.append(lg)
        labels += [k for _, k in chunk]
        for im, (path, k), p in zip(imgs, chunk, lg.argmax(1).tolist()):
            stem = os.path.splitext(os.path.basename(path))[0]
            panels = [im, zero_shot.text_panel(names[p]), zero_shot.text_panel(names[k])]
            show(f"{k:03d}_{stem}", panels)
    acc = metrics.topk_accuracy(torch.cat(logits), torch.tensor(labels))
    results = {
        "top1": acc[1],
        "top5": acc[5],
        "num_images": len(labels),
        "num_classes": len(names),
        "resolution": res,
    }
    return finish(args, results, f"zero-shot classification, {args.data}")


@torch.no_grad()
def cmd_retrieve(args):
    """Table 1, zero-shot retrieval at --resolution (Sec. 4.2: 336 px, as classification): one
    cosine matrix between all captions and all images, read by rows (text -> image) and by
    columns (image -> text, right if any of its captions ranks)."""
    paths, caps, owner = read_captions(args.data)
    if args.limit:
        paths = paths[: args.limit]
        caps, owner = zip(*[(c, i) for c, i in zip(caps, owner) if i < len(paths)])
    m = load_model(args)
    res = scaled(args.resolution, m)
    ctx = m.cfg.clip.context_length
    img_emb = []
    txt_emb = []
    pics = []
    for chunk, imgs in batches(paths, data.load_image, args.batch_size, "images"):
        x = [data.square_resize(center_square(im), res) for im in imgs]  # B x (3, r, r)
        x = torch.stack(x).to(args.device)  # (B, 3, r, r)
        img_emb.append(F.normalize(m.encode_image(x).float(), dim=-1).cpu())
        pics += imgs[: max(0, args.visualize - len(pics))]

    def encode(tokens):  # (n, L) of one length -> (n, D); causal, so the padding can go
        return m.encode_text(tokens.to(args.device))

    for i in tqdm(range(0, len(caps), args.batch_size), desc="captions"):
        tok = clip.tokenize(caps[i : i + args.batch_size], ctx)  # (B, L)
        emb = clip.encode_text_by_length(encode, tok)  # (B, D)
        txt_emb.append(F.normalize(emb.float(), dim=-1).cpu())
    sim = torch.cat(txt_emb) @ torch.cat(img_emb).T  # (N_text, N_img)
    right = F.one_hot(torch.tensor(owner), len(paths)).bool()  # (N_text, N_img)
    t2i = metrics.recall_at_k(sim, right)
    i2t = metrics.recall_at_k(sim.T, right.T)
    show = Visualizer(args)
    for i, im in enumerate(pics):
        best = zero_shot.text_panel(caps[int(sim[:, i].argmax())])
        truth = zero_shot.text_panel(caps[owner.index(i)])
        show(
            f"{i:04d}", [im, best, truth], ["image", "best caption (i2t)", "a ground-truth caption"]
        )
    results = {f"t2i_R@{k}": v for k, v in t2i.items()}
    results |= {f"i2t_R@{k}": v for k, v in i2t.items()}
    results |= {"num_images": len(paths), "num_texts": len(caps), "resolution": res}
    return finish(args, results, f"zero-shot retrieval, {args.data}")


def to_labels(logits, with_background, bg_threshold):
    """(K, H, W) class logits -> (H, W) labels. With a background class (VOC), the logits are the
    K foreground classes, labels shift by one and a pixel whose best softmax probability among them
    is below bg_threshold becomes 0, background (GroupViT's rule). GroupViT uses 0.95 on its peaky
    group-token probabilities; for patch logits the default is 0.5, "no foreground class holds a
    majority": a knob of the protocol, not a number from the paper."""
    if not with_background:
        return logits.argmax(0)
    prob, idx = logits.softmax(0).max(0)  # (H, W), (H, W)
    return torch.where(prob < bg_threshold, 0, idx + 1)


@torch.no_grad()
def cmd_semseg(args):
    """Table 2 (Sec. 4.2): 448 px square input, per-patch HeadCLIP logits, bilinear upsampling to
    the label map, argmax. Table 5 (Sec. 4.4, App. C) with --refine sam, one image at a time:
    HeadSAM decodes every class (zero_shot.refine_with_sam), but only classes that win a pixel of
    HeadCLIP's own 1024 px map compete in the per-pixel argmax; a pixel no refined mask covers
    (logit <= 0) is background on VOC and keeps HeadCLIP's label on other layouts (our choices)."""
    pairs, names = read_segmentation(args.data, args.layout, args.split)
    pairs = pairs[: args.limit] if args.limit else pairs
    voc = args.layout == "voc"
    m = load_model(args)
    # VOC: the 20 foreground classes
    class_emb = zero_shot.class_embeddings(m, names[1:] if voc else names)  # (K', D)
    K = len(names)
    S = m.cfg.encoder.img_size
    res = scaled(args.resolution, m)
    conf = torch.zeros(K, K, dtype=torch.int64)
    gen = torch.Generator().manual_seed(args.seed)  # point prompts of --refine sam
    show = Visualizer(args)

    def load(pair):
        return data.load_image(pair[0]), read_label(pair[1], K)

    batch_size = 1 if args.refine == "sam" else args.batch_size
    for chunk, loaded in batches(pairs, load, batch_size, "semseg"):
        if args.refine == "none":  # Table 2: 448 px, HeadCLIP only
            x = torch.stack([data.square_resize(im, res) for im, _ in loaded])  # (B, 3, 448, 448)
            logits = zero_shot.dense_logits(m, x.to(args.device), class_emb)  # (B, K', 28, 28)
        for b, ((img, gt), (img_path, _)) in enumerate(zip(loaded, chunk)):
            H, W = gt.shape
            if args.refine == "none":
                up = F.interpolate(logits[b : b + 1], (H, W), mode="bilinear", align_corners=False)
                pred = to_labels(up[0], voc, args.bg_threshold)  # (1, K', H, W) -> (H, W)
            else:  # Table 5: both heads, 1024 px
                x, input_size = data.sam_preprocess(img, S)  # (3, S, S), (h', w')
                masks, coarse = zero_shot.refine_with_sam(
                    m,
                    x[None].to(args.device),
                    class_emb,
                    threshold=args.point_threshold,
                    generator=gen,
                    input_size=input_size,
                )  # (K', 4h, 4w), (K', h, w)
                # both back to the image: (K', ., .) -> (K', H, W)
                coarse = heads.postprocess_masks(coarse[None], input_size, (H, W), img_size=S)[0]
                masks = heads.postprocess_masks(masks[None], input_size, (H, W), img_size=S)[0]
                coarse_pred = to_labels(coarse, voc, args.bg_threshold)  # HeadCLIP's answer, (H, W)
                found = coarse_pred[coarse_pred > 0] - 1 if voc else coarse_pred
                present = torch.zeros(len(class_emb), dtype=torch.bool, device=masks.device)
                present[found.unique()] = True  # only classes HeadCLIP found compete
                sam = masks.masked_fill(~present[:, None, None], float("-inf"))
                best, idx = sam.max(0)  # (H, W)
                # a pixel no refined mask claims (logit <= 0) is background on VOC and keeps
                # HeadCLIP's label elsewhere
                if voc:
                    pred = torch.where(best > 0, idx + 1, 0)
                else:
                    pred = torch.where(best > 0, idx, coarse_pred)
            pred = pred.cpu()
            conf += metrics.confusion_matrix(pred, gt, K)
            stem = os.path.splitext(os.path.basename(img_path))[0]
            if args.save_predictions:
                os.makedirs(args.save_predictions, exist_ok=True)
                label_map = Image.fromarray(pred.numpy().astype(np.uint8), mode="L")
                label_map.save(os.path.join(args.save_predictions, stem + ".png"))
            show(stem, [img, zero_shot.colorize(pred), zero_shot.colorize(gt)])
    mean, per_class = metrics.miou(conf)
    results = {
        "mIoU": 100 * mean,
        "pixel_accuracy": 100 * conf.diagonal().sum().item() / max(1, conf.sum().item()),
        "per_class_IoU": {n: 100 * float(v) for n, v in zip(names, per_class)},
        "num_images": len(pairs),
        "layout": args.layout,
        "refine": args.refine,
        "resolution": S if args.refine == "sam" else res,
    }
    if voc:
        results["bg_threshold"] = args.bg_threshold
    return finish(args, results, f"zero-shot semantic segmentation, {args.data}")


@torch.no_grad()
def cmd_instseg(args):
    """Table 1, box-prompted instance segmentation: SAM's resize + pad to the native side, one
    encoder forward per batch, then every box of an image through HeadSAM in one decoder call.
    Mask AP by COCOeval's rules (segm, all areas, 100 detections per image and category), crowd
    regions as ignored ground truth. --save-predictions writes one mask per prompt as a COCO
    results JSON for COCOeval (or the LVIS API). Ground-truth boxes: one mask per object, ranked
    by HeadSAM's predicted IoU. PIL fills polygons (pycocotools' boundary pixels differ; RLE gives
    its AP exactly)."""
    allow_lvis = bool(args.save_predictions)
    images, anns, cats, lvis = read_instances(args.data, args.annotations, allow_lvis)
    images = images[: args.limit] if args.limit else images
    dets = None
    if args.detections:
        dets = defaultdict(list)
        with open(need(args.detections, "COCO results JSON (--detections)")) as f:
            detections = json.load(f)
        for d in detections:
            if not all(k in d for k in ("image_id", "category_id", "bbox", "score")):
                raise LayoutError(
                    f"{args.detections}: a detection lacks image_id, category_id, bbox or score"
                )
            dets[d["image_id"]].append(d)
    m = load_model(args)
    S = m.cfg.encoder.img_size
    # category -> [(scores (N,), ious (N, G), crowd (G,)) per image]
    records = {c: [] for c in cats}
    prompted = []
    predictions = []
    show = Visualizer(args)

    def load(info):
        return data.load_image(info["path"])

    for chunk, imgs in batches(images, load, args.batch_size, "instseg"):
        xs, sizes = zip(*[data.sam_preprocess(im, S) for im in imgs])  # B x (3, S, S), (h', w')
        emb = m.encoder(torch.stack(xs).to(args.device))  # (B, C', h, w)
        for b, (info, img) in enumerate(zip(chunk, imgs)):
            H = img.height
            W = img.width
            gts = anns[info["id"]]  # regular objects first, crowds last
            crowd = torch.tensor([a["iscrowd"] for a in gts], dtype=torch.bool)  # (G,)
            gt_masks = torch.zeros(0, H, W, dtype=torch.bool)  # (G, H, W)
            if gts:
                gt_masks = torch.stack([decode_mask(a["segmentation"], H, W) for a in gts])
            prompts = [a for a in gts if not a["iscrowd"]] if dets is None else dets[info["id"]]
            boxes = torch.tensor([p["bbox"] for p in prompts], dtype=torch.float32)
            boxes = boxes.reshape(-1, 4)  # (N, 4) XYWH
            boxes[:, 2:] += boxes[:, :2]  # -> x0, y0, x1, y1
            boxes *= torch.tensor([sizes[b][1] / W, sizes[b][0] / H] * 2)  # into the resized frame
            if len(prompts):
                low, iou = m.head_sam(
                    emb[b : b + 1], boxes=boxes.to(args.device), multimask_output=False
                )  # (N, 1, 4h, 4w), (N, 1)
                masks = heads.postprocess_masks(low, sizes[b], (H, W), img_size=S)  # (N, 1, H, W)
                masks = masks[:, 0].cpu() > 0  # (N, H, W)
                # with ground-truth boxes every object gets one mask; HeadSAM's IoU guess ranks
                # them. float64 scores: the values COCOeval reads back from the results JSON
                if dets is None:
                    scores = iou[:, 0].cpu().double()
                else:
                    scores = torch.tensor([p["score"] for p in prompts], dtype=torch.float64)
            else:
                masks = torch.zeros(0, H, W, dtype=torch.bool)
                scores = torch.zeros(0, dtype=torch.float64)
            ious = metrics.mask_iou(masks, gt_masks, crowd)  # (N, G), crowd rule on crowd columns
            if dets is None:
                prompted += ious.diagonal().tolist()  # prompt i is object i (regular first)
            p_cat = torch.tensor([p["category_id"] for p in prompts], dtype=torch.long)
            g_cat = torch.tensor([a["category_id"] for a in gts], dtype=torch.long)
            for c in set(p_cat.tolist()) | set(g_cat.tolist()):  # per image and category
                if c not in records:
                    raise LayoutError(
                        f"category_id {c} (image {info['id']}) is not in the categories list"
                    )
                pred_c = p_cat == c
                gt_c = g_cat == c
                records[c].append(
                    (scores[pred_c].numpy(), ious[pred_c][:, gt_c].numpy(), crowd[gt_c].numpy())
                )
            for p, mk, sc in zip(prompts, masks, scores):
                predictions.append(
                    {
                        "image_id": info["id"],
                        "category_id": p["category_id"],
                        "segmentation": data.rle_encode(mk.numpy()),
                        "score": float(sc),
                    }
                )
            panels = [
                img,
                lambda: zero_shot.overlay(img, masks),
                lambda: zero_shot.overlay(img, gt_masks),
            ]
            show(str(info["id"]), panels)
    results = {
        "mIoU_prompted": 100 * float(np.mean(prompted)) if prompted else float("nan"),
        "num_images": len(images),
        "num_prompts": len(predictions),
        "boxes": "detections" if dets is not None else "ground truth",
        "resolution": S,
    }
    if args.save_predictions:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_predictions)), exist_ok=True)
        with open(args.save_predictions, "w") as f:
            json.dump(predictions, f)
        print(f"wrote {len(predictions)} predictions to {args.save_predictions}")
    if lvis:  # never COCO-style AP on LVIS
        results["AP"] = (
            "not computed: LVIS is scored federated; run the LVIS API on "
            f"{args.save_predictions}"
        )
    else:
        ap, per_cat = metrics.coco_mask_ap(records)
        per_category = {cats[c]: 100 * float(v) for c, v in per_cat.items()}
        results = ap | results | {"per_category_AP": per_category}
    return finish(args, results, f"box-prompted instance segmentation, {args.data}")


def patch_labels(label, side, grid):
    """(H, W) labels -> (grid, grid): each cell's majority label among non-255 pixels (255 if
    none), after a nearest resize of the label map to (side, side), the square the input is
    resized to."""
    lab = F.interpolate(label[None, None].float(), (side, side), mode="nearest")[0, 0].long()
    p = side // grid
    lab = lab.reshape(grid, p, grid, p).permute(0, 2, 1, 3)  # (side, side) -> (g, g, p, p)
    lab = lab.reshape(grid * grid, p * p)  # (g, g, p, p) -> (g*g, p*p)
    counts = F.one_hot(lab.clamp(max=255), 256)[..., :255].sum(1)  # (g*g, 255), 255 not counted
    return torch.where(counts.sum(1) > 0, counts.argmax(1), 255).reshape(grid, grid)


PROBE_GRID = 16  # the common token grid of segmentation probes; why 16: PROBE_PROTOCOL
LABEL_SAMPLES = 16  # label-map samples per grid cell side whose majority is the cell's target

# The probe's protocol, printed by `python evaluate.py probe --help`; the code follows it in
# feature_extractor (features, resolution, pooling) and cmd_probe (splits, targets, fit).
PROBE_PROTOCOL = f"""\
Linear probe of a frozen backbone (Tables 3 and 4): one linear layer is fit on --train-data (the
train split) and scored on --data (the validation split), the paper's standard protocol.
--self-split F fits on a seeded share F of --data's images instead (not the paper's protocol).

The paper states no layer, resolution or grid for its probes; every backbone is probed alike:
  features    its last transformer block's tokens, before any neck, head or projection
  resolution  the side it was trained at: SAM's and SAM-CLIP's encoders 1024 px, 64 x 64 tokens
              (smaller presets: their own side); a CLIP tower its image_size, 224 px (14 x 14
              tokens for ViT-B/16, 16 x 16 for ViT-L/14). Any other side resizes the learned
              position table into a regime the backbone never saw (SAM at 224 px: 64 -> 14), and
              the probe would measure the resize as much as the features. --resolution overrides
              the side of samclip and sam.
  cls         the mean of all its tokens (ViT-Det has no class token); centre-cropped square input
  seg         the tokens area-pooled to one common G x G grid, G = --grid (default {PROBE_GRID}),
              so that every backbone's linear layer reads regions of the same size and is fit on
              the very same targets (each cell's majority label); SAM's 64 x 64 map against CLIP's
              16 x 16 would compare grids, not features. {PROBE_GRID}: the CLIP teacher's (ViT-L/14)
              own grid, and SAM's 64 pools to it exactly (4 x 4 tokens a cell); a ViT-B/16's
              14 x 14 is spread over it (each cell the mean of the 1 or 2 tokens it overlaps).
              The logits are upsampled bilinearly to the label size.
  fit         features standardised with the train statistics; AdamW (weight decay 1e-4), batches
              of 1024 rows, --epochs passes at --lr
"""


def feature_extractor(args, m, task):
    """A frozen backbone's features under PROBE_PROTOCOL -> (input side, native grid g,
    fn(list of PIL) -> features): cls (B, C), the mean of the g x g tokens; seg
    (B, grid, grid, C), the tokens area-pooled to grid = args.grid (0: g). samclip: the merged
    encoder's forward_tokens; sam: the same of SAM's encoder (--sam-checkpoint); clip: the image
    tower's last block before ln_post and proj, its class token dropped (--clip-checkpoint).
    Width C: the backbone's (768 for ViT-B, 1024 for CLIP ViT-L/14), not the text-embedding
    size nor SAM's 256-channel neck."""
    dev = args.device
    crop = center_square if task == "cls" else (lambda im: im)
    if args.features == "clip":
        if not args.clip_checkpoint:
            raise ValueError(
                "--features clip needs --clip-checkpoint (an OpenCLIP / OpenAI CLIP file)"
            )
        if args.resolution:
            raise ValueError(
                "--resolution sets the side of the ViT-Det encoders (--features "
                "samclip or sam); a CLIP tower is probed at its own image_size"
            )
        teacher = clip.load_clip(args.clip_checkpoint)
        tower = teacher.visual.to(dev)
        p = teacher.config.patch_size
        side = teacher.config.image_size  # the side CLIP trained at

        def tokens(imgs):
            x = [data.square_resize(crop(im), side, data.normalize_clip) for im in imgs]
            t = tower.forward_tokens(torch.stack(x).to(dev))[:, 1:]  # (B, 1+g*g, C) -> (B, g*g, C)
            return t.reshape(len(imgs), side // p, side // p, -1)  # (B, g*g, C) -> (B, g, g, C)

    else:
        if args.features == "sam" and not args.sam_checkpoint:
            raise ValueError(
                "--features sam needs --sam-checkpoint (an official SAM file, e.g. "
                "sam_vit_b_01ec64.pth)"
            )
        if args.features == "sam":
            enc = vit_det.load_sam_encoder(args.sam_checkpoint).to(dev)
        else:
            enc = m.encoder
        # the side SAM trained at (its 64 x 64 position table), which SAM-CLIP's encoder keeps
        # and whose HeadCLIP was adapted to (Sec. 3, resolution adaptation)
        side = scaled(args.resolution, enc) if args.resolution else enc.cfg.img_size
        p = enc.cfg.patch_size

        def tokens(imgs):
            x = [data.square_resize(crop(im), side) for im in imgs]  # B x (3, side, side)
            return enc.forward_tokens(torch.stack(x).to(dev))  # (B, g, g, C)

    g = side // p
    grid = args.grid or g

    def extract(imgs):
        f = tokens(imgs)  # (B, g, g, C)
        if task == "cls":
            return f.mean((1, 2))  # (B, g, g, C) -> (B, C)
        f = F.adaptive_avg_pool2d(f.permute(0, 3, 1, 2), grid)  # (B, g, g, C) -> (B, C, grid, grid)
        return f.permute(0, 2, 3, 1)  # (B, C, grid, grid) -> (B, grid, grid, C)

    return side, g, extract


def read_probe_split(root, cls, limit):
    """One split of a probe -> ([(image path, class index or label map path)], class names, the
    list that fixes the class indices: the sorted class folders (cls) or classes.txt (seg))."""
    if cls:
        items, names = read_image_folder(root)
        classes = class_folders(root)
    else:
        items, names = read_segmentation(root, "generic", None)
        classes = names
    return (items[:limit] if limit else items), names, classes


@torch.no_grad()
def cmd_probe(args):
    """Tables 3 and 4, PROBE_PROTOCOL: extract each split's frozen features once, fit a linear
    layer on the standardised --train-data features, report top-1/5 or mIoU on --data."""
    cls = args.task == "cls"
    if args.train_data and args.self_split:
        raise ValueError(
            "give --train-data DIR (the train split) or --self-split F (a seeded "
            "split of --data), not both"
        )
    if not args.train_data and not args.self_split:
        raise ValueError(
            "probe needs --train-data DIR, the split the linear layer is fit on "
            "(--data is the split reported, as in Tables 3 and 4); or --self-split F "
            "to fit on a seeded share F of --data instead (not the paper's protocol)"
        )
    if args.self_split and not 0 < args.self_split < 1:
        raise ValueError(
            f"--self-split {args.self_split}: want a share of --data strictly between 0 and 1"
        )
    items, names, classes = read_probe_split(args.data, cls, args.limit)
    if args.train_data:
        train_items, _, train_classes = read_probe_split(args.train_data, cls, args.limit)
        if train_classes != classes:
            only_train = sorted(set(train_classes) - set(classes))[:3]
            only_data = sorted(set(classes) - set(train_classes))[:3]
            what = f"only in --train-data {only_train}, only in --data {only_data}"
            if not only_train and not only_data:
                what = "the same classes in another order"
            raise LayoutError(
                f"--train-data {args.train_data} and --data {args.data} must name "
                "the same classes in the same order (a class's index is its place): "
                f"{what}"
            )
    elif len(items) < 2:
        raise LayoutError(
            f"{args.data}: --self-split needs at least 2 images (one to fit, one to test)"
        )
    K = len(names)
    m = load_model(args)
    side, g, extract = feature_extractor(args, m, args.task)
    grid = args.grid or g

    def features(split, desc):
        """-> per image: its features (1 or grid*grid, C) and targets (1 or grid*grid,)."""
        feats = []
        targets = []
        for chunk, imgs in batches(split, load_first, args.batch_size, desc):
            f = extract(imgs).float().cpu()  # (B, C) or (B, grid, grid, C)
            for i, (_, target) in enumerate(chunk):
                feats.append(f[i].reshape(-1, f.shape[-1]))  # -> (1 or grid*grid, C)
                if cls:
                    targets.append(torch.tensor([target]))
                else:
                    cells = patch_labels(read_label(target, K), grid * LABEL_SAMPLES, grid)
                    targets.append(cells.reshape(-1))
        return feats, targets

    gen = torch.Generator().manual_seed(args.seed)
    if args.train_data:
        protocol = "train on --train-data, report on --data"
        desc = f"{args.features} features, --train-data"
        train_feats, train_targets = features(train_items, desc)
        test_items = items
        test_feats, test_targets = features(items, f"{args.features} features, --data")
    else:
        feats, targets = features(items, f"{args.features} features, --data")
        # split by image, so patches of one image never straddle train and test
        order = torch.randperm(len(items), generator=gen).tolist()
        n_train = min(len(items) - 1, max(1, round(args.self_split * len(items))))
        protocol = f"seeded split of --data (--self-split {args.self_split}; not the paper's)"
        train_feats = [feats[i] for i in order[:n_train]]
        train_targets = [targets[i] for i in order[:n_train]]
        test_items = [items[i] for i in order[n_train:]]
        test_feats = [feats[i] for i in order[n_train:]]
        test_targets = [targets[i] for i in order[n_train:]]
    X = torch.cat(train_feats)  # (N, C)
    y = torch.cat(train_targets)  # (N,)
    labelled = y != 255
    X = X[labelled]
    y = y[labelled]
    # standardise with the train statistics
    mu = X.mean(0)
    sd = X.std(0).nan_to_num(1.0).clamp(min=1e-6)
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
    results = {
        "features": args.features,
        "task": args.task,
        "protocol": protocol,
        "resolution": side,
        "native_grid": g,
        "grid": None if cls else grid,
        "num_train": len(train_feats),
        "num_test": len(test_feats),
    }
    conf = torch.zeros(K, K, dtype=torch.int64)
    logits = [head((f - mu) / sd) for f in test_feats]  # per test image: (1 or grid*grid, K)
    show = Visualizer(args)
    for j, (path, target) in enumerate(test_items):
        if cls:
            predicted = zero_shot.text_panel(names[int(logits[j].argmax())])
            panels = [predicted, zero_shot.text_panel(names[target])]
        else:
            gt = read_label(target, K)
            lg = logits[j].T.reshape(1, K, grid, grid)  # (grid*grid, K) -> (1, K, grid, grid)
            lg = F.interpolate(lg, gt.shape, mode="bilinear", align_corners=False)  # (1, K, H, W)
            pred = lg[0].argmax(0)  # (H, W)
            conf += metrics.confusion_matrix(pred, gt, K)
            panels = [zero_shot.colorize(pred), zero_shot.colorize(gt)]
        show(f"{j:04d}", [lambda: data.load_image(path)] + panels)
    if cls:
        acc = metrics.topk_accuracy(torch.cat(logits), torch.cat(test_targets))
        results |= {"top1": acc[1], "top5": acc[5]}
    else:
        mean, per_class = metrics.miou(conf)
        results["mIoU"] = 100 * mean
        results["per_class_IoU"] = {n: 100 * float(v) for n, v in zip(names, per_class)}
    title = f"linear probe ({args.task}, {args.features} features), {args.data}"
    return finish(args, results, title)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def command(name, fn, help, res=None, description=None):
        p = sub.add_parser(
            name,
            help=help,
            description=description or help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=fn)
        p.add_argument(
            "--checkpoint",
            required=True,
            help="merged SAM-CLIP checkpoint (model.SAMCLIP.save / train.py)",
        )
        p.add_argument(
            "--data", required=True, help="dataset folder (layouts: python evaluate.py --help)"
        )
        p.add_argument(
            "--out",
            help="write the results as JSON here (visualisations go to <stem>_vis/ beside it)",
        )
        p.add_argument(
            "--limit", type=int, default=0, help="evaluate only the first N images (0: all)"
        )
        p.add_argument("--batch-size", type=int, default=16, help="images per forward")
        p.add_argument(
            "--visualize",
            type=int,
            default=0,
            help="save K PNGs: image | prediction | ground truth",
        )
        p.add_argument(
            "--device", default=dev, help="torch device (default: cuda if available, else cpu)"
        )
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of every random choice (point prompts, probe split)",
        )
        p.add_argument(
            "--dtype",
            choices=("fp32", "bf16"),
            default="fp32",
            help="bf16: autocast (model.autocast)",
        )
        p.add_argument(
            "--compile", action="store_true", help="torch.compile the encoder blocks and HeadCLIP"
        )
        if res is not None:
            p.add_argument(
                "--resolution",
                type=int,
                default=res,
                help=f"input side in the paper's pixels (default {res})",
            )
        return p

    command(
        "classify", cmd_classify, "zero-shot classification on DIR/<class>/*.jpg (Table 1)", 336
    )
    command(
        "retrieve",
        cmd_retrieve,
        "zero-shot image-text retrieval, DIR/images + DIR/captions.json (Table 1)",
        336,
    )
    p = command(
        "semseg",
        cmd_semseg,
        "zero-shot semantic segmentation, 448 px HeadCLIP (Table 2) or --refine sam (Table 5)",
        448,
    )
    p.add_argument(
        "--layout", choices=["voc", "generic"], default="generic", help="dataset layout (README)"
    )
    p.add_argument("--split", default="val", help="VOC: ImageSets/Segmentation/<split>.txt")
    p.add_argument(
        "--refine",
        choices=["none", "sam"],
        default="none",
        help="sam: Table 5, HeadSAM refines at 1024 px",
    )
    p.add_argument(
        "--bg-threshold",
        type=float,
        default=0.5,
        help="VOC: background where the best foreground softmax probability is below this "
        "(default 0.5)",
    )
    p.add_argument(
        "--point-threshold",
        type=float,
        default=0.5,
        help="--refine sam: point prompts from cells whose class probability exceeds this "
        "(App. C: 0.5)",
    )
    p.add_argument(
        "--save-predictions", help="folder for predicted label maps (class index PNGs, same stem)"
    )
    p = command("instseg", cmd_instseg, "box-prompted instance segmentation, mask AP (Table 1)")
    p.add_argument("--annotations", help="COCO instances JSON (default DIR/instances.json)")
    p.add_argument(
        "--detections",
        help="COCO results JSON (image_id, category_id, bbox XYWH, score); default: GT boxes",
    )
    p.add_argument(
        "--save-predictions",
        help="write a COCO results JSON here (one RLE mask and score per prompt) for pycocotools' "
        "COCOeval or the LVIS API; required for LVIS files (federated AP is not computed here)",
    )
    p = command(
        "probe",
        cmd_probe,
        "linear probe of a frozen backbone's last-block tokens, fit on "
        "--train-data, scored on --data (Tables 3, 4)",
        None,
        PROBE_PROTOCOL,
    )
    p.add_argument(
        "--train-data",
        help="the train split the linear layer is fit on, in --data's layout "
        "(--data: the validation split the results are reported on)",
    )
    p.add_argument(
        "--self-split",
        "--train-fraction",
        dest="self_split",
        type=float,
        default=None,
        help="instead of --train-data: fit on this seeded share of --data's images "
        "and report on the rest (a folder without splits; not the paper's way)",
    )
    p.add_argument(
        "--task",
        choices=["cls", "seg"],
        default="cls",
        help="cls: image folder, seg: generic segmentation",
    )
    p.add_argument(
        "--features",
        choices=["samclip", "sam", "clip"],
        default="samclip",
        help="whose frozen backbone, always its last block's tokens: the merged "
        "encoder, SAM's encoder (--sam-checkpoint) or a CLIP image tower "
        "(--clip-checkpoint)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="samclip and sam only: input side in the paper's pixels (default: the "
        "side the encoder was trained at, 1024 px; a CLIP tower runs at its own)",
    )
    p.add_argument(
        "--grid",
        type=int,
        default=PROBE_GRID,
        help=f"seg: the common G x G grid every backbone's tokens are area-pooled to "
        f"(default {PROBE_GRID}; 0: each backbone's own grid)",
    )
    p.add_argument("--clip-checkpoint", help="OpenCLIP / OpenAI CLIP file for --features clip")
    p.add_argument("--sam-checkpoint", help="official SAM file for --features sam")
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
