"""Shared test setup: no network, and one random-weight ViT-B-32 backbone per test session."""
import os

# Tests never reach a hub, and Triton kernels run on the CPU through the interpreter.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def vit_b32():
    """A frozen ViT-B-32 with random weights (real architecture); building one takes seconds, so share it."""
    from mugcp.backbones import load_clip

    torch.manual_seed(0)
    return load_clip("ViT-B-32", pretrained=None)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node Slurm cluster for this test session (tests/slurm_cluster.py); skips with
    the reason where it cannot start (no slurm-wlm/munge, not root)."""
    from slurm_cluster import ClusterUnavailable, running_cluster

    cluster = running_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        running = cluster.__enter__()
    except ClusterUnavailable as err:
        pytest.skip(f"no private Slurm cluster here: {err}")
    try:
        yield running
    finally:
        cluster.__exit__(None, None, None)
