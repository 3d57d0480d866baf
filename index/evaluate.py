"""Recall against exact search, and query latency.

Queries are vectors of the corpus itself ("find images like this one"). Each
query's own row is removed from both the exact and the approximate results, so
recall@k is the share of its k true nearest *other* images that the index
returns in its top k. Rows tied with the k-th true neighbour (identical images
are common) all count as true neighbours, so tie order cannot cost recall.
"""

from __future__ import annotations

import dataclasses
import time

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from imgembed.index import mapped_pages
from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import Metric, prepare

RECALL_KS = (1, 10, 100)
LATENCY_QUERIES = 200
# Queries that measure recall@100: at k_factor 64, each re-ranks 6,464 rows, whose
# mapped pages are given back after every query (MAPPED_PER_BATCH): 47 s for 1000
# queries at 5M x 256; 200 take a fifth of that.
DEEP_RECALL_QUERIES = 200
# Queries searched at once when measuring recall, at most.
SEARCH_BATCH = 100
# A query re-ranked from memory-mapped raw vectors maps, for each candidate row, up
# to the 64 KB around it (the kernel's fault-around, whatever the row size, once
# index/mapped_pages.py has cached the file in base pages: 10,000 random 1 KB rows
# of a 5 GB file mapped 484 to 595 MB, madvise(MADV_RANDOM) or not). Batches are
# sized so that no more than MAPPED_PER_BATCH piles up before it is given back: one
# batch of 100 queries at k 101 x k_factor 64 had mapped the whole 5 GB.
MAPPED_PER_ROW = 64 * 1024
MAPPED_PER_BATCH = 256 * 2**20


@dataclasses.dataclass
class QuerySet:
    ids: np.ndarray  # FAISS ids of the query rows
    vectors: np.ndarray  # prepared like the corpus
    exact: np.ndarray  # [nq, k] true neighbour ids, nearest first, the query itself removed
    exact_scores: np.ndarray  # [nq, k] their similarities (cosine) or distances (l2)
    higher_is_closer: bool

    def subset(self, rows: np.ndarray) -> QuerySet:
        return QuerySet(
            self.ids[rows],
            self.vectors[rows],
            self.exact[rows],
            self.exact_scores[rows],
            self.higher_is_closer,
        )

    def true_neighbours(self, k: int) -> np.ndarray:
        """[nq, K] ids that count as the k nearest: the first k and any tied with
        the k-th; -2 marks a slot that does not count."""
        kth = self.exact_scores[:, k - 1 : k]
        tolerance = 1e-5 * np.maximum(1.0, np.abs(kth))
        if self.higher_is_closer:
            counts = self.exact_scores >= kth - tolerance
        else:
            counts = self.exact_scores <= kth + tolerance
        return np.where(counts, self.exact, -2)


def exact_neighbours(source: EmbeddingSource, metric: Metric, ids: np.ndarray, k: int) -> QuerySet:
    """Exact k nearest neighbours of the rows ``ids``, in one streaming pass."""
    vectors = prepare(source.take(ids), metric, "queries")
    batches = (prepare(batch, metric) for _, batch in source.vector_batches())
    scores, found = knn_ground_truth(vectors, batches, k + 1, metric_type=metric.faiss_metric, ngpu=0)
    found, scores = without_self(found + source.first_id, ids, k, scores)
    return QuerySet(ids, vectors, found, scores, metric.higher_is_closer)


def without_self(found: np.ndarray, query_ids: np.ndarray, k: int, scores: np.ndarray | None = None):
    """Drops each query's own id from its result row, keeping the order of the rest
    (and of ``scores`` alongside, when given)."""
    is_self = found == query_ids[:, None]
    # A stable sort on "is self" moves the self match to the end of its row.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    if scores is None:
        return np.take_along_axis(found, order, axis=1)
    return np.take_along_axis(found, order, axis=1), np.take_along_axis(scores, order, axis=1)


def batch_size(index: faiss.Index, k: int) -> int:
    """Queries searched at once: fewer when each re-ranks many mapped rows."""
    concrete = faiss.downcast_index(index)
    if not (mapped_pages.watching() and isinstance(concrete, faiss.IndexRefine)):
        return SEARCH_BATCH
    mapped_per_query = k * max(1.0, concrete.k_factor) * MAPPED_PER_ROW
    return int(np.clip(MAPPED_PER_BATCH // mapped_per_query, 1, SEARCH_BATCH))


def search(index: faiss.Index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search in batches, giving back the pages of mapped files each batch
    read (index/mapped_pages.py), so measuring never piles a whole file into RSS."""
    scores, found = [], []
    size = batch_size(index, k)
    for start in range(0, len(vectors), size):
        batch_scores, batch_found = index.search(vectors[start : start + size], k)
        mapped_pages.release()
        scores.append(batch_scores)
        found.append(batch_found)
    if not scores:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(found)


def recall(index: faiss.Index, queries: QuerySet, k: int) -> float:
    _, found = search(index, queries.vectors, k + 1)
    found = without_self(found, queries.ids, k)
    truth = queries.true_neighbours(k)
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum()
    return float(hits / found.size)


def tune(index: faiss.Index, grid: list[dict], queries: QuerySet, k: int, target: float, apply):
    """The first (cheapest) setting of ``grid`` that reaches ``target`` recall@k,
    else the best one seen; returns (params, recall, met)."""
    best = ({}, -1.0)
    for params in grid:
        apply(index, params)
        measured = recall(index, queries, k)
        if measured >= target:
            return params, measured, True
        if measured > best[1]:
            best = (params, measured)
    apply(index, best[0])
    return best[0], best[1], False


def latency(index: faiss.Index, queries: QuerySet, k: int) -> dict:
    """One query at a time (p50, p99 in ms) and in batches (queries per second; as
    large as ``search`` makes them). Each batch is searched once untimed first, so
    that the timings are of pages already mapped, as in a service that has run a
    while, not of the page faults that giving them back causes."""
    timings = []
    size = batch_size(index, k)
    batch_seconds = 0.0
    for start in range(0, len(queries.vectors), size):
        batch = queries.vectors[start : start + size]
        index.search(batch, k)
        for vector in batch[: max(0, LATENCY_QUERIES - len(timings))]:
            started = time.perf_counter()
            index.search(vector[None], k)
            timings.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        index.search(batch, k)
        batch_seconds += time.perf_counter() - started
        mapped_pages.release()
    return {
        "single_query_p50_ms": round(float(np.percentile(timings, 50)), 3),
        "single_query_p99_ms": round(float(np.percentile(timings, 99)), 3),
        "batch_qps": round(len(queries.vectors) / max(batch_seconds, 1e-9), 1),
        "batch_size": min(size, len(queries.vectors)),
    }


def recall_report(index: faiss.Index, queries: QuerySet, count: int) -> dict:
    """recall@1/10/100 where the corpus has that many other rows (and recall@(n-1)
    for a corpus of n < 11, where 10 neighbours do not exist)."""
    ks = sorted({k for k in RECALL_KS if k < count} | {min(10, count - 1)})
    few = queries.subset(np.arange(min(len(queries.ids), DEEP_RECALL_QUERIES)))
    return {f"recall@{k}": round(recall(index, few if k >= 100 else queries, k), 4) for k in ks}
