"""How good the toy teachers are, measured on heldout-hand scenes (issue 9).

The toy teachers (toy/teachers.py) are trained on scenes of the train hand; these measures use the
heldout hand (other roof, tree, car, cloud and road shapes, the outer half of every colour range),
so a teacher that memorised one drawing style scores low:

  - toy SAM, SAM's single-prompt protocols (SAM Sec. 7.1): every instance mask of a scene prompted
    by its exact box (single-mask output) or by one point drawn uniformly from it (3 multimask
    outputs, the one with the highest predicted IoU kept, as SAM's predictor does); the low-res
    logits are upsampled to the original image (heads.postprocess_masks) and compared with the mask.
    Reported: mIoU over masks, for boxes also over objects and stuff regions separately, and for
    points the oracle (the best of the 3 outputs).
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


@torch.no_grad()
def sam_scene_ious(encoder, head, scene, rng):
    """IoUs of one scene's K masks -> {"box", "point", "point_oracle"} (K,), "stuff" (K,) bool."""
    side = encoder.cfg.img_size
    x, (h2, w2) = data.sam_preprocess(scene.image, side)
    H, W = scene.class_map.shape
    masks = torch.from_numpy(np.stack([inst.mask for inst in scene.instances]))  # (K, H, W)
    sx, sy = w2 / W, h2 / H
    boxes = torch.tensor(
        [[l * sx, t * sy, r * sx, b * sy] for l, t, r, b in map(scenes.mask_box, masks.numpy())]
    )
    points = []
    for mask in masks.numpy():
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(xs))
        # pixel centre, minus SAM's 0.5
        points.append([(xs[k] + 0.5) * sx - 0.5, (ys[k] + 0.5) * sy - 0.5])
    points = torch.tensor(points, dtype=torch.float32)[:, None]  # (K, 1, 2)
    emb = encoder(x[None])  # (1, C, h, w)

    def ious(low_res):  # (K, M, L, L) -> (K, M)
        pred = heads.postprocess_masks(low_res, (h2, w2), (H, W), side) > 0  # (K, M, H, W)
        target = masks[:, None]
        return (pred & target).flatten(2).sum(-1) / (pred | target).flatten(2).sum(-1).clamp(min=1)

    box_masks, _ = head(emb, boxes=boxes.float(), multimask_output=False)  # (K, 1, L, L)
    labels = torch.ones(len(points), 1, dtype=torch.long)  # (K, 1): every point a foreground one
    point_masks, point_iou = head(emb, points=(points, labels))  # (K, 3, L, L), (K, 3)
    all_point = ious(point_masks)  # (K, 3)
    return {
        "box": ious(box_masks)[:, 0],
        "point": all_point.gather(1, point_iou.argmax(1, keepdim=True))[:, 0],
        "point_oracle": all_point.max(1).values,
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
