"""Files and folders on any Beam filesystem (gs://, s3://...), copied once to this
machine's disk for the libraries that read only local paths (TFLite, Keras, TF
Hub's loader for folders, faiss, tf.Transform's graph loader).

Copies are cached by what the store says of the source (path, size, time of last
change), so a worker copies each model once, and a model replaced at the same
path is copied again.

>>> local_path("gs://bucket/models/mobilenet.tflite")
'/root/.cache/imgembed/copies/3f1c9a0b2d4e6f70/mobilenet.tflite'
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile

from imgembed.common import storage


def cache_root() -> pathlib.Path:
    base = os.environ.get("IMGEMBED_CACHE_DIR", pathlib.Path.home() / ".cache" / "imgembed")
    return pathlib.Path(base) / "copies"


def is_remote(source: str) -> bool:
    """On a filesystem other than this machine's disk, and not a hub handle (http)."""
    return not storage.is_local(source) and not source.startswith(("http://", "https://"))


def local_path(source: str, folder: bool = False) -> str:
    """``source`` itself when it is local; else the path of its local copy (a file, or
    a folder with ``folder``)."""
    if not is_remote(source):
        return source
    from apache_beam.io.filesystems import FileSystems

    pattern = storage.join(source, "**") if folder else source
    (result,) = FileSystems.match([pattern])
    found = sorted(
        (metadata.path, metadata.size_in_bytes, metadata.last_updated_in_seconds)
        for metadata in result.metadata_list
    )
    if not found:
        raise FileNotFoundError(f"{source} does not exist")
    version = hashlib.sha256(repr(found).encode()).hexdigest()[:16]
    name = source.rstrip("/").rsplit("/", 1)[-1]
    target = cache_root() / version / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copied aside, then renamed: workers of one machine may copy at the same time.
        staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-"))
        try:
            if folder:
                storage.copy_tree(source, str(staging / name))
            else:
                storage.copy_file(source, str(staging / name))
            try:
                os.rename(staging / name, target)
            except OSError:
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
