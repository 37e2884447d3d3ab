"""Hand-built Flower messages for the server tests: no processes, no training.

A plain module (not conftest) so tests import it by a name no other test folder uses."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.task import RUN_DEFAULTS, moco_config, shared_arrays
from fedmoco.moco import MoCo
from server.validation import REQUIRED_METRICS

TINY = {**RUN_DEFAULTS, "arch": "tiny", "dim": 8, "hidden-dim": 16, "image-size": 16, "local-queue-size": 32}


def tiny_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return shared_arrays(MoCo(moco_config(TINY)))


def good_metrics(n: int = 10, **over: float) -> dict[str, float]:
    m = {k: 0.5 for k in REQUIRED_METRICS}
    m.update({"num-examples": n, "dp-keys-epsilon": 1.0, "dp-keys-delta": 1e-5, "dp-keys-releases": 1.0,
              "dp-keys-exhausted": 0.0, "dp-keys-budget": 8.0, "dp-status": 0.0, "skipped": 0})
    m.update(over)
    return m


def unit_keys(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).numpy()


def reply_content(arrays: ArrayRecord, keys: np.ndarray, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"arrays": arrays, "keys": ArrayRecord({"keys": Array(keys.astype(np.float32))}),
                       "metrics": MetricRecord(metrics)})


def shifted(arrays: ArrayRecord, delta: float) -> ArrayRecord:
    """Every array plus ``delta`` (same names, shapes, dtypes)."""
    return ArrayRecord({k: Array((a.numpy() + np.asarray(delta, a.numpy().dtype)).astype(a.numpy().dtype))
                        for k, a in arrays.items()})


def reply_from(node: int, content: RecordDict | None = None, *, error: str | None = None) -> Message:
    """A reply as the strategy receives it: src_node_id = ``node``."""
    from flwr.app import Error

    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    if error is not None:
        return Message(Error(code=2, reason=error), reply_to=instruction)
    return Message(content, reply_to=instruction)
