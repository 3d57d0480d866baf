"""``--precision int8``: a run's float models quantized to int8 TFLite, calibrated on
the run's own images, and used only when they keep close enough to float.

    the run's inputs --sample--> decoded and resized as the pipeline does (ImagePreparer)
        first half: calibration images  -> models/quantize.py (TFLite post-training
                                           quantization), in a child process: TensorFlow
                                           stays out of the launcher; cached by content
        other half: check images        -> the float and the int8 model on each: cosine
                                           per image, kNN@10 overlap of their neighbours
    int8 when both pass --min-fidelity; else float, and one line says why

A model is quantized once per output folder: the first run records the int8 file
it staged and its fidelity (``OUT/_models/int8-<model>.json``), and reruns take it
as it is, so that every shard of the output comes from the same int8 model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgembed.common import storage
from imgembed.common.choices import Choice
from imgembed.common.local_copies import local_path
from imgembed.models.evaluation import fidelity
from imgembed.models.loading import PreparedModel, load_model
from imgembed.models.registry import Format
from imgembed.pipelines.model_staging import MODELS_FOLDER
from imgembed.pipelines.preprocess import ImagePreparer
from imgembed.pipelines.shards import FILES, InputFile, InputShard
from imgembed.pipelines.sources import READ_AHEAD_FILES, ReadOptions, read_shard
from imgembed.transforms.decode import ImageError

_log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 200
CHECK_IMAGES = 200
# Fewer images than this in either half measure too little to trust int8 with.
MIN_IMAGES = 20
# Layers left float, tried in turn until one passes the gate (models/quantize.py
# picks the worst by TFLite's quantization debugger): each costs speed, so the
# fewest that keep fidelity win. On MobileNet V1 1.0_224 and ImageNet photos
# (docs/benchmarks/int8.md): 0 gave 2.78x the fp32 model's speed and kNN@10 0.83,
# 1 gave 2.71x and 0.89, 2 gave 2.53x and 0.91.
FLOAT_LAYERS = (0, 1, 2)
SAMPLE_SEED = 0


class Precision(Choice):
    __flag__ = "--precision"

    FP32 = "fp32"
    INT8 = "int8"


@dataclasses.dataclass(frozen=True)
class FidelityGate:
    """The least an int8 model must keep of its float model on the check images."""

    knn: float = 0.9  # kNN@10 overlap of each image's neighbours
    cosine: float = 0.98  # mean cosine between the two vectors of an image

    @classmethod
    def parse(cls, text: str) -> FidelityGate:
        """``"0.9,0.98"``: kNN@10 overlap, then mean cosine."""
        try:
            knn, cosine = (float(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"--min-fidelity is KNN,COSINE (e.g. 0.9,0.98), got {text!r}") from None
        return cls(knn, cosine)

    def failures(self, measured: dict) -> list[str]:
        """Why ``measured`` fails the gate (a NaN, from vectors int8 zeroed, fails it)."""
        knn, cosine = measured["knn@10_overlap"], measured["cosine_mean"]
        return [
            *([f"kNN@10 overlap {knn:.3f} < {self.knn}"] if not knn >= self.knn else []),
            *([f"mean cosine {cosine:.4f} < {self.cosine}"] if not cosine >= self.cosine else []),
        ]


def sample_pixels(inputs: dict[str, InputFile], preparer: ImagePreparer, size: int, count: int) -> np.ndarray:
    """Up to ``count`` images of the run as the pipeline feeds them to a model of
    input ``size`` (uint8 [n, size, size, 3]): image files drawn over the whole
    corpus (a seeded sample: the same listing gives the same images), then records
    of containers if those are too few."""
    rng = random.Random(SAMPLE_SEED)
    files = [file for file in inputs.values() if file.kind == FILES]
    files = rng.sample(files, min(len(files), 2 * count))  # twice as many: some fail to decode
    containers = [file for file in inputs.values() if file.kind != FILES]
    containers = rng.sample(containers, len(containers))
    pixels: list[np.ndarray] = []
    options = ReadOptions(preparer.limits)
    shards = [InputShard.of(FILES, files[start : start + 64]) for start in range(0, len(files), 64)]
    shards += [InputShard.of(file.kind, [file]) for file in containers]
    with ThreadPoolExecutor(READ_AHEAD_FILES) as reader:
        for shard in shards:
            for pixel in _prepared(read_shard(shard, options, reader), preparer, size):
                pixels.append(pixel)
                if len(pixels) == count:
                    return np.stack(pixels)
    return np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)


def _prepared(records, preparer: ImagePreparer, size: int):
    for record in records:
        if isinstance(record.data, ImageError):
            continue
        try:
            _, by_size = preparer.prepare(record.uri, record.data, record.metadata)
        except Exception:  # noqa: BLE001 - an image that fails here fails as a row in the job
            continue
        yield by_size[size]


def int8_record_path(output_dir: str, model_name: str) -> str:
    return storage.join(output_dir, MODELS_FOLDER, f"int8-{model_name}.json")


def as_int8(
    model: PreparedModel,
    inputs: dict[str, InputFile],
    preparer: ImagePreparer,
    gate: FidelityGate,
    output_dir: str,
) -> PreparedModel:
    """``model`` as int8 when the output holds its int8 model already, or when a new
    one passes ``gate``; else ``model`` as it is, with a note saying why."""
    record_path = int8_record_path(output_dir, model.spec.name)
    if storage.exists(record_path):
        record = storage.read_json(record_path)
        staged = storage.join(output_dir, MODELS_FOLDER, record["file"])
        return dataclasses.replace(
            model, tflite_file=local_path(staged), precision="int8", fidelity=record["fidelity"]
        )
    if model.tflite_file is None:  # int8 is made from the TensorFlow model, converted to TFLite
        why = "runs in TensorFlow" if model.backend == "tensorflow" else "is not a TensorFlow model"
        return dataclasses.replace(model, note=f"{model.spec.name} {why}: no int8 for it; fp32 runs")
    size = model.spec.image_size
    pixels = sample_pixels(inputs, preparer, size, CALIBRATION_IMAGES + CHECK_IMAGES)
    half = min(CALIBRATION_IMAGES, len(pixels) // 2)
    calibration, check = pixels[:half], pixels[half:]
    if len(check) < MIN_IMAGES:
        return dataclasses.replace(
            model,
            note=f"int8 for {model.spec.name} needs {2 * MIN_IMAGES} images of the run to calibrate and "
            f"check it, the run has {len(pixels)}; fp32 runs",
        )
    reference = load_model(_tflite_spec(model, model.tflite_file)).embed_pixels(check)
    for layers in FLOAT_LAYERS:  # the fastest that keeps the gate
        int8_file = quantized_file(model, calibration, layers)
        int8 = load_model(_tflite_spec(model, int8_file)).embed_pixels(check)
        measured = fidelity(reference, int8) | {
            "calibration_images": len(calibration),
            "float_layers": layers,
        }
        failures = gate.failures(measured)
        if not failures:
            return dataclasses.replace(model, tflite_file=int8_file, precision="int8", fidelity=measured)
    return dataclasses.replace(
        model,
        note=f"int8 {model.spec.name} is not close enough to fp32 on {len(check)} images of the run even "
        f"with {FLOAT_LAYERS[-1]} layers kept float ({'; '.join(failures)}); fp32 runs",
    )


def record_int8(output_dir: str, model: PreparedModel, staged_source: str) -> None:
    """What later runs into this output take as it is (see the module's docstring)."""
    record = {"file": os.path.basename(staged_source), "fidelity": model.fidelity}
    storage.write_atomically(
        int8_record_path(output_dir, model.spec.name), json.dumps(record, indent=2).encode()
    )


def _tflite_spec(model: PreparedModel, path: str):
    return dataclasses.replace(model.spec, source=path, format=Format.TFLITE)


def quantized_file(model: PreparedModel, calibration: np.ndarray, float_layers: int) -> str:
    """The int8 TFLite file of ``model`` calibrated on these images, from the cache
    when it was made before (named by the model's content and the images')."""
    from imgembed.models import fast_backend
    from imgembed.models.quantize import CONVERSION_VERSION, quantize_in_child

    digest = hashlib.sha256(calibration.tobytes()).hexdigest()[:12]
    folder = fast_backend.cache_dir() / "int8"
    model_hash = fast_backend.content_hash(model.spec)
    name = f"{model.spec.name}-{model_hash}-{digest}-f{float_layers}-v{CONVERSION_VERSION}.tflite"
    path = folder / name
    if not path.exists():
        storage.write_atomically(str(path), quantize_in_child(model.spec, calibration, float_layers))
    return str(path)
