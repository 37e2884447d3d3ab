"""Generated image folders with a few shape classes, for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "stripes")


def make_demo_images(out_dir: Path | str, *, n_per_class: int = 24, size: int = 48, seed: int = 0,
                     rgb: bool = True) -> Path:
    """Write ``n_per_class`` PNGs per shape class into ``out_dir/<class>/``; return out_dir.

    Shapes vary in position, size, colour and background noise, so instance discrimination
    has to learn shape to succeed and kNN on the classes is a meaningful check.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            bg = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
            im = Image.fromarray(bg, "RGB")
            draw = ImageDraw.Draw(im)
            colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
            r = int(rng.integers(size // 5, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            if cls == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif cls == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif cls == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            else:
                for x0 in range(0, size, 8):
                    draw.rectangle([x0, 0, x0 + 3, size], fill=colour)
            (im if rgb else im.convert("L")).save(out / cls / f"{cls}_{i:03d}.png")
    return out
