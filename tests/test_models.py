"""Model loading: the embedded real weights, SavedModel folders, and TF Hub URLs
served from a real HTTP server on loopback (standing in for tfhub.dev)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import tarfile
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imgembed.models.embedder import scale_pixels
from imgembed.models.errors import ModelLoadError
from imgembed.models.loading import check_available, load_model, resolve_spec
from imgembed.models.registry import EMBEDDED_MODEL_NAME, KNOWN_MODELS, Flavour
from imgembed.pipelines.default_corpus import default_corpus_patterns
from imgembed.transforms.resize import Preprocessing, ResizeMode

# ImageNet classes 282-286 of the 1001-way output are the domestic cats.
CAT_CLASSES = set(range(282, 287))


@contextlib.contextmanager
def serve_folder(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def embedded():
    return load_model(KNOWN_MODELS[EMBEDDED_MODEL_NAME])


def test_embedded_model_is_a_hub_style_feature_vector(embedded):
    images = np.random.default_rng(0).random((3, 224, 224, 3), dtype=np.float32)
    vectors = embedded(images)
    assert vectors.shape == (3, 1024) and vectors.dtype == np.float32
    # The frozen graph had a batch of one; each image must not depend on its batch.
    np.testing.assert_allclose(embedded(images[1:2])[0], vectors[1], rtol=1e-4, atol=1e-5)


def test_embedded_classifier_knows_a_cat_offline():
    """Real ImageNet weights: scikit-image's chelsea.png is a tabby cat."""
    (chelsea,) = [
        os.path.join(os.path.dirname(pattern), "chelsea.png")
        for pattern in default_corpus_patterns()
        if pattern.endswith("skimage/data/*.png")
    ]
    pixels = Preprocessing(ResizeMode.CROP).apply(Image.open(chelsea).convert("RGB"), 224)
    classifier = load_model(KNOWN_MODELS[f"{EMBEDDED_MODEL_NAME}_classification"])
    logits = classifier(scale_pixels(pixels[None]))
    assert logits.shape == (1, 1001)
    assert int(np.argmax(logits)) in CAT_CLASSES


def test_savedmodel_folder_is_described_by_loading_it(tiny_model_dir):
    spec = resolve_spec(tiny_model_dir)
    assert (spec.name, spec.image_size, spec.output_dim) == ("tiny_mobilenet_64", 64, 256)
    assert spec.flavour is Flavour.FEATURE_VECTOR
    assert load_model(spec)(np.zeros([2, 64, 64, 3], np.float32)).shape == (2, 256)


def test_hub_url_is_downloaded_once_then_served_from_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub_cache"))
    site = tmp_path / "site"
    (site / "mobilenet_v1_025_064" / "feature_vector").mkdir(parents=True)
    archive = site / "mobilenet_v1_025_064" / "feature_vector" / "4"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_model_dir, arcname=".")
    images = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)

    with serve_folder(site) as url:
        handle = f"{url}/mobilenet_v1_025_064/feature_vector/4"
        spec = resolve_spec(handle)
        first = load_model(spec)(images)
    assert (spec.name, spec.output_dim) == ("mobilenet_v1_025_064_feature_vector_4", 256)
    # The server is gone: a second load must come from TFHUB_CACHE_DIR.
    np.testing.assert_array_equal(load_model(spec)(images), first)
    direct = load_model(resolve_spec(tiny_model_dir))(images)
    np.testing.assert_allclose(first, direct, rtol=1e-6)


def test_unreachable_hub_fails_fast_and_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub_cache"))
    handle = f"http://127.0.0.1:{closed_port()}/google/imagenet/mobilenet_v1_100_224/feature_vector/4"
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"--model /path/to/folder.*TFHUB_CACHE_DIR"):
        resolve_spec(handle)
    assert time.monotonic() - started < 30


def test_registry_handles_are_checked_before_a_job_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub_cache"))
    spec = KNOWN_MODELS["mobilenet_v1_050_160"]
    unreachable = spec.__class__(**{**spec.__dict__, "source": f"http://127.0.0.1:{closed_port()}/m/1"})
    with pytest.raises(ModelLoadError, match="Could not download"):
        check_available(unreachable)


@pytest.mark.parametrize("reference", ["no_such_model", "/no/such/folder"])
def test_unknown_model_reference_names_the_options(reference):
    with pytest.raises(ModelLoadError, match="not a short name"):
        resolve_spec(reference)


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        resolve_spec(str(tmp_path))


class NoisyModel(tf.Module):
    """Adds fresh random noise on every call: no converted copy can match it."""

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    def __call__(self, images):
        pooled = tf.reduce_mean(images, axis=[1, 2])
        return pooled + tf.random.uniform(tf.shape(pooled))


def test_fast_backend_falls_back_to_tensorflow_when_outputs_differ(tmp_path, monkeypatch, caplog):
    from imgembed.models.fast_backend import uses_tflite

    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    tf.saved_model.save(NoisyModel(), str(tmp_path / "noisy"))
    spec = resolve_spec(str(tmp_path / "noisy"))
    with caplog.at_level("WARNING"):
        embedder = load_model(spec, backend="auto")
    assert not uses_tflite(embedder)
    assert "differs from TensorFlow on the probe batch" in caplog.text
    with pytest.raises(ModelLoadError, match="differs from TensorFlow"):
        load_model(spec, backend="tflite")


def test_fast_backend_is_converted_once_and_cached_by_content(tiny_model_dir, tmp_path, monkeypatch):
    from imgembed.models import fast_backend

    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    spec = resolve_spec(tiny_model_dir)
    first = load_model(spec, backend="tflite")
    assert fast_backend.uses_tflite(first)
    (cached,) = (tmp_path / "cache" / "tflite").glob("*.tflite")
    conversions = []
    monkeypatch.setattr(fast_backend, "convert_to_float_tflite", lambda trace: conversions.append(trace))
    load_model(spec, backend="tflite")
    assert conversions == [] and cached.exists()
    images = np.random.default_rng(3).random((3, 64, 64, 3), dtype=np.float32)
    reference = load_model(spec, backend="tensorflow")(images)
    np.testing.assert_allclose(first(images), reference, rtol=1e-4, atol=1e-5)


def test_embed_pixels_gives_exactly_the_vectors_of_scaled_images(tiny_model_dir, tmp_path, monkeypatch):
    """The pipeline and the service hand models uint8 pixels; every backend must
    give the bits it gives for scale_pixels(pixels), including the TFLite path
    that scales straight into the interpreter's input buffer."""
    from fixtures.tiny_models import save_tflite
    from imgembed.models import fast_backend, tflite

    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    pixels = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    spec = resolve_spec(tiny_model_dir)
    converted = load_model(spec, backend="tflite")
    slim_file = load_model(resolve_spec(save_tflite(str(tmp_path / "slim.tflite"))))  # [-1, 1] input
    tensorflow = load_model(spec, backend="tensorflow")
    expected = {
        name: model(scale_pixels(pixels))
        for name, model in [("converted", converted), ("slim_file", slim_file), ("tensorflow", tensorflow)]
    }

    def no_float_copy(_):
        raise AssertionError("the converted model should scale into its input buffer")

    monkeypatch.setattr(tflite, "scale_pixels", no_float_copy)
    assert fast_backend.uses_tflite(converted)
    np.testing.assert_array_equal(converted.embed_pixels(pixels), expected["converted"])
    monkeypatch.undo()
    np.testing.assert_array_equal(slim_file.embed_pixels(pixels), expected["slim_file"])
    np.testing.assert_array_equal(tensorflow.embed_pixels(pixels), expected["tensorflow"])


def test_model_check_runs_beside_the_caller_and_stops_when_abandoned(tiny_model_dir, tmp_path, monkeypatch):
    import multiprocessing
    import signal

    from imgembed.models.loading import prepared_meanwhile

    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    started = time.monotonic()
    with prepared_meanwhile([tiny_model_dir], "auto") as prepared:
        assert len(multiprocessing.active_children()) == 1  # describing it loads TensorFlow there
        (model,) = prepared()
    full_check = time.monotonic() - started
    assert (model.spec.image_size, model.spec.output_dim, model.backend) == (64, 256, "tflite")
    assert model.tflite_file and os.path.exists(model.tflite_file)
    assert multiprocessing.active_children() == []

    # The caller fails (say, an input pattern matches nothing) while the check is
    # still importing TensorFlow: the check is stopped, not waited for.
    with pytest.raises(InterruptedError), prepared_meanwhile([tiny_model_dir], "auto"):
        (child,) = multiprocessing.active_children()
        started = time.monotonic()
        raise InterruptedError
    assert time.monotonic() - started < full_check / 2
    assert child.exitcode == -signal.SIGTERM  # killed by the signal, as multiprocessing reports it
    assert multiprocessing.active_children() == []

    with (
        pytest.raises(ModelLoadError, match="Unknown model"),
        prepared_meanwhile([tiny_model_dir + ".h5"], "auto") as prepared,
    ):
        prepared()
