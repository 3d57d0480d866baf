"""Turn what the user typed after ``--model`` into a model spec, and a spec into a model.

A model reference is one of
- a short name from ``models.registry`` (``mobilenet_v1_100_224``, ``..._quantops``);
- a TF Hub handle or any http(s) URL serving a (compressed) SavedModel;
- a SavedModel or TF1 Hub module folder, local or on any Beam filesystem (``gs://``);
- a model file, local or on any Beam filesystem: ``.pb`` (frozen TF-Slim graph),
  ``.tflite`` (float or quantized; ``a.tflite+b.tflite`` chains two), ``.h5`` /
  ``.keras`` (Keras MobileNet).
A file reads its pooled feature vector; append ``#classification`` for its class
scores instead (``mobilenet_v1_0.5_160_quant.tflite#classification``). Prefix
``name=`` to choose the model's name (its output folder): ``coral=models/a.tflite``.
Models on object stores are copied to this machine once (imgembed/common/local_copies.py).

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

from imgembed.common import storage
from imgembed.common.local_copies import is_remote, local_path
from imgembed.models import fast_backend
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
BACKENDS = ("auto", "tensorflow", "tflite")


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


def _file_format(parts: list[str]) -> Format | None:
    formats = {FILE_FORMATS.get(os.path.splitext(part)[1].lower()) for part in parts}
    return formats.pop() if len(formats) == 1 and None not in formats else None


def _resolve(reference: str) -> ModelSpec:
    if reference in KNOWN_MODELS:
        return KNOWN_MODELS[reference]
    for spec in KNOWN_MODELS.values():
        if reference.rstrip("/") == spec.source and spec.source != EMBEDDED_SOURCE:
            return spec
    if reference.startswith(("http://", "https://")):
        return _loader(Format.HUB).describe(reference)
    source, flavour = _split_flavour(reference)
    parts = [part if is_remote(part) else os.path.abspath(part) for part in source.split("+")]
    model_format = _file_format(parts)
    if model_format is not None:
        if len(parts) > 1 and model_format is not Format.TFLITE:
            raise ModelLoadError(f"{source}: only .tflite files can be chained with '+'")
        missing = [part for part in parts if not _file_exists(part)]
        if not missing:
            local = "+".join(local_path(part) for part in parts)
            spec = _loader(model_format).describe(local, flavour)
            return dataclasses.replace(spec, source="+".join(parts))
    elif is_remote(source):  # a SavedModel folder on an object store
        spec = _loader(Format.HUB).describe(local_path(source, folder=True))
        return dataclasses.replace(spec, source=source.rstrip("/"))
    elif os.path.isdir(source):
        return _loader(Format.HUB).describe(os.path.abspath(source))
    if os.path.exists(source):
        raise ModelLoadError(f"{source} is not a model this tool reads: expected {EXPECTED}")
    raise ModelLoadError(f"Unknown model {reference!r}: it is not {EXPECTED}")


def _file_exists(path: str) -> bool:
    return storage.exists(path) if is_remote(path) else os.path.isfile(path)


def on_local_disk(spec: ModelSpec) -> ModelSpec:
    """The spec with its files on this machine (copied once from an object store)."""
    if spec.format is Format.HUB:
        if not is_remote(spec.source):
            return spec
        return dataclasses.replace(spec, source=local_path(spec.source, folder=True))
    if spec.source == EMBEDDED_SOURCE or not any(is_remote(part) for part in spec.source.split("+")):
        return spec
    return dataclasses.replace(spec, source="+".join(local_path(p) for p in spec.source.split("+")))


def load_model(spec: ModelSpec, backend: str = "auto", threads: int | None = None) -> Embedder:
    """Loads the model; TensorFlow models run through TFLite/XNNPACK when ``backend``
    is ``tflite``, or ``auto`` and the TFLite version matches TensorFlow (models/fast_backend.py).
    ``threads`` caps TFLite's threads (None: its default)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    named = spec
    spec = on_local_disk(spec)
    if spec.format is Format.TFLITE:
        return _renamed(_loader(Format.TFLITE).load(spec, threads), named)
    if backend == "tensorflow":
        return _renamed(_load_tensorflow(spec), named)
    embedder = fast_backend.load_fast(
        spec, lambda: _load_tensorflow(spec), lambda: traceable_function(spec), threads, backend == "tflite"
    )
    return _renamed(embedder, named)


def _load_tensorflow(spec: ModelSpec) -> Embedder:
    return _loader(spec.format).load(spec)


def _renamed(embedder: Embedder, spec: ModelSpec) -> Embedder:
    embedder.spec = spec  # the spec as named, not its local copy
    return embedder


def traceable_function(spec: ModelSpec):
    """The model as a TensorFlow function of one [1, S, S, 3] image in [0, 1] (what
    TFLite's converter takes), and what must stay alive for it."""
    if spec.format is Format.TFLITE:
        raise ModelLoadError(f"{spec.name} is already TFLite; use its float source model instead")
    return _loader(spec.format).traceable_function(on_local_disk(spec))


def check_available(spec: ModelSpec) -> None:
    """Fails fast, before a job starts, where its workers would fail to load the model."""
    if spec.source == EMBEDDED_SOURCE:
        from imgembed.models.embedded import graph_path

        graph_path()
    elif spec.format is not Format.HUB:
        for part in spec.source.split("+"):
            if not _file_exists(part):
                raise ModelLoadError(f"model file {part} does not exist")
    elif is_remote(spec.source):
        if not storage.exists(storage.join(spec.source, "saved_model.pb")):
            raise ModelLoadError(f"{spec.source} holds no saved_model.pb: not a SavedModel folder")
    else:
        _loader(Format.HUB).check_available(spec.source)


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A model as a job runs it: ``backend`` is what runs (tflite or tensorflow, never
    auto); ``tflite_file`` the verified local conversion a TensorFlow model runs as,
    if any; ``note`` why auto chose TensorFlow, or fp32 runs instead of int8."""

    spec: ModelSpec
    backend: str
    tflite_file: str | None = None
    note: str | None = None
    precision: str = "fp32"  # int8: ``tflite_file`` is the quantized model (pipelines/precision.py)
    fidelity: dict | None = None  # int8's, measured against fp32 on images of the run


def prepare(spec: ModelSpec, backend: str) -> PreparedModel:
    """Checks the model and settles ``backend``: TensorFlow models are converted to
    TFLite and checked against TensorFlow now, once, rather than on every worker."""
    check_available(spec)
    if spec.format is Format.TFLITE:
        return PreparedModel(spec, "tflite")
    if backend == "tensorflow":
        return PreparedModel(spec, "tensorflow")
    local = on_local_disk(spec)
    try:
        path = fast_backend.verified_tflite_file(
            local, lambda: _load_tensorflow(local), lambda: traceable_function(local)
        )
    except fast_backend.FastBackendUnavailable as unavailable:
        if backend == "tflite":
            raise ModelLoadError(str(unavailable)) from unavailable
        return PreparedModel(spec, "tensorflow", note=f"{unavailable}; running it in TensorFlow")
    return PreparedModel(spec, "tflite", str(path))


def _prepared_without_tensorflow(reference: str, backend: str) -> PreparedModel | None:
    """The embedded model when its answer is already known (its TFLite conversion was
    verified before, or TensorFlow is asked for): no TensorFlow needed to say so."""
    named = _NAMED.match(reference)
    spec = KNOWN_MODELS.get(named.group(2) if named else reference)
    if spec is None or spec.source != EMBEDDED_SOURCE:
        return None
    spec = dataclasses.replace(spec, name=named.group(1)) if named else spec
    check_available(spec)
    if backend == "tensorflow":
        return PreparedModel(spec, "tensorflow")
    cached = fast_backend.already_verified(spec)
    return PreparedModel(spec, "tflite", str(cached)) if cached else None


@contextlib.contextmanager
def prepared_meanwhile(references: list[str], backend: str) -> Iterator[Callable[[], list[PreparedModel]]]:
    """Starts ``resolve_spec`` then ``prepare`` for each reference, and yields the call
    that collects the results (or raises the error), so that the caller can work
    meanwhile: a job's launcher lists its inputs. Leaving the block stops the work
    if it is still running.

    It runs in a fresh child process unless every answer is known without
    TensorFlow. Describing, converting or checking a model loads TensorFlow
    (~600 MB), which would then stay in the caller for good; a job's launcher has
    no other use for it, and on the local runner it is where the shuffles are held."""
    known = [_prepared_without_tensorflow(reference, backend) for reference in references]
    if all(known):
        yield lambda: known
        return
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of ours is copied
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_prepare_and_send, args=(references, backend, send), daemon=True)
    child.start()
    send.close()  # the child holds the only sending end: its death ends the pipe

    def collect() -> list[PreparedModel]:
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


def _prepare_and_send(references: list[str], backend: str, send) -> None:
    try:
        answer = (True, [prepare(resolve_spec(reference), backend) for reference in references])
    except Exception as error:  # sent to the parent, which raises it
        answer = (False, error)
    send.send(answer)
