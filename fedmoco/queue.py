"""A FIFO ring buffer of L2-normalised key embeddings (MoCo's dictionary)."""

from __future__ import annotations

import torch
from torch import nn

from fedmoco.errors import ConfigError


class KeyQueue(nn.Module):
    """Fixed-size FIFO of keys. ``enqueue`` accepts any batch size and wraps around.

    Unlike moco's ``builder.py`` it does not assume ``size % batch == 0`` (the last batch of
    an epoch is usually short), and unlike lightly's memory bank it starts empty, so no
    random vectors pose as negatives and ``.keys`` only ever holds real keys.

    Buffers (saved in ``state_dict``): ``buffer`` (size, dim), ``ptr`` and ``count`` scalars.
    The write position and fill level are also kept as Python ints, so that ``len``, ``keys``
    and ``enqueue`` never read a device value: on a GPU each such read stalls the host until
    every queued kernel has run, twice per MoCo step (``benchmarks/moco_step.py``). The
    buffers are written alongside for checkpoints, and read back once on ``load_state_dict``.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if int(size) < 1:
            raise ConfigError(f"queue size K must be >= 1, got {size}")
        if int(dim) < 1:
            raise ConfigError(f"queue dim must be >= 1, got {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("buffer", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._ptr = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        ptr, count = int(self.ptr), int(self.count)  # one read per load, not per step
        # An edited or foreign checkpoint: refused here (load_state_dict's callers turn this into
        # one line) rather than as a shape error, or len() < 0, at the first enqueue.
        if not (0 <= ptr < self.size and 0 <= count <= self.size):
            raise ValueError(f"{prefix}ptr {ptr} / {prefix}count {count} outside a queue of {self.size} keys")
        self._ptr, self._count = ptr, count

    @property
    def keys(self) -> torch.Tensor:
        """The filled part, (n, dim), n = len(self). Order is storage order, not age."""
        return self.buffer[: len(self)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Insert ``keys`` (N, dim), overwriting the oldest entries once full."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"enqueue: expected keys of shape (N, {self.dim}), got {tuple(keys.shape)}")
        keys = keys.detach().to(self.buffer.dtype)
        if keys.shape[0] > self.size:  # only the newest `size` keys survive anyway
            keys = keys[-self.size :]
        n = keys.shape[0]
        ptr = self._ptr
        first = min(n, self.size - ptr)
        self.buffer[ptr : ptr + first] = keys[:first]
        if n > first:  # wrap around to the start
            self.buffer[: n - first] = keys[first:]
        self._ptr = (ptr + n) % self.size
        self._count = min(self.size, self._count + n)
        self.ptr.fill_(self._ptr)  # fills from Python numbers: queued, never waited for
        self.count.fill_(self._count)

    def reset(self) -> None:
        self.buffer.zero_()
        self.ptr.zero_()
        self.count.zero_()
        self._ptr = self._count = 0
