"""A realistic benchmark corpus: photo-like JPEGs of mixed sizes, seeded.

Long sides are log-uniform between 300 and 4000 pixels, aspect ratios between
3:4 and 16:9, as phone and camera photos and web images mix in real corpora.
Pictures are drawn at a modest resolution and upscaled (drawing 12 megapixels of
noise per image would take longer than the benchmark itself).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fixtures.images import photo_like  # noqa: E402

DRAW_SIDE = 640


def write_corpus(
    folder: str, count: int, seed: int = 0, min_side: int = 300, max_side: int = 4000
) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        path = os.path.join(folder, f"photo_{seed}_{number:06d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        long_side = int(np.exp(rng.uniform(np.log(min_side), np.log(max_side))))
        aspect = rng.uniform(4 / 3, 16 / 9)
        size = (long_side, max(1, int(long_side / aspect)))
        if rng.random() < 0.3:
            size = size[::-1]  # portrait
        drawn = photo_like(int(rng.integers(1 << 30)), min(size[0], DRAW_SIDE), min(size[1], DRAW_SIDE))
        drawn.resize(size, Image.BICUBIC).save(path, "JPEG", quality=88)
    return paths
