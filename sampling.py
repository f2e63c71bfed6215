"""Which samples each rank sees in which step (Sec. 4.1): the variable-resolution batch sampler of
CVNets/MobileViT (Mehta et al.) for D_CLIP, the fixed-size D_SAM sampler, and the resumable
stream of batches the training loop reads.

Its own concept, apart from data.py's readers: a reader turns one index into tensors and knows
nothing of steps, ranks or epochs; this file decides the order. Every choice here comes from a
generator seeded with (seed, epoch), never from global random state, so that
  - every rank builds the same plan for an epoch and takes its own slice of each global batch
    (ranks agree on the step's resolution and batch size, and never share a sample), and
  - a resumed run, started at any micro-batch, sees exactly the batches an uninterrupted one would.

Items yielded are what data.py's datasets take: (index, resolution, epoch) for data.CLIPImages,
(index, epoch) for data.SA1B.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import data

# ----------------------------------------------------------------------------- batch samplers


class VariableResolutionSampler:
    """CVNets' variable batch sampler (Mehta et al., MobileViT), used for D_CLIP in SAM-CLIP
    Sec. 4.1: each step picks one resolution r from `resolutions` and a batch size that keeps the
    pixels per batch about constant, round(base_batch_size * (base_resolution / r)^2) per rank.

    Every rank builds the same plan for an epoch: a permutation of all indices from a generator
    seeded with (seed, epoch), and the steps' resolutions from a second generator seeded likewise.
    Each step takes the next batch_size(r) * num_replicas indices (the global batch) and gives rank
    i the slice [i::num_replicas], so ranks agree on r and batch size and never share a sample. The
    epoch ends at the first step whose global batch no longer fits (drop_last), or, without
    drop_last, that step is filled up from the start of the permutation.
    Yields lists of (index, resolution, epoch), the items CLIPImages takes; use as `batch_sampler=`.
    Resume: set_epoch(epoch, start_step) skips the steps already taken in that epoch."""

    def __init__(
        self,
        num_samples,
        base_batch_size,
        resolutions=(224, 448),
        base_resolution=None,
        num_replicas=1,
        rank=0,
        seed=0,
        drop_last=True,
    ):
        self.num_samples = num_samples
        self.base_batch_size = base_batch_size
        self.resolutions = tuple(resolutions)
        self.base_resolution = base_resolution or min(self.resolutions)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0

    def batch_size(self, resolution):
        """This rank's batch size at `resolution`: the base batch's pixels, at least 1 image."""
        return max(1, round(self.base_batch_size * (self.base_resolution / resolution) ** 2))

    def set_epoch(self, epoch, start_step=0):
        """Call before each epoch; a resumed run passes the number of steps already taken in it."""
        self.epoch = epoch
        self.start_step = start_step

    def plan(self, epoch):
        """[(resolution, global batch size)] per step of `epoch`, the same on all ranks. It draws
        no permutation, so it is cheap enough to count the steps of every epoch up front."""
        g = torch.Generator().manual_seed(data.derive_seed(self.seed, epoch, 1))  # resolutions
        steps = []
        pos = 0
        while pos < self.num_samples:
            r = self.resolutions[torch.randint(len(self.resolutions), (1,), generator=g).item()]
            n = self.batch_size(r) * self.num_replicas
            if pos + n > self.num_samples and self.drop_last:
                break
            steps.append((r, n))
            pos += n
        return steps

    def batches(self, epoch, start_step=0):
        """This rank's batches of `epoch` from step `start_step` on, one list at a time."""
        steps = self.plan(epoch)
        g = torch.Generator().manual_seed(data.derive_seed(self.seed, epoch, 0))  # the order
        perm = torch.randperm(self.num_samples, generator=g)
        total = sum(n for _, n in steps)
        if total > self.num_samples:  # no drop_last: the last global batch wraps to the start
            perm = perm.repeat(-(-total // self.num_samples))
        pos = sum(n for _, n in steps[:start_step])
        for r, n in steps[start_step:]:
            mine = perm[pos : pos + n][self.rank :: self.num_replicas]  # this rank's slice
            yield [(i, r, epoch) for i in mine.tolist()]
            pos += n

    def __iter__(self):
        return self.batches(self.epoch, self.start_step)

    def __len__(self):
        return max(0, len(self.plan(self.epoch)) - self.start_step)


class FixedBatchSampler(VariableResolutionSampler):
    """D_SAM's batches (Sec. 4.1: 1024 px only, so one batch size): the sampler above with a single
    resolution, `batch_size` per rank. Yields lists of (index, epoch), the items SA1B takes."""

    def __init__(self, num_samples, batch_size, num_replicas=1, rank=0, seed=0, drop_last=True):
        # fewer samples than one global batch: drop_last would leave no batch at all, so wrap
        drop_last = drop_last and num_samples >= batch_size * num_replicas
        super().__init__(num_samples, batch_size, (1,), None, num_replicas, rank, seed, drop_last)

    def batches(self, epoch, start_step=0):
        for batch in super().batches(epoch, start_step):
            yield [(i, e) for i, _, e in batch]


# ----------------------------------------------------------------------------- the stream


def locate(sampler, micro, max_epochs=None):
    """Which (epoch, step within it) the `micro`-th micro-batch of a stream of epochs falls on."""
    epoch = 0
    while max_epochs is None or epoch < max_epochs:
        n = len(sampler.plan(epoch))
        if n == 0 and max_epochs is None:
            raise ValueError(empty_plan(sampler, epoch))
        if micro < n:
            return epoch, micro
        micro -= n
        epoch += 1
    return epoch, 0


def stream(loader, sampler, start_micro, max_epochs=None):
    """Yield (epoch, batch) from `start_micro` on, over epochs (endless when max_epochs is None);
    each epoch's order is fixed by (seed, epoch), so a resumed run sees exactly the batches an
    uninterrupted one would. `loader` iterates over `sampler` (its batch_sampler)."""
    epoch, skip = locate(sampler, start_micro, max_epochs)
    while max_epochs is None or epoch < max_epochs:
        if max_epochs is None and not sampler.plan(epoch):  # else an endless loop, no batch
            raise ValueError(empty_plan(sampler, epoch))
        sampler.set_epoch(epoch, skip)
        for batch in loader:
            yield epoch, batch
        epoch += 1
        skip = 0


def empty_plan(sampler, epoch):
    """The one-line error of an endless stream that met an epoch without a batch."""
    batch = sampler.batch_size(min(sampler.resolutions))
    return (
        f"epoch {epoch} of an endless batch stream holds no batch: {sampler.num_samples} "
        f"samples, fewer than one global batch of {sampler.num_replicas} x {batch}"
    )


@dataclass
class EpochTally:
    """This rank's D_CLIP images in the current epoch of the stream: how many it saw, how many
    were unreadable, and which, so that an epoch of nothing but placeholders stops the run."""

    seen: int = 0
    unreadable: int = 0
    unreadable_paths: list = field(default_factory=list)

    def count(self, clip_batch):
        self.seen += len(clip_batch["ok"])
        self.unreadable += int((~clip_batch["ok"]).sum())
        self.unreadable_paths += clip_batch["bad_paths"]

    def report(self, epoch, rank, world, device):
        """At the end of an epoch: how many unreadable images were skipped (all ranks), and which.
        -> True if not one image of the epoch was readable."""
        counts = torch.tensor([float(self.unreadable), float(self.seen)], device=device)
        if world > 1:
            dist.all_reduce(counts)  # sums over ranks
        unreadable = int(counts[0].item())
        seen = int(counts[1].item())
        if unreadable:
            print(
                f"[train] epoch {epoch}: skipped {unreadable} unreadable image(s) "
                f"(rank {rank} saw: {self.unreadable_paths[:5]})",
                flush=True,
            )
        return unreadable == seen > 0
