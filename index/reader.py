"""The Parquet output of ``imgembed embed`` for one model, read in bounded memory.

Rows get FAISS ids in a fixed order: files sorted by path, rows in file order,
numbered from 0. Each file's first id comes from Parquet footers alone, so any
worker can number the rows of any file without seeing the others.

>>> source = EmbeddingSource("out/mobilenet_v1_100_224_embedded")
>>> for first_id, vectors in source.vector_batches(): ...
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgembed.common import storage
from imgembed.common.embedding_files import (
    EMBEDDING_COLUMN,
    METADATA_KEY,
    PARQUET_SUFFIX,
    embeddings_glob,
    made_with,
    read_metadata,
)
from imgembed.common.storage import list_files
from imgembed.index.vectors import IndexInputError

# Rows per batch read: 65536 x 1024 floats is 256 MiB at most.
BATCH_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class EmbeddingFile:
    path: str
    num_rows: int
    first_id: int


def vectors_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The embedding column as a float32 [rows, d] array, without a per-row loop."""
    column = batch.column(EMBEDDING_COLUMN)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise IndexInputError(f"{column.null_count} rows have no embedding")
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


class EmbeddingSource:
    """Every ``embeddings-*.parquet`` file of one model folder (local or cloud)."""

    def __init__(self, folders: str | Sequence[str], first_id: int = 0, skip_paths: Sequence[str] = ()):
        """All embedding files under ``folders`` except ``skip_paths``, numbered from ``first_id``."""
        folders = [folders] if isinstance(folders, str) else list(folders)
        folders = [storage.canonical(folder.rstrip("/")) for folder in folders]
        paths = [
            p for folder in folders for p in list_files(embeddings_glob(folder)) if p not in set(skip_paths)
        ]
        if not paths and not skip_paths:
            raise IndexInputError(
                f"no embeddings-*{PARQUET_SUFFIX} under {', '.join(folders)}: expected the folder "
                "`imgembed embed` writes for one model, e.g. out/mobilenet_v1_100_224_embedded"
            )
        self._init_files(sorted(paths), first_id, where=", ".join(folders))

    @classmethod
    def from_paths(cls, paths: Sequence[str], first_id: int = 0) -> EmbeddingSource:
        """These embedding files (none: an empty source), numbered from ``first_id``."""
        source = cls.__new__(cls)
        source._init_files(list(paths), first_id, "the files given")
        return source

    @classmethod
    def from_files(cls, files: Sequence[dict | EmbeddingFile]) -> EmbeddingSource:
        """The files an index was built from, as its manifest lists them; refuses
        files that changed since (their rows would no longer match the ids)."""
        files = [EmbeddingFile(**f) if isinstance(f, dict) else f for f in files]
        source = cls.__new__(cls)
        source._init_files([f.path for f in files], files[0].first_id if files else 0, "the manifest")
        for recorded, found in zip(files, source.files, strict=True):
            if recorded != found:
                raise IndexInputError(
                    f"{recorded.path} changed since the index was built ({recorded.num_rows} rows "
                    f"then, {found.num_rows} now); rebuild the index"
                )
        return source

    def _init_files(self, paths: Sequence[str], first_id: int, where: str) -> None:
        self.files: list[EmbeddingFile] = []
        self.metadata: dict | None = None
        self.columns: list[str] = []  # those of the first file
        self.raw_dim: int | None = None
        self.transform = None
        self.progress = None
        next_id = first_id
        for path in paths:
            schema, num_rows = _footer(path)
            self._check_consistent(path, schema)
            self.files.append(EmbeddingFile(path, num_rows, next_id))
            next_id += num_rows
        self.first_id = first_id
        self.count = next_id - first_id
        if self.files and self.count == 0:
            raise IndexInputError(f"the embeddings in {where} hold no rows")

    def _check_consistent(self, path: str, schema: pa.Schema) -> None:
        field = schema.field(EMBEDDING_COLUMN) if EMBEDDING_COLUMN in schema.names else None
        if field is None or not pa.types.is_fixed_size_list(field.type):
            raise IndexInputError(f"{path} has no fixed-size `embedding` column; is it an imgembed file?")
        missing = [name for name in ("id", "uri") if name not in schema.names]
        if missing:
            raise IndexInputError(
                f"{path} has no {', '.join(missing)} column: every row needs its id and uri"
            )
        # Files of another tool (id, uri and embedding alone) name no model: image search is then off.
        metadata = read_metadata(schema) if METADATA_KEY in (schema.metadata or {}) else {}
        if self.raw_dim is None:
            self.raw_dim, self.metadata, self.columns = field.type.list_size, metadata, schema.names
        elif field.type.list_size != self.raw_dim:
            raise IndexInputError(
                f"mixed dimensions: {path} has {field.type.list_size}-d embeddings, "
                f"{self.files[0].path} has {self.raw_dim}-d; index one model at a time"
            )
        elif _model_name(metadata) != _model_name(self.metadata):
            raise IndexInputError(
                f"mixed models: {path} was made by {_model_name(metadata)}, "
                f"{self.files[0].path} by {_model_name(self.metadata)}"
            )
        else:
            mine, first = made_with(metadata), made_with(self.metadata)
            for what, value in mine.items():
                if value != first[what]:
                    raise IndexInputError(
                        f"mixed {what}: {path} was embedded with {value}, {self.files[0].path} "
                        f"with {first[what]}; one index holds embeddings made one way"
                    )

    def record_batches(
        self, columns: Sequence[str], files: Sequence[EmbeddingFile] | None = None
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first FAISS id of the batch, batch) over the chosen files, in id order."""
        for file in self.files if files is None else files:
            next_id = file.first_id
            with storage.open_file(file.path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(
                    batch_size=BATCH_ROWS, columns=list(columns)
                ):
                    yield next_id, batch
                    next_id += batch.num_rows

    @property
    def dim(self) -> int | None:
        """Width of the vectors this source yields: the transform's output, if any."""
        return self.transform.output_dim if self.transform is not None else self.raw_dim

    def reporting(self, phase) -> EmbeddingSource:
        """The same rows; each batch read advances ``phase`` (imgembed/common/progress.py)."""
        reporting = copy.copy(self)
        reporting.progress = phase
        return reporting

    def with_transform(self, transform) -> EmbeddingSource:
        """The same rows, each batch passed through ``transform`` (raw [N, d] -> [N, k])."""
        transformed = copy.copy(self)
        transformed.transform = transform
        return transformed

    def vector_batches(
        self, files: Sequence[EmbeddingFile] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        for first_id, batch in self.record_batches([EMBEDDING_COLUMN], files):
            vectors = vectors_of(batch)
            yield first_id, vectors if self.transform is None else self.transform(vectors)
            if self.progress is not None:
                self.progress.advance(len(vectors))

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The vectors with these FAISS ids (sorted or not), reading only the files that hold them."""
        ids = np.asarray(ids, dtype=np.int64)
        result = np.empty((len(ids), self.dim), np.float32)
        order = np.argsort(ids)
        sorted_ids = ids[order]
        for file in self.files:
            lo, hi = np.searchsorted(sorted_ids, [file.first_id, file.first_id + file.num_rows])
            if lo == hi:
                continue
            for first_id, vectors in self.reporting(None).vector_batches([file]):
                in_batch = sorted_ids[lo:hi] - first_id
                keep = (in_batch >= 0) & (in_batch < len(vectors))
                result[order[lo:hi][keep]] = vectors[in_batch[keep]]
        return result

    def sample_ids(self, size: int, rng: np.random.Generator) -> np.ndarray:
        size = min(size, self.count)
        return np.sort(rng.choice(self.count, size=size, replace=False)) + self.first_id


def _model_name(metadata: dict) -> str | None:
    return metadata.get("model", {}).get("name")


def _footer(path: str) -> tuple[pa.Schema, int]:
    with storage.open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.schema_arrow, parquet.metadata.num_rows
