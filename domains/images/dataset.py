"""Image-folder datasets for pretraining (two views) and evaluation (one view + label)."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from fedmoco.data import (
    DataConfig,
    LabelledData,
    Normalization,
    PretrainData,
    TwoViews,
    list_files,
    parse_bool,
    read_labels,
)
from fedmoco.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: The PIL readers an image file may be opened with. ``Image.open`` picks its reader from the
#: content, and some decode the whole file while opening it, before any size check: an ICO named
#: photo.png that declares 256 x 256 and holds a 13000 x 13000 PNG cost 650 MB per read (found by
#: an audit), and GIF or WebP content under an image suffix was trained on where the docs say it
#: is not. Each suffix admits all four formats we take (they read headers only): a PNG named .jpg
#: is common in scraped datasets (a review). PIL's JPEG reader opens a camera's multi-picture JPEG
#: itself, as MPO.
READERS = ("PNG", "JPEG", "TIFF", "BMP", "DIB")
#: What a malformed file can raise while PIL reads it. Its parsers raise TypeError (a FLOAT
#: StripOffsets tag), OverflowError (a ColorMap typed SSHORT), struct.error, IndexError... as
#: well as OSError: one such TIFF stopped pretrain, check-site and embed in a traceback (found by
#: an audit). Caught around a file's read only, never around our own transforms.
READ_ERRORS = (Exception,)
# max_pixels: width x height one file may declare before anything is decoded. 2**25 (33.5 M,
# 5792**2) as for DICOM frames (domains/medical/dicom_types.py): above a 24-megapixel photograph,
# far below the 65535**2 a 700-byte forged PNG header can claim.
OPTIONS = {"channels": "auto", "crop_scale_min": 0.2, "flip": True, "offset": 0.2, "ramp": 0.3, "noise": 0.05,
           "max_pixels": 2**25}
#: Options that are strengths in [0, 1] of full scale (0 turns the augmentation off).
_STRENGTHS = ("offset", "ramp", "noise")
_NORM_SAMPLE = 64  # images used to estimate the per-channel mean/std
# Longest side of an evaluation view before its centre crop, in multiples of the image size.
# Resizing the short side of a 1 x 150000 strip (516 bytes as PNG) to 32 px would make it
# 32 x 4.8 M (600 MB); beyond this aspect the view is letterboxed instead (CenterCrop pads).
MAX_ASPECT = 8


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with ``options``; DataError naming an unknown key or bad value."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise DataError(f"--data-option: unknown option(s) {sorted(unknown)} for domain 'images'; "
                        f"known: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if str(opts["channels"]) not in ("auto", "1", "3"):
        raise DataError(f"--data-option channels: must be auto, 1 or 3, got {opts['channels']!r}")
    try:
        scale = float(opts["crop_scale_min"])
    except (TypeError, ValueError):
        scale = float("nan")
    if not 0 < scale <= 1:
        raise DataError(f"--data-option crop_scale_min: must be a number in (0, 1], got {opts['crop_scale_min']!r}")
    opts["crop_scale_min"] = scale
    try:
        opts["max_pixels"] = int(opts["max_pixels"])
    except (TypeError, ValueError):
        opts["max_pixels"] = 0
    if opts["max_pixels"] < 1:
        raise DataError(f"--data-option max_pixels: must be a whole number >= 1, got {options['max_pixels']!r}")
    try:
        opts["flip"] = parse_bool(opts["flip"])
    except ValueError:
        raise DataError(f"--data-option flip: must be true or false, got {opts['flip']!r}") from None
    for key in _STRENGTHS:
        try:
            opts[key] = float(opts[key])
        except (TypeError, ValueError):
            opts[key] = float("nan")
        if not 0 <= opts[key] <= 1:
            raise DataError(f"--data-option {key}: must be a number in [0, 1] (0 turns it off), got {options[key]!r}")
    return opts


def open_image(path: Path, max_pixels: int = OPTIONS["max_pixels"]) -> Image.Image:
    """``Image.open(path)`` (header only: PIL decodes lazily) that refuses, before any decoding,
    a header declaring more than ``max_pixels`` pixels: ValueError naming the size and the
    option. PIL's own bomb check (an error beyond 2 x ``Image.MAX_IMAGE_PIXELS``) becomes
    the same ValueError; its warning below that is ours to decide, so it is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # Another suffix (a caller's own file): every reader PIL has, as Image.open would.
            im = Image.open(path, formats=READERS if Path(path).suffix.lower() in SUFFIXES else None)
        except Image.DecompressionBombError:
            limit = 2 * Image.MAX_IMAGE_PIXELS
            raise ValueError(f"the header declares over {limit} pixels, PIL's decompression bomb limit"
                             + (f", over max_pixels {max_pixels}" if max_pixels < limit
                                else " (max_pixels cannot raise it)")) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ValueError(f"the header declares {w} x {h} = {w * h} pixels, over max_pixels {max_pixels} "
                         f"(--data-option max_pixels)")
    return im


def _why(exc: Exception) -> str:
    """A read error for the log: PIL's own errors as they are, a parser's TypeError or
    OverflowError with its type, since their text alone ("'float' object cannot be interpreted
    as an integer") does not say the file is malformed."""
    if isinstance(exc, (OSError, ValueError, SyntaxError)):
        return str(exc)
    return f"malformed file, {type(exc).__name__}: {exc}"


def load_image(path: Path, channels: int, max_pixels: int = OPTIONS["max_pixels"]) -> torch.Tensor:
    """Read ``path`` as a uint8 tensor (channels, H, W). 16-bit images are rescaled to 8 bit.
    ValueError for a header declaring over ``max_pixels`` pixels (:func:`open_image`)."""
    with open_image(path, max_pixels) as im:
        if _sixteen_bit_colour(im):
            im = _stretched_colour(path, im)
        # A camera's EXIF orientation: without it phone photos are read on their side.
        ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            im = Image.fromarray(_stretch(np.asarray(im, dtype=np.float32)))
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Any numeric array to uint8, minimum to 0 and maximum to 255 (a flat image to 0); ValueError
    for NaN or inf, which no scaling to 8 bit gives back."""
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)).astype(np.uint8)


def _sixteen_bit_colour(im: Image.Image) -> bool:
    """Whether PIL reads ``im`` as 8-bit RGB(A) / LA from 16-bit samples: it keeps only their
    high byte, so a 12-bit image stored in 16 bits reached 15 of 255 (found by an audit). The
    raw mode of the first tile says so (PNG ``RGB;16B``, TIFF ``('RGB;16L', ...)``)."""
    if im.mode not in ("RGB", "RGBA", "LA") or not im.tile or im.format not in ("PNG", "TIFF"):
        return False
    if im.format == "TIFF":  # BitsPerSample: a planar TIFF's raw modes ('R', 'G', 'B') do not say 16
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    args = im.tile[0][3]  # (codec, extents, offset, args): a tuple before Pillow 11, a named one since
    raw = args[0] if isinstance(args, tuple) and args else args
    return isinstance(raw, str) and ";16" in raw


def _stretched_colour(path: Path, im: Image.Image) -> Image.Image:
    """A 16-bit colour PNG or TIFF decoded at full depth (PIL cannot; GDAL through rasterio can,
    as the satellite domain reads rasters; torchvision's PNG decoder is deprecated since 0.29) and
    stretched per image to 8 bit over all colour channels together, as grayscale 16-bit images
    are; alpha dropped, as PIL's convert does; EXIF orientation carried over. Called after
    :func:`open_image` checked the declared size."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a photograph has no geotransform
        # the driver PIL identified, and only that one, whatever else GDAL could make of the file
        with rasterio.open(path, driver="PNG" if im.format == "PNG" else "GTiff") as ds:
            arr = ds.read()  # (C, H, W) uint16
    colour = _stretch(arr[:3] if arr.shape[0] >= 3 else arr[:1])  # (3 or 1, H, W) uint8
    out = Image.fromarray(np.ascontiguousarray(colour[0] if len(colour) == 1 else np.moveaxis(colour, 0, -1)))
    orientation = im.getexif().get(0x0112)
    if orientation:
        out.getexif()[0x0112] = orientation
    return out


def _detect_channels(files: list[Path], max_pixels: int = OPTIONS["max_pixels"]) -> int:
    for p in files[:_NORM_SAMPLE]:
        try:
            with open_image(p, max_pixels) as im:
                if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                    return 3
        except READ_ERRORS:
            continue
    return 1


class IntensityNuisance(torch.nn.Module):
    """Shortcut-resistant intensity noise on a float view (C, H, W) in [0, 1] units.

    Each call adds, with probability ``p`` each: a global offset ~ U(-offset, offset), a
    linear ramp in a uniformly random direction with peak-to-peak ~ U(0, ramp), and
    Gaussian pixel noise with std ~ U(0, noise). Values are not clipped (the encoder sees
    them after normalisation anyway). The same offset and ramp go to every channel.

    Why: MoCo's two views of one image share its background level, illumination gradient
    and noise grain, which ColorJitter (multiplicative) and blur leave recognisable; a
    network can then match views by background instead of content (measured on the glyphs
    benchmark, docs/benchmarks.md). Drawing these per view makes them useless as a match.
    """

    def __init__(self, offset: float = 0.2, ramp: float = 0.3, noise: float = 0.05, p: float = 0.8) -> None:
        super().__init__()
        self.offset, self.ramp, self.noise, self.p = float(offset), float(ramp), float(noise), float(p)

    def _on(self) -> bool:
        return bool(torch.rand(()) < self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.offset > 0 and self._on():
            out = out + (torch.rand(()) * 2 - 1) * self.offset
        if self.ramp > 0 and self._on():
            h, w = x.shape[-2:]
            angle = torch.rand(()) * 2 * torch.pi
            yy = torch.linspace(-0.5, 0.5, h).view(h, 1)
            xx = torch.linspace(-0.5, 0.5, w).view(1, w)
            # projection on the unit direction spans at most sqrt(2) across the image; divide
            # by it so the peak-to-peak never exceeds the drawn amplitude
            grad = (torch.cos(angle) * xx + torch.sin(angle) * yy) / 2 ** 0.5
            out = out + torch.rand(()) * self.ramp * grad
        if self.noise > 0 and self._on():
            out = out + torch.randn_like(x) * (torch.rand(()) * self.noise)
        return out


def moco_v2_transform(size: int, channels: int, scale_min: float, norm: Normalization, *, flip: bool = True,
                      offset: float = 0.0, ramp: float = 0.0, noise: float = 0.0) -> Callable:
    """The MoCo v2 augmentation (crop, colour jitter, grayscale, blur, flip) on uint8 (C,H,W),
    then, when any strength is > 0, :class:`IntensityNuisance` before normalising.

    On one-channel images hue/saturation jitter and grayscale are meaningless and left out.
    ``flip=False`` drops the horizontal flip (text, laterality, chiral shapes).
    """
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1) if channels == 3 else T.ColorJitter(0.4, 0.4)
    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the image, odd
    ops: list[Any] = [
        T.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
        T.RandomApply([jitter], p=0.8),
    ]
    if channels == 3:
        ops.append(T.RandomGrayscale(p=0.2))
    ops += [
        T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
    ]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToDtype(torch.float32, scale=True))
    if offset > 0 or ramp > 0 or noise > 0:
        ops.append(IntensityNuisance(offset, ramp, noise))
    ops.append(T.Normalize(norm.mean, norm.std))
    return T.Compose(ops)


class short_side_resize(torch.nn.Module):  # noqa: N801 - used like the torchvision transform it wraps
    """Resize a (C, H, W) image so its short side is ``size`` px and its long side at most
    MAX_ASPECT x ``size`` (memory per view stays bounded whatever the file's aspect ratio).
    torchvision's ``Resize(max_size=...)`` bounds the long side too, but rounds the short side
    of a 1 x 150000 strip to 0 px and fails; here it keeps at least 1 px."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_short, new_long = self.size, int(self.size * long / short)  # torchvision's rounding
        if new_long > MAX_ASPECT * self.size:
            new_short, new_long = max(1, int(MAX_ASPECT * self.size * short / long)), MAX_ASPECT * self.size
        out = (new_short, new_long) if h <= w else (new_long, new_short)
        return T.functional.resize(img, list(out), antialias=True)


def eval_transform(size: int, norm: Normalization) -> Callable:
    """Deterministic view for evaluation: resize the short side, centre crop, normalise."""
    return T.Compose([
        short_side_resize(size),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(norm.mean, norm.std),
    ])


class ImageFolderDataset(Dataset):
    """Files -> ``transform(image)`` (plus label if given); ``None`` for an unreadable file."""

    def __init__(self, files: list[Path], channels: int, transform: Callable,
                 labels: list[int] | None = None, max_pixels: int = OPTIONS["max_pixels"]) -> None:
        self.files = files
        self.channels, self.max_pixels = channels, max_pixels
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def header(self, i: int) -> tuple[int, int]:
        """(height, width) of file ``i`` from its header; ValueError over ``max_pixels``,
        OSError (PIL's UnidentifiedImageError included) when it is not a readable image."""
        with open_image(self.files[i], self.max_pixels) as im:
            return im.height, im.width

    def __getitem__(self, i: int):
        try:
            img = load_image(self.files[i], self.channels, self.max_pixels)
        except READ_ERRORS as exc:
            log.warning("skipping %s: unreadable image (%s)", self.files[i], _why(exc))
            return None
        out = self.transform(img)
        return out if self.labels is None else (out, self.labels[i])


def estimate_normalization(files: list[Path], channels: int, size: int,
                           max_pixels: int = OPTIONS["max_pixels"]) -> Normalization:
    """Per-channel mean/std in [0, 1] units over 64 evenly spaced, resized images (fewer when
    the folder has fewer). An unreadable image, or one over ``max_pixels``, is replaced by the
    next readable one after the evenly spaced picks, so a run of broken files cannot stop the
    site while readable ones remain."""
    step = max(1, len(files) // _NORM_SAMPLE)
    resize = T.Compose([short_side_resize(size), T.CenterCrop(size), T.ToDtype(torch.float32, scale=True)])
    stack, first_error, tried = [], None, 0
    picks = list(range(0, len(files), step))[:_NORM_SAMPLE]
    chosen = set(picks)
    for i in itertools.chain(picks, (j for j in range(len(files)) if j not in chosen)):
        if len(stack) == min(_NORM_SAMPLE, len(files)):
            break
        tried += 1
        try:
            stack.append(resize(load_image(files[i], channels, max_pixels)))
        except READ_ERRORS as exc:
            first_error = first_error or f"{files[i]}: {_why(exc)}"
    if not stack:
        raise DataError(f"none of the {tried} images could be read (first: {first_error})",
                        public=f"none of the {tried} images could be read")
    x = torch.stack(stack)  # (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Normalization(mean.tolist(), std.tolist())


def _setup(root: Path, cfg: DataConfig, exclude: Sequence[Path] = ()) -> tuple[list[Path], dict[str, Any], int, Counter]:
    """Image files, options, channels, and the other files under ``root`` counted by suffix
    (a GIF or HEIC photo is not trained on, and the site admin should hear of it)."""
    opts = parse_options(cfg.options)
    every = list_files(root, exclude=exclude)
    files = [f for f in every if f.suffix.lower() in SUFFIXES]
    if not files:
        list_files(root, SUFFIXES)  # raises its DataError, with the "is --domain right?" hint
    others = Counter(f"not PNG/JPEG/TIFF/BMP ({f.suffix.lower() or 'no suffix'})"
                     for f in every if f.suffix.lower() not in SUFFIXES)
    channels = _detect_channels(files, opts["max_pixels"]) if opts["channels"] == "auto" else int(opts["channels"])
    return files, opts, channels, others


def build_pretrain_data(root: Path, cfg: DataConfig) -> PretrainData:
    """Two MoCo v2 views per image of every PNG/JPEG/TIFF/BMP under ``root``."""
    files, opts, channels, others = _setup(root, cfg)
    norm = cfg.run_normalization(channels, lambda: estimate_normalization(files, channels, cfg.image_size,
                                                                          opts["max_pixels"]))
    views = partial(moco_v2_transform, cfg.image_size, channels, opts["crop_scale_min"], flip=opts["flip"],
                    offset=opts["offset"], ramp=opts["ramp"], noise=opts["noise"])
    dataset = ImageFolderDataset(files, channels, TwoViews(views(norm)), max_pixels=opts["max_pixels"])
    return PretrainData(
        dataset=dataset,
        in_channels=channels,
        normalization=norm,
        skipped=others,
        description=f"{len(files)} images under {root} ({channels} channel(s))",
        release_view=partial(_release_view, files, channels, views, opts["max_pixels"]),
    )


def _release_view(files: list[Path], channels: int, views: Callable[..., Callable], max_pixels: int,
                  target: Normalization | None) -> Dataset | str:
    """The release view (fedmoco.data.ReleaseView): one item per file, its views normalised
    with the federation's constants ``target`` directly (not renormalised from the site's
    statistics, which every file moves, if only in the last bits); a reason without them."""
    if target is None:
        return ("the views are normalised with statistics of all the site's images, so one image moves every "
                "summary: the federation must fix run_config input-mean and input-std")
    return ImageFolderDataset(files, channels, TwoViews(views(target)), max_pixels=max_pixels)


def build_labelled_data(root: Path, cfg: DataConfig, labels_csv: Path | None,
                        normalization: Normalization | None, exclude: Sequence[Path] = ()) -> LabelledData:
    """One centre view per image, labelled by sub-folder or ``labels_csv``. Files in
    ``exclude`` (the labels CSV) are not counted among the skipped."""
    files, opts, channels, others = _setup(root, cfg, exclude)
    if normalization is not None:
        # The checkpoint decides: grayscale and colour files are converted to its channel count.
        if opts["channels"] != "auto" and int(opts["channels"]) != normalization.channels:
            raise DataError(f"--data-option channels={opts['channels']} contradicts the checkpoint's "
                            f"{normalization.channels}-channel encoder")
        channels = normalization.channels
        if channels not in (1, 3):
            raise DataError(f"{root}: the checkpoint expects {channels} channels; image folders give 1 or 3")
    labels, classes = read_labels(root, files, labels_csv)
    norm = normalization or estimate_normalization(files, channels, cfg.image_size, opts["max_pixels"])
    ds = ImageFolderDataset(files, channels, eval_transform(cfg.image_size, norm), labels, opts["max_pixels"])
    return LabelledData(dataset=ds, classes=classes, in_channels=channels, normalization=norm, skipped=others,
                        sample_labels=labels)
