"""How models compare on a sample of images: shared by ``quantize`` and ``compare``.

Images are read and preprocessed exactly as the pipeline does; neighbours are by
cosine among the sample itself (each image's k nearest other images).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from imgembed.models.embedder import scale_pixels
from imgembed.transforms.decode import DecodeLimits, ImageError, decode_image
from imgembed.transforms.resize import Preprocessing

KNN = 10


def read_images(
    pattern: str, count: int, preprocessing: Preprocessing, size: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """A seeded sample of up to ``count`` decodable images, preprocessed as the pipeline does."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    rng = np.random.default_rng(seed)
    rng.shuffle(paths)
    pixels, used = [], []
    for path in paths:
        try:
            with open(path, "rb") as file:
                image = decode_image(file.read(), DecodeLimits(), preprocessing.decode_side(size))
        except (ImageError, OSError):
            continue
        pixels.append(preprocessing.apply(image, size))
        used.append(path)
        if len(used) == count:
            break
    if not used:
        raise ValueError(f"no decodable images match {pattern}")
    return scale_pixels(np.stack(pixels)), used


def embed_all(embedder, images: np.ndarray, batch: int = 32, on_batch=None) -> np.ndarray:
    """Every image's vector, ``batch`` at a time; ``on_batch(n)`` after each batch."""
    vectors = []
    for start in range(0, len(images), batch):
        vectors.append(embedder(images[start : start + batch]))
        if on_batch is not None:
            on_batch(len(vectors[-1]))
    return np.concatenate(vectors)


def knn_overlap(reference: np.ndarray, other: np.ndarray, k: int = KNN) -> float:
    """Mean share of each image's k nearest others (cosine) that both embeddings agree on."""

    k = min(k, len(reference) - 1)  # a small sample has fewer than k other images

    def neighbours(vectors):
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)  # an image is not its own neighbour
        return np.argsort(-similarity, axis=1, kind="stable")[:, :k]

    a, b = neighbours(reference), neighbours(other)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)]))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def read_labels(path: str) -> dict[str, int]:
    """``file name,class index`` per line (1001-way indexing, 0 = background)."""
    with open(path) as file:
        return {
            name: int(index) for name, index in (line.strip().split(",") for line in file if line.strip())
        }


def top1(scores: np.ndarray, paths: list[str], labels: dict[str, int]) -> float | None:
    known = [i for i, path in enumerate(paths) if os.path.basename(path) in labels]
    if not known:
        return None
    offset = 1001 - scores.shape[1]  # 1000-class models have no background class
    truth = np.array([labels[os.path.basename(paths[i])] for i in known])
    return float(np.mean(np.argmax(scores[known], axis=1) + offset == truth))


def fidelity(float_vectors: np.ndarray, int8_vectors: np.ndarray) -> dict:
    similarities = cosine(float_vectors, int8_vectors)
    return {
        "images": len(float_vectors),
        "cosine_mean": round(float(similarities.mean()), 5),
        "cosine_min": round(float(similarities.min()), 5),
        f"knn@{KNN}_overlap": round(knn_overlap(float_vectors, int8_vectors), 4),
    }
