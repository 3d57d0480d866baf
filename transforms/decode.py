"""Bytes of an image file -> an upright 8-bit RGB PIL image, or an ImageError.

Whatever the file holds (JPEG, PNG, GIF, WebP, BMP, TIFF; grayscale, 16-bit,
CMYK, palette, alpha; any EXIF orientation) the result is RGB as a viewer would
show it. Transparent areas are composited over white. Animated and multi-page
files give their first frame. Limits are checked from the header, before any
pixel is decoded, so a decompression bomb costs nothing.

>>> image = decode_image(open("cat.jpg", "rb").read(), DecodeLimits())
>>> image.mode
'RGB'
"""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit (DecodeLimits.max_pixels) before decoding;
# Pillow's global guard would otherwise raise or warn with its own threshold.
Image.MAX_IMAGE_PIXELS = None

# Short reason codes of the error rows. Each names one thing a user can fix.
EMPTY_FILE = "empty_file"
FILE_TOO_LARGE = "file_too_large"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated"
CORRUPT = "corrupt"

_SRGB = ImageCms.createProfile("sRGB")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


class ImageError(Exception):
    """An input that cannot become an image; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Inputs larger than these are refused with an error row, not decoded.

    The defaults admit a 100-megapixel photo (about 300 MB as RGB) and a
    64 MiB file; raise them for scans or medium-format cameras.
    """

    max_file_bytes: int = 64 * 2**20
    max_pixels: int = 100_000_000

    def __post_init__(self):
        if self.max_file_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"decode limits must be positive, got {self}")


def check_file_size(num_bytes: int, limits: DecodeLimits) -> None:
    """Refuses empty and oversized files before their bytes are read."""
    if num_bytes == 0:
        raise ImageError(EMPTY_FILE, "the file is empty (0 bytes)")
    if num_bytes > limits.max_file_bytes:
        raise ImageError(
            FILE_TOO_LARGE,
            f"{num_bytes} bytes is over the limit of {limits.max_file_bytes} (--max-file-bytes)",
        )


def decode_image(data: bytes, limits: DecodeLimits, min_side: int | None = None) -> Image.Image:
    """The upright RGB image; ``image.info["original_size"]`` is its full (width, height).

    With ``min_side``, a JPEG may be decoded at a reduced scale (its DCT scaling:
    1/2, 1/4 or 1/8) that still leaves at least ``min_side`` pixels on each side:
    a 12-megapixel photo bound for 224x224 costs a fraction of a full decode."""
    check_file_size(len(data), limits)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_TIFF_MAGIC):
            return _decode_scientific_tiff(data, limits)
        raise _unidentified(data) from None
    except _DECODER_ERRORS as error:  # a header cut short or damaged (a JPEG cut in its first bytes)
        raise _damaged(data, "image", error) from None
    _check_pixels(*image.size, limits)
    try:
        if image.format == "PNG":
            # Pillow skips the CRCs of pixel chunks when decoding; a bad one means
            # the bytes changed after writing, so check them all first.
            Image.open(io.BytesIO(data)).verify()
        with warnings.catch_warnings():
            # Pillow warns on odd but readable files (e.g. bad EXIF); they decode.
            warnings.simplefilter("ignore")
            full_size = image.size
            if min_side and image.format == "JPEG":
                image.draft(image.mode, (min_side, min_side))
            image.load()
            loaded_size = image.size
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright photo
            if image.size != loaded_size:  # rotated a quarter turn
                full_size = full_size[::-1]
            rgb = _to_rgb(image)
            rgb.info["original_size"] = full_size
            return rgb
    except _DECODER_ERRORS as error:
        raise _damaged(data, image.format, error) from None


# What Pillow's decoders raise on bytes that are not what their format says.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


def _damaged(data: bytes, kind: str | None, error: BaseException) -> ImageError:
    """Pillow reports a cut-off file as "truncated" or "not enough data", and a RIFF
    (WebP) file says its own length; the rest (bad CRC, broken Huffman tables, ...)
    is damage inside the file. The pipeline and the service name it alike."""
    text = str(error) or type(error).__name__
    riff_cut = data[:4] == b"RIFF" and len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 > len(data)
    if riff_cut or "truncated" in text.lower() or "not enough data" in text:
        return ImageError(TRUNCATED, f"{kind or 'image'} file is cut short: {text}")
    return ImageError(CORRUPT, f"{kind or 'image'} data is damaged: {text}")


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            TOO_MANY_PIXELS,
            f"{width}x{height} is over the limit of {limits.max_pixels} pixels (--max-image-pixels)",
        )


def _decode_scientific_tiff(data: bytes, limits: DecodeLimits) -> Image.Image:
    """TIFFs Pillow cannot open (float or planar samples, microscopy and remote
    sensing files) through tifffile: first page, scaled to 8 bits."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1
            _check_pixels(page.imagewidth, page.imagelength, limits)
            pixels = page.asarray()
    except ImageError:
        raise
    except Exception as error:  # tifffile raises many kinds on damaged files
        raise ImageError(CORRUPT, f"TIFF data is damaged: {error}") from None
    if planar:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise ImageError(
            UNSUPPORTED_FORMAT, f"TIFF with sample layout {pixels.shape} is not an image we can show"
        )
    pixels = _to_uint8(pixels[..., :3])
    image = Image.fromarray(np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels, "RGB")
    image.info["original_size"] = image.size
    return image


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Integer samples by their type's range; floats as [0, 1] unless they exceed it."""
    if np.issubdtype(pixels.dtype, np.integer):
        full_scale = float(np.iinfo(pixels.dtype).max)
    else:
        pixels = np.nan_to_num(pixels.astype(np.float64))
        full_scale = max(1.0, float(pixels.max()))
    return np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _unidentified(data: bytes) -> ImageError:
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return ImageError(UNSUPPORTED_FORMAT, "SVG vector images are not supported; rasterise them first")
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return ImageError(UNSUPPORTED_FORMAT, "HEIC/HEIF is not supported; convert to JPEG first")
    if data.startswith(b"%PDF"):
        return ImageError(UNSUPPORTED_FORMAT, "PDF documents are not supported; rasterise pages first")
    if head.startswith((b"<!doctype html", b"<html")):
        return ImageError(NOT_AN_IMAGE, "the file is an HTML page, not an image")
    return ImageError(NOT_AN_IMAGE, "no image format recognises these bytes")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_gray_to_rgb(image)
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert() always copies; most photos are RGB already.
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_gray_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255 (a white image);
    # scale the full range down instead.
    pixels = np.asarray(image)
    if image.mode == "I":  # 32-bit container, 16-bit PNG data
        pixels = pixels.clip(0, 65535).astype(np.uint16)
    return Image.fromarray(_to_uint8(pixels), "L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    # Print files carry an ICC profile; without it Pillow's naive formula is
    # the best we can do.
    icc = image.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB")
