"""Turn what the user typed after ``--model`` into a loaded model.

A model reference is one of
- a short name from ``models.registry`` (``mobilenet_v1_100_224``),
- a TF Hub handle or any http(s) URL serving a (compressed) SavedModel,
- a local or cloud (``gs://``) SavedModel or TF Hub module directory.

Every loaded model is an ``Embedder``: float32 RGB [N, S, S, 3] in [0, 1] in,
float32 [N, D] out, the TF Hub image-module convention.

>>> embedder = load_model(resolve_spec("mobilenet_v1_100_224_embedded"))
>>> embedder(np.zeros([1, 224, 224, 3], np.float32)).shape
(1, 1024)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import urllib.error

import numpy as np

from models.errors import ModelLoadError
from models.registry import EMBEDDED_SOURCE, KNOWN_MODELS, NUM_CLASSES, Flavour, ModelSpec

_log = logging.getLogger(__name__)

# How long one hub download may stall before we give up (urllib has no default).
HUB_SOCKET_TIMEOUT_SECS = 60
# Signatures of TF1 Hub modules and plain SavedModels, in order of preference.
_SIGNATURES = ("image_feature_vector", "default", "serving_default")
_SIZE_IN_NAME = re.compile(r"(?:^|[_/.-])(128|160|192|224)(?:$|[_/.-])")


class Embedder:
    """A loaded model, called on float32 [N, S, S, 3] images in [0, 1]."""

    def __init__(self, spec: ModelSpec, module, call):
        self.spec = spec
        # Keep the module referenced: its variables die with it (see PLATFORM.md).
        self._module = module
        self._call = call

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        outputs = self._call(tf.convert_to_tensor(images, tf.float32))
        return np.asarray(outputs, dtype=np.float32).reshape(len(images), -1)


def resolve_spec(reference: str) -> ModelSpec:
    """Names, shapes and source of a model; loads it only if it is not in the registry."""
    if reference in KNOWN_MODELS:
        return KNOWN_MODELS[reference]
    for spec in KNOWN_MODELS.values():
        if reference.rstrip("/") == spec.source:
            return spec
    source = _normalise_source(reference)
    module, call, declared_size = _load_module(source)
    image_size = _infer_image_size(declared_size, source)
    probe = np.asarray(call(_zeros(image_size)))
    output_dim = int(np.prod(probe.shape[1:]))
    flavour = (
        Flavour.CLASSIFICATION if output_dim in (NUM_CLASSES, NUM_CLASSES - 1) else Flavour.FEATURE_VECTOR
    )
    return ModelSpec(_name_from_source(source), source, image_size, output_dim, flavour)


def load_model(spec: ModelSpec) -> Embedder:
    if spec.source == EMBEDDED_SOURCE:
        from models.embedded import load_embedded_module

        module = load_embedded_module(spec.flavour)
        return Embedder(spec, module, module)
    module, call, _ = _load_module(spec.source)
    return Embedder(spec, module, call)


def _normalise_source(reference: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*://", reference):
        return reference
    if os.path.isdir(reference):
        return os.path.abspath(reference)
    raise ModelLoadError(
        f"Unknown model {reference!r}: not a short name (see `imgembed models`), "
        "not a URL, and not a SavedModel directory."
    )


def check_available(spec: ModelSpec) -> None:
    """Fails fast, before a job starts, where its workers would fail to load the model.

    For hub handles this downloads the model into the TF Hub cache
    (``TFHUB_CACHE_DIR``), so local workers then load it from disk.
    """
    if spec.source == EMBEDDED_SOURCE:
        from models.embedded import graph_path

        graph_path()
        return
    import tensorflow_hub as hub

    with _hub_errors(spec.source):
        hub.resolve(spec.source)


@contextlib.contextmanager
def _hub_errors(source: str):
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


def _load_module(source: str):
    """hub.load the source; return it, the function mapping images to vectors, and
    the fixed input side when the module declares one."""
    import tensorflow_hub as hub

    with _hub_errors(source):
        module = hub.load(source)
    return (module, *_image_function(module, source))


def _image_function(module, source: str):
    if callable(module):
        shapes = [
            concrete.structured_input_signature[0][0].shape
            for concrete in getattr(module.__call__, "concrete_functions", [])
        ]
        return module, _fixed_side(shapes)
    signatures = getattr(module, "signatures", {})
    for name in _SIGNATURES:
        if name in signatures:
            return _signature_call(signatures[name])
    raise ModelLoadError(
        f"{source} has no callable and none of the signatures {_SIGNATURES}; it has {sorted(signatures)}"
    )


def _signature_call(signature):
    """Signatures take keyword tensors and return dicts: make a plain function."""
    ((input_name, input_spec),) = signature.structured_input_signature[1].items()
    outputs = signature.structured_outputs
    output_name = "default" if "default" in outputs else next(iter(outputs))

    def call(images):
        return signature(**{input_name: images})[output_name]

    return call, _fixed_side([input_spec.shape])


def _fixed_side(shapes) -> int | None:
    for shape in shapes:
        if shape.rank == 4 and shape[1] is not None:
            return int(shape[1])
    return None


def _infer_image_size(declared: int | None, source: str) -> int:
    """The module's fixed input side, else the size in its name, else 224."""
    if declared:
        return declared
    match = _SIZE_IN_NAME.search(source)
    if match:
        return int(match.group(1))
    _log.warning("Input size of %s unknown; using 224", source)
    return 224


def _zeros(image_size: int):
    import tensorflow as tf

    return tf.zeros([1, image_size, image_size, 3], tf.float32)


def _name_from_source(source: str) -> str:
    """A folder name for a model: ``.../mobilenet_v1_050_160/feature_vector/5`` ->
    ``mobilenet_v1_050_160_feature_vector_5``; ``/models/mine`` -> ``mine``."""
    path = re.sub(r"^[a-z][a-z0-9+.-]*://", "", source).split("?")[0]
    parts = [part for part in path.split("/") if part]
    # Hub handles end in <model>/<flavour>/<version>; keep all three.
    parts = parts[-3:] if len(parts) >= 3 and parts[-1].isdigit() else parts[-1:]
    name = "_".join(parts)
    name = re.sub(r"\.(tar\.gz|tgz|tar)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
