"""Seeded images for tests: photo-like pictures and the broken files corpora hold."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def photo_like(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """Smooth colour gradients, a few shapes and sensor-like noise: enough structure
    that different seeds give clearly different embeddings."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], -1)
    base += np.stack([np.cos(y * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], -1)
    pixels = ((base + 2) / 4 * 255).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(5, width // 2 + 6), y0 + rng.integers(5, height // 2 + 6)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def jpeg_bytes(seed: int, width: int = 320, height: int = 240) -> bytes:
    return encode(photo_like(seed, width, height), "JPEG", quality=90)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = jpeg_bytes(seed)
    return data[: len(data) // 2]


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header that promises a huge 1-bit image (a decompression bomb)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height."""
    import struct

    data = bytearray(encode(Image.new("RGB", (8, 8), (90, 90, 90)), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def ycck_jpeg() -> bytes:
    """A CMYK JPEG whose Adobe marker says YCCK (transform 2), as print workflows write."""
    data = bytearray(encode(Image.new("CMYK", (32, 32), (200, 30, 0, 10)), "JPEG", quality=95))
    adobe = data.index(b"Adobe")
    data[adobe + 11] = 2  # 'Adobe', version, flags0, flags1, then the transform byte
    return bytes(data)
