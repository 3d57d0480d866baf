"""Every model format through the pipeline's own loading: TF2 SavedModel, TF1 Hub
modules (fixed and variable size), frozen graphs, TFLite (float and int8) and
Keras files; several models in one pass; classification top-k; and, with
../shared, every real file of ../shared/models/README.md at its reference top-1."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures import tiny_models
from fixtures.images import photo_like
from imgembed.common.embedding_files import embeddings_glob
from imgembed.models.embedder import scale_pixels
from imgembed.models.errors import ModelLoadError
from imgembed.models.labels import imagenet_labels
from imgembed.models.loading import resolve_spec
from imgembed.pipelines import embed
from imgembed.transforms.resize import Preprocessing, ResizeMode

IN_PROCESS = ["--runner=DirectRunner"]


def rows_of(output_dir, model_name: str) -> list[dict]:
    paths = glob.glob(embeddings_glob(os.path.join(str(output_dir), model_name)))
    return pa.concat_tables(pq.read_table(path) for path in paths).to_pylist()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return {
        "tf2": tiny_models.save_tf2_module(str(folder / "tf2_savedmodel")),
        "tf1_hub_v1": tiny_models.save_tf1_hub_module(str(folder / "tf1_hub_fixed")),
        # Variable-size (v3) modules declare no size: it comes from the name, as in hub handles.
        "tf1_hub_v3": tiny_models.save_tf1_hub_module(str(folder / "mobilenet_v1_025_128"), image_size=None),
        "frozen": tiny_models.save_frozen_graph(str(folder / "slim_frozen.pb")),
        "tflite": tiny_models.save_tflite(str(folder / "slim_float.tflite")),
        "h5": tiny_models.save_keras_mobilenet(str(folder / "keras_mobilenet.h5")),
        "keras": tiny_models.save_keras_mobilenet(str(folder / "keras3_mobilenet.keras")),
    }


@pytest.fixture()
def square_images(tmp_path):
    """PNG images already at the models' 64x64 input: --resize squash leaves them as they are."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = {}
    for seed in range(5):
        image = photo_like(seed, 64, 64)
        image.save(folder / f"{seed}.png")
        pixels[str(folder / f"{seed}.png")] = np.asarray(image, np.float32) / 255.0
    return folder, pixels


def test_every_tensorflow_format_computes_the_same_network_in_one_pass(models_dir, square_images, tmp_path):
    folder, _ = square_images
    formats = ["tf2", "tf1_hub_v1", "tf1_hub_v3", "frozen", "tflite"]
    flags = [f"--model={models_dir[name]}" for name in formats]
    summary = embed.run(
        [f"--input={folder}/*", f"--output={tmp_path}/out", "--resize=squash", *flags] + IN_PROCESS
    )

    assert [model.rows for model in summary.models] == [5] * len(formats) and summary.balanced
    specs = [resolve_spec(models_dir[name]) for name in formats]
    names = [spec.name for spec in specs]
    assert names == ["tf2_savedmodel", "tf1_hub_fixed", "mobilenet_v1_025_128", "slim_frozen", "slim_float"]
    assert [spec.image_size for spec in specs] == [64, 64, 128, 64, 64]
    for spec in specs:
        rows = rows_of(tmp_path / "out", spec.name)
        vectors = np.stack([row["embedding"] for row in rows])
        inputs = [
            Preprocessing(ResizeMode.SQUASH).apply(Image.open(row["uri"]), spec.image_size) for row in rows
        ]
        expected = tiny_models.reference_features(scale_pixels(np.stack(inputs)))
        np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5, err_msg=spec.name)


def test_a_keras_export_with_only_serving_default_runs_under_backend_auto(
    square_images, tmp_path, monkeypatch
):
    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    folder, pixels = square_images
    exported = tiny_models.save_keras_export(str(tmp_path / "keras_export"))
    summary = embed.run(
        [f"--input={folder}/*", f"--output={tmp_path}/out", f"--model={exported}", "--resize=squash"]
        + ["--backend=auto"]
        + IN_PROCESS
    )
    assert summary.models[0].rows == 5 and summary.balanced
    rows = rows_of(tmp_path / "out", "keras_export")
    expected = tiny_models.reference_features(np.stack([pixels[row["uri"]] for row in rows]))
    np.testing.assert_allclose(np.stack([row["embedding"] for row in rows]), expected, rtol=1e-4, atol=1e-5)


def test_images_are_decoded_once_for_several_models(models_dir, square_images, tmp_path):
    folder, _ = square_images
    summary = embed.run(
        [
            f"--input={folder}/*",
            f"--output={tmp_path}",
            f"--model={models_dir['tf2']}",
            f"--model={models_dir['frozen']}",
        ]
        + IN_PROCESS
    )
    assert [model.rows for model in summary.models] == [5, 5]
    assert summary.images_decoded == 5  # once for both models, not 10


def test_keras_files_give_their_pooled_features(models_dir, square_images, tmp_path):
    import tf_keras

    folder, pixels = square_images
    embed.run(
        [f"--input={folder}/*", f"--output={tmp_path}", "--resize=squash"]
        + [f"--model={models_dir['h5']}", f"--model={models_dir['keras']}"]
        + IN_PROCESS
    )
    model = tf_keras.models.load_model(models_dir["h5"], compile=False)
    pooled = tf_keras.Model(model.input, model.get_layer("global_average_pooling2d").output)
    rows = rows_of(tmp_path, "keras_mobilenet")
    expected = pooled(np.stack([pixels[row["uri"]] for row in rows]) * 2 - 1).numpy().reshape(len(rows), -1)
    np.testing.assert_allclose(np.stack([row["embedding"] for row in rows]), expected, rtol=1e-4, atol=1e-6)
    assert len(rows_of(tmp_path, "keras3_mobilenet")) == 5


def test_classifiers_keep_logits_and_add_top_k_imagenet_labels(models_dir, square_images, tmp_path):
    folder, _ = square_images
    embed.run(
        [f"--input={folder}/*", f"--output={tmp_path}", "--top-k=3"]
        + [f"--model={models_dir['frozen']}#classification", f"--model={models_dir['h5']}#classification"]
        + IN_PROCESS
    )
    labels = imagenet_labels()
    for name, offset in (("slim_frozen_classification", 0), ("keras_mobilenet_classification", 1)):
        for row in rows_of(tmp_path, name):
            scores = np.asarray(row["embedding"])
            assert len(scores) == 1001 - offset
            assert row["top_labels"][0] == labels[int(np.argmax(scores)) + offset]
            assert len(row["top_labels"]) == 3 and row["top_scores"] == sorted(
                row["top_scores"], reverse=True
            )
            assert 0 < sum(row["top_scores"]) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.tflite", b"not a flatbuffer", "TFLite"),
        ("junk.pb", b"\xff\xff\xff not a graph", "not a frozen TensorFlow GraphDef"),
        ("junk.h5", b"not hdf5", "not a Keras model file"),
        ("notes.txt", b"hello", "not a model this tool reads"),
    ],
)
def test_wrong_files_say_what_was_expected(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        resolve_spec(str(tmp_path / name))


def test_bad_flavour_and_classifier_without_pooled_tensor(models_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="#feature_vector or #classification"):
        resolve_spec(models_dir["tflite"] + "#logits")
    from imgembed.models import tflite

    model = tflite.read_model(open(models_dir["tflite"], "rb").read())  # noqa: SIM115
    for tensor in model.subgraphs[0].tensors:
        if tensor.name.decode() == tflite.POOLED_FEATURE:
            tensor.name = b"some/other/pooling"
    (tmp_path / "renamed.tflite").write_bytes(tflite.write_model(model))
    with pytest.raises(ModelLoadError, match="append #classification"):
        resolve_spec(str(tmp_path / "renamed.tflite"))


def test_quantize_writes_an_int8_file_the_pipeline_runs(models_dir, square_images, tmp_path):
    folder, pixels = square_images
    int8 = tmp_path / "tiny_int8.tflite"
    completed = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "imgembed"),
            "quantize",
            f"--model={models_dir['frozen']}",
        ]
        + [f"--calibration={folder}/*", f"--output={int8}", "--resize=squash"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = __import__("json").loads((tmp_path / "tiny_int8.json").read_text())
    assert report["fidelity"]["images"] == 5 and report["fidelity"]["cosine_mean"] > 0.95
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(int8))
    types = {str(detail["dtype"]) for detail in interpreter.get_tensor_details()}
    assert "<class 'numpy.int8'>" in types  # weights and activations are int8

    embed.run(
        [f"--input={folder}/*", f"--output={tmp_path}/out", f"--model={int8}", "--resize=squash"] + IN_PROCESS
    )
    rows = rows_of(tmp_path / "out", "tiny_int8")
    expected = tiny_models.reference_features(np.stack([pixels[row["uri"]] for row in rows]))
    vectors = np.stack([row["embedding"] for row in rows])
    cosine = (
        np.sum(vectors * expected, 1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert np.all(cosine > 0.95)


# ../shared/models/README.md: top-1 on imagenet_val_1300 (central crop 87.5%,
# bilinear resize, float models fed x/127.5-1, uint8 models fed raw uint8).
REAL_FILES = {
    "tflite2onnx/mobilenet_v1_0.25_128.tflite": 0.562,
    "tflite2onnx/mobilenet_v1_0.25_128_quant.tflite": 0.532,
    "stm32/mobilenet_v1_0.25_224.h5": 0.658,
    "coral/mobilenet_v1_0.25_128_quant.tflite": 0.537,
    "coral/mobilenet_v1_0.5_160_quant.tflite": 0.724,
    "coral/mobilenet_v1_0.75_192_quant.tflite": 0.775,
    "coral/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite+coral/mobilenet_quant_v1_224_head_layers.tflite": 0.782,
    "atu/mobilenet_v1_0.75_224_quant.tflite": 0.775,
}


@pytest.mark.slow
def test_every_real_file_reaches_its_reference_top1(imagenet_dir, tmp_path):
    models_root = imagenet_dir.parent.parent / "models"
    references = {}
    flags = []
    for relative, top1 in REAL_FILES.items():
        source = "+".join(str(models_root / part) for part in relative.split("+"))
        # Two files share a base name: name each model after its folder and file.
        name = relative.split("+")[0].replace("/", "_").removesuffix(".tflite").removesuffix(".h5")
        references[name] = top1
        flags.append(f"--model={name}={source}#classification")
    embed.run(
        [
            f"--input={imagenet_dir}/*.JPEG",
            f"--output={tmp_path}",
            "--resize=squash",
            "--central-fraction=0.875",
        ]
        + flags
        + IN_PROCESS
    )
    truth = dict(line.split(",") for line in (imagenet_dir / "labels_1001.txt").read_text().split())
    measured = {}
    for name in references:
        rows = rows_of(tmp_path, name)
        scores = np.stack([row["embedding"] for row in rows])
        offset = 1001 - scores.shape[1]
        labels = np.array([int(truth[os.path.basename(row["uri"])]) for row in rows])
        measured[name] = float(np.mean(np.argmax(scores, axis=1) + offset == labels))
        assert len(rows) == 1300
    misses = {
        name: (measured[name], references[name])
        for name in references
        if abs(measured[name] - references[name]) > 0.01
    }
    assert not misses, misses


@pytest.mark.slow
def test_int8_default_model_keeps_knn_overlap_and_runs_in_the_pipeline(imagenet_dir, tmp_path):
    int8 = tmp_path / "default_int8.tflite"
    completed = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "imgembed"),
            "quantize",
            "--model=mobilenet_v1_100_224_embedded",
        ]
        + [f"--calibration={imagenet_dir}/*.JPEG", "--calibration-size=200", f"--output={int8}"]
        + [f"--evaluate={imagenet_dir}/*.JPEG", "--evaluate-size=1300"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = __import__("json").loads((tmp_path / "default_int8.json").read_text())
    assert report["fidelity"]["images"] == 1300
    assert report["fidelity"]["knn@10_overlap"] >= 0.9, report["fidelity"]
    sample = sorted(glob.glob(f"{imagenet_dir}/*.JPEG"))[:20]
    summary = embed.run(
        [f"--input={path}" for path in sample] + [f"--output={tmp_path}/out", f"--model={int8}"] + IN_PROCESS
    )
    assert summary.models[0].rows == 20 and summary.balanced


def test_compare_reports_speed_size_agreement_and_top1(models_dir, square_images, tmp_path):
    import itertools

    from imgembed.models import compare

    folder, pixels = square_images
    specs = [resolve_spec(models_dir[name]) for name in ("tf2", "frozen", "tflite")]
    paths = sorted(pixels)
    images = np.stack([pixels[path] for path in paths])
    # The frozen graph's classes, computed directly from the seeded weights; three
    # images labelled with them and two with other classes: top-1 is 3/5.
    kernel, bias = tiny_models.classifier_weights(0.25, 0)
    predicted = np.argmax(tiny_models.reference_features(images) @ kernel + bias, axis=1)
    labels = {
        os.path.basename(path): int(predicted[i]) if i < 3 else int(predicted[i]) % 1000 + 1
        for i, path in enumerate(paths)
    }
    ticks = itertools.count()  # each model's timed pass takes exactly one "second"
    results = {
        result.name: result
        for result in compare.compare(
            specs, lambda size: images, paths, labels, None, clock=lambda: float(next(ticks))
        )
    }
    assert set(results) == {"tf2_savedmodel", "slim_frozen", "slim_float"}
    assert all(r.images_per_sec == 5.0 and r.bytes_per_vector == 256 * 4 for r in results.values())
    # Three files of one network agree on every neighbour.
    assert all(r.knn_agreement == 1.0 for r in results.values())
    assert results["tf2_savedmodel"].top1 is None  # a SavedModel folder has no classifier sibling
    assert results["slim_frozen"].top1 == pytest.approx(0.6)

    argv = [f"--images={folder}/*", f"--output={tmp_path}/report", "--resize=squash"]
    argv += [f"--model={models_dir[name]}" for name in ("tf2", "frozen")]
    assert compare.main(argv) == 0
    report = __import__("json").loads((tmp_path / "report" / "compare.json").read_text())
    assert report["images"] == 5 and [r["name"] for r in report["results"]] == [
        "tf2_savedmodel",
        "slim_frozen",
    ]
    page = (tmp_path / "report" / "compare.html").read_text()
    assert page.count("<svg") == 4 and "slim_frozen" in page
