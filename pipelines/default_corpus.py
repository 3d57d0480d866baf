"""The photos the default job embeds: real images that PyPI packages ship.

scikit-image bundles ~30 test images (the astronaut, a cat, coffee, a rocket,
multi-page TIFFs, an animated GIF, grayscale and RGBA PNGs) and scikit-learn two
photos (china.jpg, flower.jpg). They need no network and no file from outside
the repo, and between them cover most colour modes a corpus holds.
"""

from __future__ import annotations

import importlib.metadata
import os

_CORPUS = {
    # distribution: (folder inside it, file patterns)
    "scikit-image": ("skimage/data", ("*.png", "*.jpg", "*.gif", "*.tif")),
    "scikit-learn": ("sklearn/datasets/images", ("*.jpg",)),
}


def default_corpus_patterns() -> list[str]:
    patterns = []
    for distribution, (folder, globs) in _CORPUS.items():
        # locate_file finds the data without importing the (slow to import) package.
        root = importlib.metadata.distribution(distribution).locate_file(folder)
        patterns += [os.path.join(str(root), pattern) for pattern in globs]
    return patterns
