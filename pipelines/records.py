"""The rows the pipeline writes: embeddings and errors, and their Parquet schemas.

Every input becomes exactly one of them. ``id`` is derived from the input's URI,
so it is the same on every run and joins embeddings, errors and index results.

>>> image_id("gs://bucket/cat.jpg")
'9f4d3b6a...'
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa

# Where the error happened; with `reason` it says what to fix.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_INFERENCE = "inference"

# Parquet key-value metadata key holding the model and preprocessing as JSON.
METADATA_KEY = b"imgembed"

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        # The model an inference error belongs to; empty for read and decode errors,
        # which every model shares.
        ("model", pa.string()),
    ]
)


class ImageKey(NamedTuple):
    """What we know of an input besides its pixels; travels with them through inference."""

    id: str
    uri: str
    width: int
    height: int
    sha256: str
    thumbnail: bytes | None = None  # a small JPEG, when --thumbnail-size is set


def image_id(uri: str) -> str:
    # 128 bits: collisions stay negligible at billions of images.
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=16).hexdigest()


def error_row(uri: str, stage: str, reason: str, message: str, model: str | None = None) -> dict:
    return {
        "id": image_id(uri),
        "uri": uri,
        "stage": stage,
        "reason": reason,
        "message": message,
        "model": model,
    }


def embedding_schema(
    output_dim: int, metadata: dict, thumbnails: bool = False, top_k: bool = False
) -> pa.Schema:
    """Schema of ``embeddings-*.parquet``; ``metadata`` names model and preprocessing.
    Optional columns: ``thumbnail`` (JPEG bytes) when thumbnails were asked for;
    ``top_labels`` and ``top_scores`` (class names, probabilities) for classifiers."""
    fields = [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("embedding", pa.list_(pa.float32(), output_dim)),
    ]
    if thumbnails:
        fields.append(("thumbnail", pa.binary()))
    if top_k:
        fields += [("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def embedding_row(key: ImageKey, embedding: np.ndarray, top: tuple[list, list] | None = None) -> dict:
    row = key._asdict()
    if key.thumbnail is None:
        del row["thumbnail"]
    row["embedding"] = embedding
    if top is not None:
        row["top_labels"], row["top_scores"] = top
    return row


def read_metadata(schema: pa.Schema) -> dict:
    """The model and preprocessing an embeddings file was written with."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not an imgembed embeddings file: no imgembed metadata in its schema")
    return json.loads(raw)
