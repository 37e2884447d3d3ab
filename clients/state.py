"""A site's state between rounds: in ``Context.state`` and, for the privacy ledger, on disk.

In deployment every message starts a fresh ClientApp process, so nothing may live in
module globals. What must survive from one round to the next lives in the node's
``Context.state`` (a RecordDict the SuperNode keeps for the run):

``fedmoco.model``   ArrayRecord: the whole MoCo state_dict: query encoder, the site's
                    key encoder, the v3 predictor, and the local key queue (K, D).
``fedmoco.trainer`` ConfigRecord ``{"blob": bytes}``: Trainer.state_dict() (SGD momentum,
                    LR schedule position) through ``torch.save``; loaded with
                    ``weights_only=True``, so it cannot run code.
``fedmoco.site``    ConfigRecord: rounds done, the last server round seen, and the key
                    privacy ledger (plain values, ``ledger.*`` entries).

``Context.state`` is per run. The privacy budget is per site and must outlive a run (a
restarted federation must not hand a site a fresh budget), so when the site sets
node_config ``state-dir`` the ledger is also written there (``key-ledger.pt``, plain values,
written atomically by ``fedmoco.checkpoint.atomic_save``) and read back before the Context's
copy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmoco.checkpoint import atomic_save
from fedmoco.moco import MoCo

MODEL, TRAINER, SITE = "fedmoco.model", "fedmoco.trainer", "fedmoco.site"
LEDGER_FILE = "key-ledger.pt"


@dataclass
class SiteState:
    """What a site restored from its Context (``None``/0 on its first round)."""

    model: dict[str, torch.Tensor] | None = None
    trainer: dict[str, Any] | None = None
    rounds_done: int = 0
    last_round: int = 0
    ledger: dict[str, Any] | None = None


def load_site_state(state: RecordDict, state_dir: Path | None) -> SiteState:
    """Read a site's state from ``state`` (Context.state); the ledger from ``state_dir`` first."""
    out = SiteState()
    if MODEL in state.array_records:
        out.model = {k: torch.from_numpy(a.numpy().copy()) for k, a in state.array_records[MODEL].items()}
    if TRAINER in state.config_records:
        blob = state.config_records[TRAINER]["blob"]
        out.trainer = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    if SITE in state.config_records:
        site = state.config_records[SITE]
        out.rounds_done = int(site.get("rounds-done", 0))
        out.last_round = int(site.get("last-round", 0))
        ledger = {k[len("ledger."):]: v for k, v in site.items() if k.startswith("ledger.")}
        out.ledger = ledger or None
    if state_dir is not None and (state_dir / LEDGER_FILE).is_file():
        # The on-disk ledger outlives runs; it is never behind the Context's copy because
        # both are written at the end of every round that released keys.
        out.ledger = dict(torch.load(state_dir / LEDGER_FILE, map_location="cpu", weights_only=True))
    return out


def save_site_state(state: RecordDict, model: MoCo, trainer_state: dict[str, Any], *, rounds_done: int,
                    last_round: int, ledger: dict[str, Any] | None, state_dir: Path | None) -> None:
    """Write a site's state into ``state`` (Context.state) and the ledger into ``state_dir``."""
    state[MODEL] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                                for k, v in model.state_dict().items()})
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    state[TRAINER] = ConfigRecord({"blob": buf.getvalue()})
    site: dict[str, Any] = {"rounds-done": rounds_done, "last-round": last_round}
    if ledger is not None:
        site.update({f"ledger.{k}": v for k, v in ledger.items()})
        if state_dir is not None:
            atomic_save(dict(ledger), state_dir / LEDGER_FILE)
    state[SITE] = ConfigRecord(site)

