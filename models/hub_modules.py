"""TF Hub handles and SavedModel folders, through ``tensorflow_hub.load``.

Covers the three formats the MobileNet V1 family was published in: TF2
SavedModels (v4, and the Kaggle layout), and TF1 Hub modules, fixed-size (v1)
and variable-size (v3), including the quantops ones. A TF2 module is called
directly; a TF1 module through its ``image_feature_vector`` signature, or
``default`` for classifiers. Both take [0, 1] images.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import urllib.error

import numpy as np

from imgembed.models.embedder import Embedder
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import NUM_CLASSES, Flavour, Format, ModelSpec

_log = logging.getLogger(__name__)

# How long one hub download may stall before we give up (urllib has no default).
HUB_SOCKET_TIMEOUT_SECS = 60
# Signatures of TF1 Hub modules and plain SavedModels, in order of preference.
SIGNATURES = ("image_feature_vector", "default", "serving_default")
SIZE_IN_NAME = re.compile(r"(?:^|[_/.-])(128|160|192|224)(?:$|[_/.-])")


@contextlib.contextmanager
def hub_errors(source: str):
    """Turns download and format failures into a ModelLoadError that says what to do."""
    import tensorflow as tf

    previous_timeout = socket.getdefaulttimeout()
    # urllib waits forever by default; a stalled download should fail instead.
    socket.setdefaulttimeout(HUB_SOCKET_TIMEOUT_SECS)
    try:
        yield
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise ModelLoadError(
            f"Could not download {source} ({error}). Without network access, fetch the "
            f"model elsewhere ({source}?tf-hub-format=compressed is a .tar.gz), unpack it "
            "and pass the folder as --model /path/to/folder, or point TFHUB_CACHE_DIR at "
            "a TF Hub cache that already holds it."
        ) from error
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise ModelLoadError(f"{source} is not a SavedModel or TF Hub module: {error}") from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def check_available(source: str) -> None:
    """Downloads into the TF Hub cache (TFHUB_CACHE_DIR) now, so a job fails
    before it starts rather than on every worker."""
    import tensorflow_hub as hub

    with hub_errors(source):
        hub.resolve(source)


def _load(source: str):
    """(module, function of [0, 1] image tensors, fixed input side or None)."""
    import tensorflow_hub as hub

    with hub_errors(source):
        module = hub.load(source)
    if callable(module):
        shapes = [
            concrete.structured_input_signature[0][0].shape
            for concrete in getattr(module.__call__, "concrete_functions", [])
        ]
        return module, module, _fixed_side(shapes)
    signatures = getattr(module, "signatures", {})
    for name in SIGNATURES:
        if name in signatures:
            call, shape = _signature_call(signatures[name])
            return module, call, _fixed_side([shape])
    raise ModelLoadError(
        f"{source} has no callable and none of the signatures {SIGNATURES}; it has {sorted(signatures)}"
    )


def _signature_call(signature):
    """Signatures take keyword tensors and return dicts: make a plain function."""
    ((input_name, input_spec),) = signature.structured_input_signature[1].items()
    outputs = signature.structured_outputs
    output_name = "default" if "default" in outputs else next(iter(outputs))

    def call(images):
        return signature(**{input_name: images})[output_name]

    return call, input_spec.shape


def _fixed_side(shapes) -> int | None:
    for shape in shapes:
        if shape.rank == 4 and shape[1] is not None:
            return int(shape[1])
    return None


def _numpy_call(call):
    import tensorflow as tf

    return lambda images: call(tf.convert_to_tensor(images, tf.float32)).numpy()


def describe(source: str) -> ModelSpec:
    """Loads the module once to learn its input size and output width."""
    _, call, declared = _load(source)
    image_size = declared or _size_from_name(source)
    probe = _numpy_call(call)(np.zeros([1, image_size, image_size, 3], np.float32))
    output_dim = int(np.prod(probe.shape[1:]))
    classifier = output_dim in (NUM_CLASSES, NUM_CLASSES - 1)
    flavour = Flavour.CLASSIFICATION if classifier else Flavour.FEATURE_VECTOR
    return ModelSpec(name_from_source(source), source, image_size, output_dim, flavour, Format.HUB)


def traceable_function(spec: ModelSpec):
    """A tf.function of one [1, S, S, 3] image in [0, 1], and what must stay alive for it:
    the module called, or its signature read, exactly as ``load`` does."""
    import tensorflow as tf

    module, call, _ = _load(spec.source)
    signature = tf.TensorSpec([1, spec.image_size, spec.image_size, 3], tf.float32)
    return tf.function(lambda images: call(images)).get_concrete_function(signature), module


def load(spec: ModelSpec) -> Embedder:
    module, call, _ = _load(spec.source)
    return Embedder(spec, _numpy_call(call), keep_alive=module)


def _size_from_name(source: str) -> int:
    match = SIZE_IN_NAME.search(source)
    if match:
        return int(match.group(1))
    _log.warning("Input size of %s unknown; using 224", source)
    return 224


def name_from_source(source: str) -> str:
    """A folder name: ``.../mobilenet_v1_050_160/feature_vector/5`` ->
    ``mobilenet_v1_050_160_feature_vector_5``; ``/models/mine`` -> ``mine``."""
    path = re.sub(r"^[a-z][a-z0-9+.-]*://", "", source).split("?")[0]
    parts = [part for part in path.split("/") if part]
    starts = [i for i, part in enumerate(parts) if part.startswith("mobilenet")]
    if starts:  # hub handles: <model>/[quantops/]<flavour>/<version>
        parts = parts[starts[-1] :]
    elif len(parts) >= 3 and parts[-1].isdigit():
        parts = parts[-3:]
    else:
        parts = parts[-1:]
    name = re.sub(r"\.(tar\.gz|tgz|tar)$", "", "_".join(parts))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
