"""``fedmoco export``: take the encoder out of fedmoco, for torchvision or TorchScript users.

A fedmoco checkpoint stores the whole MoCo model (query and key encoders, heads, queue)
under fedmoco's own module names. Export writes the part a downstream user wants, the query
encoder's backbone, in three files:

``backbone.pt``   (resnet18/50 only) a plain ``state_dict`` with torchvision's key names; it
                  loads with ``strict=False`` into ``torchvision.models.resnetXX()`` once
                  ``conv1`` matches the recorded channels (3x3 stride 1 and no max-pool for the
                  small-input stem). Only ``fc.weight``/``fc.bias`` are then missing. Split BN
                  is saved as ordinary BatchNorm (they are the same layer at inference);
                  GroupNorm weights need ``norm_layer`` set to GroupNorm (encoder.json says so).
``encoder.ts``    TorchScript for every arch, ``tiny`` included: (N, C, H, W) float32,
                  already preprocessed as encoder.json says -> (N, F) backbone features.
``encoder.json``  arch, channels, image size, small-input stem, norm, feature dimension and
                  the input pipeline (windowing or band scaling, then mean/std).

Both model files take the same normalised input and give the same features as
``fedmoco knn``/``linear-probe``/``embed`` compute from the checkpoint.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fedmoco.atomic import atomic_write, atomic_write_json
from fedmoco.checkpoint import atomic_save, load_checkpoint
from fedmoco.config import MoCoConfig
from fedmoco.encoders import TinyCNN
from fedmoco.errors import CheckpointError

BACKBONE_FILE, TORCHSCRIPT_FILE, INFO_FILE = "backbone.pt", "encoder.ts", "encoder.json"
TORCHVISION_ARCHS = ("resnet18", "resnet50")


@dataclass
class ExportResult:
    out_dir: Path
    backbone: Path | None  # None for archs without a torchvision equivalent (tiny)
    torchscript: Path
    info: Path


def plain_norm(kind: str):
    """The inference-time equivalent of a fedmoco norm: split BN is BatchNorm once frozen."""
    if kind == "group":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    return nn.BatchNorm2d


def torchvision_backbone(cfg: MoCoConfig) -> nn.Module:
    """A bare ``torchvision.models.resnetXX`` with the stem fedmoco used for ``cfg``; ``fc`` kept.

    This is exactly what the README tells a user to build before ``load_state_dict``.
    """
    net = getattr(torchvision.models, cfg.arch)(weights=None, norm_layer=plain_norm(cfg.norm))
    if cfg.small_input:
        net.conv1 = nn.Conv2d(cfg.in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif cfg.in_channels != 3:
        net.conv1 = nn.Conv2d(cfg.in_channels, 64, 7, 2, 3, bias=False)
    return net


def plain_backbone(cfg: MoCoConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """The backbone rebuilt from plain torch/torchvision modules (scriptable), in eval mode.

    resnets end in ``fc = Identity`` so they map (N, C, H, W) -> (N, 512 | 2048).
    """
    if cfg.arch == "tiny":
        net = TinyCNN(cfg.in_channels, plain_norm(cfg.norm))
    else:
        net = torchvision_backbone(cfg)
        net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    return net.eval()


def backbone_state(ckpt: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights with the ``encoder_q.backbone.`` prefix stripped."""
    prefix = "encoder_q.backbone."
    state = {k[len(prefix):]: v.clone() for k, v in ckpt.get("model", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: holds no encoder_q.backbone weights; is it a fedmoco checkpoint?")
    return state


def preprocessing(data: dict[str, Any], channels: int) -> dict[str, Any]:
    """How to turn raw pixels into the encoder's input, from the checkpoint's data record.

    ``normalization`` is None for a federation whose sites normalised with their own
    statistics; the domain's rule then applies (medical: fixed, satellite/images: estimated
    on the data at hand), which ``note`` states.
    """
    domain = data.get("domain", "images")
    options = dict(data.get("options") or {})
    norm = data.get("normalization")
    out: dict[str, Any] = {"domain": domain, "options": options, "normalization": norm}
    if domain == "medical":
        from domains.medical.dataset import default_normalization
        from domains.medical.options import CT_PRESETS, MedicalOptions

        opts = MedicalOptions.parse(options)
        ct = CT_PRESETS.get(opts.ct_window)
        out["windowing"] = {
            "ct": {"preset": opts.ct_window, "center_hu": ct[0], "width_hu": ct[1]} if ct else {"preset": opts.ct_window},
            "other_modalities": opts.window,
            "percentiles": list(opts.percentiles) if opts.window == "percentile" else None,
            "to": "[0, 1]: clip((value - (center - width/2)) / width, 0, 1), MONOCHROME1 inverted",
            # pydicom's apply_modality_lut reads only the dataset-level rescale: an enhanced CT
            # followed literally gave features at cosine 0.98 to embed's (found by an audit).
            "value": ("modality units (HU for CT): stored value x RescaleSlope + RescaleIntercept, taken per "
                      "frame from an enhanced multi-frame file's Pixel Value Transformation (shared or "
                      "per-frame functional groups), which pydicom's apply_modality_lut does not read"),
            "slices": opts.slices,
        }
        # the evaluation view's geometry (domains.medical.transforms.eval_pipeline), after windowing
        out["resize"] = ("largest centred square, then to image_size x image_size: area interpolation when both "
                         "sides are >= image_size, else bilinear (align_corners=False)")
        if norm is None:
            out["normalization"] = default_normalization(channels).to_dict()
            out["note"] = "medical inputs are windowed to [0, 1], then normalised with the fixed mean/std above"
    elif domain == "satellite":
        out["scaling"] = ("reflectance = DN * scale + offset: the 'scale'/'offset' options, else the file's "
                          "GDAL scale/offset or CF scale_factor/add_offset, else 1e-4 (uint16) or 1/255 "
                          "(uint8); floats are reflectance already. Bands: the 'bands' option, else all")
        # Followed literally, the record missed these steps: features at cosine 0.979 to embed's
        # on a raster with nodata (found by an audit).
        out["nodata"] = ("pixels the file marks as nodata (its nodata value or mask) are set to their band's mean "
                         "from 'normalization' (in reflectance), so they normalise to 0")
        out["resize"] = ("each tile (a tile_size window; a raster smaller than that, read whole) to image_size x "
                         "image_size, bilinear with antialiasing (torchvision.transforms.v2.Resize), then the "
                         "'indices' option's spectral indices appended as channels, then normalised")
        if norm is None:
            out["note"] = ("the federation recorded no normalisation: each site used per-band mean/std "
                           "estimated on its own tiles; do the same on your data")
    elif domain != "images":  # described as an image folder, which it was not
        out["note"] = f"domain {domain!r} is not one of this fedmoco's: its preprocessing is not known here"
    else:
        out["scaling"] = ("on the 8-bit image: short side resized to image_size (bilinear, antialiased), centre "
                          "crop to image_size x image_size; then pixels / 255 into [0, 1]")
        out["decoding"] = ("EXIF orientation applied; 16-bit, 32-bit and float images stretched per image to 8 "
                           "bit (minimum to 0, maximum to 255); then converted to " +
                           ("luma (PIL mode 'L': 299/1000 R + 587/1000 G + 114/1000 B)" if channels == 1 else
                            "RGB (grayscale replicated)") +
                           "; the resize is torchvision.transforms.v2.Resize on the uint8 tensor")
        if norm is None:
            out["note"] = "no normalisation recorded: use per-channel mean/std estimated on your images"
    return out


def export_encoder(checkpoint: Path | str, out_dir: Path | str) -> ExportResult:
    """Write backbone.pt (resnets), encoder.ts and encoder.json for ``checkpoint`` into ``out_dir``."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    try:
        cfg = MoCoConfig.from_dict(ckpt["moco_config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint}: no usable moco_config ({exc})") from None
    state = backbone_state(ckpt, checkpoint)
    try:
        net = plain_backbone(cfg, state)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: backbone does not load ({str(exc).splitlines()[0]})") from None
    out.mkdir(parents=True, exist_ok=True)
    data = ckpt.get("data") or {}
    image_size = int(data.get("image_size", 64))

    backbone_path = None
    if cfg.arch in TORCHVISION_ARCHS:
        backbone_path = out / BACKBONE_FILE
        atomic_save({k: v.contiguous() for k, v in net.state_dict().items()}, backbone_path)
    else:  # an earlier export's backbone.pt in this folder would pass for this encoder's
        (out / BACKBONE_FILE).unlink(missing_ok=True)
    ts_path = out / TORCHSCRIPT_FILE
    with warnings.catch_warnings():
        # torch 2.9+ flags TorchScript as deprecated (script and save); it is still what
        # C++/mobile/Triton load.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
        atomic_write(ts_path, lambda fh: torch.jit.save(scripted, fh))

    with torch.no_grad():
        feature_dim = int(net(torch.zeros(1, cfg.in_channels, image_size, image_size)).shape[1])
    info = {
        "format": "fedmoco-encoder",
        "arch": cfg.arch,
        "channels": cfg.in_channels,
        "image_size": image_size,
        "small_input": cfg.small_input,
        "norm": "group" if cfg.norm == "group" else "batch",
        "feature_dim": feature_dim,
        "torchvision": cfg.arch if backbone_path else None,
        "files": {"torchscript": TORCHSCRIPT_FILE, "state_dict": BACKBONE_FILE if backbone_path else None},
        "input": preprocessing(data, cfg.in_channels),
        "source": {"checkpoint": checkpoint.name, "epoch": ckpt.get("epoch"),
                   "federation_rounds": (ckpt.get("federation") or {}).get("rounds")},
    }
    info_path = out / INFO_FILE
    atomic_write_json(info_path, info)
    return ExportResult(out_dir=out, backbone=backbone_path, torchscript=ts_path, info=info_path)
