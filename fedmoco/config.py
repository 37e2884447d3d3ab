"""Validated configuration dataclasses. Every range check names the option it checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedmoco.errors import ConfigError

ARCHS = ("tiny", "resnet18", "resnet50")
NORMS = ("batch", "split-batch", "group")
#: The input sizes (pixels per side) a run may train at, whatever sets it: the command line, a
#: run_config (clients.task.RUN_RANGES) or a checkpoint's data record. 100000 asked the
#: allocator for 30 GB per batch before any message.
IMAGE_SIZES = (8, 4096)


def check_image_size(size: int, name: str = "--image-size") -> int:
    """``size`` when it is in :data:`IMAGE_SIZES`; ConfigError naming ``name`` otherwise."""
    lo, hi = IMAGE_SIZES
    if not lo <= size <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {size}")
    return size


#: The seeds' MoCo variants (MoCoConfig.preset), and the fields any of them sets.
PRESETS: dict[str, dict[str, Any]] = {
    "v1": dict(mlp=False, temperature=0.07, momentum=0.999),
    "v2": dict(mlp=True, temperature=0.2, momentum=0.999),
    "v3": dict(mlp=True, predictor=True, symmetric=True, temperature=0.2, momentum=0.99, momentum_schedule="cosine"),
}
PRESET_FIELDS = ("mlp", "predictor", "symmetric", "temperature", "momentum", "momentum_schedule")


@dataclass
class MoCoConfig:
    """The MoCo model: encoder, heads, dictionary and loss variants.

    Presets: ``v1`` (linear head, T=0.07), ``v2`` (MLP head, T=0.2), ``v3`` (MLP head +
    predictor, symmetric loss, cosine momentum). See :func:`MoCoConfig.preset`.
    """

    arch: str = "resnet18"
    in_channels: int = 3
    small_input: bool = False  # 3x3 stem, no max-pool: for images of <= 64 px
    norm: str = "split-batch"  # batch statistics must not leak the positive pair
    norm_splits: int = 8  # split-batch only: sub-batches with their own statistics
    dim: int = 128  # embedding dimension D
    mlp: bool = True  # v2 MLP projection head, else v1 linear head
    hidden_dim: int = 2048
    predictor: bool = False  # v3-style prediction head on the query branch
    symmetric: bool = False  # v3-style symmetric loss (both views as query)
    queue_size: int = 4096  # K
    momentum: float = 0.99  # m (start value when momentum_schedule == "cosine")
    momentum_schedule: str = "constant"  # or "cosine": m -> 1 over training (MoCo v3)
    temperature: float = 0.2  # T
    # MoHN seed: loss = (1 - w) * L(q; k+, queue) + w * L(k; q+, filtered queue)
    dual_view_weight: float = 0.0
    hard_negative_fraction: float = 1.0  # keep this share of the queue, most similar first
    # Feature-transformation seed (0 disables): alpha of the Beta distributions
    pos_extrapolation_alpha: float = 0.0  # lambda ~ Beta(a, a) + 1
    neg_interpolation_alpha: float = 0.0  # lambda ~ Beta(a, a)
    mix_level: str = "feature"  # "feature": one lambda per vector; "dimension": per entry

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: unknown architecture {self.arch!r}; choose one of {ARCHS}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm: unknown normalisation {self.norm!r}; choose one of {NORMS}")
        _check(self.in_channels >= 1, "in_channels", self.in_channels, ">= 1")
        # One sub-batch is plain BN with the leak; the Trainer's guard found no batch it could
        # split, skipped every step and saved an untrained encoder with exit 0.
        _check(self.norm_splits >= 2 or self.norm != "split-batch", "norm_splits", self.norm_splits,
               ">= 2 with norm split-batch")
        _check(self.norm_splits >= 1, "norm_splits", self.norm_splits, ">= 1")
        _check(self.dim >= 1, "dim", self.dim, ">= 1")
        _check(self.hidden_dim >= 1, "hidden_dim", self.hidden_dim, ">= 1")
        _check(self.queue_size >= 1, "queue_size (K)", self.queue_size, ">= 1")
        _check(0.0 <= self.momentum < 1.0, "momentum (m)", self.momentum, "in [0, 1)")
        if self.momentum_schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"momentum_schedule: must be 'constant' or 'cosine', got {self.momentum_schedule!r}"
            )
        _check(self.temperature > 0, "temperature (T)", self.temperature, "> 0")
        _check(0.0 <= self.dual_view_weight <= 1.0, "dual_view_weight", self.dual_view_weight, "in [0, 1]")
        _check(
            0.0 < self.hard_negative_fraction <= 1.0,
            "hard_negative_fraction", self.hard_negative_fraction, "in (0, 1]",
        )
        _check(self.pos_extrapolation_alpha >= 0, "pos_extrapolation_alpha", self.pos_extrapolation_alpha, ">= 0")
        _check(self.neg_interpolation_alpha >= 0, "neg_interpolation_alpha", self.neg_interpolation_alpha, ">= 0")
        if self.mix_level not in ("feature", "dimension"):
            raise ConfigError(f"mix_level: must be 'feature' or 'dimension', got {self.mix_level!r}")

    @classmethod
    def preset(cls, version: str, **overrides: Any) -> "MoCoConfig":
        """The seeds' MoCo variants: ``v1``, ``v2`` or ``v3``; ``overrides`` win."""
        if version not in PRESETS:
            raise ConfigError(f"moco version: unknown {version!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[version], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoCoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """Optimisation of one pretraining run: SGD with momentum, linear warm-up, cosine LR."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.06  # for batch 256; scaled linearly by batch_size / 256
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    warmup_epochs: float = 1.0
    num_workers: int = 2
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # only takes effect on CUDA
    seed: int = 0
    log_every: int = 1  # steps between JSON-lines metric records
    max_steps_per_epoch: int | None = None  # cap for demos and smoke tests
    # Two views per batch from the decoded-sample cache (fedmoco.gpu_augment): "auto" and "on" =
    # wherever the dataset offers them (on CPU in the DataLoader workers; faster per core than
    # the per-sample pipelines, see fedmoco.train.batched_views_for), "off" = per-sample views.
    batch_augment: str = "auto"
    # Threads that copy each batch of cached bases into pinned memory on CUDA (1 = DataLoader's
    # own one-thread copy). A satellite batch is 334 MB (256 x 13 x 224^2 float16); whether more
    # threads feed the GPU faster is what benchmarks/feed_satellite.py's stage table measures.
    pin_threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.sgd_momentum < 1, "sgd_momentum", self.sgd_momentum, "in [0, 1)")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        _check(1 <= self.pin_threads <= 64, "pin_threads", self.pin_threads, "in [1, 64]")
        if self.batch_augment not in ("auto", "on", "off"):
            raise ConfigError(f"batch_augment must be auto, on or off, got {self.batch_augment!r}")
        if self.max_steps_per_epoch is not None:
            _check(self.max_steps_per_epoch >= 1, "max_steps_per_epoch", self.max_steps_per_epoch, ">= 1")

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")
