# python -m pytest tests/test_shards.py -q
"""shards.py: brace ranges and ::-joined specs, pipe: URLs, readers that own disjoint shards in a
per-epoch order fixed by (seed, epoch), a stream resumed at any micro-batch (across shard
boundaries, with DataLoader workers too) that is the tail of the uninterrupted one, one line per
bad input with the run going on (or refused at start), the teacher cache keyed by sample key, and
train.py end to end on toy shards."""

import itertools
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

import data
import sampling
import shards
import teacher_cache
import train
from toy import layouts

SMALL = dict(resolutions=(32, 64), teacher_size=16, seed=3)  # sides that decode fast


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """24 toy D_CLIP scenes in 8 shards of 3, as img2dataset writes them (with _stats.json)."""
    folder = str(tmp_path_factory.mktemp("shards"))
    return layouts.write_webdataset(folder, 24, seed=0, hand="train", per_shard=3)


def spec_of(folder, last=7):
    return f"{folder}/{{00000..{last:05d}}}.tar"


def loader(ds, workers):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def shard_lines(text):
    return [line for line in text.splitlines() if line.startswith("[shards]")]


# ----------------------------------------------------------------------------- specs


def test_brace_ranges_lists_and_joined_specs(shard_dir, tmp_path):
    expand = data.expand_braces  # the SA-1B tar specs' too
    assert expand("a/{000..003}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar", "a/003.tar"]
    assert expand("{8..11}") == ["8", "9", "10", "11"]  # no leading zero: no padding
    assert expand("{08..11}") == ["08", "09", "10", "11"]
    assert expand("{2..0}") == ["2", "1", "0"]
    assert expand("x{a,b}{0..1}") == ["xa0", "xa1", "xb0", "xb1"]  # groups multiply
    assert expand("{}{x}.tar") == ["{}{x}.tar"]  # neither a range nor a list: kept
    assert shards.is_shard_spec("/d/{0..3}.tar") and shards.is_shard_spec("pipe:curl -s u")
    assert shards.is_shard_spec("/a/images::/b/0.tar.gz")
    assert not shards.is_shard_spec("/data/images") and not shards.is_shard_spec("list.txt")
    other = str(tmp_path / "other")
    shutil.copytree(shard_dir, other)
    urls = shards.expand_spec(f"{spec_of(shard_dir, 1)}::{other}/00005.tar")
    assert urls == [
        (f"{shard_dir}/00000.tar", 0),
        (f"{shard_dir}/00001.tar", 0),
        (f"{other}/00005.tar", 1),
    ]
    # the epoch's length from img2dataset's _stats.json, else OpenCLIP's sizes.json
    assert shards.count_samples([url for url, _ in urls]) == 9
    with open(os.path.join(other, "sizes.json"), "w") as f:
        json.dump({"00005.tar": 2}, f)
    assert shards.count_samples([f"{other}/00005.tar"]) == 2
    # joined parts: each part's keys carry its number, as img2dataset numbers every set from 0
    ds = shards.ShardImages(f"{shard_dir}/00000.tar::{other}/00001.tar", 2, **SMALL)
    keys = {k for b in loader(ds, 0) for k in b["key"]}
    assert {k[:2] for k in keys} == {"0:", "1:"}
    assert keys <= {f"0:00000000{i}" for i in range(3)} | {f"1:00001000{i}" for i in range(3)}


def test_pipe_cat_reads_what_the_file_holds(shard_dir):
    path = f"{shard_dir}/00001.tar"
    direct = list(shards.read_shard(path))
    assert [key for key, _ in direct] == ["000010000", "000010001", "000010002"]
    assert all(set(fields) == {"jpg", "txt", "json"} for _, fields in direct)
    assert list(shards.read_shard(f"pipe:cat {path}")) == direct
    assert list(shards.read_shard(path, skip=2)) == direct[2:]
    # a whole pipe: spec gives the batches of the local one
    local = shards.ShardImages(spec_of(shard_dir), 2, **SMALL)
    piped = shards.ShardImages(f"pipe:cat {spec_of(shard_dir)}", 2, num_samples=24, **SMALL)
    for a, b in zip(loader(local, 0), loader(piped, 0), strict=True):
        assert a["key"] == b["key"] and torch.equal(a["student"], b["student"])


# ----------------------------------------------------------------------------- order


def test_readers_own_disjoint_shards_in_a_per_epoch_order(shard_dir):
    """2 ranks x 2 workers = 4 readers of 8 shards: every batch comes from its reader's own 2
    shards, the readers' shards split the set, and each epoch's order is (seed, epoch)'s."""
    ranks = [
        shards.ShardImages(spec_of(shard_dir), 2, num_replicas=2, rank=r, workers=2, **SMALL)
        for r in (0, 1)
    ]
    assert ranks[0].epoch_shards(0) == ranks[1].epoch_shards(0)  # the same plan on every rank
    assert ranks[0].epoch_shards(0) != ranks[0].epoch_shards(1)  # a new order each epoch
    again = shards.ShardImages(spec_of(shard_dir), 2, num_replicas=2, workers=2, **SMALL)
    assert again.epoch_shards(1) == ranks[0].epoch_shards(1)  # deterministic
    for epoch in (0, 1):
        order = ranks[0].epoch_shards(epoch)
        owned = [order[k::4] for k in range(4)]
        assert sorted(sum(owned, [])) == sorted(ranks[0].urls)
        for ds in ranks:
            ds.set_epoch(epoch)
            batches = list(loader(ds, 2))
            assert len(batches) == len(ds.plan(epoch))
            for step, batch in enumerate(batches):
                reader = batch["shard_position"][0].item()
                assert reader == ds.rank * 2 + step % 2  # steps alternate between the workers
                mine = {os.path.basename(url)[:5] for url in owned[reader]}
                assert {key[:5] for key in batch["key"]} <= mine, (epoch, step)


def run_stream(ds, workers, start, state=None, epochs=2):
    """The stream as train.py reads it from micro-batch `start` (resumed from `state`): a list of
    (epoch, keys, student views, shard positions), and the checkpoint state after each batch."""
    if state is not None:
        ds.resume(state)
    positions = shards.ReaderPositions(ds.readers, state)
    taken = []
    states = []
    for epoch, batch in sampling.stream(loader(ds, workers), ds, start, epochs):
        positions.update(epoch, batch)
        taken.append((epoch, batch["key"], batch["student"], batch["shard_position"].tolist()))
        states.append(positions.state(epoch, 1, "cpu"))
    return taken, states


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[1] == y[1] and x[3] == y[3] and torch.equal(x[2], y[2])


def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(shard_dir):
    """The resume property train.py relies on: resumed at micro-batch m from the positions saved
    after m batches, the stream yields exactly the uninterrupted stream's batches from m on,
    across shard and epoch boundaries; with DataLoader workers too."""

    def make(workers):
        return shards.ShardImages(spec_of(shard_dir), 2, workers=workers, **SMALL)

    full, states = run_stream(make(0), 0, 0)
    assert {epoch for epoch, *_ in full} == {0, 1}
    spans = [m for m, (_, keys, _, _) in enumerate(full) if len({k[:5] for k in keys}) > 1]
    assert spans  # some batches take the end of one shard and the start of the next
    for m in range(1, len(full) + 1):
        tail, _ = run_stream(make(0), 0, m, states[m - 1])
        same(tail, full[m:])
    full, states = run_stream(make(2), 2, 0)  # two readers, one per worker
    steps = len(make(2).plan(0))
    for m in (3, steps + 1):  # the second worker's turn first, in epochs 0 and 1
        tail, _ = run_stream(make(2), 2, m, states[m - 1])
        same(tail, full[m:])
    with pytest.raises(ValueError, match="read by 2 readers .* this run has 1"):
        make(0).resume(states[2])


# ----------------------------------------------------------------------------- bad input


def test_damaged_tars_are_one_line_each_and_the_other_shards_are_read(shard_dir, tmp_path, capsys):
    folder = str(tmp_path / "damaged")
    shutil.copytree(shard_dir, folder)
    cut = f"{folder}/00001.tar"
    with tarfile.open(cut) as tar:
        second_image = tar.getmembers()[3]  # sample 1's jpg
    with open(cut, "r+b") as f:
        f.truncate(second_image.offset_data + 10)
    with open(f"{folder}/00002.tar", "wb") as f:
        f.write(b"not a tar" * 100)
    urls = [f"{folder}/0000{i}.tar" for i in range(4)]
    capsys.readouterr()
    read = list(itertools.islice(shards.reader_samples(urls, (0, 0)), 7))  # one pass
    keys = [key for _, _, _, key, _ in read]
    before_the_cut = ["000010000"]
    assert keys == [f"00000000{i}" for i in range(3)] + before_the_cut + [
        f"00003000{i}" for i in range(3)
    ]
    lines = shard_lines(capsys.readouterr().out)
    assert len(lines) == 2
    assert "00001.tar: corrupt or truncated tar after 1 samples" in lines[0]
    assert "00002.tar: corrupt or truncated tar after 0 samples" in lines[1]
    # a whole epoch over them goes on (the reader wraps to its first shard)
    ds = shards.ShardImages(spec_of(folder), 2, **SMALL)
    assert len(list(loader(ds, 0))) == len(ds.plan(0))


def test_a_sample_without_an_image_is_one_line_and_a_counted_placeholder(
    shard_dir, tmp_path, capsys
):
    with tarfile.open(f"{shard_dir}/00000.tar") as tar:
        image = tar.extractfile("000000000.jpg").read()
    path = str(tmp_path / "x.tar")
    with tarfile.open(path, "w") as tar:
        layouts.add_member(tar, "a.jpg", image)
        layouts.add_member(tar, "a.txt", b"a caption")
        layouts.add_member(tar, "b.txt", b"no image here")
        layouts.add_member(tar, "b.json", b"{}")
        layouts.add_member(tar, "c.webp.broken", b"")  # no known image field either
        layouts.add_member(tar, "d.png", image)  # jpeg bytes named png: PIL reads them anyway
    with open(tmp_path / "sizes.json", "w") as f:
        json.dump({"x.tar": 4}, f)
    capsys.readouterr()
    ds = shards.ShardImages(path, 4, resolutions=(32,), teacher_size=16)
    (batch,) = list(loader(ds, 0))
    assert batch["key"] == ["a", "b", "c", "d"]
    assert batch["ok"].tolist() == [True, False, False, True]
    assert batch["bad_paths"] == [f"{path}:b", f"{path}:c"]
    lines = shard_lines(capsys.readouterr().out)
    assert len(lines) == 2 and "sample b has no image (fields json, txt;" in lines[0]
    tally = sampling.EpochTally()
    tally.count(batch)
    assert (tally.seen, tally.unreadable) == (4, 2)


def test_a_failing_pipe_command_is_one_line_and_the_other_shards_are_read(shard_dir, capsys):
    urls = [
        f"pipe:cat {shard_dir}/00000.tar",
        "pipe:echo 'no such bucket' >&2; exit 3",
        f"pipe:cat {shard_dir}/00001.tar",
    ]
    capsys.readouterr()
    read = list(itertools.islice(shards.reader_samples(urls, (0, 0)), 6))
    assert [key[:5] for _, _, _, key, _ in read] == ["00000"] * 3 + ["00001"] * 3
    lines = shard_lines(capsys.readouterr().out)
    assert lines == [
        "[shards] pipe:echo 'no such bucket' >&2; exit 3: command exited with status 3 after 0 "
        "samples (no such bucket); the rest of this shard is skipped"
    ]


def test_specs_that_match_nothing_or_too_few_shards_are_refused_at_start(shard_dir, capsys):
    with pytest.raises(ValueError, match=r"shard spec '.*/nothing/\{000..003\}.tar' matches no"):
        shards.ShardImages(f"{shard_dir}/nothing/{{000..003}}.tar", 2)
    with pytest.raises(ValueError, match="8 shards, fewer than the 9 readers .* 3 workers"):
        shards.ShardImages(spec_of(shard_dir), 2, num_replicas=3, workers=3)
    with pytest.raises(ValueError, match="pass --clip-samples N"):
        shards.ShardImages(f"pipe:cat {shard_dir}/00000.tar", 2)
    capsys.readouterr()
    ds = shards.ShardImages(f"{shard_dir}/{{00006..00009}}.tar", 2)  # 2 of 4 exist
    assert len(ds.urls) == 2 and ds.num_samples == 6
    (line,) = shard_lines(capsys.readouterr().out)
    assert "2 of 4 shards missing (e.g. " in line and "00008.tar); reading the other 2" in line


# ----------------------------------------------------------------------------- teacher cache


def test_teacher_cache_is_keyed_by_sample_key(shard_dir, tmp_path):
    def tower(images):  # a stand-in for the CLIP image tower: (B, 3, T, T) -> (B, 3)
        return images.mean((2, 3))

    ds = shards.ShardImages(spec_of(shard_dir), 2, fixed_crops=True, **SMALL)
    meta = {"clip_data": ds.spec, "n": ds.num_samples, "seed": 3, "teacher": "mean"}
    cache = teacher_cache.build(str(tmp_path / "cache"), ds, tower, meta, workers=2)
    with open(tmp_path / "cache" / "keys.txt") as f:
        keys = f.read().splitlines()
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(8) for i in range(3))
    ds.set_epoch(2)  # another epoch, order and resolutions: the same fixed crops
    for batch in itertools.islice(loader(ds, 0), 3):
        rows = cache(batch["key"], batch["ok"], batch["teacher"], None)  # no teacher call
        assert torch.allclose(rows, tower(batch["teacher"]), atol=2e-3)


# ----------------------------------------------------------------------------- train.py


def test_train_probe_on_shards_end_to_end_and_resumed(shard_dir, tmp_path):
    common = ["--preset", "tiny", "--device", "cpu", "--stage", "probe"]
    common += ["--clip-data", spec_of(shard_dir)]
    common += ["--sam-data", shard_dir, "--save-every", "1"]  # probe reads no D_SAM
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    train.main([*common, "--out", a, "--max-steps", "3"])
    train.main([*common, "--out", b, "--max-steps", "2"])
    saved = torch.load(os.path.join(b, "ckpt_probe.pt"), weights_only=True)
    assert saved["clip_shards"]["readers"] == 1 and saved["clip_shards"]["positions"] != [[0, 0]]
    train.main([*common, "--out", b, "--max-steps", "3", "--resume"])
    with open(os.path.join(a, "metrics.jsonl")) as f:
        ma = [json.loads(line) for line in f]
    with open(os.path.join(b, "metrics.jsonl")) as f:
        mb = [json.loads(line) for line in f]
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        assert x["resolution"] == y["resolution"]
        assert x["loss_clip"] == pytest.approx(y["loss_clip"], rel=1e-5)
    with pytest.raises(SystemExit, match="matches no file") as e:
        train.main([*common, "--out", str(tmp_path / "c"), "--clip-data", f"{a}/{{0..3}}.tar"])
    assert "\n" not in str(e.value)
    assert np.isfinite([m["loss_clip"] for m in ma]).all()
