"""Structured synthetic embeddings, written as ``imgembed embed`` would write them.

Real embeddings live near a low-dimensional manifold and form clusters; uniform
random vectors do neither, and no approximate index can do well on them. These
vectors are a seeded Gaussian mixture in a low-dimensional latent space,
projected up to ``dim``, shifted off the origin and lightly noised, so tests and
benchmarks exercise indexes on data shaped like the real thing, at any size.
The defaults were matched to 1300 real MobileNet V1 ImageNet embeddings: mean
cosine of random pairs ~0.4 and of nearest neighbours ~0.7 at that sample size.

>>> write_synthetic_embeddings("synthetic/", count=100_000, dim=256, files=4)
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.records import embedding_schema, image_id

MODEL_NAME = "synthetic"


class StructuredVectors:
    def __init__(self, dim: int, seed: int = 0, clusters: int = 1000, intrinsic_dim: int = 48):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self._seed = seed
        self._centres = rng.normal(size=(clusters, intrinsic_dim))
        self._projection = rng.normal(size=(intrinsic_dim, dim)) / np.sqrt(intrinsic_dim)
        self._offset = rng.normal(scale=1.2, size=dim)  # real features are far from centred

    def chunk(self, start: int, count: int) -> np.ndarray:
        """``count`` rows, seeded by ``start``: the same call gives the same rows."""
        rng = np.random.default_rng([self._seed, start])
        latent = self._centres[rng.integers(len(self._centres), size=count)]
        latent = latent + rng.normal(size=latent.shape)
        vectors = latent @ self._projection + self._offset + 0.05 * rng.normal(size=(count, self.dim))
        return vectors.astype(np.float32)


def write_embeddings(
    folder: str,
    vectors: np.ndarray,
    uris: list[str] | None = None,
    sha256s: list[str] | None = None,
    file_name: str = "embeddings-00000.parquet",
    model_name: str = MODEL_NAME,
) -> None:
    """One Parquet file in the embed output schema (uris default to synthetic://row)."""
    uris = uris or [f"synthetic://{row}" for row in range(len(vectors))]
    sha256s = sha256s or [hashlib.sha256(uri.encode()).hexdigest() for uri in uris]
    dim = vectors.shape[1]
    metadata = {
        "model": {"name": model_name, "source": "index/synthetic.py", "output_dim": dim},
        "preprocessing": None,
    }
    table = pa.table(
        {
            "id": [image_id(uri) for uri in uris],
            "uri": uris,
            "width": pa.array(np.zeros(len(uris), np.int32)),
            "height": pa.array(np.zeros(len(uris), np.int32)),
            "sha256": sha256s,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        },
        schema=embedding_schema(dim, metadata),
    )
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, file_name))


def write_synthetic_embeddings(folder: str, count: int, dim: int, files: int = 4, seed: int = 0) -> None:
    generator = StructuredVectors(dim, seed)
    bounds = np.linspace(0, count, files + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        uris = [f"synthetic://{seed}/{row}" for row in range(start, stop)]
        vectors = generator.chunk(start, stop - start)
        write_embeddings(folder, vectors, uris, file_name=f"embeddings-{number:05d}.parquet")
