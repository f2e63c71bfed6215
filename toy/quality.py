"""How good the toy teachers are, measured on heldout-hand scenes (issue 9).

The toy teachers (toy/teachers.py) are trained on scenes of the train hand; these measures use the
heldout hand (other roof, tree, car, cloud and road shapes, the outer half of every colour range),
so a teacher that memorised one drawing style scores low:

  - toy SAM, SAM's single-prompt protocols (SAM Sec. 7.1): every instance mask of a scene prompted
    by its exact box (single-mask output) or by one point (3 multimask outputs, the one with the
    highest predicted IoU kept, as SAM's predictor does); the low-res logits are upsampled to the
    original image (heads.postprocess_masks) and compared with the mask. The point is SAM's: the
    mask's "center", where its interior distance transform peaks (the pixel farthest from every
    pixel outside the mask, the image's border counting as outside), the standard protocol of
    interactive segmentation (RITM) that SAM follows. Reported: mIoU over masks, for boxes also
    over objects and stuff regions separately, for the centre point also the oracle (the best of
    the 3 outputs), and for one point drawn uniformly from the mask (a harder variant: a point near
    the boundary is ambiguous; the measure the toy SAM's targets were first set on, issue 17).
  - toy CLIP, CLIP's zero-shot protocols (CLIP Sec. 3.1.4): crops dominated by one class
    (toy.scenes.dominated_box) classified among the 8 class names embedded in CLIP's 80 ImageNet
    templates (zero_shot.OPENAI_IMAGENET_TEMPLATES, averaged); and retrieval R@1 between crops and
    their captions (random_crop_with_caption), both directions, over crops with distinct captions.

Shape legend: K masks (or classes), T templates, D CLIP embedding size, L low-res mask side.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import data
import heads
import zero_shot
from toy import scenes
from toy.drawing import CLASSES, STUFF


def heldout_scenes(n, seed=0):
    """n scenes of the heldout hand, seeded apart from everything the teachers train on."""
    return [scenes.draw_scene([seed, 7, i], "heldout") for i in range(n)]


# ----------------------------------------------------------------------------- toy SAM


def interior_distance(mask):
    """(H, W) bool -> (H, W) float: each mask pixel's Euclidean distance to the nearest pixel
    outside the mask, the image's border counting as outside (0 outside the mask): the exact
    distance transform (OpenCV's DIST_L2 with DIST_MASK_PRECISE, as RITM computes it). Separable:
    along each column the distance to the nearest outside row, then per row the lower envelope
    d^2(y, x) = min_x' (x - x')^2 + g(y, x')^2. Computed on the mask's box grown by 1 px, whose
    rim is outside the mask, so no pixel's nearest outside one lies beyond it."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(mask.shape)
    if len(ys) == 0:
        return out
    top, left = ys.min(), xs.min()
    crop = np.pad(mask[top:ys.max() + 1, left:xs.max() + 1], 1)  # (h + 2, w + 2), rim outside
    g = np.zeros(crop.shape, dtype=np.int64)  # rows to the nearest outside pixel in the column
    for y in range(1, len(crop)):  # from above
        g[y] = np.where(crop[y], g[y - 1] + 1, 0)
    for y in range(len(crop) - 2, -1, -1):  # from below
        g[y] = np.minimum(g[y], g[y + 1] + 1)
    x = np.arange(crop.shape[1])
    dx2 = (x[:, None] - x[None, :]) ** 2  # (w + 2, w + 2): (x - x')^2
    g2 = g ** 2
    # one row at a time: (w + 2, w + 2) -> min over x' (w + 2,), not a (h + 2, w + 2, w + 2) block
    d2 = np.stack([(dx2 + row[None, :]).min(-1) for row in g2[1:-1]])  # (h, w)
    out[top:ys.max() + 1, left:xs.max() + 1] = np.sqrt(d2[:, 1:-1])
    return out


def centre_point(mask):
    """SAM's single point for a mask: (x, y) of its pixel farthest from the outside (the first in
    row-major order among equals)."""
    y, x = np.unravel_index(np.argmax(interior_distance(mask)), mask.shape)
    return x, y


@torch.no_grad()
def sam_scene_ious(encoder, head, scene, rng):
    """IoUs of one scene's K masks -> {"box", "point", "point_oracle", "point_random"} (K,),
    "stuff" (K,) bool. rng draws the uniform points."""
    side = encoder.cfg.img_size
    x, (h2, w2) = data.sam_preprocess(scene.image, side)
    H, W = scene.class_map.shape
    masks = torch.from_numpy(np.stack([inst.mask for inst in scene.instances]))  # (K, H, W)
    sx, sy = w2 / W, h2 / H
    boxes = torch.tensor(
        [[l * sx, t * sy, r * sx, b * sy] for l, t, r, b in map(scenes.mask_box, masks.numpy())]
    )
    centres = []
    uniform = []
    for mask in masks.numpy():
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(xs))
        # pixel centres in SAM's frame, minus SAM's 0.5
        uniform.append([(xs[k] + 0.5) * sx - 0.5, (ys[k] + 0.5) * sy - 0.5])
        cx, cy = centre_point(mask)
        centres.append([(cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5])
    emb = encoder(x[None])  # (1, C, h, w)
    labels = torch.ones(len(masks), 1, dtype=torch.long)  # (K, 1): every point a foreground one

    def ious(low_res):  # (K, M, L, L) -> (K, M)
        pred = heads.postprocess_masks(low_res, (h2, w2), (H, W), side) > 0  # (K, M, H, W)
        target = masks[:, None]
        return (pred & target).flatten(2).sum(-1) / (pred | target).flatten(2).sum(-1).clamp(min=1)

    def one_point(points):  # (K, 2) -> IoUs (K, 3) of the 3 outputs, the most confident's index
        point_masks, point_iou = head(emb, points=(torch.tensor(points)[:, None].float(), labels))
        return ious(point_masks), point_iou.argmax(1, keepdim=True)  # (K, 3), (K, 1)

    box_masks, _ = head(emb, boxes=boxes.float(), multimask_output=False)  # (K, 1, L, L)
    centre_ious, centre_pick = one_point(centres)
    uniform_ious, uniform_pick = one_point(uniform)
    return {
        "box": ious(box_masks)[:, 0],
        "point": centre_ious.gather(1, centre_pick)[:, 0],
        "point_oracle": centre_ious.max(1).values,
        "point_random": uniform_ious.gather(1, uniform_pick)[:, 0],
        "stuff": torch.tensor([inst.cls in STUFF for inst in scene.instances]),
    }


def sam_scores(encoder, head, scene_list, seed=0):
    """mIoU of box and single-point prompts over every mask of `scene_list` (see the docstring)."""
    rng = np.random.default_rng([seed, 8])
    per = [sam_scene_ious(encoder, head, scene, rng) for scene in scene_list]
    cat = {k: torch.cat([p[k] for p in per]) for k in per[0]}
    stuff = cat["stuff"]
    return {
        "masks": len(stuff),
        "box_miou": round(cat["box"].mean().item(), 4),
        "box_miou_objects": round(cat["box"][~stuff].mean().item(), 4),
        "box_miou_stuff": round(cat["box"][stuff].mean().item(), 4),
        "point_miou": round(cat["point"].mean().item(), 4),
        "point_oracle_miou": round(cat["point_oracle"].mean().item(), 4),
        "point_random_miou": round(cat["point_random"].mean().item(), 4),
    }


# ----------------------------------------------------------------------------- toy CLIP


def clip_input(crops, side):
    """PIL crops -> the CLIP tower's input (K, 3, side, side), squashed square, CLIP-normalised."""
    return torch.stack(
        [data.normalize_clip(data.to_tensor(c.resize((side, side), Image.BICUBIC))) for c in crops]
    )


@torch.no_grad()
def dominated_crops(n_per_class, seed=0):
    """Heldout crops that one class dominates, n_per_class per class: (crops, labels)."""
    crops = []
    labels = []
    counts = [0] * len(CLASSES)  # crops found per class
    i = 0  # scene index
    while min(counts) < n_per_class and i < 60 * n_per_class:
        rng = np.random.default_rng([seed, 9, i])
        scene = scenes.draw_scene(rng, "heldout")
        for cls in range(len(CLASSES)):
            box = scenes.dominated_box(scene, cls, rng) if counts[cls] < n_per_class else None
            if box is not None:
                crops.append(scene.image.crop(box))
                labels.append(cls)
                counts[cls] += 1
        i += 1
    return crops, torch.tensor(labels)


def captioned_crops(n, seed=0):
    """n heldout (crop, caption) pairs, captions pairwise distinct so R@1 has one right answer."""
    crops = []
    captions = []
    i = 0  # scene index
    while len(crops) < n:
        rng = np.random.default_rng([seed, 10, i])
        scene = scenes.draw_scene(rng, "heldout")
        for _ in range(4):
            crop, text, _ = scenes.random_crop_with_caption(scene, rng)
            if text not in captions and len(crops) < n:
                crops.append(crop)
                captions.append(text)
        i += 1
    return crops, captions


@torch.no_grad()
def clip_scores(
    model, seed=0, per_class=25, retrieval=200, templates=zero_shot.OPENAI_IMAGENET_TEMPLATES
):
    """Zero-shot accuracy on dominated crops and retrieval R@1 (see the docstring)."""
    side = model.config.image_size
    crops, labels = dominated_crops(per_class, seed)
    image_emb = F.normalize(model.encode_image(clip_input(crops, side)), dim=-1)  # (N, D)
    predicted = (image_emb @ zero_shot.class_embeddings(model, CLASSES, templates).t()).argmax(1)
    per_class_acc = {
        CLASSES[k]: round((predicted[labels == k] == k).float().mean().item(), 3)
        for k in range(len(CLASSES))
    }
    crops, captions = captioned_crops(retrieval, seed)
    image_emb = F.normalize(model.encode_image(clip_input(crops, side)), dim=-1)
    text_emb = F.normalize(model.encode_text(clip.trim_padding(clip.tokenize(captions))), dim=-1)
    sim = image_emb @ text_emb.t()  # (N, N) image x caption
    right = torch.arange(len(captions))
    return {
        "zero_shot_acc": round((predicted == labels).float().mean().item(), 4),
        "per_class": per_class_acc,
        "crops": len(labels),
        "text_to_image_r1": round((sim.argmax(0) == right).float().mean().item(), 4),
        "image_to_text_r1": round((sim.argmax(1) == right).float().mean().item(), 4),
        "pairs": len(captions),
    }
