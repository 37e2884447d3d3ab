"""FedMoCo: Flower's FedAvg plus the global key queue, reply validation and round checkpoints.

Per round (``Strategy.start`` drives it):

``configure_train``
    FedAvg samples the sites and builds the train messages (``arrays`` = global query
    encoder + projection head (+ predictor), ``config``); each site's message then gets its
    own ``queue`` record: up to ``queue_sample`` keys drawn from the global queue, without
    that site's own keys when ``exclude_own_keys``, and a ``centres`` record: the
    ``prototype_centres`` public centres merged from the queue (``GlobalKeyQueue.centres``),
    the same for every site, to which it assigns its next prototype release.
``aggregate_train``
    Every reply is checked (``server.validation``); a failing one is dropped with a one-line
    log naming the round, the node and the reasons; error replies (a site without data, a
    client that raised) are logged the same way. The ``keys`` record is taken out of each
    accepted reply (Flower's FedAvg accepts exactly one ArrayRecord). With at least
    ``min_replies`` accepted replies the arrays are aggregated (FedAvg weighted by
    ``num-examples``, or the robust ``aggregator``: FedMedian, FedTrimmedAvg, Krum; or
    FedAvg with central DP, see :class:`ModelDP`) and the keys join the global queue;
    otherwise the global model stays as it was. Then the round checkpoint is written
    atomically and one JSON line of metrics is appended.

Round numbers: a resumed run's ``Strategy.start`` counts from 1 again; ``round_offset``
(the checkpoint's round) turns that into the federation's round number everywhere:
logs, the ``server-round`` sent to sites, the checkpoint and the metrics.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from opacus.accountants import RDPAccountant

from fedmoco.checkpoint import atomic_save, read_torch_file
from fedmoco.errors import ConfigError
from fedmoco.ledger import DP_STATUS
from fedmoco.metrics import JsonlLogger
from server.queue import GlobalKeyQueue
from clients.task import SITE_RECORD
from server.validation import (KEYS, REQUIRED_METRICS, ExampleCaps, ReplyLimits, decode_arrays, released_keys,
                               site_name_of, untrusted_text, validate_reply)

log = logging.getLogger("flwr.fedmoco.server")  # Flower's handler prints it; --stream shows it

SERVER_STATE_FORMAT = "fedmoco-server-state"
SERVER_STATE_VERSION = 1
#: Per-site metrics copied into the round's JSON line.
SITE_METRICS = ("num-examples", "train-loss", "pos-mean", "neg-mean", "neg-var", "emb-std", "global-share",
                "seconds", "skipped", "dp-keys-epsilon", "dp-keys-delta", "dp-keys-releases", "dp-keys-exhausted",
                "dp-keys-budget", "dp-status")


#: emb-std below this fraction of 1/sqrt(D) (the per-dimension std of unit vectors spread
#: evenly over the sphere) counts as embeddings collapsed to nearly one point
COLLAPSE_FRACTION = 0.1


def collapse_threshold(dim: int) -> float:
    """``COLLAPSE_FRACTION / sqrt(dim)``: the emb-std under which D-dim embeddings count as collapsed."""
    return COLLAPSE_FRACTION / math.sqrt(dim)


def concentrated(emb_std: Any, dim: int) -> bool | None:
    """Whether a round's (example-weighted) ``emb-std`` is under ``collapse_threshold(dim)``;
    None when the round has no finite emb-std (no accepted reply)."""
    if not isinstance(emb_std, (int, float)) or not math.isfinite(emb_std):
        return None
    return emb_std < collapse_threshold(dim)


def collapse_line(r: int, emb_std: float, dim: int, global_share: Any = None) -> str:
    """The coordinator's warning when the sites' embeddings are nearly identical."""
    spread = 1 / math.sqrt(dim)
    share = ""
    if isinstance(global_share, (int, float)) and math.isfinite(global_share) and global_share > 0:
        share = f"; the global negatives took {100 * global_share:.0f}% of the sites' InfoNCE softmax"
    return (f"round {r}: the sites' embeddings are nearly identical (emb-std {emb_std:.4f}, under "
            f"{collapse_threshold(dim):.4f}; spread over the sphere it would be 1/sqrt({dim}) = {spread:.3f})"
            f"{share}. A random-init encoder starts near this and leaves it only after enough local steps: while "
            "the embeddings stay here the encoder tells images apart poorly, and if they fall here after having "
            "spread, training has collapsed (docs/federation.md, 'Collapse')")


def negatives_sent(counts: list[int]) -> str:
    """How many global negatives each site was sent, for the round's log line: "no global
    negatives", "256 global negatives", or a range when sites got different numbers (a
    site's own keys are left out of its sample)."""
    lo, hi = (min(counts), max(counts)) if counts else (0, 0)
    if hi == 0:
        return "no global negatives"
    return f"{hi} global negatives each" if lo == hi else f"{lo}-{hi} global negatives each"


def array_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord as it travels (serialised arrays, without framing)."""
    return sum(len(a.data) for a in record.values())


MODEL_DP_FEDAVG_ONLY = "model DP (model-dp-noise > 0) is analysed for FedAvg only; use aggregation=fedavg"


@dataclass
class ModelDP:
    """Central DP on model updates, site-level: clip, average with a fixed denominator, add noise.

    Each accepted site's update ``u_i = w_i - w_global`` is clipped to L2 norm ``clip``;
    the new model is ``w_global + (sum_i u_i + N(0, (noise * clip)^2 I)) / n``, where
    ``n`` is the number of sites the round was SENT to, so a rejected or silent site counts
    as a zero update and one site's influence stays bounded by ``clip / n`` whatever
    happens to the others (Flower's DifferentialPrivacyServerSideFixedClipping divides by a
    fixed count too, but around an example-weighted FedAvg whose sensitivity is larger).
    Accounting: one Gaussian mechanism of noise multiplier ``noise`` per round under
    add/remove-one-site adjacency, composed with Opacus' RDP accountant at ``sample_rate``
    1 (no amplification by site sampling is claimed). Separate from the key ledgers.

    ``past``: ``[(noise multiplier, releases), ...]`` of the run's earlier sessions (a resumed
    run may change ``model-dp-noise``); the epsilon composes every release at the noise it
    actually had. (It was once re-accounted at the new noise: 2 releases at z=1 then one at
    z=20 reported epsilon 0.32 instead of 7.08.)
    """

    noise: float
    clip: float
    delta: float
    past: list[tuple[float, int]] = field(default_factory=list)
    _acc: RDPAccountant = field(default_factory=RDPAccountant, repr=False)

    def __post_init__(self) -> None:
        if not (self.noise > 0 and math.isfinite(self.noise)):
            raise ConfigError(f"model-dp-noise must be > 0 to enable model DP, got {self.noise}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"model-dp-clip must be > 0, got {self.clip}")
        self._acc.history = [(float(z), 1.0, int(n)) for z, n in self.past if n > 0]

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self._acc.history)

    def history(self) -> list[list[float | int]]:
        """``[[noise multiplier, releases], ...]`` in order, as the checkpoint keeps it."""
        merged: list[list[float | int]] = []
        for z, _, n in self._acc.history:
            if merged and merged[-1][0] == z:
                merged[-1][1] += n
            else:
                merged.append([z, n])
        return merged

    def aggregate(self, reference: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], n_sent: int,
                  generator: np.random.Generator) -> dict[str, np.ndarray]:
        total = {k: np.zeros(v.shape, np.float64) for k, v in reference.items()}
        for arrays in updates:
            delta = {k: arrays[k].astype(np.float64) - reference[k] for k in reference}
            norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            for k in total:
                total[k] += delta[k] * scale
        sigma = self.noise * self.clip
        out = {k: (reference[k] + (total[k] + generator.normal(0.0, sigma, total[k].shape)) / n_sent)
               .astype(reference[k].dtype) for k in reference}
        self._acc.step(noise_multiplier=self.noise, sample_rate=1.0)
        return out

    def epsilon(self) -> float:
        return float(self._acc.get_epsilon(self.delta)) if self.releases else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise, "clip": self.clip, "delta": self.delta, "releases": self.releases,
                "history": self.history()}

    @staticmethod
    def past_of(state: Mapping[str, Any] | None) -> list[tuple[float, int]]:
        """The ``past`` of a checkpoint's ``model-dp`` entry (one written before it kept the
        history held a single noise)."""
        if not state:
            return []
        if "history" in state:
            return [(float(z), int(n)) for z, n in state["history"]]
        return [(float(state["noise"]), int(state["releases"]))]


class FedMoCo(FedAvg):
    """FedAvg with a global queue of privatised keys, reply validation and round checkpoints.

    Parameters beyond FedAvg's (which set sampling; ``fraction_evaluate`` defaults to 0: the
    sites have no evaluation step):

    ``queue``: the global key queue (possibly restored from a checkpoint).
    ``limits``: what a reply must satisfy (``server.validation.ReplyLimits``).
    ``queue_sample``: global negatives sent to each site per round (M).
    ``exclude_own_keys``: leave a site's own keys out of its sample.
    ``min_replies``: accepted replies a round needs to update the model.
    ``aggregator``: a FedAvg-family strategy (FedMedian, FedTrimmedAvg, Krum) that does the
    array aggregation instead of FedAvg; built with the same sampling settings.
    ``model_dp``: central DP on model updates (FedAvg only).
    ``checkpoint_path``: where the round checkpoint goes (None: no checkpoint).
    ``checkpoint_extra``: constant entries stored with every checkpoint (model config, ...).
    ``metrics_path``: the JSON-lines file of per-round metrics (None: not written).
    ``round_offset``: rounds already done (a resumed run).
    ``site_ledger``: per-node privacy reports restored from a checkpoint.
    ``prototype_centres``: centres sent for the sites' prototype release (their C; 0: none,
    when the sites do not release prototypes).
    ``queue_max_age``: rounds a summary may serve as a negative after the round it arrived
    in; older ones are dropped before each round's sampling (0 = kept until overwritten).
    ``example_caps``: the most examples each site's FedAvg weight counts for; a larger
    ``num-examples`` is clipped to the cap before aggregation (docs/federation.md).
    ``run_id``: the run's identity (``server.runs``), written on every line of the metrics.
    ``site_names``: node id -> site name restored from a checkpoint.
    ``updated_before``: the rounds that changed the model before a restart (None: not recorded).
    """

    def __init__(self, *, queue: GlobalKeyQueue, limits: ReplyLimits, queue_sample: int = 1024,
                 exclude_own_keys: bool = True, min_replies: int = 1, aggregator: FedAvg | None = None,
                 model_dp: ModelDP | None = None, checkpoint_path: Path | None = None,
                 checkpoint_extra: dict[str, Any] | None = None, metrics_path: Path | None = None,
                 round_offset: int = 0, site_ledger: dict[int, dict[str, float]] | None = None,
                 expected_metrics: frozenset[str] = REQUIRED_METRICS, seed: int | None = None,
                 fraction_evaluate: float = 0.0, example_caps: ExampleCaps | None = None,
                 queue_max_age: int = 0, run_id: str | None = None, site_names: dict[int, str] | None = None,
                 updated_before: list[int] | None = None,
                 prototype_centres: int = 8, **fedavg_kwargs: Any) -> None:
        super().__init__(fraction_evaluate=fraction_evaluate, **fedavg_kwargs)
        if queue_sample < 0:
            raise ConfigError(f"queue-sample must be >= 0, got {queue_sample}")
        if min_replies < 1:
            raise ConfigError(f"min-replies must be >= 1, got {min_replies}")
        if model_dp is not None and aggregator is not None:
            raise ConfigError(MODEL_DP_FEDAVG_ONLY)
        if limits.key_dim != queue.dim:
            raise ConfigError(f"key dimension {limits.key_dim} differs from the global queue's {queue.dim}")
        self.queue = queue
        self.limits = limits
        self.queue_sample = int(queue_sample)
        if int(prototype_centres) < 0:
            raise ConfigError(f"prototype-centres must be >= 0, got {prototype_centres}")
        self.prototype_centres = int(prototype_centres)
        self.exclude_own_keys = exclude_own_keys
        if int(queue_max_age) < 0:
            raise ConfigError(f"global-queue-max-age must be >= 0, got {queue_max_age}")
        self.queue_max_age = int(queue_max_age)
        self._expired = 0
        self.min_replies = int(min_replies)
        self.aggregator = aggregator
        self.model_dp = model_dp
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.metrics = JsonlLogger(metrics_path)
        self.round_offset = int(round_offset)
        self.site_ledger: dict[int, dict[str, float]] = dict(site_ledger or {})
        self.expected_metrics = expected_metrics
        self.example_caps = example_caps if example_caps is not None else ExampleCaps()
        self._concentrated = False  # the collapse watch's state: warned, not yet spread again
        # Sampling of global negatives and model-DP noise. Seeded from the OS unless a test
        # asks for determinism: the DP noise must not be reproducible from the config.
        self._torch_gen = torch.Generator().manual_seed(seed if seed is not None else
                                                        int(np.random.SeedSequence().entropy % 2**63))
        self._np_gen = np.random.default_rng(seed)
        self._reference: dict[str, np.ndarray] = {}
        self._current: ArrayRecord | None = None
        self._round_started = 0.0
        self._down: dict[int, dict[str, int]] = {}
        self.last_round = self.round_offset
        self.run_id = run_id  # server.runs: written on every rounds.jsonl line
        self.updated_rounds: list[int] = []  # rounds of this session that changed the global model
        # ... of the sessions before it (restored from a checkpoint; None: one that did not record them)
        self.updated_before = None if updated_before is None else list(updated_before)
        self.last_sites: list[dict[str, Any]] = []  # the last round's per-site outcomes
        # node id -> node_config site-name, as the sites reported it (kept in the checkpoint, so a
        # restarted server names a site whose first reply after the restart is an error)
        self.site_names: dict[int, str] = {int(k): str(v) for k, v in (site_names or {}).items()}
        self._owners: dict[str, int] = {}  # site name -> the node that holds it (see _name_owner)

    # -- helpers ------------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def summary(self) -> None:
        super().summary()
        log.info("FedMoCo: global queue %d x %d (%d keys held), %d negatives per site%s, min %d accepted "
                 "replies, aggregation %s%s", self.queue.size, self.queue.dim, len(self.queue), self.queue_sample,
                 " (own keys excluded)" if self.exclude_own_keys else "", self.min_replies,
                 type(self.aggregator).__name__ if self.aggregator else "FedAvg",
                 f", model DP z={self.model_dp.noise} C={self.model_dp.clip}" if self.model_dp else "")

    # -- round: send ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, each with its own ``queue`` record of global negatives."""
        r = self.global_round(server_round)
        self._round_started = time.perf_counter()
        self._current = arrays
        self._reference = decode_arrays(arrays)
        base = (self.aggregator or super(FedMoCo, self)).configure_train(r, arrays, ConfigRecord(dict(config)), grid)
        messages, self._down = [], {}
        weight_bytes = array_bytes(arrays)
        self._expired = self.queue.expire(r, self.queue_max_age)
        # One set for all sites, from released vectors only (post-processing; docs/privacy.md).
        centres = (self.queue.centres(self.prototype_centres) if self.prototype_centres
                   else torch.zeros(0, self.queue.dim))
        centres_record = ArrayRecord({"centres": Array(centres.numpy().astype(np.float32))})
        unmatched, resumed = 0, self.round_offset > 0 and self.queue.held_through(self.round_offset) > 0
        for msg in base:
            node = msg.metadata.dst_node_id
            own = self._queue_owner(node) if self.exclude_own_keys else None
            # A node not known by name (a resumed run's first round, or a site without a name)
            # cannot be matched to the entries from before the resume, which carry names and
            # the old node ids: it gets none of them rather than perhaps its own.
            before = self.round_offset if isinstance(own, int) and resumed else None
            unmatched += before is not None
            sample = self.queue.sample(self.queue_sample, exclude=own, exclude_through_round=before,
                                       generator=self._torch_gen)
            queue_record = ArrayRecord({"keys": Array(sample.numpy().astype(np.float32))})
            content = RecordDict({"arrays": arrays, "config": msg.content["config"], "queue": queue_record,
                                  "centres": centres_record})
            messages.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node,
                                    group_id=str(r)))
            self._down[node] = {"weights": weight_bytes, "queue": array_bytes(queue_record),
                                "queue-keys": int(sample.shape[0]), "centres": array_bytes(centres_record)}
        log.info("round %d: sent the global model (%.2f MB) and %s to %d site(s)",
                 r, weight_bytes / 2**20, negatives_sent([d["queue-keys"] for d in self._down.values()]),
                 len(messages))
        if unmatched:
            log.info("round %d: %d site(s) not known by name yet got none of the global negatives from before "
                     "the resume (round %d and earlier), which may hold their own", r, unmatched, self.round_offset)
        return messages

    # -- round: receive ---------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, strip keys, aggregate the accepted replies, grow the queue, checkpoint."""
        r = self.global_round(server_round)
        replies = list(replies)
        t_received = time.perf_counter()
        accepted: list[tuple[Message, torch.Tensor]] = []
        sites: list[dict[str, Any]] = []
        replied: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            site: dict[str, Any] = {"node": node, **self._down.get(node, {})}
            sites.append(site)
            claimed = None if msg.has_error() else site_name_of(msg.content)
            owner = self._name_owner(claimed)
            taken = owner is not None and owner != int(node)
            who = self._name_site(node, None if taken else claimed, site)
            if msg.has_error():
                reason = untrusted_text(msg.error.reason)
                site.update(status="error", code=int(msg.error.code), reason=reason)
                log.warning("round %d: %s sent no update (code %d): %s", r, who, int(msg.error.code), reason)
                continue
            # Flower's LinkState already keeps one reply per message, from the node it went to;
            # the strategy does not rely on it: a second reply would count a site's weight twice
            # and break model DP's clip / n bound.
            extra = ("a second reply from this node in this round" if int(node) in replied else
                     "this node was not sent this round's model" if self._down and node not in self._down else None)
            replied.add(int(node))
            if extra:
                site.update(status="rejected", reason=extra)
                log.warning("round %d: rejected reply from node %s: %s", r, node, extra)
                continue
            # What the site uploaded, accepted or not (the traffic happened either way).
            site.update({f"up-{name}": array_bytes(rec) for name, rec in msg.content.array_records.items()
                         if name in ("arrays", KEYS)})
            measured: dict[str, float] = {}
            try:
                reasons = validate_reply(msg.content, self._reference, self.limits, self.expected_metrics, measured)
            except Exception as exc:  # a reply no check foresaw rejects that reply, never the run
                # one bounded line: the exception's text may be the site's (no traceback in the log)
                log.warning("round %d: reply from %s could not be checked: %s", r, who,
                            untrusted_text(f"{type(exc).__name__}: {exc}"))
                reasons = [f"reply could not be checked ({type(exc).__name__})"]
            if taken:  # a name is how caps and logs know a site: one node's in a run
                reasons.insert(0, f"site: name {claimed!r} is node {owner}'s in this run")
            site.update(measured)
            if reasons:
                reason = untrusted_text("; ".join(reasons), 1000)  # one line of bounded length in log and JSON
                site.update(status="rejected", reason=reason)
                log.warning("round %d: rejected reply from %s: %s", r, who, reason)
                continue
            if SITE_RECORD in msg.content:
                del msg.content[SITE_RECORD]  # the name is recorded; FedAvg gets the model records only
            keys = torch.from_numpy(np.array(released_keys(msg.content), copy=True))
            # Renormalised: rows pass the check above (|norm - 1| <= tolerance in float64) yet
            # may fail a site's float32 check, and stored as sent they cost sites their negatives.
            keys = torch.nn.functional.normalize(keys.double(), dim=1).float() if len(keys) else keys
            del msg.content[KEYS]  # FedAvg takes exactly one ArrayRecord per reply
            metrics = msg.content.metric_records["metrics"]
            self._cap_examples(r, node, who, metrics, site)
            site.update(status="accepted", keys=int(keys.shape[0]),
                        **{k: float(metrics[k]) for k in SITE_METRICS if k in metrics})
            self.site_ledger[int(node)] = {k: float(metrics[k]) for k in metrics if k.startswith("dp-")}
            self._note_dp_status(r, who, site)
            self._claim_name(node, claimed)
            accepted.append((msg, keys))

        # Nodes sent the model that did not answer (round-timeout passed, or the node left): they
        # were in no count, no JSON line and no log line, so a site that never answered was
        # invisible (found by an audit).
        answered = {int(s["node"]) for s in sites}
        for node in [n for n in self._down if int(n) not in answered]:
            site = {"node": node, **self._down[node], "status": "no-reply", "reason": "no reply within round-timeout"}
            who = self._name_site(node, None, site)
            sites.append(site)
            log.warning("round %d: %s sent no reply within round-timeout", r, who)
        arrays, agg_metrics = None, None
        if len(accepted) < self.min_replies:
            log.warning("round %d: %d accepted repl%s of %d, fewer than min-replies %d: the global model and "
                        "queue stay as they were", r, len(accepted), "y" if len(accepted) == 1 else "ies",
                        len(replies), self.min_replies)
        else:
            arrays, agg_metrics = self._aggregate(r, [m for m, _ in accepted], n_sent=max(len(self._down), 1))
            if arrays is not None:
                for msg, keys in accepted:
                    self.queue.enqueue(keys, self._queue_owner(msg.metadata.src_node_id), r)
        if arrays is not None:
            self._current = arrays
            self.updated_rounds.append(r)  # before the checkpoint, which records it
        self.last_round = r
        # The line first, then the checkpoint: a stop between them leaves a line for a round the
        # checkpoint does not hold, which a resume drops (server.runs.drop_rounds_after) and
        # runs again; the other order would lose the round's line for good.
        self._log_round(r, sites, agg_metrics, arrays is not None, t_received)
        self._save_checkpoint(r)
        return arrays, agg_metrics

    @staticmethod
    def _note_dp_status(r: int, who: str, site: dict[str, Any]) -> None:
        """Say why an accepted site sent no DP summaries (its ``dp-status``), in the log and the JSON line."""
        code = int(site.get("dp-status", 0))
        if code == 0:
            return
        site["dp-reason"] = DP_STATUS.get(code, f"unknown dp-status {code}")
        spent = (f" (spent eps {site['dp-keys-epsilon']:.4g} of {site['dp-keys-budget']:g})"
                 if code == 5 and "dp-keys-budget" in site else "")
        level = logging.INFO if code == 2 else logging.WARNING
        log.log(level, "round %d: %s sent no DP summaries: %s%s", r, who, site["dp-reason"], spent)

    @property
    def updated_all(self) -> list[int]:
        """Every round of the run that changed the global model, this session's and before."""
        return sorted({*(self.updated_before or []), *self.updated_rounds})

    def _name_owner(self, name: str | None) -> int | None:
        """The node that goes by ``name`` since this ServerApp started, if any: the first whose
        reply under it was accepted. A node may change its own name, which frees the old one.
        Not restored from a checkpoint: a resumed run's sites come back under new node ids
        (a new simulation, a SuperNode re-registered), and must get their names back."""
        return self._owners.get(name) if name else None

    def _queue_owner(self, node: int) -> int | str:
        """How the global queue knows ``node``: by its site name once it has claimed one (names
        survive a resume, node ids do not), else by its node id. In a resumed run's first round
        no name is claimed yet: configure_train then sends that node none of the entries from
        before the resume."""
        return next((name for name, n in self._owners.items() if n == int(node)), int(node))

    def _claim_name(self, node: int, name: str | None) -> None:
        """``name`` is ``node``'s from now on (after an accepted reply under it)."""
        if name:
            self._owners = {held: n for held, n in self._owners.items() if n != int(node)}
            self._owners[name] = int(node)
            self.site_names[int(node)] = name

    def _name_site(self, node: int, name: str | None, site: dict[str, Any]) -> str:
        """Put the site's name (from this reply, else from an earlier accepted one) in ``site``
        and return how logs call it: ``name (node N)``, or ``node N`` for a site without a name.
        Records nothing: a name is the node's only once a reply under it is accepted
        (:meth:`_claim_name`); a rejected reply under a site's name once let the node keep
        that name, and its cap, for its later unnamed replies."""
        name = name or self.site_names.get(int(node))
        if name:
            site["site"] = name
            return f"{name} (node {node})"
        return f"node {node}"

    def _cap_examples(self, r: int, node: int, who: str, metrics: MetricRecord, site: dict[str, Any]) -> None:
        """Clip a validated reply's ``num-examples`` (its FedAvg weight) to the site's cap."""
        claimed = float(metrics["num-examples"])
        cap = self.example_caps.cap(node, site.get("site"))
        if claimed > cap:
            metrics["num-examples"] = cap
            site["num-examples-claimed"] = claimed
            log.warning("round %d: %s claims %.6g examples; its weight counts %d (its cap: "
                        "max-examples-per-site / site-example-caps)", r, who, claimed, cap)

    def _aggregate(self, r: int, replies: list[Message],
                   n_sent: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.model_dp is not None:
            updates = [decode_arrays(m.content.array_records["arrays"]) for m in replies]
            ref64 = {k: v.astype(np.float64) for k, v in self._reference.items()}
            new = self.model_dp.aggregate(ref64, updates, n_sent, self._np_gen)
            arrays = ArrayRecord({k: Array(new[k].astype(self._reference[k].dtype)) for k in self._reference})
            metrics = aggregate_metricrecords([m.content for m in replies], self.weighted_by_key)
            log.info("round %d: model DP: %d update(s) clipped to %g, noise z=%g, epsilon %.4g at delta %g",
                     r, len(replies), self.model_dp.clip, self.model_dp.noise, self.model_dp.epsilon(),
                     self.model_dp.delta)
            return arrays, metrics
        try:
            arrays, metrics = (self.aggregator or super(FedMoCo, self)).aggregate_train(r, replies)
        except (AggregationError, InconsistentMessageReplies, ValueError) as exc:
            # e.g. Krum with too few replies for its malicious-node count: lose the round, not the run.
            log.error("round %d: aggregation failed (%s: %s); the global model stays as it was",
                      r, type(exc).__name__, exc)
            return None, None
        if arrays is None:
            return None, metrics
        # FedMedian/trimmed means compute in float64 for some inputs: keep the model's dtypes
        # so that next round's replies are checked against what the sites really hold.
        fixed = {}
        for name, ref in self._reference.items():
            a = arrays[name].numpy()
            fixed[name] = Array(np.ascontiguousarray(a.astype(ref.dtype, copy=False)))
        return ArrayRecord(fixed), metrics

    # -- persistence and logs ----------------------------------------------------------------
    def state_dict(self, server_round: int) -> dict[str, Any]:
        """Everything a restarted server needs to resume after ``server_round``."""
        arrays = self._current if self._current is not None else ArrayRecord()
        return {
            "format": SERVER_STATE_FORMAT,
            "version": SERVER_STATE_VERSION,
            "round": server_round,
            "arrays": {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()},
            "queue": self.queue.state_dict(),
            "site-names": dict(self.site_names),
            # a round can pass without changing the model (every site failed): a resume counts it as
            # done, and what the encoder is worth is the rounds that did change it
            "updated-rounds": self.updated_all,
            "ledger": {"sites": {int(k): dict(v) for k, v in self.site_ledger.items()},
                       "model-dp": self.model_dp.state_dict() if self.model_dp else None},
            **self.checkpoint_extra,
        }

    def _save_checkpoint(self, r: int) -> None:
        if self.checkpoint_path is None:
            return
        atomic_save(self.state_dict(r), self.checkpoint_path)

    def _log_round(self, r: int, sites: list[dict[str, Any]], agg: MetricRecord | None, updated: bool,
                   t_received: float) -> None:
        ok = [s for s in sites if s.get("status") == "accepted"]
        record: dict[str, Any] = {
            "event": "round", "round": r, "run-id": self.run_id, "updated": updated, "time": time.time(),
            "round-seconds": t_received - self._round_started if self._round_started else float("nan"),
            "aggregate-seconds": time.perf_counter() - t_received,
            "sum-local-seconds": sum(s.get("seconds", 0.0) for s in ok),
            "sent": len(self._down), "replies": sum(s.get("status") != "no-reply" for s in sites),
            "no-reply": sum(s.get("status") == "no-reply" for s in sites), "accepted": len(ok),
            "rejected": sum(s.get("status") == "rejected" for s in sites),
            "errors": sum(s.get("status") == "error" for s in sites),
            "examples": sum(s.get("num-examples", 0.0) for s in ok),
            "queue-size": len(self.queue), "queue-sites": len(self.queue.counts_by_site()),
            "queue-added": sum(s.get("keys", 0) for s in ok) if updated else 0, "queue-expired": self._expired,
            # the round's DP-summary traffic: received from accepted sites, handed out as negatives
            "keys-received": sum(s.get("keys", 0) for s in ok),
            "queue-sent": sum(d.get("queue-keys", 0) for d in self._down.values()),
            "up-bytes": sum(s.get("up-arrays", 0) + s.get("up-keys", 0) for s in sites),
            "down-bytes": sum(d.get("weights", 0) + d.get("queue", 0) + d.get("centres", 0)
                              for d in self._down.values()),
            "dp-sharing": sum(s.get("dp-status") in (0, 1) for s in ok),
            "server-rss-mb": current_rss_mb(),
            "sites": sites,
        }
        if agg is not None:
            record.update({k: float(v) for k, v in agg.items() if not isinstance(v, list)})
        if self.model_dp is not None:
            record["model-dp-epsilon"] = self.model_dp.epsilon()
        self.metrics.log(record)
        self.last_sites = sites
        log.info("round %d: %d/%d replies accepted (%d rejected, %d errors, %d no reply), loss %s, global queue %d keys "
                 "(%d received from %d sharing site(s), %d sent as negatives), "
                 "round %.1f s vs %.1f s summed local training",
                 r, len(ok), record["sent"] or len(sites), record["rejected"], record["errors"], record["no-reply"],
                 f"{record['train-loss']:.4f}" if "train-loss" in record else "n/a", len(self.queue),
                 record["keys-received"], record["dp-sharing"], record["queue-sent"],
                 record["round-seconds"], record["sum-local-seconds"])
        self._watch_collapse(r, record)

    def _watch_collapse(self, r: int, record: dict[str, Any]) -> None:
        """Warn once when the sites' embeddings become nearly identical, and say when they
        spread again (``collapse_line``)."""
        now = concentrated(record.get("emb-std"), self.queue.dim)
        if now is None or now == self._concentrated:
            return
        self._concentrated = now
        if now:
            log.warning(collapse_line(r, record["emb-std"], self.queue.dim, record.get("global-share")))
        else:
            log.info("round %d: the sites' embeddings have spread again (emb-std %.4f, above %.4f)",
                     r, record["emb-std"], collapse_threshold(self.queue.dim))


#: What a resumed run reads from a server checkpoint (server/app.py).
SERVER_STATE_KEYS = ("arrays", "queue", "round", "ledger")


def load_server_state(path: Path) -> dict[str, Any] | None:
    """The round checkpoint at ``path``, or None if there is none; ConfigError if foreign."""
    if not path.is_file():
        return None
    state = read_torch_file(path, "server checkpoint")
    if not isinstance(state, dict) or state.get("format") != SERVER_STATE_FORMAT:
        raise ConfigError(f"{path}: not a fedmoco server checkpoint")
    if state.get("version", 0) > SERVER_STATE_VERSION:
        raise ConfigError(f"{path}: server checkpoint version {state['version']} is newer than this fedmoco")
    missing = [k for k in SERVER_STATE_KEYS if k not in state]
    if missing or not isinstance(state.get("ledger"), dict) or "sites" not in state["ledger"]:
        raise ConfigError(f"{path}: server checkpoint is incomplete (missing {', '.join(missing) or 'ledger.sites'})")
    return state


def make_aggregator(name: str, *, trim_beta: float, krum_malicious: int,
                    **sampling: Any) -> FedAvg | None:
    """The robust aggregator for run_config ``aggregation`` (None = plain FedAvg)."""
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

    name = name.lower()
    if name == "fedavg":
        return None
    if name == "fedmedian":
        return FedMedian(**sampling)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=trim_beta, **sampling)
    if name == "krum":
        return Krum(num_malicious_nodes=krum_malicious, **sampling)
    raise ConfigError(f"aggregation: unknown {name!r}; choose fedavg, fedmedian, fedtrimmedavg or krum")


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB): /proc on Linux, else the peak (getrusage)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
