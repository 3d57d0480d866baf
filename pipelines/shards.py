"""Input shards: the unit of work, of output and of resumption.

An input shard is either a group of image files (at most ``--files-per-shard``,
in sorted order) or one container file: a TFRecord of ``tf.train.Example``
(``image/encoded``), a WebDataset tar, or a Parquet file with an image-bytes
column (the formats img2dataset writes). One worker takes a shard from its
inputs to its Parquet files and, last, its marker, without waiting for any other
shard. Output files are named by a key made of the run's settings and the
shard's content (each input's path, size and time of last change), so the same
inputs always give the same key.

Which shards a run writes is decided in pipelines/plan.py, against the shards
already committed; this module lists the inputs and cuts new ones into shards.
The launcher writes the plan, one JSON line per shard, in PLAN_PARTS files beside
the outputs; the job reads it there, so its graph is the same size for 10 inputs
or 10^7.

Every path is canonical (see ``storage.canonical``): a file has one spelling,
whatever the pattern that matched it, so its image id never depends on how a
path was typed.

>>> shards = plan_shards(["photos/*.jpg"], InputFormat.AUTO, files_per_shard=1000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
FILES = "files"

_log = logging.getLogger(__name__)


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
class InputFile:
    """One input as the listing saw it. ``stamp`` changes whenever the file or one of
    its sidecars does: their sizes and times of last change, as the filesystem's
    match reports them (an object store's update time changes with each new
    generation of the object)."""

    path: str
    kind: str  # FILES (an image) or a container format
    size: int
    stamp: str
    sidecars: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InputShard:
    """``kind`` is "files" (``paths`` are images) or a container format (one path).
    ``sidecars`` holds, per path, the metadata files found beside it; ``stamps``, per
    path, its InputFile stamp.

    A shard that replaces a committed one (some of whose inputs were deleted or
    changed) names it in ``rewrites``; the rows of its ``reused`` paths, unchanged,
    are copied from that shard's files instead of being embedded again."""

    kind: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    stamps: tuple[str, ...] = ()
    sidecars: tuple[tuple[str, ...], ...] = ()
    rewrites: str | None = None
    reused: tuple[str, ...] = ()

    @classmethod
    def of(cls, kind: str, files: list[InputFile], rewrites: str | None = None, reused=()) -> InputShard:
        sidecars = tuple(file.sidecars for file in files)
        return cls(
            kind,
            tuple(file.path for file in files),
            tuple(file.size for file in files),
            tuple(file.stamp for file in files),
            sidecars if any(sidecars) else (),
            rewrites,
            tuple(reused),
        )

    def content_key(self) -> str:
        """A hash of the inputs alone: how the shard is made (reused or not) changes
        nothing in its outputs."""
        digest = hashlib.sha256(self.kind.encode())
        stamps = self.stamps or ("",) * len(self.paths)
        for path, size, stamp in zip(self.paths, self.sizes, stamps, strict=True):
            digest.update(f"\0{path}\0{size}\0{stamp}".encode())
        for names in self.sidecars:
            digest.update(("\0" + "\0".join(names)).encode())
        return digest.hexdigest()

    def inputs(self) -> dict:
        """What the shard was made of, as its marker records it."""
        fields = {"kind": self.kind, "paths": self.paths, "sizes": self.sizes, "stamps": self.stamps}
        if any(self.sidecars):
            fields["sidecars"] = self.sidecars
        return fields

    def without(self, paths) -> InputShard:
        """The shard with these paths left out (those a rewritten shard reuses)."""
        if not paths:
            return self
        left_out = set(paths)
        return InputShard.of(self.kind, [file for file in self.files() if file.path not in left_out])

    def files(self) -> list[InputFile]:
        sidecars = self.sidecars or ((),) * len(self.paths)
        stamps = self.stamps or ("",) * len(self.paths)
        return [
            InputFile(path, self.kind, size, stamp, tuple(names))
            for path, size, stamp, names in zip(self.paths, self.sizes, stamps, sidecars, strict=True)
        ]

    def to_json(self, key: str) -> str:
        fields = {"key": key, **self.inputs()}
        if self.rewrites:
            fields |= {"rewrites": self.rewrites, "reused": self.reused}
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> tuple[str, InputShard]:
        fields = json.loads(line)
        return fields.pop("key"), cls.from_inputs(fields)

    @classmethod
    def from_inputs(cls, fields: dict) -> InputShard:
        return cls(
            fields["kind"],
            tuple(fields["paths"]),
            tuple(fields["sizes"]),
            tuple(fields.get("stamps", ())),
            tuple(tuple(names) for names in fields.get("sidecars", ())),
            fields.get("rewrites"),
            tuple(fields.get("reused", ())),
        )


def settings_key(settings: dict) -> str:
    """A hash of what, besides the inputs, decides a shard's outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def shard_key(shard: InputShard, settings: str) -> str:
    """The name of a shard's outputs: the run's settings, then the shard's content.
    Outputs of other settings are told apart by their names alone."""
    return f"{settings}-{shard.content_key()[:20]}"


def settings_of(key: str) -> str:
    return key.split("-", 1)[0]


def _listed(patterns: list[str]) -> dict[str, storage.FileStat]:
    """Every file the patterns match, by canonical path, listed once; folders are
    recursive globs. Refuses a pattern that matches nothing.

    A symbolic link to nothing is listed with the link's own stat, so that it ends
    as a ``not_found`` error row instead of vanishing (Beam's LocalFileSystem leaves
    it out); links to folders are not followed, as by Beam, and said so once."""
    canonical = [storage.canonical_pattern(pattern) for pattern in patterns]
    expanded = [
        storage.join(pattern.rstrip("/"), "**")
        if not any(char in pattern for char in "*?[") and _is_folder(pattern)
        else pattern
        for pattern in canonical
    ]
    try:
        found = storage.match_stats(expanded)
    except Exception as error:  # each filesystem raises its own kind of error
        raise InputError(f"cannot list {', '.join(patterns)}: {error}") from error
    files: dict[str, storage.FileStat] = {}
    folder_links: list[str] = []
    for pattern, matched in zip(expanded, found, strict=True):
        links = storage.symbolic_links(pattern)
        to_nothing = [link for link in links if not os.path.exists(link)]
        if not matched:
            named = f" (it names {_some(to_nothing, 'symbolic link(s) to nothing')})" if to_nothing else ""
            raise InputError(f"no files match {pattern}{named}")
        folder_links += [link for link in links if os.path.isdir(link)]
        for path in to_nothing:
            matched.setdefault(path, _stat_of_link(path))
        for path, stat in matched.items():
            if not (storage.is_local(path) and os.path.isdir(path)):
                files[storage.canonical(path)] = stat
    if folder_links:
        _log.warning(
            "%s: not followed (Beam's match does not follow them); name such a folder itself "
            "to embed what it holds",
            _some(folder_links, "symbolic link(s) to folders"),
        )
    return files


def _some(links: list[str], what: str) -> str:
    """``3 symbolic link(s) to nothing, e.g. a.jpg -> gone.jpg``"""
    first = sorted(links)[0]
    return f"{len(links)} {what}, e.g. {first} -> {os.readlink(first)}"


def _stat_of_link(path: str) -> storage.FileStat:
    """A link's own size (its target's length) and time: they change when it is
    pointed elsewhere, and a link mended to point at a file is listed as that file."""
    link = os.lstat(path)
    return storage.FileStat(link.st_size, link.st_mtime)


def _is_folder(path: str) -> bool:
    # Object stores have no folders, only prefixes: a path that names no object, or
    # ends with a slash, is one.
    if storage.is_local(path):
        return os.path.isdir(path)
    return path.endswith("/") or not storage.exists(path)


def kind_of(path: str, input_format: InputFormat) -> str:
    if input_format is InputFormat.AUTO:
        return CONTAINER_SUFFIXES.get(os.path.splitext(path)[1].lower(), FILES)
    return input_format.value


def list_inputs(patterns: list[str], input_format: InputFormat) -> dict[str, InputFile]:
    """Every input the patterns match, once each, by canonical path. img2dataset's
    side files are not inputs: its ``_stats.json``, the metadata Parquet beside each
    tar, and the ``.json`` and ``.txt`` beside each image, which become that image's
    metadata (and part of its stamp)."""
    files = _listed(patterns)
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
    listed = {}
    for path in inputs:
        beside = tuple(sidecars.get(path, ()))
        stamp = "+".join(files[name].stamp() for name in (path, *beside))
        listed[path] = InputFile(path, kind_of(path, input_format), files[path].size, stamp, beside)
    return listed


def cut_into_shards(files: list[InputFile], files_per_shard: int) -> list[InputShard]:
    """New shards of these inputs: a container each, images ``files_per_shard`` at a
    time in sorted order. The same inputs always give the same shards."""
    shards = [InputShard.of(file.kind, [file]) for file in sorted(files, key=_path) if file.kind != FILES]
    images = sorted((file for file in files if file.kind == FILES), key=_path)
    for start in range(0, len(images), files_per_shard):
        shards.append(InputShard.of(FILES, images[start : start + files_per_shard]))
    return shards


def _path(file: InputFile) -> str:
    return file.path


def plan_shards(patterns: list[str], input_format: InputFormat, files_per_shard: int) -> list[InputShard]:
    """The shards of a first run: everything the patterns match, cut into new shards."""
    return cut_into_shards(list(list_inputs(patterns, input_format).values()), files_per_shard)


# The plan is written in this many parts, whatever the number of shards: the job
# reads one part per element of a Create of their numbers, so its graph is the same
# for every run (a Create's elements are in Dataflow's job file, about 390 bytes
# each), and a runner that does not shuffle (Dask) still gets a task per part.
PLAN_PARTS = 64


def plan_part_path(output_dir: str, settings: str, part: int) -> str:
    return storage.join(output_dir, PLAN_FOLDER, f"shards-{settings}-{part:03d}-of-{PLAN_PARTS:03d}.jsonl")


def write_plan(output_dir: str, settings: str, shards: dict[str, InputShard]) -> None:
    """One JSON line per shard, the most bytes first, dealt round-robin into ``parts``
    files: runners deal out work in the order it comes, so the last shards dealt are
    the smallest and workers finish together (the longest-processing-time-first
    rule), and every part holds its share of big and small shards."""
    ordered = sorted(shards.items(), key=lambda item: (-sum(item[1].sizes), item[0]))
    lines: list[list[str]] = [[] for _ in range(PLAN_PARTS)]
    for number, (key, shard) in enumerate(ordered):
        lines[number % PLAN_PARTS].append(shard.to_json(key) + "\n")
    storage.read_many(
        range(PLAN_PARTS),
        lambda part: storage.write_atomically(
            plan_part_path(output_dir, settings, part), "".join(lines[part]).encode()
        ),
    )


def read_plan_part(part: int, output_dir: str, settings: str) -> list[str]:
    """The plan lines of one part (a job step: each worker reads its own parts)."""
    return storage.read_bytes(plan_part_path(output_dir, settings, part)).decode().splitlines()
