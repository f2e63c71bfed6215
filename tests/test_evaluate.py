# python -m pytest tests/test_evaluate.py -q
"""evaluate.py: the metrics against hand-computed cases, and every subcommand end to end on the
tiny preset with small datasets generated here in each layout (no downloads)."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import evaluate as ev
import model
import vit_det
import zero_shot
from conftest import FIXTURES

# ----------------------------------------------------------------------------- helpers


def test_scaled_resolutions():
    tiny = model.SAMCLIP(model.PRESETS["tiny"]())
    assert [ev.scaled(r, tiny) for r in (448, 336, 1024)] == [80, 64, 160]
    full = type("M", (), {"cfg": model.PRESETS["vit_b"]()})()
    assert [ev.scaled(r, full) for r in (224, 336, 448, 1024)] == [224, 336, 448, 1024]


def test_patch_labels_take_the_majority_and_skip_ignored():
    lab = torch.full((4, 4), 255)
    lab[:2, :2] = torch.tensor([[1, 1], [2, 255]])  # patch (0, 0): 1 wins
    lab[2:, 2:] = 3  # patch (1, 1): all 3; the others: all 255
    assert ev.patch_labels(lab, side=4, grid=2).tolist() == [[1, 255], [255, 3]]


# ----------------------------------------------------------------------------- generated datasets


def rle_counts(mask):
    """COCO's uncompressed RLE: run lengths over the column-major mask, zeros first."""
    flat = mask.T.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.r_[0, changes, flat.size]).tolist()
    return [0] + runs if flat[0] else runs


def picture(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny checkpoint and one small dataset per layout."""
    r = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    model.build_samclip("tiny").save(str(r / "m.pt"))
    # classify: three class folders, readable names one per line in sorted folder order
    for c in ("cat", "dog", "red_car"):
        os.makedirs(r / "cls" / c)
        for i in range(2):
            picture(rng, 30 + 10 * i, 40).save(r / "cls" / c / f"{i}.jpg")
    (r / "cls" / "classnames.txt").write_text("a cat\na dog\na red car\n")
    # retrieve: three images, two captions each
    os.makedirs(r / "ret" / "images")
    for i in range(3):
        picture(rng, 32, 48).save(r / "ret" / "images" / f"{i}.png")
    caps = {
        "images": [{"id": 10 + i, "file_name": f"{i}.png"} for i in range(3)],
        "annotations": [
            {"image_id": 10 + i, "caption": f"photo number {i} variant {j}"}
            for i in range(3)
            for j in range(2)
        ],
    }
    (r / "ret" / "captions.json").write_text(json.dumps(caps))
    # VOC: palette PNGs with classes 0, 1, 15 and a 255 border
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(r / "voc" / sub)
    for i, (h, w) in enumerate([(40, 56), (48, 36), (33, 33)]):
        picture(rng, h, w).save(r / "voc" / "JPEGImages" / f"2007_{i:06d}.jpg")
        lab = np.zeros((h, w), np.uint8)
        lab[5:20, 5:25] = 1
        lab[22:, :10] = 15
        lab[[0, -1], :] = 255
        lab[:, [0, -1]] = 255
        png = Image.fromarray(lab, mode="P")
        png.putpalette(zero_shot.PALETTE.reshape(-1).tolist())
        png.save(r / "voc" / "SegmentationClass" / f"2007_{i:06d}.png")
    val = r / "voc" / "ImageSets" / "Segmentation" / "val.txt"
    val.write_text("2007_000000\n2007_000001\n2007_000002\n")
    # generic: one-channel labels over 3 named classes, a few ignored pixels
    for sub in ("images", "labels"):
        os.makedirs(r / "gen" / sub)
    for i in range(4):
        picture(rng, 36, 44).save(r / "gen" / "images" / f"im{i}.png")
        lab = np.full((36, 44), i % 3, np.uint8)
        lab[:12, :20] = (i + 1) % 3
        lab[30:, 40:] = 255
        Image.fromarray(lab, mode="L").save(r / "gen" / "labels" / f"im{i}.png")
    (r / "gen" / "classes.txt").write_text("sky\ngrass\nroad\n")
    # instances: polygons, compressed RLE, uncompressed RLE and a crowd object that must be ignored
    os.makedirs(r / "inst" / "images")
    anns = []
    H = 40
    W = 60
    for i in range(2):
        picture(rng, H, W).save(r / "inst" / "images" / f"{i}.jpg")
        m1 = np.zeros((H, W), bool)
        m1[20:35, 30:55] = True
        m2 = np.zeros((H, W), bool)
        m2[2:12, 2:20] = True
        # (id, category, iscrowd, bbox, segmentation)
        objects = [
            (1, 1, 0, [5, 5, 20, 15], [[5, 5, 25, 5, 25, 20, 5, 20]]),
            (2, 2, 0, [30, 20, 25, 15], data.rle_encode(m1)),
            (3, 2, 0, [2, 2, 18, 10], {"size": [H, W], "counts": rle_counts(m2)}),
            (4, 1, 1, [0, 0, 60, 40], data.rle_encode(np.ones((H, W), bool))),
        ]
        for k, category, crowd, bbox, segmentation in objects:
            ann = {"id": 10 * i + k, "image_id": i, "category_id": category, "iscrowd": crowd}
            anns.append(ann | {"bbox": bbox, "segmentation": segmentation})
    inst = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in range(2)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "blob"}],
    }
    (r / "inst" / "instances.json").write_text(json.dumps(inst))
    dets = [
        {"image_id": 0, "category_id": 1, "bbox": [5, 5, 20, 15], "score": 0.9},
        {"image_id": 0, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.4},
        {"image_id": 1, "category_id": 2, "bbox": [30, 20, 25, 15], "score": 0.8},
    ]
    (r / "dets.json").write_text(json.dumps(dets))
    return r


def run(root, *argv):
    return ev.main([argv[0], "--checkpoint", str(root / "m.pt"), *argv[1:]])


def read(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- subcommands end to end


def test_classify(root):
    out = root / "out" / "cls.json"
    options = ["--out", str(out), "--visualize", "2", "--batch-size", "4"]
    run(root, "classify", "--data", str(root / "cls"), *options)
    res = read(out)
    assert {"top1", "top5"} <= set(res)
    assert 0 <= res["top1"] <= res["top5"] == 100.0  # 3 classes: top-5 = all
    assert res["num_images"] == 6 and res["resolution"] == 64  # 336 px scaled for tiny
    assert len(os.listdir(root / "out" / "cls_vis")) == 2


def test_retrieve(root):
    out = root / "out" / "ret.json"
    run(root, "retrieve", "--data", str(root / "ret"), "--out", str(out), "--visualize", "1")
    res = read(out)
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        assert 0 <= res[key] <= 100
    assert res["t2i_R@5"] == 100.0  # only 3 images
    assert res["num_images"] == 3 and res["num_texts"] == 6
    assert res["resolution"] == 64  # Sec. 4.2's 336 px, scaled for tiny
    assert len(os.listdir(root / "out" / "ret_vis")) == 1


SEMSEG_CASES = [("voc", "none"), ("voc", "sam"), ("generic", "none"), ("generic", "sam")]


@pytest.mark.parametrize("layout,refine", SEMSEG_CASES)
def test_semseg(root, layout, refine):
    out = root / "out" / f"seg_{layout}_{refine}.json"
    preds = root / "out" / f"pred_{layout}_{refine}"
    folder = root / ("voc" if layout == "voc" else "gen")
    options = ["--layout", layout, "--refine", refine, "--out", str(out)]
    options += ["--save-predictions", str(preds), "--visualize", "2"]
    run(root, "semseg", "--data", str(folder), *options)
    res = read(out)
    names = ev.VOC_CLASSES if layout == "voc" else ["sky", "grass", "road"]
    assert list(res["per_class_IoU"]) == names
    assert 0 <= res["mIoU"] <= 100 and 0 <= res["pixel_accuracy"] <= 100
    labels = root / ("voc/SegmentationClass" if layout == "voc" else "gen/labels")
    for f in os.listdir(labels):
        p = Image.open(preds / f)
        assert p.mode == "L" and p.size == Image.open(labels / f).size
        assert np.array(p).max() < len(names)
    assert len(os.listdir(root / "out" / f"seg_{layout}_{refine}_vis")) == 2


def test_instseg_with_ground_truth_boxes(root):
    out = root / "out" / "inst.json"
    options = ["--out", str(out), "--visualize", "2", "--batch-size", "2"]
    run(root, "instseg", "--data", str(root / "inst"), *options)
    res = read(out)
    assert all(0 <= res[k] <= 100 for k in ("AP", "AP50", "AP75", "mIoU_prompted"))
    assert res["num_prompts"] == 6  # 3 objects per image, crowd left out
    assert set(res["per_category_AP"]) == {"box", "blob"}
    assert len(os.listdir(root / "out" / "inst_vis")) == 2


def test_instseg_with_detections(root):
    out = root / "out" / "inst_det.json"
    detections = str(root / "dets.json")
    run(
        root, "instseg", "--data", str(root / "inst"), "--detections", detections, "--out", str(out)
    )
    res = read(out)
    assert res["num_prompts"] == 3 and res["mIoU_prompted"] is None and 0 <= res["AP"] <= 100


class BoxOracle(torch.nn.Module):
    """Stands in for HeadSAM: each box's mask is exactly its rectangle, so AP can be worked out
    by hand."""

    def __init__(self, side):
        super().__init__()
        self.side = side

    def forward(self, emb, boxes, multimask_output=False):
        ys = torch.arange(self.side, device=boxes.device)[:, None]  # (S, 1)
        xs = torch.arange(self.side, device=boxes.device)[None, :]  # (1, S)
        x0, y0, x1, y1 = boxes[:, :, None, None].unbind(1)  # (N, 4, 1, 1) -> 4 x (N, 1, 1)
        inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)  # (N, S, S)
        logits = torch.where(inside, 10.0, -10.0)[:, None]  # (N, 1, S, S)
        return logits, torch.ones(len(boxes), 1, device=boxes.device)  # (N, 1, S, S), (N, 1)


def rect(x, y, w, h, side=160):
    m = np.zeros((side, side), bool)
    m[y : y + h, x : x + w] = True
    return m


# detections of the crowd test: (image, category, XYWH box, score); each box is its own mask
CROWD_DETS = [
    (1, 1, [90, 90, 20, 20], 0.92),  # inside image 1's crowd: ignored
    (1, 1, [10, 10, 40, 40], 0.9),  # object A exactly: TP
    (1, 1, [10, 10, 40, 40], 0.7),  # A again, off the crowd: FP
    (1, 2, [100, 10, 40, 29], 0.6),  # object B with IoU 1160 / 1600 = 0.725
    (2, 1, [0, 0, 40, 40], 0.95),  # object A2 exactly: TP
    (2, 2, [50, 50, 10, 10], 0.99),  # no object of category 2 in image 2: FP
]


@pytest.fixture(scope="module")
def crowd_data(root):
    """160 x 160 images (the tiny model's native side: boxes need no rescaling) with a crowd
    region."""
    d = root / "crowd"
    os.makedirs(d / "images")
    for i in (1, 2):
        picture(np.random.default_rng(i), 160, 160).save(d / "images" / f"{i}.png")

    def ann(i, img, cat, segmentation, crowd=0):
        return {
            "id": i,
            "image_id": img,
            "category_id": cat,
            "iscrowd": crowd,
            "bbox": [0, 0, 1, 1],
            "segmentation": segmentation,
        }

    crowd_region = rect(80, 80, 80, 80)
    inst = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 160, "width": 160} for i in (2, 1)],
        "annotations": [
            ann(1, 1, 1, data.rle_encode(rect(10, 10, 40, 40))),  # A
            # the crowd, in COCO's uncompressed RLE as crowds are stored
            ann(2, 1, 1, {"size": [160, 160], "counts": rle_counts(crowd_region)}, crowd=1),
            ann(3, 1, 2, data.rle_encode(rect(100, 10, 40, 40))),  # B
            ann(4, 2, 1, data.rle_encode(rect(0, 0, 40, 40))),  # A2
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    (d / "instances.json").write_text(json.dumps(inst))
    dets = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in CROWD_DETS]
    (d / "dets.json").write_text(json.dumps(dets))
    return d


@pytest.fixture
def box_oracle(monkeypatch):
    load = ev.load_model

    def with_oracle(args):
        m = load(args)
        m.head_sam = BoxOracle(m.cfg.encoder.img_size)
        return m

    monkeypatch.setattr(ev, "load_model", with_oracle)


def test_instseg_crowd_detection_is_not_a_false_positive(root, crowd_data, box_oracle, tmp_path):
    # category 1 (2 objects; the crowd is no object): 0.95 TP, 0.92 ignored, 0.9 TP, 0.7 FP -> AP 1
    # at every threshold (as an FP, 0.92 would give (51 + 50 * 2/3) / 101). Category 2 (1 object):
    # 0.99 FP, then 0.6 TP while the threshold <= 0.725 -> precision 1/2 at every recall point: 0.5
    # at 5 of the 10 thresholds, 0 at the others. AP = (1 + 0.25) / 2, AP50 = (1 + 0.5) / 2,
    # AP75 = (1 + 0) / 2
    options = ["--detections", str(crowd_data / "dets.json")]
    options += ["--save-predictions", str(tmp_path / "p.json")]
    res = run(root, "instseg", "--data", str(crowd_data), *options)
    assert (res["AP"], res["AP50"], res["AP75"]) == pytest.approx((62.5, 75.0, 50.0))
    assert res["per_category_AP"] == {"one": pytest.approx(100.0), "two": pytest.approx(25.0)}


def test_instseg_save_predictions_decode_to_the_masks(root, crowd_data, box_oracle, tmp_path):
    options = ["--detections", str(crowd_data / "dets.json")]
    options += ["--save-predictions", str(tmp_path / "p.json")]
    run(root, "instseg", "--data", str(crowd_data), *options)
    preds = json.loads((tmp_path / "p.json").read_text())
    assert len(preds) == len(CROWD_DETS)  # one entry per prompt
    got = {(p["image_id"], p["category_id"], p["score"]): p for p in preds}
    for img, cat, (x, y, w, h), score in CROWD_DETS:
        p = got[(img, cat, score)]
        assert set(p) == {"image_id", "category_id", "segmentation", "score"}
        assert isinstance(p["segmentation"]["counts"], str)
        assert p["segmentation"]["size"] == [160, 160]
        assert np.array_equal(data.rle_decode(p["segmentation"]), rect(x, y, w, h))


def test_instseg_refuses_lvis_without_save_predictions(root, crowd_data, tmp_path, capsys):
    inst = json.loads((crowd_data / "instances.json").read_text())
    for im in inst["images"]:
        im |= {"not_exhaustive_category_ids": [], "neg_category_ids": [2]}
    for c in inst["categories"]:
        c["frequency"] = "f"
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps(inst))
    with pytest.raises(SystemExit) as e:
        run(root, "instseg", "--data", str(crowd_data), "--annotations", str(lvis))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(lvis) in err and "github.com/lvis-dataset/lvis-api" in err
    assert "--save-predictions" in err
    # with --save-predictions the masks are written, and no COCO-style AP is reported
    options = ["--annotations", str(lvis), "--save-predictions", str(tmp_path / "p.json")]
    res = run(root, "instseg", "--data", str(crowd_data), *options)
    assert len(json.loads((tmp_path / "p.json").read_text())) == 3  # 3 regular objects, GT boxes
    assert res["AP"].startswith("not computed")
    assert "AP50" not in res and "per_category_AP" not in res


def test_decode_mask_polygon_and_rle_agree():
    poly = ev.decode_mask([[2, 1, 6, 1, 6, 4, 2, 4]], 8, 10)  # x 2..6, y 1..4 inclusive
    assert poly.sum() == 5 * 4 and poly[1:5, 2:7].all()
    compressed = data.rle_encode(poly.numpy())
    uncompressed = {"size": [8, 10], "counts": rle_counts(poly.numpy())}
    assert torch.equal(ev.decode_mask(compressed, 8, 10), poly)
    assert torch.equal(ev.decode_mask(uncompressed, 8, 10), poly)


def test_classnames_one_per_line_follow_sorted_folders(tmp_path):
    for c in ("b_dogs", "a_cats"):
        os.makedirs(tmp_path / c)
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    assert ev.read_image_folder(str(tmp_path))[1] == [
        "a cats",
        "b dogs",
    ]  # folder names, _ -> space
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    items, names = ev.read_image_folder(str(tmp_path))
    assert names == ["cat", "dog"] and [k for _, k in items] == [0, 1]


def wordnet_folders(path, ids=("n01443537", "n01440764")):
    """ImageNet's validation layout in miniature: class folders named by WordNet ID."""
    for i, wnid in enumerate(ids):
        os.makedirs(path / wnid)
        picture(np.random.default_rng(i), 24, 24).save(path / wnid / "x.png")
    return path


def test_classify_refuses_wordnet_id_folders_without_names(root, tmp_path, capsys):
    """Prompts like "a photo of a n01440764." score near chance without a word of warning."""
    d = wordnet_folders(tmp_path / "val")
    with pytest.raises(SystemExit) as e:
        run(root, "classify", "--data", str(d))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "n01440764" in err and "classnames.txt" in err and "LOC_synset_mapping.txt" in err
    # a probe needs no readable names: ImageNet's train and val folders are probed as they are
    res = run(root, "probe", "--train-data", str(d), "--data", str(d), "--epochs", "1")
    assert res["num_test"] == 2


def test_loc_synset_mapping_names_wordnet_id_folders(root, tmp_path, capsys):
    """ImageNet's LOC_synset_mapping.txt beside the folders: the first name of each line's list."""
    d = wordnet_folders(tmp_path / "val")
    mapping = [
        "n01440764 tench, Tinca tinca",
        "n01443537 goldfish, Carassius auratus",
        "n01484850 great white shark, white shark",
    ]
    (d / "LOC_synset_mapping.txt").write_text("\n".join(mapping) + "\n")
    assert ev.read_image_folder(str(d))[1] == ["tench", "goldfish"]
    assert run(root, "classify", "--data", str(d))["num_classes"] == 2
    (d / "classnames.txt").write_text("a tench\na goldfish\n")  # the repository's list wins
    assert ev.read_image_folder(str(d))[1] == ["a tench", "a goldfish"]
    (d / "classnames.txt").unlink()
    os.makedirs(d / "n09999999")  # a class the mapping lacks
    Image.new("RGB", (8, 8)).save(d / "n09999999" / "x.png")
    capsys.readouterr()  # the run above's progress bars
    with pytest.raises(SystemExit) as e:
        run(root, "classify", "--data", str(d))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "LOC_synset_mapping.txt" in err and "n09999999" in err


def fixture_file(tmp_path, name):
    """The tiny official-layout SAM or CLIP fixture as a checkpoint file -> its path."""
    sd = torch.load(os.path.join(FIXTURES, f"{name}_tiny.pt"), weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / f"{name}.pt")
    return str(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("task,features", [("cls", "samclip"), ("cls", "sam"), ("seg", "clip")])
def test_probe(root, tmp_path, task, features):
    out = root / "out" / f"probe_{task}_{features}.json"
    options = ["--task", task, "--features", features, "--epochs", "3"]
    options += ["--out", str(out), "--visualize", "1"]
    if features in ("sam", "clip"):
        options += [f"--{features}-checkpoint", fixture_file(tmp_path, features)]
    folder = str(root / ("cls" if task == "cls" else "gen"))
    run(root, "probe", "--train-data", folder, "--data", folder, *options)
    res = read(out)
    assert res["num_train"] == res["num_test"] == (6 if task == "cls" else 4)
    assert 0 <= res["top1" if task == "cls" else "mIoU"] <= 100
    assert res["resolution"] == (64 if features == "clip" else 160)  # each backbone's own side
    assert res["grid"] == (16 if task == "seg" else None)  # seg: the common grid
    assert len(os.listdir(root / "out" / f"probe_{task}_{features}_vis")) == 1


def test_probe_trains_on_train_data_and_reports_on_data(root, tmp_path):
    """Tables 3 and 4: the linear layer is fit on --train-data and scored on --data. A validation
    folder holding the training images under their own classes is classified perfectly; the same
    images under rotated class folders never are."""
    classes = ["cat", "dog", "red_car"]
    same = tmp_path / "same"
    rotated = tmp_path / "rotated"
    for k, c in enumerate(classes):
        shutil.copytree(root / "cls" / c, same / c)
        shutil.copytree(root / "cls" / c, rotated / classes[(k + 1) % 3])
    fit = ["probe", "--train-data", str(root / "cls"), "--epochs", "50", "--lr", "0.05"]
    res = run(root, *fit, "--data", str(same))
    assert res["num_train"] == 6 and res["num_test"] == 6 and res["top1"] == 100.0
    assert res["protocol"] == "train on --train-data, report on --data"
    assert run(root, *fit, "--data", str(rotated))["top1"] == 0.0


def test_probe_splits_must_name_the_same_classes(root, tmp_path, capsys):
    shutil.copytree(root / "cls", tmp_path / "val")
    os.rename(tmp_path / "val" / "dog", tmp_path / "val" / "wolf")
    with pytest.raises(SystemExit) as e:
        run(root, "probe", "--train-data", str(root / "cls"), "--data", str(tmp_path / "val"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--train-data" in err and "wolf" in err


def test_probe_without_train_data_is_refused_unless_a_self_split_is_asked(root, capsys):
    """No silent 50/50 split of --data: a missing --train-data is one line naming it; a seeded
    split of one folder is an explicit opt-in, --self-split (its old name --train-fraction too)."""
    with pytest.raises(SystemExit) as e:
        run(root, "probe", "--data", str(root / "cls"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--train-data" in err and "--self-split" in err
    for flag in ("--self-split", "--train-fraction"):
        res = run(root, "probe", "--data", str(root / "cls"), flag, "0.5", "--epochs", "1")
        assert res["num_train"] == 3 and res["num_test"] == 3
        assert res["protocol"].startswith("seeded split of --data")
    with pytest.raises(SystemExit):
        folder = str(root / "cls")
        run(root, "probe", "--data", folder, "--train-data", folder, "--self-split", "0.5")
    assert "--self-split" in capsys.readouterr().err


def test_probe_runs_every_backbone_at_its_native_side_on_one_grid(root, tmp_path):
    """The probe protocol (cmd_probe): every --features choice gives its backbone's last-block
    tokens, of the backbone's width, at the side the backbone was trained at: tiny SAM-CLIP and
    SAM 160 px (a 10 x 10 grid, not the 224 / 448 px regimes SAM never saw), tiny CLIP 64 px (4 x
    4). Segmentation features are area-pooled to the common --grid; classification takes the mean
    of all native tokens. Widths: 64 for SAM-CLIP and SAM (not HeadCLIP's 32-d text space or the
    32-channel neck), 128 for CLIP (not its 32-d projection)."""
    m = model.SAMCLIP.load(str(root / "m.pt"))
    img = picture(np.random.default_rng(1), 40, 52)
    sam_file = fixture_file(tmp_path, "sam")
    clip_file = fixture_file(tmp_path, "clip")

    def args(features, grid=5, sam=sam_file, resolution=None):
        return argparse.Namespace(
            device="cpu",
            features=features,
            resolution=resolution,
            grid=grid,
            sam_checkpoint=sam,
            clip_checkpoint=clip_file,
        )

    sam_enc = vit_det.load_sam_encoder(sam_file)
    pooled = {}
    for features, enc in [("samclip", m.encoder), ("sam", sam_enc)]:
        side, native, seg = ev.feature_extractor(args(features), m, "seg")
        assert (side, native) == (160, 10)  # 1024 px scaled for tiny
        tokens = enc.forward_tokens(data.square_resize(img, 160)[None])  # (1, 10, 10, 64)
        # 10 x 10 -> 5 x 5: each cell the mean of its 2 x 2 tokens
        want = tokens.reshape(1, 5, 2, 5, 2, 64).mean((2, 4))  # (1, 5, 2, 5, 2, C) -> (1, 5, 5, C)
        assert torch.allclose(seg([img]), want, atol=1e-6)
        native_seg = ev.feature_extractor(args(features, grid=0), m, "seg")[2]  # --grid 0
        assert torch.allclose(native_seg([img]), tokens)
        side, native, cls = ev.feature_extractor(args(features), m, "cls")
        square = data.square_resize(ev.center_square(img), 160)[None]  # (1, 3, 160, 160)
        want = enc.forward_tokens(square).mean((1, 2))  # (1, 10, 10, C) -> (1, C)
        pooled[features] = cls([img])
        assert (side, native) == (160, 10) and want.shape == (1, 64)
        assert torch.allclose(pooled[features], want, atol=1e-6)
    assert not torch.allclose(pooled["samclip"], pooled["sam"])  # --sam-checkpoint: another model
    tower = clip.load_clip(clip_file).visual
    side, native, seg = ev.feature_extractor(args("clip", grid=4), m, "seg")
    dense = seg([img])
    assert (side, native) == (64, 4) and dense.shape == (1, 4, 4, 128)
    # they are the tokens ln_post + proj turn into the tower's projected patch outputs
    x = data.square_resize(img, 64, data.normalize_clip)[None]  # (1, 3, 64, 64)
    _, projected = tower(x, return_patch_tokens=True)
    tokens = dense.reshape(1, 16, 128)  # (1, 4, 4, C) -> (1, 16, C)
    assert torch.allclose(tower.ln_post(tokens) @ tower.proj, projected, atol=1e-5)
    assert ev.feature_extractor(args("clip"), m, "cls")[2]([img]).shape == (1, 128)
    with pytest.raises(ValueError, match="--sam-checkpoint"):
        ev.feature_extractor(args("sam", sam=None), m, "cls")
    with pytest.raises(ValueError, match="--resolution"):  # CLIP runs at its own side
        ev.feature_extractor(args("clip", resolution=448), m, "seg")


def test_probe_seg_is_deterministic(root):
    outs = [root / "out" / f"det{i}.json" for i in range(2)]
    for o in outs:
        options = ["--task", "seg", "--self-split", "0.5", "--epochs", "2", "--out", str(o)]
        run(root, "probe", "--data", str(root / "gen"), *options)
    res = read(outs[0])
    assert res == read(outs[1]) and res["num_train"] == 2 and 0 <= res["mIoU"] <= 100


# ------------------------------------------------------------------- bad layouts: one line, exit 2


def broken(root, tmp_path, src, remove):
    dst = tmp_path / src
    shutil.copytree(root / src, dst)
    target = dst / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return dst, target


MISSING_PARTS = [
    ("semseg", "voc", "SegmentationClass", ["--layout", "voc"]),
    ("semseg", "voc", "SegmentationClass/2007_000001.png", ["--layout", "voc"]),
    ("semseg", "voc", "ImageSets/Segmentation/val.txt", ["--layout", "voc"]),
    ("semseg", "gen", "classes.txt", []),
    ("semseg", "gen", "labels/im2.png", []),
    ("retrieve", "ret", "captions.json", []),
    ("retrieve", "ret", "images/1.png", []),
    ("instseg", "inst", "instances.json", []),
    ("probe", "gen", "labels", ["--task", "seg", "--self-split", "0.5"]),
]


@pytest.mark.parametrize("cmd,src,remove,extra", MISSING_PARTS)
def test_missing_layout_parts_give_one_line_and_exit_2(
    root, tmp_path, capsys, cmd, src, remove, extra
):
    dst, target = broken(root, tmp_path, src, remove)
    with pytest.raises(SystemExit) as e:
        run(root, cmd, "--data", str(dst), *extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(target) in err


def test_bad_checkpoint_and_class_names_exit_2(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(
            ["classify", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(root / "cls")]
        )
    assert e.value.code == 2 and "none.pt" in capsys.readouterr().err
    dst, _ = broken(root, tmp_path, "cls", "classnames.txt")
    (dst / "classnames.txt").write_text("one\ntwo\n")  # 2 names for 3 folders
    with pytest.raises(SystemExit) as e:
        run(root, "classify", "--data", str(dst))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "classnames.txt" in err
