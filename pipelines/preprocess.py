"""Beam DoFn: (shard key, (uri, bytes)) -> ((shard key, ImageKey), {S: uint8 [S, S, 3]}),
or (shard key, error row).

Each image is decoded once and resized once per input size S the run's models
need. Pixels stay uint8 until the model handler: a quarter of the bytes of
float32 between stages.
"""

from __future__ import annotations

import hashlib
import io

import apache_beam as beam
from apache_beam.metrics import Metrics
from PIL import Image

from imgembed.common.embedding_files import STAGE_DECODE, image_id
from imgembed.pipelines.dead_letters import METRICS_NAMESPACE, keyed_dead_letter
from imgembed.pipelines.records import ImageKey
from imgembed.transforms.decode import DecodeLimits, ImageError, decode_image
from imgembed.transforms.resize import Preprocessing

# An exception we did not foresee; the message names its type.
DECODE_FAILED = "decode_failed"


# Thumbnails are for people looking at results, not for models: small and cheap.
THUMBNAIL_QUALITY = 80


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """A JPEG whose longer side is at most ``size`` pixels."""
    thumbnail = image.copy()
    thumbnail.thumbnail((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


class DecodeAndResize(beam.DoFn):
    def __init__(
        self,
        preprocessing: Preprocessing,
        image_sizes: tuple[int, ...],
        limits: DecodeLimits,
        thumbnail_size: int = 0,
    ):
        self._preprocessing = preprocessing
        self._image_sizes = image_sizes
        self._decode_side = preprocessing.decode_side(max(image_sizes))
        self._limits = limits
        self._thumbnail_size = thumbnail_size
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")

    def process(self, element):
        shard, (uri, data) = element
        try:
            image = decode_image(data, self._limits, self._decode_side)
            pixels = {size: self._preprocessing.apply(image, size) for size in self._image_sizes}
            thumbnail = make_thumbnail(image, self._thumbnail_size) if self._thumbnail_size else None
        except ImageError as error:
            return [keyed_dead_letter(shard, uri, STAGE_DECODE, error.reason, error.message)]
        except Exception as error:  # a decoder bug must cost one row, not the job
            message = f"{type(error).__name__}: {error}"
            return [keyed_dead_letter(shard, uri, STAGE_DECODE, DECODE_FAILED, message)]
        self._decoded.inc()
        width, height = image.info["original_size"]
        key = ImageKey(image_id(uri), uri, width, height, hashlib.sha256(data).hexdigest(), thumbnail)
        return [((shard, key), pixels)]
