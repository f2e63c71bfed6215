"""The toy world on disk: writers of every dataset layout the project reads (issue 9).

toy/scenes.py draws scenes on the fly; this file stores them as the real datasets come: SA-1B,
extracted or in its tars (data.SA1B), a D_CLIP folder with COCO-style captions (evaluate.py
retrieve), generic semantic segmentation (evaluate.py semseg, probe), COCO instances (evaluate.py
instseg) and class folders (evaluate.py classify). `write_all` writes a training set in the train
hand and an evaluation set in the heldout hand. Every scene is seeded by (seed, writer, style,
index), so any file can be redrawn.

Run: python -m toy.layouts --out DIR [--seed 0] [--sa1b-per-tar N] [--clip-per-shard N]
"""

import argparse
import io
import itertools
import json
import os
import tarfile
import time

import numpy as np
from PIL import Image

import data
from toy.drawing import CLASSES, STYLES, THINGS
from toy.scenes import caption, dominated_box, draw_scene, mask_box

# ----------------------------------------------------------------------------- writers

# a writer's index enters its scenes' seeds
WRITERS = ("sa1b", "clip", "semseg", "instances", "classify")


def scene_rng(seed, writer, style, index, *extra):
    """The generator of scene `index` of a writer, seeded by (seed, writer, style, index): the same
    seed gives different scenes in different writers and styles, and any scene can be redrawn."""
    return np.random.default_rng([seed, WRITERS.index(writer), STYLES.index(style), index, *extra])


def save_jpeg(scene, path, image=None):
    """Store the scene's own JPEG bytes (no second compression); other images at quality 95."""
    if image is None and scene.jpeg is not None:
        with open(path, "wb") as f:
            f.write(scene.jpeg)
    else:
        (image or scene.image).save(path, quality=95)


def xywh(mask):
    left, top, right, bottom = mask_box(mask)
    return [left, top, right - left, bottom - top]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def drawn(folder, writer, n, seed, style):
    """Scenes 0..n-1 of a writer, each saved as folder/images/toy_<i>.jpg.
    Yields (i, file name, scene)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(n):
        scene = draw_scene(scene_rng(seed, writer, style, i), style)
        name = f"toy_{i:05d}.jpg"
        save_jpeg(scene, os.path.join(folder, "images", name))
        yield i, name, scene


def sa1b_scenes(n, seed=0, style="train"):
    """Scenes 0..n-1 of the sa1b writer and their SA-1B annotation documents: {"image": {image_id,
    width, height, file_name}, "annotations": [{id, segmentation: COCO RLE with a string of
    counts, area, bbox XYWH, category}]}, one annotation per object and per connected stuff region
    (SAM's masks cover the whole picture). "category" is not in SA-1B; it is here for inspection.
    Yields (i, scene, document)."""
    next_id = 0
    for i in range(n):
        scene = draw_scene(scene_rng(seed, "sa1b", style, i), style)
        W, H = scene.image.size
        anns = []
        for cls, mask, attrs in scene.instances:
            anns.append(
                {
                    "id": next_id,
                    "segmentation": data.rle_encode(mask),
                    "area": attrs["area"],
                    "bbox": xywh(mask),
                    "category": CLASSES[cls],
                }
            )
            next_id += 1
        image = {"image_id": i, "width": W, "height": H, "file_name": f"sa_{i}.jpg"}
        yield i, scene, {"image": image, "annotations": anns}


def write_sa1b(folder, n, seed=0, style="train"):
    """SA-1B's extracted layout, as data.SA1B reads it: sa_<i>.jpg + sa_<i>.json (sa1b_scenes)."""
    os.makedirs(folder, exist_ok=True)
    for i, scene, doc in sa1b_scenes(n, seed, style):
        save_jpeg(scene, os.path.join(folder, f"sa_{i}.jpg"))
        write_json(os.path.join(folder, f"sa_{i}.json"), doc)
    return folder


def jpeg_bytes(scene):
    """The bytes save_jpeg stores for a scene: its own JPEG, or its image at quality 95."""
    if scene.jpeg is not None:
        return scene.jpeg
    out = io.BytesIO()
    scene.image.save(out, "JPEG", quality=95)
    return out.getvalue()


def add_member(tar, name, content):
    """Add the bytes `content` to an open tar as the file `name`. TarInfo's defaults (time 0,
    owner 0, mode 644) make the same scenes give the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def write_sa1b_tars(folder, n, seed=0, style="train", per_tar=100):
    """SA-1B as it ships, as data.SA1B reads it in place: folder/sa_000000.tar, sa_000001.tar, ...,
    scene i in tar i // per_tar as the members sa_<i>.jpg + sa_<i>.json, with the bytes write_sa1b
    writes for the same seed (SA-1B's own tars hold ~11k scenes each)."""
    os.makedirs(folder, exist_ok=True)
    scenes = sa1b_scenes(n, seed, style)
    for k in range(-(-n // per_tar)):
        with tarfile.open(os.path.join(folder, f"sa_{k:06d}.tar"), "w") as tar:
            for i, scene, doc in itertools.islice(scenes, per_tar):
                add_member(tar, f"sa_{i}.jpg", jpeg_bytes(scene))
                add_member(tar, f"sa_{i}.json", json.dumps(doc).encode("utf-8"))
    return folder


def write_clip_images(folder, n, seed=0, style="train"):
    """D_CLIP (unlabeled: data.CLIPImages reads the images recursively) with the captions
    evaluate.py retrieve reads: DIR/images/toy_<i>.jpg and DIR/captions.json = {"images": [{id,
    file_name, width, height}], "annotations": [{id, image_id, caption}]}, two phrasings per image
    (COCO has five)."""
    images = []
    anns = []
    for i, name, scene in drawn(folder, "clip", n, seed, style):
        images.append(
            {"id": i, "file_name": name, "width": scene.image.width, "height": scene.image.height}
        )
        second = caption(scene.instances, None, scene_rng(seed, "clip", style, i, 1))
        for text in dict.fromkeys([scene.caption, second]):  # unique, in order
            anns.append({"id": len(anns), "image_id": i, "caption": text})
    write_json(os.path.join(folder, "captions.json"), {"images": images, "annotations": anns})
    return folder


def write_webdataset(folder, n, seed=0, hand="train", per_shard=100):
    """D_CLIP as img2dataset writes it, as shards.ShardImages reads it: folder/00000.tar,
    00001.tar, ..., scene i of the clip writer (the image write_clip_images stores for the same
    seed and hand) in shard i // per_shard as <key>.jpg, <key>.txt (its caption) and <key>.json
    ({"key", "caption", "width", "height"}), the key 9 digits as img2dataset's (shard number,
    place in it); beside each shard img2dataset's <shard>_stats.json ({"count", "successes"}),
    from which the reader counts an epoch. -> folder"""
    os.makedirs(folder, exist_ok=True)
    for k in range(-(-n // per_shard)):
        indices = range(k * per_shard, min(n, (k + 1) * per_shard))
        with tarfile.open(os.path.join(folder, f"{k:05d}.tar"), "w") as tar:
            for place, i in enumerate(indices):
                scene = draw_scene(scene_rng(seed, "clip", hand, i), hand)
                key = f"{k:05d}{place:04d}"
                W, H = scene.image.size
                info = {"key": key, "caption": scene.caption, "width": W, "height": H}
                add_member(tar, f"{key}.jpg", jpeg_bytes(scene))
                add_member(tar, f"{key}.txt", scene.caption.encode("utf-8"))
                add_member(tar, f"{key}.json", json.dumps(info).encode("utf-8"))
        stats = {"count": len(indices), "successes": len(indices)}
        write_json(os.path.join(folder, f"{k:05d}_stats.json"), stats)
    return folder


def write_semseg(folder, n, seed=0, style="heldout", ignore_edges=True):
    """evaluate.py's generic semantic layout: DIR/images/toy_<i>.jpg, DIR/labels/toy_<i>.png
    (mode L, class index per pixel; 255 on pixels whose colour blends two classes when
    ignore_edges) and DIR/classes.txt (line i = CLASSES[i])."""
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    for i, name, scene in drawn(folder, "semseg", n, seed, style):
        label = np.where(scene.edge, 255, scene.class_map) if ignore_edges else scene.class_map
        label_path = os.path.join(folder, "labels", name[:-4] + ".png")
        Image.fromarray(label.astype(np.uint8), mode="L").save(label_path)
    with open(os.path.join(folder, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return folder


def write_instances(folder, n, seed=0, style="heldout"):
    """COCO instances for evaluate.py instseg: DIR/images/toy_<i>.jpg + DIR/instances.json with
    "images" [{id, file_name, height, width}], "annotations" [{id, image_id, category_id, bbox
    XYWH, area, iscrowd 0, segmentation RLE}] and "categories" [{id, name}] for the thing classes
    (ids from 1)."""
    images = []
    anns = []
    for i, name, scene in drawn(folder, "instances", n, seed, style):
        images.append(
            {"id": i, "file_name": name, "height": scene.image.height, "width": scene.image.width}
        )
        for cls, mask, attrs in scene.instances:
            if cls in THINGS:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": THINGS.index(cls) + 1,
                        "bbox": xywh(mask),
                        "area": attrs["area"],
                        "iscrowd": 0,
                        "segmentation": data.rle_encode(mask),
                    }
                )
    categories = [{"id": k + 1, "name": CLASSES[cls]} for k, cls in enumerate(THINGS)]
    write_json(
        os.path.join(folder, "instances.json"),
        {"images": images, "annotations": anns, "categories": categories},
    )
    return folder


def write_class_folders(folder, n_per_class, seed=0, style="heldout"):
    """Zero-shot classification data for evaluate.py classify: DIR/<class>/toy_<i>.jpg, each a crop
    dominated by its class (dominated_box), n_per_class per class, plus DIR/classnames.txt (one
    readable name per line in sorted folder order; here the folder names themselves)."""
    for name in CLASSES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    counts = [0] * len(CLASSES)  # crops written per class
    i = 0  # scene index
    while min(counts) < n_per_class:
        if i > 50 * n_per_class + 100:
            raise RuntimeError(
                f"write_class_folders: only {dict(zip(CLASSES, counts))} crops after {i} scenes"
            )
        rng = scene_rng(seed, "classify", style, i)
        scene = draw_scene(rng, style)
        for cls in range(len(CLASSES)):
            if counts[cls] < n_per_class:
                box = dominated_box(scene, cls, rng)
                if box is not None:
                    path = os.path.join(folder, CLASSES[cls], f"toy_{i:05d}.jpg")
                    save_jpeg(scene, path, scene.image.crop(box))
                    counts[cls] += 1
        i += 1
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("\n".join(sorted(CLASSES)) + "\n")
    return folder


DEFAULT_SIZES = {
    "sa1b": 200,
    "clip": 1000,
    "semseg": 100,
    "instances": 100,
    "classify": 25,
    "retrieve": 100,
}


def write_all(root, seed=0, sizes=None, sa1b_per_tar=0):
    """The toy world on disk: a training set in the train hand (root/train/sa1b for D_SAM,
    root/train/clip for D_CLIP) and an evaluation set in the heldout hand (root/eval/semseg,
    instances, classify, retrieve). `sizes` overrides DEFAULT_SIZES (classify: crops per class).
    sa1b_per_tar > 0: D_SAM as SA-1B's tars of that many scenes (write_sa1b_tars).
    -> {part: folder}."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    train = os.path.join(root, "train")
    test = os.path.join(root, "eval")
    sa1b_folder = os.path.join(train, "sa1b")
    if sa1b_per_tar:
        write_sa1b_tars(sa1b_folder, sizes["sa1b"], seed, "train", sa1b_per_tar)
    else:
        write_sa1b(sa1b_folder, sizes["sa1b"], seed, "train")
    return {
        "sa1b": sa1b_folder,
        "clip": write_clip_images(os.path.join(train, "clip"), sizes["clip"], seed, "train"),
        "semseg": write_semseg(os.path.join(test, "semseg"), sizes["semseg"], seed, "heldout"),
        "instances": write_instances(
            os.path.join(test, "instances"), sizes["instances"], seed, "heldout"
        ),
        "classify": write_class_folders(
            os.path.join(test, "classify"), sizes["classify"], seed, "heldout"
        ),
        "retrieve": write_clip_images(
            os.path.join(test, "retrieve"), sizes["retrieve"], seed, "heldout"
        ),
    }


def write_training_set(root, clip_images, sam_images, seed=0):
    """D_CLIP and D_SAM of train.py's built-in presets (toy.prepare), in the train hand: root/clip
    (images and captions.json; data.CLIPImages reads the images) and root/sa1b. Same seed, same
    bytes; a set already complete (root/written.json) is kept. -> (clip folder, sa1b folder)."""
    clip_folder = os.path.join(root, "clip")
    sam_folder = os.path.join(root, "sa1b")
    marker = os.path.join(root, "written.json")
    spec = {"clip": clip_images, "sa1b": sam_images, "seed": seed}
    if os.path.isfile(marker) and read_json(marker) == spec:  # written before
        return clip_folder, sam_folder
    write_clip_images(clip_folder, clip_images, seed, "train")
    write_sa1b(sam_folder, sam_images, seed, "train")
    write_json(marker, spec)  # last: a set cut off midway is redrawn
    return clip_folder, sam_folder


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Write the toy world: a training set (train hand) and an "
        "evaluation set (heldout hand) in every layout the project reads."
    )
    p.add_argument(
        "--out", required=True, help="root folder; train/ and eval/ are written inside it"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every scene (same seed, same bytes)"
    )
    for part, n in DEFAULT_SIZES.items():
        what = "crops per class" if part == "classify" else "scenes"
        p.add_argument(
            f"--{part}", type=int, default=n, help=f"number of {part} {what} (default {n})"
        )
    p.add_argument(
        "--sa1b-per-tar",
        type=int,
        default=0,
        help="write D_SAM as SA-1B ships it, tars sa_000000.tar ... of this many scenes each "
        "(SA-1B's hold ~11k), instead of extracted sa_N.jpg + sa_N.json files (default 0: "
        "extracted)",
    )
    p.add_argument(
        "--clip-per-shard",
        type=int,
        default=0,
        help="also write the training D_CLIP as WebDataset shards of this many samples each "
        "(train/clip_shards/00000.tar ..., as img2dataset writes them; train.py --clip-data "
        "'DIR/{00000..00003}.tar' reads them) (default 0: folder only)",
    )
    args = p.parse_args(argv)
    start = time.time()
    sizes = {part: getattr(args, part) for part in DEFAULT_SIZES}
    folders = write_all(args.out, args.seed, sizes, args.sa1b_per_tar)
    if args.clip_per_shard:
        shards_folder = os.path.join(args.out, "train", "clip_shards")
        folders["clip_shards"] = write_webdataset(
            shards_folder, args.clip, args.seed, "train", args.clip_per_shard
        )
    for part, folder in folders.items():
        print(f"{part:<10} {folder}")
    print(f"toy.layouts: wrote {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
