"""What server and clients agree on: the run_config schema, the model, the shared arrays.

Flower-quickstart style ``task.py``: building the MoCo model and its training config from a
run's ``run_config``, and naming the part of the model the federation shares. Both
``clients.app`` and ``server.app`` import it, so the two sides cannot disagree.

Run config (``[tool.flwr.app.config]``, override with ``flwr run --run-config "k=v ..."``)
-------------------------------------------------------------------------------------------
See :data:`RUN_DEFAULTS` for every key and its default; docs/federation.md explains each.

Node config (``flower-supernode --node-config 'k="v" ...'``), per site
----------------------------------------------------------------------
``domain`` (str), ``data-path`` (str), ``dp-epsilon`` (float or ``inf`` = no noise, benchmarks
only; unset = share nothing), ``dp-delta`` (float, default 1e-5), ``ledger-path`` (str: the
site's privacy ledger file; default ``<state-dir>/privacy-ledger.json``; without either the
site shares weights only), ``data-options`` (str ``"k=v,k=v"``, domain options),
``state-dir`` (str, optional: training state for resumed runs, and the ledger),
``device`` (str, default ``auto``: cuda, then mps, then cpu),
``threads`` (int, torch intra-op threads, 0 (torch's default) to the CPU count),
``amp`` (bool, default true: mixed precision when the site trains on CUDA; false for float32).
``site-name`` (str, optional: how the server's logs, rounds.jsonl and plots name this site;
1-32 characters of ``A-Za-z0-9._-``; default ``site-<partition-id>`` in simulation, else the node id).
In simulation Flower sets ``partition-id``; a site without ``data-path`` then reads
``<run_config demo-root>/site-<partition-id>``.

Site settings file (``<data folder>/fedmoco-site.toml``), per site
------------------------------------------------------------------
The site admin's own settings, beside the data only the admin writes: ``dp-epsilon``,
``dp-delta``, ``dp-rounds``, ``ledger-path``, ``state-dir``, ``site-name`` (nothing else).
node_config wins over the file key by key; run_config never sets them. Relative paths are
resolved against the file's folder. See :func:`site_config` and docs/privacy.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedmoco.config import IMAGE_SIZES, MoCoConfig, TrainConfig
from fedmoco.errors import ConfigError

log = logging.getLogger("flwr.fedmoco.client")
# The site's own settings live in the core so that `fedmoco check-site` reads them as a round does.
from fedmoco.site_settings import (MAX_PLANNED_RELEASES, SITE_FILE_KEYS, SITE_NAME,  # noqa: F401 re-exported
                                   SITE_PATH_KEYS, SITE_RECORD, SiteConfig, check_outside_data, check_site_name,
                                   read_site_file, setting_label, site_config, site_name)
from fedmoco.moco import MoCo

#: Every run_config key with its default. pyproject's [tool.flwr.app.config] mirrors it;
#: a key missing there (e.g. with flwr.simulation.run_simulation, which passes an empty
#: run_config) falls back to this table.
RUN_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    # model (MoCoConfig)
    "arch": "tiny",
    "in-channels": 1,
    "image-size": 64,
    "small-input": True,
    "norm": "group",  # no batch statistics: nothing site-specific hides in BN buffers
    "dim": 128,
    "hidden-dim": 512,
    "mlp": True,
    "predictor": False,
    "symmetric": False,
    "temperature": 0.2,
    "momentum": 0.99,
    "local-queue-size": 1024,
    # local training (TrainConfig), per round
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.06,
    "weight-decay": 5e-4,
    "warmup-epochs": 0.0,
    "max-steps-per-epoch": 0,  # 0 = whole epoch
    "num-workers": 0,
    "cache": True,  # false: no decoded-sample cache, every round decodes afresh
    "seed": 0,
    "domain": "medical",  # a site's node_config "domain" wins
    "data-options": "",  # "k=v,k=v"; a site's node_config "data-options" wins
    "input-mean": "",  # "" = each site normalises with its own statistics
    "input-std": "",
    # the key encoder and client-side blending of the global model
    "key-encoder": "local-ema",  # or "reset"
    "fedema-lambda": 0.0,  # > 0: FedEMA divergence-aware blending of global into local
    "personal-head": False,  # True: each site keeps its own projection head (FedCLR-style)
    # what a site shares besides weights (its budget is node_config dp-epsilon / dp-delta only)
    # none (default: measured best, benchmarks/notes/global_queue_benefit.md) | prototypes | keys
    "key-release": "none",
    # releases are computed with the moving average of the global models received, this much
    # of the previous average kept per round (0: the round's model as received, which collapsed
    # training with keys; benchmarks/notes/global_queue_benefit.md)
    "release-ema": 0.9,
    "prototype-sample-rate": 1.0,  # Poisson rate q of the images summarised per round
    "prototype-centres": 8,  # C public centres: at most C noisy sums per site and round (prototype_signal.py)
    "prototype-min-cosine": 0.5,  # drop noisy sums whose estimated cosine with the true sum is lower
    # the site's first release (on seeded centres) gets this many times the privacy of each later
    # one; the total stays the site's budget (fedmoco.privacy.prototype_noise_schedule)
    "prototype-first-share": 2.0,
    "key-sample-rate": 0.05,  # key-release=keys: Poisson rate q of per-image keys
    "max-keys": 512,  # most vectors one reply may carry (keys; prototype-centres is capped to it too)
    # each query skips the global negatives in its key's bucket of the public centres (its own
    # kind, a false negative); false: every global negative counts (global_queue_benefit.md)
    "cancel-false-negatives": True,
    # server: global queue
    "global-queue-size": 8192,
    "global-queue-max-age": 5,  # rounds a summary stays in the queue (0 = until overwritten)
    "queue-sample": 1024,
    "exclude-own-keys": True,
    # server: sampling, validation, aggregation
    "fraction-train": 1.0,
    "min-nodes": 2,  # nodes that must be connected before a round starts
    "min-replies": 1,  # accepted replies a round needs to update the global model
    # Bound on ||w_site - w_global||_2 (0 = unbounded). 10 = 12x the largest honest update
    # measured (tiny, 100 local steps: 0.86; benchmarks/update_norms.py) and below ||w_global||
    # of tiny (26) and resnet18 (113), so one reply cannot replace the model. docs/federation.md.
    "max-update-norm": 10.0,
    "max-examples-per-site": 100_000,  # a site's FedAvg weight counts at most this many examples
    "site-example-caps": "",  # "name=N,name2=M": per-site caps by site name or node id
    "aggregation": "fedavg",  # fedavg | fedmedian | fedtrimmedavg | krum
    "trim-beta": 0.2,
    "krum-malicious": 0,
    "model-dp-noise": 0.0,  # > 0: central DP on model updates (server-side clipping)
    "model-dp-clip": 10.0,
    "model-dp-delta": 1e-5,  # delta of the server's central model DP (not a site's budget)
    "round-timeout": 3600.0,
    # server: outputs
    "out-dir": "runs/federation",
    "resume": True,
    "plots": True,
    # simulation only: where each simulated site's data lives
    "demo-root": "",
}

#: Prefixes of the state_dict entries the federation averages: the query encoder
#: (backbone + projection head) and the v3 predictor when there is one.
SHARED_PREFIXES = ("encoder_q.", "predictor.")
HEAD_PREFIX = "encoder_q.head."


#: run_config ``key-release``: what a site may release each round (docs/privacy.md).
KEY_RELEASE_MODES = ("prototypes", "keys", "none")


def run_value(run_config: Mapping[str, Any], key: str) -> Any:
    """``run_config[key]`` or its :data:`RUN_DEFAULTS` value, coerced to the default's type."""
    if key not in RUN_DEFAULTS:
        raise KeyError(f"unknown run_config key {key!r}")
    default = RUN_DEFAULTS[key]
    value = run_config.get(key, default)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)  # "resume=2" is a typo, not a yes
        if isinstance(value, bool) and not isinstance(default, str):
            raise ValueError(value)  # "lr=true" is not 1.0
        if isinstance(default, int):
            if float(value) != int(float(value)):  # NaN, 1.5; inf raises OverflowError below
                raise ValueError(value)
            return int(float(value))
        if isinstance(default, float):
            number = float(value)
            if math.isnan(number):
                raise ValueError(value)
            return number
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"run_config {key}: expected {type(default).__name__}, got {value!r}") from None


#: The config dataclasses' field names (as their errors give them) -> the run_config keys.
_FIELD_KEYS = {"queue_size (K)": "local-queue-size", "momentum (m)": "momentum", "temperature (T)": "temperature",
               "in_channels": "in-channels", "hidden_dim": "hidden-dim", "dim": "dim", "arch": "arch", "norm": "norm",
               "epochs": "local-epochs", "batch_size": "batch-size", "lr": "lr", "weight_decay": "weight-decay",
               "warmup_epochs": "warmup-epochs", "num_workers": "num-workers",
               "max_steps_per_epoch": "max-steps-per-epoch"}


@contextlib.contextmanager
def _named_by_run_config() -> Iterator[None]:
    """A MoCoConfig/TrainConfig error names the run_config key the coordinator set, not the field."""
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        for name, key in _FIELD_KEYS.items():
            if text.startswith((f"{name} ", f"{name}:")):
                raise ConfigError(f"run_config {key}{text[len(name):]}") from None
        raise


def moco_config(run_config: Mapping[str, Any]) -> MoCoConfig:
    """The federation's MoCo model from ``run_config`` (validated by MoCoConfig)."""
    r = lambda k: run_value(run_config, k)  # noqa: E731
    with _named_by_run_config():
        return MoCoConfig(
            arch=r("arch"), in_channels=r("in-channels"), small_input=r("small-input"), norm=r("norm"),
            dim=r("dim"), mlp=r("mlp"), hidden_dim=r("hidden-dim"), predictor=r("predictor"),
            symmetric=r("symmetric"), queue_size=r("local-queue-size"), momentum=r("momentum"),
            temperature=r("temperature"),
        )


def train_config(run_config: Mapping[str, Any]) -> TrainConfig:
    """One round of local training: ``local-epochs`` epochs (validated by TrainConfig). AMP and
    channels_last as TrainConfig has them (on by default, CUDA only); a site can turn AMP off
    in its node_config (``amp=false``)."""
    r = lambda k: run_value(run_config, k)  # noqa: E731
    cap = r("max-steps-per-epoch")
    with _named_by_run_config():
        return TrainConfig(
            epochs=r("local-epochs"), batch_size=r("batch-size"), lr=r("lr"), weight_decay=r("weight-decay"),
            warmup_epochs=r("warmup-epochs"), num_workers=r("num-workers"), seed=r("seed"),
            max_steps_per_epoch=cap if cap > 0 else None,
        )


#: Ranges of run_config values (keys that the current RUN_DEFAULTS lack are skipped). The
#: server checks them before a run starts (server/runs.py validate_run_config), and each site
#: again before a round (clients/app.py): a server that skipped them must not make a site's round
#: unbounded.
RUN_RANGES: dict[str, tuple[str, Any]] = {
    # a site plans its privacy budget over the rounds: no more than it may plan
    "num-server-rounds": (f"in [1, {MAX_PLANNED_RELEASES}]", lambda v: 1 <= v <= MAX_PLANNED_RELEASES),
    "image-size": (f"in [{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}]", lambda v: IMAGE_SIZES[0] <= v <= IMAGE_SIZES[1]),
    "lr": ("> 0 and finite", lambda v: 0 < v < math.inf),
    "prototype-sample-rate": ("in (0, 1]", lambda v: 0 < v <= 1),
    "prototype-centres": (">= 1", lambda v: v >= 1),
    "prototype-min-cosine": ("in [0, 1]", lambda v: 0 <= v <= 1),
    # replies are refused above max-keys x D floats before they are decoded: a bound on that
    "max-keys": ("in [0, 65536]", lambda v: 0 <= v <= 65536),
    "max-update-norm": (">= 0 (0 = off)", lambda v: v >= 0),
    "model-dp-clip": ("> 0 and finite", lambda v: 0 < v < math.inf),
    "min-nodes": (">= 1", lambda v: v >= 1),
    "min-replies": (">= 1", lambda v: v >= 1),
    "fraction-train": ("in (0, 1]", lambda v: 0 < v <= 1),
    # sizes the server or every site allocates at once: bounds far above any use, under memory
    # (1,048,576 keys of dim 8192 would already be 32 GiB)
    "global-queue-size": ("in [1, 1048576]", lambda v: 1 <= v <= 2**20),
    "queue-sample": ("in [0, 65536]", lambda v: 0 <= v <= 65536),
    "key-sample-rate": ("in (0, 1]", lambda v: 0 < v <= 1),
    "dp-epsilon": ("> 0", lambda v: v > 0),
    "dp-delta": ("in (0, 1)", lambda v: 0 < v < 1),
    "model-dp-delta": ("in (0, 1)", lambda v: 0 < v < 1),
    "round-timeout": ("> 0", lambda v: v > 0),
    "trim-beta": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "krum-malicious": (">= 0", lambda v: v >= 0),
    "max-steps-per-epoch": (">= 0 (0 = whole epoch)", lambda v: v >= 0),
    "global-queue-max-age": (">= 0", lambda v: v >= 0),
    "prototype-first-share": ("in [1, 100] (1 = every release alike)", lambda v: 1 <= v <= 100),
    "temperature": ("> 0 and finite", lambda v: 0 < v < math.inf),
    "weight-decay": (">= 0 and finite", lambda v: 0 <= v < math.inf),
    "fedema-lambda": (">= 0 and finite", lambda v: 0 <= v < math.inf),
    "model-dp-noise": (">= 0 and finite", lambda v: 0 <= v < math.inf),
    "local-queue-size": ("in [1, 1048576]", lambda v: 1 <= v <= 2**20),
    "dim": ("in [1, 8192]", lambda v: 1 <= v <= 8192),
    "hidden-dim": ("in [1, 65536]", lambda v: 1 <= v <= 65536),
    "batch-size": ("in [2, 65536]", lambda v: 2 <= v <= 65536),
    "local-epochs": ("in [1, 10000]", lambda v: 1 <= v <= 10000),
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < 2**32),
    "release-ema": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "warmup-epochs": (">= 0 and finite", lambda v: 0 <= v < math.inf),
}


def check_run_ranges(run_config: Mapping[str, Any]) -> None:
    """ConfigError naming the first run_config value of the wrong type, outside
    :data:`RUN_RANGES`, or at odds with another (queue sizes x dim, warm-up x rounds, input
    mean/std x channels). The server checks this before a run starts; each site checks it again
    before its ledger is touched, since a server that skipped it reached the sites: 'warmup-epochs
    inf' and 'cancel-false-negatives maybe' failed a round after its release was paid for (found
    by an audit)."""
    for key in RUN_DEFAULTS:  # a wrong type names its key
        run_value(run_config, key)
    for key, (rule, ok) in RUN_RANGES.items():
        if key in RUN_DEFAULTS:
            value = run_value(run_config, key)
            if not ok(value):
                raise ConfigError(f"run_config {key} must be {rule}, got {value!r}")
    # Each range alone allowed a 32 GiB queue (2^20 keys x 8192 dims) at every site, which no
    # site setting could refuse; the products bound what the queues hold, far above any use
    # (MoCo's largest, 65,536 keys of 128 dims, is 32 MiB).
    dim = run_value(run_config, "dim")
    for key, cap_mib in (("local-queue-size", 256), ("global-queue-size", 1024)):
        mib = run_value(run_config, key) * dim * 4 / 2**20
        if mib > cap_mib:
            raise ConfigError(f"run_config {key} x dim ({run_value(run_config, key)} x {dim} float32) would take "
                              f"{mib:,.0f} MiB; at most {cap_mib} MiB")
    planned = run_value(run_config, "num-server-rounds") * run_value(run_config, "local-epochs")
    warmup = run_value(run_config, "warmup-epochs")
    if warmup > planned:
        raise ConfigError(f"run_config warmup-epochs {warmup:g} is longer than the federation's "
                          f"{planned} local epochs (num-server-rounds x local-epochs)")
    for key in ("input-mean", "input-std"):
        try:
            parse_channels(run_value(run_config, key), run_value(run_config, "in-channels"), key)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"run_config {key}: expected numbers separated by commas, "
                              f"got {run_value(run_config, key)!r}") from None


def prototype_rows(run_config: Mapping[str, Any]) -> int:
    """The most rows a site's prototype release holds, the number of public centres it sums
    over: min(``prototype-centres``, ``max-keys``) (the server refuses more than max-keys)."""
    return min(run_value(run_config, "prototype-centres"), run_value(run_config, "max-keys"))


#: Domain options that only a site's own node_config may set: where the site writes decoded
#: pixels and file paths (its caches), and the per-file limits that guard its memory against
#: hostile files. From run_config they are ignored: the coordinator must not choose a folder
#: a site writes patient-derived data to, nor lift the bounds that protect the site's host.
SITE_ONLY_OPTIONS = frozenset({"cache_dir", "cache_max_gb", "gdal_cache_mb", "max_block_mb", "max_raster_pixels",
                               "max_compression_ratio", "max_frame_pixels", "max_frames", "max_decoded_mb",
                               "max_pixels"})


def _option_name(key: str) -> str:
    """An option's name as the most lenient domain parser reads it (satellite: ``-`` as ``_``):
    matched on the raw spelling, ``max-raster-pixels`` got past the filter and lifted the limit."""
    return str(key).strip().replace("-", "_").lower()


def site_options(node: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The domain options of a site: node_config ``data-options`` when it sets them (all of
    them, the site's own choice), else run_config's without :data:`SITE_ONLY_OPTIONS`,
    each one left out logged."""
    if "data-options" in node:
        return parse_options(str(node["data-options"]))
    options = parse_options(str(run_value(run, "data-options")))
    ignored = sorted(k for k in options if _option_name(k) in SITE_ONLY_OPTIONS)
    if ignored:
        log.warning("run_config data-options %s ignored: only the site's node_config data-options may set them",
                    ", ".join(ignored))
    return {k: v for k, v in options.items() if _option_name(k) not in SITE_ONLY_OPTIONS}


def parse_options(text: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (ints, floats and true/false converted).

    A list value keeps its commas: a comma-separated piece without ``=`` continues the option
    before it (``"bands=B02,B03,B04,B08,sampling=grid"``: bands ``"B02,B03,B04,B08"``), as the
    domain docs write them and ``--data-option`` takes them. A value that holds ``=`` itself
    (``band_roles=red=B04,nir=B08``) needs ``;`` between options: a text with a ``;`` is split
    on ``;`` alone."""
    text = str(text)
    if ";" in text:
        items = text.split(";")
    else:
        items = []
        for piece in text.split(","):
            if "=" in piece or not items:
                items.append(piece)
            else:
                items[-1] += "," + piece
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in items)):
        if "=" not in item:
            raise ConfigError(f"data-options: expected key=value, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        out[k] = _scalar(v)
    return out


def _scalar(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_channels(text: str, channels: int, name: str) -> list[float] | None:
    """``"0.5"`` or ``"0.4,0.5,0.6"`` -> one float per channel; ``""`` -> None. ConfigError for
    a value that is not finite, or (``input-std``) not > 0: every site would fail every round."""
    if not str(text).strip():
        return None
    values = [float(v) for v in str(text).split(",")]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"run_config {name}: {text!r} holds a value that is not finite")
    if name == "input-std" and not all(v > 0 for v in values):
        raise ConfigError(f"run_config {name}: {text!r} holds a standard deviation that is not > 0")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(f"run_config {name}: {len(values)} values for {channels} channels")
    return values


def federation_units(run_config: Mapping[str, Any], channels: int) -> tuple[list[float], list[float]] | None:
    """run_config ``input-mean`` / ``input-std`` as (mean, std), one float per channel, the
    other defaulting to 0 / 1 when only one is set; None when the run fixes neither (each site
    then normalises with its domain's own choice)."""
    mean = parse_channels(run_value(run_config, "input-mean"), channels, "input-mean")
    std = parse_channels(run_value(run_config, "input-std"), channels, "input-std")
    if mean is None and std is None:
        return None
    return mean or [0.0] * channels, std or [1.0] * channels


def is_shared(name: str) -> bool:
    """Whether state_dict entry ``name`` is averaged by the federation.

    BatchNorm's integer ``num_batches_tracked`` counters are left out: averaging a step
    counter means nothing, and it would turn int64 into float64 under FedAvg.
    """
    return name.startswith(SHARED_PREFIXES) and not name.endswith("num_batches_tracked")


def shared_state(model: MoCo) -> dict[str, torch.Tensor]:
    """The shared part of ``model``'s state_dict (detached CPU tensors, in model order)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if is_shared(k)}


def shared_arrays(model: MoCo) -> ArrayRecord:
    """The shared weights as the ``arrays`` record of a message."""
    return ArrayRecord({k: Array(v.numpy()) for k, v in shared_state(model).items()})


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


#: Largest |value| a global model entry may hold: the server's bound on BatchNorm running
#: statistics (server/validation.py MAX_RUNNING_STAT), far above any honest weight or statistic.
#: A model of 1e30s is finite, passed the check, and diverged in training after the site's
#: ledger had paid for the round's release (found by an audit).
MAX_GLOBAL_VALUE = 1e8


def _check_global_entry(name: str, got: torch.Tensor | None, mine: torch.Tensor) -> None:
    """ValueError unless ``got`` can stand for ``mine``: present, the exact shape, floating
    point, and finite and within :data:`MAX_GLOBAL_VALUE` in ``mine``'s dtype. (A (1,)-shaped
    entry used to broadcast into a constant model; a float64 1e39 was finite as sent and inf
    once cast to the model's float32.)"""
    if got is None:
        raise ValueError(f"it lacks {name!r}")
    if tuple(got.shape) != tuple(mine.shape):
        raise ValueError(f"{name!r} has shape {tuple(got.shape)}, expected {tuple(mine.shape)}")
    if not got.is_floating_point():
        raise ValueError(f"{name!r} holds {str(got.dtype).removeprefix('torch.')} values, expected floating point")
    cast = got.to(mine.dtype)
    if not torch.isfinite(cast).all():
        raise ValueError(f"{name!r} holds NaN or infinite values (as {str(mine.dtype).removeprefix('torch.')})")
    if cast.numel() and float(cast.abs().max()) > MAX_GLOBAL_VALUE:
        raise ValueError(f"{name!r} holds values beyond +-{MAX_GLOBAL_VALUE:g}")


@torch.no_grad()
def load_shared(model: MoCo, weights: Mapping[str, torch.Tensor], *, keep_head: bool = False,
                fedema_lambda: float = 0.0) -> float:
    """Load the global ``weights`` into the shared part of ``model``; returns FedEMA's mu.

    ``keep_head``: leave ``encoder_q.head`` as it is (a site's personalised head).
    ``fedema_lambda`` > 0 (FedEMA, Zhuang et al. 2022): instead of overwriting, blend
    ``w = mu * w_local + (1 - mu) * w_global`` with ``mu = min(lambda * ||w_global -
    w_local||_2, 1)`` over the blended entries: the further a site has drifted from the
    federation, the more of its own model it keeps. mu is 0 when the weights are replaced.
    ValueError, before anything is loaded, unless every shared entry of ``weights`` (the kept
    head's too) is there with its exact shape, floating point and finite.
    """
    state = model.state_dict()
    shared = [k for k in state if is_shared(k)]
    for k in shared:
        _check_global_entry(k, weights.get(k), state[k])
    names = [k for k in shared if not (keep_head and k.startswith(HEAD_PREFIX))]
    mu = 0.0
    if fedema_lambda > 0:
        sq = sum(float((weights[k].to(state[k].device).float() - state[k].float()).pow(2).sum()) for k in names)
        mu = min(fedema_lambda * sq ** 0.5, 1.0)
    for k in names:
        g = weights[k].to(device=state[k].device, dtype=state[k].dtype)
        state[k].copy_(state[k] * mu + g * (1 - mu) if mu > 0 else g)
    return mu


def site_data_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
    """The site's data folder: node_config ``data-path``, else (simulation)
    ``<run_config demo-root>/site-<partition-id>``."""
    if str(node_config.get("data-path", "")).strip():
        # absolute: every message then names it whole, and the reply scrubs it whole (a relative
        # "Doe Jane 1961" reached the server as "Doe Jane <path>": only the part with a slash went)
        return Path(str(node_config["data-path"])).expanduser().absolute()
    root = run_value(run_config, "demo-root")
    if root and "partition-id" in node_config:
        return Path(root).expanduser() / f"site-{int(node_config['partition-id'])}"
    raise ConfigError("node_config data-path is not set (and no run_config demo-root + partition-id to derive it)")
