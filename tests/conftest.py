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


def live(index_dir) -> pathlib.Path:
    """The folder of an index's live version (index/store.py keeps versions)."""
    from imgembed.index import store

    return pathlib.Path(store.live_dir(str(index_dir)))


def require_tool(path: pathlib.Path, what: str) -> None:
    """Skips a test whose real component is not installed, except in CI, where every
    component must run (.ci/run sets IMGEMBED_REQUIRE_TOOLS)."""
    if not path.exists():
        message = f"{what} is not installed at {path} (./run_tests.sh installs it)"
        if os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS-protocol server for the session; this process and the processes it
    starts reach it through the environment."""
    from tests.gcs import EMULATOR, gcs_server

    require_tool(EMULATOR, "gcp-storage-emulator")
    with gcs_server(tmp_path_factory.mktemp("gcs")) as server:
        saved = {name: os.environ.get(name) for name in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
