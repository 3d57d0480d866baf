"""Beam ModelHandler for our Embedders, so RunInference does batching, model
sharing, metrics and the dead-letter output.

Examples are uint8 [S, S, 3] arrays; the model scales the batch to float32
[0, 1], the TF Hub image convention, as it runs (Embedder.embed_pixels).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from imgembed.models.embedder import Embedder
from imgembed.models.loading import load_model
from imgembed.models.registry import ModelSpec

METRICS_NAMESPACE = "imgembed"


class EmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, Embedder]):
    """``backend`` and ``threads`` as for models.loading.load_model."""

    def __init__(
        self, spec: ModelSpec, *, max_batch_size: int = 32, backend: str = "auto", threads: int | None = None
    ):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self._spec = spec
        self._backend = backend
        self._threads = threads

    def load_model(self) -> Embedder:
        return load_model(self._spec, self._backend, self._threads)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Embedder,
        inference_args: dict | None = None,
    ) -> Iterable[PredictionResult]:
        vectors = model.embed_pixels(np.stack(batch))
        return [
            PredictionResult(pixels, vector, self._spec.name)
            for pixels, vector in zip(batch, vectors, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(pixels.nbytes for pixels in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
