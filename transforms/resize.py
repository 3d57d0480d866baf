"""An RGB image -> the model's square input, as uint8 [S, S, 3].

Three ways to fit a photo into a square, chosen with ``--resize``:
- ``crop``: cut the largest centred square, then resize it (keeps aspect, loses edges);
- ``squash``: resize the whole image to the square (keeps everything, distorts);
- ``pad``: resize the whole image inside the square and fill the rest with grey
  (keeps everything and the aspect; "letterbox").
``central_fraction`` first keeps only the centre of the image (each side times the
fraction), as ImageNet evaluation does with 0.875.

Resampling is bilinear with Pillow's area-aware filter, so downscaling averages
all source pixels instead of sampling a few (no aliasing).

>>> Preprocessing(ResizeMode.CROP).apply(Image.new("RGB", (640, 480)), 224).shape
(224, 224, 3)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from imgembed.common.choices import Choice

# Grey 128 becomes ~0 after the [-1, 1] scaling MobileNet was trained with, so
# padding adds the least signal of any fill.
PAD_VALUE = 128


class ResizeMode(Choice):
    __flag__ = "--resize"

    CROP = "crop"
    SQUASH = "squash"
    PAD = "pad"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes model input; stored with every output."""

    mode: ResizeMode = ResizeMode.CROP
    central_fraction: float = 1.0
    # Let JPEGs decode at a reduced DCT scale that still covers the model's input.
    reduced_jpeg_decoding: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mode", ResizeMode.parse(self.mode))
        if not 0.0 < self.central_fraction <= 1.0:
            raise ValueError(f"central fraction must be in (0, 1], got {self.central_fraction}")

    def to_metadata(self) -> dict:
        return {
            "resize": self.mode.value,
            "central_fraction": self.central_fraction,
            "resample": "bilinear",
            "pad_value": PAD_VALUE,
            "input_range": "rgb/255 in [0, 1]",
            "reduced_jpeg_decoding": self.reduced_jpeg_decoding,
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> Preprocessing:
        return cls(
            ResizeMode.parse(metadata["resize"]),
            float(metadata["central_fraction"]),
            bool(metadata.get("reduced_jpeg_decoding", False)),
        )

    def decode_side(self, size: int) -> int | None:
        """The fewest pixels a side of the decoded image needs for an input of ``size``
        (None: decode at full size)."""
        if not self.reduced_jpeg_decoding:
            return None
        return math.ceil(size / self.central_fraction)

    def apply(self, image: Image.Image, size: int) -> np.ndarray:
        box = self._kept_box(*image.size)
        if box != (0, 0, *image.size):
            # Crop first: resizing with a box would blend in pixels outside it.
            image = image.crop(box)
        if self.mode is not ResizeMode.PAD:
            return np.asarray(image.resize((size, size), Image.BILINEAR))
        width, height = image.size
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
        canvas.paste(image.resize(inner, Image.BILINEAR), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return np.asarray(canvas)

    def _kept_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The centred pixels that survive; rounded like tf.image.central_crop."""
        kept_width = width - 2 * int((width - width * self.central_fraction) / 2)
        kept_height = height - 2 * int((height - height * self.central_fraction) / 2)
        if self.mode is ResizeMode.CROP:
            kept_width = kept_height = min(kept_width, kept_height)
        left, top = (width - kept_width) // 2, (height - kept_height) // 2
        return left, top, left + kept_width, top + kept_height
