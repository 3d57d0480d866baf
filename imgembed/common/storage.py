"""Files on any filesystem Beam knows (local, gs://, s3://...): the one way imgembed
reads and writes them, so that no stage works only on local paths.

Beam is imported when a function first needs it, in a thread of its own (see
_filesystems).

>>> write_atomically("gs://bucket/out/marker.json", b"{}")
>>> list_files("gs://bucket/out/*.json")
['gs://bucket/out/marker.json']
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import posixpath
import re
import sys
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

# Object stores answer one request at a time per connection, tens of ms each:
# many small reads go this many at once.
PARALLEL_REQUESTS = 32
# Streams copy in blocks of this size (a whole model file never sits in memory).
COPY_BLOCK_BYTES = 8 << 20


def _filesystems():
    if "apache_beam.io.filesystems" not in sys.modules:
        # Imported on a thread of its own, whose stack holds nothing: some of Beam's
        # dependencies keep the exception of an optional import that failed
        # (google.cloud.bigquery: pandas_import_exception), and its traceback keeps
        # every frame that led to the import, with their locals, for good. Imported
        # from the caller's stack, the first index the service opened stayed in
        # memory after every swap (218 MiB a worker at 5M items).
        importer = threading.Thread(target=importlib.import_module, args=("apache_beam.io.filesystems",))
        importer.start()
        importer.join()
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def is_local(path: str) -> bool:
    """A path of this machine's disk (no scheme, or file://)."""
    return "://" not in path or path.startswith("file://")


def canonical(path: str) -> str:
    """The one spelling of a file, which its image id is derived from: on this
    machine's disk, the absolute, normalised path without ``file://``
    (``photos/a.jpg``, ``./photos/../photos/a.jpg``, ``/home/me/photos/a.jpg`` and
    ``file:///home/me/photos/a.jpg`` are one file); elsewhere the URI as the
    filesystem's match returns it. Links in the folder a pattern names are resolved
    first (``canonical_pattern``); a file that is itself a link is an input of its
    own, as it is listed.

    >>> canonical("file://photos/../photos/cat.jpg")
    '/home/me/photos/cat.jpg'
    """
    if not is_local(path):
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def canonical_pattern(pattern: str) -> str:
    """A glob or path whose matches come back canonical: absolute, with the links of
    the folder it names resolved (a folder reached through a link, or typed through
    its target, lists the same files under the same names)."""
    if not is_local(pattern):
        return pattern
    pattern = canonical(pattern) + ("/" if pattern.endswith("/") else "")
    first_glob = next((at for at, char in enumerate(pattern) if char in "*?["), None)
    if first_glob is None:
        if os.path.isdir(pattern):
            return os.path.realpath(pattern) + ("/" if pattern.endswith("/") else "")
        folder, name = os.path.split(pattern)
        return os.path.join(os.path.realpath(folder), name)
    folder, _, rest = pattern[:first_glob].rpartition("/")
    return os.path.join(os.path.realpath(folder or "/"), rest + pattern[first_glob:])


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def parent(path: str) -> str:
    return os.path.dirname(path) if is_local(path) else path.rstrip("/").rsplit("/", 1)[0]


def exists(path: str) -> bool:
    return _filesystems().exists(path)


def list_files(pattern: str) -> list[str]:
    """Sorted paths of the files a glob matches (none: an empty list)."""
    (result,) = _filesystems().match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


class FileStat(NamedTuple):
    """What a listing says of a file."""

    size: int
    last_updated: float  # seconds since the epoch; an object store's, a new one per generation

    def stamp(self) -> str:
        """The file's version as text: a changed size or time of last change is a new one."""
        return f"{self.size}@{self.last_updated!r}"


def match_stats(patterns: list[str]) -> list[dict[str, FileStat]]:
    """{path: FileStat} for each pattern, the patterns listed at the same time."""
    filesystems = _filesystems()

    def one(pattern: str) -> dict[str, FileStat]:
        (result,) = filesystems.match([pattern])
        return {
            metadata.path: FileStat(metadata.size_in_bytes, float(metadata.last_updated_in_seconds or 0.0))
            for metadata in result.metadata_list
        }

    with ThreadPoolExecutor(min(PARALLEL_REQUESTS, max(1, len(patterns)))) as pool:
        return list(pool.map(one, patterns))


def match_sizes(patterns: list[str]) -> list[dict[str, int]]:
    """{path: size} for each pattern, the patterns listed at the same time."""
    return [{path: stat.size for path, stat in found.items()} for found in match_stats(patterns)]


def symbolic_links(pattern: str) -> list[str]:
    """The symbolic links a local pattern matches, named as Beam's match names files.
    Its LocalFileSystem lists none of those it cannot stat (links to nothing) and
    walks into none of those to folders: the caller decides what becomes of them.
    Object stores have no links."""
    if not is_local(pattern):
        return []
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.localfilesystem import LocalFileSystem

    local = pattern.removeprefix("file://")
    before_glob = re.match(r"[^[*?]*", local).group(0)
    if before_glob == local:
        links = [local] if os.path.islink(local) else []
    else:  # the folder Beam walks for this pattern, filtered by the same rules
        links = list(_links_under(os.path.dirname(before_glob)))
    candidates = [FileMetadata(path, 0) for path in links]
    return [found.path for found in LocalFileSystem(None).match_files(candidates, local)]


def _links_under(folder: str) -> Iterable[str]:
    """Every symbolic link in a folder tree, without following any (as os.walk)."""
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        yield entry.path
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except OSError:  # gone or unreadable: Beam's walk passes over it too
            continue


def open_file(path: str):
    """A binary file open for reading: the builtin one for local paths (no Beam needed),
    Beam's for the rest."""
    if is_local(path):
        return open(path.removeprefix("file://"), "rb")  # noqa: SIM115 - the caller closes it
    from apache_beam.io.filesystem import CompressionTypes

    return _filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_file(path) as file:
        return file.read()


def read_json(path: str) -> dict:
    return json.loads(read_bytes(path))


def read_json_if_exists(path: str) -> dict | None:
    return read_json(path) if exists(path) else None


def read_many(paths: Iterable[str], read=read_bytes) -> list:
    """``read(path)`` of every path, PARALLEL_REQUESTS at a time, in order."""
    paths = list(paths)
    if not paths:
        return []
    with ThreadPoolExecutor(min(PARALLEL_REQUESTS, len(paths))) as pool:
        return list(pool.map(read, paths))


def ensure_folder(folder: str) -> None:
    filesystems = _filesystems()
    try:  # writers of one folder race to create it
        filesystems.mkdirs(folder)
    except OSError:
        if not filesystems.exists(folder):
            raise


def write_bytes(path: str, data: bytes) -> None:
    """Writes in place: a reader may see part of it. See write_atomically."""
    from apache_beam.io.filesystem import CompressionTypes

    ensure_folder(parent(path))
    with _filesystems().create(path, compression_type=CompressionTypes.UNCOMPRESSED) as file:
        file.write(data)


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the whole file or none of it, and a file it replaces until the
    new one is whole: on this machine's disk written aside, then renamed over it
    (``os.replace``, atomic on POSIX); an object store shows an object only once its
    upload completes, so one write is enough there (a copy and delete would not be
    atomic at all)."""
    if not is_local(path):
        write_bytes(path, data)
        return
    with _written_aside(path) as temporary:
        write_bytes(temporary, data)


@contextlib.contextmanager
def _written_aside(path: str):
    """A temporary name beside the local ``path`` to write, renamed over ``path``
    once the block succeeds, deleted if it fails."""
    local = path.removeprefix("file://")
    temporary = join(parent(local), f".tmp-{uuid.uuid4().hex}")
    try:
        yield temporary
        os.replace(temporary, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def delete(paths: list[str]) -> None:
    if paths:
        _filesystems().delete(list(paths))


def delete_folder(folder: str) -> None:
    """A folder and everything in it (on object stores, everything under the prefix)."""
    from apache_beam.io.filesystem import BeamIOError

    filesystems = _filesystems()
    # Object stores delete a prefix given a trailing slash; a local path names the folder.
    target = folder if is_local(folder) else folder.rstrip("/") + "/"
    try:
        filesystems.delete([target])
    except BeamIOError:
        if filesystems.exists(target):
            raise


def copy_file(source: str, destination: str) -> None:
    """Streams one file across filesystems (local to gs://, gs:// to local...); the
    destination appears whole or not at all, as with write_atomically."""
    from apache_beam.io.filesystem import CompressionTypes

    filesystems = _filesystems()
    ensure_folder(parent(destination))
    raw = CompressionTypes.UNCOMPRESSED
    aside = _written_aside(destination) if is_local(destination) else contextlib.nullcontext(destination)
    with (
        aside as written,
        filesystems.open(source, compression_type=raw) as reader,
        filesystems.create(written, compression_type=raw) as writer,
    ):
        for block in iter(lambda: reader.read(COPY_BLOCK_BYTES), b""):
            writer.write(block)


def files_under(folder: str) -> list[str]:
    """Every file below a folder, recursively (local matches include folders: not those)."""
    return [path for path in list_files(join(folder, "**")) if not (is_local(path) and os.path.isdir(path))]


def copy_tree(source: str, destination: str) -> None:
    """Copies every file below ``source`` to the same place below ``destination``."""
    source_root = source.rstrip("/")
    files = files_under(source_root)
    with ThreadPoolExecutor(min(PARALLEL_REQUESTS, max(1, len(files)))) as pool:
        list(pool.map(lambda path: copy_file(path, join(destination, _relative(path, source_root))), files))


def _relative(path: str, root: str) -> str:
    relative = path[len(root) :].lstrip("/")
    if not path.startswith(root) or not relative:
        raise ValueError(f"{path} is not below {root}")
    return relative
