"""Files and folders on any Beam filesystem (gs://, s3://...), copied once to this
machine's disk for the libraries that read only local paths (TFLite, Keras, TF
Hub's loader for folders, faiss, tf.Transform's graph loader).

Copies are cached by what the store says of the source (path, size, time of last
change), so a worker copies each model once, and a model replaced at the same
path is copied again. Of the copies of the files of one folder (the versions of a
remote index, as a service follows its syncs), the KEEP_COPIES used last are kept
and the older ones deleted (a process that still maps one keeps reading it).

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

# Copies kept of the entries of one remote folder (index versions: the live one,
# the one before, and one more for readers that have not switched yet).
KEEP_COPIES = 3
SOURCE_FILE = ".source"


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
    if target.exists():
        os.utime(target.parent)  # used now: the last to be evicted
    else:
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
        (target.parent / SOURCE_FILE).write_text(source)
        _evict_older_copies_beside(source)
    return str(target)


def _evict_older_copies_beside(source: str) -> None:
    """Deletes the copies of the entries of ``source``'s folder but the KEEP_COPIES
    used last."""
    folder = storage.parent(source.rstrip("/"))
    copies = []
    for entry in cache_root().iterdir():
        try:
            if storage.parent((entry / SOURCE_FILE).read_text().rstrip("/")) == folder:
                copies.append((entry.stat().st_mtime, entry))
        except OSError:  # no source recorded, or another process deleted it meanwhile
            continue
    for _, entry in sorted(copies, reverse=True)[KEEP_COPIES:]:
        shutil.rmtree(entry, ignore_errors=True)
