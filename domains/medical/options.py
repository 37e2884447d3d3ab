"""The medical domain's ``DataConfig.options``: parsing, defaults and validation.

Values arrive as strings from ``--data-option key=value`` or as native values from a
federation's node config; both are accepted. docs/medical.md justifies every default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from fedmoco.data import parse_bool
from fedmoco.errors import DataError

from .dicom_types import DEFAULT_LIMITS, DicomLimits

# CT windows as (centre, width) in HU. Soft tissue and lung follow common radiology presets;
# bone uses a wide window so cortex and marrow both keep contrast.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
CT_WINDOW_CHOICES = (*CT_PRESETS, "file", "percentile")
WINDOW_CHOICES = ("percentile", "file")


@dataclass(frozen=True)
class MedicalOptions:
    """Validated options. Field types drive parsing: see :meth:`parse`."""

    # --- selection and layout
    modalities: tuple[str, ...] = ()  # empty: every modality
    slices: int = 1  # >1 (odd): stack adjacent slices of a series as channels (2.5D)
    channels: int = 1  # 1: RGB files become luminance; 3: grayscale is replicated
    # --- intensity
    ct_window: str = "soft_tissue"  # a CT_PRESETS name, "file" or "percentile"
    window: str = "percentile"  # other modalities: "percentile" or "file" (its own window)
    percentiles: tuple[float, float] = (0.5, 99.5)
    # --- augmentations (two views sampled independently)
    crop_scale: float = 0.5  # minimum crop area as a fraction of the image
    flip_prob: float = 0.5  # horizontal only: vertical flips give anatomically impossible views
    rotate_deg: float = 10.0
    rotate_prob: float = 0.5
    window_level_jitter: float = 0.1  # fraction of the window width
    window_width_jitter: float = 0.2  # relative change of the width
    intensity_prob: float = 0.8
    intensity_scale: float = 0.1  # x * (1 + U(-s, s))
    intensity_shift: float = 0.05  # x + U(-o, o)
    gamma: tuple[float, float] = (0.8, 1.25)
    gamma_prob: float = 0.5
    noise_std: float = 0.02
    noise_prob: float = 0.5
    smooth_sigma: tuple[float, float] = (0.25, 1.0)  # pixels at the output size
    smooth_prob: float = 0.3
    elastic_prob: float = 0.0
    elastic_magnitude: tuple[float, float] = (1.0, 2.0)
    elastic_spacing: float = 0.25  # control-point spacing as a fraction of the image size
    # --- memory limits per file, checked from the header (reader.DicomLimits)
    max_frame_pixels: int = DEFAULT_LIMITS.max_frame_pixels
    max_frames: int = DEFAULT_LIMITS.max_frames
    max_decoded_mb: float = DEFAULT_LIMITS.max_decoded_mb
    # --- index cache
    cache: bool = True
    cache_dir: str = ""  # empty: $FEDMOCO_CACHE_DIR, else $XDG_CACHE_HOME/fedmoco, else ~/.cache/fedmoco

    @classmethod
    def names(cls) -> list[str]:
        """Every option key, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "MedicalOptions":
        """Build from ``DataConfig.options``; raise DataError naming an unknown or bad key."""
        options = dict(options or {})
        defaults = cls()
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise DataError(
                f"--data-option {unknown[0]}: unknown option for the medical domain; "
                f"known: {', '.join(cls.names())}"
            )
        values = {}
        for key, raw in options.items():
            try:
                values[key] = _convert(getattr(defaults, key), raw)
            except (TypeError, ValueError):
                raise DataError(f"--data-option {key}={raw!r}: {_expected(getattr(defaults, key))}") from None
        opts = cls(**values)
        opts._check()
        return opts

    @property
    def limits(self) -> DicomLimits:
        """The per-file memory limits the reader enforces."""
        return DicomLimits(self.max_frame_pixels, self.max_frames, self.max_decoded_mb)

    @property
    def in_channels(self) -> int:
        """Channels of every view: ``slices`` when stacking, else ``channels``."""
        return self.slices if self.slices > 1 else self.channels

    def _check(self) -> None:
        def bad(key: str, why: str) -> DataError:
            return DataError(f"--data-option {key}={getattr(self, key)!r}: {why}")

        for f in dataclasses.fields(self):
            if f.name.endswith("_prob") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise bad(f.name, "must be a probability in [0, 1]")
        if self.slices < 1 or self.slices % 2 == 0:
            raise bad("slices", "must be an odd number >= 1 (the centre slice plus neighbours)")
        if self.channels not in (1, 3):
            raise bad("channels", "must be 1 or 3")
        if self.slices > 1 and self.channels != 1:
            raise bad("channels", "slices > 1 already sets the channels; leave channels at 1")
        if self.ct_window not in CT_WINDOW_CHOICES:
            raise bad("ct_window", f"choose one of {', '.join(CT_WINDOW_CHOICES)}")
        if self.window not in WINDOW_CHOICES:
            raise bad("window", f"choose one of {', '.join(WINDOW_CHOICES)}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise bad("percentiles", "needs 0 <= low < high <= 100")
        if not 0.0 < self.crop_scale <= 1.0:
            raise bad("crop_scale", "must be in (0, 1]")
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise bad("rotate_deg", "must be in [0, 180]")
        if not 0.0 <= self.window_level_jitter <= 1.0:
            raise bad("window_level_jitter", "must be in [0, 1] (a fraction of the window width)")
        if not 0.0 <= self.window_width_jitter < 1.0:
            raise bad("window_width_jitter", "must be in [0, 1)")
        if not 0.0 <= self.intensity_scale < 1.0:
            raise bad("intensity_scale", "must be in [0, 1)")
        if not 0.0 <= self.intensity_shift <= 1.0:
            raise bad("intensity_shift", "must be in [0, 1] (windowed units)")
        if not 0.0 < self.gamma[0] <= self.gamma[1] <= 10.0:
            raise bad("gamma", "needs 0 < low <= high <= 10")
        if not 0.0 <= self.noise_std <= 1.0:
            raise bad("noise_std", "must be in [0, 1] (windowed units)")
        # The kernel spans about 8 sigma: 16 px is already wider than a 64 px view's detail.
        if not 0.0 < self.smooth_sigma[0] <= self.smooth_sigma[1] <= 16.0:
            raise bad("smooth_sigma", "needs 0 < low <= high <= 16 (pixels)")
        if not 0.0 <= self.elastic_magnitude[0] <= self.elastic_magnitude[1] <= 100.0:
            raise bad("elastic_magnitude", "needs 0 <= low <= high <= 100")
        if not 0.0 < self.elastic_spacing <= 1.0:
            raise bad("elastic_spacing", "must be in (0, 1]")
        for key in ("max_frame_pixels", "max_frames", "max_decoded_mb"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0")


def _convert(default: Any, raw: Any) -> Any:
    """Convert ``raw`` to the type of ``default``; ValueError/TypeError when impossible."""
    if isinstance(default, bool):
        return parse_bool(raw)
    if isinstance(default, int):
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
    if isinstance(default, float):
        return _finite(raw)
    if isinstance(default, str):
        return str(raw).strip()
    items = [p.strip() for p in raw.split(",")] if isinstance(raw, str) else list(raw)
    items = [p for p in items if p != ""]
    if not default or isinstance(default[0], str):  # a list of names
        return tuple(str(p).strip().upper() for p in items)
    if len(items) != len(default):
        raise ValueError(raw)
    return tuple(_finite(p) for p in items)


def _finite(raw: Any) -> float:
    """``float(raw)``; ValueError for NaN and infinities, which no range check can catch
    (every comparison with NaN is False) and which turn a view into NaN."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _expected(default: Any) -> str:
    if isinstance(default, bool):
        return "expected true or false"
    if isinstance(default, int):
        return "expected an integer"
    if isinstance(default, float):
        return "expected a finite number"
    if isinstance(default, str):
        return "expected text"
    if not default or isinstance(default[0], str):
        return "expected comma-separated names"
    return f"expected {len(default)} comma-separated finite numbers"
