"""Image bytes -> what the models need: each input size's uint8 pixels, and the
facts kept with the row (size, hash, thumbnail).

Each image is decoded once and resized once per input size S the run's models
need. Pixels stay uint8 until the model: a quarter of the bytes of float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
from PIL import Image

from imgembed.common.embedding_files import image_id
from imgembed.pipelines.records import ImageKey
from imgembed.transforms.decode import DecodeLimits, decode_image
from imgembed.transforms.resize import Preprocessing

# Thumbnails are for people looking at results, not for models: small and cheap.
THUMBNAIL_QUALITY = 80


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """A JPEG whose longer side is at most ``size`` pixels."""
    thumbnail = image.copy()
    thumbnail.thumbnail((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class ImagePreparer:
    """``prepare(uri, data, metadata)`` -> (ImageKey, {S: uint8 [S, S, 3]}), or ImageError."""

    preprocessing: Preprocessing
    image_sizes: tuple[int, ...]
    limits: DecodeLimits
    thumbnail_size: int = 0

    def prepare(self, uri: str, data: bytes, metadata: dict | None) -> tuple[ImageKey, dict[int, np.ndarray]]:
        decode_side = self.preprocessing.decode_side(max(self.image_sizes))
        image = decode_image(data, self.limits, decode_side)
        pixels = {size: self.preprocessing.apply(image, size) for size in self.image_sizes}
        thumbnail = make_thumbnail(image, self.thumbnail_size) if self.thumbnail_size else None
        width, height = image.info["original_size"]
        key = ImageKey(
            image_id(uri), uri, width, height, hashlib.sha256(data).hexdigest(), thumbnail, metadata
        )
        return key, pixels
