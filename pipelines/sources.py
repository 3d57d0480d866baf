"""An input shard -> its inputs, one Record each, through Beam's FileSystems (local,
gs://, s3://...).

Every input leaves as bytes or as an ImageError, with what its shard says about it
(``metadata``: an img2dataset sidecar's key, url and caption, a TFRecord's other
features, a Parquet file's other columns). Container records get a URI with a
fragment: ``shard.tfrecord#17``, ``shard.tar#000017.jpg``, ``shard.parquet#17``.

Faults have two meanings. An input's own fault (empty, over the byte limit, gone
since it was listed, a corrupt container) is that input's answer: an ImageError,
which becomes an error row. Anything else (permission denied, a throttled or
unreachable store) is retried here, and if it outlasts the retries it raises
ShardUnreadable: the shard gets no marker, the runner retries its bundle, and a
rerun tries it again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from imgembed.common.storage import is_local
from imgembed.pipelines.shards import InputShard
from imgembed.transforms.decode import DecodeLimits, ImageError, check_file_size

NOT_FOUND = "not_found"
NO_IMAGE = "no_image_in_record"
CORRUPT_CONTAINER = "corrupt_container"
NO_IMAGE_COLUMN = "no_image_column"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Binary columns img2dataset and others store images in, in order of preference.
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "bytes")
TFRECORD_IMAGE = "image/encoded"
# What img2dataset says about each image, under its names; "*" keeps every field.
DEFAULT_METADATA_FIELDS = ("key", "url", "caption")
# How far reading runs ahead of decoding: enough files to hide an object store's
# latency (tens of ms against a few ms of decoding); in threads, bytes bounded too.
READ_AHEAD_FILES = 8
READ_AHEAD_BYTES = 64 << 20
# A read that fails for a reason other than the input itself is tried again after
# each of these pauses (seconds): throttling and brief outages pass in that time.
RETRY_PAUSES = (0.5, 2.0, 5.0)
_log = logging.getLogger(__name__)


class Record(NamedTuple):
    uri: str
    data: bytes | ImageError
    metadata: dict | None = None


class ShardUnreadable(Exception):
    """A fault that is not the input's own outlasted the retries."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """``image_column``: of Parquet inputs (None: the first of IMAGE_COLUMNS);
    ``metadata_fields``: kept from sidecars, features and columns (("*",): all)."""

    limits: DecodeLimits = DecodeLimits()
    image_column: str | None = None
    metadata_fields: tuple[str, ...] = DEFAULT_METADATA_FIELDS
    retry_pauses: tuple[float, ...] | None = None  # None: RETRY_PAUSES

    @property
    def pauses(self) -> tuple[float, ...]:
        return RETRY_PAUSES if self.retry_pauses is None else self.retry_pauses

    def keep(self, fields: dict) -> dict | None:
        """The scalar fields asked for (values that are not text, numbers or
        booleans are dropped: a metadata column holds small facts, not blobs)."""
        every = "*" in self.metadata_fields
        kept = {
            name: value
            for name, value in fields.items()
            if (every or name in self.metadata_fields) and isinstance(value, str | int | float | bool)
        }
        return kept or None


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _open(path: str):
    from apache_beam.io.filesystem import CompressionTypes

    return _filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def is_missing(error: BaseException) -> bool:
    """The file is gone (deleted since it was listed): on every filesystem Beam knows."""
    from apache_beam.io.filesystem import BeamIOError

    if isinstance(error, FileNotFoundError) or type(error).__name__ == "NotFound":
        return True
    if isinstance(error, BeamIOError):
        return any(is_missing(inner) for inner in (error.exception_details or {}).values())
    return False


def gone(path: str, error: BaseException) -> ImageError:
    """The error of an input that cannot be found: deleted since it was listed, or a
    symbolic link to nothing (listed so that it is not lost without a word)."""
    if is_local(path) and os.path.islink(path):
        return ImageError(NOT_FOUND, f"{path} is a symbolic link to nothing (-> {os.readlink(path)})")
    return ImageError(NOT_FOUND, f"{path} is gone: {error}")


def with_retries(read: Callable[[], object], what: str, pauses: tuple[float, ...]):
    """``read()``, tried again after each pause while it fails for a reason that is
    not the input's own; a missing file is an ImageError, the rest ShardUnreadable."""
    for attempt in range(len(pauses) + 1):
        try:
            return read()
        except ImageError:
            raise
        except Exception as error:  # every filesystem raises its own kinds
            if is_missing(error):
                raise gone(what, error) from None
            if attempt == len(pauses):
                raise ShardUnreadable(f"cannot read {what}: {type(error).__name__}: {error}") from error
            _log.info("reading %s failed (%s); trying again in %.1f s", what, error, pauses[attempt])
            time.sleep(pauses[attempt])
    raise AssertionError("unreachable")


def read_shard(shard: InputShard, options: ReadOptions, reader: ThreadPoolExecutor) -> Iterator[Record]:
    """Every input of the shard, in the shard's order."""
    if shard.kind == "files":
        yield from _image_files(shard, options, reader)
    else:
        yield from _container(shard.kind, shard.paths[0], options)


def _container(kind: str, path: str, options: ReadOptions) -> Iterator[Record]:
    """The records of a container, read whole or not at all: a read that fails for a
    reason other than the container's own bytes (a reset connection, a throttled
    read), at its start or in its middle, reads the container again after a pause,
    from where it stopped (records come in the same order every time), and raises
    ShardUnreadable when it outlasts the retries. Bytes that are not the format
    (a bad CRC, a broken tar header) are the container's own fault: one
    ``corrupt_container`` row for what could not be read."""
    records = {"tfrecord": _tfrecord_images, "webdataset": _webdataset_images, "parquet": _parquet_images}[
        kind
    ]
    delivered = 0
    for attempt in range(len(options.pauses) + 1):
        try:
            with _open(path) as file:
                for number, record in enumerate(records(path, file, options)):
                    if number >= delivered:
                        delivered += 1
                        yield record
            return
        except Exception as error:  # every filesystem raises its own kinds
            if is_missing(error) and delivered == 0:
                yield Record(path, gone(path, error))
                return
            if attempt == len(options.pauses):
                raise ShardUnreadable(
                    f"cannot read {path} (after {delivered} records): {type(error).__name__}: {error}"
                ) from error
            _log.info("reading %s failed after %d records (%s); reading it again", path, delivered, error)
            time.sleep(options.pauses[attempt])


# --- image files -------------------------------------------------------------


def _sidecar_metadata(paths: tuple[str, ...], options: ReadOptions) -> dict | None:
    """img2dataset's ``.json`` (its fields) and ``.txt`` (the caption) beside an image."""
    fields: dict = {}
    for path in paths:
        text = with_retries(lambda path=path: _read_all(path), path, options.pauses).decode(
            "utf-8", "replace"
        )
        if path.endswith(".json"):
            try:
                fields |= json.loads(text)
            except ValueError:
                _log.info("%s is not JSON; ignored", path)
        else:
            fields.setdefault("caption", text.strip())
    return options.keep(fields)


def _read_all(path: str) -> bytes:
    with _open(path) as file:
        return file.read()


def _image_files(shard: InputShard, options: ReadOptions, reader: ThreadPoolExecutor):
    sidecars = shard.sidecars or ((),) * len(shard.paths)
    if all(_filesystems().get_scheme(path) is None for path in shard.paths):
        contents = _local_files(shard, options)
    else:
        contents = _files_in_threads(shard, options, reader)
    for (path, data), names in zip(contents, sidecars, strict=True):
        metadata = None
        if names and not isinstance(data, ImageError):
            try:
                metadata = _sidecar_metadata(names, options)
            except ImageError as error:  # a metadata file cannot be found: no row without it
                data = ImageError(error.reason, f"its metadata file: {error.message}")
        yield Record(path, data, metadata)


def _local_files(shard: InputShard, options: ReadOptions):
    """Local files: the kernel reads the next READ_AHEAD_FILES ahead (posix_fadvise
    WILLNEED) while this thread decodes. Reader threads would cost more here than
    they hide: measured in 0.25_224 workers, they took 0.26 ms of CPU per image
    (switching and the GIL) against 0.13 ms for reading here."""
    opened = collections.deque()  # (path, open file or ImageError)

    def open_ahead(path: str, size: int):
        try:
            check_file_size(size, options.limits)
            # Closed in oldest(), after the read.
            file = with_retries(lambda: open(path, "rb"), path, options.pauses)  # noqa: SIM115
        except ImageError as error:
            return path, error
        if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the OS's own read-ahead
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        return path, file

    def oldest():
        path, file = opened.popleft()
        if isinstance(file, ImageError):
            return path, file
        with file:
            try:
                return path, with_retries(file.read, path, options.pauses)
            except ImageError as error:
                return path, error

    try:
        for path, size in zip(shard.paths, shard.sizes, strict=True):
            if len(opened) > READ_AHEAD_FILES:
                yield oldest()
            opened.append(open_ahead(path, size))
        while opened:
            yield oldest()
    finally:  # a reader stopped early (a failed bundle) leaves no file open
        for _, file in opened:
            if not isinstance(file, ImageError):
                file.close()


def _read_checked(path: str, size: int, options: ReadOptions) -> bytes:
    check_file_size(size, options.limits)
    return with_retries(lambda: _read_all(path), path, options.pauses)


def _files_in_threads(shard: InputShard, options: ReadOptions, reader: ThreadPoolExecutor):
    """Files on an object store or other remote filesystem: up to READ_AHEAD_FILES
    (READ_AHEAD_BYTES) are read ahead by ``reader``'s threads, hiding each request's
    latency (tens of ms against a few ms of decoding); the bytes held stay bounded."""
    reading = collections.deque()  # (path, future of its bytes, bytes it holds)
    held = 0

    def oldest():
        nonlocal held
        path, future, size = reading.popleft()
        held -= size
        try:
            return path, future.result()
        except ImageError as error:
            return path, error

    try:
        for path, size in zip(shard.paths, shard.sizes, strict=True):
            holds = size if size <= options.limits.max_file_bytes else 0
            while reading and (len(reading) > READ_AHEAD_FILES or held + holds > READ_AHEAD_BYTES):
                yield oldest()
            reading.append((path, reader.submit(_read_checked, path, size, options), holds))
            held += holds
        while reading:
            yield oldest()
    finally:  # stopped early: reads not started yet are dropped
        for _, future, _ in reading:
            future.cancel()


# --- containers ----------------------------------------------------------------


def _sized(record: Record, limits: DecodeLimits) -> Record:
    if isinstance(record.data, bytes):
        try:
            check_file_size(len(record.data), limits)
        except ImageError as error:
            return record._replace(data=error)
    return record


def _tfrecord_images(path: str, file, options: ReadOptions):
    """tf.train.Example records with an ``image/encoded`` bytes feature; the other
    features (text and numbers of one value) are the record's metadata."""
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    index = 0
    while True:
        try:
            record = _TFRecordUtil.read_record(file)
        except ValueError as error:  # a bad length or CRC: the rest of the file is lost
            message = f"TFRecord unreadable from record {index}: {error}"
            yield Record(f"{path}#{index}", ImageError(CORRUPT_CONTAINER, message))
            return
        if record is None:
            return
        try:
            features = example_pb2.Example.FromString(record).features.feature
        except DecodeError as error:  # a record of another kind: that record's fault
            yield Record(f"{path}#{index}", ImageError(NO_IMAGE, f"not a tf.train.Example: {error}"))
            index += 1
            continue
        values = features[TFRECORD_IMAGE].bytes_list.value if TFRECORD_IMAGE in features else []
        data = values[0] if values else ImageError(NO_IMAGE, f"no {TFRECORD_IMAGE} feature")
        fields = {
            name: _feature_value(feature) for name, feature in features.items() if name != TFRECORD_IMAGE
        }
        yield _sized(Record(f"{path}#{index}", data, options.keep(fields)), options.limits)
        index += 1


def _feature_value(feature):
    for kind in ("bytes_list", "int64_list", "float_list"):
        values = list(getattr(feature, kind).value)
        if len(values) == 1:
            value = values[0]
            if isinstance(value, bytes):
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    return None  # binary: not metadata
            return value
    return None


def _webdataset_images(path: str, file, options: ReadOptions):
    """Image members of a WebDataset tar; a sample's ``.json`` and ``.txt`` members
    (``<key>.jpg`` beside ``<key>.json``, ``<key>.txt``) are its metadata. Members of a
    sample sit together in the tar, in any order."""

    def sample_records(key: str, members: dict[str, bytes]):
        fields = {}
        if "json" in members:
            try:
                fields |= json.loads(members["json"])
            except ValueError:
                _log.info("%s#%s.json is not JSON; ignored", path, key)
        if "txt" in members:
            fields.setdefault("caption", members["txt"].decode("utf-8", "replace").strip())
        metadata = options.keep(fields)
        for extension, data in members.items():
            if extension in IMAGE_EXTENSIONS:
                yield _sized(Record(f"{path}#{key}.{extension}", data, metadata), options.limits)

    key, members = None, {}
    try:
        with tarfile.open(fileobj=file, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None:
                        yield from sample_records(key, members)
                    key, members = member_key, {}
                members[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError) as error:  # the archive's own bytes; a failed read is retried
        if key is not None:
            yield from sample_records(key, members)
        yield Record(f"{path}#<rest>", ImageError(CORRUPT_CONTAINER, f"tar archive unreadable: {error}"))
        return
    if key is not None:
        yield from sample_records(key, members)


def _parquet_images(path: str, file, options: ReadOptions):
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:  # junk; a failed read is retried
        yield Record(path, ImageError(CORRUPT_CONTAINER, f"not a Parquet file: {error}"))
        return
    names = parquet.schema_arrow.names
    chosen = options.image_column or next((name for name in IMAGE_COLUMNS if name in names), None)
    if chosen is None or chosen not in names:
        wanted = options.image_column or ", ".join(IMAGE_COLUMNS)
        yield Record(
            path, ImageError(NO_IMAGE_COLUMN, f"no image column (looked for {wanted}; found {names})")
        )
        return
    every = "*" in options.metadata_fields
    others = [name for name in names if name != chosen and (every or name in options.metadata_fields)]
    row = 0
    batches = parquet.iter_batches(columns=[chosen, *others], batch_size=256)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:  # a damaged page: the rest is lost
            yield Record(
                f"{path}#{row}", ImageError(CORRUPT_CONTAINER, f"Parquet unreadable from row {row}: {error}")
            )
            return
        if batch is None:
            return
        images = batch.column(0).to_pylist()
        fields = batch.select(others).to_pylist() if others else [{}] * len(images)
        for value, metadata in zip(images, fields, strict=True):
            data = value if value else ImageError(NO_IMAGE, f"empty {chosen} value")
            yield _sized(Record(f"{path}#{row}", data, options.keep(metadata)), options.limits)
            row += 1
