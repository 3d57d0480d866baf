"""Near-duplicate clusters, so that search results can collapse copies of one image.

Two rows are linked when their files have the same sha256 (exact copies), or when
their raw embeddings are within ``threshold`` cosine similarity (resized,
recompressed or lightly edited copies), whatever transform the index applies.
Clusters are the connected components of those links; each is named by its
smallest FAISS id. Only rows in clusters of two or more are written; a row that is
absent is its own cluster.

Comparing every row with every other costs n^2, and one ANN query per row was
most of a 5M-vector build. Near copies are far closer to each other than to the
centroids between them, so they fall in the same inverted list: rows are compared
exactly, list by list (the index's own lists for IVF indexes, a k-means of
sqrt(n) lists made for this pass otherwise). One streaming pass over the
embeddings sorts rows into bucket files of whole lists on local disk (bounded
memory); each bucket is then read back and every list's similarity matrix gives
its pairs. A pair split across two lists is missed: ``pair_recall`` in the report
is the share of true pairs (exact search, sample rows) that ended in one cluster.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imgembed.index.evaluate import QuerySet, exact_neighbours, without_self
from imgembed.index.faiss_index import is_ivf
from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import Metric, prepare

# A bucket file holds whole lists of about this many bytes of vectors.
BUCKET_BYTES = 128 * 2**20
# Rows of one similarity block: 2048 x a list of 50k rows is 400 MB at most.
BLOCK_ROWS = 2048
# The lists next to a row's own among which the one it also visits is found: at 141
# lists of 64-d vectors, 8 covered 95% of the pairs, 64 covered 99.3%.
NEIGHBOUR_LISTS = 64
# Sample rows whose exact neighbours measure the pass when no query set is given.
RECALL_SAMPLE = 500
RECALL_NEIGHBOURS = 100
SAMPLE_SEED = 11
SCHEMA = pa.schema(
    [
        ("faiss_id", pa.int64()),
        ("id", pa.string()),
        ("cluster_id", pa.int64()),
        ("cluster_size", pa.int32()),
        ("exact_duplicate", pa.bool_()),
    ]
)


def exact_duplicate_links(hashes: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Links every row to the first row with the same file hash (sorted, not grouped
    into Python lists: 5M rows stay arrays)."""
    order = pc.sort_indices(hashes).to_numpy()
    ordered = hashes.take(pa.array(order))
    same_as_previous = np.zeros(len(order), bool)
    if len(order) > 1:
        equal = pc.equal(ordered.slice(1), ordered.slice(0, len(order) - 1))
        same_as_previous[1:] = np.asarray(pc.fill_null(equal, False))
    group_first = np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(len(order))))
    linked = np.flatnonzero(same_as_previous)
    return order[group_first[linked]].astype(np.int64), order[linked].astype(np.int64)


@dataclasses.dataclass
class CoarseLists:
    """A partition of the rows: unit centroids, each row's list, and each list's
    nearest other lists (where a row near its list's edge has its other neighbours)."""

    centroids: np.ndarray  # [lists, d] in the space the rows were assigned in
    list_of: np.ndarray  # [n] int32
    neighbours: np.ndarray  # [lists, NEIGHBOUR_LISTS] int64, -1 where fewer

    @classmethod
    def from_centroids(cls, centroids: np.ndarray, list_of: np.ndarray) -> CoarseLists:
        centroids = prepare(centroids, Metric.COSINE)
        search = faiss.IndexFlatIP(centroids.shape[1])
        search.add(centroids)
        _, nearest = search.search(centroids, min(NEIGHBOUR_LISTS + 1, len(centroids)))
        return cls(centroids, list_of, without_self(nearest, np.arange(len(centroids)), nearest.shape[1] - 1))

    def other_list(self, number: int, vectors: np.ndarray, radius: float) -> np.ndarray:
        """For unit ``vectors`` of list ``number`` (in the centroids' space), the
        neighbouring list that may hold a partner within ``radius`` of each, or -1.
        A partner y of x lies in list b rather than x's list a only if
        y.(c_b - c_a) > 0; y within ``radius`` of x needs x.(c_a - c_b) <= radius
        |c_a - c_b|. Of those lists the closest is taken, as a second probe would."""
        nearby = self.neighbours[number]
        nearby = nearby[nearby >= 0]
        if not len(nearby):
            return np.full(len(vectors), -1, np.int64)
        own = vectors @ self.centroids[number]
        other = vectors @ self.centroids[nearby].T
        gaps = np.linalg.norm(self.centroids[nearby] - self.centroids[number], axis=1)
        reachable = own[:, None] - other <= radius * gaps
        best = np.argmax(np.where(reachable, other, -np.inf), axis=1)
        return np.where(reachable.any(axis=1), nearby[best], -1)


def ivf_lists(index: faiss.Index, count: int) -> CoarseLists:
    """The inverted lists of an IVF index (its ids are rows, index/reader.py)."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    list_of = np.empty(count, np.int32)
    for number in range(invlists.nlist):
        size = invlists.list_size(number)
        if size:
            pointer = invlists.get_ids(number)
            list_of[faiss.rev_swig_ptr(pointer, size).copy()] = number
            invlists.release_ids(number, pointer)
    return CoarseLists.from_centroids(ivf.quantizer.reconstruct_n(0, ivf.nlist), list_of)


def kmeans_lists(source: EmbeddingSource, seed: int) -> CoarseLists:
    """A k-means of about sqrt(n) lists of the raw vectors: the assignment and the
    comparisons then cost about the same, n^1.5 d each."""
    lists = max(1, min(int(math.sqrt(source.count)), source.count // 39))
    sample = source.take(source.sample_ids(lists * 64, np.random.default_rng(seed)))
    kmeans = faiss.Kmeans(source.raw_dim, lists, niter=10, seed=seed, spherical=True)
    kmeans.train(prepare(sample, Metric.COSINE))
    list_of = np.empty(source.count, np.int32)
    for first_id, vectors in source.vector_batches():
        _, nearest = kmeans.index.search(prepare(vectors, Metric.COSINE), 1)
        list_of[first_id : first_id + len(vectors)] = nearest[:, 0]
    return CoarseLists.from_centroids(kmeans.centroids, list_of)


class _Buckets:
    """Rows (id, list, unit vectors) in files that each hold whole lists; ``spaced``
    keeps the rows' vectors in the lists' space too, when that is another space."""

    def __init__(self, folder: str, name: str, list_sizes: np.ndarray, dim: int, spaced_dim: int = 0):
        rows_per_bucket = max(1, BUCKET_BYTES // (4 * (dim + spaced_dim)))
        self._bucket_of_list = (np.cumsum(list_sizes) - list_sizes) // rows_per_bucket
        self.count = int(self._bucket_of_list[-1]) + 1 if len(list_sizes) else 0
        self._parts = [("ids", np.int64, 1), ("lists", np.int32, 1), ("vectors", np.float32, dim)]
        if spaced_dim:
            self._parts.append(("spaced", np.float32, spaced_dim))
        self._folder, self._name = folder, name
        # Open for the whole pass (a row batch writes to many buckets); close() ends it.
        self._files = [
            [open(self._path(b, part), "wb") for part, _, _ in self._parts]  # noqa: SIM115
            for b in range(self.count)
        ]

    def _path(self, bucket: int, part: str) -> str:
        return os.path.join(self._folder, f"{self._name}-{bucket:05d}.{part}")

    def write(self, rows: np.ndarray, lists: np.ndarray, *vectors: np.ndarray) -> None:
        bucket = self._bucket_of_list[lists]
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.count + 1))
        for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if start < stop:
                chosen = order[start:stop]
                for file, (_, dtype, _), values in zip(
                    self._files[number], self._parts, (rows, lists, *vectors), strict=True
                ):
                    file.write(np.ascontiguousarray(values[chosen], dtype=dtype).tobytes())

    def close(self) -> None:
        for files in self._files:
            for file in files:
                file.close()

    def read(self, number: int) -> list[list[np.ndarray]]:
        """Bucket ``number`` as one [rows, lists, vectors...] per list, in list order."""
        parts = [
            np.fromfile(self._path(number, part), dtype).reshape(-1, width)
            if width > 1
            else np.fromfile(self._path(number, part), dtype)
            for part, dtype, width in self._parts
        ]
        if not len(parts[0]):
            return []
        order = np.argsort(parts[1], kind="stable")
        parts = [part[order] for part in parts]
        bounds = np.flatnonzero(np.diff(parts[1])) + 1
        starts, stops = np.r_[0, bounds], np.r_[bounds, len(parts[0])]
        return [[part[start:stop] for part in parts] for start, stop in zip(starts, stops, strict=True)]


def _list_links(rows: np.ndarray, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Links within one list, as a star per connected group (each member to the
    group's first), so a list of m near-identical rows gives m - 1 links, not m^2/2."""
    count = len(rows)
    left, right = [], []
    for start in range(0, count, BLOCK_ROWS):
        similar = vectors[start : start + BLOCK_ROWS] @ vectors.T >= threshold
        block_left, block_right = np.nonzero(similar)
        upper = block_right > block_left + start
        left.append(block_left[upper] + start)
        right.append(block_right[upper])
    left, right = np.concatenate(left), np.concatenate(right)
    if not len(left):
        return left, right
    graph = coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(count, count))
    _, group = connected_components(graph, directed=False)
    sizes = np.bincount(group)
    first = np.full(len(sizes), count)
    np.minimum.at(first, group, np.arange(count))
    members = np.flatnonzero((sizes[group] > 1) & (np.arange(count) != first[group]))
    return rows[first[group[members]]], rows[members]


def near_duplicate_links(
    raw: EmbeddingSource, lists: CoarseLists, transform, threshold: float, phase=None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pairs of rows whose raw cosine similarity reaches ``threshold``, compared in
    their own list and in the neighbouring list where their partners may be; and the
    share of rows that were compared in a second list. ``transform`` maps raw vectors
    to the lists' space (None: the same space); ``phase`` advances twice a row."""
    radius = math.sqrt(max(0.0, 2 * (1 - threshold)))  # between unit vectors at that cosine
    dim = raw.raw_dim
    spaced_dim = len(lists.centroids[0]) if transform is not None else 0
    left, right = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    with tempfile.TemporaryDirectory(prefix="imgembed-duplicates-") as folder:
        sizes = np.bincount(lists.list_of, minlength=len(lists.centroids))
        own = _Buckets(folder, "own", sizes, dim, spaced_dim)
        for first_id, vectors in raw.vector_batches():
            rows = np.arange(first_id, first_id + len(vectors))
            spaced = [prepare(transform(vectors), Metric.COSINE)] if transform is not None else []
            own.write(rows, lists.list_of[rows], prepare(vectors, Metric.COSINE), *spaced)
            if phase is not None:
                phase.advance(len(vectors))
        own.close()
        # Within each list; and which neighbouring list each row must visit.
        visitors = _Buckets(folder, "visitors", sizes, dim)
        for number in range(own.count):
            for rows, row_lists, vectors, *spaced in own.read(number):
                found = _list_links(rows, vectors, threshold)
                left.append(found[0])
                right.append(found[1])
                target = lists.other_list(int(row_lists[0]), spaced[0] if spaced else vectors, radius)
                going = np.flatnonzero(target >= 0)
                visitors.write(rows[going], target[going], vectors[going])
                if phase is not None:
                    phase.advance(len(rows))
        visitors.close()
        # Each visiting row against the rows of the list it visits.
        visits = 0
        for number in range(own.count):
            residents = {int(lists_[0]): (rows, vectors) for rows, lists_, vectors, *_ in own.read(number)}
            for rows, row_lists, vectors in visitors.read(number):
                visits += len(rows)
                resident_rows, resident_vectors = residents[int(row_lists[0])]
                for start in range(0, len(rows), BLOCK_ROWS):
                    similar = vectors[start : start + BLOCK_ROWS] @ resident_vectors.T >= threshold
                    visitor, resident = np.nonzero(similar)
                    left.append(rows[start + visitor])
                    right.append(resident_rows[resident])
    return np.concatenate(left), np.concatenate(right), visits / max(1, raw.count)


def pair_recall(truth: QuerySet, cluster_of: np.ndarray, threshold: float) -> dict:
    """Of the true near-duplicate pairs of the sample rows (exact search), the share
    whose two rows share a cluster."""
    partners = (truth.exact_scores >= threshold) & (truth.exact >= 0)
    query_rows = np.broadcast_to(truth.ids[:, None], truth.exact.shape)[partners]
    found = cluster_of[query_rows] == cluster_of[truth.exact[partners]]
    pairs = int(partners.sum())
    return {
        "pair_recall": round(float(found.mean()), 4) if pairs else None,
        "pairs_checked": pairs,
        "sample_rows": len(truth.ids),
    }


def write_duplicates(
    index: faiss.Index,
    indexed: EmbeddingSource,
    items: pa.Table,
    threshold: float | None,
    path: str,
    truth: QuerySet | None = None,
    phase=None,
) -> tuple[dict, np.ndarray]:
    """Writes the clusters of two or more to ``path``; returns the summary and every
    row's cluster (its smallest FAISS id; its own id when it is in none).

    ``indexed``: the embeddings as indexed (through its transform, if any);
    ``truth``: exact raw-cosine neighbours of some rows (computed here when not
    given) that measure the pass."""
    raw = indexed.with_transform(None).reporting(None)
    if raw.first_id != 0 or raw.count != items.num_rows:
        raise ValueError("duplicates are found over a whole index: rows 0 to n - 1")
    count = items.num_rows
    exact_left, exact_right = exact_duplicate_links(items.column("sha256"))
    left, right = [exact_left], [exact_right]
    lists_per_row = None
    if threshold is not None:
        if is_ivf(index):  # the index's lists, in its (maybe transformed) space
            lists, transform = ivf_lists(index, count), indexed.transform
        else:
            lists, transform = kmeans_lists(raw, SAMPLE_SEED), None
        near_left, near_right, lists_per_row = near_duplicate_links(raw, lists, transform, threshold, phase)
        left.append(near_left)
        right.append(near_right)
    left_ids, right_ids = np.concatenate(left), np.concatenate(right)
    graph = coo_matrix((np.ones(len(left_ids), np.int8), (left_ids, right_ids)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    first_member = np.full(len(sizes), count, np.int64)
    np.minimum.at(first_member, component, np.arange(count))
    clustered = np.flatnonzero(sizes[component] > 1)
    exact = np.zeros(count, bool)
    exact[exact_left] = exact[exact_right] = True
    cluster_of = first_member[component]

    table = pa.table(
        {
            "faiss_id": clustered,
            "id": items.column("id").take(clustered),
            "cluster_id": cluster_of[clustered],
            "cluster_size": sizes[component[clustered]].astype(np.int32),
            "exact_duplicate": exact[clustered],
        },
        schema=SCHEMA,
    )
    pq.write_table(table, path)
    summary = {
        "near_duplicate_threshold": threshold,
        "clusters": int(np.sum(sizes > 1)),
        "rows_in_clusters": len(clustered),
        "exact_duplicate_rows": int(exact.sum()),
    }
    if lists_per_row is not None:
        summary["rows_compared_in_a_second_list"] = round(lists_per_row, 3)
    if threshold is not None and count > 1:
        if truth is None:
            sample = raw.sample_ids(RECALL_SAMPLE, np.random.default_rng(SAMPLE_SEED))
            truth = exact_neighbours(raw, Metric.COSINE, sample, min(RECALL_NEIGHBOURS, count - 1))
        summary |= pair_recall(truth, cluster_of, threshold)
    return summary, cluster_of
