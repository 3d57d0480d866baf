"""An index folder: versions of an index, and the pointer to the live one.

    INDEX_DIR/CURRENT                       the name of the live version (replaced atomically)
    INDEX_DIR/<version>/index.faiss         the FAISS index (search parameters applied at load)
    INDEX_DIR/<version>/index.ivfdata       its inverted lists, when a distributed build merged
                                            them on disk (faiss OnDiskInvertedLists)
    INDEX_DIR/<version>/items.arrow, *.npy  each item's id, uri, metadata, cluster, id lookup,
                                            thumbnails (memory-mapped, index/items.py; never a
                                            pickle): a version never reads the embeddings files
    INDEX_DIR/<version>/manifest.json       model, preprocessing, dimension, metric, transform,
                                            count, search parameters, the embeddings it holds
    INDEX_DIR/<version>/report.json         why this index, recall, bytes, build time, latency
    INDEX_DIR/<version>/duplicates.parquet  near-duplicate clusters (rows in clusters of 2+)
    INDEX_DIR/<version>/transform/          the tf.Transform graph, when the index has one

Every build, ``--add`` and ``--sync`` writes a new version beside the live one and then
switches CURRENT, so a reader (the service, memory-mapping a version's files) never
sees a file change under it; the version before the live one is kept for readers
that have not switched yet. INDEX_DIR may be on any Beam filesystem: a remote
version is built on this machine and copied up, and read from a local copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import faiss

from imgembed.common import storage
from imgembed.common.local_copies import local_path
from imgembed.index.faiss_index import native_stdout_silenced, set_search_params
from imgembed.index.items import Items
from imgembed.index.reader import EmbeddingSource
from imgembed.index.vectors import IndexInputError, Metric

CURRENT_FILE = "CURRENT"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
DUPLICATES_FILE = "duplicates.parquet"
TRANSFORM_DIR = "transform"  # a copy of the tf.Transform graph, when the index has one
RUNTIME_MODEL_FILE = "model.tflite"  # the int8 model uploads are embedded with, when there is one
# 3: thumbnails in the version, canonical paths, ids of canonical URIs (imgembed 0.2).
FORMAT_VERSION = 3
VERSION_PREFIX = "v"
_VERSION_NAME = re.compile(r"v\d{8}T\d{6,12}-[0-9a-f]{6}")
# How faiss reads a memory-mapped index (see load).
MAPPED = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
# A distributed build's merged lists, in a file beside index.faiss (manifest: "lists").
ON_DISK = "on_disk"
ON_DISK_LISTS_FILE = "index.ivfdata"
ON_DISK_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def path(version_dir: str, name: str) -> str:
    return os.path.join(version_dir, name)


def write_json(version_dir: str, name: str, content: dict) -> None:
    with open(path(version_dir, name), "w") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")


def read_json(version_dir: str, name: str) -> dict:
    try:
        with open(path(version_dir, name)) as file:
            return json.load(file)
    except FileNotFoundError:
        raise IndexInputError(f"{version_dir} is not an index version: no {name}") from None


# --- versions -------------------------------------------------------------------


def current_version(index_dir: str) -> str | None:
    pointer = storage.join(index_dir, CURRENT_FILE)
    return storage.read_bytes(pointer).decode().strip() if storage.exists(pointer) else None


def exists(index_dir: str) -> bool:
    """An index is there: its CURRENT, or (CURRENT deleted by hand) a finished version."""
    return current_version(index_dir) is not None or bool(finished_versions(index_dir))


def finished_versions(index_dir: str) -> list[str]:
    """Versions whose manifest was written (the last file of a version)."""
    return [
        name
        for name in version_names(index_dir)
        if storage.exists(storage.join(index_dir, name, MANIFEST_FILE))
    ]


class ConcurrentUpdate(IndexInputError):
    """Another writer published a version while this one was being written."""


@dataclasses.dataclass(frozen=True)
class NewVersion:
    """A version being written: ``local_dir`` on this machine, published to ``index_dir``;
    ``base``: the live version when it started (None: there was none)."""

    index_dir: str
    name: str
    local_dir: str
    base: str | None

    @classmethod
    def start(cls, index_dir: str) -> NewVersion:
        # Microseconds, so that names sort as the versions were started.
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        name = f"{VERSION_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}"
        base = current_version(index_dir)
        if storage.is_local(index_dir):  # written where it stays: nothing to copy
            local_dir = os.path.join(index_dir, name)
            os.makedirs(local_dir)
        else:
            local_dir = tempfile.mkdtemp(prefix=f"imgembed-index-{name}-")
        return cls(index_dir, name, local_dir, base)

    def publish(self) -> None:
        """Makes this version the live one, by one atomic write of CURRENT, unless
        another writer published since this one started (two --add or --sync runs at
        once): then nothing is published and it says so, rather than dropping the
        other's rows. The one live before stays (a reader may still be on it); older
        versions go, finished or not (a build killed midway leaves its folder)."""
        if not storage.is_local(self.index_dir):  # every file up before CURRENT names the version
            storage.copy_tree(self.local_dir, storage.join(self.index_dir, self.name))
        with _publish_lock(self.index_dir):
            live = current_version(self.index_dir)
            if live != self.base:
                raise ConcurrentUpdate(
                    f"{self.index_dir}: version {live} was published by another writer while this one "
                    f"ran (it started from {self.base or 'no index'}); nothing was published: run it again"
                )
            storage.write_atomically(storage.join(self.index_dir, CURRENT_FILE), self.name.encode())
        if not storage.is_local(self.index_dir):
            shutil.rmtree(self.local_dir, ignore_errors=True)
        for old in version_names(self.index_dir):
            if old < (live or self.name) and old != self.name:
                storage.delete_folder(storage.join(self.index_dir, old))

    def discard(self) -> None:
        """Removes what was written of a version that will not be published."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if not storage.is_local(self.index_dir):  # a copy that failed midway
            storage.delete_folder(storage.join(self.index_dir, self.name))


@contextlib.contextmanager
def _publish_lock(index_dir: str):
    """Writers of one local index check CURRENT and replace it one at a time
    (``flock``). Object stores have no lock: the check narrows the race to the
    moment of the write (see the README)."""
    if not storage.is_local(index_dir):
        yield
        return
    with open(os.path.join(index_dir, ".publish.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def new_version(index_dir: str) -> Iterator[NewVersion]:
    """A version to write in the block: published when it ends, removed if it fails."""
    version = NewVersion.start(index_dir)
    try:
        yield version
    except BaseException:
        version.discard()
        raise
    version.publish()


def version_names(index_dir: str) -> list[str]:
    """The names of every version folder in ``index_dir``, live, old or unfinished."""
    if storage.is_local(index_dir):  # the folders themselves, empty ones too
        if not os.path.isdir(index_dir):
            return []
        names = {entry.name for entry in os.scandir(index_dir) if entry.is_dir()}
    else:  # object stores have no folders: the files directly in them
        paths = storage.list_files(storage.join(index_dir, VERSION_PREFIX + "*", "*"))
        names = {path.rstrip("/").rsplit("/", 2)[-2] for path in paths}
    return sorted(name for name in names if _VERSION_NAME.fullmatch(name))


def live_dir(index_dir: str) -> str:
    """The live version's folder on this machine (a local copy when it is remote)."""
    version = current_version(index_dir)
    if version is None and finished_versions(index_dir):
        raise IndexInputError(
            f"{index_dir} holds index versions but no {CURRENT_FILE} (deleted?): write the name of the "
            f"version to serve into {CURRENT_FILE}, or rebuild with `imgembed index --overwrite`"
        )
    if version is None:
        raise IndexInputError(
            f"{index_dir} is not an index folder: no {CURRENT_FILE} (build one with `imgembed index`)"
        )
    folder = storage.join(index_dir, version)
    return local_path(folder, folder=True) if not storage.is_local(folder) else folder


@dataclasses.dataclass
class LoadedIndex:
    """An index version, loaded for searching."""

    index_dir: str
    version: str
    directory: str  # the version's files, on this machine
    index: faiss.Index
    manifest: dict
    items: Items

    @property
    def metric(self) -> Metric:
        return Metric(self.manifest["metric"])

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def transform(self):
        """The tf.Transform graph raw embeddings go through before this index, or None."""
        if not self.manifest.get("transform"):
            return None
        from imgembed.transforms.embedding_transform import EmbeddingTransform

        return EmbeddingTransform(path(self.directory, self.manifest["transform"]["directory"]))

    def sources(self) -> list[EmbeddingSource]:
        """The embeddings the index holds, seen through its transform."""
        transform = self.transform()
        return [
            EmbeddingSource.from_files(part["files"]).with_transform(transform)
            for part in self.manifest["parts"]
        ]


def load(index_dir: str, mmap: bool = False) -> LoadedIndex:
    """Reads the live version. ``mmap`` maps the vectors and codes from the file
    instead of reading them, so they can exceed RAM and start-up is instant: faiss's
    IO_FLAG_MMAP_IFC maps Flat codes, IVF lists, and the raw vectors that re-rank
    ``ivf_pq_rflat`` (measured on 400k x 64: RSS +1 MiB instead of +98 for Flat and
    IVF,Flat; an HNSW graph's links stay in RAM, its vectors are mapped). Combined
    with IO_FLAG_MMAP it fails for IVF lists in faiss 1.15. The re-ranking vectors
    of ``ivf_pq_rflat`` and ``ivf_sq8_rflat`` are always mapped: keeping them out of RAM is why that kind
    was chosen."""
    directory = live_dir(index_dir)
    manifest = read_json(directory, MANIFEST_FILE)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexInputError(
            f"{index_dir}: index format {manifest.get('format_version')} was written by another imgembed "
            f"(this one reads format {FORMAT_VERSION}); build it again with `imgembed index --overwrite`"
        )
    if manifest["index"].get("lists") == ON_DISK:
        # faiss maps on-disk lists itself; IO_FLAG_MMAP_IFC cannot be combined with them.
        with native_stdout_silenced():
            index = faiss.read_index(path(directory, INDEX_FILE), ON_DISK_FLAGS)
    else:
        mapped = mmap or manifest["index"]["kind"].endswith("_rflat")
        index = faiss.read_index(path(directory, INDEX_FILE), MAPPED if mapped else 0)
    set_search_params(index, manifest["search_params"])
    items = Items(directory)
    if len(items) != index.ntotal:
        raise IndexInputError(f"{index_dir}: {len(items)} items for {index.ntotal} vectors")
    return LoadedIndex(index_dir, os.path.basename(directory.rstrip("/")), directory, index, manifest, items)
