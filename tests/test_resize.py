"""Preprocessing.apply: crop, squash and pad fit any image into the model's square."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgembed.transforms.resize import PAD_VALUE, Preprocessing, ResizeMode


def three_stripes(width: int = 300, height: int = 100) -> Image.Image:
    """Red | green | blue vertical thirds: which survive tells what was kept."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for index in range(3):
        pixels[:, index * width // 3 : (index + 1) * width // 3, index] = 255
    return Image.fromarray(pixels)


def colour_share(pixels: np.ndarray) -> np.ndarray:
    """Fraction of pixels that are mostly red, green, blue."""
    dominant = pixels.argmax(-1)
    strong = pixels.max(-1) > 200
    return np.array([np.mean(strong & (dominant == channel)) for channel in range(3)])


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("size", [(300, 100), (100, 300), (1, 1), (5000, 2), (64, 64)])
def test_every_mode_gives_the_model_square(mode, size):
    pixels = Preprocessing(mode).apply(Image.new("RGB", size, (10, 20, 30)), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_crop_keeps_only_the_centre():
    shares = colour_share(Preprocessing(ResizeMode.CROP).apply(three_stripes(), 30))
    assert shares[1] > 0.95  # the central third is green


def test_squash_keeps_everything_in_equal_parts():
    shares = colour_share(Preprocessing(ResizeMode.SQUASH).apply(three_stripes(), 30))
    np.testing.assert_allclose(shares, [1 / 3, 1 / 3, 1 / 3], atol=0.05)


def test_pad_keeps_everything_and_fills_grey_bands():
    pixels = Preprocessing(ResizeMode.PAD).apply(three_stripes(), 30)
    assert np.all(pixels[:9] == PAD_VALUE) and np.all(pixels[-9:] == PAD_VALUE)
    np.testing.assert_allclose(colour_share(pixels[10:20]), [1 / 3, 1 / 3, 1 / 3], atol=0.05)


def test_central_fraction_crops_each_side_first():
    image = Image.new("RGB", (100, 100), (255, 0, 0))
    image.paste((0, 0, 255), (25, 25, 75, 75))  # blue centre, half of each side
    pixels = Preprocessing(ResizeMode.SQUASH, central_fraction=0.5).apply(image, 20)
    assert np.all(pixels[..., 2] > 250)


def test_resampling_averages_instead_of_sampling():
    # A one-pixel checkerboard must come out mid-grey, not black or white.
    board = (np.indices((400, 400)).sum(0) % 2 * 255).astype(np.uint8)
    pixels = Preprocessing(ResizeMode.SQUASH).apply(Image.fromarray(board).convert("RGB"), 40)
    assert np.all(np.abs(pixels.astype(int) - 128) < 8)


def test_options_are_validated_with_the_allowed_values():
    with pytest.raises(ValueError, match="crop, squash, pad"):
        Preprocessing("stretch")
    with pytest.raises(ValueError, match="central fraction"):
        Preprocessing(ResizeMode.CROP, central_fraction=0)


def test_metadata_round_trip():
    options = Preprocessing(ResizeMode.PAD, 0.875)
    assert Preprocessing.from_metadata(options.to_metadata()) == options
