"""Input shards: the unit of work, of output and of resumption.

An input shard is either a group of image files (``--files-per-shard`` of the
sorted matched files) or one container file: a TFRecord of ``tf.train.Example``
(``image/encoded``), a WebDataset tar, or a Parquet file with an image-bytes
column (the formats img2dataset writes). Each shard produces one Parquet file per
model, one errors file and, last, one marker that says the shard is complete and
what it held. Output files are named by a key that hashes the shard's content
(its inputs and their sizes) together with the models, preprocessing and limits
of the run, so a rerun recognises finished shards and only does the rest.

>>> plan = plan_shards(["photos/*.jpg"], InputFormat.AUTO, files_per_shard=1000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from apache_beam.io.filesystems import FileSystems

from imgembed.common.choices import Choice

# Extensions that make a file a container of images rather than an image.
CONTAINER_SUFFIXES = {
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
    ".tfrec": "tfrecord",
    ".tar": "webdataset",
    ".parquet": "parquet",
}

# A worker reads ahead only within a piece, so each piece starts with one wait on
# storage: 32 files make that wait rare, and a 500-file shard still spreads over
# 16 workers.
FILES_PER_PIECE = 32


class InputFormat(Choice):
    __flag__ = "--input-format"

    AUTO = "auto"  # containers by extension, every other file an image
    FILES = "files"
    TFRECORD = "tfrecord"
    WEBDATASET = "webdataset"
    PARQUET = "parquet"


class InputError(ValueError):
    """The input patterns cannot be read at all (nothing matches, bad path)."""


@dataclasses.dataclass(frozen=True)
class InputShard:
    """``kind`` is "files" (``paths`` are images) or a container format (one path)."""

    kind: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]

    def pieces(self) -> list[InputShard]:
        """Units of reading: FILES_PER_PIECE files of a files shard (so the files of
        one shard spread over workers, and a worker reads the next files of its piece
        while it decodes one), a container whole (it is read in order)."""
        if self.kind != "files":
            return [self]
        return [
            InputShard(
                "files",
                self.paths[start : start + FILES_PER_PIECE],
                self.sizes[start : start + FILES_PER_PIECE],
            )
            for start in range(0, len(self.paths), FILES_PER_PIECE)
        ]

    def content_key(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        for path, size in zip(self.paths, self.sizes, strict=True):
            digest.update(f"\0{path}\0{size}".encode())
        return digest.hexdigest()


def shard_key(shard: InputShard, settings_key: str) -> str:
    """The name of a shard's outputs: its content, under this run's settings."""
    return hashlib.sha256(f"{shard.content_key()}:{settings_key}".encode()).hexdigest()[:24]


def settings_key(settings: dict) -> str:
    """A hash of what, besides the inputs, decides a shard's outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def expand_patterns(patterns: list[str]) -> list[str]:
    """Turns folders into recursive globs and refuses patterns that match nothing."""
    expanded = []
    for pattern in patterns:
        if not any(char in pattern for char in "*?[") and _is_folder(pattern):
            pattern = FileSystems.join(pattern.rstrip("/"), "**")
        try:
            (result,) = FileSystems.match([pattern], limits=[1])
        except Exception as error:  # each filesystem raises its own kind of error
            raise InputError(f"cannot list {pattern}: {error}") from error
        if not result.metadata_list:
            raise InputError(f"no files match {pattern}")
        expanded.append(pattern)
    return expanded


def _is_folder(path: str) -> bool:
    # Object stores have no folders, only prefixes: a trailing slash marks one.
    is_local = FileSystems.get_scheme(path) is None
    return path.endswith("/") or (is_local and os.path.isdir(path))


def list_inputs(patterns: list[str]) -> dict[str, int]:
    """Every file the patterns match (each once), with its size; folders excluded."""
    found: dict[str, int] = {}
    for result in FileSystems.match(list(patterns)):
        for metadata in result.metadata_list:
            is_local_folder = FileSystems.get_scheme(metadata.path) is None and os.path.isdir(metadata.path)
            if not is_local_folder:
                found[metadata.path] = metadata.size_in_bytes
    return found


def kind_of(path: str, input_format: InputFormat) -> str:
    if input_format is InputFormat.AUTO:
        return CONTAINER_SUFFIXES.get(os.path.splitext(path)[1].lower(), "files")
    return input_format.value


def plan_shards(patterns: list[str], input_format: InputFormat, files_per_shard: int) -> list[InputShard]:
    """Deterministic shards of everything the patterns match: the same inputs give
    the same shards on every run."""
    files = list_inputs(expand_patterns(patterns))
    images = sorted(path for path in files if kind_of(path, input_format) == "files")
    shards = [
        InputShard(kind_of(path, input_format), (path,), (files[path],))
        for path in sorted(files)
        if kind_of(path, input_format) != "files"
    ]
    for start in range(0, len(images), files_per_shard):
        chunk = tuple(images[start : start + files_per_shard])
        shards.append(InputShard("files", chunk, tuple(files[path] for path in chunk)))
    return shards


def pieces_largest_first(shards: dict[str, InputShard]) -> list[tuple[str, InputShard]]:
    """(shard key, piece) for every piece of ``shards``, the most bytes first, in the
    same order on every run.

    Runners deal out work in the order it comes, and the local runner deals a
    stage's elements to its workers round-robin, once. Dealt largest first (the
    longest-processing-time-first rule), each round gives every worker about the
    same, the last rounds deal the smallest pieces, and the workers finish together:
    two workers' shares differ by at most the largest piece less the smallest.
    Bytes stand for time: a photo's decode time follows its size (r = 0.98 on the
    benchmark's photos, 300 to 4000 px). On the benchmark's 19,846 images this
    order leaves 0.15 s between two workers where a shuffled one left 0.67 s, and
    in shard order every shard's short last piece went to the same worker."""
    pieces = [
        (key, number, piece) for key, shard in shards.items() for number, piece in enumerate(shard.pieces())
    ]
    pieces.sort(key=lambda item: (-sum(item[2].sizes), item[0], item[1]))
    return [(key, piece) for key, _, piece in pieces]
