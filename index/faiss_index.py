"""The few things we do to FAISS indexes that faiss does not do in one call.

Every vector's FAISS id is its global row number (see ``index/reader.py``).
IVF indexes store those ids; Flat and HNSW number vectors in insertion order,
so they must receive rows in id order; ``IndexRefine`` has no ``add_with_ids``,
so its two parts are filled separately, which is also what lets shards built on
different workers be merged back in id order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import faiss
import numpy as np

from imgembed.index.choose import HNSW_M, IndexPlan
from imgembed.index.refine_file import RefineVectors
from imgembed.index.vectors import Metric


def new_index(plan: IndexPlan, dim: int, metric: Metric) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, metric.faiss_metric)
    if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ):
        # index_factory turns on polysemous training for PQ, which costs ~40 s
        # whatever the data size (5 s without); we never use polysemous search.
        faiss.downcast_index(index).do_polysemous_training = False
    return index


# Coarse k-means iterations: the centroids barely move after 10 (faiss's default is
# 25, which made training most of a 5M-vector build).
KMEANS_ITERATIONS = 10
# Full k-means compares every sample point with every centroid, and the sample
# grows with the lists (~64 a list), so its cost grows as nlist squared: 14 s an
# iteration at 8,192 lists x 488k x 256-d on 2 cores, ~40 min at 32,768 lists. From
# this many lists the centroids come from two-level k-means (sqrt(nlist) clusters,
# each split in proportion to its points, as faiss.contrib.clustering does), then
# REFINE_ITERATIONS of full k-means whose points find their centroid through an HNSW
# graph. Measured on 1M of the 5M structured vectors at 8,192 lists (488k sample):
# training 141 s -> 33 s; recall@10 of IVF,Flat at nprobe 8/16/32 0.933/0.961/0.975
# -> 0.936/0.959/0.972; lists a little less even (sum of squared sizes 1.29 -> 1.41
# times the ideal's).
TWO_LEVEL_MIN_LISTS = 4096
REFINE_ITERATIONS = 4
# The graph only assigns points to centroids while refining: 98% find the nearest
# (efSearch 16, 7.5 s for 488k points) against 100% through a flat index (13.4 s).
REFINE_EF_SEARCH = 16


def training_steps(index: faiss.Index) -> int:
    """The steps ``train_index`` reports for ``index``: coarse clustering, codes."""
    ivf = faiss.extract_index_ivf(index) if is_ivf(index) else None
    if ivf is None:
        return 1
    if ivf.nlist >= TWO_LEVEL_MIN_LISTS:
        return 1 + REFINE_ITERATIONS + 1
    return KMEANS_ITERATIONS + 1


def train_index(index: faiss.Index, sample: np.ndarray, seed: int, phase=None) -> None:
    """Trains ``index`` on prepared ``sample``. An IVF index's coarse k-means runs
    here, a step at a time (``phase`` advances by one each; see training_steps),
    then faiss trains the codes, seeing the quantizer full."""
    ivf = faiss.extract_index_ivf(index) if is_ivf(index) else None
    if ivf is None or ivf.d != sample.shape[1]:  # not IVF, or IVF behind a pre-transform
        index.train(sample)
        if phase is not None:
            phase.advance(training_steps(index))
        return
    # Spherical for inner product, as IndexIVF trains it.
    spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    if ivf.nlist >= TWO_LEVEL_MIN_LISTS:
        centroids = two_level_centroids(sample, ivf.nlist, spherical, seed)
        if phase is not None:
            phase.advance(1)
        graph = faiss.IndexHNSWFlat(ivf.d, HNSW_M)
        graph.hnsw.efSearch = REFINE_EF_SEARCH
        centroids = kmeans_steps(sample, centroids, REFINE_ITERATIONS, graph, spherical, seed, phase)
    else:
        centroids = kmeans_steps(
            sample, ivf.nlist, KMEANS_ITERATIONS, faiss.IndexFlatL2(ivf.d), spherical, seed, phase
        )
    ivf.quantizer.reset()
    ivf.quantizer.add(centroids)
    index.train(sample)  # the codes only: faiss skips a trained, full quantizer
    if phase is not None:
        phase.advance(1)


def kmeans_steps(
    sample: np.ndarray,
    start: np.ndarray | int,
    iterations: int,
    assigner: faiss.Index,
    spherical: bool,
    seed: int,
    phase=None,
) -> np.ndarray:
    """``iterations`` of k-means from the ``start`` centroids (or from that many
    sample points, faiss's own start), one at a time (the result is the same as one
    run); ``assigner`` is the index that finds each point's centroid (faiss refills
    it with the centroids each iteration)."""
    nlist = start if isinstance(start, int) else len(start)
    centroids = None if isinstance(start, int) else start
    for _ in range(iterations):
        clustering = faiss.Clustering(sample.shape[1], nlist)
        clustering.niter, clustering.seed, clustering.spherical = 1, seed, spherical
        clustering.max_points_per_centroid = len(sample)  # the sample is already sized
        if centroids is not None:
            faiss.copy_array_to_vector(
                np.ascontiguousarray(centroids, np.float32).ravel(), clustering.centroids
            )
        clustering.train(sample, assigner)
        centroids = faiss.vector_to_array(clustering.centroids).reshape(nlist, -1)
        if phase is not None:
            phase.advance(1)
    return centroids


def two_level_centroids(sample: np.ndarray, nlist: int, spherical: bool, seed: int) -> np.ndarray:
    """``nlist`` centroids: k-means into sqrt(nlist) clusters, then each cluster's
    points into its share of the centroids (faiss.contrib.clustering's scheme; its
    function can give a small cluster no centroid, and then fails)."""
    dim = sample.shape[1]
    options = {"niter": KMEANS_ITERATIONS, "spherical": spherical, "seed": seed}
    coarse = faiss.Kmeans(dim, int(np.sqrt(nlist)), max_points_per_centroid=2000, **options)
    coarse.train(sample)
    _, assigned = coarse.index.search(sample, 1)
    members = np.argsort(assigned.ravel(), kind="stable")
    sizes = np.bincount(assigned.ravel(), minlength=coarse.k)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    centroids = []
    for cluster, share in enumerate(apportion(sizes, nlist)):
        if share:
            points = sample[members[starts[cluster] : starts[cluster + 1]]]
            # The sample holds >= 39 points a list overall; a cluster may hold a few less.
            fine = faiss.Kmeans(dim, int(share), min_points_per_centroid=1, **options)
            fine.train(points)
            centroids.append(fine.centroids)
    return np.vstack(centroids)


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """``total`` split in proportion to ``sizes`` (largest remainders), at least one
    for every non-zero size and never more than the size.

    >>> apportion(np.array([1, 0, 99]), 10).tolist()
    [1, 0, 9]
    """
    if not (sizes > 0).sum() <= total <= sizes.sum():
        raise ValueError(f"cannot share {total} centroids out to clusters of {sizes.tolist()} points")
    exact = sizes * total / sizes.sum()
    shares = np.minimum(np.maximum(np.floor(exact), sizes > 0), sizes).astype(np.int64)
    while shares.sum() != total:
        if shares.sum() < total:  # the largest remainder among those with room
            room = shares < sizes
            shares[np.flatnonzero(room)[np.argmax((exact - shares)[room])]] += 1
        else:  # the minimums overshot: take from the largest share above one
            shares[np.argmax(np.where(shares > 1, shares - exact, -np.inf))] -= 1
    return shares


def has_on_disk_lists(index: faiss.Index) -> bool:
    if not is_ivf(index):
        return False
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return isinstance(lists, faiss.OnDiskInvertedLists)


def can_have_on_disk_lists(index: faiss.Index) -> bool:
    """IVF indexes of plain codes (Flat, SQ8): fast-scan PQ packs its lists in blocks
    that OnDiskInvertedLists does not hold, and a re-ranked index keeps its raw
    vectors on disk already (index/refine_file.py)."""
    concrete = faiss.downcast_index(index)
    return isinstance(concrete, faiss.IndexIVF) and not isinstance(concrete, faiss.IndexIVFFastScan)


@contextlib.contextmanager
def native_stdout_silenced():
    """faiss prints to C's stdout when it resizes or re-points on-disk lists, which
    would end up in a command's output (``imgembed query`` prints JSON there)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved, quiet = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(quiet)


@contextlib.contextmanager
def exact_assignment(index: faiss.Index):
    """While vectors are added: their lists found by a flat copy of an HNSW coarse
    quantizer. The graph finds lists fast one query at a time, but batches are
    faster as one matrix product, and exact: HNSW searches were 84% of the add
    time of a 5M x 256 build (8192 lists, py-spy)."""
    ivf = faiss.extract_index_ivf(index) if is_ivf(index) else None
    graph = ivf.quantizer if ivf is not None else None
    if graph is None or not isinstance(faiss.downcast_index(graph), faiss.IndexHNSW):
        yield
        return
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(graph.reconstruct_n(0, ivf.nlist))
    ivf.quantizer = flat
    try:
        yield
    finally:
        ivf.quantizer = graph


def add_vectors(
    index: faiss.Index,
    vectors: np.ndarray,
    first_id: int,
    base_id: int = 0,
    refine: RefineVectors | None = None,
) -> None:
    """Adds prepared vectors whose FAISS ids are first_id, first_id + 1, ...

    ``base_id`` is the id of the index's first row: 0 for a whole index, the
    first id of its file for a shard that will be merged into a whole one.
    ``refine``: where an IndexRefine's raw vectors go instead of its RAM.
    """
    concrete = faiss.downcast_index(index)
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    if isinstance(concrete, faiss.IndexRefine):
        refined = refine if refine is not None else concrete.refine_index
        _expect_next_id(refined, first_id - base_id)
        faiss.downcast_index(concrete.base_index).add_with_ids(vectors, ids)
        if refine is not None:
            refine.append(vectors)
        else:
            concrete.refine_index.add(vectors)
        concrete.ntotal = refined.ntotal
    elif isinstance(concrete, faiss.IndexIVF):
        concrete.add_with_ids(vectors, ids)
    else:
        _expect_next_id(concrete, first_id - base_id)
        concrete.add(vectors)


def merge_shard(index: faiss.Index, shard: faiss.Index, refine: RefineVectors | None = None) -> None:
    """Moves a shard built from a copy of the same trained index into ``index``
    (an IndexRefine's raw vectors into ``refine`` when given). Shards must arrive
    in id order (refine codes and Flat rows are positional)."""
    concrete, other = faiss.downcast_index(index), faiss.downcast_index(shard)
    if isinstance(concrete, faiss.IndexRefine):
        faiss.downcast_index(concrete.base_index).merge_from(faiss.downcast_index(other.base_index), 0)
        # Append the refine codes as codes: merge_from demands the same C++ class,
        # and a deserialised IndexFlat comes back as IndexFlatIP or IndexFlatL2.
        refine_codes = faiss.vector_to_array(faiss.downcast_index(other.refine_index).codes)
        if refine is not None:
            refine.append(refine_codes.view(np.float32).reshape(other.ntotal, -1))
            concrete.ntotal = refine.ntotal
        else:
            concrete.refine_index.add_sa_codes(refine_codes.reshape(other.ntotal, -1))
            concrete.ntotal = concrete.refine_index.ntotal
    elif isinstance(concrete, faiss.IndexHNSW):
        raise ValueError("HNSW graphs cannot be merged; HNSW indexes are built in one process")
    else:
        concrete.merge_from(other, 0)


def empty_copy(index: faiss.Index) -> faiss.Index:
    """The trained index without its rows. faiss cannot clone on-disk lists: they are
    set aside (not freed) while the rest is cloned."""
    if not has_on_disk_lists(index):
        empty = faiss.clone_index(index)
        empty.reset()  # keeps the training, drops the rows
        return empty
    ivf = faiss.extract_index_ivf(index)
    lists, owned, count = ivf.invlists, ivf.own_invlists, ivf.ntotal
    placeholder = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # replace_invlists would free them otherwise
    ivf.replace_invlists(placeholder, False)
    ivf.ntotal = index.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, owned)
        ivf.ntotal = index.ntotal = count


def can_remove_rows(index: faiss.Index) -> bool:
    """IVF indexes (their lists, on disk or not) and Flat ones. Not an HNSW graph, and
    not fast-scan PQ, whose lists faiss 1.15 corrupts as it removes: vectors added
    after a removal were found for 35% of queries by themselves (tests/test_index.py)."""
    concrete = faiss.downcast_index(index)
    target = concrete
    if isinstance(concrete, faiss.IndexRefine):
        target = faiss.downcast_index(concrete.base_index)
    if isinstance(target, faiss.IndexIVFFastScan):
        return False
    return is_ivf(target) or isinstance(target, faiss.IndexFlatCodes)


def remove_rows(index: faiss.Index, removed: np.ndarray) -> None:
    """Removes the rows with these ids (sorted) and numbers the others densely, each
    id less the removed ids below it: the index then holds what it would hold had
    the removed rows never been added. An IndexRefine's base only: its raw vectors
    are positional and written anew (index/refine_file.py)."""
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexRefine):
        concrete = faiss.downcast_index(concrete.base_index)
    if not len(removed):
        return
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(removed, dtype=np.int64))
    if not is_ivf(concrete):
        concrete.remove_ids(selector)  # Flat rows move up in order: numbered densely already
        return
    ivf = faiss.extract_index_ivf(concrete)
    with native_stdout_silenced():  # on-disk lists print as they shrink
        ivf.remove_ids(selector)
    concrete.ntotal = ivf.ntotal
    lists = ivf.invlists
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            ids = faiss.rev_swig_ptr(pointer, size)  # the list's own ids, renumbered in place
            ids -= np.searchsorted(removed, ids)
            lists.release_ids(number, pointer)


def set_search_params(index: faiss.Index, params: dict) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def search_param_grid(plan: IndexPlan, index: faiss.Index) -> list[dict]:
    """Settings to try, cheapest first; tuning keeps the first that meets the target."""
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexHNSW):
        return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]
    if not is_ivf(index):
        return [{}]
    ivf = faiss.extract_index_ivf(index)
    nprobes = [2**i for i in range(int(np.log2(ivf.nlist)) + 1)]
    probes = [{"nprobe": p} for p in nprobes]
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        # The graph must explore more than the lists it hands back, or it misses good ones.
        probes = [probe | {"quantizer_efSearch": max(32, 2 * probe["nprobe"])} for probe in probes]
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        # Re-ranking k * k_factor candidates: reads of raw rows, cheap next to probing.
        return [probe | {"k_factor_rf": k} for probe in probes for k in (1, 4, 16, 64)]
    return probes


def is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _expect_next_id(index: faiss.Index, position: int) -> None:
    # Flat, HNSW and refine codes are positional: row i must hold id base + i.
    if index.ntotal != position:
        raise ValueError(
            f"rows must be added in id order: index holds {index.ntotal}, next row is {position}"
        )
