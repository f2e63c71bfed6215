# python -m pytest tests/test_toy_layouts.py -q
"""toy/layouts.py: every writer read back by the project's own readers (data.SA1B, evaluate.py's
layout readers) and matching the scenes it drew, and deterministic."""

import json
import os

import numpy as np
from PIL import Image

import data
from toy import layouts, scenes
from toy.drawing import CLASSES, THINGS


def test_sa1b_writer_round_trips_and_data_sa1b_reads_it(tmp_path):
    layouts.write_sa1b(str(tmp_path), 2, seed=1, style="train")
    for i in range(2):
        scene = scenes.draw_scene(layouts.scene_rng(1, "sa1b", "train", i), "train")
        js = json.load(open(tmp_path / f"sa_{i}.json"))
        assert js["image"] == {
            "image_id": i,
            "width": scene.image.width,
            "height": scene.image.height,
            "file_name": f"sa_{i}.jpg",
        }
        assert len(js["annotations"]) == len(scene.instances)
        for ann, (cls, mask, attrs) in zip(js["annotations"], scene.instances):
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["category"] == CLASSES[cls]
            np.testing.assert_array_equal(data.rle_decode(ann["segmentation"]), mask)
            x, y, w, h = ann["bbox"]
            assert ann["area"] == mask.sum() and mask[y : y + h, x : x + w].sum() == mask.sum()
            assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()  # the box is tight
        assert (tmp_path / f"sa_{i}.jpg").read_bytes() == scene.jpeg
    # data.SA1B: every point prompt lies in one annotation's mask, which is the prompt's target
    ds = data.SA1B(str(tmp_path), img_size=256, masks_per_image=12, point_prob=1.0, seed=0)
    for i in range(len(ds)):
        s = ds[i]
        assert s["ok"] and s["num_prompts"] >= 4
        anns = json.load(open(ds.pairs[i][1]))["annotations"]
        masks = np.stack([data.rle_decode(a["segmentation"]) for a in anns])  # (M, H, W), disjoint
        h2, w2 = s["input_size"].tolist()
        H, W = s["original_size"].tolist()
        sx, sy = w2 / W, h2 / H
        centres = (np.arange(256 // data.LOW_RES_STRIDE) + 0.5) * data.LOW_RES_STRIDE
        rows = np.floor(centres[centres < h2] / sy).astype(int)
        cols = np.floor(centres[centres < w2] / sx).astype(int)
        for k in range(s["num_prompts"]):
            pts = s["point_coords"][k][s["point_labels"][k] == 1].numpy()
            px = np.round((pts[:, 0] + 0.5) / sx - 0.5).astype(int)
            py = np.round((pts[:, 1] + 0.5) / sy - 0.5).astype(int)
            owner = np.flatnonzero(masks[:, py[0], px[0]])
            assert len(owner) == 1 and masks[owner[0], py, px].all()
            gt = s["gt_masks"][k, : len(rows), : len(cols)].numpy()
            np.testing.assert_array_equal(gt, masks[owner[0]][np.ix_(rows, cols)])


def test_semseg_and_instances_writers_match_the_scenes_and_evaluate_reads_them(tmp_path):
    # imported here: evaluate.py is a large module; the other tests need not wait for it
    import evaluate

    sem = layouts.write_semseg(str(tmp_path / "semseg"), 2, seed=0)
    pairs, names = evaluate.read_segmentation(sem, "generic", None)
    assert tuple(names) == CLASSES and len(pairs) == 2
    for i, (img_path, lab_path) in enumerate(pairs):
        scene = scenes.draw_scene(layouts.scene_rng(0, "semseg", "heldout", i), "heldout")
        label = evaluate.read_label(lab_path, len(names)).numpy()
        assert Image.open(img_path).size == scene.image.size == label.shape[::-1]
        np.testing.assert_array_equal(label, np.where(scene.edge, 255, scene.class_map))
    inst = layouts.write_instances(str(tmp_path / "instances"), 2, seed=0)
    images, anns, cats = evaluate.read_instances(inst, None)[:3]  # the 4th: whether it is LVIS
    assert [cats[k] for k in sorted(cats)] == [CLASSES[k] for k in THINGS]
    for im in images:
        scene = scenes.draw_scene(layouts.scene_rng(0, "instances", "heldout", im["id"]), "heldout")
        things = [(cls, mask) for cls, mask, _ in scene.instances if cls in THINGS]
        assert len(anns[im["id"]]) == len(things) > 0
        for a, (cls, mask) in zip(anns[im["id"]], things):
            assert cats[a["category_id"]] == CLASSES[cls]
            decoded = evaluate.decode_mask(a["segmentation"], im["height"], im["width"]).numpy()
            np.testing.assert_array_equal(decoded, mask)


def test_class_folder_and_caption_writers_are_read_by_evaluate(tmp_path):
    import evaluate

    cls_dir = layouts.write_class_folders(str(tmp_path / "classify"), 2, seed=0)
    items, names = evaluate.read_image_folder(cls_dir)
    assert names == sorted(CLASSES) and len(items) == 2 * len(CLASSES)
    assert sorted(np.bincount([k for _, k in items]).tolist()) == [2] * len(CLASSES)
    ret = layouts.write_clip_images(str(tmp_path / "retrieve"), 3, seed=0, style="heldout")
    paths, captions, owner = evaluate.read_captions(ret)
    assert len(paths) == 3 and set(owner) == {0, 1, 2} and len(captions) >= 3
    scene = scenes.draw_scene(layouts.scene_rng(0, "clip", "heldout", 0), "heldout")
    assert captions[0] == scene.caption
    assert len(data.list_images(ret)) == 3  # the same folder serves as D_CLIP


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_writers_are_deterministic(tmp_path):
    a = layouts.write_semseg(str(tmp_path / "a"), 2, seed=5, style="train")
    b = layouts.write_semseg(str(tmp_path / "b"), 2, seed=5, style="train")
    for sub in ("images", "labels"):
        for f in sorted(os.listdir(os.path.join(a, sub))):
            assert read_bytes(os.path.join(a, sub, f)) == read_bytes(os.path.join(b, sub, f))
