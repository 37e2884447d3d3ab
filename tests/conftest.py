"""Shared fixtures: tiny generated data, so every test runs on CPU in seconds."""

from __future__ import annotations

import os

import pytest

from fedmoco.data import one_thread


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every model in the suite is tiny: one intra-op thread is faster, and on a busy 2-core
    machine much faster (see fedmoco.data.one_thread)."""
    with one_thread():
        yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Index and sample caches go to a folder of this session, not the user's ~/.cache/fedmoco
    (subprocesses inherit it through the environment)."""
    before = os.environ.get("FEDMOCO_CACHE_DIR")
    os.environ["FEDMOCO_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedmoco-cache"))
    yield
    if before is None:
        os.environ.pop("FEDMOCO_CACHE_DIR", None)
    else:
        os.environ["FEDMOCO_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """Four shape classes x 12 generated RGB PNGs of 32 px, one sub-folder per class."""
    from domains.images import make_demo_images

    return make_demo_images(tmp_path_factory.mktemp("images"), n_per_class=12, size=32, seed=0)


# Tiny model and short schedule for CLI runs.
TINY_PRETRAIN = ["--arch", "tiny", "--hidden-dim", "32", "--dim", "16", "--queue-size", "64",
                 "--image-size", "32", "--batch-size", "16", "--workers", "0", "--epochs", "2"]


@pytest.fixture
def tiny_pretrain_args():
    return list(TINY_PRETRAIN)


@pytest.fixture(scope="session")
def tiny_pretrain_flags():
    """TINY_PRETRAIN for module- or session-scoped fixtures (a tuple: no test can change it)."""
    return tuple(TINY_PRETRAIN)
