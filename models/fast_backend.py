"""Run TensorFlow models through TFLite with XNNPACK: the same outputs, ~3x faster on CPU.

A hub module, SavedModel, frozen graph or Keras file is converted to a float
TFLite flatbuffer once, and cached by the hash of the model's content (so each
worker converts at most once, and never again for the same model). Before it is
first used, both run on a probe batch; only if every probe embedding matches
TensorFlow's (cosine >= PROBE_COSINE) does the TFLite model replace it, and the
verdict is cached beside it, so later loads need neither TensorFlow nor the
check. Otherwise the TensorFlow model is used and the reason is logged.

    embedder = load_fast(spec, load_tensorflow, trace)   # TFLite, or TensorFlow if the check failed
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable

import numpy as np

from imgembed.models import tflite
from imgembed.models.embedder import Embedder
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import Format, ModelSpec

_log = logging.getLogger(__name__)

PROBE_COSINE = 0.9999
PROBE_IMAGES = 4
CONVERTIBLE = (Format.HUB, Format.FROZEN_GRAPH, Format.KERAS)


def cache_dir() -> pathlib.Path:
    return (
        pathlib.Path(os.environ.get("IMGEMBED_CACHE_DIR", pathlib.Path.home() / ".cache" / "imgembed"))
        / "tflite"
    )


def _model_files(spec: ModelSpec) -> list[pathlib.Path]:
    """The files whose bytes define the model."""
    if spec.format is Format.FROZEN_GRAPH:
        from imgembed.models.embedded import graph_file

        return [graph_file(spec.source)]
    if spec.format is Format.KERAS:
        return [pathlib.Path(spec.source)]
    if pathlib.Path(spec.source).is_dir():  # a local SavedModel: no need to import TF Hub
        return sorted(path for path in pathlib.Path(spec.source).rglob("*") if path.is_file())
    import tensorflow_hub as hub

    from imgembed.models.hub_modules import hub_errors

    with hub_errors(spec.source):
        folder = pathlib.Path(hub.resolve(spec.source))
    return sorted(path for path in folder.rglob("*") if path.is_file())


def content_hash(spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    converter = importlib.metadata.version("tensorflow")  # a new converter may convert differently
    for part in (spec.format.value, spec.flavour.value, str(spec.image_size), converter):
        digest.update(part.encode() + b"\0")
    for path in _model_files(spec):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def convert_to_float_tflite(trace: Callable[[], tuple]) -> bytes:
    """A float TFLite flatbuffer computing the model on one [0, 1] image;
    ``trace()`` gives the model's traceable function and what keeps it alive."""
    import tensorflow as tf

    function, keep_alive = trace()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], keep_alive)
    data = converter.convert()
    return tflite.add_metadata(data, tflite.INPUT_RANGE_METADATA, tflite.UNIT_RANGE)


def _cache_path(spec: ModelSpec) -> pathlib.Path:
    return cache_dir() / f"{spec.name}-{content_hash(spec)}.tflite"


def _verdict_path(tflite_file: pathlib.Path) -> pathlib.Path:
    return tflite_file.with_suffix(".verified.json")


def already_verified(spec: ModelSpec) -> pathlib.Path | None:
    """The cached conversion when it was verified before (needs no TensorFlow to tell)."""
    path = _cache_path(spec)
    return path if path.exists() and _verdict_path(path).exists() else None


def cached_tflite_file(spec: ModelSpec, trace: Callable[[], tuple]) -> pathlib.Path:
    path = _cache_path(spec)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = convert_to_float_tflite(trace)
        # Workers may convert at the same time: write aside, then rename atomically.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as file:
            file.write(data)
        os.replace(file.name, path)
        _log.info("converted %s to TFLite: %s", spec.name, path)
    return path


def probe_images(size: int) -> np.ndarray:
    """Seeded smooth images with structure: noise alone would not exercise the model."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(PROBE_IMAGES):
        channels = [
            np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)
        ]
        image = (np.stack(channels, -1) + 1) / 2 + rng.normal(0, 0.03, (size, size, 3))
        images.append(np.clip(image, 0, 1))
    return np.stack(images).astype(np.float32)


def probe_cosines(reference: Embedder, candidate: Embedder) -> np.ndarray:
    images = probe_images(reference.spec.image_size)
    a, b = reference(images), candidate(images)
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


class FastBackendUnavailable(Exception):
    """The model cannot run through TFLite with TensorFlow's outputs; the message says why."""


def verified_tflite_file(
    spec: ModelSpec, load_tensorflow: Callable[[], Embedder], trace: Callable[[], tuple]
) -> pathlib.Path:
    """The cached TFLite conversion of the model, once it matched TensorFlow on the
    probe batch (a verdict kept beside it, so later calls need neither TensorFlow
    nor the check). Raises FastBackendUnavailable when it cannot be had."""
    if spec.format not in CONVERTIBLE:
        raise FastBackendUnavailable(f"{spec.name} is a {spec.format.value} model, not a TensorFlow one")
    try:
        path = cached_tflite_file(spec, trace)
        verdict = _verdict_path(path)
        if verdict.exists():
            return path
        cosines = probe_cosines(load_tensorflow(), tflite.embedder(spec, str(path)))
    # TFLite's ConverterError is a plain Exception, and a model can fail to trace in
    # many ways: whatever goes wrong, the model still runs in TensorFlow.
    except Exception as error:
        raise FastBackendUnavailable(f"TFLite conversion of {spec.name} failed ({error})") from error
    if cosines.min() < PROBE_COSINE:
        raise FastBackendUnavailable(
            f"TFLite {spec.name} differs from TensorFlow on the probe batch (min cosine {cosines.min():.6f})"
        )
    verdict.write_text(json.dumps({"probe_images": PROBE_IMAGES, "min_cosine": float(cosines.min())}))
    return path


def load_fast(
    spec: ModelSpec,
    load_tensorflow: Callable[[], Embedder],
    trace: Callable[[], tuple],
    threads: int | None = None,
    strict: bool = False,
) -> Embedder:
    """The TFLite version of the model if it matches TensorFlow's on the probe batch,
    else ``load_tensorflow()`` (one warning says why). With ``strict``, that raises."""
    try:
        path = verified_tflite_file(spec, load_tensorflow, trace)
    except FastBackendUnavailable as unavailable:
        if strict:
            raise ModelLoadError(str(unavailable)) from unavailable
        _log.warning("%s; running it in TensorFlow", unavailable)
        return load_tensorflow()
    return tflite.embedder(spec, str(path), threads)


def uses_tflite(embedder: Embedder) -> bool:
    return isinstance(embedder._call, tflite.TFLiteModel)
