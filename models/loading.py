"""Turn what the user typed after ``--model`` into a model spec, and a spec into a model.

A model reference is one of
- a short name from ``models.registry`` (``mobilenet_v1_100_224``, ``..._quantops``);
- a TF Hub handle or any http(s) URL serving a (compressed) SavedModel;
- a local or cloud (``gs://``) SavedModel or TF1 Hub module folder;
- a model file: ``.pb`` (frozen TF-Slim graph), ``.tflite`` (float or quantized;
  ``a.tflite+b.tflite`` chains two), ``.h5`` / ``.keras`` (Keras MobileNet).
A file reads its pooled feature vector; append ``#classification`` for its class
scores instead (``mobilenet_v1_0.5_160_quant.tflite#classification``). Prefix
``name=`` to choose the model's name (its output folder): ``coral=models/a.tflite``.

Every loaded model is an ``Embedder`` (models/embedder.py): float32 [N, S, S, 3]
in [0, 1] in, float32 [N, D] out.

>>> embedder = load_model(resolve_spec("mobilenet_v1_100_224_embedded"))
>>> embedder(np.zeros([1, 224, 224, 3], np.float32)).shape
(1, 1024)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator

from imgembed.models.embedder import Embedder
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import EMBEDDED_SOURCE, KNOWN_MODELS, Flavour, Format, ModelSpec

LOADERS = {
    Format.HUB: "imgembed.models.hub_modules",
    Format.FROZEN_GRAPH: "imgembed.models.frozen_graph",
    Format.TFLITE: "imgembed.models.tflite",
    Format.KERAS: "imgembed.models.keras_files",
}
FILE_FORMATS = {
    ".pb": Format.FROZEN_GRAPH,
    ".tflite": Format.TFLITE,
    ".h5": Format.KERAS,
    ".keras": Format.KERAS,
}
EXPECTED = (
    "a short name (see `imgembed models`), a TF Hub handle or URL, a SavedModel folder, "
    "or a .pb, .tflite or .h5/.keras model file"
)


def _loader(model_format: Format):
    return importlib.import_module(LOADERS[Format(model_format)])


def _split_flavour(reference: str) -> tuple[str, Flavour]:
    source, _, flavour = reference.partition("#")
    try:
        return source, Flavour(flavour) if flavour else Flavour.FEATURE_VECTOR
    except ValueError:
        raise ModelLoadError(f"#{flavour}: the flavour must be #feature_vector or #classification") from None


_NAMED = re.compile(r"^([A-Za-z0-9._-]+)=(.+)$")


def resolve_spec(reference: str) -> ModelSpec:
    """Names, shapes and source of a model; loads it only if it is not in the registry."""
    named = _NAMED.match(reference)
    if named:
        return dataclasses.replace(_resolve(named.group(2)), name=named.group(1))
    return _resolve(reference)


def _resolve(reference: str) -> ModelSpec:
    if reference in KNOWN_MODELS:
        return KNOWN_MODELS[reference]
    for spec in KNOWN_MODELS.values():
        if reference.rstrip("/") == spec.source and spec.source != EMBEDDED_SOURCE:
            return spec
    if re.match(r"^[a-z][a-z0-9+.-]*://", reference) and not reference.startswith("file://"):
        return _loader(Format.HUB).describe(reference)
    source, flavour = _split_flavour(reference)
    if os.path.isdir(source):
        return _loader(Format.HUB).describe(os.path.abspath(source))
    parts = source.split("+")
    formats = {FILE_FORMATS.get(os.path.splitext(part)[1].lower()) for part in parts}
    if len(formats) == 1 and None not in formats and all(os.path.isfile(part) for part in parts):
        (model_format,) = formats
        if len(parts) > 1 and model_format is not Format.TFLITE:
            raise ModelLoadError(f"{source}: only .tflite files can be chained with '+'")
        return _loader(model_format).describe("+".join(os.path.abspath(p) for p in parts), flavour)
    if os.path.exists(source):
        raise ModelLoadError(f"{source} is not a model this tool reads: expected {EXPECTED}")
    raise ModelLoadError(f"Unknown model {reference!r}: it is not {EXPECTED}")


BACKENDS = ("auto", "tensorflow", "tflite")


def load_model(spec: ModelSpec, backend: str = "auto", threads: int | None = None) -> Embedder:
    """Loads the model; TensorFlow models run through TFLite/XNNPACK when ``backend``
    is ``tflite``, or ``auto`` and the TFLite version matches TensorFlow (models/fast_backend.py).
    ``threads`` caps TFLite's threads (None: its default)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if spec.format is Format.TFLITE:
        return _loader(Format.TFLITE).load(spec, threads)

    def load_tensorflow() -> Embedder:
        return _loader(spec.format).load(spec)

    if backend == "tensorflow":
        return load_tensorflow()
    from imgembed.models.fast_backend import load_fast

    return load_fast(
        spec, load_tensorflow, lambda: traceable_function(spec), threads, strict=backend == "tflite"
    )


def traceable_function(spec: ModelSpec):
    """The model as a TensorFlow function of one [1, S, S, 3] image in [0, 1] (what
    TFLite's converter takes), and what must stay alive for it."""
    if spec.format is Format.TFLITE:
        raise ModelLoadError(f"{spec.name} is already TFLite; use its float source model instead")
    return _loader(spec.format).traceable_function(spec)


def check_available(spec: ModelSpec) -> None:
    """Fails fast, before a job starts, where its workers would fail to load the model."""
    if spec.source == EMBEDDED_SOURCE:
        from imgembed.models.embedded import graph_path

        graph_path()
    elif spec.format is Format.HUB:
        _loader(Format.HUB).check_available(spec.source)
    else:
        for part in spec.source.split("+"):
            if not os.path.isfile(part):
                raise ModelLoadError(f"model file {part} does not exist")


@contextlib.contextmanager
def checked_meanwhile(references: list[str]) -> Iterator[Callable[[], list[ModelSpec]]]:
    """Starts ``resolve_spec`` then ``check_available`` for each reference, and yields
    the call that collects the specs (or raises the error), so that the caller can
    work meanwhile: a job's launcher lists its inputs. Leaving the block stops the
    check if it is still running.

    It runs in a fresh child process unless all are the embedded model. Describing
    a model file or module loads it, and checking a hub handle imports tensorflow_hub:
    either brings in TensorFlow (~600 MB), which would then stay in the caller for
    good. A job's launcher has no other use for it, and on the local runner it is
    where the shuffles are held."""
    if all(_is_embedded(reference) for reference in references):
        yield lambda: _resolve_and_check(references)
        return
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of ours is copied
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_check_and_send, args=(references, send), daemon=True)
    child.start()
    send.close()  # the child holds the only sending end: its death ends the pipe

    def collect() -> list[ModelSpec]:
        try:
            succeeded, value = receive.recv()
        except EOFError:
            child.join()
            raise ModelLoadError(
                f"the process checking {', '.join(references)} died (exit code {child.exitcode}) "
                "before it answered"
            ) from None
        if succeeded:
            return value
        raise value

    try:
        yield collect
    finally:
        child.terminate()  # a no-op once it has sent its answer and exited
        child.join()
        receive.close()


def _check_and_send(references: list[str], send) -> None:
    try:
        answer = (True, _resolve_and_check(references))
    except Exception as error:  # sent to the parent, which raises it
        answer = (False, error)
    send.send(answer)


def _is_embedded(reference: str) -> bool:
    named = _NAMED.match(reference)
    spec = KNOWN_MODELS.get(named.group(2) if named else reference)
    return spec is not None and spec.source == EMBEDDED_SOURCE


def _resolve_and_check(references: list[str]) -> list[ModelSpec]:
    specs = [resolve_spec(reference) for reference in references]
    for spec in specs:
        check_available(spec)
    return specs
