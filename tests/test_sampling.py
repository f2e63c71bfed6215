# python -m pytest tests/test_sampling.py -q
"""sampling.py: the variable-resolution sampler keeps pixels per batch, ranks agree on the plan and
never share a sample, two ranks see exactly a one-rank run's global batches, a resumed sampler or
stream yields exactly the tail of an uninterrupted one, and an epoch's tally of unreadable images.
"""

import torch

from sampling import EpochTally, FixedBatchSampler, VariableResolutionSampler, stream

# ----------------------------------------------------------------------------- samplers


def test_pixels_per_batch_constant():
    s = VariableResolutionSampler(10_000, base_batch_size=64, resolutions=(224, 320, 448))
    assert s.base_resolution == 224 and s.batch_size(224) == 64 and s.batch_size(448) == 16
    for r in (224, 320, 448):
        exact = 64 * 224**2 / r**2
        assert abs(s.batch_size(r) - exact) <= 0.5  # pixels per batch within rounding
    assert VariableResolutionSampler(10, 3, resolutions=(224, 2048)).batch_size(2048) == 1


def test_sampler_ranks_agree_and_never_share():
    kw = dict(num_samples=1000, base_batch_size=8, resolutions=(224, 448), num_replicas=2, seed=7)
    r0 = VariableResolutionSampler(rank=0, **kw)
    r1 = VariableResolutionSampler(rank=1, **kw)
    for epoch in (0, 1):
        r0.set_epoch(epoch)
        r1.set_epoch(epoch)
        b0 = list(r0)
        b1 = list(r1)
        plan = r0.plan(epoch)
        assert len(b0) == len(b1) == len(r0) == len(plan) and {r for r, _ in plan} == {224, 448}
        seen = []
        for (res, n), x, y in zip(plan, b0, b1):
            assert {t[1] for t in x} == {t[1] for t in y} == {res}  # one resolution a step
            assert {t[2] for t in x + y} == {epoch}
            assert len(x) == len(y) == r0.batch_size(res) and len(x) + len(y) == n
            seen += [t[0] for t in x + y]
        assert len(seen) == len(set(seen))  # no sample twice, on any rank
        assert 1000 - len(seen) < 8 * 2  # only a tail short of a global batch dropped
    # coverage: the two ranks' batches together are exactly the global batches of a one-rank run
    # with twice the per-rank batch (same seed, so same resolutions and permutation)
    one = VariableResolutionSampler(1000, 16, resolutions=(224, 448), seed=7)
    one.set_epoch(1)
    two_ranks = [sorted(t[0] for t in x + y) for x, y in zip(b0, b1)]
    assert two_ranks == [sorted(t[0] for t in z) for z in one]


def test_sampler_determinism_and_resume():
    kw = dict(num_samples=500, base_batch_size=4, resolutions=(224, 448), num_replicas=2, rank=1)
    a = VariableResolutionSampler(seed=3, **kw)
    b = VariableResolutionSampler(seed=3, **kw)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)  # epochs differ
    assert list(VariableResolutionSampler(seed=4, **kw)) != list(b)  # seeds differ
    full = list(a.batches(1))
    a.set_epoch(1, start_step=5)
    assert list(a) == full[5:] and len(a) == len(full) - 5
    f = FixedBatchSampler(50, 4, num_replicas=2, rank=0, seed=1)
    f.set_epoch(2)
    full = list(f)
    assert len(full) == len(f) == 50 // 8 and all(len(x) == 4 and x[0][1] == 2 for x in full)
    f.set_epoch(2, start_step=4)
    assert list(f) == full[4:] and len(f) == 2


def test_fixed_sampler_ranks_and_no_drop_last():
    kw = dict(num_samples=21, batch_size=3, num_replicas=2, seed=0, drop_last=False)
    b0 = list(FixedBatchSampler(rank=0, **kw))
    b1 = list(FixedBatchSampler(rank=1, **kw))
    assert len(b0) == len(b1) == 4 and all(len(x) == len(y) == 3 for x, y in zip(b0, b1))
    idx = [i for x in b0 + b1 for i, _ in x]
    assert set(idx) == set(range(21)) and len(idx) == 24  # the last batch wraps around
    kw = dict(num_samples=100, base_batch_size=4, num_replicas=3, drop_last=False)
    v = VariableResolutionSampler(rank=2, **kw)
    v0 = VariableResolutionSampler(rank=0, **kw)
    assert {i for x in list(v) + list(v0) for i, _, _ in x} <= set(range(100))
    assert [len(x) for x in v] == [len(x) for x in v0]


# ----------------------------------------------------------------------------- the stream


def test_stream_resumed_at_any_micro_batch_is_the_tail_of_the_uninterrupted_one():
    """The resume property train.py relies on: stream(start_micro=m) yields exactly what an
    uninterrupted stream yields from its m-th micro-batch on, across epoch boundaries."""
    sampler = VariableResolutionSampler(30, 2, num_replicas=2, rank=1, seed=4)
    full = list(stream(sampler, sampler, 0, max_epochs=3))  # the sampler is its own loader
    assert {epoch for epoch, _ in full} == {0, 1, 2}
    for m in (0, 1, len(sampler.plan(0)), len(full) - 1, len(full)):
        assert list(stream(sampler, sampler, m, max_epochs=3)) == full[m:], m
    endless = stream(sampler, sampler, 5)  # no max_epochs: goes on
    assert [next(endless) for _ in range(len(full) - 5)] == full[5:]
    assert next(endless)[0] == 3


def test_epoch_tally_counts_unreadable_images_and_reports_an_epoch_of_none():
    tally = EpochTally()
    tally.count({"ok": torch.tensor([True, False]), "bad_paths": ["b.jpg"]})
    tally.count({"ok": torch.tensor([False]), "bad_paths": ["c.jpg"]})
    assert (tally.seen, tally.unreadable, tally.unreadable_paths) == (3, 2, ["b.jpg", "c.jpg"])
    assert not tally.report(0, rank=0, world=1, device="cpu")  # one image was readable
    none_readable = EpochTally(seen=2, unreadable=2)
    assert none_readable.report(1, rank=0, world=1, device="cpu")
    assert not EpochTally().report(2, rank=0, world=1, device="cpu")  # an empty epoch: no alarm
