"""Input shards: the unit of work, of output and of resumption.

An input shard is either a group of image files (``--files-per-shard`` of the
sorted matched files) or one container file: a TFRecord of ``tf.train.Example``
(``image/encoded``), a WebDataset tar, or a Parquet file with an image-bytes
column (the formats img2dataset writes). One worker takes a shard from its
inputs to its Parquet files and, last, its marker, without waiting for any other
shard. Output files are named by a key made of the run's settings and the
shard's content (its inputs and their sizes), so a rerun recognises finished
shards and only does the rest.

The launcher writes the plan, one JSON line per shard, beside the outputs; the
job reads it there, so the job's graph is the same size for 10 inputs or 10^7.

>>> plan = plan_shards(["photos/*.jpg"], InputFormat.AUTO, files_per_shard=1000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from imgembed.common import storage
from imgembed.common.choices import Choice

# Extensions that make a file a container of images rather than an image.
CONTAINER_SUFFIXES = {
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
    ".tfrec": "tfrecord",
    ".tar": "webdataset",
    ".parquet": "parquet",
}
# Files beside images that describe them (img2dataset's "files" output writes
# 000001.jpg with 000001.json and 000001.txt): read as the image's metadata.
SIDECAR_SUFFIXES = (".json", ".txt")
# img2dataset's own bookkeeping: never an input.
STATS_SUFFIX = "_stats.json"
PLAN_FOLDER = "_plan"


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
    """``kind`` is "files" (``paths`` are images) or a container format (one path).
    ``sidecars`` holds, per path, the metadata files found beside it."""

    kind: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    sidecars: tuple[tuple[str, ...], ...] = ()

    def content_key(self) -> str:
        digest = hashlib.sha256(self.kind.encode())
        for path, size in zip(self.paths, self.sizes, strict=True):
            digest.update(f"\0{path}\0{size}".encode())
        for names in self.sidecars:
            digest.update(("\0" + "\0".join(names)).encode())
        return digest.hexdigest()

    def to_json(self, key: str) -> str:
        fields = {"key": key, "kind": self.kind, "paths": self.paths, "sizes": self.sizes}
        if any(self.sidecars):
            fields["sidecars"] = self.sidecars
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> tuple[str, InputShard]:
        fields = json.loads(line)
        sidecars = tuple(tuple(names) for names in fields.get("sidecars", ()))
        return fields["key"], cls(fields["kind"], tuple(fields["paths"]), tuple(fields["sizes"]), sidecars)


def settings_key(settings: dict) -> str:
    """A hash of what, besides the inputs, decides a shard's outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def shard_key(shard: InputShard, settings: str) -> str:
    """The name of a shard's outputs: the run's settings, then the shard's content.
    Outputs of other settings are told apart by their names alone."""
    return f"{settings}-{shard.content_key()[:20]}"


def settings_of(key: str) -> str:
    return key.split("-", 1)[0]


def expand_patterns(patterns: list[str]) -> list[str]:
    """Turns folders into recursive globs and refuses patterns that match nothing."""
    expanded = [
        storage.join(pattern.rstrip("/"), "**")
        if not any(char in pattern for char in "*?[") and _is_folder(pattern)
        else pattern
        for pattern in patterns
    ]
    try:
        found = storage.match_sizes(expanded)
    except Exception as error:  # each filesystem raises its own kind of error
        raise InputError(f"cannot list {', '.join(patterns)}: {error}") from error
    for pattern, files in zip(expanded, found, strict=True):
        if not files:
            raise InputError(f"no files match {pattern}")
    return expanded


def _is_folder(path: str) -> bool:
    # Object stores have no folders, only prefixes: a path that names no object, or
    # ends with a slash, is one.
    if storage.is_local(path):
        return os.path.isdir(path)
    return path.endswith("/") or not storage.exists(path)


def list_inputs(patterns: list[str]) -> dict[str, int]:
    """Every file the patterns match (each once), with its size; folders excluded.
    Patterns are listed at the same time."""
    found: dict[str, int] = {}
    for files in storage.match_sizes(patterns):
        for path, size in files.items():
            if not (storage.is_local(path) and os.path.isdir(path)):
                found[path] = size
    return found


def kind_of(path: str, input_format: InputFormat) -> str:
    if input_format is InputFormat.AUTO:
        return CONTAINER_SUFFIXES.get(os.path.splitext(path)[1].lower(), "files")
    return input_format.value


def plan_shards(patterns: list[str], input_format: InputFormat, files_per_shard: int) -> list[InputShard]:
    """Deterministic shards of everything the patterns match: the same inputs give
    the same shards on every run. img2dataset's side files are not inputs: its
    ``_stats.json``, the metadata Parquet beside each tar, and the ``.json`` and
    ``.txt`` beside each image, which become that image's metadata."""
    files = list_inputs(expand_patterns(patterns))
    stems = {
        os.path.splitext(path)[0]: path
        for path in files
        if os.path.splitext(path)[1].lower() not in SIDECAR_SUFFIXES
    }
    sidecars: dict[str, list[str]] = {}
    inputs = []
    for path in sorted(files):
        stem, suffix = os.path.splitext(path)
        if path.endswith(STATS_SUFFIX):
            continue
        if suffix.lower() in SIDECAR_SUFFIXES and stem in stems:
            sidecars.setdefault(stems[stem], []).append(path)
            continue
        if suffix.lower() == ".parquet" and f"{stem}.tar" in files and input_format is InputFormat.AUTO:
            continue  # img2dataset's per-shard metadata: the tar holds the images
        inputs.append(path)
    shards = [
        InputShard(kind_of(path, input_format), (path,), (files[path],))
        for path in inputs
        if kind_of(path, input_format) != "files"
    ]
    images = [path for path in inputs if kind_of(path, input_format) == "files"]
    for start in range(0, len(images), files_per_shard):
        chunk = tuple(images[start : start + files_per_shard])
        found = tuple(tuple(sidecars.get(path, ())) for path in chunk)
        shards.append(
            InputShard("files", chunk, tuple(files[path] for path in chunk), found if any(found) else ())
        )
    return shards


def plan_path(output_dir: str, settings: str) -> str:
    return storage.join(output_dir, PLAN_FOLDER, f"shards-{settings}.jsonl")


def write_plan(path: str, shards: dict[str, InputShard]) -> None:
    """One JSON line per shard, the most bytes first: runners deal out work in the
    order it comes, so the last shards dealt are the smallest and workers finish
    together (the longest-processing-time-first rule)."""
    ordered = sorted(shards.items(), key=lambda item: (-sum(item[1].sizes), item[0]))
    storage.write_atomically(path, "".join(shard.to_json(key) + "\n" for key, shard in ordered).encode())
