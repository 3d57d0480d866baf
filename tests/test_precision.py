"""``--precision int8``: calibrated on the run's own images, used only when it keeps
close enough to fp32 (else fp32 runs, with one line why), recorded with the outputs
and the index, and used by the service for uploads."""

from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from fixtures import tiny_models
from fixtures.images import photo_like
from imgembed.common.embedding_files import read_metadata
from imgembed.index import command as index_command
from imgembed.index import store
from imgembed.models import quantize, tflite
from imgembed.models.embedder import scale_pixels
from imgembed.models.loading import resolve_spec
from imgembed.pipelines import embed
from imgembed.service.searcher import Searcher

pytestmark = pytest.mark.slow
IN_PROCESS = ["--runner=DirectRunner"]


class QuantizesBadly(tf.Module):
    """A feature vector computed through a layer with one huge channel: int8 gives a
    tensor one scale, and that channel's scale rounds every other channel to zero."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.first = tf.constant(rng.normal(size=(3, 64)), tf.float32)
        self.second = tf.constant(np.vstack([rng.normal(size=(64, 32)), np.full((1, 32), 1e-5)]), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    def __call__(self, images):
        colour = tf.reduce_mean(images, axis=[1, 2])
        hidden = tf.nn.relu(tf.matmul(colour - 0.5, self.first))
        outlier = 1e5 * tf.reduce_mean(colour, axis=1, keepdims=True)
        return tf.matmul(tf.concat([hidden, outlier], axis=1), self.second)


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(60):
        photo_like(seed, 96, 72).save(folder / f"{seed:03d}.jpg")
    return folder


def metadata_of(output, model_name: str) -> dict:
    (path, *_) = sorted(glob.glob(str(output / model_name / "embeddings-*.parquet")))
    return read_metadata(pq.read_schema(path))


def test_int8_that_keeps_fidelity_runs_is_recorded_and_serves_uploads_the_same_way(
    photos, tiny_model_dir, tmp_path, caplog
):
    output = tmp_path / "out"
    args = [f"--input={photos}", f"--output={output}", f"--model={tiny_model_dir}", "--precision=int8"]
    summary = embed.run(args + ["--min-fidelity=0,0"] + IN_PROCESS)  # any int8 passes
    (model,) = summary.models
    assert model.precision == "int8" and model.fidelity["images"] == 30 and summary.balanced
    metadata = metadata_of(output, model.model)
    assert metadata["precision"] == "int8" and metadata["runtime"].endswith(".tflite")
    assert (
        json.loads((output / "_models" / f"int8-{model.model}.json").read_text())["fidelity"]
        == model.fidelity
    )

    # A rerun over a grown corpus takes the output's int8 model as it is: no new calibration.
    photo_like(999, 96, 72).save(photos / "new.jpg")
    again = embed.run(args + IN_PROCESS)  # the default gate is not asked again either
    assert again.models[0].precision == "int8" and again.models[0].embedded == 1
    assert metadata_of(output, model.model)["runtime"] == metadata["runtime"]

    index = tmp_path / "index"
    assert index_command.main(["--embeddings", str(output / model.model), "--output", str(index)]) == 0
    manifest = store.load(str(index)).manifest
    assert manifest["precision"] == "int8" and manifest["runtime_model"] == store.RUNTIME_MODEL_FILE
    searcher = Searcher.open(str(index))
    hit = searcher.search_image((photos / "017.jpg").read_bytes(), k=1)[0]
    assert hit["uri"].endswith("017.jpg") and hit["score"] > 0.9999  # the same int8 embedding


def test_int8_that_quantizes_badly_falls_back_to_fp32_with_one_line_and_the_run_succeeds(
    photos, tmp_path, caplog
):
    model_dir = str(tmp_path / "quantizes_badly")
    tf.saved_model.save(QuantizesBadly(), model_dir)
    output = tmp_path / "out"
    with caplog.at_level("WARNING"):
        summary = embed.run(
            [f"--input={photos}", f"--output={output}", f"--model={model_dir}", "--precision=int8"]
            + IN_PROCESS
        )
    (model,) = summary.models
    assert model.precision == "fp32" and summary.balanced and model.rows == 60
    (line,) = [record.getMessage() for record in caplog.records if "int8" in record.getMessage()]
    assert "is not close enough to fp32" in line and "fp32 runs" in line
    assert metadata_of(output, model.model)["precision"] == "fp32"


def test_int8_runs_wholly_in_xnnpack_and_its_last_pool_as_a_mean_changes_no_vector(tmp_path, monkeypatch):
    """TF-Slim's MobileNets end in an AvgPool over the whole 7x7 map, which XNNPACK
    does not take in int8 (it cut the model in two partitions around TFLite's own
    kernel); as a MEAN, XNNPACK runs every op, with the same outputs up to rounding."""
    spec = resolve_spec(tiny_models.save_frozen_graph(str(tmp_path / "slim.pb")))
    pixels = np.stack([np.asarray(photo_like(seed, 64, 64)) for seed in range(24)])
    calibration = scale_pixels(pixels[:16])
    monkeypatch.setattr(tflite, "global_pools_as_means", lambda data: data)
    as_converted, _ = quantize.convert_to_int8(spec, calibration, float_layers=0)
    monkeypatch.undo()
    rewritten, _ = quantize.convert_to_int8(spec, calibration, float_layers=0)
    assert tflite.ops_outside_delegates(as_converted) == ["AVERAGE_POOL_2D (int8)"]
    assert tflite.ops_outside_delegates(rewritten) == []

    def vectors(data):
        path = tmp_path / f"model-{len(data)}.tflite"
        path.write_bytes(data)
        return tflite.load(tflite.describe(str(path), spec.flavour)).embed_pixels(pixels[16:])

    before, after = vectors(as_converted), vectors(rewritten)
    # The kernels round a tie differently: on this 2x2 map some means differ by one
    # int8 step of the output (on 1.0_224's 7x7 map, 102,400 values were identical).
    step = np.diff(np.unique(before)).min()
    assert np.abs(after - before).max() <= step * 1.001
    assert np.mean(after != before) < 0.25
