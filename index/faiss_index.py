"""The few things we do to FAISS indexes that faiss does not do in one call.

Every vector's FAISS id is its global row number (see ``index/reader.py``).
IVF indexes store those ids; Flat and HNSW number vectors in insertion order,
so they must receive rows in id order; ``IndexRefine`` has no ``add_with_ids``,
so its two parts are filled separately, which is also what lets shards built on
different workers be merged back in id order.
"""

from __future__ import annotations

import faiss
import numpy as np

from imgembed.index.choose import IndexPlan
from imgembed.index.vectors import Metric


def new_index(plan: IndexPlan, dim: int, metric: Metric) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, metric.faiss_metric)
    if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ):
        # index_factory turns on polysemous training for PQ, which costs ~40 s
        # whatever the data size (5 s without); we never use polysemous search.
        faiss.downcast_index(index).do_polysemous_training = False
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, first_id: int, base_id: int = 0) -> None:
    """Adds prepared vectors whose FAISS ids are first_id, first_id + 1, ...

    ``base_id`` is the id of the index's first row: 0 for a whole index, the
    first id of its file for a shard that will be merged into a whole one.
    """
    concrete = faiss.downcast_index(index)
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    if isinstance(concrete, faiss.IndexRefine):
        _expect_next_id(concrete.refine_index, first_id - base_id)
        faiss.downcast_index(concrete.base_index).add_with_ids(vectors, ids)
        concrete.refine_index.add(vectors)
        concrete.ntotal = concrete.refine_index.ntotal
    elif isinstance(concrete, faiss.IndexIVF):
        concrete.add_with_ids(vectors, ids)
    else:
        _expect_next_id(concrete, first_id - base_id)
        concrete.add(vectors)


def merge_shard(index: faiss.Index, shard: faiss.Index) -> None:
    """Moves a shard built from a copy of the same trained index into ``index``.
    Shards must arrive in id order (refine codes and Flat rows are positional)."""
    concrete, other = faiss.downcast_index(index), faiss.downcast_index(shard)
    if isinstance(concrete, faiss.IndexRefine):
        faiss.downcast_index(concrete.base_index).merge_from(faiss.downcast_index(other.base_index), 0)
        # Append the refine codes as codes: merge_from demands the same C++ class,
        # and a deserialised IndexFlat comes back as IndexFlatIP or IndexFlatL2.
        refine_codes = faiss.vector_to_array(faiss.downcast_index(other.refine_index).codes)
        concrete.refine_index.add_sa_codes(refine_codes.reshape(other.ntotal, -1))
        concrete.ntotal = concrete.refine_index.ntotal
    elif isinstance(concrete, faiss.IndexHNSW):
        raise ValueError("HNSW graphs cannot be merged; HNSW indexes are built in one process")
    else:
        concrete.merge_from(other, 0)


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
