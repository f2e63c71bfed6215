# python -m pytest tests/test_teacher_cache.py -q
"""teacher_cache.py: row i is the teacher's answer to image i's fixed crop (any epoch's), an
unreadable image gets no row and its placeholder the teacher's answer, a build stopped half way
and run again (with another world size) gives the table of an uninterrupted build and computes
only what is missing, and a folder made for other settings is refused."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import teacher_cache

META = {"clip_data": "x", "n": 7, "seed": 0, "teacher": "fake", "teacher_size": 8}


class FakeTower:
    """A CLIP image tower stand-in: each image (3, T, T) -> its 3 channel means and their sum,
    so a row is known by hand from the image; records how many images it was asked for."""

    def __init__(self, fail_after=None):
        self.images = 0
        self.fail_after = fail_after  # raise once this many images were embedded: a crash

    def __call__(self, images):
        if self.fail_after is not None and self.images >= self.fail_after:
            raise RuntimeError("crash")
        self.images += len(images)
        means = images.mean((2, 3))  # (B, 3)
        return torch.cat([means, means.sum(1, keepdim=True)], 1)  # (B, 4)


@pytest.fixture
def images(tmp_path):
    """7 images of one colour each (image i: (30 i, 60, 90)); image 3 unreadable."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (40, 30), (30 * i, 60, 90)).save(folder / f"img{i}.png")
    (folder / "img3.png").write_bytes(b"not a png")
    return data.CLIPImages(str(folder), teacher_size=8, fixed_crops=True)


def by_hand(i):
    """The tower's answer to image i's teacher view: a one-colour crop stays one colour."""
    means = (np.array([30.0 * i, 60.0, 90.0]) / 255.0 - clip.CLIP_MEAN) / clip.CLIP_STD
    return np.append(means, means.sum()).astype(np.float16)


def test_rows_are_the_teachers_answers_to_each_images_fixed_crop(tmp_path, images):
    tower = FakeTower()
    cache = teacher_cache.build(str(tmp_path / "c"), images, tower, META)
    table = np.load(tmp_path / "c" / "embeddings.npy")
    assert table.shape == (7, 4) and tower.images == 7  # every image once
    for i in (0, 1, 2, 4, 5, 6):
        np.testing.assert_allclose(table[i], by_hand(i), atol=2e-3)
    assert np.isnan(table[3]).all()  # unreadable: no row
    with open(tmp_path / "c" / "keys.txt") as f:
        assert f.read().splitlines() == images.paths  # line i: the key (path) of image i
    assert not os.path.exists(tmp_path / "c" / "parts")
    # a batch of epoch 5 (fixed crops: epoch 0's) gets the rows; the placeholder of image 3 gets
    # the teacher's answer to the placeholder, as without a cache; the table is not computed again
    batch = data.collate([images[(i, 16, 5)] for i in (5, 3, 0)])
    out = cache(batch["key"], batch["ok"], batch["teacher"], tower)  # rows found by key
    assert torch.equal(out[0], torch.from_numpy(table[5].astype(np.float32)))
    assert torch.equal(out[2], torch.from_numpy(table[0].astype(np.float32)))
    assert torch.equal(out[1], FakeTower()(batch["teacher"][1:2])[0])
    assert tower.images == 8
    again = teacher_cache.build(str(tmp_path / "c"), images, tower, META)  # a later run: reads
    assert tower.images == 8 and np.array_equal(again.table, table, equal_nan=True)


def test_a_build_stopped_and_finished_on_two_ranks_equals_an_uninterrupted_one(
    tmp_path, images, monkeypatch
):
    monkeypatch.setattr(teacher_cache, "CHUNK", 2)  # 4 chunks of 7 images
    monkeypatch.setattr(teacher_cache, "BATCH", 2)
    teacher_cache.build(str(tmp_path / "whole"), images, FakeTower(), META)
    whole = np.load(tmp_path / "whole" / "embeddings.npy")
    folder = str(tmp_path / "stopped")
    with pytest.raises(RuntimeError, match="crash"):  # dies in its third chunk
        teacher_cache.build(folder, images, FakeTower(fail_after=3), META)
    done = [name for name in os.listdir(os.path.join(folder, "parts")) if name.endswith(".npy")]
    assert sorted(done) == ["00000000.npy", "00000001.npy"]
    with pytest.raises(ValueError, match="no finished table"):
        teacher_cache.TeacherCache(folder, META)
    # run again as 2 ranks (each rank's part of build; a real run's barrier orders them so):
    # rank 0 owns chunks 0 and 2, rank 1 chunks 1 and 3, and only 2 and 3 are missing
    towers = [FakeTower(), FakeTower()]
    for rank in (1, 0):
        teacher_cache.compute_parts(folder, images, towers[rank], rank, world=2)
    assert [tower.images for tower in towers] == [2, 1]
    teacher_cache.join(folder, teacher_cache.chunk_count(images))
    assert np.array_equal(np.load(os.path.join(folder, "embeddings.npy")), whole, equal_nan=True)
    tower = FakeTower()
    teacher_cache.build(folder, images, tower, META)  # finished: only read
    assert tower.images == 0


def test_join_refuses_a_folder_where_a_ranks_chunks_are_missing(tmp_path, images, monkeypatch):
    monkeypatch.setattr(teacher_cache, "CHUNK", 3)
    folder = str(tmp_path / "c")
    teacher_cache.compute_parts(folder, images, FakeTower(), rank=0, world=2)  # rank 1's unseen
    with pytest.raises(ValueError, match="1 of 3 chunks missing.*every rank can see"):
        teacher_cache.join(folder, teacher_cache.chunk_count(images))
    assert not os.path.exists(os.path.join(folder, "embeddings.npy"))


def test_a_folder_made_for_other_settings_is_refused(tmp_path, images):
    teacher_cache.build(str(tmp_path / "c"), images, FakeTower(), META)
    with pytest.raises(ValueError, match="another teacher, data, seed or cache layout"):
        teacher_cache.build(str(tmp_path / "c"), images, FakeTower(), {**META, "seed": 1})
    (tmp_path / "old").mkdir()  # the earlier layout (rank shards) is refused, not misread
    (tmp_path / "old" / "meta.json").write_text('{"layout": "rank shards"}')
    with pytest.raises(ValueError, match="another teacher"):
        teacher_cache.TeacherCache(str(tmp_path / "old"), META)
