"""Shared fixtures: tiny generated data, so every test runs on CPU in seconds."""

from __future__ import annotations

import os

import pytest
from torch.overrides import TorchFunctionMode

from fedmoco.data import one_thread


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every model in the suite is tiny: one intra-op thread is faster, and on a busy 2-core
    machine much faster (see fedmoco.data.one_thread)."""
    with one_thread():
        yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Index and sample caches go to a folder of this session, not the user's ~/.cache/fedmoco,
    and are built while 50 MB stay free rather than the default 2 GiB: the suite's caches take a
    few MB, and a CI box with a fresh 6 GB install may have under 2 GiB left (subprocesses
    inherit both through the environment)."""
    settings = {"FEDMOCO_CACHE_DIR": str(tmp_path_factory.mktemp("fedmoco-cache")),
                "FEDMOCO_CACHE_MIN_FREE_GB": "0.05"}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


class HostReads(TorchFunctionMode):
    """A context that records every tensor-to-Python read (``item``, ``tolist``, ``int(t)``,
    ``bool(t)``, ``nonzero``, ...) in ``.reads``. On a GPU each one stalls the host until the
    device has run everything queued, so code meant to stay asynchronous is checked with it
    on CPU tensors."""

    READS = frozenset({"item", "tolist", "__int__", "__bool__", "__float__", "__index__", "nonzero"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """``with host_reads() as spy: ...`` then ``spy.reads`` (see :class:`HostReads`)."""
    return HostReads


@pytest.fixture
def first_batch():
    """``first_batch(dataset)``: the first training batch of ``make_loader`` (batch 4, no
    workers, shuffle seed 3) after ``torch.manual_seed(0)``: what a seeded run starts with."""
    import torch

    from fedmoco.config import TrainConfig
    from fedmoco.train import make_loader

    def first(dataset):
        loader = make_loader(dataset, TrainConfig(batch_size=4, num_workers=0), torch.device("cpu"), seed=3)
        torch.manual_seed(0)
        return next(iter(loader))[0]

    return first


def _rewrite_keeping_mtime(path) -> None:
    """Write ``path``'s bytes again and put its mtime back, as ``cp -p`` or ``rsync -t`` over
    an equal-size file leave it: size and mtime unchanged, only the ctime moves on. Waits
    for the kernel's coarse clock (a tick of up to 10 ms) so that the ctime does move."""
    import os
    import time

    before = os.stat(path)
    data = open(path, "rb").read()
    for _ in range(100):
        time.sleep(0.01)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        if after.st_ctime_ns != before.st_ctime_ns:
            assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
            return
    raise AssertionError(f"{path}: its ctime did not move in 1 s")


@pytest.fixture
def rewrite_keeping_mtime():
    """``rewrite_keeping_mtime(path)``: rewrite a file leaving its size and mtime as they were."""
    return _rewrite_keeping_mtime
