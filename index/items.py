"""What an index knows about each item besides its vector, kept on disk and
memory-mapped: no per-item Python object, so a service holds 100M items in the RAM
their lookups touch.

    items.arrow      Arrow IPC, row i = FAISS id i: id, uri, sha256, width, height,
                     source (the container a record came from, or a file's folder),
                     metadata (JSON, as the embed job kept it) and one string column
                     per metadata field ("meta.caption"...), for filters
    id_keys.npy      the first 64 bits of every id, sorted      } id -> FAISS id by
    id_rows.npy      the FAISS id of each key, in that order    } binary search
    clusters.npy     each row's near-duplicate cluster (its smallest FAISS id)
    cluster_sizes.npy  the size of each row's cluster
    thumbnails.arrow   each item's JPEG thumbnail, when the embeddings hold them
                       (a version is self-contained: it never reads the embeddings
                       files, which a later embed run may replace)

>>> items = Items.open("out/index/v20261203T101500-3f2a1c")
>>> items.row_of("9f4d3b6a...")
42
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import IndexInputError

ITEMS_FILE = "items.arrow"
ID_KEYS_FILE = "id_keys.npy"
ID_ROWS_FILE = "id_rows.npy"
CLUSTERS_FILE = "clusters.npy"
CLUSTER_SIZES_FILE = "cluster_sizes.npy"
THUMBNAILS_FILE = "thumbnails.arrow"
THUMBNAIL_COLUMN = "thumbnail"
SOURCE_FIELD = "source"
METADATA_PREFIX = "meta."
# Metadata fields kept as columns for filters, the most common first (img2dataset
# writes a dozen; a corpus with thousands of distinct keys keeps only these).
MAX_FILTER_FIELDS = 32
# Filters asked for recently keep their matching rows (a bitmap, n / 8 bytes each).
CACHED_FILTERS = 16
EMBEDDING_COLUMNS = ("id", "uri", "sha256", "width", "height", "metadata")
# What any tool's embeddings must hold; the rest of EMBEDDING_COLUMNS is left empty when missing.
REQUIRED_COLUMNS = ("id", "uri")
BASE_SCHEMA = [
    ("id", pa.string()),
    ("uri", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    (SOURCE_FIELD, pa.string()),
    ("metadata", pa.string()),
]


def source_of(uri: str) -> str:
    """The shard an input came from: a container for its records, else its folder."""
    if "#" in uri:
        return uri.split("#", 1)[0]
    return uri.rsplit("/", 1)[0] if "/" in uri else ""


def id_keys(ids: pa.Array) -> np.ndarray:
    """The first 64 bits of 128-bit hex ids, as unsigned integers."""
    prefixes = pc.utf8_slice_codeunits(ids, 0, 16).to_pylist()
    return np.frombuffer(bytes.fromhex("".join(prefixes)), dtype=">u8").astype(np.uint64)


def _metadata_fields(sources: list[EmbeddingSource]) -> list[str]:
    """The metadata keys of the corpus, the most common first (one pass over the
    metadata column alone)."""
    counts: dict[str, int] = {}
    for source in sources:
        if "metadata" not in source.columns:
            continue
        for _, batch in source.record_batches(["metadata"]):
            for text in batch.column(0).drop_null().to_pylist():
                for key in json.loads(text):
                    counts[key] = counts.get(key, 0) + 1
    return sorted(counts, key=lambda key: (-counts[key], key))[:MAX_FILTER_FIELDS]


def row_number_type(count: int) -> type:
    """The narrowest type for row numbers of ``count`` rows: these files are mapped by
    every worker, and their pages that lookups touch are memory the service holds
    (4 bytes a row up to 4 billion rows, not 8)."""
    return np.uint32 if count <= np.iinfo(np.uint32).max + 1 else np.int64


def write_items(sources: list[EmbeddingSource], version_dir: str) -> dict:
    """items.arrow, thumbnails.arrow (when any source has thumbnails) and the id
    lookup of every source in FAISS id order, streamed. Columns other than id and uri
    are optional: rows of files without them get empty values."""
    for source in sources:
        missing = [name for name in REQUIRED_COLUMNS if name not in source.columns]
        if missing:
            raise IndexInputError(f"{source.files[0].path} has no {', '.join(missing)} column")
    fields = _metadata_fields(sources)
    schema = pa.schema(BASE_SCHEMA + [(METADATA_PREFIX + field, pa.string()) for field in fields])
    thumbnails = any(THUMBNAIL_COLUMN in source.columns for source in sources)
    keys = []
    with contextlib.ExitStack() as files:
        writer = files.enter_context(
            pa.ipc.new_file(files.enter_context(_sink(version_dir, ITEMS_FILE)), schema)
        )
        if thumbnails:
            thumbnail_schema = pa.schema([(THUMBNAIL_COLUMN, pa.binary())])
            thumbnail_writer = files.enter_context(
                pa.ipc.new_file(files.enter_context(_sink(version_dir, THUMBNAILS_FILE)), thumbnail_schema)
            )
        for source in sources:
            present = [name for name in (*EMBEDDING_COLUMNS, THUMBNAIL_COLUMN) if name in source.columns]
            for _, batch in source.record_batches(present):
                column = dict(zip(present, batch.columns, strict=True))
                empty = pa.nulls(batch.num_rows, pa.string())
                metadata = column.get("metadata", empty)
                parsed = [json.loads(text) if text else {} for text in metadata.to_pylist()]
                columns = [
                    column[name] if name in column else pa.nulls(batch.num_rows, kind)
                    for name, kind in BASE_SCHEMA[:5]
                ]
                columns += [
                    pc.cast(pa.array([source_of(uri) for uri in column["uri"].to_pylist()]), pa.string())
                ]
                columns += [pc.cast(metadata, pa.string())]
                columns += [
                    pa.array([None if field not in row else str(row[field]) for row in parsed], pa.string())
                    for field in fields
                ]
                writer.write_batch(pa.record_batch(columns, schema=schema))
                if thumbnails:
                    images = column.get(THUMBNAIL_COLUMN, pa.nulls(batch.num_rows, pa.binary()))
                    thumbnail_writer.write_batch(pa.record_batch([images], schema=thumbnail_schema))
                keys.append(id_keys(column["id"]))
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    order = np.argsort(all_keys, kind="stable")
    np.save(os.path.join(version_dir, ID_KEYS_FILE), all_keys[order])
    np.save(os.path.join(version_dir, ID_ROWS_FILE), order.astype(row_number_type(len(order))))
    return {"filter_fields": [SOURCE_FIELD, *fields]}


def _sink(version_dir: str, name: str) -> pa.OSFile:
    return pa.OSFile(os.path.join(version_dir, name), "wb")


def write_clusters(version_dir: str, cluster_of: np.ndarray) -> None:
    """Each row's cluster (its smallest member) and the cluster's size."""
    sizes = np.bincount(cluster_of, minlength=len(cluster_of)).astype(np.int32)
    np.save(os.path.join(version_dir, CLUSTERS_FILE), cluster_of.astype(row_number_type(len(cluster_of))))
    np.save(os.path.join(version_dir, CLUSTER_SIZES_FILE), sizes[cluster_of])


class _MappedColumn:
    """One column of one memory-mapped batch, read one value at a time through numpy
    views of its Arrow buffers: an Arrow scalar (``array[i].as_py()``) costs about
    3.5 us, a third of a by-id lookup's Python time for ten hits."""

    def __init__(self, array: pa.Array):
        self._array = array
        validity, *buffers = array.buffers()
        self._first = array.offset
        self._valid = np.frombuffer(validity, np.uint8) if array.null_count else None
        kind = array.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
            self._offsets = np.frombuffer(
                buffers[0], np.int64 if pa.types.is_large_string(kind) else np.int32
            )
            self._data = memoryview(buffers[1]) if buffers[1] is not None else memoryview(b"")
            self._read = self._bytes if pa.types.is_binary(kind) else self._string
        elif pa.types.is_integer(kind):
            self._values = np.frombuffer(buffers[0], kind.to_pandas_dtype())
            self._read = lambda at: int(self._values[at])
        else:
            self._read = lambda at: self._array[at - self._first].as_py()

    def _string(self, at: int) -> str:
        return str(self._data[self._offsets[at] : self._offsets[at + 1]], "utf-8")

    def _bytes(self, at: int) -> bytes:
        return bytes(self._data[self._offsets[at] : self._offsets[at + 1]])

    def __getitem__(self, row: int):
        at = row + self._first
        if self._valid is not None and not (self._valid[at >> 3] >> (at & 7)) & 1:
            return None
        return self._read(at)


def _mapped(path: str) -> np.ndarray:
    """A .npy file memory-mapped, as a plain ndarray: indexing numpy's memmap
    subclass costs a Python-level __array_finalize__ per result (12% of a by-id
    request's Python time under load)."""
    return np.asarray(np.load(path, mmap_mode="r"))


class _MappedBatches:
    """The record batches of an Arrow IPC file, memory-mapped (zero-copy: every
    batch's columns point into the map), read a value at a time. A file that does
    not exist holds no rows (an index without thumbnails)."""

    def __init__(self, path: str):
        self.batches: list[pa.RecordBatch] = []
        self.schema = None
        if os.path.exists(path):
            reader = pa.ipc.open_file(pa.memory_map(path))
            self.batches = [reader.get_batch(number) for number in range(reader.num_record_batches)]
            self.schema = reader.schema
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        self.columns = [
            {name: _MappedColumn(batch.column(name)) for name in batch.schema.names} for batch in self.batches
        ]

    def value(self, row: int, name: str):
        number = int(np.searchsorted(self.starts, row, side="right")) - 1
        if not 0 <= number < len(self.columns):
            return None
        return self.columns[number][name][row - int(self.starts[number])]


class Items:
    """The items of one index version, memory-mapped; safe to share between threads."""

    def __init__(self, version_dir: str):
        mapped = _MappedBatches(os.path.join(version_dir, ITEMS_FILE))
        self._value = mapped.value
        self._starts, self._columns = mapped.starts, mapped.columns
        self.table = pa.Table.from_batches(mapped.batches, schema=mapped.schema)
        self._keys = _mapped(os.path.join(version_dir, ID_KEYS_FILE))
        self._rows = _mapped(os.path.join(version_dir, ID_ROWS_FILE))
        self._clusters = _mapped(os.path.join(version_dir, CLUSTERS_FILE))
        self._cluster_sizes = _mapped(os.path.join(version_dir, CLUSTER_SIZES_FILE))
        self.filter_fields = [SOURCE_FIELD] + [
            name.removeprefix(METADATA_PREFIX)
            for name in self.table.schema.names
            if name.startswith(METADATA_PREFIX)
        ]
        self._lock = threading.Lock()
        self._matching = functools.lru_cache(maxsize=CACHED_FILTERS)(self._matching_uncached)
        self._thumbnails = _MappedBatches(os.path.join(version_dir, THUMBNAILS_FILE))

    def thumbnail(self, row: int) -> bytes | None:
        """The item's stored JPEG thumbnail, or None."""
        return self._thumbnails.value(row, THUMBNAIL_COLUMN)

    def __len__(self) -> int:
        return self.table.num_rows

    def row_of(self, image_id: str) -> int | None:
        """The FAISS id of an image id, or None."""
        try:
            key = int(image_id[:16], 16)
        except ValueError:
            return None
        key = np.uint64(key)
        at = int(self._keys.searchsorted(key))
        while at < len(self._keys) and self._keys[at] == key:  # once, unless 64-bit prefixes collide
            row = int(self._rows[at])
            if self._value(row, "id") == image_id:
                return row
            at += 1
        return None

    def cluster(self, row: int) -> tuple[int, int]:
        return int(self._clusters[row]), int(self._cluster_sizes[row])

    def clusters(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._clusters[rows])

    def describe(self, rows: list[int], columns: tuple[str, ...]) -> list[dict]:
        """The chosen columns of these rows (metadata parsed from its JSON). Each row is
        taken from its own batch: a take on the whole (chunked) table would join its
        chunks first, a copy of every row for each request."""
        numbers = np.searchsorted(self._starts, rows, side="right") - 1
        taken = []
        for row, number in zip(rows, numbers.tolist(), strict=True):
            batch, offset = self._columns[number], row - int(self._starts[number])
            taken.append({name: batch[name][offset] for name in columns})
        for row in taken:
            if "metadata" in row:
                row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else {}
        return taken

    def matching(self, filters: dict[str, str]) -> np.ndarray:
        """The FAISS ids of the rows whose fields equal the filter's values, sorted."""
        return self._matching(tuple(sorted(filters.items())))

    def _matching_uncached(self, filters: tuple[tuple[str, str], ...]) -> np.ndarray:
        mask = None
        for field, value in filters:
            name = field if field == SOURCE_FIELD else METADATA_PREFIX + field
            equal = pc.fill_null(pc.equal(self.table.column(name), pa.scalar(str(value))), False)
            mask = equal if mask is None else pc.and_(mask, equal)
        return np.flatnonzero(np.asarray(mask)) if mask is not None else np.arange(len(self))
