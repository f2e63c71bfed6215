"""Shared test set-up: the repository root on sys.path, the fixture files, and tsv manifests."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def sam_fixture():
    return torch.load(os.path.join(FIXTURES, "sam_tiny.pt"), weights_only=True)


@pytest.fixture(scope="session")
def clip_fixture():
    return torch.load(os.path.join(FIXTURES, "clip_tiny.pt"), weights_only=True)


def meta_state_dict(tsv_name):
    """A full-size official checkpoint's keys as meta tensors of their listed shapes (no memory)."""
    sd = {}
    with open(os.path.join(FIXTURES, tsv_name)) as f:
        for line in f:
            key, shape, _dtype = line.rstrip("\n").split("\t")
            sd[key] = torch.empty(json.loads(shape), device="meta")
    return sd
