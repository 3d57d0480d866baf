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
class ModelSummary:
    model: str
    rows: int
    inference_errors: int
    images_per_sec_in_model: float | None
    embeddings: str


@dataclasses.dataclass
class RunSummary:
    """What one embed run produced; ``balanced`` proves nothing was lost: for every
    model, inputs = its rows + the shared read/decode errors + its inference errors."""

    inputs: int | None
    images_decoded: int | None  # once per image, whatever the number of models
    input_errors: int
    errors_by_reason: dict[str, int]
    models: list[ModelSummary]
    seconds: float
    errors: str

    @property
    def errors_total(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def balanced(self) -> bool:
        return self.inputs is None or all(
            self.inputs == model.rows + self.input_errors + model.inference_errors for model in self.models
        )

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["errors_total"] = self.errors_total
        fields["balanced"] = self.balanced
        return json.dumps(fields, indent=2, sort_keys=True)

    def report(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.errors_by_reason.items()))
        inputs = "?" if self.inputs is None else str(self.inputs)
        lines = [f"Read {inputs} inputs in {self.seconds:.1f} s; {self.input_errors} could not be decoded"]
        for model in self.models:
            speed = f"{model.rows / max(self.seconds, 1e-9):.1f} images/s end to end"
            if model.images_per_sec_in_model:
                speed += f", {model.images_per_sec_in_model:.1f} images/s in the model"
            lines += [
                f"Embedded {model.rows} images with {model.model} ({speed})",
                f"  inputs {inputs} = embedded {model.rows} + errors "
                f"{self.input_errors + model.inference_errors}",
                f"  embeddings: {model.embeddings}",
            ]
        lines.append(
            f"Errors: {self.errors_total}" + (f" ({reasons})" if reasons else "") + f" in {self.errors}"
        )
        if not self.balanced:
            lines.append("ACCOUNTING MISMATCH: some inputs produced neither a row nor an error row")
        return "\n".join(lines)


def summarize(
    output_dir: str,
    model_names: list[str],
    inputs: int | None,
    images_decoded: int | None,
    seconds: float,
    model_images_per_sec: dict[str, float | None],
) -> RunSummary:
    """Counts what the run wrote, from the files themselves."""
    errors = read_errors(errors_glob(output_dir))
    input_errors = sum(1 for row in errors if row["stage"] != "inference")
    models = [
        ModelSummary(
            model=name,
            rows=count_rows(embeddings_glob(output_dir, name)),
            inference_errors=sum(1 for row in errors if row["stage"] == "inference" and row["model"] == name),
            images_per_sec_in_model=model_images_per_sec.get(name),
            embeddings=embeddings_glob(output_dir, name),
        )
        for name in model_names
    ]
    reasons = dict(Counter(row["reason"] for row in errors))
    return RunSummary(inputs, images_decoded, input_errors, reasons, models, seconds, errors_glob(output_dir))


def count_rows(pattern: str) -> int:
    """Rows in every Parquet file matching the pattern, from the footers alone."""
    total = 0
    for path in list_files(pattern):
        with FileSystems.open(path) as file:
            total += pq.ParquetFile(file).metadata.num_rows
    return total


def read_errors(pattern: str) -> list[dict]:
    """Stage, reason and model of every error row (errors are few; their messages are not read)."""
    rows: list[dict] = []
    for path in list_files(pattern):
        with FileSystems.open(path) as file:
            rows += pq.read_table(file, columns=["stage", "reason", "model"]).to_pylist()
    return rows


def write_summary(output_dir: str, summary: RunSummary) -> str:
    path = FileSystems.join(output_dir, SUMMARY_FILE)
    with FileSystems.create(path) as file:
        file.write(summary.to_json().encode())
    return path
