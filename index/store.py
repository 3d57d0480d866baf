"""An index directory on disk, and loading it back.

INDEX_DIR/index.faiss        the FAISS index (search parameters applied at load)
INDEX_DIR/ids.parquet        faiss_id -> id, uri, sha256 (never a pickle)
INDEX_DIR/manifest.json      model, preprocessing, dimension, metric, transform,
                             count, search parameters, the embeddings it holds
INDEX_DIR/report.json        why this index, recall, bytes, build time, latency
INDEX_DIR/duplicates.parquet near-duplicate clusters (rows in clusters of 2+)
"""

from __future__ import annotations

import dataclasses
import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgembed.index.faiss_index import set_search_params
from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import IndexInputError, Metric

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
DUPLICATES_FILE = "duplicates.parquet"
TRANSFORM_DIR = "transform"  # a copy of the tf.Transform graph, when the index has one
FORMAT_VERSION = 1

ID_COLUMNS = ("id", "uri", "sha256", "width", "height")
IDS_SCHEMA = pa.schema(
    [
        ("faiss_id", pa.int64()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def path(index_dir: str, name: str) -> str:
    return os.path.join(index_dir, name)


def write_json(index_dir: str, name: str, content: dict) -> None:
    with open(path(index_dir, name), "w") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")


def read_json(index_dir: str, name: str) -> dict:
    try:
        with open(path(index_dir, name)) as file:
            return json.load(file)
    except FileNotFoundError:
        raise IndexInputError(f"{index_dir} is not an index directory: no {name}") from None


def write_ids(sources: list[EmbeddingSource], index_dir: str) -> None:
    """The id map of every source in FAISS id order, streamed column by column."""
    temporary = path(index_dir, IDS_FILE + ".tmp")
    with pq.ParquetWriter(temporary, IDS_SCHEMA) as writer:
        for source in sources:
            for first_id, batch in source.record_batches(ID_COLUMNS):
                faiss_ids = pa.array(np.arange(first_id, first_id + batch.num_rows, dtype=np.int64))
                columns = [faiss_ids] + [batch.column(name) for name in ID_COLUMNS]
                writer.write_batch(pa.record_batch(columns, schema=IDS_SCHEMA))
    os.replace(temporary, path(index_dir, IDS_FILE))


@dataclasses.dataclass
class LoadedIndex:
    """An index directory, loaded for searching."""

    directory: str
    index: faiss.Index
    manifest: dict
    ids: pa.Table

    @property
    def metric(self) -> Metric:
        return Metric(self.manifest["metric"])

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def transform(self):
        """The tf.Transform graph raw embeddings go through before this index, or None."""
        if not self.manifest.get("transform"):
            return None
        from imgembed.transforms.embedding_transform import EmbeddingTransform

        return EmbeddingTransform(path(self.directory, self.manifest["transform"]["directory"]))

    def sources(self) -> list[EmbeddingSource]:
        """The embeddings the index holds, seen through its transform."""
        transform = self.transform()
        return [
            EmbeddingSource.from_files(part["files"]).with_transform(transform)
            for part in self.manifest["parts"]
        ]


def load(index_dir: str, mmap: bool = False) -> LoadedIndex:
    """Reads an index directory. ``mmap`` maps IVF lists and flat codes from the
    file instead of reading them, so they can exceed RAM and start-up is instant.
    The raw vectors that re-rank an ``ivf_pq_rflat`` index are always mapped:
    keeping them out of RAM is why that kind was chosen."""
    manifest = read_json(index_dir, MANIFEST_FILE)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexInputError(f"{index_dir}: index format {manifest.get('format_version')} is not supported")
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    elif manifest["index"]["kind"] == "ivf_pq_rflat":
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(path(index_dir, INDEX_FILE), flags)
    set_search_params(index, manifest["search_params"])
    ids = pq.read_table(path(index_dir, IDS_FILE))
    if ids.num_rows != index.ntotal:
        raise IndexInputError(f"{index_dir}: {ids.num_rows} ids for {index.ntotal} vectors")
    return LoadedIndex(index_dir, index, manifest, ids)
