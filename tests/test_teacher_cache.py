# python -m pytest tests/test_teacher_cache.py -q
"""teacher_cache.py: a zero or NaN row counts as missing and is recomputed, a restart and a rank
of another world size read the rows as they are, and a row reaches the disk before its flag, so a
crash between the two leaves no flag without its row."""

import os

import numpy as np
import pytest
import torch

import teacher_cache


class FakeTeacher:
    """Embeds image i (all pixels (i + 1) / 4, see _teacher_images) as a row of (i + 1) / 4 + 1,
    exact in float16, and records which images it was asked for."""

    def __init__(self):
        self.asked = []

    def __call__(self, images):
        self.asked.append(sorted(int(v * 4 - 1) for v in images[:, 0, 0, 0]))
        return images.flatten(1)[:, :4] + 1.0  # (B, 4)


def _teacher_images(index):
    return ((index.float() + 1) / 4)[:, None, None, None].expand(-1, 3, 2, 2)  # (B, 3, 2, 2)


def test_teacher_cache_recomputes_zero_and_nan_rows(tmp_path):
    folder = str(tmp_path)
    meta = {"data": "x"}
    teacher = FakeTeacher()
    idx = torch.tensor([0, 1, 2])
    ok = torch.ones(3, dtype=torch.bool)
    expected = (idx.float()[:, None] + 1) / 4 + 1.0 + torch.zeros(3, 4)
    cache = teacher_cache.TeacherCache(folder, 6, 4, meta, rank=0)
    assert torch.equal(cache(idx, ok, _teacher_images(idx), teacher), expected)
    assert teacher.asked == [[0, 1, 2]]
    rows = np.memmap(os.path.join(folder, "rank0.rows"), np.float16, "r+").reshape(-1, 4)
    # the flags (index entries) of images 1 and 2 survive, their rows not
    rows[1] = 0.0
    rows[2] = np.nan
    rows.flush()
    del rows
    assert torch.equal(cache(idx, ok, _teacher_images(idx), teacher), expected)
    assert teacher.asked == [[0, 1, 2], [1, 2]]  # only the bad rows again
    # a restart, and rank 1 of another world size: the new rows win, nothing recomputed
    for rank in (0, 1):
        again = teacher_cache.TeacherCache(folder, 6, 4, meta, rank=rank)
        assert torch.equal(again(idx, ok, _teacher_images(idx), teacher), expected)
    assert teacher.asked == [[0, 1, 2], [1, 2]]


def test_teacher_cache_row_is_on_disk_before_its_flag(tmp_path, monkeypatch):
    folder = str(tmp_path)
    meta = {"data": "x"}
    teacher = FakeTeacher()
    rows_path = os.path.join(folder, "rank0.rows")
    cache = teacher_cache.TeacherCache(folder, 6, 4, meta, rank=0)
    events = []
    real_fsync = os.fsync
    real_append = teacher_cache.append_durable

    class Crash(Exception):
        pass

    def crash_at_flag(path, payload):
        events.append(("append", os.path.basename(path)))
        if path.endswith(".index"):  # die just before the flags are written
            raise Crash
        real_append(path, payload)

    def logged_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(teacher_cache, "append_durable", crash_at_flag)
    idx01 = torch.tensor([0, 1])
    ok = torch.ones(2, dtype=torch.bool)
    with pytest.raises(Crash):
        cache(idx01, ok, _teacher_images(idx01), teacher)
    # the rows were written and synced before the flag write began
    assert events == [
        ("append", "rank0.rows"),
        ("fsync", os.stat(rows_path).st_ino),
        ("append", "rank0.index"),
    ]
    assert os.path.getsize(rows_path) == 2 * 4 * 2  # 2 float16 rows of 4, unflagged
    monkeypatch.setattr(teacher_cache, "append_durable", real_append)
    # a restart cuts the unflagged rows off, so that new rows line up with their flags
    restart = teacher_cache.TeacherCache(folder, 6, 4, meta, rank=0)
    assert os.path.getsize(rows_path) == 0
    idx23 = torch.tensor([2, 3])
    restart(idx23, ok, _teacher_images(idx23), teacher)
    later = teacher_cache.TeacherCache(folder, 6, 4, meta, rank=0)
    assert torch.equal(
        later(idx23, ok, _teacher_images(idx23), teacher),
        (idx23.float()[:, None] + 1) / 4 + 1.0 + torch.zeros(2, 4),
    )
    later(idx01, ok, _teacher_images(idx01), teacher)  # 0 and 1 were never flagged: computed
    assert teacher.asked == [[0, 1], [2, 3], [0, 1]]
