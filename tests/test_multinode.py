# python -m pytest tests/test_multinode.py -q
"""train.py on two nodes, simulated on loopback: two torchrun agents of one process each meet
through the c10d rendezvous on 127.0.0.1 (the README's multi-node command, on one machine), and
their run gives the losses of one process on the same global batch. Across nodes each process is
LOCAL_RANK 0 of its node, RANK 0 or 1 of the job: this catches code that takes one for the other
(two processes of one node, test_train.py's test_two_processes_match_one, cannot)."""

import json
import os
import socket
import subprocess
import sys

import pytest

import train
from conftest import ROOT
from toy import layouts

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port():
    """A TCP port free on 127.0.0.1 now (the OS picks it), for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_nodes_match_one_process(tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 (c10d rendezvous), gloo, half the batch per node ==
    1 process with the whole global batch. Both "nodes" write to one --out, as the nodes of a real
    job share a filesystem: checkpoints and metrics.jsonl come from RANK 0 only."""
    clip_dir = layouts.write_clip_images(str(tmp_path / "clip"), 24)
    sam_dir = layouts.write_sa1b(str(tmp_path / "sa1b"), 6)
    # 48 and 96 px: the batch at 96 px is exactly a quarter (2 of 8), so it splits the same on 1
    # or 2 ranks (test_train.py's test_two_processes_match_one says more)
    common = ["--preset", "tiny", "--device", "cpu", "--stage", "distill", "--max-steps", "2"]
    common += ["--clip-data", os.path.join(clip_dir, "images"), "--sam-data", sam_dir]
    common += ["--resolutions", "48", "96"]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    train.main([*common, "--out", one])
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    rendezvous += ["--rdzv-id", "test"]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    node += [*rendezvous, os.path.join(ROOT, "train.py"), *common, "--out", two]
    nodes = [
        subprocess.Popen(
            node, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]
    # RANK 0 logs, on one node only; the other node's process is LOCAL_RANK 0 too, but RANK 1
    logged = ["[train] stage distill: done" in out for out, _ in outputs]
    assert sorted(logged) == [False, True]
    m1 = metrics(one)
    m2 = metrics(two)
    assert len(m1) == len(m2) == 2
    for x, y in zip(m1, m2):
        assert x["resolution"] == y["resolution"]
        for k in ("loss", "loss_clip", "loss_sam", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
