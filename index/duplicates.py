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

Every read is sequential. One pass over the raw unit vectors (the re-ranking
vectors inside index.faiss for ``*_rflat`` indexes, else the embeddings) sorts
them on disk into group files of neighbouring lists, each small enough to load
whole; the lists are then compared group by group, a row visiting a list of its
own group at once, and the rows that visit a list of another group are sorted
the same way into guest files, compared with that list's residents last. Groups
are compared side by side, one per core (up to PARALLEL_GROUPS).
(Reading rows by id from a memory map instead cost a page fault a row and up to
3.4 GB of mapped pages on 5M x 256.) ``pair_recall`` in the report is the share of
true pairs (exact search, sample rows) that ended in one cluster.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import tempfile
from collections.abc import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from imgembed.index.evaluate import QuerySet, exact_neighbours, without_self
from imgembed.index.faiss_index import is_ivf
from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import Metric, prepare

# One group file of neighbouring lists, loaded whole while its lists are compared
# (with two copies while sorting): about 64 MB, unless that makes more than
# MAX_GROUPS files. Groups are a k-means of the lists' centroids, weighted by their
# sizes (at 5M x 256, 78 groups of 17k to 116k rows): a row's second list was in
# its own group for 73% of the rows, against 1% for groups of consecutive lists.
GROUP_BYTES = 64 * 2**20
MAX_GROUPS = 256
# Rows read, assigned and sorted into group files at a time.
READ_ROWS = 65536
# Rows of one similarity block: 2048 x a list of 50k rows is 400 MB at most.
BLOCK_ROWS = 2048
# The lists next to a row's own among which the one it also visits is found: at 141
# lists of 64-d vectors, 8 covered 95% of the pairs, 64 covered 99.3%.
NEIGHBOUR_LISTS = 64
# Groups compared at once (each holds about three times GROUP_BYTES).
PARALLEL_GROUPS = max(1, min(4, os.cpu_count() or 1))
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
    """A partition of the rows into lists: unit centroids, each list's nearest other
    lists (where a row near its list's edge has its other neighbours), how many rows
    each holds, and how a batch of rows is assigned to them."""

    centroids: np.ndarray  # [lists, d]
    neighbours: np.ndarray  # [lists, NEIGHBOUR_LISTS] int64, -1 where fewer
    sizes: np.ndarray  # [lists] rows (estimated from a sample for k-means lists)
    assign: Callable[[int, np.ndarray], np.ndarray]  # (first row, unit vectors) -> their lists

    @classmethod
    def from_centroids(cls, centroids: np.ndarray, sizes: np.ndarray, assign) -> CoarseLists:
        centroids = prepare(centroids, Metric.COSINE)
        search = faiss.IndexFlatIP(centroids.shape[1])
        search.add(centroids)
        _, nearest = search.search(centroids, min(NEIGHBOUR_LISTS + 1, len(centroids)))
        neighbours = without_self(nearest, np.arange(len(centroids)), nearest.shape[1] - 1)
        return cls(centroids, neighbours, sizes, assign)

    def groups(self, record_bytes: int) -> np.ndarray:
        """The group of each list: neighbouring lists of about GROUP_BYTES in all."""
        total = int(self.sizes.sum()) * record_bytes
        count = min(len(self.centroids), MAX_GROUPS, -(-total // GROUP_BYTES))
        if count <= 1:
            return np.zeros(len(self.centroids), np.int64)
        kmeans = faiss.Kmeans(
            self.centroids.shape[1],
            count,
            niter=20,
            seed=SAMPLE_SEED,
            spherical=True,
            min_points_per_centroid=1,
        )
        kmeans.train(self.centroids, weights=np.maximum(self.sizes, 1).astype(np.float32))
        nearest = kmeans.index.search(self.centroids, 1)[1][:, 0]
        return np.unique(nearest, return_inverse=True)[1].astype(np.int64)  # no empty groups

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
    sizes = np.zeros(invlists.nlist, np.int64)
    for number in range(invlists.nlist):
        sizes[number] = size = invlists.list_size(number)
        if size:
            pointer = invlists.get_ids(number)
            list_of[faiss.rev_swig_ptr(pointer, size).copy()] = number
            invlists.release_ids(number, pointer)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    return CoarseLists.from_centroids(
        centroids, sizes, lambda first, rows: list_of[first : first + len(rows)]
    )


def kmeans_lists(raw: EmbeddingSource, seed: int) -> CoarseLists:
    """A k-means of about sqrt(n) lists of the raw unit vectors: the assignment and
    the comparisons then cost about the same, n^1.5 d each."""
    count = raw.count
    lists = max(1, min(int(math.sqrt(count)), count // 39))
    sample = prepare(raw.take(raw.sample_ids(lists * 64, np.random.default_rng(seed))), Metric.COSINE)
    if lists == 1:  # under 78 rows: one list, and nothing for k-means to do (faiss would warn)
        return CoarseLists.from_centroids(
            sample.mean(axis=0, keepdims=True),
            np.array([count]),
            lambda first, rows: np.zeros(len(rows), np.int64),
        )
    kmeans = faiss.Kmeans(raw.raw_dim, lists, niter=10, seed=seed, spherical=True)
    kmeans.train(sample)
    _, nearest = kmeans.index.search(sample, 1)
    sizes = np.bincount(nearest[:, 0], minlength=lists) * (count / len(sample))

    def assign(first: int, rows: np.ndarray) -> np.ndarray:
        return kmeans.index.search(rows, 1)[1][:, 0]

    return CoarseLists.from_centroids(kmeans.centroids, np.ceil(sizes).astype(np.int64), assign)


# What a group file says of each row besides its vector (kept in a file of its own:
# records of (row, list, vector) cost a strided copy of every vector when sorted).
KEY_DTYPE = np.dtype([("row", "<i8"), ("list", "<i4")])


def row_bytes(dim: int) -> int:
    return KEY_DTYPE.itemsize + 4 * dim


class ListGroups:
    """Rows sorted on disk by list into groups (``group_of_list``), each read back
    whole: a group is a file of keys (row, list) and a file of unit vectors, in the
    same order, appended in any order."""

    def __init__(self, folder: str, name: str, dim: int, group_of_list: np.ndarray):
        self.dim = dim
        self.group_of_list = group_of_list
        count = int(self.group_of_list.max()) + 1
        self.paths = [os.path.join(folder, f"{name}-{group:05d}") for group in range(count)]
        # Closed by finish().
        self._keys = [open(path + ".keys", "wb") for path in self.paths]  # noqa: SIM115
        self._vectors = [open(path + ".vectors", "wb") for path in self.paths]  # noqa: SIM115
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="group-files")
        self._writing: concurrent.futures.Future | None = None

    def append(self, rows: np.ndarray, lists: np.ndarray, vectors: np.ndarray) -> None:
        group = self.group_of_list[lists]
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(len(self.paths) + 1))
        keys = np.empty(len(rows), KEY_DTYPE)
        keys["row"], keys["list"] = rows[order], lists[order]
        vectors = np.take(vectors, order, axis=0)
        # Written by a thread of its own while the caller reads and sorts the next
        # batch; one batch at a time, so that no more than two are held.
        if self._writing is not None:
            self._writing.result()
        self._writing = self._writer.submit(self._write, keys, vectors, bounds)

    def _write(self, keys: np.ndarray, vectors: np.ndarray, bounds: np.ndarray) -> None:
        for number in np.flatnonzero(np.diff(bounds)):
            # file.write, not ndarray.tofile: tofile dups and re-opens the file on every call.
            self._keys[number].write(keys[bounds[number] : bounds[number + 1]].data)
            self._vectors[number].write(vectors[bounds[number] : bounds[number + 1]].data)

    def finish(self) -> None:
        if self._writing is not None:
            self._writing.result()
        self._writer.shutdown()
        for file in self._keys + self._vectors:
            file.close()

    def __len__(self) -> int:
        return len(self.paths)

    def lists_in(self, group: int):
        """(list number, rows, [rows, dim] unit vectors) of every list in ``group``."""
        keys = np.fromfile(self.paths[group] + ".keys", KEY_DTYPE)
        if not len(keys):  # k-means list sizes are estimates: a group may get no rows
            return
        vectors = np.fromfile(self.paths[group] + ".vectors", np.float32).reshape(len(keys), self.dim)
        order = np.argsort(keys["list"], kind="stable")
        numbers, starts = np.unique(keys["list"][order], return_index=True)
        rows, vectors = keys["row"][order], np.take(vectors, order, axis=0)
        for number, start, end in zip(numbers, starts, np.r_[starts[1:], len(rows)], strict=True):
            yield int(number), rows[start:end], vectors[start:end]


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
        block_left, block_right = _at_least(vectors[start : start + BLOCK_ROWS] @ vectors.T, threshold)
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


def unit_batches(raw: EmbeddingSource, in_index: tuple[str, int, int] | None = None):
    """(first row, raw unit vectors) of every row in order, read sequentially: from
    ``in_index`` (path, offset, dim: the index's own raw re-ranking vectors) when
    given, else from the embeddings."""
    if in_index is None:
        for first, vectors in raw.vector_batches():
            yield first, prepare(vectors, Metric.COSINE)
        return
    path, offset, dim = in_index
    with open(path, "rb") as file:
        file.seek(offset)
        for first in range(0, raw.count, READ_ROWS):
            rows = min(READ_ROWS, raw.count - first)
            yield first, np.fromfile(file, np.float32, rows * dim).reshape(rows, dim)


def near_duplicate_links(
    batches, lists: CoarseLists, dim: int, threshold: float, folder: str, phase=None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pairs of rows whose raw cosine similarity reaches ``threshold``, compared in
    their own list and in the neighbouring list where their partners may be; and
    the share of rows compared in a second list. A row whose second list is in its
    own group is compared there at once; the others are written to guest files and
    compared when that list's group is loaded again. ``phase`` advances three times
    a row: sorting into groups, comparing in the own list, in the visited one."""
    radius = math.sqrt(max(0.0, 2 * (1 - threshold)))  # between unit vectors at that cosine
    group_of_list = lists.groups(row_bytes(dim))
    residents = ListGroups(folder, "rows", dim, group_of_list)
    guests = ListGroups(folder, "guests", dim, group_of_list)
    count = 0
    for first, vectors in batches:
        rows = np.arange(first, first + len(vectors))
        residents.append(rows, lists.assign(first, vectors), vectors)
        count += len(vectors)
        _advance(phase, len(vectors))
    residents.finish()
    links = [(np.empty(0, np.int64), np.empty(0, np.int64))]
    visitors = 0
    # Groups are compared side by side, each on one BLAS thread: a group's matrix
    # products are small, and most of its time is single-threaded numpy (reading,
    # sorting, thresholds) that left a core idle.
    with threadpool_limits(1, user_api="blas"):
        compare = functools.partial(_compare_group, residents, lists, radius, threshold)
        for group_links, leaving, visiting, compared in _in_parallel(compare, range(len(residents))):
            links += group_links
            visitors += visiting
            if leaving is not None:
                guests.append(*leaving)
            _advance(phase, compared)
        guests.finish()
        welcome = functools.partial(_welcome_guests, residents, guests, threshold)
        for group_links, compared in _in_parallel(welcome, range(len(residents))):
            links += group_links
            _advance(phase, compared)
    left, right = zip(*links, strict=True)
    return np.concatenate(left), np.concatenate(right), visitors / max(1, count)


def _compare_group(residents: ListGroups, lists: CoarseLists, radius: float, threshold: float, group: int):
    """Compares each list of ``group`` with itself and with the neighbouring list its
    rows visit when that list is in the group too. Returns the links, the rows
    visiting lists of other groups (rows, lists, vectors; None if none), how many
    rows visit a second list, and how many comparisons of rows were made."""
    loaded = {number: (rows, members) for number, rows, members in residents.lists_in(group)}
    links, leaving, visiting_rows, compared = [], [], 0, 0
    for number, (rows, members) in loaded.items():
        links.append(_list_links(rows, members, threshold))
        target = lists.other_list(number, members, radius)
        going = target >= 0
        visiting_rows += int(going.sum())
        here = going & (residents.group_of_list[np.maximum(target, 0)] == group)
        for other in np.unique(target[here]):
            visiting = target == other
            links.append(_cross_links(rows[visiting], members[visiting], *loaded[other], threshold))
        away = going & ~here
        leaving.append((rows[away], target[away], members[away]))  # written once a group
        compared += 2 * len(rows) - int(away.sum())  # the guests count when compared
    gone = tuple(np.concatenate(parts) for parts in zip(*leaving, strict=True)) if leaving else None
    return links, gone, visiting_rows, compared


def _welcome_guests(residents: ListGroups, guests: ListGroups, threshold: float, group: int):
    """Compares the rows visiting lists of ``group`` with those lists' residents."""
    visiting = {number: (rows, vectors) for number, rows, vectors in guests.lists_in(group)}
    links, compared = [], 0
    if visiting:
        for number, rows, members in residents.lists_in(group):
            if number in visiting:
                links.append(_cross_links(*visiting[number], rows, members, threshold))
                compared += len(visiting[number][0])
    return links, compared


def _in_parallel(function, items):
    """``function(item)`` for every item on PARALLEL_GROUPS threads, yielded as they
    finish; at most twice that many are pending, so that finished groups waiting to
    be taken do not pile up."""
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_GROUPS, thread_name_prefix="duplicates") as pool:
        pending = set()
        for item in items:
            pending.add(pool.submit(function, item))
            if len(pending) >= 2 * PARALLEL_GROUPS:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                yield from (future.result() for future in done)
        yield from (future.result() for future in concurrent.futures.as_completed(pending))


def _cross_links(
    guest_rows: np.ndarray, guest_vectors: np.ndarray, rows: np.ndarray, members: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Links between rows visiting a list and that list's residents."""
    left, right = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for start in range(0, len(guest_rows), BLOCK_ROWS):
        guest, resident = _at_least(guest_vectors[start : start + BLOCK_ROWS] @ members.T, threshold)
        left.append(guest_rows[start + guest])
        right.append(rows[resident])
    return np.concatenate(left), np.concatenate(right)


def _at_least(similarities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the entries >= threshold; as np.nonzero, which takes seven
    times longer on these matrices (0.64 against 0.09 ms on 610 x 610)."""
    return np.divmod(np.flatnonzero(similarities >= threshold), similarities.shape[1])


def _advance(phase, rows: int) -> None:
    if phase is not None:
        phase.advance(rows)


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
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="exact-duplicates") as beside:
        # Arrow sorts the hashes without the GIL, beside the near-duplicate pass.
        exact_links = beside.submit(exact_duplicate_links, items.column("sha256"))
        lists_per_row = None
        if threshold is not None:
            over_raw = indexed.transform is None  # else the index's lists and vectors are in its own space
            lists = ivf_lists(index, count) if over_raw and is_ivf(index) else kmeans_lists(raw, SAMPLE_SEED)
            in_index = refine_vectors(index, index_path) if over_raw else None
            batches = unit_batches(raw, None if in_index is None else (index_path, *in_index))
            # Scratch files beside the index (a tmpfs /tmp would hold them in RAM).
            with tempfile.TemporaryDirectory(prefix="duplicates-", dir=os.path.dirname(index_path)) as folder:
                near = near_duplicate_links(batches, lists, raw.raw_dim, threshold, folder, phase)
        exact_left, exact_right = exact_links.result()
    left, right = [exact_left], [exact_right]
    if threshold is not None:
        near_left, near_right, lists_per_row = near
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
