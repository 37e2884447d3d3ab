"""The labelled benchmark task shared by quality.py and global_queue_benefit.py: "glyphs".

Generated offline, 32 px grayscale. The class is the identity of a small glyph; everything
else is nuisance chosen so that it dominates the pixels and gives a contrastive learner an
instance shortcut (two crops of one image share it):

- background level (uniform 0.10-0.60 of full scale), a linear ramp in a random direction
  (peak-to-peak up to 0.45), and a noise texture with a random grain (Gaussian noise
  blurred with sigma 0-1.5 px, amplitude 0.02-0.06): each image's background is its own;
- glyph contrast (0.15-0.35 above the background), size (radius 7-11 px), rotation
  (+-15 degrees) and position: the centre may sit anywhere that keeps half the radius
  inside the frame, so glyphs often touch or cross the edge (``EDGE``);
- a dim distractor stroke per image (a short line of random length and angle at 40%
  of the glyph's contrast), so "where is the brightest edge" is not the answer either.

Eight classes: disk, ring, square, plus, triangle pointing left, triangle pointing right,
L and its mirror image J. The two mirrored pairs make horizontal flip a label-destroying
augmentation here, as it is for text and for laterality in radiographs (docs/benchmarks.md).

Version 3 (benchmarks/notes/quality.md, "task v3 design") differs from version 2 only in
letting glyphs cross the frame (``EDGE`` 0.5; v2 kept them whole inside). That takes raw
pixels from 27.9% to 19.2% kNN (21.3% linear probe) and a random-init tiny CNN from 23.1%
to 17.9% (27.1%), chance being 12.5%, while fedmoco's MoCo learns the task on one CPU
thread in about 5 minutes: 60 passes over the 800-image pool at batch 32 and lr 0.03 per
256 (benchmarks/quality.py's defaults) give about 36% kNN and 65% probe.

Folders (an images-domain layout: flat PNGs and a ``labels.csv`` with ``path,label``)::

    ROOT/pool/          unlabelled pretraining pool (labels.csv only for partitioning)
    ROOT/eval-train/    labelled images the kNN / linear probe is fitted on
    ROOT/eval-test/     labelled held-out images they are scored on
    ROOT/sites/<split>/site-<i>/   the pool split over sites (hard links), see split_sites

Sites: ``iid`` (a random equal split) or ``dirichlet`` (label skew: each class's images are
divided between sites in proportions drawn from Dirichlet(alpha), alpha = 0.5).

    python benchmarks/labelled_task.py --out /tmp/glyphs   # writes the task, prints its JSON line

Flower Datasets' DirichletPartitioner is not used: it partitions a Hugging Face ``datasets``
table (the package brings pyarrow, pandas and the HF datasets stack, not installed here),
while our sites are folders. ``dirichlet_partition`` below follows its algorithm (per-class
Dirichlet proportions, resampled until every site has ``min_size`` images; self-balancing
off) in numpy.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit_json  # noqa: E402

#: Bumped whenever the generator changes, so cached task folders are not reused across versions.
VERSION = 3
#: Glyph contrast above the background (full scale = 1), drawn uniformly per image.
CONTRAST = (0.15, 0.35)
#: Share of the glyph's radius that must stay inside the frame (1: the whole glyph is inside).
EDGE = 0.5
#: Dim distractor strokes per image, at 40% of the glyph's contrast.
DISTRACTORS = 1
CLASSES = ("disk", "ring", "square", "plus", "tri_left", "tri_right", "L", "J")
SIZE = 32
_SS = 4  # supersampling factor: glyph edges are anti-aliased by a box filter


@dataclass(frozen=True)
class TaskSize:
    """Images per class in each folder."""

    pool: int = 100  # 800 pool images: 60 passes fit in ~5 CPU-minutes (benchmarks/quality.py)
    eval_train: int = 100
    eval_test: int = 100


QUICK = TaskSize(pool=75, eval_train=40, eval_test=40)


def _glyph_mask(cls: str, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased glyph coverage in [0, 1], (SIZE, SIZE) float32, random size/pose/position."""
    big = SIZE * _SS
    r = rng.uniform(7, 11) * _SS
    # The centre may lie up to (1 - EDGE) * r outside the fully-inside range: glyphs touch or
    # cross the frame, which is what keeps raw pixels near chance (v3, benchmarks/notes/quality.md)
    inset = r * EDGE + _SS
    cx, cy = (rng.uniform(inset, big - inset) for _ in range(2))
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    w = max(2, int(r * 0.35))  # stroke width
    if cls == "disk":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif cls == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=w)
    elif cls == "square":
        s = r * 0.85
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif cls == "plus":
        d.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=255)
        d.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=255)
    elif cls == "tri_left":
        d.polygon([(cx - r, cy), (cx + r, cy - r), (cx + r, cy + r)], fill=255)
    elif cls == "tri_right":
        d.polygon([(cx + r, cy), (cx - r, cy - r), (cx - r, cy + r)], fill=255)
    elif cls in ("L", "J"):
        x0, x1 = (cx - r * 0.6, cx - r * 0.6 + w) if cls == "L" else (cx + r * 0.6 - w, cx + r * 0.6)
        d.rectangle([x0, cy - r, x1, cy + r], fill=255)  # the upright stroke
        foot = [cx - r * 0.6, cy + r - w, cx + r * 0.6, cy + r]
        d.rectangle(foot, fill=255)
    else:
        raise ValueError(cls)
    im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, center=(cx, cy))
    small = np.asarray(im, dtype=np.float32).reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))
    return small / 255.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (numpy only: scipy is not a dependency)."""
    if sigma < 0.3:
        return x
    rad = int(3 * sigma + 0.5)
    t = np.arange(-rad, rad + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, rad, mode="reflect")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def _distractors(rng: np.random.Generator, n: int = 2) -> np.ndarray:
    big = SIZE * _SS
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    for _ in range(n):
        x, y = rng.uniform(0, big, size=2)
        length, ang = rng.uniform(4, 12) * _SS, rng.uniform(0, np.pi)
        d.line([(x, y), (x + length * np.cos(ang), y + length * np.sin(ang))], fill=255, width=_SS)
    return np.asarray(im, dtype=np.float32).reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3)) / 255.0


def render(cls: str, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``cls``: uint8 (SIZE, SIZE)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    level = rng.uniform(0.10, 0.60)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0, 0.45) * (np.cos(ang) * xx + np.sin(ang) * yy) / 0.7071
    noise = _blur(rng.standard_normal((SIZE, SIZE)).astype(np.float32), rng.uniform(0, 1.5))
    noise *= rng.uniform(0.02, 0.06) / max(float(noise.std()), 1e-6)
    contrast = rng.uniform(*CONTRAST)
    glyph = _glyph_mask(cls, rng)
    if DISTRACTORS:
        glyph = glyph + 0.4 * _distractors(rng, DISTRACTORS)
    img = level + ramp + noise + contrast * glyph
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_folder(out: Path, n_per_class: int, seed: int) -> Path:
    """``n_per_class`` images of every class as flat PNGs + ``labels.csv``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    order = [c for c in CLASSES for _ in range(n_per_class)]
    rng.shuffle(order)  # file names carry no label
    for i, cls in enumerate(order):
        name = f"img_{i:05d}.png"
        Image.fromarray(render(cls, rng), "L").save(out / name)
        rows.append((name, cls))
    with open(out / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return out


def read_labels(folder: Path) -> tuple[list[str], list[str]]:
    """(file names, class names) from ``folder/labels.csv``."""
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["path"] for r in rows], [r["label"] for r in rows]


def dirichlet_partition(labels: list[str], n_sites: int, alpha: float, seed: int,
                        min_size: int = 10) -> list[list[int]]:
    """Indices of each site: for every class, its images are dealt to the sites in
    proportions ~ Dirichlet(alpha * 1), resampled until every site holds ``min_size``."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in sorted(set(labels)):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise RuntimeError(f"no Dirichlet({alpha}) split gives every site {min_size} images")


def class_partition(labels: list[str], n_sites: int, seed: int) -> list[list[int]]:
    """Indices of each site when the classes are dealt out whole: site i holds every image of
    its own classes and none of the others' (the extreme of label skew)."""
    classes = sorted(set(labels))
    np.random.default_rng(seed).shuffle(classes)
    owner = {c: i % n_sites for i, c in enumerate(classes)}
    return [[j for j, c in enumerate(labels) if owner[c] == site] for site in range(n_sites)]


def iid_partition(n: int, n_sites: int, seed: int) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(p.tolist()) for p in np.array_split(perm, n_sites)]


def split_sites(root: Path, kind: str, n_sites: int = 4, alpha: float = 0.5, seed: int = 0) -> list[Path]:
    """Split ``root/pool`` into ``root/sites/<kind>-<seed>/site-<i>`` (hard links, each with
    its own labels.csv); returns the site folders. ``kind``: ``iid``, ``dirichlet`` or
    ``classes`` (disjoint classes per site)."""
    names, labels = read_labels(root / "pool")
    if kind == "iid":
        parts = iid_partition(len(names), n_sites, seed)
    elif kind == "dirichlet":
        parts = dirichlet_partition(labels, n_sites, alpha, seed)
    elif kind == "classes":
        parts = class_partition(labels, n_sites, seed)
    else:
        raise ValueError(f"split kind must be iid, dirichlet or classes, got {kind!r}")
    base = root / "sites" / f"{kind}-{seed}"
    sites = []
    for i, part in enumerate(parts):
        site = base / f"site-{i}"
        if not (site / "labels.csv").exists():
            site.mkdir(parents=True, exist_ok=True)
            for j in part:
                try:  # parallel jobs of one seed split the same folder: a link already made is fine
                    os.link(root / "pool" / names[j], site / names[j])
                except FileExistsError:
                    pass
            # labels.csv marks the site complete, so it appears whole (rename) and last
            tmp = site / f".labels.csv.{os.getpid()}"
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows([("path", "label"), *((names[j], labels[j]) for j in part)])
            os.replace(tmp, site / "labels.csv")
        sites.append(site)
    return sites


def site_histogram(site: Path) -> dict[str, int]:
    _, labels = read_labels(site)
    return {c: labels.count(c) for c in CLASSES}


def make_task(root: Path, size: TaskSize = TaskSize(), seed: int = 0) -> Path:
    """Write (or reuse) the task under ``root``; the same ``seed`` gives the same images."""
    root = Path(root)
    for name, n, s in (("pool", size.pool, seed), ("eval-train", size.eval_train, seed + 1000),
                       ("eval-test", size.eval_test, seed + 2000)):
        folder = root / name
        if (folder / "labels.csv").exists() and len(read_labels(folder)[0]) == n * len(CLASSES):
            continue
        write_folder(folder, n, s)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the glyphs benchmark task")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help=f"smaller folders ({QUICK})")
    p.add_argument("--device", default="cpu", type=device_name, help="accepted for the suite's uniform interface; unused")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    root = make_task(args.out, QUICK if args.quick else TaskSize())
    sites = split_sites(root, "dirichlet")
    for s in sites:
        print(s, site_histogram(s))
    emit_json({"bench": "labelled_task", "classes": len(CLASSES), "pool": len(read_labels(root / "pool")[0]),
               "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
