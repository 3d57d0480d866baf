"""Shared fixtures: tiny models, image folders, and the optional ../shared test data."""

from __future__ import annotations

import os
import pathlib

import pytest

from fixtures import images, tiny_models

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Real weights and ImageNet images live beside the repo, never in it.
SHARED_DIR = pathlib.Path(os.environ.get("IMGEMBED_SHARED_DIR", REPO_ROOT.parent / "shared"))
IMAGENET_DIR = SHARED_DIR / "images" / "imagenet_val_1300"


@pytest.fixture(scope="session")
def imagenet_dir() -> pathlib.Path:
    if not (IMAGENET_DIR / "labels_1001.txt").is_file():
        pytest.skip(f"ImageNet subset not found at {IMAGENET_DIR} (set IMGEMBED_SHARED_DIR)")
    return IMAGENET_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A seeded MobileNet V1 0.25 with 64x64 input, saved as a TF2 hub-style SavedModel."""
    return tiny_models.save_tf2_module(str(tmp_path_factory.mktemp("models") / "tiny_mobilenet_64"))


@pytest.fixture()
def photo_dir(tmp_path) -> pathlib.Path:
    """Six photo-like JPEGs and PNGs of different sizes and aspect ratios."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(320, 240), (240, 320), (500, 375), (64, 64), (1000, 200), (97, 131)]
    for seed, (width, height) in enumerate(sizes):
        image = images.photo_like(seed, width, height)
        if seed % 2:
            image.save(folder / f"photo_{seed}.png")
        else:
            image.save(folder / f"photo_{seed}.jpg", quality=90)
    return folder
