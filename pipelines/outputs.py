"""What the embed job writes, and what an output folder already holds.

A shard's files (one embeddings file per model, its errors file) are written
first and its marker last, each in one piece (aside and renamed on local disks;
object stores show an object only once its upload is complete), so a kill at any
moment leaves either a complete shard or one that the next run redoes. The marker
holds the shard's counts; the run's summary is their sum, computed by the job.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from imgembed.common import storage
from imgembed.common.embedding_files import (
    MARKERS,
    SUMMARY_FILE,
    embeddings_glob,
    embeddings_path,
    errors_glob,
    errors_path,
    key_of,
    marker_path,
    markers_glob,
)
from imgembed.pipelines.model_staging import MODELS_FOLDER
from imgembed.pipelines.shards import PLAN_FOLDER, settings_of

TEMPORARY_PREFIX = ".tmp-"


def parquet_bytes(table: pa.Table) -> bytes:
    # Dictionary encoding suits ids and labels, never float vectors: trying it on
    # the embedding column made writing 5x slower and files 40% bigger.
    dictionary = [field.name for field in table.schema if not pa.types.is_fixed_size_list(field.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", use_dictionary=dictionary)
    return sink.getvalue().to_pybytes()


def write_whole(path: str, data: bytes) -> None:
    """Readers see the whole file or none of it."""
    if storage.is_local(path):
        storage.write_atomically(path, data)
    else:  # an object appears only when its upload completes: no rename (a copy) needed
        storage.write_bytes(path, data)


def write_shard(
    output_dir: str, key: str, tables: dict[str, pa.Table], errors: pa.Table, marker: dict
) -> None:
    """The shard's files, then its marker: the marker says the rest is complete."""
    for model, table in tables.items():
        write_whole(embeddings_path(output_dir, model, key), parquet_bytes(table))
    write_whole(errors_path(output_dir, key), parquet_bytes(errors))
    write_whole(marker_path(output_dir, key), json.dumps(marker, sort_keys=True).encode())


def read_marker(output_dir: str, key: str) -> dict | None:
    path = marker_path(output_dir, key)
    return storage.read_json(path) if storage.exists(path) else None


@dataclasses.dataclass
class OutputState:
    """What an output folder already holds, against the shards a run plans."""

    done: set[str]  # planned shards already complete
    stale: list[str]  # files of this run's settings that it does not plan (inputs changed since)
    foreign: list[str]  # markers of shards made with other settings (model, preprocessing...)


def output_state(output_dir: str, model_names: list[str], planned: set[str], settings: str) -> OutputState:
    """From listings alone: shard keys name their settings. Each folder is listed
    once, whatever the number of shards."""
    patterns = [markers_glob(output_dir), errors_glob(output_dir)]
    patterns += [embeddings_glob(storage.join(output_dir, name)) for name in model_names]
    markers, *data = [sorted(found) for found in storage.match_sizes(patterns)]
    ours = [path for path in markers if settings_of(key_of(path)) == settings]
    foreign = [path for path in markers if settings_of(key_of(path)) != settings]
    done = {key_of(path) for path in ours} & planned
    stale = [path for path in ours if key_of(path) not in planned]
    stale += [
        path
        for paths in data
        for path in paths
        if settings_of(key_of(path)) == settings and key_of(path) not in planned
    ]
    return OutputState(done, stale, foreign)


def delete_leftover_temporaries(output_dir: str, model_names: list[str]) -> None:
    """Files a killed run was writing when it died (never renamed into place)."""
    folders = [output_dir, storage.join(output_dir, MARKERS)]
    folders += [storage.join(output_dir, name) for name in model_names]
    patterns = [storage.join(folder, TEMPORARY_PREFIX + "*") for folder in folders]
    storage.delete([path for found in storage.match_sizes(patterns) for path in found])


def delete_everything(output_dir: str, foreign_markers: list[str], model_names: list[str]) -> None:
    """Every output imgembed wrote in the folder, of any settings: the model folders
    this run uses and those the other settings' markers name (one marker each)."""
    first_of_each = {}
    for path in foreign_markers:
        first_of_each.setdefault(settings_of(key_of(path)), path)
    names = set(model_names)
    for path in first_of_each.values():
        names |= set(storage.read_json(path)["models"])
    patterns = [markers_glob(output_dir), errors_glob(output_dir)]
    patterns += [embeddings_glob(storage.join(output_dir, name)) for name in sorted(names)]
    storage.delete([path for found in storage.match_sizes(patterns) for path in found])
    for folder in (PLAN_FOLDER, MODELS_FOLDER):
        storage.delete_folder(storage.join(output_dir, folder))
    summary = storage.join(output_dir, SUMMARY_FILE)
    if storage.exists(summary):
        storage.delete([summary])


# --- the run's summary: the sum of its shards' markers ---------------------------------


def add_markers(markers) -> dict:
    """Sums shard markers into one: counts add up, each reason keeps its first example
    (by URI, so the same run gives the same summary)."""
    total = {
        "shards": 0,
        "inputs": 0,
        "input_errors": 0,
        "images_decoded": 0,
        "errors_by_reason": Counter(),
        "error_examples": {},
        "rows": Counter(),
        "inference_errors": Counter(),
        "model_seconds": Counter(),
    }
    for marker in markers:
        total["shards"] += marker.get("shards", 1)
        for name in ("inputs", "input_errors", "images_decoded"):
            total[name] += marker[name]
        for name in ("errors_by_reason", "rows", "inference_errors", "model_seconds"):
            total[name].update(marker[name])
        for reason, uri in marker["error_examples"].items():
            known = total["error_examples"].get(reason)
            total["error_examples"][reason] = uri if known is None else min(known, uri)
    return {name: dict(value) if isinstance(value, Counter) else value for name, value in total.items()}


@dataclasses.dataclass
class ModelSummary:
    model: str
    backend: str
    rows: int
    inference_errors: int
    model_seconds: float  # in model calls, summed over workers
    embeddings: str

    @property
    def ms_per_image(self) -> float | None:
        return 1000 * self.model_seconds / self.rows if self.rows else None


@dataclasses.dataclass
class RunSummary:
    """What the output holds for a run's shards; ``balanced`` proves nothing was lost:
    in every shard, for every model, inputs = rows + read/decode errors + inference errors."""

    inputs: int
    images_decoded: int
    input_errors: int
    errors_by_reason: dict[str, int]
    error_examples: dict[str, str]
    models: list[ModelSummary]
    shards: int
    shards_done_before: int
    seconds: float
    errors: str
    max_error_rate: float  # the share of failed inputs above which the run failed

    @classmethod
    def from_markers(
        cls,
        total: dict,
        output_dir: str,
        backends: dict[str, str],
        done_before: int,
        seconds: float,
        max_error_rate: float,
    ) -> RunSummary:
        models = [
            ModelSummary(
                name,
                backend,
                total["rows"].get(name, 0),
                total["inference_errors"].get(name, 0),
                round(total["model_seconds"].get(name, 0.0), 3),
                embeddings_glob(storage.join(output_dir, name)),
            )
            for name, backend in backends.items()
        ]
        return cls(
            inputs=total["inputs"],
            images_decoded=total["images_decoded"],
            input_errors=total["input_errors"],
            errors_by_reason=total["errors_by_reason"],
            error_examples=total["error_examples"],
            models=models,
            shards=total["shards"],
            shards_done_before=done_before,
            seconds=round(seconds, 3),
            errors=errors_glob(output_dir),
            max_error_rate=max_error_rate,
        )

    @property
    def errors_total(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def balanced(self) -> bool:
        return all(
            self.inputs == model.rows + self.input_errors + model.inference_errors for model in self.models
        )

    def error_rate(self, model: ModelSummary) -> float:
        return (self.input_errors + model.inference_errors) / self.inputs if self.inputs else 0.0

    def over_error_rate(self) -> list[ModelSummary]:
        return [model for model in self.models if self.error_rate(model) > self.max_error_rate]

    def top_reasons(self, count: int = 5) -> list[tuple[str, int, str]]:
        """(reason, how many, an example input), the most common first."""
        ranked = sorted(self.errors_by_reason.items(), key=lambda item: (-item[1], item[0]))[:count]
        return [(reason, number, self.error_examples.get(reason, "")) for reason, number in ranked]

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["errors_total"] = self.errors_total
        fields["balanced"] = self.balanced
        return json.dumps(fields, indent=2, sort_keys=True)

    def report(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.errors_by_reason.items()))
        resumed = f" ({self.shards_done_before} were complete already)" if self.shards_done_before else ""
        lines = [
            f"Read {self.inputs} inputs in {self.shards} shards{resumed} in {self.seconds:.1f} s; "
            f"{self.input_errors} could not be decoded"
        ]
        for model in self.models:
            speed = f"{model.rows / max(self.seconds, 1e-9):.1f} images/s end to end"
            if model.ms_per_image:
                speed += f", {model.ms_per_image:.1f} ms of model time per image"
            lines += [
                f"Embedded {model.rows} images with {model.model} on {model.backend} ({speed})",
                f"  inputs {self.inputs} = embedded {model.rows} + errors {self.input_errors + model.inference_errors}",
                f"  embeddings: {model.embeddings}",
            ]
        lines.append(
            f"Errors: {self.errors_total}" + (f" ({reasons})" if reasons else "") + f" in {self.errors}"
        )
        if not self.balanced:
            lines.append("ACCOUNTING MISMATCH: some inputs produced neither a row nor an error row")
        return "\n".join(lines)


def write_summary(output_dir: str, summary: RunSummary) -> str:
    path = storage.join(output_dir, SUMMARY_FILE)
    write_whole(path, summary.to_json().encode())
    return path
