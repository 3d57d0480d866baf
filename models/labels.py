"""ImageNet class names for the classification flavour, and top-k from class scores.

``imagenet_labels.txt`` holds the 1001 names MobileNet V1 classifiers use:
index 0 is "background", then the 1000 ILSVRC-2012 classes (each as its WordNet
lemmas). Regenerate it with scripts/make_imagenet_labels.py. Models with 1000
outputs (Keras) have no background class: their index i is label i + 1.
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from imgembed.models.registry import NUM_CLASSES


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    text = (
        importlib.resources.files("imgembed.models")
        .joinpath("imagenet_labels.txt")
        .read_text(encoding="utf-8")
    )
    return tuple(text.splitlines())


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax of logits; outputs that already are probabilities pass unchanged."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.min() >= 0 and abs(scores.sum() - 1.0) < 1e-2:
        return scores
    exponentials = np.exp(scores - scores.max())
    return exponentials / exponentials.sum()


def top_k(scores: np.ndarray, k: int) -> tuple[list[str], list[float]]:
    """The k most probable class names of one image and their probabilities."""
    probs = probabilities(scores)
    best = np.argsort(-probs, kind="stable")[:k]
    if len(probs) in (NUM_CLASSES, NUM_CLASSES - 1):
        names = imagenet_labels()
        offset = NUM_CLASSES - len(probs)
        labels = [names[index + offset] for index in best]
    else:
        labels = [f"class_{index}" for index in best]
    return labels, [float(p) for p in probs[best]]
