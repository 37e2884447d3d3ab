"""The federation's Flower ServerApp: FedMoCo rounds, resumable, with a final encoder checkpoint.

Outputs, under run_config ``out-dir`` (a relative path is resolved against the ServerApp
process's working directory; pass an absolute one in deployment):

``server-state.pt``  round checkpoint, rewritten atomically after every round: global
                     model, global queue, round number, privacy ledger. A restarted server
                     with ``resume=true`` (default) continues from it.
``rounds.jsonl``     one JSON line per round (see ``FedMoCo._log_round``).
``encoder.pt``       the aggregated encoder as a fedmoco checkpoint (``fedmoco knn
                     --checkpoint``), written when the run ends.
``plots/*.png``      loss, score statistics, epsilon per site, traffic.
``previous-runs/``   an earlier run's outputs, moved aside when a fresh run starts here.

Each run has an identity (``server.runs``): a fresh run gets a new ``run-id``; ``resume=true``
continues the run in ``out-dir`` only when its ``config-hash`` matches, else it is refused.
A run in which no round updated the global model raises FederationFailed (no encoder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from clients.task import (federation_units, moco_config, parse_options, prototype_rows, run_value, shared_arrays,
                          shared_state)
from fedmoco.checkpoint import atomic_save, check_compatible
from fedmoco.errors import ConfigError, FedmocoError
from fedmoco.moco import MoCo
from fedmoco.pretrain import make_checkpoint
from server.plots import plot_federation
from server.queue import GlobalKeyQueue
from server.strategy import FedMoCo, ModelDP, load_server_state, make_aggregator
from server.runs import (FederationFailed, RunIdentity, check_resume, drop_rounds_after, move_previous_run,
                         new_identity, no_update_message, validate_run_config)
from server.validation import ExampleCaps, ReplyLimits

log = logging.getLogger("flwr.fedmoco.server")  # Flower's handler prints it; --stream shows it

STATE_FILE, METRICS_FILE, ENCODER_FILE = "server-state.pt", "rounds.jsonl", "encoder.pt"

app = ServerApp()


@dataclass
class FederationResult:
    out_dir: Path
    encoder: Path
    state: Path
    metrics: Path
    plots: list[Path]
    rounds_done: int
    resumed_from: int


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: run the federation described by the run's ``run_config``."""
    try:
        result = run_federation(grid, context.run_config)
    except FedmocoError as exc:  # bad run_config, another run in out-dir, no round updated the model
        log.error("federation stopped: %s", exc)
        raise
    print(f"aggregated encoder: {result.encoder}", flush=True)


def initial_model(mcfg: Any, seed: int) -> MoCo:
    """The federation's round-0 model, a function of the run's ``seed``: two runs of one
    configuration start from the same weights, as the sites' draws already follow the seed.
    Drawn from a forked RNG, so the server process's own torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return MoCo(mcfg)


def resume_state(run_config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, RunIdentity | None]:
    """(the server checkpoint to continue, the run's identity), both None for a fresh start.
    ConfigError, before anything is written, when ``resume`` is set and the checkpoint in
    ``out-dir`` is unreadable or belongs to another configuration, or model DP would be
    turned off or on midway. ``run_config`` has passed ``validate_run_config``;
    ``python -m server.simulation`` calls it before it starts."""
    out = Path(run_value(run_config, "out-dir")).expanduser().resolve()
    state_path = out / STATE_FILE
    saved = load_server_state(state_path) if run_value(run_config, "resume") else None
    if saved is None:
        return None, None
    identity = check_resume(out, saved, run_config)  # refuses another configuration's run
    if "moco_config" not in saved:
        raise ConfigError(f"{state_path}: server checkpoint is incomplete (missing moco_config)")
    check_compatible(state_path, saved["moco_config"], moco_config(run_config).to_dict())
    done, dp_state, noise = int(saved["round"]), saved["ledger"].get("model-dp"), run_value(run_config, "model-dp-noise")
    if done and (dp_state is not None) != (noise > 0):
        # a DP statement covers every release of the model or none: noise-free rounds before
        # or after the noisy ones leave the model without any finite epsilon
        was, now = ("on", "off") if dp_state is not None else ("off", "on")
        raise ConfigError(f"{out}: resume=true, but model DP was {was} for rounds 1-{done} and would be {now} now "
                          f"(model-dp-noise {noise:g}); model DP covers all of a run's rounds or none: "
                          "keep it as it was, or resume=false to start a new run there")
    return saved, identity


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> FederationResult:
    """Run (or resume) the federation on ``grid``; returns where everything was written."""
    validate_run_config(run_config)
    r = lambda k: run_value(run_config, k)  # noqa: E731
    mcfg = moco_config(run_config)
    out = Path(r("out-dir")).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = out / STATE_FILE, out / METRICS_FILE
    total_rounds = r("num-server-rounds")

    model = initial_model(mcfg, r("seed"))
    arrays = shared_arrays(model)
    queue = GlobalKeyQueue(r("global-queue-size"), mcfg.dim)
    done, site_ledger, dp_state, site_names, updated_before = 0, {}, None, {}, []
    saved, identity = resume_state(run_config)
    if saved is not None:
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in saved["arrays"].items()})
        queue.load_state_dict(saved["queue"])
        done = int(saved["round"])
        dropped = drop_rounds_after(metrics_path, done)
        if dropped:
            log.info("%s: dropped %d line(s) of rounds after %d, the checkpoint's last; they run again",
                     metrics_path, dropped, done)
        site_ledger = {int(k): v for k, v in saved["ledger"]["sites"].items()}
        dp_state = saved["ledger"].get("model-dp")
        site_names = saved.get("site-names", {})
        updated_before = saved.get("updated-rounds")  # None: a checkpoint that did not record them
        log.info("resuming from %s after round %d: global queue holds %d keys from %d site(s)",
                 state_path, done, len(queue), len(queue.counts_by_site()))
    else:
        moved = move_previous_run(out)
        if moved is not None:
            log.warning("%s held an earlier run: its outputs were moved to %s; this run starts fresh", out, moved)
    identity = identity or new_identity(run_config)
    log.info("run %s (config %s)%s", identity.run_id, identity.config_hash,
             f", resumed after round {done}" if done else "")

    sampling = dict(fraction_train=r("fraction-train"), min_train_nodes=r("min-nodes"),
                    min_available_nodes=r("min-nodes"))
    model_dp = None
    if r("model-dp-noise") > 0:
        model_dp = ModelDP(noise=r("model-dp-noise"), clip=r("model-dp-clip"), delta=r("model-dp-delta"),
                           past=ModelDP.past_of(dp_state))
    strategy = FedMoCo(
        queue=queue,
        limits=ReplyLimits.of_run(run_config, mcfg.dim),
        queue_sample=r("queue-sample"), exclude_own_keys=r("exclude-own-keys"),
        queue_max_age=r("global-queue-max-age"), min_replies=r("min-replies"),
        # the sites' C (clients/app.py); merging per-record keys into centres would be wasted work
        prototype_centres=prototype_rows(run_config) if r("key-release") == "prototypes" else 0,
        aggregator=make_aggregator(r("aggregation"), trim_beta=r("trim-beta"), krum_malicious=r("krum-malicious"),
                                   fraction_evaluate=0.0, **sampling),
        model_dp=model_dp, checkpoint_path=state_path, metrics_path=metrics_path, round_offset=done,
        checkpoint_extra={"moco_config": mcfg.to_dict(), "num_server_rounds": total_rounds,
                          "run-identity": identity.to_dict()}, run_id=identity.run_id, site_names=site_names,
        updated_before=updated_before,
        site_ledger=site_ledger, example_caps=ExampleCaps.parse(r("max-examples-per-site"), r("site-example-caps")),
        **sampling,
    )
    if done < total_rounds:
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=total_rounds - done,
                                timeout=r("round-timeout"))
        arrays = result.arrays if len(result.arrays) else arrays
        if not strategy.updated_all:  # a resumed run's earlier rounds count
            raise FederationFailed(no_update_message(strategy.last_sites, total_rounds - done, metrics_path))
        if not strategy.updated_rounds:
            log.warning("no round since the resume (%d-%d) updated the global model; the encoder is round %d's model",
                        done + 1, strategy.last_round, max(strategy.updated_all))
    else:
        if updated_before == []:  # None: a checkpoint that did not record them
            # Wrote the round-0 (random-init) model as the run's encoder, exit 0 (found by an audit).
            raise FederationFailed(f"all {total_rounds} rounds were already done and no round updated the global "
                                   f"model; no encoder was written; see {metrics_path}")
        known = f" ({len(updated_before)} of them updated the model)" if updated_before is not None else ""
        log.info("all %d rounds were already done%s; writing the outputs again", total_rounds, known)

    updated = None if updated_before is None else len(strategy.updated_all)
    encoder = write_encoder(out / ENCODER_FILE, model, arrays, run_config, rounds=max(strategy.last_round, done),
                            sites=strategy.site_ledger, identity=identity, updated_rounds=updated)
    plots = _plots(metrics_path, out / "plots", mcfg.dim) if r("plots") and metrics_path.exists() else []
    log.info("aggregated encoder: %s", encoder)
    return FederationResult(out_dir=out, encoder=encoder, state=state_path, metrics=metrics_path, plots=plots,
                            rounds_done=max(strategy.last_round, done), resumed_from=done)


def _plots(metrics: Path, folder: Path, dim: int) -> list[Path]:
    """The run's PNG plots, or none: they are drawn from rounds.jsonl after the encoder is
    written, so a plot that fails (a figure no check foresaw) is logged and never ends the
    run in a traceback, nor loses its result."""
    try:
        return plot_federation(metrics, folder, dim=dim)
    except Exception as exc:  # noqa: BLE001 the plots are a view of rounds.jsonl, which stays
        log.warning("plots not drawn (%s: %s); rounds.jsonl holds every figure", type(exc).__name__, exc)
        return []


def write_encoder(path: Path, model: MoCo, arrays: ArrayRecord, run_config: Mapping[str, Any], *, rounds: int,
                  sites: dict[int, dict[str, float]], identity: RunIdentity | None = None,
                  updated_rounds: int | None = None) -> Path:
    """The global model as a fedmoco checkpoint that ``fedmoco knn/linear-probe`` load.

    The key encoder is a copy of the aggregated query encoder (sites' own key encoders
    never leave them) and the queue is empty. ``data.normalization`` is the federation's
    ``input-mean``/``input-std`` when set; otherwise ``None``: each site normalised with
    its own statistics, and evaluation on a site's data should do the same.
    """
    weights = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()}
    state = model.state_dict()
    missing = set(shared_state(model)) - set(weights)
    if missing:
        raise ValueError(f"aggregated model lacks {len(missing)} entries (first: {sorted(missing)[0]!r})")
    with torch.no_grad():
        for k, v in weights.items():
            state[k].copy_(v)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    units = federation_units(run_config, model.cfg.in_channels)
    normalization = None if units is None else {"mean": units[0], "std": units[1]}
    data = {"domain": run_value(run_config, "domain"), "image_size": run_value(run_config, "image-size"),
            "options": parse_options(run_value(run_config, "data-options")), "normalization": normalization}
    ckpt = make_checkpoint(model, data=data, epoch=rounds,
                           extra={"federation": {"rounds": rounds, "sites": {str(k): v for k, v in sites.items()},
                                                 # rounds that changed the model (None: not known, an older checkpoint)
                                                 "updated-rounds": updated_rounds,
                                                 **({"run-id": identity.run_id, "config-hash": identity.config_hash}
                                                    if identity else {})}})
    return atomic_save(ckpt, path)
