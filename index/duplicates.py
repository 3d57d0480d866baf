"""Near-duplicate clusters, so that search results can collapse copies of one image.

Two rows are linked when their files have the same sha256 (exact copies), or when
the index finds them within ``threshold`` cosine similarity of each other (resized,
recompressed or lightly edited copies). Clusters are the connected components of
those links; each is named by its smallest FAISS id. Only rows in clusters of two
or more are written; a row that is absent is its own cluster.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import Metric, prepare

# Neighbours looked at per row; larger clusters still join through their members.
NEIGHBOURS = 10
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
    """Links every row to the first row with the same file hash."""
    table = pa.table({"sha256": hashes, "faiss_id": pa.array(np.arange(len(hashes), dtype=np.int64))})
    groups = table.group_by("sha256").aggregate([("faiss_id", "list")]).column("faiss_id_list").to_pylist()
    pairs = [(members[0], other) for members in groups if len(members) > 1 for other in members[1:]]
    pairs_array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return pairs_array[:, 0], pairs_array[:, 1]


def near_duplicate_links(
    index: faiss.Index, sources: list[EmbeddingSource], metric: Metric, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    left, right = [], []
    for source in sources:
        for first_id, vectors in source.vector_batches():
            scores, found = index.search(prepare(vectors, metric), NEIGHBOURS + 1)
            own = np.arange(first_id, first_id + len(vectors))[:, None]
            linked = (scores >= threshold) & (found >= 0) & (found != own)
            left.append(np.broadcast_to(own, found.shape)[linked])
            right.append(found[linked])
    return np.concatenate(left or [np.empty(0, np.int64)]), np.concatenate(right or [np.empty(0, np.int64)])


def write_duplicates(
    index: faiss.Index,
    sources: list[EmbeddingSource],
    items: pa.Table,
    metric: Metric,
    threshold: float | None,
    path: str,
) -> tuple[dict, np.ndarray]:
    """Writes the clusters of two or more to ``path``; returns the summary and every
    row's cluster (its smallest FAISS id; its own id when it is in none)."""
    count = items.num_rows
    exact_left, exact_right = exact_duplicate_links(items.column("sha256"))
    left, right = [exact_left], [exact_right]
    if threshold is not None:
        near_left, near_right = near_duplicate_links(index, sources, metric, threshold)
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

    table = pa.table(
        {
            "faiss_id": clustered,
            "id": items.column("id").take(clustered),
            "cluster_id": first_member[component[clustered]],
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
    return summary, first_member[component]
