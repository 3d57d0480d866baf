"""Where the embed job writes, how, and what it wrote.

Layout under ``--output DIR``::

    DIR/<model-name>/embeddings-SSSSS-of-NNNNN.parquet   one row per embedded image
    DIR/errors-SSSSS-of-NNNNN.parquet                   one row per input that failed
    DIR/run_summary.json                                counts and throughput of the run
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.records import ERROR_SCHEMA

PARQUET_SUFFIX = ".parquet"
SUMMARY_FILE = "run_summary.json"


def embeddings_prefix(output_dir: str, model_name: str) -> str:
    return FileSystems.join(output_dir, model_name, "embeddings")


def errors_prefix(output_dir: str) -> str:
    return FileSystems.join(output_dir, "errors")


def embeddings_glob(output_dir: str, model_name: str) -> str:
    return f"{embeddings_prefix(output_dir, model_name)}-*{PARQUET_SUFFIX}"


def errors_glob(output_dir: str) -> str:
    return f"{errors_prefix(output_dir)}-*{PARQUET_SUFFIX}"


def list_files(pattern: str) -> list[str]:
    (result,) = FileSystems.match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


def existing_outputs(output_dir: str, model_names: list[str]) -> list[str]:
    patterns = [errors_glob(output_dir)] + [embeddings_glob(output_dir, m) for m in model_names]
    return [path for pattern in patterns for path in list_files(pattern)]


class WriteParquet(beam.PTransform):
    """Row dicts -> ``<prefix>-SSSSS-of-NNNNN.parquet``; writes one empty file
    when there are no rows, so every run leaves the files it promises."""

    def __init__(self, prefix: str, schema):
        super().__init__()
        self._prefix = prefix
        self._schema = schema

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            self._prefix, self._schema, file_name_suffix=PARQUET_SUFFIX, codec="snappy"
        )


def write_errors(errors, output_dir: str):
    return errors | "WriteErrors" >> WriteParquet(errors_prefix(output_dir), ERROR_SCHEMA)


@dataclasses.dataclass
class RunSummary:
    """What one embed run produced; ``balanced`` proves nothing was lost."""

    model: str
    inputs: int | None
    rows: int
    errors_by_reason: dict[str, int]
    seconds: float
    model_images_per_sec: float | None
    embeddings: str
    errors: str

    @property
    def errors_total(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def balanced(self) -> bool:
        return self.inputs is None or self.inputs == self.rows + self.errors_total

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["errors_total"] = self.errors_total
        fields["balanced"] = self.balanced
        return json.dumps(fields, indent=2, sort_keys=True)

    def report(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.errors_by_reason.items()))
        inputs = "?" if self.inputs is None else str(self.inputs)
        lines = [
            f"Embedded {self.rows} images with {self.model} in {self.seconds:.1f} s "
            f"({self.rows / max(self.seconds, 1e-9):.1f} images/s end to end"
            + (
                f", {self.model_images_per_sec:.1f} images/s in the model)"
                if self.model_images_per_sec
                else ")"
            ),
            f"  inputs {inputs} = embedded {self.rows} + errors {self.errors_total}"
            + (f" ({reasons})" if reasons else ""),
            f"  embeddings: {self.embeddings}",
            f"  errors:     {self.errors}",
        ]
        if not self.balanced:
            lines.append("  ACCOUNTING MISMATCH: some inputs produced neither a row nor an error row")
        return "\n".join(lines)


def count_rows(pattern: str) -> int:
    """Rows in every Parquet file matching the pattern, from the footers alone."""
    total = 0
    for path in list_files(pattern):
        with FileSystems.open(path) as file:
            total += pq.ParquetFile(file).metadata.num_rows
    return total


def count_errors_by_reason(pattern: str) -> dict[str, int]:
    reasons: Counter[str] = Counter()
    for path in list_files(pattern):
        with FileSystems.open(path) as file:
            reasons.update(pq.read_table(file, columns=["reason"]).column("reason").to_pylist())
    return dict(reasons)


def write_summary(output_dir: str, summary: RunSummary) -> str:
    path = FileSystems.join(output_dir, SUMMARY_FILE)
    with FileSystems.create(path) as file:
        file.write(summary.to_json().encode())
    return path
