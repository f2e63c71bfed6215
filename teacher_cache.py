"""The CLIP teacher's embeddings on disk (train.py --cache-teacher), written as training meets
each image and read back in every later epoch, stage and run.

Its own concept, apart from data.py's readers and the training loop: it is the one part of the
data path that writes while training runs, on every rank at once, so its file layout is a
protocol (which file each rank writes, in which order rows and their flags reach the disk, what
a reader does with a row a crash cut short), and that protocol is what keeps a resumed run exact
and the ranks from overwriting each other.

Why a cache at all: the frozen CLIP ViT-L/14 costs more than the student (Sec. 4.1). Caching
fixes each image's crop (data.CLIPImages(fixed_crops=True) draws every epoch's crop as epoch 0
does), so a stored embedding stays the right target in every epoch.
"""

import json
import os

import numpy as np
import torch
import torch.distributed as dist


def append_durable(path, payload):
    """Append bytes to `path` and return once they are on disk (flush + fsync), so that a write
    which depends on them (a cache row's index entry) can never reach the disk before them."""
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


class TeacherCache:
    """CLIP-teacher embeddings on disk (--cache-teacher), because the ViT-L/14 teacher costs more
    than the student. Caching fixes each image's crop (drawn with epoch 0) so a stored embedding
    stays the right target in every epoch.

    Each rank appends only to its own shard: rank<r>.rows (float16 rows of D values) and
    rank<r>.index (int64, the image of each row). An index entry is its row's "filled" flag and is
    appended only once the row is on disk, so no flag outlives its row; rows a crash left without
    an entry are cut off when the rank reopens its shard. No two writers share a file, so ranks on
    different nodes of a network filesystem cannot overwrite each other's pages. Every rank reads
    every shard (it looks for new entries when a batch holds an image it has no row for), so a cache
    made with another world size is read as it is and grows by the current ranks' shards. A row read
    back zero or non-finite (lost, or not yet visible on this node) counts as missing and is
    recomputed: a zero target trains nothing, since 1 - cos(x, 0) has no gradient."""

    def __init__(self, folder, num_samples, dim, meta, rank):
        os.makedirs(folder, exist_ok=True)
        # the layout is part of the settings, so that a cache of another layout is refused
        meta = {**meta, "dim": dim, "layout": "rank shards"}
        meta_path = os.path.join(folder, "meta.json")
        if rank == 0 and not os.path.exists(meta_path):
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
        if dist.is_initialized():
            dist.barrier()
        with open(meta_path) as f:
            if json.load(f) != meta:
                raise ValueError(
                    f"--cache-teacher {folder} was made for another teacher, data, seed or "
                    "cache layout; use a new folder"
                )
        self.folder = folder
        self.dim = dim
        self.rank = rank
        self.row_bytes = 2 * dim  # float16 rows
        rows = self.path(rank, "rows")
        entries = self.path(rank, "index")
        for path in (rows, entries):
            open(path, "ab").close()
        self.count = min(os.path.getsize(rows) // self.row_bytes, os.path.getsize(entries) // 8)
        os.truncate(rows, self.count * self.row_bytes)  # a row a crash left without its entry
        os.truncate(entries, 8 * self.count)  # half an entry
        # (N,) the shard holding image i's row, -1: none
        self.shard = np.full(num_samples, -1, np.int32)
        self.row = np.zeros(num_samples, np.int64)  # (N,) its row there
        self.seen = {}  # shard -> index entries taken in so far
        if dist.is_initialized():
            dist.barrier()  # every shard trimmed before any rank reads it
        self.refresh()

    def path(self, shard, kind):
        """The file of `shard` (a rank) that holds its "rows" or its "index"."""
        return os.path.join(self.folder, f"rank{shard}.{kind}")

    def refresh(self):
        """Take in the index entries every shard gained since the last look; an image's later entry
        replaces an earlier one (a recomputed row replaces a bad one)."""
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("rank") and name.endswith(".index") and name[4:-6].isdigit()):
                continue
            shard = int(name[4:-6])
            start = self.seen.get(shard, 0)
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(8 * start)
                raw = f.read()
            whole = len(raw) // 8 * 8  # a half-written entry waits for the next look
            new = np.frombuffer(raw[:whole], np.int64)
            last = len(new) - 1 - np.unique(new[::-1], return_index=True)[1]  # latest per image
            last = last[(new[last] >= 0) & (new[last] < len(self.shard))]
            self.shard[new[last]] = shard
            self.row[new[last]] = start + last
            self.seen[shard] = start + len(new)

    def read(self, idx):
        """(B, D) float32 rows of images idx (B,); NaN where there is no row or it cannot be read
        whole."""
        out = np.full((len(idx), self.dim), np.nan, np.float32)
        shards = self.shard[idx]
        for shard in np.unique(shards[shards >= 0]):
            with open(self.path(shard, "rows"), "rb") as f:
                for j in np.flatnonzero(shards == shard):
                    f.seek(self.row_bytes * int(self.row[idx[j]]))
                    raw = f.read(self.row_bytes)
                    if len(raw) == self.row_bytes:
                        out[j] = np.frombuffer(raw, np.float16)
        return out

    def append(self, idx, rows):
        """Store rows (n, D) of images idx (n,) in this rank's shard: the rows, then, once they are
        on disk, their index entries."""
        append_durable(self.path(self.rank, "rows"), rows.astype(np.float16).tobytes())
        append_durable(self.path(self.rank, "index"), idx.astype(np.int64).tobytes())
        self.shard[idx] = self.rank
        self.row[idx] = self.count + np.arange(len(idx))
        self.count += len(idx)

    def __call__(self, index, ok, teacher_images, teacher):
        """Embeddings (B, D) for a batch: cached rows read, missing or bad rows computed and stored.
        Placeholders of unreadable images are computed but never stored."""
        idx = index.numpy()
        if (self.shard[idx] < 0).any():
            self.refresh()  # another rank may have stored them since the last look
        rows = self.read(idx)  # (B, D)
        usable = np.isfinite(rows).all(1) & (rows != 0).any(1)
        todo = torch.from_numpy(~usable)  # (B,) missing, zero or NaN
        out = torch.from_numpy(rows).to(teacher_images.device)
        if todo.any():
            on_device = todo.to(out.device)
            out[on_device] = teacher(teacher_images[on_device]).half().float()  # as stored
            store = (todo & ok).numpy()
            if store.any():
                stored = out[torch.from_numpy(store).to(out.device)]
                self.append(idx[store], stored.cpu().numpy())
        return out
