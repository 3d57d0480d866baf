"""The rows a shard writes: one embedding row per image per model, or one error row
per failed input (their schemas are in imgembed/common/embedding_files.py)."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from imgembed.common.embedding_files import EMBEDDING_COLUMN, ERROR_SCHEMA, image_id


class ImageKey(NamedTuple):
    """What we know of an input besides its pixels; travels with them to the model."""

    id: str
    uri: str
    width: int
    height: int
    sha256: str
    thumbnail: bytes | None = None  # a small JPEG, when --thumbnail-size is set
    metadata: dict | None = None  # what the input's shard says about it (url, caption...)


def error_row(uri: str, stage: str, reason: str, message: str, model: str | None = None) -> dict:
    return {
        "id": image_id(uri),
        "uri": uri,
        "stage": stage,
        "reason": reason,
        "message": message,
        "model": model,
    }


def errors_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


class Rows:
    """One model's rows of a shard, kept as columns: a shard of 10,000 images holds
    one float32 array of vectors, not 10,000 Python lists."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._columns: dict[str, list] = {name: [] for name in schema.names}

    def __len__(self) -> int:
        return len(self._columns["id"])

    def add(self, key: ImageKey, vector: np.ndarray, top: tuple[list, list] | None = None) -> None:
        values = key._asdict() | {EMBEDDING_COLUMN: vector}
        values["metadata"] = json.dumps(key.metadata, sort_keys=True) if key.metadata else None
        if top is not None:
            values["top_labels"], values["top_scores"] = top
        for name, column in self._columns.items():
            column.append(values[name])

    def table(self) -> pa.Table:
        columns = []
        for field in self.schema:
            values = self._columns[field.name]
            if field.name == EMBEDDING_COLUMN:
                width = field.type.list_size
                flat = np.asarray(values, np.float32).reshape(-1) if values else np.zeros(0, np.float32)
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), width))
            else:
                columns.append(pa.array(values, field.type))
        return pa.Table.from_arrays(columns, schema=self.schema)
