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

The folder:
  meta.json       what the table was made for (data, seed, teacher, teacher side, layout); a run
                  with other settings is refused rather than trained on the wrong targets
  images.txt      the index: line i is the path of image i, whose target is row i
  embeddings.npy  (N, D) float16, row i = EncCLIP of image i's fixed crop, NaN for an image that
                  could not be read; present only once complete
  parts/          chunks of CHUNK rows while the table is being built

Shape legend: N images, D embedding width, B batch.
"""

import json
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

import data

CHUNK = 1024  # images per part file: the most work a crash during the build can lose
BATCH = 64  # images per teacher call; fixed, so that a row does not depend on the run's batch
LAYOUT = "table"  # part of meta.json, so that a folder of another layout is refused


def build(folder, dataset, tower, meta, rank=0, world=1, device="cpu", workers=0):
    """Make sure `folder` holds the finished table of `dataset` (data.CLIPImages with
    fixed_crops) under the CLIP image tower `tower`, then open it. Call on every rank; each
    computes every world-th chunk still missing (compute_parts), rank 0 joins them (join).
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
            join(folder, dataset.paths)
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


@torch.no_grad()
def compute_parts(folder, dataset, tower, rank=0, world=1, device="cpu", workers=0):
    """This rank's chunks (chunk c holds images c * CHUNK ..; rank r takes every world-th chunk
    from r on) that are not on disk yet: each image's teacher view of its epoch-0 crop through
    `tower`, as float16, NaN for an unreadable image. Batches of BATCH start at chunk starts, so
    a row does not depend on the world size or on which chunks an earlier run finished."""
    os.makedirs(os.path.join(folder, "parts"), exist_ok=True)
    n = len(dataset)
    T = dataset.teacher_size
    for chunk in range(rank, -(-n // CHUNK), world):
        path = part_path(folder, chunk)
        if os.path.exists(path):  # finished by an earlier run
            continue
        items = [(i, T, 0) for i in range(chunk * CHUNK, min((chunk + 1) * CHUNK, n))]
        loader = torch.utils.data.DataLoader(
            dataset, BATCH, sampler=items, collate_fn=data.collate, num_workers=workers
        )
        rows = []
        for batch in loader:
            emb = tower(batch["teacher"].to(device)).float().cpu()  # (B, D)
            emb[~batch["ok"]] = float("nan")  # an unreadable image has no row
            rows.append(emb.half().numpy())
        save_array(path, np.concatenate(rows))


def join(folder, paths):
    """The parts -> embeddings.npy (N, D) and images.txt, then the parts removed. The table is
    written under a temporary name and renamed last: it exists only complete."""
    chunks = -(-len(paths) // CHUNK)
    missing = [c for c in range(chunks) if not os.path.exists(part_path(folder, c))]
    if missing:
        raise ValueError(
            f"--cache-teacher {folder}: {len(missing)} of {chunks} chunks missing after every "
            f"rank finished (e.g. parts/{missing[0]:08d}.npy); the folder must be one that "
            "every rank can see"
        )
    first = np.load(part_path(folder, 0))
    tmp = table_path(folder) + ".tmp.npy"
    table = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(paths), first.shape[1]))
    for c in range(chunks):
        table[c * CHUNK : (c + 1) * CHUNK] = np.load(part_path(folder, c))
    table.flush()
    del table
    with open(os.path.join(folder, "images.txt.tmp"), "w") as f:
        f.writelines(path + "\n" for path in paths)
    os.replace(os.path.join(folder, "images.txt.tmp"), os.path.join(folder, "images.txt"))
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
    """A finished table, read-only: the targets of a batch are its images' rows."""

    def __init__(self, folder, meta):
        check_meta(folder, meta)
        if not os.path.exists(table_path(folder)):
            raise ValueError(f"--cache-teacher {folder} holds no finished table (build it first)")
        self.table = np.load(table_path(folder), mmap_mode="r")  # (N, D) float16

    def __call__(self, index, ok, teacher_images, teacher):
        """(B, D) float32 targets of a batch: index (B,) its images, ok (B,) bool. An image's
        row, or, for a placeholder (ok False) or an image that had no row (unreadable when the
        table was built), the teacher's answer to teacher_images (B, 3, T, T), as without a
        cache."""
        rows = torch.from_numpy(self.table[index.numpy()].astype(np.float32))  # (B, D)
        todo = ~ok | ~torch.isfinite(rows).all(1)  # (B,)
        rows = rows.to(teacher_images.device)
        if todo.any():
            on_device = todo.to(rows.device)
            rows[on_device] = teacher(teacher_images[on_device]).float()
        return rows
