"""The embed job end to end on real Beam runners: rows equal the model's own
output on the same pixels, every input is accounted for, reruns never duplicate."""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from fixtures.images import photo_like, truncated_jpeg
from imgembed.common.embedding_files import embeddings_glob, errors_glob, image_id, read_metadata
from imgembed.models.embedded import graph_path
from imgembed.models.embedder import scale_pixels
from imgembed.models.loading import load_model, resolve_spec
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import embed
from imgembed.pipelines.default_corpus import default_corpus_patterns
from imgembed.transforms.decode import DecodeLimits, decode_image
from imgembed.transforms.resize import Preprocessing
from tests.filesystems import LaggyFileSystem

IN_PROCESS = ["--runner=DirectRunner"]


def read_table(pattern: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in sorted(glob.glob(pattern))])


def embeddings(output_dir, model_name) -> pa.Table:
    return read_table(embeddings_glob(os.path.join(str(output_dir), model_name)))


def errors(output_dir) -> pa.Table:
    return read_table(errors_glob(str(output_dir)))


def add_bad_files(folder) -> dict[str, str]:
    """The three broken inputs the issue names, and the reason each must get."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(truncated_jpeg(7))
    (folder / "notes.jpg").write_text("this is a text file named like a photo")
    return {"empty.jpg": "empty_file", "cut.jpg": "truncated", "notes.jpg": "not_an_image"}


def test_rows_equal_the_model_on_the_same_pixels_and_bad_files_become_error_rows(
    photo_dir, tiny_model_dir, tmp_path
):
    expected_reasons = add_bad_files(photo_dir)
    output = tmp_path / "out"
    summary = embed.run(
        [f"--input={photo_dir}/*", f"--output={output}", f"--model={tiny_model_dir}", "--batch-size=4"]
        + IN_PROCESS
    )

    spec = resolve_spec(tiny_model_dir)
    table = embeddings(output, spec.name)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    metadata = read_metadata(table.schema)
    assert metadata["model"]["name"] == spec.name
    assert metadata["preprocessing"]["resize"] == "crop"

    photos = sorted(p for p in os.listdir(photo_dir) if p.startswith("photo_"))
    assert sorted(os.path.basename(uri) for uri in table["uri"].to_pylist()) == photos
    model = load_model(spec)
    for row in table.to_pylist():
        data = pathlib.Path(row["uri"]).read_bytes()
        # The pipeline's own decoding: JPEGs may decode at a reduced DCT scale.
        image = decode_image(data, DecodeLimits(), Preprocessing().decode_side(spec.image_size))
        assert (row["width"], row["height"]) == image.info["original_size"] == Image.open(row["uri"]).size
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["id"] == image_id(row["uri"])
        direct = model(scale_pixels(Preprocessing().apply(image, spec.image_size)[None]))[0]
        np.testing.assert_allclose(row["embedding"], direct, rtol=1e-5, atol=1e-6)

    error_rows = errors(output).to_pylist()
    assert {os.path.basename(r["uri"]): r["reason"] for r in error_rows} == expected_reasons
    assert all(r["message"] and r["stage"] in ("read", "decode") for r in error_rows)
    assert (
        summary.inputs == 9 and summary.models[0].rows == 6 and summary.errors_total == 3 and summary.balanced
    )


def frozen_graph_features(images: np.ndarray) -> np.ndarray:
    """The frozen graph run as TF1 would run it, one image at a time (its batch is 1)."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path().read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return np.concatenate(
                [
                    session.run(
                        "MobilenetV1/Logits/AvgPool_1a/AvgPool:0", {"input:0": image[None] * 2.0 - 1.0}
                    ).reshape(1, -1)
                    for image in images
                ]
            )


def test_squash_of_224_images_equals_the_frozen_graph_output(tmp_path):
    folder = tmp_path / "photos224"
    folder.mkdir()
    pixels = {}
    for seed in range(4):
        image = photo_like(seed, 224, 224)
        image.save(folder / f"{seed}.png")
        pixels[str(folder / f"{seed}.png")] = np.asarray(image)
    output = tmp_path / "out"
    embed.run([f"--input={folder}/*", f"--output={output}", "--resize=squash"] + IN_PROCESS)

    table = embeddings(output, EMBEDDED_MODEL_NAME)
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    reference = frozen_graph_features(np.stack([pixels[uri] for uri in table["uri"].to_pylist()]) / 255.0)
    cosine = (
        np.sum(vectors * reference, 1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    )
    assert vectors.shape == (4, 1024)
    assert np.all(cosine >= 0.9999), cosine


def test_default_corpus_gives_one_1024_d_row_per_image(tmp_path):
    files = {path for pattern in default_corpus_patterns() for path in glob.glob(pattern)}
    summary = embed.run([f"--output={tmp_path}"] + IN_PROCESS)
    table = embeddings(tmp_path, EMBEDDED_MODEL_NAME)
    assert set(table["uri"].to_pylist()) == files
    assert table.schema.field("embedding").type.list_size == 1024
    assert summary.models[0].rows == len(files) and summary.errors_total == 0 and summary.balanced
    assert len(errors(tmp_path)) == 0  # the errors file exists even when empty


def test_rerun_resumes_and_other_settings_need_overwrite(photo_dir, tiny_model_dir, tmp_path):
    args = [
        f"--input={photo_dir}",
        f"--output={tmp_path}",
        f"--model={tiny_model_dir}",
        "--files-per-shard=2",
    ]
    first = embed.run(args + IN_PROCESS)
    assert (first.shards, first.run.shards_kept, first.models[0].rows) == (3, 0, 6)
    written = {path: os.path.getmtime(path) for path in glob.glob(f"{tmp_path}/**/*.parquet", recursive=True)}

    # --batch-size changes no output: every shard is found complete and left alone.
    again = embed.run(args + ["--batch-size=5"] + IN_PROCESS)
    assert (again.run.shards_kept, again.run.shards_written, again.models[0].rows, again.inputs) == (
        3,
        0,
        6,
        6,
    )
    assert {path: os.path.getmtime(path) for path in written} == written

    with pytest.raises(ValueError, match="--overwrite"):
        embed.run(args + ["--resize=pad"] + IN_PROCESS)
    replaced = embed.run(args + ["--resize=pad", "--overwrite"] + IN_PROCESS)
    table = embeddings(tmp_path, "tiny_mobilenet_64")
    assert replaced.models[0].rows == len(table) == len(set(table["id"].to_pylist())) == 6
    assert read_metadata(table.schema)["preprocessing"]["resize"] == "pad"


def test_changed_inputs_replace_their_shards_without_duplicates(photo_dir, tiny_model_dir, tmp_path):
    args = [
        f"--input={photo_dir}",
        f"--output={tmp_path}",
        f"--model={tiny_model_dir}",
        "--files-per-shard=4",
    ]
    embed.run(args + IN_PROCESS)
    photo_like(42, 120, 90).save(photo_dir / "photo_9_added.jpg")
    summary = embed.run(args + IN_PROCESS)
    ids = embeddings(tmp_path, "tiny_mobilenet_64")["id"].to_pylist()
    assert summary.inputs == summary.models[0].rows == len(ids) == len(set(ids)) == 7
    # The new file makes a shard of its own: both shards of before are kept as they are.
    assert (summary.run.shards_kept, summary.run.shards_written, summary.models[0].embedded) == (2, 1, 1)


def test_folders_are_read_recursively_and_overlapping_patterns_read_once(photo_dir, tiny_model_dir, tmp_path):
    nested = photo_dir / "nested" / "deeper"
    nested.mkdir(parents=True)
    photo_like(99, 80, 60).save(nested / "deep.jpg")
    summary = embed.run(
        [
            f"--input={photo_dir}",
            f"--input={photo_dir}/*.jpg",
            f"--output={tmp_path}",
            f"--model={tiny_model_dir}",
        ]
        + IN_PROCESS
    )
    uris = embeddings(tmp_path, "tiny_mobilenet_64")["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 7 and summary.inputs == 7


def test_files_on_a_remote_filesystem_give_the_rows_of_the_same_files_read_locally(
    photo_dir, tiny_model_dir, tmp_path
):
    LaggyFileSystem.opened_by.clear()
    by_name = {}
    for where, pattern in (("local", f"{photo_dir}/*"), ("remote", f"laggy://{photo_dir}/*")):
        summary = embed.run(
            [f"--input={pattern}", f"--output={tmp_path / where}", f"--model={tiny_model_dir}"] + IN_PROCESS
        )
        assert summary.balanced and summary.inputs == 6
        rows = embeddings(tmp_path / where, "tiny_mobilenet_64").sort_by("uri").to_pylist()
        by_name[where] = {os.path.basename(row["uri"]): row for row in rows}
    assert by_name["local"].keys() == by_name["remote"].keys()
    for name, remote in by_name["remote"].items():
        local = by_name["local"][name]
        assert remote["uri"] == f"laggy://{local['uri']}" and remote["id"] == image_id(remote["uri"])
        assert remote["sha256"] == local["sha256"] and remote["embedding"] == local["embedding"]
    # Remote files are read ahead by the reader threads, not by the decoding thread.
    assert len(LaggyFileSystem.opened_by) == 6
    assert all(name.startswith("read-ahead") for name in LaggyFileSystem.opened_by)


class FailsOnBrightImages(tf.Module):
    """A model that raises inside TensorFlow for very bright images."""

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    def __call__(self, images):
        with tf.control_dependencies([tf.debugging.assert_less(tf.reduce_mean(images), 0.9)]):
            return tf.reduce_mean(images, axis=[1, 2])


def test_inference_failures_become_error_rows(photo_dir, tmp_path):
    model_dir = str(tmp_path / "fails_on_bright")
    tf.saved_model.save(FailsOnBrightImages(), model_dir)
    from PIL import Image

    Image.new("RGB", (50, 50), (255, 255, 255)).save(photo_dir / "white.png")
    summary = embed.run(
        # TensorFlow itself: a TFLite conversion would drop the assertion.
        [f"--input={photo_dir}/*", f"--output={tmp_path}/out", f"--model={model_dir}", "--batch-size=1"]
        + ["--backend=tensorflow"]
        + IN_PROCESS
    )
    (failed,) = errors(tmp_path / "out").to_pylist()
    assert failed["uri"].endswith("white.png")
    assert (failed["stage"], failed["reason"], failed["model"]) == (
        "inference",
        "inference_failed",
        "fails_on_bright",
    )
    assert summary.models[0].rows == 6 and summary.balanced


def test_bad_arguments_get_a_message_not_a_traceback(tmp_path, capsys):
    assert embed.main([f"--input={tmp_path}/nothing*", f"--output={tmp_path}/o"] + IN_PROCESS) == 2
    assert "no files match" in capsys.readouterr().err
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "moved.jpg").symlink_to(tmp_path / "gone.jpg")
    assert embed.main([f"--input={tmp_path}/links", f"--output={tmp_path}/o"] + IN_PROCESS) == 2
    err = capsys.readouterr().err
    assert f"no files match {tmp_path}/links/** (it names 1 symbolic link(s) to nothing, e.g. " in err
    assert f"moved.jpg -> {tmp_path}/gone.jpg)" in err
    assert embed.main([f"--input={tmp_path}", "--resize=stretch", f"--output={tmp_path}/o"] + IN_PROCESS) == 2
    assert "crop, squash, pad" in capsys.readouterr().err
    assert embed.main([f"--input={tmp_path}"] + IN_PROCESS) == 2
    assert "--output is required" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_on_the_local_multiprocess_runner(photo_dir, tiny_model_dir, tmp_path):
    add_bad_files(photo_dir)
    imgembed = os.path.join(os.path.dirname(sys.executable), "imgembed")
    completed = subprocess.run(
        [imgembed, "embed", f"--input={photo_dir}/*", f"--output={tmp_path}", f"--model={tiny_model_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "inputs 9 = embedded 6 + errors 3" in completed.stdout, completed.stdout
    assert len(embeddings(tmp_path, "tiny_mobilenet_64")) == 6


def test_tflite_backend_rows_equal_tensorflow_rows_with_the_same_schema(photo_dir, tmp_path):
    tables = {}
    for backend in ("tensorflow", "tflite"):
        output = tmp_path / backend
        embed.run([f"--input={photo_dir}", f"--output={output}", f"--backend={backend}"] + IN_PROCESS)
        tables[backend] = embeddings(output, EMBEDDED_MODEL_NAME).sort_by("id")
    assert tables["tflite"].schema.remove_metadata() == tables["tensorflow"].schema.remove_metadata()
    assert read_metadata(tables["tflite"].schema)["backend"] == "tflite"
    tf_vectors = np.stack(tables["tensorflow"]["embedding"].to_numpy(zero_copy_only=False))
    lite_vectors = np.stack(tables["tflite"]["embedding"].to_numpy(zero_copy_only=False))
    cosine = (
        np.sum(tf_vectors * lite_vectors, 1)
        / np.linalg.norm(tf_vectors, axis=1)
        / np.linalg.norm(lite_vectors, axis=1)
    )
    assert np.all(cosine >= 0.9999), cosine
