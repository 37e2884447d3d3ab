"""The site's Flower ClientApp: E local epochs of MoCo, then weights, metrics and noisy keys.

Per train message (server round r) a site:

1. reads its settings: node_config (domain, data-path, dp-epsilon, dp-delta, ...), its own
   settings file ``<data-path>/fedmoco-site.toml`` for the site-owned keys node_config leaves
   unset (budget, ledger, state-dir, site-name), and the run's hyper-parameters (run_config,
   see ``clients.task.RUN_DEFAULTS``);
2. builds its dataset; a missing or empty data folder is answered with an error reply
   (code :data:`SITE_DATA_UNAVAILABLE`), and the round goes on without the site. An error
   reply carries a code and a reason without paths or exception text; the details (which
   folder, which file, the traceback) go only to the site's own log;
3. restores its state from ``Context.state`` (``clients.state``): its own key encoder,
   local queue, optimizer and LR-schedule position, personal head, privacy ledger;
4. loads the global query encoder + projection head (+ predictor), by replacement or by
   FedEMA blending;
5. trains ``local-epochs`` epochs of MoCo: negatives = its local queue + the global
   negatives the server sent (record ``queue``, other sites' privatised keys);
6. before training, releases DP summaries computed with the global weights it received
   (public): noisy per-centre sums of a Poisson sample of its embeddings (run_config
   ``key-release=prototypes``, default) or one noisy key per sampled image (``keys``). The
   budget is the site's own ``dp-epsilon``/``dp-delta`` (node_config or settings file, never
   run_config) and is paid from its file-locked ledger (``ledger-path`` or ``state-dir``,
   outside the data folder); without a ledger, a budget, or
   with the budget spent, it sends an empty (0, D) array, reports why in ``dp-status``, and
   keeps training and sending weights;
7. saves its state and replies with exactly the records of docs/privacy.md: ``arrays``,
   ``keys``, ``metrics``, and ``site`` (its ``site-name``) when it has one. Never images,
   file names or DICOM attributes. Unreadable files, by reason, go to the site's own log.

The key encoder (run_config ``key-encoder``): ``local-ema`` (default) keeps each site's
own momentum encoder across rounds, so it keeps moving slowly (m per step) towards the
query encoder, which jumps to the global model at the start of every round. Its keys then
stay consistent with the local queue it filled in earlier rounds, MoCo's reason for a
momentum encoder. ``reset`` copies the freshly loaded global query encoder into the key
encoder each round: all sites start the round with identical key encoders, but the local
queue's older keys come from a different encoder.

The release encoder (run_config ``release-ema``, mu): a site computes its DP releases with
the moving average of the global models it has received, ``ema <- mu * ema + (1 - mu) *
global`` once per round, kept in its state: released vectors are then encoded as a slow,
momentum-like encoder encodes, like the keys they sit beside in other sites' softmax. mu = 0
uses the round's global model as received; keys of that query encoder, used as other sites'
negatives, collapsed training (benchmarks/notes/global_queue_benefit.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from clients.ledger import locked_ledger
from clients.state import SiteState, load_site_state, save_site_state
from clients.task import (KEY_RELEASE_MODES, SITE_RECORD, arrays_to_tensors, check_run_ranges, federation_units,
                          load_shared, moco_config, prototype_rows, run_value, shared_arrays, site_config,
                          site_data_path, site_name, site_options, train_config)
from fedmoco.config import MoCoConfig, TrainConfig
from fedmoco.data import (SITE_SETTINGS_FILE, DataConfig, Normalization, PretrainData, Renormalized,
                          build_pretrain_data, format_skipped, parse_bool)
from fedmoco.device import select_device
from fedmoco.errors import ConfigError, DataError, FedmocoError
from fedmoco.moco import MoCo
from fedmoco.ledger import (DP_STATUS, SiteLedger, check_site_delta, ledger_was_written, no_ledger_metrics,
                            read_ledger)
from fedmoco.moco import Encoder
from fedmoco.site_settings import privacy_settings
from fedmoco.train import EpochSummary, Trainer, make_loader

log = logging.getLogger("flwr.fedmoco.client")  # printed by Flower's console handler

#: Error code of a reply from a site that has no usable data (Flower's own codes are < 10).
SITE_DATA_UNAVAILABLE = 100
#: Error code of a reply from a site whose configuration does not fit the federation.
SITE_MISCONFIGURED = 101
#: Error code of a reply from a site whose training raised an unexpected exception.
SITE_FAILED = 102

app = ClientApp()


def _secure_generator() -> torch.Generator:
    """A generator seeded from the OS: the DP noise on keys must not be reproducible by
    anyone who knows the run's seed (a server that can regenerate the noise subtracts it)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


#: The most rows a site takes from the server's ``queue`` or ``centres`` record, whatever the
#: run_config says: queue-sample's bound in clients.task.RUN_RANGES (prototype-centres has none).
MAX_GLOBAL_ROWS = 65536


def _global_negatives(msg: Message, dim: int, name: str = "queue", limit: int = MAX_GLOBAL_ROWS) -> torch.Tensor | None:
    """The server's sample of other sites' keys (M, D) (record ``queue``), or its public
    centres (record ``centres``), or None when there is none. At most ``limit`` rows (the
    run's queue-sample or prototype-centres), finite unit rows; anything else is ignored with
    a warning: a server bug (or a hostile server) must not poison local training, nor make the
    site allocate without bound."""
    record = msg.content.array_records.get(name)
    if record is None or len(record) == 0:
        return None
    what = "global negatives" if name == "queue" else f"the server's {name}"
    limit = max(0, min(int(limit), MAX_GLOBAL_ROWS))
    array = next(iter(record.values()))
    shape = tuple(array.shape)
    if len(shape) != 2 or shape[1] != dim or shape[0] > limit:
        log.warning("ignoring %s of shape %s (expected (M, %d), M <= %d)", what, shape, dim, limit)
        return None
    try:  # bytes that are no array of that shape (a hostile or broken server): ignored, as documented
        keys = torch.from_numpy(np.array(array.numpy(), dtype=np.float32, copy=True))
    except (TypeError, ValueError, MemoryError) as exc:
        # A record that failed to decode here failed the round, after the ledger had paid for a
        # prototype release whose centres it was meant to give (found by an audit).
        log.warning("ignoring %s: it does not decode (%s)", what, type(exc).__name__)
        return None
    if tuple(keys.shape) != shape or not torch.isfinite(keys).all():
        log.warning("ignoring %s: its values are not finite, or not of the shape it declares %s", what, shape)
        return None
    off = (keys.norm(dim=1) - 1).abs() > 1e-3
    if off.any():  # those rows only: one bad row must not take every other site's negatives away
        log.warning("ignoring %d of the %d rows of %s: not unit vectors", int(off.sum()), keys.shape[0], what)
        keys = keys[~off]
    return keys if keys.shape[0] else None


def _cancel_centres(msg: Message, negatives: torch.Tensor | None, run: Any, dim: int) -> torch.Tensor | None:
    """The buckets for false-negative cancellation (C, D): the server's public centres, else the
    global negatives themselves (each query then skips only the one nearest its key); None when
    ``cancel-false-negatives`` is off or there are no global negatives."""
    if negatives is None or not run_value(run, "cancel-false-negatives"):
        return None
    centres = _global_negatives(msg, dim, "centres", run_value(run, "prototype-centres"))
    return centres if centres is not None else negatives


def _site_settings(ctx: Context) -> dict[str, Any]:
    """Per-site settings: node_config wins over run_config defaults. The site-owned ones
    (budget, ledger, state, name) come from node_config, else from the site's settings file
    ``<data-path>/fedmoco-site.toml`` (clients.task.site_config), never from run_config."""
    node, run = ctx.node_config, ctx.run_config
    data_path = site_data_path(node, run)
    own = site_config(node, data_path)
    if own.from_file():
        log.info("site settings from %s: %s", data_path / SITE_SETTINGS_FILE, ", ".join(own.from_file()))
    return {
        "domain": str(node.get("domain", run_value(run, "domain"))),
        "data_path": data_path,
        "options": site_options(node, run),
        # The privacy budget is the site's: its node_config or settings file, never run_config
        # (docs/privacy.md): epsilon, delta, delta_label, dp_rounds, ledger_path, state_dir.
        **privacy_settings(own, data_path),
        # "auto": the site's GPU when it has one (cuda, then mps), else the CPU.
        "device": select_device(str(node.get("device", "auto"))),
        "threads": _node_threads(node),
        "amp": _node_bool(node, "amp", True),  # mixed precision on the site's GPU (no effect on a CPU)
        "name": site_name(own),  # shown by the server instead of the node id
        "paths": _site_paths(ctx),  # scrubbed from every reason the server sees
    }


def _node_threads(node: Any) -> int:
    """node_config ``threads``: 0 (torch's default) up to this machine's CPU count. More
    intra-op threads than CPUs only oversubscribe them, and torch's pool crashed the process
    (SIGSEGV, no message) when asked for a million."""
    text = node.get("threads", 0)
    cpus = os.cpu_count() or 1
    try:
        threads = int(text)
    except (TypeError, ValueError):
        threads = -1
    if isinstance(text, (bool, float)) or not 0 <= threads <= cpus:
        raise ConfigError(f"node_config threads: expected a whole number from 0 (torch's default) to {cpus} "
                          f"(this machine's CPUs), got {text!r}")
    return threads


def _node_bool(node: Any, key: str, default: bool) -> bool:
    """A true/false node_config value (Flower passes ``amp=false`` as a bool or as text)."""
    if key not in node:
        return default
    try:
        return parse_bool(node[key])
    except ValueError as exc:
        raise ConfigError(f"node_config {key}: {exc}") from None


def _mean_summary(summaries: list[EpochSummary]) -> dict[str, float]:
    """Step-weighted means of the epochs' statistics (NaN-aware)."""
    out: dict[str, float] = {}
    for key in ("loss", "pos_mean", "neg_mean", "neg_var", "emb_std", "global_share"):
        vals = [(getattr(s, key), s.steps) for s in summaries if s.steps and math.isfinite(getattr(s, key))]
        total = sum(w for _, w in vals)
        out[key] = sum(v * w for v, w in vals) / total if total else float("nan")
    return out


class SiteUnavailable(Exception):
    """This round cannot run at this site. ``code`` and the message go into the error reply
    (paths scrubbed, :func:`public_reason`); ``detail`` (may name files) only into the site's log."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.detail = detail


# Anything with a slash or backslash in it: absolute and relative paths, Windows paths.
_PATHLIKE = re.compile(r"""[^\s'"`]*[/\\][^\s'"`]*""")
#: A file under one of the site's own folders, once the folder became ``<path>`` or
#: ``<data-path>``: its name may hold spaces, commas and quotes ("Doe, Jane 01.png",
#: "O'Brien 01.png"), see :func:`_scrub_under_site_paths`.
_SITE_TAG = re.compile(r"""<(?:data-)?path>(?=[/\\])""")


def _scrub_under_site_paths(text: str) -> str:
    """Drop what follows each ``<path>/`` or ``<data-path>/``: a file name under the site's own
    folder. Quoted (``'<path>/...'``) it runs to the LAST such quote of the line, which keeps
    an apostrophe in the name inside; unquoted, to the first ``": "`` (how errors put a reason
    after a file) or the end of the line. Over-scrubbing loses words; under-scrubbing would
    send part of a name (a patient's) to the server."""
    out, pos = [], 0
    for m in _SITE_TAG.finditer(text):
        if m.start() < pos:
            continue
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end
        quote = text[m.start() - 1] if m.start() > 0 and text[m.start() - 1] in "'\"`" else None
        end = text.rfind(quote, m.end(), line_end) if quote else -1
        if end < 0:
            end = text.find(": ", m.end(), line_end)
            end = line_end if end < 0 else end
        out += [text[pos:m.end()]]
        pos = end
    return "".join(out) + text[pos:]


def public_reason(text: str, paths: Sequence[str] = ()) -> str:
    """``text`` as it may leave the site: each of the site's own ``paths`` (node_config's
    folders and files, which may hold spaces: ``/data/Doe Jane 1961``) and then every other
    path-like token replaced by ``<path>``, one line, at most 300 characters. The server logs
    reasons and writes them to rounds.jsonl, so a folder named after a patient must not reach
    it (docs/privacy.md)."""
    for path in sorted({p for p in paths if p}, key=len, reverse=True):  # a folder's files before the folder
        text = text.replace(path, "<path>")
    text = _scrub_under_site_paths(text)
    # _PATHLIKE backtracks over a long run without a separator (quadratic): it sees a bounded
    # prefix, more than the 300 characters kept
    return " ".join(_PATHLIKE.sub("<path>", text[:2000]).split())[:300]


_PATH_KEYS = ("data-path", "ledger-path", "state-dir")


def _site_paths(context: Context | None) -> list[str]:
    """Every path-like string value of the site's node_config, as given (when it holds a
    separator: a bare word such as "data" would also match ordinary words of a reason), and,
    for those and the path keys, absolute and resolved: how the site's messages name them."""
    node = dict(context.node_config) if context is not None else {}
    values = [str(v) for v in node.values() if isinstance(v, str) and any(sep in v for sep in "/\\")]
    # A folder inside a value (data-options "cache_dir=/data/Doe Jane 1961/cache") and the
    # cache folder the SuperNode's environment names are the site's paths too.
    options = node.get("data-options")
    inner = [item.partition("=")[2].strip() for item in re.split("[,;]", options)] if isinstance(options, str) else []
    values += [v for v in inner + [os.environ.get("FEDMOCO_CACHE_DIR", "")] if any(sep in v for sep in "/\\")]
    named = values + [str(node[k]) for k in _PATH_KEYS if isinstance(node.get(k), str) and str(node[k]).strip()]
    forms = []
    for v in named:
        try:
            path = Path(v).expanduser()
            forms += [str(path.absolute()), str(path.resolve())]
        except (OSError, RuntimeError):  # ~unknown-user, a loop of links: the value as given still counts
            continue
    return values + forms


def _error_reply(msg: Message, exc: SiteUnavailable, context: Context | None = None) -> Message:
    """The error reply for ``exc``; its full story goes to the site's log only."""
    log.error("site cannot train this round: %s%s", exc, f" ({exc.detail})" if exc.detail else "")
    return Message(Error(code=exc.code, reason=public_reason(str(exc), _site_paths(context))), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One federated round of local MoCo training at this site (see the module docstring).

    Never raises: an exception becomes an error reply (code :data:`SITE_FAILED`) naming only
    the exception's type, where Flower's runtime would forward the exception's text, which
    may hold a path or a file name, to the server.
    """
    try:
        return _train_round(msg, context)
    except SiteUnavailable as exc:
        return _error_reply(msg, exc, context)
    except Exception as exc:  # noqa: BLE001 anything else: the site's log has the traceback
        log.exception("training failed at this site")
        return _error_reply(msg, SiteUnavailable(
            SITE_FAILED, f"training failed at the site ({type(exc).__name__}); the site's log has the details"))


def _server_round(msg: Message) -> int:
    """The round number the server sent (config record ``server-round``): a whole number, or
    SiteUnavailable. A missing one was taken as round 1 and 2.5 as round 2; "abc" ended as a
    bare ValueError."""
    value = msg.content.config_records.get("config", {}).get("server-round")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: the server's server-round must be a whole number, "
                                                  f"got {str(value)[:40]!r}")
    return int(value)


def _train_round(msg: Message, context: Context) -> Message:
    """The round itself (see the module docstring); SiteUnavailable when it cannot run."""
    t_start = time.perf_counter()
    run = context.run_config
    server_round = _server_round(msg)
    site, mcfg, tcfg = _settings(context)  # SiteUnavailable: train() turns it into the error reply
    # The server's numbers drive loops and processes here: bound them by what the run declares
    # and what this machine has (a server-round of 1e9 would step the LR schedule for hours).
    rounds, cpus = run_value(run, "num-server-rounds"), os.cpu_count() or 1
    if not 1 <= server_round <= rounds:
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: server-round {server_round} is outside 1.."
                                                  f"{rounds} (run_config num-server-rounds)")
    if tcfg.num_workers > cpus:
        log.warning("run_config num-workers %d is more than this machine's %d CPUs; using %d", tcfg.num_workers,
                    cpus, cpus)
        tcfg = dataclasses.replace(tcfg, num_workers=cpus)
    data, dataset = _site_data(site, run, mcfg, tcfg)
    if site["threads"] > 0:  # a site's share of its machine (intra-op threads of torch)
        torch.set_num_threads(site["threads"])

    releasing = run_value(run, "key-release") != "none"
    source = _release_source(data, run, mcfg) if releasing else dataset
    # delta is stated per record: checked against the records a release reads (a satellite
    # site's rasters, not its tiles), and not at all when the site refuses to release
    _check_dp_settings(site, run, None if isinstance(source, str) else len(source))  # type: ignore[arg-type]

    saved = load_site_state(context.state, site["state_dir"], server_round=server_round,
                            model_config=mcfg.to_dict())
    torch.manual_seed(tcfg.seed + 7919 * server_round)  # augmentations and shuffles; never the DP noise
    negatives = _global_negatives(msg, mcfg.dim, limit=run_value(run, "queue-sample"))
    # The global weights are checked (every shared entry, its exact shape, finite) before the
    # release spends anything: a round the server's model would fail must cost no budget.
    model, mu = _restore_model(saved, msg, run, mcfg)
    # The release only sees what the server sent (public): it cannot depend on local training.
    encoder, release_state = (_release_encoder(msg, mcfg, run, saved, site["device"]) if releasing
                              else (None, None))
    keys, ledger_metrics = _release(msg, source, negatives, site, run, mcfg, server_round,
                                    rounds_done=saved.rounds_done, encoder=encoder)

    # -- local training: E epochs against the local queue + the global negatives --------
    loader = make_loader(dataset, tcfg, site["device"], seed=tcfg.seed + 7919 * server_round)  # new order each round
    steps_per_epoch = min(len(loader), tcfg.max_steps_per_epoch or len(loader))
    trainer = Trainer(model, tcfg, site["device"], total_steps=max(rounds * tcfg.epochs * steps_per_epoch, 1),
                      steps_per_epoch=steps_per_epoch, progress=False)
    if saved.trainer is not None:
        trainer.load_state_dict(saved.trainer)
    _follow_federation_schedule(trainer, (server_round - 1) * tcfg.epochs * steps_per_epoch)
    centres = _cancel_centres(msg, negatives, run, mcfg.dim)
    summaries = [trainer.train_epoch(loader, epoch=(server_round - 1) * tcfg.epochs + e, extra_negatives=negatives,
                                     extra_centres=centres)
                 for e in range(tcfg.epochs)]
    train_seconds = sum(s.seconds for s in summaries)

    save_site_state(context.state, model, trainer.state_dict(), rounds_done=saved.rounds_done + 1,
                    last_round=server_round, state_dir=site["state_dir"], model_config=mcfg.to_dict(),
                    release_encoder=release_state)
    stats = _mean_summary(summaries)
    metrics = {
        "num-examples": len(dataset),  # type: ignore[arg-type]
        "train-loss": stats["loss"], "pos-mean": stats["pos_mean"], "neg-mean": stats["neg_mean"],
        "neg-var": stats["neg_var"], "emb-std": stats["emb_std"], "global-share": stats["global_share"],
        "seconds": train_seconds,
        "skipped": sum(data.skipped.values()) + sum(s.skipped for s in summaries),
        **ledger_metrics,
    }
    weight = (f", global negatives {100 * stats['global_share']:.1f}% of the softmax"
              if negatives is not None and math.isfinite(stats["global_share"]) else "")
    log.info("round %d: %d images, loss %.4f%s, %d %s sent, FedEMA mu %.3f, %.1f s (%.1f s training)",
             server_round, metrics["num-examples"], stats["loss"], weight, keys.shape[0],
             run_value(run, "key-release") if keys.shape[0] else "summaries", mu,
             time.perf_counter() - t_start, train_seconds)
    _log_skipped(server_round, data, summaries)
    content = RecordDict({
        "arrays": shared_arrays(model),
        "keys": ArrayRecord({"keys": Array(keys.numpy().astype(np.float32))}),
        "metrics": MetricRecord(metrics),
    })
    if site["name"]:
        content[SITE_RECORD] = ConfigRecord({"name": site["name"]})
    return Message(content, reply_to=msg)


def _log_skipped(server_round: int, data: PretrainData, summaries: list[EpochSummary]) -> None:
    """The round's unreadable files by reason, in the site's own log: the admin sees them
    here every round; the server only gets the count (metric ``skipped``)."""
    at_load = sum(s.skipped for s in summaries)
    parts = [format_skipped(data.skipped)] if data.skipped else []
    parts += [f"{at_load} sample(s) could not be read while training"] if at_load else []
    if parts:
        log.warning("round %d: %s", server_round, "; ".join(parts))


def _settings(context: Context) -> tuple[dict[str, Any], MoCoConfig, TrainConfig]:
    """Site settings, model and training config; SiteUnavailable(SITE_MISCONFIGURED) if invalid."""
    try:
        site = _site_settings(context)
        check_run_ranges(context.run_config)  # as the server does: a server that skipped it must not size this round
        mcfg, tcfg = moco_config(context.run_config), train_config(context.run_config)
        tcfg = dataclasses.replace(tcfg, amp=site["amp"])
        policy = run_value(context.run_config, "key-encoder")
    except FedmocoError as exc:
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: {exc}") from None
    if policy not in ("local-ema", "reset"):
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: key-encoder must be local-ema or reset, "
                                                  f"got {policy!r}")
    return site, mcfg, tcfg


def _site_data(site: dict[str, Any], run: Any, mcfg: MoCoConfig, tcfg: TrainConfig) -> tuple[PretrainData, Dataset]:
    """The site's data and the dataset to train on (in federation units when the run fixes
    them). A missing/empty folder or a channel mismatch is SiteUnavailable, not a crash."""
    options = site["options"]
    if site["domain"] == "images" and str(options.get("channels", "auto")) == "auto" and mcfg.in_channels in (1, 3):
        # The federation's encoder decides the channels (grayscale replicated, colour to luma),
        # not a look at the site's first files: one RGB file among them would otherwise turn a
        # site to 3 channels, and whether it can train or share would hang on that one file.
        options = {**options, "channels": mcfg.in_channels}
    data_cfg = DataConfig(image_size=run_value(run, "image-size"), seed=tcfg.seed, options=options,
                          cache=run_value(run, "cache"))
    try:
        data = build_pretrain_data(site["domain"], site["data_path"], data_cfg)
        if len(data.dataset) < 2:  # type: ignore[arg-type]
            raise DataError(f"{site['data_path']}: {len(data.dataset)} usable image(s); MoCo needs at least 2")
    except DataError as exc:
        raise SiteUnavailable(SITE_DATA_UNAVAILABLE,
                              _data_unavailable(site["data_path"], exc.public or str(exc), site["paths"]),
                              str(exc)) from None
    if data.in_channels != mcfg.in_channels:
        raise SiteUnavailable(SITE_MISCONFIGURED,
                              f"site data has {data.in_channels} channel(s) but the federation's encoder "
                              f"takes {mcfg.in_channels} (run_config in-channels)", str(site["data_path"]))
    dataset: Dataset = data.dataset
    target = _federation_normalization(run, mcfg)
    if target is not None:
        dataset = Renormalized(dataset, data.normalization, target)
    return data, dataset


def _federation_normalization(run: Any, mcfg: MoCoConfig) -> Normalization | None:
    """:func:`clients.task.federation_units` as a Normalization (None: the run fixes none)."""
    units = federation_units(run, mcfg.in_channels)
    return None if units is None else Normalization(*units)


def _release_source(data: PretrainData, run: Any, mcfg: MoCoConfig) -> Dataset | str:
    """What a DP release reads: the domain's view whose item j is a function of one record
    alone, in the federation's normalisation (fedmoco.data.ReleaseView); or why there is none."""
    if data.release_view is None:
        return "the site's domain does not say what one record of its data is"
    return data.release_view(_federation_normalization(run, mcfg))


def _data_unavailable(path: Path, detail: str, paths: Sequence[str] = ()) -> str:
    """Why the data cannot be used, in words that name no folder or file (skip counts by
    reason and option names stay: they say what to fix without saying where). ``paths``: the
    site's own (:func:`_site_paths`), scrubbed whole before any token is: a folder with spaces
    ("Doe Jane 1961") reached through a link would otherwise lose only its slashed pieces."""
    if not path.exists():
        return "site data unavailable: the data folder (node_config data-path) does not exist"
    if not path.is_dir():
        return "site data unavailable: node_config data-path is not a folder"
    return "site data unavailable: " + public_reason(detail.replace(str(path), "<data-path>"), paths)


def _restore_model(saved: SiteState, msg: Message, run: Any, mcfg: MoCoConfig) -> tuple[MoCo, float]:
    """The site's MoCo: its saved state, then the global weights (replaced or FedEMA-blended,
    head kept with personal-head), then the key-encoder policy. Returns (model, FedEMA mu)."""
    model = MoCo(mcfg)
    if saved.model is not None:
        model.load_state_dict(saved.model)
    first_round = saved.model is None
    if "arrays" not in msg.content.array_records:
        raise SiteUnavailable(SITE_FAILED, "the server's message holds no global model (record 'arrays')")
    try:
        mu = load_shared(model, arrays_to_tensors(msg.content.array_records["arrays"]),
                         keep_head=run_value(run, "personal-head") and not first_round,
                         fedema_lambda=0.0 if first_round else run_value(run, "fedema-lambda"))
    except ValueError as exc:
        raise SiteUnavailable(SITE_FAILED, f"the server's global model is unusable: {exc}") from None
    if first_round or run_value(run, "key-encoder") == "reset":
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    return model, mu


def _follow_federation_schedule(trainer: Trainer, step: int) -> None:
    """Move the LR schedule to federation step ``step`` when the site's own count is behind
    (first round, a site that joined late, a restarted run): the schedule spans the
    federation's rounds, not the rounds this site happened to see."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        while trainer.global_step < step:
            trainer.scheduler.step()
            trainer.global_step += 1


def _check_dp_settings(site: dict[str, Any], run: Any, n_images: int | None) -> None:
    """Refuse (SITE_MISCONFIGURED) a release mode or delta that cannot be honoured.
    ``n_images``: the records a release would read; None when the site refuses to release."""
    mode = run_value(run, "key-release")
    if mode not in KEY_RELEASE_MODES:
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: key-release must be one of "
                                                  f"{', '.join(KEY_RELEASE_MODES)}, got {mode!r}")
    if mode == "prototypes" and run_value(run, "prototype-centres") < 1:
        raise SiteUnavailable(SITE_MISCONFIGURED, "configuration: prototype-centres must be >= 1")
    if mode != "none" and run_value(run, "max-keys") < 1:  # refused here, before the ledger pays for a release
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: max-keys must be >= 1 for key-release={mode} "
                                                  "(a release of no rows would spend budget for nothing)")
    ignored = [k for k in ("dp-epsilon", "dp-delta") if k in run]
    if ignored:
        log.warning("run_config %s ignored: a site's privacy budget comes from its own node_config only",
                    ", ".join(ignored))
    if mode != "none" and n_images is not None and site["epsilon"] is not None and math.isfinite(site["epsilon"]):
        try:
            check_site_delta(site["delta"], n_images, site["delta_label"])
        except ConfigError as exc:
            raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: {exc}") from None


def _public_encoder(msg: Message, mcfg: MoCoConfig, device: torch.device) -> Encoder:
    """The global query encoder (backbone + head) exactly as received this round: public, the
    same at every site, untouched by local training. Releases are computed with it."""
    received = arrays_to_tensors(msg.content.array_records["arrays"])
    encoder = Encoder(mcfg)
    weights = {k[len("encoder_q."):]: v for k, v in received.items() if k.startswith("encoder_q.")}
    missing = [k for k in encoder.load_state_dict(weights, strict=False).missing_keys
               if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"global model lacks {len(missing)} encoder entries (first: {missing[0]!r})")
    return encoder.to(device).eval()


def _release_encoder(msg: Message, mcfg: MoCoConfig, run: Any, saved: SiteState,
                     device: torch.device) -> tuple[Encoder, dict[str, torch.Tensor] | None]:
    """The encoder this round's release is computed with (eval mode, on ``device``), and the
    state to keep for the next round (None when ``release-ema`` is 0).

    ``mu * previous + (1 - mu) * received`` per floating-point tensor, mu = run_config
    ``release-ema``: over a round a momentum key encoder (m per step, s steps) keeps about m^s
    of where it was, so vectors encoded by the average resemble the momentum-encoder keys they
    sit beside in other sites' softmax (vectors of the round's query encoder collapsed their
    training). The first round (or a kept state of another shape) starts from the received model.
    Public: a function of the global models this site received and of the run_config only,
    the same at every site that received the same models (docs/privacy.md).
    """
    encoder = _public_encoder(msg, mcfg, device)
    mu = float(run_value(run, "release-ema"))
    if not 0.0 <= mu < 1.0:  # else the average leaves the models it averages (inf: a non-finite encoder)
        raise SiteUnavailable(SITE_MISCONFIGURED, f"configuration: release-ema must be in [0, 1), got {mu:g}")
    if mu == 0.0:
        return encoder, None
    current = encoder.state_dict()
    previous = saved.release_encoder
    if previous is not None and previous.keys() == current.keys() and all(
            previous[k].shape == v.shape for k, v in current.items()):
        encoder.load_state_dict({k: previous[k].to(v.device, v.dtype).mul(mu).add(v, alpha=1 - mu)
                                 if v.is_floating_point() else v for k, v in current.items()})
    return encoder, {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def _ledger_figures(metrics: dict[str, float], site: dict[str, Any]) -> dict[str, float]:
    """``metrics`` of a round that releases nothing, with what the site's ledger has spent
    (epsilon, delta, releases, budget) when it has one: such a round reported 0 for a site that
    had spent, and rounds.jsonl and privacy.png showed its spending fall back to 0.
    ``dp-keys-exhausted`` stays 0: only a round that plans a release asks whether one fits."""
    path = site.get("ledger_path")
    try:
        book = read_ledger(Path(path)) if path is not None else None
    except ConfigError:  # unreadable, or gone while its lock is marked: a releasing round refuses (status 7)
        return metrics
    if book is None:
        return metrics
    return {**metrics, **book.to_metrics(False), "dp-status": metrics["dp-status"]}


def _refuse(status: int, detail: str = "") -> dict[str, float]:
    log.warning("not sending summaries: %s%s; training and sending weights continue", DP_STATUS[status], detail)
    return no_ledger_metrics(status)


def _release(msg: Message, dataset: Dataset | str, negatives: torch.Tensor | None, site: dict[str, Any], run: Any,
             mcfg: MoCoConfig, server_round: int, *, rounds_done: int,
             encoder: Encoder | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """This round's release ((n, D) unit rows, possibly n = 0) and its ``dp-*`` metrics.

    ``dataset`` is what the release reads (``_release_source``), or the reason the site's
    data has no view of one record per item: then nothing is shared or spent (status 9).

    The budget (epsilon, delta) comes from node_config; the ledger from node_config
    ``ledger-path`` / ``state-dir``. The noise is planned so that the rest of this run's
    rounds fit in what the ledger has left, and the release is paid for before it is made.
    """
    mode, dim = run_value(run, "key-release"), mcfg.dim
    empty = torch.zeros(0, dim)
    if mode == "none":
        return empty, _ledger_figures(no_ledger_metrics(2), site)
    if site["epsilon"] is None:
        return empty, _ledger_figures(_refuse(4), site)
    if isinstance(dataset, str):
        return empty, _ledger_figures(_refuse(9, f": {dataset}"), site)
    q = run_value(run, "prototype-sample-rate" if mode == "prototypes" else "key-sample-rate")  # in (0, 1]: _settings
    if math.isinf(site["epsilon"]):
        # A budget is tightened, never loosened: a site whose ledger holds a budget cannot step
        # around it by asking for no noise (it would spend without the ledger knowing).
        # a ledger, or a lock file that says one was written (a removed ledger must not open the way)
        kept = site["ledger_path"] is not None and ledger_was_written(site["ledger_path"])
        if kept:
            return empty, _ledger_figures(_refuse(8, f" ({site['ledger_path']})"), site)
        log.warning("dp-epsilon=inf: releasing %s WITHOUT noise; NOT private, for benchmarks only", mode)
        out = _make_release(mode, 0.0, q, msg, dataset, negatives, site, run, mcfg, server_round, encoder)
        return out, no_ledger_metrics(1, releases=rounds_done + 1)
    if site["ledger_path"] is None:
        return empty, _refuse(3)
    planned = site["dp_rounds"] or run_value(run, "num-server-rounds")
    try:
        with locked_ledger(site["ledger_path"]) as box:
            ledger = box["ledger"] or SiteLedger(mode, site["epsilon"], site["delta"], planned)
            box["ledger"] = ledger
            if ledger.mechanism != mode:
                refused = _refuse(6, f" ({ledger.mechanism!r} at {site['ledger_path']})")
                return empty, {**refused, **ledger.to_metrics(False)}
            notes = ledger.tighten(site["epsilon"], site["delta"])
            notes += ledger.replan(site["dp_rounds"]) if site["dp_rounds"] else []
            for note in notes:
                log.warning("privacy ledger %s: %s", site["ledger_path"], note)
            z = ledger.next_noise(q, run_value(run, "prototype-first-share") if mode == "prototypes" else 1.0)
            if z is not None:
                ledger.record(z, q)  # paid before the release: a crash can only over-count
    except (ConfigError, OSError) as exc:  # unreadable or unwritable ledger (a full disk, a lock): never a fresh budget
        log.error("privacy ledger: %s", exc)
        return empty, _refuse(7, f" ({exc})")
    exhausted = ledger.next_noise(q) is None
    if z is None:
        detail = (f": spent eps={ledger.spent():.4g} of {ledger.epsilon_budget:g} (delta={ledger.delta:g}) in "
                  f"{ledger.releases} of {ledger.planned_releases} planned releases")
        return empty, {**_refuse(5, detail), **ledger.to_metrics(True)}
    out = _make_release(mode, z, q, msg, dataset, negatives, site, run, mcfg, server_round, encoder)
    log.info("released %d %s at z=%.4g, q=%g: eps %.4g of %g spent (delta %g, %s)", out.shape[0], mode, z, q,
             ledger.spent(), ledger.epsilon_budget, ledger.delta, ledger.adjacency)
    return out, {**ledger.to_metrics(exhausted), "dp-status": 0.0}


def _make_release(mode: str, z: float, q: float, msg: Message, dataset: Dataset, negatives: torch.Tensor | None,
                  site: dict[str, Any], run: Any, mcfg: MoCoConfig, server_round: int,
                  encoder: Encoder | None = None) -> torch.Tensor:
    """The noisy vectors themselves, from the release encoder (``_release_encoder``; the
    round's global model when None) (see docs/privacy.md)."""
    # Imported here, not at the top: fedmoco.privacy loads Opacus (2-3 s per round on a busy
    # 2-core box), and only a site that releases needs it (docs/federation.md, round overhead).
    from fedmoco.privacy import choose_centres, privatize_keys, release_prototypes, sample_embeddings

    encoder = encoder if encoder is not None else _public_encoder(msg, mcfg, site["device"])
    generator = _secure_generator()
    if mode == "keys":
        clean = sample_embeddings(encoder, dataset, q, max_items=run_value(run, "max-keys"), device=site["device"],
                                  generator=generator, key_dim=mcfg.dim, unreadable="stand-in")
        return privatize_keys(clean, z, generator)
    # Centres from public inputs only: the centres the server merged from earlier releases (else
    # its sample of them), then directions from the run's seed. At most max-keys of them: the
    # server refuses a reply with more rows than that.
    n_centres = prototype_rows(run)
    merged = _global_negatives(msg, mcfg.dim, "centres", run_value(run, "prototype-centres"))
    centres = choose_centres(merged if merged is not None else negatives, n_centres, mcfg.dim,
                             seed=run_value(run, "seed") * 1_000_003 + server_round)
    return release_prototypes(encoder, dataset, centres, z, q, min_cosine=run_value(run, "prototype-min-cosine"),
                              device=site["device"], generator=generator)
