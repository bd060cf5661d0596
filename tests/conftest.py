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


@pytest.fixture(scope="module")
def shared_clip(vit_b32):
    """Runs built in this module use the shared ViT-B-32 instead of building their own."""
    from mugcp.runs import run_setup

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
        yield vit_b32
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node Slurm cluster for this test session (tests/slurm_cluster.py); skips with
    the reason where it cannot start (no slurm-wlm/munge, not root)."""
    from slurm_cluster import cluster_or_skip

    with cluster_or_skip(tmp_path_factory.mktemp("slurm")) as running:
        yield running
