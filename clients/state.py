"""A site's state between rounds: in ``Context.state`` and, with ``state-dir``, on disk.

In deployment every message starts a fresh ClientApp process, so nothing may live in
module globals. What must survive from one round to the next lives in the node's
``Context.state`` (a RecordDict the SuperNode keeps for the run):

``fedmoco.model``   ArrayRecord: the whole MoCo state_dict: query encoder, the site's
                    key encoder, the v3 predictor, and the local key queue (K, D).
``fedmoco.trainer`` ConfigRecord ``{"blob": bytes}``: Trainer.state_dict() (SGD momentum,
                    LR schedule position) through ``torch.save``; loaded with
                    ``weights_only=True``, so it cannot run code.
``fedmoco.site``    ConfigRecord: rounds done and the last server round seen.
``fedmoco.release-encoder`` ArrayRecord: the encoder this site's DP releases are computed
                    with (run_config ``release-ema``: a moving average of the global models it
                    received); absent while the site releases nothing.

The privacy ledger is NOT here: ``Context.state`` is per run and lives in the SuperNode's
memory, and a budget must outlive both. It is a file on the site's disk (``clients.ledger``).

With ``state-dir`` the whole site state is also written there after every round
(``site-state.pt``, atomically). A restarted ``flwr run`` gives every site an empty
Context; when the server then resumes at round r > 1 and the file holds round r - 1 or
earlier of a model with the same configuration, the site continues from it (local queue,
key encoder, optimizer and schedule) instead of starting cold. A new run (round 1) or
another model never picks it up.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmoco.checkpoint import atomic_save
from fedmoco.moco import MoCo

log = logging.getLogger("flwr.fedmoco.client")

MODEL, TRAINER, SITE, RELEASE = "fedmoco.model", "fedmoco.trainer", "fedmoco.site", "fedmoco.release-encoder"
STATE_FILE = "site-state.pt"


@dataclass
class SiteState:
    """What a site restored from its Context (``None``/0 on its first round)."""

    model: dict[str, torch.Tensor] | None = None
    trainer: dict[str, Any] | None = None
    rounds_done: int = 0
    last_round: int = 0
    release_encoder: dict[str, torch.Tensor] | None = None


def load_site_state(state: RecordDict, state_dir: Path | None, *, server_round: int = 1,
                    model_config: dict[str, Any] | None = None) -> SiteState:
    """Read a site's state from ``state`` (Context.state).

    An empty Context in a resumed run (``server_round`` > 1) falls back to the state saved
    in ``state_dir`` if it is from an earlier round of a model with ``model_config``.
    """
    out = SiteState()
    if MODEL not in state.array_records and state_dir is not None and server_round > 1:
        disk = _load_disk_state(state_dir, server_round, model_config)
        if disk is not None:
            out = disk
    if MODEL in state.array_records:
        out.model = {k: torch.from_numpy(a.numpy().copy()) for k, a in state.array_records[MODEL].items()}
    if RELEASE in state.array_records:
        out.release_encoder = {k: torch.from_numpy(a.numpy().copy()) for k, a in state.array_records[RELEASE].items()}
    if TRAINER in state.config_records:
        blob = state.config_records[TRAINER]["blob"]
        out.trainer = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    if SITE in state.config_records:
        site = state.config_records[SITE]
        out.rounds_done = int(site.get("rounds-done", 0))
        out.last_round = int(site.get("last-round", 0))
    return out


def _load_disk_state(state_dir: Path, server_round: int, model_config: dict[str, Any] | None) -> SiteState | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file must not stop the site: it starts cold
        log.warning("ignoring %s: not readable (%s)", path, exc)
        return None
    if saved.get("model_config") != model_config or saved.get("last_round", 0) >= server_round:
        return None
    return SiteState(model=saved["model"], trainer=saved["trainer"], rounds_done=saved["rounds_done"],
                     last_round=saved["last_round"], release_encoder=saved.get("release_encoder"))


def save_site_state(state: RecordDict, model: MoCo, trainer_state: dict[str, Any], *, rounds_done: int,
                    last_round: int, state_dir: Path | None,
                    model_config: dict[str, Any] | None = None,
                    release_encoder: dict[str, torch.Tensor] | None = None) -> None:
    """Write a site's state into ``state`` (Context.state) and, with ``state_dir``, to disk."""
    state[MODEL] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                                for k, v in model.state_dict().items()})
    if release_encoder is not None:
        state[RELEASE] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                                      for k, v in release_encoder.items()})
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    state[TRAINER] = ConfigRecord({"blob": buf.getvalue()})
    site: dict[str, Any] = {"rounds-done": rounds_done, "last-round": last_round}
    state[SITE] = ConfigRecord(site)
    if state_dir is not None:
        atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "trainer": trainer_state, "rounds_done": rounds_done, "last_round": last_round,
                     "model_config": model_config, "release_encoder": release_encoder}, state_dir / STATE_FILE)

