"""Near-duplicate clusters, so that search results can collapse copies of one image.

Two rows are linked when their files have the same sha256 (exact copies), or when
their raw embeddings are within ``threshold`` cosine similarity (resized,
recompressed or lightly edited copies), whatever transform the index applies.
Clusters are the connected components of those links; each is named by its
smallest FAISS id. Only rows in clusters of two or more are written; a row that is
absent is its own cluster.

Comparing every row with every other costs n^2, and one ANN query per row was
most of a 5M-vector build. Near copies are far closer to each other than to the
centroids between them, so they share an inverted list, or lie near the border
with the next one: each row is compared exactly with the rows of its own list and
of the neighbouring list closest to it (the index's own lists when it is an IVF
index over raw vectors; a k-means of sqrt(n) lists of the raw vectors otherwise).
The raw unit vectors are read by id from one file of this machine, memory-mapped
with its pages given back as it goes: the re-ranking vectors inside index.faiss
for ``*_rflat`` indexes (no extra pass), else a file written by one streaming
pass. ``pair_recall`` in the report is the share of true pairs (exact search,
sample rows) that ended in one cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
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

# Lists compared between two givebacks of the pages read. The kernel maps up to
# 64 KB around each faulted row (fault-around; MADV_RANDOM did not stop it), so
# 64 lists of 610 rows let RssFile reach 3.4 GB on 5M x 256; 8 bound it near 300 MB.
RELEASE_EVERY_LISTS = 8
# Rows assigned to k-means lists at a time.
ASSIGN_ROWS = 65536
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

    centroids: np.ndarray  # [lists, d]
    list_of: np.ndarray  # [n] int32
    neighbours: np.ndarray  # [lists, NEIGHBOUR_LISTS] int64, -1 where fewer

    @classmethod
    def from_centroids(cls, centroids: np.ndarray, list_of: np.ndarray) -> CoarseLists:
        centroids = prepare(centroids, Metric.COSINE)
        search = faiss.IndexFlatIP(centroids.shape[1])
        search.add(centroids)
        _, nearest = search.search(centroids, min(NEIGHBOUR_LISTS + 1, len(centroids)))
        return cls(centroids, list_of, without_self(nearest, np.arange(len(centroids)), nearest.shape[1] - 1))

    def members(self):
        """(list number, its rows in id order) for every list that has rows."""
        order, bounds = self._grouped
        for number in range(len(self.centroids)):
            if bounds[number + 1] > bounds[number]:
                yield number, order[bounds[number] : bounds[number + 1]]

    @functools.cached_property
    def _grouped(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows sorted by list, and where each list starts (sorted once, walked twice)."""
        order = np.argsort(self.list_of, kind="stable")
        return order, np.r_[0, np.cumsum(np.bincount(self.list_of, minlength=len(self.centroids)))]

    def other_list(self, number: int, vectors: np.ndarray, radius: float) -> np.ndarray:
        """For unit ``vectors`` of list ``number``, the neighbouring list that may
        hold a partner within ``radius`` of each, or -1. A partner y of x lies in
        list b rather than x's list a only if y.(c_b - c_a) > 0; y within ``radius``
        of x needs x.(c_a - c_b) <= radius |c_a - c_b|. Of those lists the closest
        is taken, as a second probe would."""
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


def kmeans_lists(vectors: UnitVectors, seed: int) -> CoarseLists:
    """A k-means of about sqrt(n) lists of the raw vectors: the assignment and the
    comparisons then cost about the same, n^1.5 d each."""
    count = len(vectors)
    lists = max(1, min(int(math.sqrt(count)), count // 39))
    rng = np.random.default_rng(seed)
    sample = vectors.take(np.sort(rng.choice(count, size=min(count, lists * 64), replace=False)))
    kmeans = faiss.Kmeans(vectors.dim, lists, niter=10, seed=seed, spherical=True)
    kmeans.train(sample)
    list_of = np.empty(count, np.int32)
    for start in range(0, count, ASSIGN_ROWS):
        _, nearest = kmeans.index.search(vectors.take(np.arange(start, min(count, start + ASSIGN_ROWS))), 1)
        list_of[start : start + len(nearest)] = nearest[:, 0]
    return CoarseLists.from_centroids(kmeans.centroids, list_of)


class UnitVectors:
    """Raw unit vectors by FAISS id, from a file of this machine (memory-mapped);
    ``release`` gives back the pages read so far (they stay in the page cache)."""

    def __init__(self, path: str, count: int, dim: int, offset: int = 0):
        self.dim = dim
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._map = mmap.mmap(
            self._file.fileno(), offset - start + count * dim * 4, access=mmap.ACCESS_READ, offset=start
        )
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read one by one: no read-ahead, no fault-around
            self._map.madvise(mmap.MADV_RANDOM)
        self._rows = np.frombuffer(self._map, np.float32, count * dim, offset - start).reshape(count, dim)

    @classmethod
    def written(cls, source: EmbeddingSource, path: str, phase=None) -> UnitVectors:
        """The raw vectors of ``source``, normalised, written to ``path`` in one pass."""
        with open(path, "wb") as file:
            for _, vectors in source.vector_batches():
                file.write(prepare(vectors, Metric.COSINE).tobytes())
                if phase is not None:
                    phase.advance(len(vectors))
        return cls(path, source.count, source.raw_dim)

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self._rows[rows]

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self._rows
        self._map.close()
        self._file.close()


def refine_vectors(index: faiss.Index, path: str) -> tuple[int, int] | None:
    """(offset, dim) of the raw re-ranking vectors in the index file at ``path``,
    when ``index`` is an IndexRefineFlat (index/refine_file.py has the layout)."""
    concrete = faiss.downcast_index(index)
    if not isinstance(concrete, faiss.IndexRefine):
        return None
    refine = faiss.downcast_index(concrete.refine_index)
    if not isinstance(refine, faiss.IndexFlat):
        return None
    return os.path.getsize(path) - 4 - concrete.ntotal * refine.d * 4, refine.d


def _list_links(rows: np.ndarray, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Links within one list, as a star per connected group (each member to the
    group's first), so a list of m near-identical rows gives m - 1 links, not m^2/2."""
    count = len(rows)
    left, right = [], []
    for start in range(0, count, BLOCK_ROWS):
        block_left, block_right = np.nonzero(vectors[start : start + BLOCK_ROWS] @ vectors.T >= threshold)
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


def _lists_in_turn(lists: CoarseLists, vectors: UnitVectors, phase):
    """(list number, rows) of every list; after each, ``phase`` advances by its rows
    and, every RELEASE_EVERY_LISTS lists and at the end, the pages read go back."""
    for done, (number, rows) in enumerate(lists.members(), start=1):
        yield number, rows
        if phase is not None:
            phase.advance(len(rows))
        if done % RELEASE_EVERY_LISTS == 0:
            vectors.release()
    vectors.release()


def near_duplicate_links(
    vectors: UnitVectors, lists: CoarseLists, threshold: float, phase=None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pairs of rows whose raw cosine similarity reaches ``threshold``, compared in
    their own list and in the neighbouring list where their partners may be; and
    the share of rows compared in a second list. ``phase`` advances twice a row."""
    radius = math.sqrt(max(0.0, 2 * (1 - threshold)))  # between unit vectors at that cosine
    left, right = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    visiting, visited = [], []
    for number, rows in _lists_in_turn(lists, vectors, phase):
        members = vectors.take(rows)
        found = _list_links(rows, members, threshold)
        left.append(found[0])
        right.append(found[1])
        target = lists.other_list(number, members, radius)
        going = target >= 0
        visiting.append(rows[going])
        visited.append(target[going])
    visiting, visited = np.concatenate(visiting or [[]]).astype(np.int64), np.concatenate(visited or [[]])
    order = np.argsort(visited, kind="stable")
    visiting, visited = visiting[order], visited[order]
    bounds = np.searchsorted(visited, np.arange(len(lists.centroids) + 1))
    for number, rows in _lists_in_turn(lists, vectors, phase):
        guests = visiting[bounds[number] : bounds[number + 1]]
        if len(guests):
            residents = vectors.take(rows)
            for start in range(0, len(guests), BLOCK_ROWS):
                block = guests[start : start + BLOCK_ROWS]
                guest, resident = np.nonzero(vectors.take(block) @ residents.T >= threshold)
                left.append(block[guest])
                right.append(rows[resident])
    return np.concatenate(left), np.concatenate(right), len(visiting) / max(1, len(lists.list_of))


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
    index_path: str,
    truth: QuerySet | None = None,
    phase=None,
) -> tuple[dict, np.ndarray]:
    """Writes the clusters of two or more to ``path``; returns the summary and every
    row's cluster (its smallest FAISS id; its own id when it is in none).

    ``indexed``: the embeddings as indexed (through its transform, if any);
    ``index_path``: the index's file on this machine;
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
        with tempfile.TemporaryDirectory(prefix="imgembed-duplicates-") as folder:
            in_index = refine_vectors(index, index_path) if indexed.transform is None else None
            if in_index is not None:  # the index's own raw vectors: no pass over the embeddings
                vectors = UnitVectors(index_path, count, in_index[1], in_index[0])
            else:
                if phase is not None:  # one more pass over the rows: writing them
                    phase.set_total(3 * count)
                vectors = UnitVectors.written(raw, os.path.join(folder, "unit-vectors.f32"), phase)
            # The index's lists are in its own space: only usable when that is the raw one.
            if is_ivf(index) and indexed.transform is None:
                lists = ivf_lists(index, count)
            else:
                lists = kmeans_lists(vectors, SAMPLE_SEED)
            near_left, near_right, lists_per_row = near_duplicate_links(vectors, lists, threshold, phase)
            vectors.close()
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
