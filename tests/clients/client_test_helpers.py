"""Building train messages and contexts for calling the ClientApp handler directly.

A plain module (not conftest) so tests import it by a name no other test folder uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.task import RUN_DEFAULTS, moco_config
from fedmoco.moco import MoCo

#: A model and schedule small enough for a round in well under a second.
TINY_RUN: dict[str, Any] = {
    **RUN_DEFAULTS, "arch": "tiny", "dim": 16, "hidden-dim": 32, "image-size": 32, "local-queue-size": 64,
    "batch-size": 8, "max-steps-per-epoch": 2, "domain": "images", "num-server-rounds": 3,
    "key-sample-rate": 0.25, "max-keys": 64,
    "key-release": "prototypes",  # these tests exercise sharing; the run default is none
    # fixed federation units: with each site's own image statistics an images site refuses to share
    "input-mean": "0.5", "input-std": "0.25",
}


def run_config(**over: Any) -> dict[str, Any]:
    return {**TINY_RUN, **over}


def context(node_config: dict[str, Any], run: dict[str, Any], node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(),
                   run_config=dict(run))


def global_model(run: dict[str, Any], seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(moco_config(run))


def train_message(arrays: ArrayRecord, server_round: int, *, node_id: int = 7,
                  negatives: np.ndarray | None = None, centres: np.ndarray | None = None) -> Message:
    """A train instruction as FedMoCo sends it (arrays, config, queue, and centres if given)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    if negatives is None:
        negatives = np.zeros((0, 16), np.float32)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round}),
                          "queue": ArrayRecord({"keys": Array(negatives.astype(np.float32))})})
    if centres is not None:
        content["centres"] = ArrayRecord({"centres": Array(centres.astype(np.float32))})
    return Message(content, dst_node_id=node_id, message_type="train")


def unit_rows(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).numpy()


def state_tensors(record: ArrayRecord, prefix: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items() if k.startswith(prefix)}


def make_images_site(root: Path, seed: int = 0) -> Path:
    from domains.images import make_demo_images

    return make_demo_images(root, n_per_class=6, size=32, seed=seed, rgb=False)


def dp_node(site: Path, ledger: Path, **over: Any) -> dict[str, Any]:
    """A site's node_config that shares DP summaries: its budget and its own ledger file."""
    return {"data-path": str(site), "dp-epsilon": 8.0, "dp-delta": 1e-5, "ledger-path": str(ledger), **over}
