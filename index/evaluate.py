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
# Queries searched at once when measuring recall (100 x k 101 x k_factor 64 reads
# 650k re-ranking rows at most before their pages are given back).
SEARCH_BATCH = 100


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


def search(index: faiss.Index, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search in batches, giving back the pages of mapped files each batch
    read (index/mapped_pages.py), so measuring never piles a whole file into RSS."""
    scores, found = [], []
    for start in range(0, len(vectors), SEARCH_BATCH):
        batch_scores, batch_found = index.search(vectors[start : start + SEARCH_BATCH], k)
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
    """One query at a time (p50, p99 in ms) and all at once (queries per second)."""
    timings = []
    for vector in queries.vectors[:LATENCY_QUERIES]:
        started = time.perf_counter()
        index.search(vector[None], k)
        timings.append((time.perf_counter() - started) * 1000)
    mapped_pages.release()
    started = time.perf_counter()
    index.search(queries.vectors, k)
    batch_seconds = time.perf_counter() - started
    mapped_pages.release()
    return {
        "single_query_p50_ms": round(float(np.percentile(timings, 50)), 3),
        "single_query_p99_ms": round(float(np.percentile(timings, 99)), 3),
        "batch_qps": round(len(queries.vectors) / max(batch_seconds, 1e-9), 1),
        "batch_size": len(queries.vectors),
    }


def recall_report(index: faiss.Index, queries: QuerySet, count: int) -> dict:
    """recall@1/10/100 where the corpus has that many other rows (and recall@(n-1)
    for a corpus of n < 11, where 10 neighbours do not exist)."""
    ks = sorted({k for k in RECALL_KS if k < count} | {min(10, count - 1)})
    return {f"recall@{k}": round(recall(index, queries, k), 4) for k in ks}
