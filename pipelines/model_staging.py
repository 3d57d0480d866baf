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
import json
import os

from imgembed.common import storage
from imgembed.common.local_copies import is_remote
from imgembed.models.loading import PreparedModel
from imgembed.models.registry import EMBEDDED_SOURCE, Format, ModelSpec

MODELS_FOLDER = "_models"
# Written beside a staged model once it is copied whole: what it must hold.
STAGED_SUFFIX = ".staged.json"


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """``spec``: the model as the user named it (recorded with the outputs);
    ``backend``: what runs; ``runtime``: what the workers load."""

    spec: ModelSpec
    backend: str
    runtime: ModelSpec
    precision: str = "fp32"
    fidelity: dict | None = None


def _hash_file(digest, path: str):
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def _file_sha256(path: str) -> str:
    return _hash_file(hashlib.sha256(), path).hexdigest()


def _files_of(path: str) -> dict[str, dict]:
    """Each file of a local file (as "") or folder (relative names): size and sha256."""
    if os.path.isfile(path):
        return {"": {"size": os.path.getsize(path), "sha256": _file_sha256(path)}}
    return {
        os.path.relpath(file, path): {"size": os.path.getsize(file), "sha256": _file_sha256(file)}
        for file in sorted(storage.files_under(path))
    }


def _staged_sizes(target: str, folder: bool) -> dict[str, int]:
    """The size of each staged file, named as ``_files_of`` names them."""
    (found,) = storage.match_sizes([storage.join(target, "**") if folder else target])
    if not folder:
        return {"": found[target]} if target in found else {}
    prefix = storage.join(target, "")
    return {
        path.removeprefix(prefix): size
        for path, size in found.items()
        if not (storage.is_local(path) and os.path.isdir(path))
    }


def _stage(local: str, models_dir: str, dry_run: bool, named_by_content: bool = False) -> str:
    """The staged copy of a local file or folder (its name prefixed with a digest of
    its files unless ``named_by_content`` already). A copy is trusted only when the
    record written after it (``<name>.staged.json``: each file's size and sha256)
    matches the local files and every staged file has its size: a launch killed
    while it copied leaves a copy without a record, or a file cut short, and the
    next launch stages it again."""
    files, folder = _files_of(local), os.path.isdir(local)
    name = os.path.basename(local)
    if not named_by_content:
        name = f"{hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]}-{name}"
    target = storage.join(models_dir, name)
    if dry_run:
        return target
    sizes = {relative: file["size"] for relative, file in files.items()}
    record = target + STAGED_SUFFIX
    if (
        storage.exists(record)
        and storage.read_json(record).get("files") == files
        and _staged_sizes(target, folder) == sizes
    ):
        return target
    if folder:
        storage.copy_tree(local, target)
    else:
        storage.copy_file(local, target)
    if _staged_sizes(target, folder) != sizes:
        raise OSError(f"staging {local} to {target} left files of other sizes than the originals")
    storage.write_atomically(record, json.dumps({"files": files}, sort_keys=True).encode())
    return target


def _needs_staging(source: str) -> bool:
    return (
        source != EMBEDDED_SOURCE and not source.startswith(("http://", "https://")) and not is_remote(source)
    )


def stage(prepared: PreparedModel, output_dir: str, dry_run: bool = False) -> StagedModel:
    """Where workers load ``prepared`` from; copies what they could not reach."""
    spec, models_dir = prepared.spec, storage.join(output_dir, MODELS_FOLDER)
    if prepared.tflite_file is not None:  # the conversion is named by its content already
        source = _stage(prepared.tflite_file, models_dir, dry_run, named_by_content=True)
        runtime = dataclasses.replace(spec, source=source, format=Format.TFLITE)
        return StagedModel(spec, prepared.backend, runtime, prepared.precision, prepared.fidelity)
    parts = spec.source.split("+") if spec.format is Format.TFLITE else [spec.source]
    staged = [_stage(part, models_dir, dry_run) if _needs_staging(part) else part for part in parts]
    return StagedModel(spec, prepared.backend, dataclasses.replace(spec, source="+".join(staged)))
