"""Checks on every training reply before it may touch the global model or the global queue.

Pure functions of a reply's :class:`~flwr.app.RecordDict` and the round's global model, so
they are unit-tested without any Flower process. :func:`validate_reply` returns the list
of reasons a reply is unacceptable (empty = accepted); each reason is one line that names
the offending record, array or metric, what it is and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.task import SITE_RECORD, check_site_name
from fedmoco.errors import ConfigError
from fedmoco.ledger import DP_STATUS

#: Record names a ClientApp may put in its train reply (docs/privacy.md).
ARRAYS, KEYS, METRICS = "arrays", "keys", "metrics"
#: MetricRecord entries of every reply, and only these (docs/privacy.md).
REQUIRED_METRICS: frozenset[str] = frozenset({
    "num-examples", "train-loss", "pos-mean", "neg-mean", "neg-var", "emb-std", "global-share", "seconds",
    "skipped", "dp-keys-epsilon", "dp-keys-delta", "dp-keys-releases", "dp-keys-exhausted", "dp-keys-budget",
    "dp-status",
})
# Statistics that are legitimately NaN: a round in which every step ran on an empty queue
# has no finite negative scores, one-image batches have no embedding std, and the
# hard-negative filter hides which negatives were the global ones (global-share).
_MAY_BE_NAN = frozenset({"neg-mean", "neg-var", "emb-std", "pos-mean", "global-share"})
# Epsilon and budget are +inf for a site that releases without noise (fedmoco.ledger.no_ledger_metrics).
_MAY_BE_INF = frozenset({"dp-keys-epsilon", "dp-keys-budget"})
# Counts, times and privacy figures: a negative one is a lie that would reach rounds.jsonl.
# (dp-keys-delta has its own range below: a probability.)
_NON_NEGATIVE = ("skipped", "seconds", "dp-keys-epsilon", "dp-keys-releases", "dp-keys-budget",
                 "train-loss", "neg-var", "emb-std")  # a cross-entropy, a variance, a std (NaN passes)
#: What the training statistics can be (a small tolerance for float16 rounding): cosine scores
#: and their mean lie in [-1, 1] and their variance in [0, 1]; emb-std is a sample std of unit
#: vectors' coordinates, at most sqrt(2) (two samples); InfoNCE is at most ln(1 + M) + 2 / T,
#: 211 at T = 0.01 and M = 65,536, so 1e6 is out of any honest site's reach. A lie beyond these
#: (train-loss 1.7e308) skewed rounds.jsonl and the plots, and printed a 310-digit loss.
#: Privacy figures and counts get bounds no honest site reaches either (an epsilon of 1e9 is no
#: privacy at all; releasing without noise reports inf, which passes): a dp-keys-epsilon of
#: 1.7e308 passed, and the privacy plot's axis overflowed and ended the run in a traceback.
_RANGES = {"pos-mean": (-1.01, 1.01), "neg-mean": (-1.01, 1.01), "neg-var": (0.0, 1.01),
           "emb-std": (0.0, 1.5), "train-loss": (0.0, 1e6), "dp-keys-epsilon": (0.0, 1e9),
           "dp-keys-budget": (0.0, 1e9), "dp-keys-releases": (0.0, 1e9), "skipped": (0.0, 1e12)}
#: Longest local round a reply may report: about 116 days, far past any round-timeout in use.
#: A larger claim is a lie that would fill the round's log line with a 300-digit number.
MAX_REPLY_SECONDS = 1e7
#: dp-status codes under which a reply may carry keys: released with or without noise.
RELEASING_STATUS = frozenset({0, 1})


#: Largest ``num-examples`` a site's weight counts for unless the coordinator says otherwise
#: (run_config ``max-examples-per-site``). A claim above a site's cap is clipped, not
#: rejected (docs/federation.md, "Hostile sites").
DEFAULT_MAX_EXAMPLES = 100_000


@dataclass(frozen=True)
class ExampleCaps:
    """The most examples each site's FedAvg weight may count for.

    ``default``: the cap of every site (run_config ``max-examples-per-site``);
    ``per_site``: caps by site name or node id (run_config ``site-example-caps``,
    ``"name=N,name2=M"``), which win over the default. With caps c_i, a site's share of a
    FedAvg round is at most ``c_i / (c_i + sum of the other sites' counts)`` whatever it claims.
    """

    default: int = DEFAULT_MAX_EXAMPLES
    per_site: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(cap: Any) -> bool:
            return isinstance(cap, bool) or not isinstance(cap, int) or cap < 1

        if bad(self.default):
            raise ConfigError(f"max-examples-per-site: expected an integer >= 1, got {self.default!r}")
        for name, cap in self.per_site.items():
            if bad(cap):
                raise ConfigError(f"site-example-caps {name}={cap!r}: expected an integer >= 1")

    @classmethod
    def parse(cls, default: int, spec: str) -> "ExampleCaps":
        """From run_config: ``default`` and ``spec`` = ``"name=N,name2=M"`` (names or node ids)."""
        per_site: dict[str, int] = {}
        for item in (p.strip() for p in str(spec).split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip().strip('"')
            try:
                if not sep or not name:
                    raise ValueError
                cap = int(value.strip())
            except ValueError:
                raise ConfigError(f"site-example-caps: {item!r} is not name=N with N an integer") from None
            # The last one won: a copy-paste slip silently raised the cap these exist for (an audit).
            if name in per_site:
                raise ConfigError(f"site-example-caps: {name!r} is given twice ({per_site[name]} and {cap}); "
                                  "give each site one cap")
            per_site[name] = cap
        return cls(int(default), per_site)

    def cap(self, node_id: int, name: str | None = None) -> int:
        """The cap of node ``node_id`` if one is keyed by it, else of the site ``name``, else the
        default. A key of digits only is a node id and never matches a name: a capped node that
        called itself "102" must not take node 102's cap (site names may be digits)."""
        if str(node_id) in self.per_site:
            return self.per_site[str(node_id)]
        if name is not None and not name.isdigit() and name in self.per_site:
            return self.per_site[name]
        return self.default


#: BatchNorm buffers left out of the update norm (see check_arrays).
RUNNING_STATS = ("running_mean", "running_var")
#: Largest |running_mean| or running_var a reply may carry. Sites feed normalised inputs
#: (unit-scale channels), so honest activations stay orders of magnitude below it (even raw HU,
#: a variance of about 1e6, passes); a lie of 3e38 would otherwise pass every other check.
MAX_RUNNING_STAT = 1e8


@dataclass(frozen=True)
class ReplyLimits:
    """What the server accepts.

    ``max_update_norm``: bound on ||w_client - w_global||_2 over the shared learned
    parameters, BatchNorm running statistics excluded (parameter units; ``None`` disables
    the check). ``key_dim``: D of the keys.
    ``max_keys``: most keys one reply may carry, and ``max_keys_rule`` what sets it (named
    when a reply exceeds it). ``key_norm_tol``: keys are unit vectors after privatisation,
    so |norm - 1| must be <= this.
    """

    key_dim: int
    max_keys: int
    max_update_norm: float | None = None
    key_norm_tol: float = 1e-3
    max_keys_rule: str = "max-keys"

    @classmethod
    def of_run(cls, run_config: Mapping[str, Any], key_dim: int) -> "ReplyLimits":
        """The limits a run's settings give: a prototype release has at most
        min(prototype-centres, max-keys) rows (clients/app.py), so a reply with more is a
        lie, and accepting it would let one site fill the queue and pull the public centres
        its way; per-record keys have at most max-keys; with ``key-release=none`` no site
        releases anything, so a single row is refused (one lying site would otherwise be the
        only source of every other site's global negatives)."""
        from clients.task import prototype_rows, run_value

        r = lambda k: run_value(run_config, k)  # noqa: E731
        max_norm = r("max-update-norm")
        bound = max_norm if max_norm > 0 else None
        if r("key-release") == "none":  # no site releases: any key row is a lie that would be every negative
            return cls(key_dim, 0, bound, max_keys_rule="key-release=none")
        if r("key-release") == "prototypes" and prototype_rows(run_config) < r("max-keys"):
            return cls(key_dim, prototype_rows(run_config), bound, max_keys_rule="prototype-centres")
        return cls(key_dim, r("max-keys"), bound)


#: Bytes an array's serialisation may hold beyond its values: numpy's .npy header (128 bytes
#: for these shapes; a few KiB of slack for any dtype and shape string).
NPY_HEADER_SLACK = 4096


def decode_arrays(record: ArrayRecord, max_bytes: Mapping[str, int] | int | None = None) -> dict[str, np.ndarray]:
    """ArrayRecord -> {name: ndarray}; raises ValueError naming an array that does not decode,
    that holds more bytes than ``max_bytes`` allows (checked before decoding: one name's limit,
    or one limit for all) or whose values differ from the shape and dtype it declares.

    The declared shape is what a reader sees without decoding, and Flower does not check it
    against the data: a reply may declare keys (0, D) and hold (5, D). So every check reads
    the decoded array, and a mismatch is itself a lie.
    """
    out = {}
    for name, arr in record.items():
        limit = max_bytes.get(name) if isinstance(max_bytes, Mapping) else max_bytes
        if limit is not None and len(arr.data) > limit + NPY_HEADER_SLACK:
            raise ValueError(f"array {name!r} holds {len(arr.data)} bytes, more than the {limit} its values may take")
        try:
            value = arr.numpy()
        except Exception as exc:  # corrupt bytes raise many types from numpy
            raise ValueError(f"array {name!r} does not decode ({type(exc).__name__}: {exc})") from None
        if not isinstance(value, np.ndarray):  # an .npz archive decodes to a mapping of arrays
            raise ValueError(f"array {name!r} does not decode to one array (got {type(value).__name__})")
        declared = (tuple(int(d) for d in arr.shape), str(arr.dtype))
        if (tuple(value.shape), str(value.dtype)) != declared:
            raise ValueError(f"array {name!r} declares shape {_shape(declared[0])} of {declared[1]} but holds "
                             f"{_shape(value.shape)} of {value.dtype}")
        out[name] = value
    return out


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 max_update_norm: float | None, measured: dict[str, float] | None = None) -> list[str]:
    """Names, shapes, dtypes and finiteness of ``arrays`` against the global ``reference``,
    and the L2 norm of their difference (the client's update) against ``max_update_norm``."""
    reasons = []
    missing = [n for n in reference if n not in arrays]
    unexpected = [n for n in arrays if n not in reference]
    if missing:
        reasons.append(f"arrays: missing {len(missing)} of {len(reference)} (first: {missing[0]!r})")
    if unexpected:
        reasons.append(f"arrays: {len(unexpected)} unexpected (first: {unexpected[0]!r})")
    sq_norm = 0.0
    comparable = True
    for name, ref in reference.items():
        if name not in arrays:
            comparable = False
            continue
        a = arrays[name]
        if a.shape != ref.shape:
            reasons.append(f"arrays {name!r} has shape {_shape(a.shape)}, expected {_shape(ref.shape)}")
            comparable = False
            continue
        if a.dtype != ref.dtype:
            reasons.append(f"arrays {name!r} has dtype {a.dtype}, expected {ref.dtype}")
            comparable = False
            continue
        if np.issubdtype(a.dtype, np.floating):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            if bad:
                reasons.append(f"arrays {name!r} has {bad} non-finite value(s)")
                comparable = False
                continue
            if name.endswith(RUNNING_STATS):
                # BatchNorm's running statistics follow the site's input scale, not its
                # learning rate: one round on raw CT can move running_var by thousands,
                # so counting them would refuse every honest BN site (measured, norm=batch).
                # They get a magnitude bound instead (MAX_RUNNING_STAT); a variance below
                # zero is a lie. docs/federation.md says what this leaves a liar.
                if name.endswith("running_var") and float(a.min(initial=0.0)) < 0:
                    reasons.append(f"arrays {name!r} has a negative variance")
                    comparable = False
                elif float(np.abs(a).max(initial=0.0)) > MAX_RUNNING_STAT:
                    reasons.append(f"arrays {name!r} has |value| {float(np.abs(a).max()):.3g} over "
                                   f"{MAX_RUNNING_STAT:g}: no activation of normalised inputs comes near it")
                    comparable = False
                continue
            diff = a.astype(np.float64) - ref.astype(np.float64)
            sq_norm += float(np.dot(diff.ravel(), diff.ravel()))
    if comparable and measured is not None:
        measured["update-norm"] = math.sqrt(sq_norm)
    if comparable and max_update_norm is not None and math.sqrt(sq_norm) > max_update_norm:
        reasons.append(f"arrays: update norm {math.sqrt(sq_norm):.4g} exceeds max-update-norm {max_update_norm:g}")
    return reasons


def check_keys(record: ArrayRecord | None, limits: ReplyLimits) -> list[str]:
    """The privatised keys: one float32 array (n, D), n <= max_keys, finite, unit-norm rows."""
    if record is None:
        return [f"record {KEYS!r} is missing"]
    if list(record) != [KEYS]:
        return [f"keys: expected one array named {KEYS!r}, got {sorted(record)[:5]}"]
    try:
        (name, k), = decode_arrays(record, limits.max_keys * limits.key_dim * 4).items()
    except ValueError as exc:
        return [f"keys: {exc}"]
    if k.ndim != 2 or k.shape[1] != limits.key_dim:
        return [f"keys {name!r} has shape {_shape(k.shape)}, expected (n, {limits.key_dim})"]
    if k.dtype != np.float32:
        return [f"keys {name!r} has dtype {k.dtype}, expected float32"]
    if k.shape[0] > limits.max_keys:
        return [f"keys: {k.shape[0]} keys exceed {limits.max_keys_rule} {limits.max_keys}"]
    if not np.isfinite(k).all():
        return [f"keys: {int(k.size - np.count_nonzero(np.isfinite(k)))} non-finite value(s)"]
    if k.shape[0]:
        dev = np.abs(np.linalg.norm(k.astype(np.float64), axis=1) - 1.0)
        if dev.max() > limits.key_norm_tol:
            return [f"keys: {int((dev > limits.key_norm_tol).sum())} key(s) are not unit vectors "
                    f"(largest |norm - 1| = {dev.max():.3g} > {limits.key_norm_tol:g})"]
    return []


def check_metrics(record: MetricRecord | None, expected: frozenset[str] = REQUIRED_METRICS) -> list[str]:
    """Exactly the ``expected`` entries; scalars; finite where they must be; num-examples >= 1.

    The exact key set matters beyond hygiene: Flower's FedAvg refuses a whole round
    (``InconsistentMessageReplies``) if the accepted replies' metrics differ in keys.
    """
    if record is None:
        return [f"record {METRICS!r} is missing"]
    reasons = []
    missing = sorted(expected - set(record))
    unexpected = sorted(set(record) - expected)
    if missing:
        reasons.append(f"metrics: missing {', '.join(missing)}")
    if unexpected:  # names a hostile site chose: a few, each short and printable
        names = ", ".join(untrusted_text(name, 40) for name in unexpected[:5])
        reasons.append(f"metrics: unexpected {names}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for name, value in record.items():
        if isinstance(value, list):
            reasons.append(f"metrics {name!r} is a list, expected a number")
            continue
        v = float(value)
        if math.isnan(v) and name not in _MAY_BE_NAN:
            reasons.append(f"metrics {name!r} is NaN")
        elif math.isinf(v) and name not in _MAY_BE_INF:
            reasons.append(f"metrics {name!r} is {v}")
    reasons += check_num_examples(record.get("num-examples"))
    exhausted = record.get("dp-keys-exhausted")
    if exhausted not in (None, 0, 1, 0.0, 1.0):
        reasons.append(f"metrics 'dp-keys-exhausted' is {exhausted}, expected 0 or 1")
    for name in _NON_NEGATIVE:
        value = record.get(name)
        if isinstance(value, (int, float)) and float(value) < 0:
            reasons.append(f"metrics {name!r} is {value}, expected >= 0")
    for name, (lo, hi) in _RANGES.items():
        value = record.get(name)
        if name in _NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
            continue  # reported as negative above
        if isinstance(value, (int, float)) and math.isfinite(value) and not lo <= float(value) <= hi:
            reasons.append(f"metrics {name!r} is {float(value):.3g}, expected it in [{lo:g}, {hi:g}]")
    seconds = record.get("seconds")
    if isinstance(seconds, (int, float)) and float(seconds) > MAX_REPLY_SECONDS:
        reasons.append(f"metrics 'seconds' is {float(seconds):.3g}, expected at most {MAX_REPLY_SECONDS:g}")
    for name in ("skipped", "dp-keys-releases"):  # counts
        count = record.get(name)
        if isinstance(count, (int, float)) and math.isfinite(count) and not float(count).is_integer():
            reasons.append(f"metrics {name!r} is {count}, expected a whole number")
    delta = record.get("dp-keys-delta")
    if isinstance(delta, (int, float)) and not 0.0 <= float(delta) < 1.0:
        reasons.append(f"metrics 'dp-keys-delta' is {delta}, expected a probability in [0, 1)")
    share = record.get("global-share")
    if isinstance(share, (int, float)) and not math.isnan(share) and not 0.0 <= share <= 1.0:
        reasons.append(f"metrics 'global-share' is {share}, expected a share in [0, 1]")
    status = record.get("dp-status")
    if status is not None and (isinstance(status, list) or status not in DP_STATUS):  # a list is unhashable
        reasons.append(f"metrics 'dp-status' is {status}, expected one of {sorted(DP_STATUS)}")
    return reasons


def check_num_examples(n: Any) -> list[str]:
    """``num-examples`` is a FedAvg weight: a whole number >= 1. 12.5, 0 and -3 are lies no
    honest site tells, so they reject the reply; a too-large whole number is clipped to the
    site's cap by the strategy instead (:class:`ExampleCaps`)."""
    if n is None or isinstance(n, list) or not math.isfinite(float(n)):
        return []  # missing, a list or non-finite: check_metrics reports those
    if float(n) < 1 or not float(n).is_integer():
        return [f"metrics 'num-examples' is {n}, expected a whole number >= 1"]
    return []


def check_site(record: ConfigRecord | None) -> list[str]:
    """The optional ``site`` record: exactly ``{"name": <site name>}`` (clients.task.SITE_NAME)."""
    if record is None:
        return []
    if set(record) != {"name"}:
        return [f"site: expected exactly one entry 'name', got {sorted(record)[:5]}"]
    try:
        check_site_name(record["name"], "site name")
    except ConfigError as exc:
        return [str(exc)]
    return []


def site_name_of(content: RecordDict) -> str | None:
    """The site name a reply carries, when it carries a valid one."""
    record = content.config_records.get(SITE_RECORD)
    return str(record["name"]) if record is not None and not check_site(record) else None


def untrusted_text(text: Any, limit: int = 300) -> str:
    """A site's free text (an error reply's reason) as the server may log and store it: one
    line of printable characters, at most ``limit`` of them. A hostile site must not forge log
    lines or flood the log; an honest one sends one line under 300 characters anyway
    (clients.app.public_reason)."""
    line = "".join(c if c.isprintable() else " " for c in str(text))
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def released_keys(content: RecordDict) -> np.ndarray:
    """The keys (n, D) of a reply :func:`validate_reply` accepted, decoded: what the global
    queue takes, never read from the shape the reply declares."""
    return content.array_records[KEYS][KEYS].numpy()


def validate_reply(content: RecordDict, reference: Mapping[str, np.ndarray], limits: ReplyLimits,
                   expected_metrics: frozenset[str] = REQUIRED_METRICS,
                   measured: dict[str, float] | None = None) -> list[str]:
    """All reasons to reject one train reply (empty list: accept).

    ``reference``: the global model sent this round, {name: ndarray}. Checks record names
    (exactly ``arrays``, ``keys``, ``metrics``, optionally ``site``: :func:`check_site`), the
    arrays (:func:`check_arrays`), the keys
    (:func:`check_keys`) and the metrics (:func:`check_metrics`). ``measured``, when given,
    receives ``update-norm``: ||w_client - w_global||_2 when the arrays are comparable.
    """
    reasons = []
    allowed = {ARRAYS: ArrayRecord, KEYS: ArrayRecord, METRICS: MetricRecord, SITE_RECORD: ConfigRecord}
    for name, record in content.items():
        if name not in allowed:
            reasons.append(f"record {name!r} ({type(record).__name__}) is not allowed")
        elif not isinstance(record, allowed[name]):
            reasons.append(f"record {name!r} is a {type(record).__name__}, expected {allowed[name].__name__}")
    if reasons:
        return reasons
    if ARRAYS not in content:
        reasons.append(f"record {ARRAYS!r} is missing")
    else:
        try:
            # an array the model does not have may hold nothing: refused by name in check_arrays
            arrays = decode_arrays(content.array_records[ARRAYS],
                                   {name: ref.nbytes for name, ref in reference.items()} | {
                                       name: 0 for name in content.array_records[ARRAYS] if name not in reference})
        except ValueError as exc:
            reasons.append(f"arrays: {exc}")
        else:
            reasons += check_arrays(arrays, reference, limits.max_update_norm, measured)
    reasons += check_keys(content.array_records.get(KEYS), limits)
    reasons += check_site(content.config_records.get(SITE_RECORD))
    metrics = content.metric_records.get(METRICS)
    reasons += check_metrics(metrics, expected_metrics)
    if not reasons and metrics is not None:
        # ("dp-keys-exhausted" = 1 says the NEXT release cannot be paid for; the release that
        # used up the budget legitimately carries keys, so it is no ground for rejection.)
        n_keys = released_keys(content).shape[0]  # decoded: the declared shape may lie
        if n_keys and not (float(metrics["dp-keys-releases"]) >= 1 and float(metrics["dp-keys-epsilon"]) > 0):
            reasons.append(f"keys: {n_keys} keys sent but the site accounts no release for them "
                           f"(dp-keys-releases {metrics['dp-keys-releases']}, dp-keys-epsilon {metrics['dp-keys-epsilon']})")
        elif n_keys and int(metrics["dp-status"]) not in RELEASING_STATUS:
            reasons.append(f"keys: {n_keys} keys sent under dp-status {int(metrics['dp-status'])} "
                           f"({DP_STATUS[int(metrics['dp-status'])]}), which releases none")
    return reasons
