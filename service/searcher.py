"""Nearest-neighbour lookups over an index folder: by id, by vector, by image, with
equality filters; the live version followed as the index is rebuilt or grows.

Query images go through exactly what the corpus went through: the decoder and
limits of ``transforms/decode.py``, the preprocessing and the model named in the
index manifest, and ``index.vectors.prepare`` with the index metric. Per-item state
(ids, URIs, metadata, clusters, the id lookup) is memory-mapped (index/items.py);
an indexed image's vector comes from the index itself (``reconstruct``). The HTTP
service and ``imgembed query`` both call this module.

>>> searcher = Searcher.open("out/index")
>>> searcher.search_image(open("cat.jpg", "rb").read(), k=5)[0]["uri"]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable

import faiss
import numpy as np

from imgembed.index import store
from imgembed.index.faiss_index import is_ivf
from imgembed.index.items import SOURCE_FIELD
from imgembed.index.vectors import IndexInputError, Metric, prepare
from imgembed.models.errors import ModelLoadError
from imgembed.models.loading import load_model
from imgembed.models.registry import Format, ModelSpec
from imgembed.transforms.decode import DecodeLimits, ImageError, decode_image
from imgembed.transforms.resize import Preprocessing

_log = logging.getLogger(__name__)

# A filter matching at most this many items is answered by exact search over them
# (their vectors from the index), so it returns k results whenever k items match.
EXACT_FILTER_MAX = 2048
HIT_COLUMNS = ("id", "uri", "metadata")
ITEM_COLUMNS = ("id", "uri", "sha256", "width", "height", SOURCE_FIELD, "metadata")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger requests get a 4xx, never a crash."""

    max_k: int = 100
    max_batch: int = 64
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    max_filters: int = 8

    def __post_init__(self):
        if (
            min(self.max_k, self.max_batch, self.max_upload_bytes, self.max_image_pixels, self.max_filters)
            < 1
        ):
            raise ValueError(f"service limits must be positive, got {self}")


@dataclasses.dataclass(frozen=True)
class Query:
    """A checked search, ready for faiss: prepared (and transformed) vectors, the
    neighbours to fetch, the rows a filter allows (None: every row), and what turns
    faiss's (scores, ids) into the answer's hits."""

    vectors: np.ndarray
    fetch: int
    matching: np.ndarray | None
    finish: Callable[[np.ndarray, np.ndarray], list[list[dict]]]


class QueryError(Exception):
    """A request we cannot answer; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ImageModel:
    """The index's model and preprocessing, for image queries; one image per core at
    a time (more would only share the cores, so every request would finish late)."""

    def __init__(self, manifest: dict, limits: Limits, threads: int | None = None, directory: str = ""):
        self.limits = limits
        self.preprocessing = (
            Preprocessing.from_metadata(manifest["preprocessing"]) if manifest.get("preprocessing") else None
        )
        self.spec_metadata = manifest.get("model")
        self.model = None
        self.error = "this index was not built from images (no preprocessing recorded)"
        self.threads = threads or os.cpu_count() or 1  # images embedded at once
        self._gate = threading.BoundedSemaphore(self.threads)
        if self.preprocessing is None:
            return
        try:
            spec = ModelSpec.from_metadata(manifest["model"])
            if manifest.get("runtime_model"):  # int8: the quantized file the corpus was embedded with
                path = os.path.join(directory, manifest["runtime_model"])
                spec = dataclasses.replace(spec, source=path, format=Format.TFLITE)
            backend = manifest.get("backend") or "auto"  # as the corpus was embedded
            self.model = load_model(spec, backend, threads=threads)
            # The first call traces and allocates; do it now, not in the first requests.
            size = self.model.spec.image_size
            self.model(np.zeros([1, size, size, 3], np.float32))
            self.error = None
        except (ModelLoadError, KeyError, ValueError, OSError) as error:
            self.model = None
            self.error = f"the index's model cannot be loaded, so image search is off: {error}"
            _log.warning("%s", self.error)

    def pixels(self, data: bytes) -> np.ndarray:
        """An upload's pixels, as the corpus's images were decoded and resized."""
        if self.model is None:
            raise QueryError(503, "image_search_unavailable", self.error)
        if len(data) > self.limits.max_upload_bytes:
            raise QueryError(
                413, "upload_too_large", f"{len(data)} bytes is over {self.limits.max_upload_bytes}"
            )
        limits = DecodeLimits(
            max_file_bytes=self.limits.max_upload_bytes, max_pixels=self.limits.max_image_pixels
        )
        size = self.model.spec.image_size
        try:
            image = decode_image(data, limits, self.preprocessing.decode_side(size))
        except ImageError as error:
            status = 413 if error.reason in ("file_too_large", "too_many_pixels") else 400
            raise QueryError(status, error.reason, error.message) from None
        return self.preprocessing.apply(image, size)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        with self._gate:
            return self.model.embed_pixels(pixels[None])  # the pipeline's own call


@dataclasses.dataclass(frozen=True)
class ImageQuery:
    """An uploaded image to search with."""

    data: bytes
    k: int
    collapse: bool = False
    filters: dict | None = None


class Searcher:
    """One version of an index, read-only; its methods are safe from many threads."""

    def __init__(self, loaded: store.LoadedIndex, limits: Limits, images: ImageModel | None):
        self.loaded = loaded
        self.limits = limits
        self.images = images
        manifest = loaded.manifest
        self.metric: Metric = loaded.metric
        self.version = loaded.version
        # Queries are raw embeddings, as the embed job wrote them; the index may hold
        # them through a tf.Transform graph (centring, PCA), applied here too.
        self.dimension = int(manifest.get("embedding_dimension", manifest["dimension"]))
        self.transform = loaded.transform()
        self.items = loaded.items
        self.filter_fields = self.items.filter_fields
        self._params = dict(manifest["search_params"])
        if is_ivf(loaded.index) and not isinstance(faiss.downcast_index(loaded.index), faiss.IndexRefine):
            # id -> list and offset, 8 bytes a vector in each worker: what reconstruct()
            # needs. A re-ranked index reconstructs from its raw vectors instead.
            faiss.extract_index_ivf(loaded.index).make_direct_map()

    @classmethod
    def open(
        cls,
        index_dir: str,
        limits: Limits = Limits(),
        load_image_model: bool = True,
        image_threads: int | None = None,
    ) -> Searcher:
        try:
            loaded = store.load(index_dir, mmap=True)
        except (IndexInputError, RuntimeError, OSError) as error:
            raise IndexInputError(f"cannot open index {index_dir}: {error}") from error
        images = (
            ImageModel(loaded.manifest, limits, image_threads, loaded.directory) if load_image_model else None
        )
        return cls(loaded, limits, images)

    @property
    def count(self) -> int:
        return self.loaded.count

    @property
    def model_name(self) -> str | None:
        return (self.loaded.manifest.get("model") or {}).get("name")

    # --- lookups -------------------------------------------------------------

    def item(self, image_id: str) -> dict:
        row = self._row(image_id)
        (item,) = self.items.describe([row], ITEM_COLUMNS)
        cluster, size = self.items.cluster(row)
        return item | {"faiss_id": row, "cluster_id": cluster, "cluster_size": size}

    def thumbnail(self, image_id: str) -> bytes | None:
        return self.items.thumbnail(self._row(image_id))

    def neighbours(
        self, image_id: str, k: int, collapse: bool = False, filters: dict | None = None
    ) -> list[dict]:
        """The k nearest other images of an indexed image."""
        return self.answer(self.neighbours_query(image_id, k, collapse, filters))[0]

    def search_vectors(
        self, vectors, k: int, collapse: bool = False, filters: dict | None = None
    ) -> list[list[dict]]:
        return self.answer(self.vectors_query(vectors, k, collapse, filters))

    def search_image(
        self, data: bytes, k: int, collapse: bool = False, filters: dict | None = None
    ) -> list[dict]:
        (answer,) = self.search_images([ImageQuery(data, k, collapse, filters)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def search_images(self, uploads: list[ImageQuery]) -> list[list[dict] | Exception]:
        """The hits of each upload, or why it has none. All are decoded and resized
        first, then embedded one at a time, then searched in one faiss call (those
        with a filter each with its own selector): step by step, each finds its code
        and data still in the caches, which the model's call empties (0.55 ms less
        an image than one upload after another, of 13)."""
        if self.images is None:
            error = QueryError(503, "image_search_unavailable", "image search is off for this service")
            return [error] * len(uploads)
        answers: list = [None] * len(uploads)
        pixels = {}
        for i, upload in enumerate(uploads):
            try:
                self.check_k(upload.k)
                self._checked_filters(upload.filters)
                pixels[i] = self.images.pixels(upload.data)
            except Exception as error:  # noqa: BLE001 (whatever an upload does fails it alone)
                answers[i] = error
        queries = {
            i: self.vectors_query(
                self.images.embed_pixels(pixels[i]), uploads[i].k, uploads[i].collapse, uploads[i].filters
            )
            for i in pixels
        }
        by_fetch: dict[int, list[int]] = {}  # unfiltered queries: one faiss call for each fetch
        for i, query in queries.items():
            if query.matching is None:
                by_fetch.setdefault(query.fetch, []).append(i)
            else:
                answers[i] = self.answer(query)[0]
        for members in by_fetch.values():
            searched = self.search_together([queries[i] for i in members])
            for i, (scores, found) in zip(members, searched, strict=True):
                answers[i] = queries[i].finish(scores, found)[0]
        return answers

    # --- searching: a checked Query, faiss, then its hits -----------------------

    def neighbours_query(
        self, image_id: str, k: int, collapse: bool = False, filters: dict | None = None
    ) -> Query:
        self.check_k(k)
        row = self._row(image_id)
        vector = self.loaded.index.reconstruct(row)[None]  # as indexed: prepared, transformed
        query = self._query(vector, k + 1, collapse, self._checked_filters(filters))

        def without_itself(results: list[list[dict]]) -> list[list[dict]]:
            return [[hit for hit in results[0] if hit["faiss_id"] != row][:k]]

        return dataclasses.replace(
            query, finish=lambda scores, found: without_itself(query.finish(scores, found))
        )

    def vectors_query(self, vectors, k: int, collapse: bool = False, filters: dict | None = None) -> Query:
        self.check_k(k)
        filters = self._checked_filters(filters)
        vectors = self._check_vectors(vectors)
        if self.transform is not None:
            vectors = self.transform(vectors)
        return self._query(prepare(vectors, self.metric, "query vectors"), k, collapse, filters)

    def answer(self, query: Query) -> list[list[dict]]:
        """Runs ``query`` here and now (service/batching.py runs several in one call)."""
        if query.matching is None:
            scores, found = self.search_all(query.vectors, query.fetch)
        else:
            scores, found = self._filtered(query.vectors, query.fetch, query.matching)
        return query.finish(scores, found)

    def search_all(self, prepared: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered faiss search of prepared vectors."""
        return self.loaded.index.search(prepared, fetch)

    def search_together(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Unfiltered queries of one ``fetch`` in one faiss call; (scores, ids) of each."""
        scores, found = self.search_all(
            np.concatenate([query.vectors for query in queries]), queries[0].fetch
        )
        bounds = np.cumsum([0] + [len(query.vectors) for query in queries])
        return [
            (scores[start:end], found[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _query(self, prepared: np.ndarray, k: int, collapse: bool, filters: dict) -> Query:
        # Ask for more when collapsing: copies of one image would fill the page.
        fetch = min(self.count, k * 4 if collapse else k)

        def finish(scores: np.ndarray, found: np.ndarray) -> list[list[dict]]:
            return [
                self._hits(row_scores, row_ids, k, collapse)
                for row_scores, row_ids in zip(scores, found, strict=True)
            ]

        matching = self.items.matching(filters) if filters else None
        return Query(prepared, fetch, matching, finish)

    def _filtered(self, prepared: np.ndarray, fetch: int, matching: np.ndarray):
        """Search among the ``matching`` rows only: exactly when they are few, else with
        an ID selector inside faiss, searching every list if that came back short."""
        fetch = min(fetch, len(matching))
        if fetch == 0:
            return np.zeros((len(prepared), 0), np.float32), np.zeros((len(prepared), 0), np.int64)
        if len(matching) <= EXACT_FILTER_MAX:
            candidates = self.loaded.index.reconstruct_batch(matching)
            scores = prepared @ candidates.T
            if self.metric is Metric.L2:  # -|q - c|^2, so that higher is closer for both
                scores = 2 * scores - (prepared**2).sum(1)[:, None] - (candidates**2).sum(1)[None, :]
            best = np.argsort(-scores, axis=1, kind="stable")[:, :fetch]
            chosen = np.take_along_axis(scores, best, axis=1)
            return (chosen if self.metric is Metric.COSINE else -chosen), matching[best]
        mask = np.zeros(self.count, bool)
        mask[matching] = True
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bitmap))
        scores, found = self.loaded.index.search(prepared, fetch, params=self._parameters(selector))
        if (found < 0).any():
            scores, found = self.loaded.index.search(prepared, fetch, params=self._parameters(selector, True))
        del bitmap  # the selector reads it until here
        return scores, found

    def _parameters(self, selector, exhaustive: bool = False):
        """The index's tuned search parameters, with a selector (they must be passed
        whole: a parameters object replaces the index's settings)."""
        index = faiss.downcast_index(self.loaded.index)
        if isinstance(index, faiss.IndexRefine):
            return faiss.IndexRefineSearchParameters(
                k_factor=float(self._params.get("k_factor_rf", 1)),
                base_index_params=self._ivf(selector, exhaustive),
            )
        if isinstance(index, faiss.IndexIVF):
            return self._ivf(selector, exhaustive)
        if isinstance(index, faiss.IndexHNSW):
            ef = int(self._params.get("efSearch", 16))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef, 1024) if exhaustive else ef)
        return faiss.SearchParameters(sel=selector)

    def _ivf(self, selector, exhaustive: bool):
        nlist = faiss.extract_index_ivf(self.loaded.index).nlist
        nprobe = nlist if exhaustive else int(self._params.get("nprobe", 1))
        parameters = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if "quantizer_efSearch" in self._params:  # an HNSW graph finds the lists
            ef = max(int(self._params["quantizer_efSearch"]), 2 * nprobe)
            parameters.quantizer_params = faiss.SearchParametersHNSW(efSearch=ef)
        return parameters

    def _hits(self, scores: np.ndarray, found: np.ndarray, k: int, collapse: bool) -> list[dict]:
        valid = found >= 0
        scores, found = scores[valid], found[valid]
        clusters = self.items.clusters(found)
        if collapse:
            _, first = np.unique(clusters, return_index=True)
            keep = np.sort(first)[:k]
        else:
            keep = np.arange(min(k, len(found)))
        described = self.items.describe([int(row) for row in found[keep]], HIT_COLUMNS)
        return [
            row
            | {"score": round(float(scores[i]), 6), "faiss_id": int(found[i]), "cluster_id": int(clusters[i])}
            for i, row in zip(keep, described, strict=True)
        ]

    # --- checks --------------------------------------------------------------

    def _row(self, image_id: str) -> int:
        row = self.items.row_of(image_id)
        if row is None:
            raise QueryError(404, "unknown_id", f"no image with id {image_id!r} in this index")
        return row

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.limits.max_k:
            raise QueryError(400, "bad_k", f"k must be between 1 and {self.limits.max_k}, got {k}")

    def _checked_filters(self, filters: dict | None) -> dict:
        filters = filters or {}
        if len(filters) > self.limits.max_filters:
            raise QueryError(
                400, "bad_filter", f"at most {self.limits.max_filters} filters, got {len(filters)}"
            )
        unknown = sorted(set(filters) - set(self.filter_fields))
        if unknown:
            raise QueryError(
                400,
                "bad_filter",
                f"cannot filter on {unknown}: the fields are {', '.join(self.filter_fields)}",
            )
        for field, value in filters.items():
            if (
                not isinstance(value, str | int | float | bool)
                or isinstance(value, float)
                and not np.isfinite(value)
            ):
                raise QueryError(400, "bad_filter", f"filter {field!r} needs a text or number value")
        return {field: str(value) for field, value in filters.items()}

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


class LiveIndex:
    """The searcher of an index folder's live version. ``current`` is the searcher to
    use for one request (read once per request: a swap never changes an answer
    halfway); ``refresh()`` opens a new live version, if any, and swaps to it. The
    image model is loaded once and kept while versions change."""

    def __init__(
        self,
        index_dir: str,
        limits: Limits = Limits(),
        load_image_model: bool = True,
        image_threads: int | None = None,
    ):
        self.index_dir = index_dir
        self.limits = limits
        self.current = Searcher.open(index_dir, limits, load_image_model, image_threads)
        self._image_threads = image_threads
        self._lock = threading.Lock()
        self._refused: str | None = None  # a version this service cannot serve: not opened again

    def refresh(self) -> bool:
        """True when a new version was opened and swapped in. A version of another
        model is served with that model, loaded here first; one of another dimension
        changes this service's contract (its OpenAPI document): it is refused once,
        with a warning, and the service needs a restart to serve it."""
        with self._lock:
            version = store.current_version(self.index_dir)
            if version is None or version in (self.current.version, self._refused):
                return False
            old = self.current
            loaded = store.load(self.index_dir, mmap=True)
            manifest, before = loaded.manifest, old.loaded.manifest
            if manifest.get("embedding_dimension") != before.get("embedding_dimension"):
                self._refused = version
                _log.warning(
                    "the new version %s of %s has vectors of another dimension; restart the service to serve it",
                    version,
                    self.index_dir,
                )
                return False
            images = old.images
            keys = ("model", "preprocessing", "backend", "precision", "runtime_source")
            same = all(manifest.get(key) == before.get(key) for key in keys)
            if images is not None and not same:
                images = ImageModel(manifest, self.limits, self._image_threads, loaded.directory)
            self.current = Searcher(loaded, self.limits, images)
            _log.info("now serving version %s of %s (%d items)", version, self.index_dir, self.current.count)
            return True

    def watch(self, every: float = 2.0) -> threading.Event:
        """Refreshes every ``every`` seconds in a thread; set the event to stop."""
        stop = threading.Event()

        def loop():
            while not stop.wait(every):
                try:
                    self.refresh()
                except Exception as error:  # a half-written or broken version: keep serving
                    _log.warning("could not open the new version of %s: %s", self.index_dir, error)

        threading.Thread(target=loop, name="index-watcher", daemon=True).start()
        return stop


def describe_hits(hits: list[dict], metric: str) -> str:
    """A readable table of results for the command line."""
    label = "cosine" if metric == "cosine" else "L2 dist"
    lines = [f"{'rank':>4}  {label:>8}  {'id':<32}  uri"]
    lines += [
        f"{rank:>4}  {hit['score']:>8.4f}  {hit['id']:<32}  {hit['uri']}" for rank, hit in enumerate(hits, 1)
    ]
    return "\n".join(lines)
