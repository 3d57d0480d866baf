"""decode_image: every mode, orientation and format becomes upright RGB, or a
specific error reason."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from fixtures.images import encode, jpeg_bytes, photo_like, png_claiming_size, truncated_jpeg
from imgembed.transforms import decode
from imgembed.transforms.decode import DecodeLimits, ImageError, decode_image

LIMITS = DecodeLimits()
EXIF_ORIENTATION = 0x0112


def decoded_pixels(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    image = decode_image(data, limits)
    assert image.mode == "RGB"
    return np.asarray(image)


def reason_of(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, limits)
    return caught.value.reason


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "TGA"])
def test_common_formats_decode_to_rgb_of_the_same_size(format):
    pixels = decoded_pixels(encode(photo_like(1, 96, 64), format))
    assert pixels.shape == (64, 96, 3)


def test_lossless_png_keeps_exact_pixels():
    original = photo_like(2, 50, 40)
    assert np.array_equal(decoded_pixels(encode(original, "PNG")), np.asarray(original))


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    pixels = decoded_pixels(encode(gray, "PNG"))
    assert np.array_equal(pixels[..., 0], np.asarray(gray))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    mid_grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    pixels = decoded_pixels(encode(mid_grey, "PNG"))
    assert np.all(pixels == 128)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_composited_over_white(mode):
    image = Image.new(mode, (4, 4), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 255) if mode == "LA" else (0, 0, 0, 255))
    pixels = decoded_pixels(encode(image, "PNG"))
    assert tuple(pixels[0, 0]) == (0, 0, 0)  # opaque black stays black
    assert tuple(pixels[3, 3]) == (255, 255, 255)  # fully transparent becomes white


def test_palette_with_transparent_index_uses_white_there():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0] + [0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    pixels = decoded_pixels(encode(image, "PNG", transparency=1))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[1, 1]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb_colours():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    pixels = decoded_pixels(encode(cyan, "JPEG", quality=95)).astype(int)
    red, green, blue = pixels[8, 8]
    assert red < 40 and green > 215 and blue > 215


# Where the top-left stored pixel is shown for each EXIF orientation (EXIF 2.3, 4.6.4).
ORIENTATION_CORNER = {
    1: "top_left",
    2: "top_right",
    3: "bottom_right",
    4: "bottom_left",
    5: "top_left",
    6: "top_right",
    7: "bottom_right",
    8: "bottom_left",
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_CORNER))
def test_exif_orientation_is_applied(orientation):
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red marker in the stored top-left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    pixels = decoded_pixels(encode(stored, "PNG", exif=exif))
    assert pixels.shape[:2] == ((60, 30) if orientation >= 5 else (30, 60))
    height, width = pixels.shape[:2]
    corners = {
        "top_left": pixels[2, 2],
        "top_right": pixels[2, width - 3],
        "bottom_left": pixels[height - 3, 2],
        "bottom_right": pixels[height - 3, width - 3],
    }
    red = [name for name, rgb in corners.items() if tuple(rgb) == (255, 0, 0)]
    assert red == [ORIENTATION_CORNER[orientation]]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert tuple(decoded_pixels(buffer.getvalue())[4, 4]) == (255, 0, 0)


def test_multipage_tiff_gives_its_first_page():
    pages = [Image.new("RGB", (8, 8), colour) for colour in [(0, 255, 0), (255, 0, 0)]]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    assert tuple(decoded_pixels(buffer.getvalue())[4, 4]) == (0, 255, 0)


def test_float_planar_tiff_that_pillow_cannot_open_is_read_with_tifffile():
    planes = np.zeros((3, 6, 5), np.float64)
    planes[0] = 1.0  # red plane full
    planes[2] = 0.5
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, planes, photometric="rgb", planarconfig="separate")
    pixels = decoded_pixels(buffer.getvalue())
    assert pixels.shape == (6, 5, 3)
    assert tuple(pixels[0, 0]) == (255, 0, 128)


@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 3000)])
def test_extreme_aspect_ratios_decode(size):
    assert decoded_pixels(encode(Image.new("RGB", size, (9, 9, 9)), "PNG")).shape == (size[1], size[0], 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", decode.EMPTY_FILE),
        (truncated_jpeg(), decode.TRUNCATED),
        (encode(photo_like(3), "PNG")[:3000], decode.TRUNCATED),
        (b"just some text, saved as .jpg", decode.NOT_AN_IMAGE),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", decode.NOT_AN_IMAGE),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', decode.UNSUPPORTED_FORMAT),
        (b"%PDF-1.7\n...", decode.UNSUPPORTED_FORMAT),
        (b"\0\0\0\x18ftypheic" + b"\0" * 100, decode.UNSUPPORTED_FORMAT),
        (png_claiming_size(50_000, 50_000), decode.TOO_MANY_PIXELS),
    ],
    ids=["empty", "truncated-jpeg", "truncated-png", "text", "html", "svg", "pdf", "heic", "bomb"],
)
def test_bad_inputs_get_a_specific_reason(data, reason):
    assert reason_of(data) == reason


def test_png_with_a_bad_checksum_is_corrupt():
    png = encode(photo_like(4, 32, 32), "PNG")
    crc_at = png.index(b"IDAT") + 4 + struct.unpack(">I", png[png.index(b"IDAT") - 4 : png.index(b"IDAT")])[0]
    damaged = png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1 :]
    assert reason_of(damaged) == decode.CORRUPT


def test_damaged_jpeg_data_is_corrupt():
    data = bytearray(jpeg_bytes(5))
    middle = len(data) // 2
    data[middle : middle + 300] = b"\xff" * 300
    assert reason_of(bytes(data)) == decode.CORRUPT


def test_limits_are_enforced_from_the_header():
    data = encode(photo_like(6, 200, 100), "PNG")
    assert reason_of(data, DecodeLimits(max_pixels=200 * 100 - 1)) == decode.TOO_MANY_PIXELS
    assert reason_of(data, DecodeLimits(max_file_bytes=len(data) - 1)) == decode.FILE_TOO_LARGE
    assert decoded_pixels(data, DecodeLimits(max_pixels=200 * 100, max_file_bytes=len(data))).shape == (
        100,
        200,
        3,
    )


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        DecodeLimits(max_pixels=0)


def test_big_jpegs_decode_at_a_reduced_scale_that_still_covers_the_input():
    data = encode(photo_like(8, 4000, 3000), "JPEG", quality=85)
    image = decode_image(data, LIMITS, min_side=224)
    assert image.info["original_size"] == (4000, 3000)
    assert 224 <= min(image.size) < 3000 / 4  # 1/8 scale: 500x375
    full = decode_image(data, LIMITS)
    assert full.size == full.info["original_size"] == (4000, 3000)


def test_original_size_is_upright_after_a_quarter_turn():
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = encode(photo_like(9, 800, 400), "JPEG", exif=exif)
    image = decode_image(data, LIMITS, min_side=100)
    assert image.info["original_size"] == (400, 800)
    assert image.size[0] < image.size[1]


def test_non_jpeg_formats_ignore_the_reduced_scale():
    image = decode_image(encode(photo_like(10, 900, 600), "PNG"), LIMITS, min_side=100)
    assert image.size == image.info["original_size"] == (900, 600)


SWEEP_FORMATS = {
    "JPEG": {"quality": 90},
    "PNG": {},
    "WEBP": {"quality": 80},
    "BMP": {},
    "GIF": {},
    "TIFF": {},
}
CUTS = 17


def truncation_sweep() -> list[tuple[str, int, bytes]]:
    """(format, cut, the file cut there): each format cut at 17 points spread over it."""
    from fixtures.images import encode, photo_like

    cases = []
    for name, options in SWEEP_FORMATS.items():
        whole = encode(photo_like(7, 160, 120), name, **options)
        for cut in range(CUTS):
            cases.append((name, cut, whole[: max(1, len(whole) * cut // CUTS)]))
    return cases


@pytest.mark.parametrize(("name", "cut", "data"), truncation_sweep(), ids=lambda value: str(value)[:8])
def test_every_cut_of_every_format_decodes_or_says_why(name, cut, data):
    try:
        decode_image(data, DecodeLimits())
    except ImageError as error:
        assert error.reason in ("truncated", "corrupt", "not_an_image", "unsupported_format"), error
