"""Nearest-neighbour lookups over an index folder: by id, by vector, by image.

Query images go through exactly what the corpus went through: the decoder and
limits of ``transforms/decode.py``, the preprocessing and the model named in the
index manifest, and ``index.vectors.prepare`` with the index metric. The HTTP
service and ``imgembed query`` both call this class.

>>> searcher = Searcher("out/index")
>>> searcher.search_image(open("cat.jpg", "rb").read(), k=5)[0]["uri"]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
import pyarrow.parquet as pq

from imgembed.index import store
from imgembed.index.reader import RowReader
from imgembed.index.vectors import IndexInputError, prepare
from imgembed.models.errors import ModelLoadError
from imgembed.models.loading import load_model
from imgembed.models.registry import ModelSpec
from imgembed.transforms.decode import DecodeLimits, ImageError, decode_image
from imgembed.transforms.resize import Preprocessing

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger requests get a 4xx, never a crash."""

    max_k: int = 100
    max_batch: int = 64
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000

    def __post_init__(self):
        if min(self.max_k, self.max_batch, self.max_upload_bytes, self.max_image_pixels) < 1:
            raise ValueError(f"service limits must be positive, got {self}")


class QueryError(Exception):
    """A request we cannot answer; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Searcher:
    def __init__(self, index_dir: str, limits: Limits = Limits(), load_image_model: bool = True):
        self.limits = limits
        try:
            self.loaded = store.load(index_dir, mmap=True)
        except (IndexInputError, RuntimeError, OSError) as error:
            raise IndexInputError(f"cannot open index {index_dir}: {error}") from error
        manifest = self.loaded.manifest
        self.metric = self.loaded.metric
        # Queries are raw embeddings, as the embed job wrote them; the index may
        # hold them through a tf.Transform graph (centring, PCA), applied here too.
        self.dimension = int(manifest.get("embedding_dimension", manifest["dimension"]))
        self.transform = self.loaded.transform()
        ids = self.loaded.ids
        self._ids = ids.column("id").to_pylist()
        self._uris = ids.column("uri").to_pylist()
        self._faiss_id_of = {image_id: faiss_id for faiss_id, image_id in enumerate(self._ids)}
        self._clusters = self._read_clusters(self.loaded.directory)
        self._cluster_sizes = np.bincount(self._clusters, minlength=self.loaded.count)
        self._rows = RowReader([file for source in self.loaded.sources() for file in source.files])
        self.preprocessing = (
            Preprocessing.from_metadata(manifest["preprocessing"]) if manifest["preprocessing"] else None
        )
        self.model = None
        self.model_error = "this index was not built from images (no preprocessing recorded)"
        self._cpu_gate = threading.BoundedSemaphore(os.cpu_count() or 1)
        if load_image_model and self.preprocessing is not None:
            self._load_model(manifest["model"])

    def _load_model(self, model: dict) -> None:
        try:
            # Each request's image runs on every core (requests take turns, see embed_image).
            self.model = load_model(ModelSpec.from_metadata(model), threads=os.cpu_count())
            # The first call traces and compiles; do it now, not in the first requests.
            size = self.model.spec.image_size
            self.model(np.zeros([1, size, size, 3], np.float32))
            self.model_error = None
        except (ModelLoadError, KeyError, ValueError) as error:
            self.model_error = f"the index's model cannot be loaded, so image search is off: {error}"
            _log.warning(self.model_error)

    def _read_clusters(self, version_dir: str) -> np.ndarray:
        """cluster id of every FAISS id; rows in no cluster are their own."""
        clusters = np.arange(self.loaded.count, dtype=np.int64)
        try:
            table = pq.read_table(
                store.path(version_dir, store.DUPLICATES_FILE), columns=["faiss_id", "cluster_id"]
            )
        except FileNotFoundError:
            return clusters
        clusters[table.column("faiss_id").to_numpy()] = table.column("cluster_id").to_numpy()
        return clusters

    # --- lookups -------------------------------------------------------------

    @property
    def count(self) -> int:
        return self.loaded.count

    def item(self, image_id: str) -> dict:
        faiss_id = self._faiss_id(image_id)
        row = self.loaded.ids.slice(faiss_id, 1).to_pylist()[0]
        cluster = int(self._clusters[faiss_id])
        return row | {"cluster_id": cluster, "cluster_size": int(self._cluster_sizes[cluster])}

    def thumbnail(self, image_id: str) -> bytes | None:
        return self._rows.row(self._faiss_id(image_id), ("thumbnail",)).get("thumbnail")

    def neighbours(self, image_id: str, k: int, collapse: bool = False) -> list[dict]:
        """The k nearest other images of an indexed image."""
        self.check_k(k)
        faiss_id = self._faiss_id(image_id)
        vector = np.asarray([self._rows.row(faiss_id, ("embedding",))["embedding"]], np.float32)
        hits = self.search_vectors(vector, k + 1, collapse, validate_k=False)[0]
        return [hit for hit in hits if hit["faiss_id"] != faiss_id][:k]

    def search_vectors(
        self, vectors, k: int, collapse: bool = False, validate_k: bool = True
    ) -> list[list[dict]]:
        if validate_k:
            self.check_k(k)
        vectors = self._check_vectors(vectors)
        if self.transform is not None:
            vectors = self.transform(vectors)
        prepared = prepare(vectors, self.metric, "query vectors")
        # Ask for more when collapsing: copies of one image would fill the page.
        fetch = min(self.count, k * 4 if collapse else k)
        scores, found = self.loaded.index.search(prepared, fetch)
        return [
            self._hits(row_scores, row_ids, k, collapse)
            for row_scores, row_ids in zip(scores, found, strict=True)
        ]

    def embed_image(self, data: bytes) -> np.ndarray:
        if self.model is None:
            raise QueryError(503, "image_search_unavailable", self.model_error)
        if len(data) > self.limits.max_upload_bytes:
            raise QueryError(
                413, "upload_too_large", f"{len(data)} bytes is over {self.limits.max_upload_bytes}"
            )
        limits = DecodeLimits(
            max_file_bytes=self.limits.max_upload_bytes, max_pixels=self.limits.max_image_pixels
        )
        size = self.model.spec.image_size
        # One image per core at a time: more would only share the cores, so every
        # request would finish late; queued requests wait their turn instead.
        with self._cpu_gate:
            try:
                image = decode_image(data, limits, self.preprocessing.decode_side(size))
            except ImageError as error:
                status = 413 if error.reason in ("file_too_large", "too_many_pixels") else 400
                raise QueryError(status, error.reason, error.message) from None
            pixels = self.preprocessing.apply(image, size)
            # The pipeline's own call: the same numbers as the corpus got.
            return self.model.embed_pixels(pixels[None])

    def search_image(self, data: bytes, k: int, collapse: bool = False) -> list[dict]:
        self.check_k(k)
        return self.search_vectors(self.embed_image(data), k, collapse)[0]

    # --- helpers -------------------------------------------------------------

    def _faiss_id(self, image_id: str) -> int:
        try:
            return self._faiss_id_of[image_id]
        except KeyError:
            raise QueryError(404, "unknown_id", f"no image with id {image_id!r} in this index") from None

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.limits.max_k:
            raise QueryError(400, "bad_k", f"k must be between 1 and {self.limits.max_k}, got {k}")

    def _check_vectors(self, vectors) -> np.ndarray:
        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise QueryError(400, "bad_vector", "vectors must be lists of numbers") from None
        if array.ndim != 2 or array.shape[1] != self.dimension or len(array) == 0:
            raise QueryError(
                400,
                "bad_vector",
                f"expected 1 to {self.limits.max_batch} vectors of {self.dimension} numbers",
            )
        if len(array) > self.limits.max_batch:
            raise QueryError(413, "batch_too_large", f"{len(array)} vectors is over {self.limits.max_batch}")
        if not np.isfinite(array).all():
            raise QueryError(400, "bad_vector", "vectors must not contain NaN or infinity")
        return array

    def _hits(self, scores: np.ndarray, found: np.ndarray, k: int, collapse: bool) -> list[dict]:
        hits, seen = [], set()
        for score, faiss_id in zip(scores, found, strict=True):
            if faiss_id < 0:
                continue
            cluster = int(self._clusters[faiss_id])
            if collapse and cluster in seen:
                continue
            seen.add(cluster)
            hits.append(
                {
                    "id": self._ids[faiss_id],
                    "uri": self._uris[faiss_id],
                    "score": round(float(score), 6),
                    "faiss_id": int(faiss_id),
                    "cluster_id": cluster,
                }
            )
            if len(hits) == k:
                break
        return hits


def describe_hits(hits: list[dict], metric: str) -> str:
    """A readable table of results for the command line."""
    label = "cosine" if metric == "cosine" else "L2 dist"
    lines = [f"{'rank':>4}  {label:>8}  {'id':<32}  uri"]
    lines += [
        f"{rank:>4}  {hit['score']:>8.4f}  {hit['id']:<32}  {hit['uri']}" for rank, hit in enumerate(hits, 1)
    ]
    return "\n".join(lines)
