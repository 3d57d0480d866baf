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


def content_digest(path: str) -> str:
    """sha256 of a local file, or of a folder's relative names and bytes."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else storage.files_under(path)
    for file in sorted(files):
        digest.update(os.path.relpath(file, path).encode() + b"\0")
        _hash_file(digest, file)
    return digest.hexdigest()[:16]


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


def _stage(local: str, models_dir: str, name: str, dry_run: bool) -> str:
    """The staged copy of a local file or folder. A copy is trusted only when the
    record written after it (``<name>.staged.json``: each file's size and sha256)
    matches the local files and every staged file has its size: a launch killed
    while it copied leaves a copy without a record, or a file cut short, and the
    next launch stages it again."""
    target = storage.join(models_dir, name)
    if dry_run:
        return target
    files, folder = _files_of(local), os.path.isdir(local)
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
        source = _stage(prepared.tflite_file, models_dir, os.path.basename(prepared.tflite_file), dry_run)
        runtime = dataclasses.replace(spec, source=source, format=Format.TFLITE)
        return StagedModel(spec, prepared.backend, runtime, prepared.precision, prepared.fidelity)
    parts = spec.source.split("+") if spec.format is Format.TFLITE else [spec.source]
    staged = [
        _stage(part, models_dir, f"{content_digest(part)}-{os.path.basename(part)}", dry_run)
        if _needs_staging(part)
        else part
        for part in parts
    ]
    return StagedModel(spec, prepared.backend, dataclasses.replace(spec, source="+".join(staged)))
