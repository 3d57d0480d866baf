"""File patterns -> (uri, bytes) through Beam's FileSystems (local, gs://, s3://, ...).

A pattern is a glob (``photos/*.jpg``, ``gs://bucket/shard-*/**``) or a folder,
which means every file below it. Files over the byte limit, empty files and
unreadable files become error rows without their bytes being read.
"""

from __future__ import annotations

import logging
import os

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.dead_letters import ERRORS, METRICS_NAMESPACE, dead_letter
from pipelines.records import STAGE_READ
from transforms.decode import DecodeLimits, ImageError, check_file_size

READ_FAILED = "read_failed"
_log = logging.getLogger(__name__)


class InputError(ValueError):
    """The input patterns cannot be read at all (nothing matches, bad path)."""


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


class _ReadFile(beam.DoFn):
    def __init__(self, limits: DecodeLimits):
        self._limits = limits
        self._inputs = Metrics.counter(METRICS_NAMESPACE, "inputs")

    def process(self, metadata):
        uri = metadata.path
        # ``**`` matches folders too on local disks; they are not inputs.
        if FileSystems.get_scheme(uri) is None and os.path.isdir(uri):
            return []
        self._inputs.inc()
        try:
            check_file_size(metadata.size_in_bytes, self._limits)
            with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as file:
                return [(uri, file.read())]
        except ImageError as error:
            return [dead_letter(uri, STAGE_READ, error.reason, error.message)]
        except Exception as error:  # every filesystem raises its own kind of error
            _log.warning("cannot read %s: %s", uri, error)
            return [dead_letter(uri, STAGE_READ, READ_FAILED, f"{type(error).__name__}: {error}")]


class ReadImageFiles(beam.PTransform):
    """Reads every file matching the patterns.

    Outputs a main PCollection of ``(uri, bytes)`` and an ``errors`` one of error rows.
    """

    def __init__(self, patterns: list[str], limits: DecodeLimits):
        super().__init__()
        self._patterns = patterns
        self._limits = limits

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> fileio.MatchAll()
            # Overlapping patterns must not read a file twice. Grouping by path
            # also spreads the file list, matched on one worker, over all workers.
            | "ByPath" >> beam.Map(lambda metadata: (metadata.path, metadata))
            | "Dedupe" >> beam.CombinePerKey(lambda copies: next(iter(copies)))
            | "Files" >> beam.Values()
            | "Read" >> beam.ParDo(_ReadFile(self._limits)).with_outputs(ERRORS, main="files")
        )
