"""The one interface every loaded model has, whatever its format.

An ``Embedder`` takes float32 RGB images [N, S, S, 3] with values in [0, 1] (the
TF Hub image convention) and returns float32 [N, D]: the pooled feature vector,
or the class scores of a classification model. Each format's loader converts
from this convention to what its file expects (e.g. [-1, 1] for TF-Slim graphs,
raw uint8 for quantized TFLite).

The pipeline holds uint8 pixels until the model; ``embed_pixels`` takes those and
gives exactly ``embedder(scale_pixels(pixels))``, letting a backend that can scale
straight into its own input buffer skip the float copy of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imgembed.models.registry import ModelSpec


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1], the exact values every model sees."""
    return np.divide(pixels, 255.0, dtype=np.float32)


def to_slim_range(images):
    """[0, 1] -> [-1, 1], the input range TF-Slim and Keras MobileNets were trained on."""
    return images * 2.0 - 1.0


class Embedder:
    def __init__(
        self,
        spec: ModelSpec,
        call: Callable,
        keep_alive=None,
        call_pixels: Callable | None = None,
    ):
        self.spec = spec
        self._call = call
        # Whatever owns the weights must outlive the call: a loaded SavedModel whose
        # module object is garbage-collected makes its functions fail when called.
        self._keep_alive = keep_alive
        self._call_pixels = call_pixels

    def __call__(self, images: np.ndarray) -> np.ndarray:
        outputs = self._call(np.asarray(images, dtype=np.float32))
        return np.asarray(outputs, dtype=np.float32).reshape(len(images), -1)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> the same vectors as ``self(scale_pixels(pixels))``."""
        if self._call_pixels is None:
            return self(scale_pixels(pixels))
        return np.asarray(self._call_pixels(pixels), dtype=np.float32).reshape(len(pixels), -1)
