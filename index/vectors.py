"""How vectors enter the index: metric, validation, normalisation.

Cosine similarity is inner product on L2-normalised vectors, so an index built
for ``cosine`` stores normalised vectors and every query must be normalised the
same way: ``prepare`` is the one place that does it, for corpus and queries.

>>> prepare(np.array([[3.0, 4.0]]), Metric.COSINE)
array([[0.6, 0.8]], dtype=float32)
"""

from __future__ import annotations

import faiss
import numpy as np

from imgembed.common.choices import Choice


class IndexInputError(ValueError):
    """The embeddings cannot be indexed as given (missing, empty, mixed, NaN...)."""


class Metric(Choice):
    __flag__ = "--metric"

    COSINE = "cosine"
    L2 = "l2"

    @property
    def faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self is Metric.COSINE else faiss.METRIC_L2

    @property
    def higher_is_closer(self) -> bool:
        return self is Metric.COSINE


def prepare(vectors: np.ndarray, metric: Metric, where: str = "vectors") -> np.ndarray:
    """float32, C-contiguous, finite, and unit length for cosine; raises IndexInputError."""
    prepared = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if prepared.ndim != 2:
        raise IndexInputError(f"{where}: expected a 2-d array of vectors, got shape {prepared.shape}")
    finite = np.isfinite(prepared).all(axis=1)
    if not finite.all():
        raise IndexInputError(
            f"{where}: {int((~finite).sum())} vector(s) contain NaN or infinity "
            f"(first at row {int(np.argmin(finite))})"
        )
    if metric is Metric.COSINE:
        faiss.normalize_L2(prepared)
    return prepared
