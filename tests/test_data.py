# python -m pytest tests/test_data.py -q
"""data.py: COCO RLE against hand-encoded masks, SA-1B prompts in the resized frame (drawn by
prompts.first_prompt), D_CLIP crops shared by student and teacher, corrupt files, SA-1B read
straight from its tars (the same samples as extracted; damaged tars and members; the --sam-data
spec forms). The samplers and the stream: test_sampling.py."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import train
from data import (
    SA1B,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    CLIPImages,
    collate,
    collate_sam,
    list_images,
    rle_decode,
    rle_encode,
)
from sampling import FixedBatchSampler, VariableResolutionSampler
from toy import layouts

# ----------------------------------------------------------------------------- RLE


def test_rle_decode_uncompressed_by_hand():
    # Column by column: col0 = 0,0,1  col1 = 1,1,1  col2 = 1,0,0  col3 = 0,0,0
    # -> 0 0 | 1 1 1 1 1 | 0 0 0 0 0 -> counts [2, 5, 5]
    expected = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(rle_decode({"size": [3, 4], "counts": [2, 5, 5]}), expected)
    # a mask starting with a foreground pixel opens with a zero-length background run
    np.testing.assert_array_equal(rle_decode({"counts": [0, 1, 3]}, shape=(2, 2)), [[1, 0], [0, 0]])


def test_rle_is_column_major():
    # two ones first: column-major fills the first COLUMN, row-major would fill the first row
    np.testing.assert_array_equal(
        rle_decode({"size": [2, 3], "counts": [0, 2, 4]}), [[1, 0, 0], [1, 0, 0]]
    )


def test_rle_decode_compressed_by_hand():
    # counts [4, 10, 20, 2] on a 6x6 mask, each number written as 5-bit chunks (+48), low chunk
    # first;
    # 0x20 on a char means "more follow", 0x10 on the last char is the sign; counts[3] is stored as
    # counts[3] - counts[1]:
    #   4  -> 4            -> chr(52) '4'
    #   10 -> 10           -> chr(58) ':'
    #   20 -> 20 has 0x10 set, so it needs a second chunk: (20 | 0x20) = 52 -> 'd', then 0 -> '0'
    #   2 - 10 = -8 -> -8 & 31 = 24 (0x10 set: negative), -8 >> 5 = -1, done -> chr(72) 'H'
    # Column-major: col0 = 0 0 0 0 1 1, col1 = ones, col2 = 1 1 0 0 0 0, col3 col4 = zeros,
    # col5 = 0 0 0 0 1 1
    expected = np.array(
        [
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 1],
            [1, 1, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(rle_decode({"size": [6, 6], "counts": "4:d0H"}), expected)
    # 100 = 0b11_00100 -> low chunk 4 with "more" -> chr(4 + 32 + 48) 'T', then 3 -> '3';
    # 20 -> 'd0' as above.
    # counts [100, 20] on 10x12: ten zero columns, then two columns of ones
    m = rle_decode({"size": [10, 12], "counts": b"T3d0"})
    assert m.shape == (10, 12) and not m[:, :10].any() and m[:, 10:].all()


def test_rle_encode_matches_hand_strings_and_round_trips():
    assert rle_encode(rle_decode({"size": [6, 6], "counts": "4:d0H"}))["counts"] == "4:d0H"
    assert rle_encode(rle_decode({"size": [10, 12], "counts": "T3d0"}))["counts"] == "T3d0"
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), rng.random((1, 9)) > 0.5]
    masks += [rng.random((h, w)) > p for h, w, p in [(13, 17, 0.5), (40, 30, 0.9), (64, 64, 0.05)]]
    blocks = np.kron(rng.random((8, 8)) > 0.5, np.ones((20, 20), bool))
    masks.append(blocks)  # long runs -> multi-char numbers
    for m in masks:
        rle = rle_encode(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_decode(rle), m)


def test_rle_decode_rejects_wrong_total():
    with pytest.raises(ValueError, match="h\\*w"):
        rle_decode({"size": [3, 4], "counts": [2, 5]})


# ----------------------------------------------------------------------------- SA-1B


# three disjoint masks on a 200 (w) x 100 (h) image: two rectangles and a disc
def _sa1b_masks(h=100, w=200):
    yy, xx = np.mgrid[:h, :w]
    return [
        (yy >= 10) & (yy < 50) & (xx >= 20) & (xx < 60),
        (yy >= 60) & (yy < 95) & (xx >= 10) & (xx < 150),
        (yy - 30) ** 2 + (xx - 140) ** 2 < 20**2,
    ]


def _write_sa1b(folder, name, h=100, w=200):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, name + ".jpg"))
    anns = []
    for i, m in enumerate(_sa1b_masks(h, w)):
        ys, xs = np.nonzero(m)
        xywh = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
        anns.append(
            {
                "id": i,
                "segmentation": rle_encode(m),
                "area": int(m.sum()),
                "bbox": xywh,
                "predicted_iou": 0.9,
                "point_coords": [[float(xs[0]), float(ys[0])]],
                "stability_score": 0.95,
                "crop_box": [0, 0, w, h],
            }
        )
    with open(os.path.join(folder, name + ".json"), "w") as f:
        image = {"image_id": 1, "width": w, "height": h, "file_name": name + ".jpg"}
        json.dump({"image": image, "annotations": anns}, f)


@pytest.fixture
def sa1b_root(tmp_path):
    _write_sa1b(tmp_path / "sa1b", "sa_1")
    _write_sa1b(tmp_path / "sa1b" / "part2", "sa_2")
    (tmp_path / "sa1b" / "sa_3.jpg").write_bytes(b"no json beside me")  # not a pair: ignored
    return str(tmp_path / "sa1b")


def test_sa1b_layout_and_shapes(sa1b_root, tmp_path):
    ds = SA1B(sa1b_root, img_size=160, masks_per_image=5, max_points=3)
    assert [os.path.relpath(j, sa1b_root) for j, _ in ds.pairs] == [
        os.path.join("part2", "sa_2.jpg"),
        "sa_1.jpg",
    ]
    assert all(j[:-4] + ".json" == a for j, a in ds.pairs)
    s = ds[(0, 0)]
    assert s["ok"] and s["image"].shape == (3, 160, 160) and s["num_prompts"] == 3
    assert s["input_size"].tolist() == [80, 160] and s["original_size"].tolist() == [100, 200]
    assert s["image"][:, 80:].abs().sum() == 0  # padded bottom
    assert s["point_coords"].shape == (5, 3, 2) and s["point_labels"].shape == (5, 3)
    assert s["point_labels"].dtype == torch.int64 and s["boxes"].shape == (5, 4)
    assert s["valid"].tolist() == [True] * 3 + [False] * 2
    assert not s["has_box"][3:].any() and (s["point_labels"][3:] == -1).all()
    fewer = SA1B(sa1b_root, img_size=160, masks_per_image=2)
    assert fewer[0]["num_prompts"] == 2  # K < masks: K of them
    b = collate_sam([ds[(0, 0)], ds[(1, 0)]])
    assert b["image"].shape == (2, 3, 160, 160) and b["point_coords"].shape == (2, 5, 3, 2)
    assert (
        b["point_labels"].shape == (2, 5, 3)
        and b["boxes"].shape == (2, 5, 4)
        and b["has_box"].shape == (2, 5)
    )
    assert b["valid"].shape == (2, 5) and b["num_prompts"].tolist() == [3, 3] and b["ok"].all()
    assert b["input_size"].shape == (2, 2) and b["bad_paths"] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*sa_\\*.jpg"):
        SA1B(str(empty))


def test_sa1b_points_lie_in_their_mask(sa1b_root):
    masks = _sa1b_masks()
    sx = 160 / 200
    sy = 80 / 100
    ds = SA1B(sa1b_root, img_size=160, point_prob=1.0, max_points=3, seed=1)
    counts = set()
    for epoch in range(10):
        s = ds[(0, epoch)]
        assert not s["has_box"].any()
        for k in range(s["num_prompts"]):
            lab = s["point_labels"][k]
            n = int((lab == 1).sum())
            counts.add(n)
            assert 1 <= n <= 3 and (lab[:n] == 1).all() and (lab[n:] == -1).all()
            # the prompt encoder adds 0.5; that position maps back to an original pixel of the mask
            xy = s["point_coords"][k, :n].numpy()
            cols = np.floor((xy[:, 0] + 0.5) / sx).astype(int)
            rows = np.floor((xy[:, 1] + 0.5) / sy).astype(int)
            owner = [i for i, m in enumerate(masks) if m[rows[0], cols[0]]]
            assert len(owner) == 1 and masks[owner[0]][rows, cols].all()  # all points in one mask
    assert counts == {1, 2, 3}


def test_sa1b_boxes_scale_and_jitter(sa1b_root):
    masks = _sa1b_masks()
    exact = {
        tuple(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float))
        for xs, ys in ((np.nonzero(m)[1], np.nonzero(m)[0]) for m in masks)
    }
    # no jitter: the mask's extent, scaled into the 1024 x 512 frame of a 200 x 100 image
    s = SA1B(sa1b_root, img_size=1024, point_prob=0.0, box_jitter=0.0)[0]
    assert s["input_size"].tolist() == [512, 1024] and s["has_box"][:3].all()
    got = {tuple((s["boxes"][k].numpy() / 5.12).round(4)) for k in range(3)}
    assert got == exact and (s["point_labels"][:3] == -1).all()
    # heavy jitter: inside the image part of the frame, within the 20 px cap (scaled to 160 px) of
    # the truth
    ds = SA1B(sa1b_root, img_size=160, point_prob=0.0, box_jitter=0.5)
    cap = 20 * 160 / 1024
    truth = [np.array(b) * 0.8 for b in exact]
    moved = False
    for epoch in range(10):
        s = ds[(0, epoch)]
        for box in s["boxes"][:3].numpy():
            assert 0 <= box[0] <= box[2] <= 160 and 0 <= box[1] <= box[3] <= 80
            assert min(np.abs(box - t).max() for t in truth) <= cap + 1e-4
            moved |= min(np.abs(box - t).max() for t in truth) > 0.5
    assert moved


def test_sa1b_deterministic_and_mixed(sa1b_root):
    ds = SA1B(sa1b_root, img_size=160)
    a = ds[(0, 3)]
    b = ds[(0, 3)]
    c = ds[(0, 4)]
    for key in ("point_coords", "point_labels", "boxes", "has_box"):
        assert torch.equal(a[key], b[key])
    assert not all(torch.equal(a[key], c[key]) for key in ("point_coords", "boxes"))
    kinds = torch.cat([ds[(i % 2, e)]["has_box"][:3] for e in range(8) for i in range(2)])
    assert kinds.any() and not kinds.all()  # point_prob 0.5: both kinds


def test_sa1b_corrupt_image_or_json_is_skipped_counted_and_named(sa1b_root):
    """An unreadable image and a JSON file cut short: placeholders (ok=False), counted in
    ds.skipped, and one warning line each naming the file."""
    with open(os.path.join(sa1b_root, "sa_1.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    with open(os.path.join(sa1b_root, "part2", "sa_2.json"), "w") as f:
        f.write('{"annotations": [{"segmentation": ')
    ds = SA1B(sa1b_root, img_size=160, masks_per_image=4)
    assert ds.skipped == 0
    with pytest.warns(UserWarning) as record:
        samples = [ds[(i, 0)] for i in range(2)]
    for s in samples:
        assert not s["ok"] and s["num_prompts"] == 0 and not s["valid"].any()
        assert s["image"].shape == (3, 160, 160) and s["point_coords"].shape == (4, 3, 2)
    assert ds.skipped == 2
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "sa_2.json" in messages[0] and "sa_1.jpg" in messages[1]
    assert len(collate_sam(samples)["bad_paths"]) == 2


def _seg(size=(100, 200), counts="abc"):
    return {"annotations": [{"segmentation": {"size": list(size), "counts": counts}}]}


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"image": {}}, 'an "annotations" list'),
        ([1, 2], 'an "annotations" list'),
        ({"annotations": {"segmentation": {}}}, 'an "annotations" list'),
        ({"annotations": [{"bbox": [0, 0, 1, 1]}]}, r'annotations\[0\].*"segmentation"'),
        ({"annotations": [{"segmentation": {"counts": "abc"}}]}, '"size" and "counts"'),
        (_seg(size=(50, 200)), r"\[100, 200\]"),  # not the image's size
        (_seg(size=("100", "200")), r"\[100, 200\]"),  # ill-typed size
        (_seg(size=(100.0, 200.0)), r"\[100, 200\]"),
        (_seg(counts=7), "counts"),
        (_seg(counts=[1.5, 19998.5]), "counts"),
        (_seg(counts=[-1, 20001]), "counts"),
        (_seg(counts=[5, 10]), r"annotations\[0\].*sum to 15"),  # caught when the mask is decoded
        # 'a' says "more chars follow"
        (_seg(counts="0a"), r"annotations\[0\].*ends inside a number"),
    ],
)
def test_sa1b_malformed_annotations_are_skipped_with_one_clear_line(sa1b_root, doc, expected):
    """The schema SA1B reads (data.read_sa1b_annotations): {"annotations": [{"segmentation":
    {"size": [h, w] of the image, "counts": str or [int >= 0, ...]}}, ...]}; each break of it
    is a data.BadAnnotation, so the sample is skipped and counted, and the line says why."""
    path = os.path.join(sa1b_root, "part2", "sa_2.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    ds = SA1B(sa1b_root, img_size=160, masks_per_image=4)
    with pytest.warns(UserWarning, match=expected) as record:
        s = ds[(0, 0)]
    assert not s["ok"] and ds.skipped == 1
    message = str(record[0].message)
    assert len(record) == 1 and path in message and "\n" not in message
    assert ds[(1, 0)]["ok"] and ds.skipped == 1  # the good pair still reads


@pytest.mark.parametrize(
    "name, error",
    [
        ("rle_decode", TypeError),
        ("low_res_cells", IndexError),
        ("sam_preprocess", KeyError),
        ("preprocess_shape", ValueError),
        ("read_sa1b_annotations", TypeError),
    ],
)
def test_sa1b_bugs_in_our_own_code_raise(sa1b_root, monkeypatch, name, error):
    """A bug in data.py is not a bad file: it must stop the run, not be skipped as data."""

    def broken(*args, **kwargs):
        raise error("a bug in data.py")

    monkeypatch.setattr(data, name, broken)
    ds = SA1B(sa1b_root, img_size=160, masks_per_image=4)
    with pytest.raises(error, match="a bug in data.py"):
        ds[(0, 0)]
    assert ds.skipped == 0


def test_clip_images_bugs_in_our_own_code_raise(tmp_path, monkeypatch):
    """D_CLIP's reader follows the same rule: only an unreadable image (ImageError) is skipped."""
    Image.new("RGB", (50, 40), (200, 0, 0)).save(tmp_path / "a.jpg")
    ds = CLIPImages(str(tmp_path), teacher_size=16)

    def broken(*args, **kwargs):
        raise TypeError("a bug in data.py")

    monkeypatch.setattr(data, "random_resized_crop_box", broken)
    with pytest.raises(TypeError, match="a bug"):
        ds[(0, 32, 0)]
    monkeypatch.setattr(data.ImageOps, "exif_transpose", broken)  # after the decode, in load_image
    with pytest.raises(TypeError, match="a bug"):
        data.load_image(str(tmp_path / "a.jpg"))


# ----------------------------------------------------------------------------- D_CLIP


def _unnorm_sam(x):
    """SAM's normalisation undone: back to the 0-255 scale."""
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    return x * std + mean


def _unnorm_clip(x):
    """CLIP's normalisation undone: back to the 0-255 scale."""
    std = torch.tensor(clip.CLIP_STD).view(3, 1, 1)
    mean = torch.tensor(clip.CLIP_MEAN).view(3, 1, 1)
    return (x * std + mean) * 255


def test_student_and_teacher_share_the_crop(tmp_path):
    img = np.zeros((90, 120, 3), np.uint8)
    img[:, :60, 0] = 255  # left half red, right half blue
    img[:, 60:, 2] = 255
    Image.fromarray(img).save(tmp_path / "rb.png")
    ds = CLIPImages(str(tmp_path), teacher_size=24, scale=(0.1, 0.5))
    fractions = []
    for epoch in range(12):
        s = ds[(0, 48, epoch)]
        st = _unnorm_sam(s["student"])
        te = _unnorm_clip(s["teacher"])
        red_st = (st[0] > st[2]).float().mean().item()
        red_te = (te[0] > te[2]).float().mean().item()
        assert abs(red_st - red_te) < 0.07, (epoch, red_st, red_te)
        fractions.append(red_st)
    assert max(fractions) - min(fractions) > 0.3  # the crops do differ


def test_clip_images_sources_and_shapes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ["a/x.PNG", "a/b/y.jpg", "a/b/z.webp", "a/w.jpeg"]:
        Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / p)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    paths = list_images(str(tmp_path / "a"))
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        os.path.join("a", p) for p in ["b/y.jpg", "b/z.webp", "w.jpeg", "x.PNG"]
    ]
    (tmp_path / "list.txt").write_text("a/w.jpeg\n\na/b/y.jpg\n")
    ds = CLIPImages(str(tmp_path / "list.txt"), teacher_size=32)
    assert ds.paths == [str(tmp_path / "a" / "w.jpeg"), str(tmp_path / "a" / "b" / "y.jpg")]
    for r in (32, 64):
        s = ds[(1, r, 0)]
        assert s["ok"] and s["student"].shape == (3, r, r) and s["teacher"].shape == (3, 32, 32)
    assert torch.equal(ds[(0, 32, 5)]["student"], ds[(0, 32, 5)]["student"])  # seeded crop
    for bad in [str(tmp_path / "missing"), str(tmp_path / "a" / "b" / "y.jpg.lst")]:
        with pytest.raises(ValueError, match="missing|y.jpg.lst"):
            list_images(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        CLIPImages(str(tmp_path / "empty"))


def test_corrupt_clip_image_keeps_batches_full(tmp_path):
    for i in range(6):
        Image.new("RGB", (50, 40), (i * 40, 0, 0)).save(tmp_path / f"img{i}.jpg")
    (tmp_path / "img3.jpg").write_bytes(b"garbage bytes, not a jpeg")
    ds = CLIPImages(str(tmp_path), teacher_size=16)
    s = ds[(3, 32, 0)]
    assert not s["ok"] and s["path"].endswith("img3.jpg")
    assert (
        s["student"].shape == (3, 32, 32)
        and s["teacher"].shape == (3, 16, 16)
        and s["student"].abs().sum() == 0
    )
    sampler = VariableResolutionSampler(len(ds), 2, resolutions=(16, 32), drop_last=False)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = 0
    bad = []
    for batch in loader:
        r = batch["student"].shape[-1]
        assert batch["student"].shape[0] == sampler.batch_size(r) == batch["ok"].shape[0]
        assert batch["teacher"].shape[1:] == (3, 16, 16) and batch["ok"].dtype == torch.bool
        seen += len(batch["index"])
        bad += batch["bad_paths"]
        assert int((~batch["ok"]).sum()) == len(batch["bad_paths"])
    assert seen >= 6 and len(set(bad)) == 1 and bad[0].endswith("img3.jpg")


def test_sa1b_low_res_gt_masks_in_the_padded_frame(sa1b_root):
    # 200 x 100 image -> 160 x 80 in the 160 px frame (x 0.8); SAM's low-res grid is 40 x 40, 4 px
    # a cell. Cell (r, c) is the original pixel under its centre ((c + 0.5) * 4, (r + 0.5) * 4)
    # / 0.8, i.e. (5c + 2, 5r + 2); rows 20..39 lie in the padding (centres >= 80).
    ds = SA1B(sa1b_root, img_size=160, point_prob=0.0, box_jitter=0.0, masks_per_image=4)
    s = ds[(1, 0)]  # sa_1.jpg
    assert s["gt_masks"].shape == (4, 40, 40) and s["gt_masks"].dtype == torch.bool
    expected = [torch.zeros(40, 40, dtype=torch.bool) for _ in range(3)]
    # rows 10..49 -> r with 5r+2 in [10, 50): 2..9; cols 20..59 -> c 4..11
    expected[0][2:10, 4:12] = True
    # rows 60..94 -> r 12..18; cols 10..149 -> c 2..29
    expected[1][12:19, 2:30] = True
    disc = _sa1b_masks()[2]
    expected[2][:20] = torch.from_numpy(disc[np.ix_(5 * np.arange(20) + 2, 5 * np.arange(40) + 2)])
    # which mask each prompt came from: its (unjittered) box, scaled back by 1 / 0.8
    boxes = [
        tuple(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float))
        for xs, ys in ((np.nonzero(m)[1], np.nonzero(m)[0]) for m in _sa1b_masks())
    ]
    for k in range(3):
        owner = boxes.index(tuple((s["boxes"][k].numpy() / 0.8).round(4)))
        assert torch.equal(s["gt_masks"][k], expected[owner]), owner
    assert not s["gt_masks"][3].any()  # a padding row
    assert not s["gt_masks"][:, 20:].any()  # the padding of the frame
    # the draws that place follow-up points: uniform, fixed by (seed, epoch, index)
    again = ds[(1, 0)]
    other = ds[(1, 1)]
    draws = s["error_draws"]
    assert draws.shape == (4, 8) and 0 <= draws.min() and draws.max() < 1
    assert torch.equal(draws, again["error_draws"])
    assert not torch.equal(draws, other["error_draws"])
    b = collate_sam([ds[(0, 0)], s])
    assert b["gt_masks"].shape == (2, 4, 40, 40) and torch.equal(b["gt_masks"][1], s["gt_masks"])
    assert b["error_draws"].shape == (2, 4, 8)


def test_native_resolution_student_sees_sam_padding_teacher_a_square(tmp_path):
    rng = np.random.default_rng(0)
    # 40 x 20 and 20 x 40 with scale (1, 1): a crop of the whole area with aspect in 3/4..4/3 never
    # fits (its short side would be >= 24), so the crop is the fallback centre crop of aspect 4/3
    # (3/4): 27 x 20 at x = (40 - 27) // 2 = 6, and 20 x 27 at y = 6. At the native 40 px its long
    # side 27 becomes 40 and its short side 20 * 40 / 27 = 29.6 -> 30, then zero padding to 40 x 40.
    cases = {  # name: (image w, h), crop box, (h', w') of the resized crop
        "tall.png": ((20, 40), (0, 6, 20, 33), (40, 30)),
        "wide.png": ((40, 20), (6, 0, 33, 20), (30, 40)),
    }
    for name, ((w, h), _, _) in cases.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    ds = CLIPImages(str(tmp_path), teacher_size=16, scale=(1.0, 1.0), native_size=40)
    for i, path in enumerate(ds.paths):
        img = Image.open(path).convert("RGB")
        _, box, (h2, w2) = cases[os.path.basename(path)]
        item = ds[(i, 40, 0)]
        s = item["student"]  # (3, 40, 40)
        # zero padding bottom-right, in the normalised space
        assert (s[:, h2:] == 0).all() and (s[:, :, w2:] == 0).all()
        # content: integer pixels never equal SAM's fractional means
        assert (s[:, :h2, :w2] != 0).all()
        resized = img.crop(box).resize((w2, h2), Image.BILINEAR)
        assert torch.allclose(s[:, :h2, :w2], data.normalize_sam(data.to_tensor(resized)))
        # the teacher keeps its square view of the same crop
        square = img.resize((16, 16), Image.BICUBIC, box=box)
        assert torch.allclose(item["teacher"], data.normalize_clip(data.to_tensor(square)))
        # below the native side the crop is squashed to a square, no padding
        squashed = data.normalize_sam(data.to_tensor(img.resize((20, 20), Image.BICUBIC, box=box)))
        assert torch.allclose(ds[(i, 20, 0)]["student"], squashed)


# ----------------------------------------------------------------------------- SA-1B's tars


def _tar(path, files):
    """A tar at `path` holding `files` ({member name: bytes}) in that order."""
    with tarfile.open(path, "w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return str(path)


def _pair_files(folder, names):
    """{member name: bytes} of the _write_sa1b pairs `names`, written into `folder` first."""
    files = {}
    for name in names:
        _write_sa1b(folder, name)
        for ext in (".jpg", ".json"):
            files[name + ext] = (folder / (name + ext)).read_bytes()
    return files


@pytest.fixture
def sa1b_tar(tmp_path):
    """tars/sa_000000.tar: the pairs sa_1, sa_2, sa_3, members in that order."""
    (tmp_path / "tars").mkdir()
    files = _pair_files(tmp_path / "files", ["sa_1", "sa_2", "sa_3"])
    return _tar(tmp_path / "tars" / "sa_000000.tar", files)


def _members(ds):
    """(tar file name, member name) of every image of an SA1B, in sample order."""
    return [(os.path.basename(image.tar), image.name) for image, _ in ds.pairs]


def _tar_images(ds):
    """ "tar file name:member" of every image of an SA1B (an extracted one: its file name)."""
    return [os.path.basename(str(image)) for image, _ in ds.pairs]


def _assert_same_sample(a, b):
    """Two SA1B samples equal in every tensor and number (their paths differ)."""
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        elif key not in ("path", "bad_paths"):
            assert a[key] == b[key], key


def test_sa1b_tars_give_the_samples_of_the_extracted_layout(tmp_path):
    """toy.layouts writes the same scenes as SA-1B's tars and extracted: the same bytes, and SA1B
    reads them index for index into equal samples, also through a DataLoader worker and the
    D_SAM sampler."""
    tars = layouts.write_sa1b_tars(str(tmp_path / "tars"), 5, seed=0, per_tar=3)
    folder = layouts.write_sa1b(str(tmp_path / "files"), 5, seed=0)
    assert sorted(os.listdir(tars)) == ["sa_000000.tar", "sa_000001.tar"]
    for k, names in enumerate([["sa_0", "sa_1", "sa_2"], ["sa_3", "sa_4"]]):
        with tarfile.open(os.path.join(tars, f"sa_{k:06d}.tar")) as tar:
            members = [m.name for m in tar]
            assert members == [name + ext for name in names for ext in (".jpg", ".json")]
            for name in members:
                on_disk = open(os.path.join(folder, name), "rb").read()
                assert tar.extractfile(name).read() == on_disk
    from_tars = SA1B(tars, img_size=160, masks_per_image=4)  # a folder of tars
    from_files = SA1B(folder, img_size=160, masks_per_image=4)
    assert len(from_tars) == len(from_files) == 5
    assert _members(from_tars)[3] == ("sa_000001.tar", "sa_3.jpg")
    assert from_tars[(3, 0)]["path"] == os.path.join(tars, "sa_000001.tar") + ":sa_3.jpg"
    for i in range(5):
        for epoch in (0, 1):
            _assert_same_sample(from_tars[(i, epoch)], from_files[(i, epoch)])
    sampler = FixedBatchSampler(5, 2, seed=0)
    loader = torch.utils.data.DataLoader(
        from_tars, batch_sampler=sampler, collate_fn=collate_sam, num_workers=1
    )
    for batch, items in zip(loader, list(sampler)):
        _assert_same_sample(batch, collate_sam([from_files[item] for item in items]))


def _member_offsets(path):
    """member name -> (header offset, data offset, data size) of a tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar}


def _cut_inside(path, offsets):
    os.truncate(path, offsets["sa_3.json"][1] + 10)


def _cut_after_member(path, offsets):
    _, start, size = offsets["sa_3.json"]
    os.truncate(path, start + -(-size // 512) * 512)  # the data's last block, no end blocks


def _corrupt_header(path, offsets):
    with open(path, "r+b") as f:
        f.seek(offsets["sa_2.jpg"][0])
        f.write(b"\x01" * 512)


def _not_a_tar(path, offsets):
    with open(path, "wb") as f:
        f.write(b"not a tar file " * 100)


@pytest.mark.parametrize(
    "damage, expected, kept",
    [
        (_cut_inside, r"cut short inside member sa_3\.json", ["sa_1.jpg", "sa_2.jpg"]),
        (
            _cut_after_member,
            "cut short after member sa_3.json",
            ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"],
        ),
        (_corrupt_header, r"corrupt header at byte \d+, after member sa_1\.json", ["sa_1.jpg"]),
        (_not_a_tar, "not an uncompressed tar file", []),
    ],
)
def test_truncated_or_corrupt_tar_is_read_up_to_the_damage(
    sa1b_tar, tmp_path, damage, expected, kept
):
    """A tar cut short or with a bad header: its pairs before the damage are read, the rest
    skipped, one warning line naming the tar and where it broke; the other tars of the spec are
    read whole. A spec whose tars hold no pair is refused."""
    good = _tar(tmp_path / "tars" / "sa_000001.tar", _pair_files(tmp_path / "files", ["sa_4"]))
    damage(sa1b_tar, _member_offsets(sa1b_tar))
    with pytest.warns(UserWarning, match=expected) as record:
        ds = SA1B(f"{sa1b_tar}::{good}", img_size=160, masks_per_image=4)
    message = str(record[0].message)
    assert len(record) == 1 and sa1b_tar in message and "\n" not in message
    assert f"its {len(kept)} pair(s) before that are read" in message
    assert _members(ds) == [("sa_000000.tar", name) for name in kept] + [
        ("sa_000001.tar", "sa_4.jpg")
    ]
    assert all(ds[(i, 0)]["ok"] for i in range(len(ds)))
    if not kept:
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no sa_"):
            SA1B(sa1b_tar)


def test_bad_tar_members_are_skipped_counted_and_named(tmp_path):
    """An image member PIL cannot decode and a JSON member cut short are skipped and counted as in
    the extracted layout, each named "tar:member" in one line; so is a member the tar no longer
    holds whole (the tar cut short after it was indexed)."""
    files = _pair_files(tmp_path / "files", ["sa_1", "sa_2", "sa_3"])
    files["sa_1.jpg"] = b"\xff\xd8 not really a jpeg"
    files["sa_2.json"] = b'{"annotations": [{"segmentation": '
    path = _tar(tmp_path / "sa_000000.tar", files)
    ds = SA1B(path, img_size=160, masks_per_image=4)
    with pytest.warns(UserWarning) as record:
        samples = [ds[(i, 0)] for i in range(3)]
    assert [s["ok"] for s in samples] == [False, False, True] and ds.skipped == 2
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert f"{path}:sa_1.jpg: not a readable image" in messages[0]
    assert f"{path}:sa_2.json: not a readable JSON file" in messages[1]
    assert collate_sam(samples)["bad_paths"] == [f"{path}:sa_1.jpg", f"{path}:sa_2.jpg"]
    os.truncate(path, _member_offsets(path)["sa_3.jpg"][1] + 10)
    with pytest.warns(UserWarning, match=r"sa_3\.jpg: .*the tar ends \d+ bytes before"):
        assert not ds[(2, 0)]["ok"]
    assert ds.skipped == 3


def test_expand_braces():
    assert data.expand_braces("sa_{000..002}.tar") == ["sa_000.tar", "sa_001.tar", "sa_002.tar"]
    assert data.expand_braces("{8..10}") == ["8", "9", "10"]
    assert data.expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    assert data.expand_braces("{3..1}") == ["3", "2", "1"]  # as bash counts
    assert data.expand_braces("sa_{abc}.tar") == ["sa_{abc}.tar"]  # neither form: as it is


def test_sa1b_specs_folders_brace_ranges_lists_and_joins(tmp_path, sa1b_root):
    """--sam-data forms: a folder of tars, brace ranges, a list file (relative paths, comments),
    several joined with "::" (tars and an extracted folder alike), each in its own order; a spec
    matching nothing is refused with one line naming it."""
    tars = tmp_path / "tars"
    tars.mkdir()
    for k, name in enumerate(["sa_5", "sa_6", "sa_7"]):
        _tar(tars / f"sa_00000{k}.tar", _pair_files(tmp_path / "files", [name]))
    assert _tar_images(SA1B(str(tars))) == [
        "sa_000000.tar:sa_5.jpg",
        "sa_000001.tar:sa_6.jpg",
        "sa_000002.tar:sa_7.jpg",
    ]
    assert _tar_images(SA1B(f"{tars}/sa_{{000001..000002}}.tar")) == [
        "sa_000001.tar:sa_6.jpg",
        "sa_000002.tar:sa_7.jpg",
    ]
    listed = tmp_path / "d_sam.txt"
    listed.write_text("# D_SAM\n\ntars/sa_000002.tar\ntars/sa_{000000..000001}.tar\n")
    assert _tar_images(SA1B(str(listed)))[0] == "sa_000002.tar:sa_7.jpg"
    assert len(SA1B(str(listed))) == 3
    joined = SA1B(f"{tars}/sa_000001.tar::{sa1b_root}")
    assert _tar_images(joined) == ["sa_000001.tar:sa_6.jpg", "sa_2.jpg", "sa_1.jpg"]
    refused = {
        str(tmp_path / "nope.tar"): "matches nothing",
        f"{tars}/sa_{{000001..000004}}.tar": r"2 of its 4 files do not exist \(first: .*003\.tar\)",
        f"{tars}/sa_{{000001}}.tar": "matches nothing",  # not a range: a name with braces
        f"{tars}/sa_000001.tar::": "matches nothing",
    }
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    refused[str(tmp_path / "empty.txt")] = "names nothing"
    _write_sa1b(tars, "sa_9")  # extracted files beside tars: which did the user mean?
    refused[str(tars)] = "holds both 3 tar file"
    for spec, expected in refused.items():
        with pytest.raises(ValueError, match=expected):
            SA1B(spec)


def test_tar_index_is_stored_beside_the_tar_and_rebuilt_when_the_tar_changes(
    sa1b_tar, tmp_path, monkeypatch
):
    first = SA1B(sa1b_tar)
    stored = sa1b_tar + ".index.json"
    assert os.path.exists(stored)

    def no_indexing(path):
        raise AssertionError(f"{path} indexed again")

    monkeypatch.setattr(data, "index_tar", no_indexing)
    again = SA1B(sa1b_tar)  # read from the stored index
    assert _members(again) == _members(first)
    assert np.array_equal(again.pairs.parts[0].spans, first.pairs.parts[0].spans)
    monkeypatch.undo()
    _tar(sa1b_tar, _pair_files(tmp_path / "files", ["sa_8"]))  # another tar under the same name
    assert _members(SA1B(sa1b_tar)) == [("sa_000000.tar", "sa_8.jpg")]
    # a folder that cannot be written: the tar is indexed in memory, once per run, and says so
    os.remove(stored)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(data.tempfile, "NamedTemporaryFile", read_only)
    with pytest.warns(UserWarning, match="could not store the index of 1 tar"):
        ds = SA1B(sa1b_tar, img_size=160)
    assert ds[(0, 0)]["ok"] and not os.path.exists(stored)


def test_ranks_start_indexing_at_their_share_of_the_tars(tmp_path, monkeypatch):
    """On a first run, rank r of W starts indexing r/W of the way through the tars (the ranks of a
    job split the work); the samples keep the spec's order."""
    tars = tmp_path / "tars"
    tars.mkdir()
    for k in range(4):
        _tar(tars / f"sa_00000{k}.tar", _pair_files(tmp_path / "files", [f"sa_{k}"]))
    indexed = []
    real = data.load_tar_index

    def recorded(path):
        indexed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(data, "load_tar_index", recorded)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = SA1B(str(tars))
    assert indexed == ["sa_000002.tar", "sa_000003.tar", "sa_000000.tar", "sa_000001.tar"]
    assert [name for _, name in _members(ds)] == ["sa_0.jpg", "sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]


def test_train_reads_sa1b_tars(tmp_path):
    """A short distill run of the tiny preset on D_SAM given as a brace range of SA-1B tars."""
    clip_dir = layouts.write_clip_images(str(tmp_path / "clip"), 8)
    tars = layouts.write_sa1b_tars(str(tmp_path / "sa1b"), 4, per_tar=2)
    out = str(tmp_path / "run")
    sam_data = os.path.join(tars, "sa_{000000..000001}.tar")
    args = ["--preset", "tiny", "--device", "cpu", "--stage", "distill", "--out", out]
    args += ["--max-steps", "2"]
    train.main([*args, "--clip-data", os.path.join(clip_dir, "images"), "--sam-data", sam_data])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["sam_skipped"] == 0 and np.isfinite(m["loss_sam"]) for m in lines)
