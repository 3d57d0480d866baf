"""The raw vectors of an ``ivf_pq_rflat`` index go to disk as they are added.

That kind is chosen when the raw vectors do not fit the memory budget, so the
build must not hold them either: ``RefineVectors`` appends each batch of them to
a local file while the product codes fill the in-RAM base index, and
``write_index`` then writes index.faiss exactly as ``faiss.write_index`` writes
an ``IndexRefineFlat`` (a test compares the bytes), copying the vectors from that
file in chunks. Searching it memory-maps them (IO_FLAG_MMAP_IFC), so only the
rows that re-rank a query are ever read.

faiss's layout (impl/index_write.cpp): "IxRF", the index header, the base index,
the refine IndexFlat ("IxFI" for inner product, "IxF2" for L2: its header, then
its codes as a vector: a uint64 count of 4-byte words and the bytes), then
k_factor as a float32. The header: d (int32), ntotal (int64), two unused int64
(1 << 20), is_trained (uint8), metric_type (int32).
"""

from __future__ import annotations

import os
import shutil
import struct

import faiss
import numpy as np

COPY_CHUNK = 64 * 2**20
_UNUSED = 1 << 20


def _header(d: int, ntotal: int, metric_type: int) -> bytes:
    return struct.pack("<iqqqBi", d, ntotal, _UNUSED, _UNUSED, 1, metric_type)


class RefineVectors:
    """The refine part of an IndexRefineFlat being filled, on disk."""

    def __init__(self, index: faiss.Index, folder: str):
        refine = faiss.downcast_index(faiss.downcast_index(index).refine_index)
        if not isinstance(refine, faiss.IndexFlat):
            raise TypeError(f"re-ranking by {type(refine).__name__} is not written to disk")
        self.dim, self.metric_type = refine.d, refine.metric_type
        self.path = os.path.join(folder, "refine-vectors.tmp")
        self._file = open(self.path, "wb")  # noqa: SIM115 (appended to until write_index)
        self.ntotal = 0  # named as faiss names it: the rows held

    def append(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] vectors, got {vectors.shape}")
        self._file.write(vectors.tobytes())
        self.ntotal += len(vectors)

    def append_from(self, path: str, count: int, ranges: list[tuple[int, int]] | None = None) -> None:
        """The refine vectors of an index file written by ``write_index`` (an index
        being extended keeps its rows), copied without reading them into RAM:
        all ``count`` of them, or the rows of the [start, stop) ``ranges``."""
        row_bytes = self.dim * 4
        start_of_vectors = os.path.getsize(path) - 4 - count * row_bytes
        with open(path, "rb") as source:
            for start, stop in ranges if ranges is not None else [(0, count)]:
                source.seek(start_of_vectors + start * row_bytes)
                remaining = (stop - start) * row_bytes
                while remaining:
                    chunk = source.read(min(COPY_CHUNK, remaining))
                    self._file.write(chunk)
                    remaining -= len(chunk)
                self.ntotal += stop - start

    def write_index(self, base: faiss.Index, k_factor: float, path: str) -> None:
        """index.faiss of the IndexRefineFlat ``base`` + these vectors; the
        temporary file goes."""
        if base.ntotal != self.ntotal:
            raise ValueError(f"the base index holds {base.ntotal} rows, the refine file {self.ntotal}")
        self._file.close()
        flat_tag = b"IxFI" if self.metric_type == faiss.METRIC_INNER_PRODUCT else b"IxF2"
        with open(path, "wb") as out:
            out.write(b"IxRF" + _header(self.dim, self.ntotal, self.metric_type))
            out.write(faiss.serialize_index(base).tobytes())
            out.write(flat_tag + _header(self.dim, self.ntotal, self.metric_type))
            out.write(struct.pack("<Q", self.ntotal * self.dim))
            with open(self.path, "rb") as vectors:
                shutil.copyfileobj(vectors, out, COPY_CHUNK)
            out.write(struct.pack("<f", k_factor))
        os.remove(self.path)

    def discard(self) -> None:
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)
