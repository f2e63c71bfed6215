# python -m pytest tests/test_segment_demo.py -q
"""segment_demo.py end to end, in-process through main(argv): both modes on images of odd PIL
modes and sizes write mask PNGs of the original (post-EXIF) size and an overlay; every bad input
ends with exit code 2 and exactly one line on stderr naming what is wrong."""

import os

import numpy as np
import pytest
from PIL import Image

import model as samclip_model
import segment_demo
from conftest import FIXTURES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A merged tiny checkpoint with random weights: enough to run every step of the pipeline."""
    path = tmp_path_factory.mktemp("ckpt") / "samclip.pt"
    samclip_model.build_samclip("tiny").save(str(path))
    return str(path)


def scene(w, h):
    return segment_demo.draw_example_scene().resize((w, h))


def make_image(kind, folder):
    """Write an image of an awkward kind; return (path, (W, H) as PIL reports it after EXIF
    rotation)."""
    path = os.path.join(folder, f"{kind}.png")
    if kind == "gray":
        scene(37, 53).convert("L").save(path)
        return path, (37, 53)
    if kind == "rgba":
        img = scene(64, 48).convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize((64, 48)))
        img.save(path)
        return path, (64, 48)
    if kind == "palette":
        scene(50, 31).convert("P", palette=Image.ADAPTIVE, colors=16).save(path)
        return path, (50, 31)
    if kind == "16bit":
        a = np.asarray(scene(45, 29).convert("L"), dtype=np.uint16) * 257  # (H, W) on 0..65535
        img = Image.fromarray(a)
        assert img.mode == "I;16"
        img.save(path)
        return path, (45, 29)
    if kind == "exif":  # stored 40 x 30, EXIF orientation 6 (rotate 90 clockwise to view): 30 x 40
        path = os.path.join(folder, "exif.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6
        scene(40, 30).save(path, exif=exif, quality=90)
        assert Image.open(path).size == (40, 30)
        return path, (30, 40)
    raise ValueError(kind)


CASES = [
    ("gray", "sam"),
    ("gray", "clip"),
    ("rgba", "sam"),
    ("palette", "clip"),
    ("16bit", "sam"),
    ("exif", "sam"),
    ("exif", "clip"),
]


@pytest.mark.parametrize("kind, mode", CASES)
def test_demo_writes_masks_at_the_original_size(ckpt, tmp_path, capsys, kind, mode):
    path, size = make_image(kind, str(tmp_path))
    out = tmp_path / "out"
    options = ["--checkpoint", ckpt, "--mode", mode, "--out", str(out), "--device", "cpu"]
    rc = segment_demo.main([path, "house", "red car!", *options])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("mask_1_house.png", "mask_2_red-car.png"):
        m = Image.open(out / name)
        assert m.mode == "L" and m.size == size
        assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
        assert str(out / name) in printed
    overlay = Image.open(out / "overlay.png")
    assert overlay.mode == "RGB" and overlay.height > size[1]  # image + legend strip below
    assert "px (" in printed and "confidence" in printed and "latency" in printed


def test_masks_are_disjoint_and_match_the_printed_areas(ckpt, tmp_path, capsys):
    path = str(tmp_path / "scene.jpg")
    segment_demo.draw_example_scene().save(path, quality=90)
    options = ["--checkpoint", ckpt, "--out", str(tmp_path), "--device", "cpu"]
    assert segment_demo.main([path, "house", "tree", "sky", *options]) == 0
    printed = capsys.readouterr().out
    names = ("house", "tree", "sky")
    masks = [
        np.asarray(Image.open(tmp_path / f"mask_{i + 1}_{s}.png")) > 0 for i, s in enumerate(names)
    ]
    assert (sum(m.astype(int) for m in masks) <= 1).all()  # one label per pixel
    for m, q in zip(masks, names):
        assert f"'{q}': {int(m.sum())} px" in printed


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def good_image(tmp_path):
    path = str(tmp_path / "ok.png")
    scene(32, 24).save(path)
    return path


def test_missing_and_corrupt_images(ckpt, tmp_path, capsys):
    missing = str(tmp_path / "nope.jpg")
    assert segment_demo.main([missing, "cat", "--checkpoint", ckpt]) == 2
    line = one_error_line(capsys)
    assert missing in line and "not found" in line
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a picture")
    assert segment_demo.main([str(corrupt), "cat", "--checkpoint", ckpt]) == 2
    line = one_error_line(capsys)
    assert str(corrupt) in line and "not a readable image" in line


BAD_PROMPTS = [
    (["cat", ""], "prompt 2 is empty"),
    (["   "], "prompt 1 is empty"),
    (["dog", " ".join(["word"] * 300)], "prompt 2 ('word word"),
]


@pytest.mark.parametrize("prompts, expect", BAD_PROMPTS)
def test_bad_prompts(ckpt, good_image, capsys, prompts, expect):
    assert segment_demo.main([good_image, *prompts, "--checkpoint", ckpt]) == 2
    line = one_error_line(capsys)
    assert expect in line
    if len(prompts[-1]) > 100:
        assert "too long" in line and "77" in line and len(line) < 400


def test_missing_and_wrong_checkpoints(good_image, tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "none.pt")
    assert segment_demo.main([good_image, "cat", "--checkpoint", missing]) == 2
    line = one_error_line(capsys)
    assert missing in line and "not found" in line
    sam = os.path.join(FIXTURES, "sam_tiny.pt")  # a SAM file, not a merged model
    assert segment_demo.main([good_image, "cat", "--checkpoint", sam]) == 2
    line = one_error_line(capsys)
    assert sam in line and "SAM-CLIP" in line
    monkeypatch.chdir(tmp_path)  # no runs/toy/samclip.pt here
    assert segment_demo.main([good_image, "cat"]) == 2
    line = one_error_line(capsys)
    assert "runs/toy/samclip.pt" in line
    assert "python -m toy.prepare && python train.py --preset toy --out runs/toy" in line


def test_slug():
    assert segment_demo.slug("Red car!") == "red-car"
    assert segment_demo.slug("  ") == "prompt" and segment_demo.slug("猫") == "prompt"
