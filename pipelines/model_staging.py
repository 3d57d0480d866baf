"""Models where every worker can read them: files on the launcher's disk are copied
beside the outputs (``OUT/_models/``) before the job starts, so no worker ever
needs a path of the launcher's disk.

What is staged: the verified TFLite conversion a TensorFlow model runs as (the
workers then need neither the conversion nor TensorFlow to load it), and local
model files and folders run as they are. Hub handles, the embedded model (a
package installed on every worker) and models already on an object store are
read where they are. Staged names carry a hash of their content, so a rerun
copies nothing and two versions of a model never share a name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from imgembed.common import storage
from imgembed.common.local_copies import is_remote
from imgembed.models.loading import PreparedModel
from imgembed.models.registry import EMBEDDED_SOURCE, Format, ModelSpec

MODELS_FOLDER = "_models"


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """``spec``: the model as the user named it (recorded with the outputs);
    ``backend``: what runs; ``runtime``: what the workers load."""

    spec: ModelSpec
    backend: str
    runtime: ModelSpec


def content_digest(path: str) -> str:
    """sha256 of a local file, or of a folder's relative names and bytes."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else storage.files_under(path)
    for file in sorted(files):
        digest.update(os.path.relpath(file, path).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _stage(local: str, models_dir: str, name: str, dry_run: bool) -> str:
    """The staged copy of a local file or folder (copied unless it is there already)."""
    target = storage.join(models_dir, name)
    if dry_run:
        return target
    if os.path.isfile(local):
        if not storage.exists(target):
            storage.copy_file(local, target)
    elif not storage.exists(storage.join(target, "saved_model.pb")):
        storage.copy_tree(local, target)
    return target


def _needs_staging(source: str) -> bool:
    return (
        source != EMBEDDED_SOURCE and not source.startswith(("http://", "https://")) and not is_remote(source)
    )


def stage(prepared: PreparedModel, output_dir: str, dry_run: bool = False) -> StagedModel:
    """Where workers load ``prepared`` from; copies what they could not reach."""
    spec, models_dir = prepared.spec, storage.join(output_dir, MODELS_FOLDER)
    if prepared.tflite_file is not None:  # the conversion is named by its content already
        source = _stage(prepared.tflite_file, models_dir, os.path.basename(prepared.tflite_file), dry_run)
        runtime = dataclasses.replace(spec, source=source, format=Format.TFLITE)
        return StagedModel(spec, prepared.backend, runtime)
    parts = spec.source.split("+") if spec.format is Format.TFLITE else [spec.source]
    staged = [
        _stage(part, models_dir, f"{content_digest(part)}-{os.path.basename(part)}", dry_run)
        if _needs_staging(part)
        else part
        for part in parts
    ]
    return StagedModel(spec, prepared.backend, dataclasses.replace(spec, source="+".join(staged)))
