"""The CLIP teacher's targets EncCLIP(x) of Eq. 1, computed once before training into one table
(train.py --cache-teacher) and only read while training runs.

Why a cache: the frozen CLIP ViT-L/14 costs more than the student (Sec. 4.1). With each image's
crop fixed (data.CLIPImages(fixed_crops=True) draws every epoch's crop as epoch 0 does), an
image's target is the same in every epoch, stage and run, so it is computed once.

Why a step before training rather than a cache filled as training goes: the training step then
only reads a table that nothing writes while it runs. A resumed run reads exactly the targets an
uninterrupted one read, whatever the crash, and ranks of any world size read the one file and
never write anything another rank reads. All writing happens in `build`, which can be stopped and
run again: each chunk of rows appears whole (written under a temporary name, then renamed), a
second run computes only the chunks still missing, and the table appears, again by a rename, only
once every row is in it.

Rows are found by the sample's key, not by a position or a file path: D_CLIP read from tar
shards (shards.py) comes in a new order every epoch and has no file per image. A key is the path
for a folder of images (data.CLIPImages), the WebDataset key for shards.

The folder:
  meta.json       what the table was made for (data, seed, teacher, teacher side, layout); a run
                  with other settings is refused rather than trained on the wrong targets
  keys.txt        line i is the key of the sample whose target is row i
  key_hashes.npy  (N,) uint64, shards.key_hash of every key, sorted; key_rows.npy (N,) int64 the
                  row of each: a key's row by binary search, without holding N strings in memory
  embeddings.npy  (N, D) float16, row i = EncCLIP of sample i's fixed crop, NaN for an image that
                  could not be read; present only once complete
  parts/          while the table is being built, one chunk per shard (or per CHUNK images of a
                  folder): <chunk>.npy its rows, <chunk>.keys.txt their keys

Shape legend: N samples, D embedding width, B batch.
"""

import json
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

import data
import shards

CHUNK = 1024  # folder images per part file: the most work a crash during the build can lose
BATCH = 64  # images per teacher call; fixed, so that a row does not depend on the run's batch
LAYOUT = "table by key"  # part of meta.json, so that a folder of another layout is refused


def build(folder, dataset, tower, meta, rank=0, world=1, device="cpu", workers=0):
    """Make sure `folder` holds the finished table of `dataset` (data.CLIPImages or
    shards.ShardImages, with fixed_crops) under the CLIP image tower `tower`, then open it. Call
    on every rank; each computes every world-th chunk still missing (compute_parts), rank 0 joins
    them (join).
    meta: the settings the table is for (a dict of JSON values). -> TeacherCache."""
    meta_path = os.path.join(folder, "meta.json")
    if rank == 0 and not os.path.exists(meta_path):  # once per job (RANK 0)
        os.makedirs(folder, exist_ok=True)
        with open(meta_path + ".tmp", "w") as f:
            json.dump({**meta, "layout": LAYOUT}, f)
        os.replace(meta_path + ".tmp", meta_path)
    if dist.is_initialized():
        dist.barrier()  # meta.json written before any rank reads it
    check_meta(folder, meta)
    if not os.path.exists(table_path(folder)):
        compute_parts(folder, dataset, tower, rank, world, device, workers)
        if dist.is_initialized():
            dist.barrier()  # every chunk written before rank 0 reads them
        if rank == 0:  # once per job (RANK 0): the folder must be one every node sees
            join(folder, chunk_count(dataset))
        if dist.is_initialized():
            dist.barrier()  # the table complete before any rank opens it
    return TeacherCache(folder, meta)


def check_meta(folder, meta):
    """Raise ValueError unless `folder` was made for the settings `meta`, so that the parts and
    tables of another teacher, data, seed or layout are never used."""
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise ValueError(f"--cache-teacher {folder} holds no meta.json: not a teacher cache")
    with open(path) as f:
        if json.load(f) != {**meta, "layout": LAYOUT}:
            raise ValueError(
                f"--cache-teacher {folder} was made for another teacher, data, seed or cache "
                "layout; use a new folder"
            )


def table_path(folder):
    return os.path.join(folder, "embeddings.npy")


def part_path(folder, chunk):
    return os.path.join(folder, "parts", f"{chunk:08d}.npy")


def keys_path(folder, chunk):
    return os.path.join(folder, "parts", f"{chunk:08d}.keys.txt")


def chunk_count(dataset):
    """The build's units of work: one per shard, or one per CHUNK images of a folder."""
    if isinstance(dataset, shards.ShardImages):
        return len(dataset.urls)
    return -(-len(dataset) // CHUNK)


def chunk_batches(dataset, chunks, workers=0):
    """The teacher views of the fixed crops of every sample of `chunks`, up to BATCH a batch, each
    batch with its "chunk" and "end" False, and {"chunk", "end": True} after a chunk's last."""
    if isinstance(dataset, shards.ShardImages):
        one_pass = shards.ShardPass(dataset, chunks, BATCH)
        yield from torch.utils.data.DataLoader(one_pass, batch_size=None, num_workers=workers)
        return
    n = len(dataset)
    T = dataset.teacher_size
    for chunk in chunks:
        items = [(i, T, 0) for i in range(chunk * CHUNK, min((chunk + 1) * CHUNK, n))]
        loader = torch.utils.data.DataLoader(
            dataset, BATCH, sampler=items, collate_fn=data.collate, num_workers=workers
        )
        for batch in loader:
            yield {**batch, "chunk": chunk, "end": False}
        yield {"chunk": chunk, "end": True}


@torch.no_grad()
def compute_parts(folder, dataset, tower, rank=0, world=1, device="cpu", workers=0):
    """This rank's chunks (rank r takes every world-th chunk from r on) that are not on disk yet:
    each sample's teacher view of its epoch-0 crop through `tower`, as float16, NaN for an
    unreadable image, and the samples' keys. Batches of BATCH start at chunk starts, so a row
    does not depend on the world size or on which chunks an earlier run finished."""
    os.makedirs(os.path.join(folder, "parts"), exist_ok=True)
    todo = range(rank, chunk_count(dataset), world)
    todo = [c for c in todo if not os.path.exists(part_path(folder, c))]  # else done before
    rows = {}  # chunk -> its (B, D) float16 arrays so far
    keys = {}  # chunk -> its keys so far
    for batch in chunk_batches(dataset, todo, workers):
        chunk = batch["chunk"]
        if batch["end"]:
            save_part(folder, chunk, rows.pop(chunk, []), keys.pop(chunk, []))
            continue
        emb = tower(batch["teacher"].to(device)).float().cpu()  # (B, D)
        emb[~batch["ok"]] = float("nan")  # an unreadable image has no row
        rows.setdefault(chunk, []).append(emb.half().numpy())
        keys.setdefault(chunk, []).extend(batch["key"])


def save_part(folder, chunk, rows, keys):
    """A chunk's rows and keys; its .npy, written last, marks it done. An empty shard's rows are
    a (0, 0) array."""
    tmp = keys_path(folder, chunk) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(key + "\n" for key in keys)
    os.replace(tmp, keys_path(folder, chunk))
    save_array(part_path(folder, chunk), np.concatenate(rows) if rows else np.zeros((0, 0)))


def join(folder, chunks):
    """The parts of `chunks` chunks -> embeddings.npy (N, D), keys.txt and the key index, then
    the parts removed. The table is written under a temporary name and renamed last: it exists
    only complete. A key found twice (a shard named twice in the spec) is refused: its rows
    could not be told apart."""
    missing = [c for c in range(chunks) if not os.path.exists(part_path(folder, c))]
    if missing:
        raise ValueError(
            f"--cache-teacher {folder}: {len(missing)} of {chunks} chunks missing after every "
            f"rank finished (e.g. parts/{missing[0]:08d}.npy); the folder must be one that "
            "every rank can see"
        )
    shapes = [np.load(part_path(folder, c), mmap_mode="r").shape for c in range(chunks)]
    width = max(shape[1] for shape in shapes)
    keys = []
    tmp = table_path(folder) + ".tmp.npy"
    table = np.lib.format.open_memmap(tmp, "w+", np.float16, (sum(s[0] for s in shapes), width))
    for c in range(chunks):
        if shapes[c][0]:
            table[len(keys) : len(keys) + shapes[c][0]] = np.load(part_path(folder, c))
        with open(keys_path(folder, c)) as f:
            keys += f.read().splitlines()
    table.flush()
    del table
    hashes = np.array([shards.key_hash(key) for key in keys], dtype=np.uint64)  # (N,)
    order = np.argsort(hashes, kind="stable")  # (N,) rows by hash
    twice = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if twice.size:
        raise ValueError(
            f"--cache-teacher {folder}: the sample key {keys[order[twice[0]]]!r} occurs twice "
            "in --clip-data (a shard named twice?); the cache finds rows by key"
        )
    save_array(os.path.join(folder, "key_hashes.npy"), hashes[order])
    save_array(os.path.join(folder, "key_rows.npy"), order.astype(np.int64))
    with open(os.path.join(folder, "keys.txt.tmp"), "w") as f:
        f.writelines(key + "\n" for key in keys)
    os.replace(os.path.join(folder, "keys.txt.tmp"), os.path.join(folder, "keys.txt"))
    os.replace(tmp, table_path(folder))
    shutil.rmtree(os.path.join(folder, "parts"))


def save_array(path, array):
    """np.save to `path` so that readers see no file or the whole one: a temporary name, flushed
    to disk, then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TeacherCache:
    """A finished table, read-only: the targets of a batch are its samples' rows, by key."""

    def __init__(self, folder, meta):
        check_meta(folder, meta)
        if not os.path.exists(table_path(folder)):
            raise ValueError(f"--cache-teacher {folder} holds no finished table (build it first)")
        self.table = np.load(table_path(folder), mmap_mode="r")  # (N, D) float16
        self.hashes = np.load(os.path.join(folder, "key_hashes.npy"), mmap_mode="r")  # (N,)
        self.rows = np.load(os.path.join(folder, "key_rows.npy"), mmap_mode="r")  # (N,)

    def find(self, keys):
        """Rows of `keys` (B strings) -> (rows (B,) int64, found (B,) bool): binary search of
        their hashes; a key the table lacks gets row 0 and found False."""
        wanted = np.array([shards.key_hash(key) for key in keys], dtype=np.uint64)  # (B,)
        where = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        found = self.hashes[where] == wanted
        return np.where(found, self.rows[where], 0), found

    def __call__(self, keys, ok, teacher_images, teacher):
        """(B, D) float32 targets of a batch: keys its B sample keys, ok (B,) bool. A sample's
        row, or, for a placeholder (ok False), a sample that had no row (unreadable when the
        table was built) or a key the table lacks, the teacher's answer to teacher_images
        (B, 3, T, T), as without a cache."""
        where, found = self.find(keys)
        rows = torch.from_numpy(self.table[where].astype(np.float32))  # (B, D)
        todo = ~ok | ~torch.from_numpy(found) | ~torch.isfinite(rows).all(1)  # (B,)
        rows = rows.to(teacher_images.device)
        if todo.any():
            on_device = todo.to(rows.device)
            rows[on_device] = teacher(teacher_images[on_device]).float()
        return rows
