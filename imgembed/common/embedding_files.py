"""The files ``imgembed embed`` writes and ``imgembed index`` reads: their names under
``--output`` and their Parquet schemas. The one contract between the two; it imports
neither Beam nor TensorFlow, so the service can read embeddings without them.

Layout under ``--output DIR`` (KEY names an input shard under the run's settings)::

    DIR/<model-name>/embeddings-KEY.parquet   the shard's rows, one per embedded image
    DIR/errors-KEY.parquet                    the shard's inputs that failed, with reasons
    DIR/_shards/KEY.json                      written last: the shard is complete, and its counts
    DIR/run_summary.json                      the sum over the run's shards

``id`` is derived from the input's canonical URI (``storage.canonical``: the
absolute local path with links resolved, or the object-store URI as listed, then
``#record`` for a record of a container), so it is the same on every run however
the input pattern was typed, and joins embeddings, errors and index results:

>>> image_id("gs://bucket/cat.jpg")
'9f4d3b6a...'
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from imgembed.common.storage import join

PARQUET_SUFFIX = ".parquet"
SUMMARY_FILE = "run_summary.json"
# How ids are made: a 128-bit BLAKE2b of the canonical URI (part of a run's settings,
# so outputs of imgembed before 0.2, which hashed the URI as typed, are not mixed in).
ID_SCHEME = "blake2b-128(canonical uri)"
MARKERS = "_shards"
EMBEDDING_COLUMN = "embedding"
# Parquet key-value metadata key holding the model, preprocessing and backend as JSON.
METADATA_KEY = b"imgembed"

# Where an error happened; with `reason` it says what to fix.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_INFERENCE = "inference"

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


def embeddings_path(output_dir: str, model_name: str, key: str) -> str:
    return join(output_dir, model_name, f"embeddings-{key}{PARQUET_SUFFIX}")


def embeddings_glob(model_dir: str) -> str:
    """Every embeddings file of one model folder (``DIR/<model-name>``)."""
    return join(model_dir, f"embeddings-*{PARQUET_SUFFIX}")


def errors_path(output_dir: str, key: str) -> str:
    return join(output_dir, f"errors-{key}{PARQUET_SUFFIX}")


def errors_glob(output_dir: str) -> str:
    return join(output_dir, f"errors-*{PARQUET_SUFFIX}")


def marker_path(output_dir: str, key: str) -> str:
    return join(output_dir, MARKERS, f"{key}.json")


def markers_glob(output_dir: str) -> str:
    return join(output_dir, MARKERS, "*.json")


def key_of(path: str) -> str:
    """The shard key in an output file's name."""
    name = path.rsplit("/", 1)[-1].removesuffix(PARQUET_SUFFIX).removesuffix(".json")
    return name.removeprefix("embeddings-").removeprefix("errors-")


def image_id(uri: str) -> str:
    # 128 bits: collisions stay negligible at billions of images.
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=16).hexdigest()


def embedding_schema(
    output_dim: int, metadata: dict, thumbnails: bool = False, top_k: bool = False
) -> pa.Schema:
    """Schema of ``embeddings-*.parquet``; ``metadata`` names model, preprocessing and backend.
    Optional columns: ``thumbnail`` (JPEG bytes) when thumbnails were asked for;
    ``top_labels`` and ``top_scores`` (class names, probabilities) for classifiers."""
    fields = [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        # What the input's shard said about it, as JSON (img2dataset's key, url, caption...).
        ("metadata", pa.string()),
        (EMBEDDING_COLUMN, pa.list_(pa.float32(), output_dim)),
    ]
    if thumbnails:
        fields.append(("thumbnail", pa.binary()))
    if top_k:
        fields += [("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema) -> dict:
    """The model and preprocessing an embeddings file was written with."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not an imgembed embeddings file: no imgembed metadata in its schema")
    return json.loads(raw)


def made_with(metadata: dict) -> dict:
    """How an embeddings file's vectors were made, besides the model: what must match
    for files to share an index (its uploads are embedded one way)."""
    runtime = metadata.get("runtime")
    return {
        "preprocessing": metadata.get("preprocessing"),
        "backend": metadata.get("backend"),
        "precision": metadata.get("precision", "fp32"),
        # An int8 model is a quantization calibrated on one output's images.
        "int8 model": runtime.rsplit("/", 1)[-1] if runtime else None,
    }
