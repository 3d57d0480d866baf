"""The one interface every loaded model has, whatever its format.

An ``Embedder`` takes float32 RGB images [N, S, S, 3] with values in [0, 1] (the
TF Hub image convention) and returns float32 [N, D]: the pooled feature vector,
or the class scores of a classification model. Each format's loader converts
from this convention to what its file expects (e.g. [-1, 1] for TF-Slim graphs,
raw uint8 for quantized TFLite).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.registry import ModelSpec


def to_slim_range(images):
    """[0, 1] -> [-1, 1], the input range TF-Slim and Keras MobileNets were trained on."""
    return images * 2.0 - 1.0


class Embedder:
    def __init__(self, spec: ModelSpec, call: Callable, keep_alive=None):
        self.spec = spec
        self._call = call
        # Whatever owns the weights must outlive the call (see PLATFORM.md).
        self._keep_alive = keep_alive

    def __call__(self, images: np.ndarray) -> np.ndarray:
        outputs = self._call(np.asarray(images, dtype=np.float32))
        return np.asarray(outputs, dtype=np.float32).reshape(len(images), -1)
