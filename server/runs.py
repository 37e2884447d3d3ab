"""A federation run's identity, its run_config check, and what happens to an out-dir that
already holds a run.

Identity (docs/federation.md, "Runs and resume"): ``config-hash`` is a SHA-256 prefix of
the run_config keys that define the model and the global queue (:data:`IDENTITY_KEYS`);
``run-id`` is new for every fresh run and kept by a resumed one. Both go into the round
checkpoint and ``encoder.pt`` (``federation``); ``run-id`` is on every line of ``rounds.jsonl``.

Out-dir rules:

* ``resume=true`` and a round checkpoint with the same ``config-hash``: the run continues;
* ``resume=true`` and a checkpoint of another configuration: refused (ConfigError naming
  each differing key), nothing is touched;
* otherwise (``resume=false``, or no checkpoint): a fresh run. Outputs of an earlier run
  are moved, not appended to or overwritten, to ``<out-dir>/previous-runs/<time>-<run-id>/``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clients.task import (KEY_RELEASE_MODES, RUN_DEFAULTS, check_run_ranges, moco_config, parse_options, run_value,
                          train_config)
from fedmoco.data import DOMAINS
from fedmoco.errors import ConfigError, FedmocoError
from fedmoco.metrics import keep_records, read_jsonl

#: run_config keys that define the global model and queue: a run resumed with other values
#: would continue a different federation's model.
IDENTITY_KEYS = ("domain", "arch", "in-channels", "image-size", "small-input", "norm", "dim", "hidden-dim", "mlp",
                 "predictor", "symmetric", "local-queue-size", "global-queue-size", "input-mean", "input-std")
#: What a fresh run moves out of the way (the names server.app writes).
OUTPUTS = ("server-state.pt", "rounds.jsonl", "encoder.pt", "plots")
BACKUP_DIR = "previous-runs"


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    config_hash: str
    config: dict[str, Any]  # the IDENTITY_KEYS values the hash is computed from
    started: str  # UTC, ISO 8601

    def to_dict(self) -> dict[str, Any]:
        return {"run-id": self.run_id, "config-hash": self.config_hash, "config": dict(self.config),
                "started": self.started}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunIdentity":
        return cls(run_id=str(d["run-id"]), config_hash=str(d["config-hash"]), config=dict(d["config"]),
                   started=str(d.get("started", "")))


def identity_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IDENTITY_KEYS` values of ``run_config`` (defaults filled in, types coerced)."""
    return {k: run_value(run_config, k) for k in IDENTITY_KEYS}


def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:16]


def new_identity(run_config: Mapping[str, Any]) -> RunIdentity:
    """A fresh run: new ``run-id`` (UTC time + 6 random hex digits), hash of its config."""
    now = time.gmtime()
    config = identity_config(run_config)
    return RunIdentity(run_id=time.strftime("%Y%m%dT%H%M%SZ", now) + "-" + secrets.token_hex(3),
                       config_hash=config_hash(config), config=config,
                       started=time.strftime("%Y-%m-%dT%H:%M:%SZ", now))


def check_resume(out: Path, saved: Mapping[str, Any], run_config: Mapping[str, Any]) -> RunIdentity | None:
    """The identity of the run in ``out`` to continue; ConfigError if ``run_config`` is
    another configuration. None for a checkpoint written before runs had identities (the
    caller then checks the model config alone and starts a new identity)."""
    if "run-identity" not in saved:
        return None
    old = RunIdentity.from_dict(saved["run-identity"])
    now = identity_config(run_config)
    if config_hash(now) != old.config_hash:
        diffs = [f"{k} {old.config.get(k)!r} (saved) vs {now[k]!r} (now)" for k in IDENTITY_KEYS
                 if old.config.get(k) != now[k]]
        raise ConfigError(f"{out}: resume=true, but run {old.run_id} there has another configuration ("
                          f"{'; '.join(diffs) or 'config-hash differs'}); use another out-dir, or resume=false to "
                          f"start a new run there (the old one is moved to {out / BACKUP_DIR})")
    return old


def move_previous_run(out: Path) -> Path | None:
    """Move an earlier run's outputs in ``out`` to ``out/previous-runs/<time>-<run-id>/``;
    returns that folder, or None when there was nothing to move."""
    present = [out / name for name in OUTPUTS if (out / name).exists()]
    if not present:
        return None
    old_id = last_run_id(out / "rounds.jsonl") or "unidentified"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out / BACKUP_DIR / f"{stamp}-{old_id}"
    n = 1
    while dest.exists():  # two fresh runs in one second
        n += 1
        dest = out / BACKUP_DIR / f"{stamp}-{old_id}-{n}"
    dest.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), dest / path.name)
    return dest


def last_run_id(metrics: Path) -> str | None:
    """The ``run-id`` of the last run that wrote to ``metrics`` (rounds.jsonl), if any."""
    if not metrics.is_file():
        return None
    ids = [rec["run-id"] for rec in read_jsonl(metrics) if rec.get("run-id")]
    return str(ids[-1]) if ids else None


class FederationFailed(FedmocoError):
    """The run ended without any round updating the global model."""


def no_update_message(last_sites: list[dict[str, Any]], rounds: int, metrics: Path) -> str:
    """One line: no round updated the model, and why the last round's sites did not count."""
    why = "; ".join(f"{s.get('site') or 'node ' + str(s.get('node'))}: {s.get('status')}"
                    f"{' (' + str(s['reason'])[:100] + ')' if s.get('reason') else ''}" for s in last_sites[:3])
    more = f" and {len(last_sites) - 3} more" if len(last_sites) > 3 else ""
    return (f"no round updated the global model ({rounds} round(s); last round: "
            f"{why + more if why else 'no site replied'}); no encoder was written; see {metrics}")


def validate_run_config(run_config: Mapping[str, Any]) -> None:
    """ConfigError (one line naming the key) for an unknown key, a value of the wrong type or
    out of range, before anything starts. The model and training settings are checked by
    building them (MoCoConfig, TrainConfig validate themselves)."""
    for key in run_config:
        if key not in RUN_DEFAULTS:
            close = difflib.get_close_matches(str(key), list(RUN_DEFAULTS), n=1)
            raise ConfigError(f"run_config {key}: unknown key" + (f"; did you mean {close[0]}?" if close else ""))
    r = {k: run_value(run_config, k) for k in RUN_DEFAULTS}  # type errors name the key
    for key, value in r.items():  # Flower carries run_config integers as 64-bit
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            raise ConfigError(f"run_config {key}: {value} does not fit a 64-bit integer")
    moco_config(run_config), train_config(run_config)  # both validate themselves, naming the field
    check_run_ranges(run_config)
    for key, choices in (("key-release", KEY_RELEASE_MODES), ("domain", tuple(DOMAINS))):
        if r[key] not in choices:
            raise ConfigError(f"run_config {key} must be one of {', '.join(choices)}, got {r[key]!r}")
    from server.validation import ExampleCaps  # here: validation loads Flower's record types

    ExampleCaps.parse(r["max-examples-per-site"], r["site-example-caps"])  # ConfigError naming the key
    if r["key-encoder"] not in ("local-ema", "reset"):
        raise ConfigError(f"run_config key-encoder must be local-ema or reset, got {r['key-encoder']!r}")
    # release-ema, warm-up x rounds and input-mean / input-std: in check_run_ranges, which each
    # site runs again before its ledger is touched
    if not str(r["out-dir"]).strip():
        raise ConfigError("run_config out-dir is empty")
    parse_options(r["data-options"])
    from server.strategy import MODEL_DP_FEDAVG_ONLY, make_aggregator  # the aggregator names live with the strategy

    make_aggregator(r["aggregation"], trim_beta=r["trim-beta"], krum_malicious=r["krum-malicious"])
    if r["model-dp-noise"] > 0 and str(r["aggregation"]).lower() != "fedavg":
        # refused here, before a fresh run moves an earlier run's outputs aside (FedMoCo refuses it too)
        raise ConfigError(MODEL_DP_FEDAVG_ONLY)


def drop_rounds_after(metrics: Path, done: int) -> int:
    """Remove the lines of rounds after ``done`` from ``metrics`` (rounds.jsonl), atomically;
    returns how many. A run stopped after logging a round but before checkpointing it runs
    that round again on resume, and must not log it twice."""
    return keep_records(metrics, lambda rec: not (isinstance(rec.get("round"), (int, float)) and rec["round"] > done))
