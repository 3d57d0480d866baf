"""The rows the pipeline writes: embeddings and errors (their schemas are in
imgembed/common/embedding_files.py). Every input becomes exactly one of them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from imgembed.common.embedding_files import image_id


class ImageKey(NamedTuple):
    """What we know of an input besides its pixels; travels with them through inference."""

    id: str
    uri: str
    width: int
    height: int
    sha256: str
    thumbnail: bytes | None = None  # a small JPEG, when --thumbnail-size is set


def error_row(uri: str, stage: str, reason: str, message: str, model: str | None = None) -> dict:
    return {
        "id": image_id(uri),
        "uri": uri,
        "stage": stage,
        "reason": reason,
        "message": message,
        "model": model,
    }


def embedding_row(key: ImageKey, embedding: np.ndarray, top: tuple[list, list] | None = None) -> dict:
    row = key._asdict()
    if key.thumbnail is None:
        del row["thumbnail"]
    row["embedding"] = embedding
    if top is not None:
        row["top_labels"], row["top_scores"] = top
    return row
