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
import logging
import os
import socket
import threading
import time
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
from imgembed.pipelines.plan import RunPlan
from imgembed.pipelines.shards import PLAN_FOLDER, settings_of

TEMPORARY_PREFIX = ".tmp-"
LEASE_FILE = "_lease.json"
LEASE_REFRESH_SECONDS = 30.0
LEASE_EXPIRY_SECONDS = 180.0
# Records of shards a run gave up (pipelines/shard_worker.py): kept until the next run.
FAILED_FOLDER = "_failed"
_log = logging.getLogger(__name__)


def parquet_bytes(table: pa.Table) -> bytes:
    # Dictionary encoding suits ids and labels, never float vectors: trying it on
    # the embedding column made writing 5x slower and files 40% bigger.
    dictionary = [field.name for field in table.schema if not pa.types.is_fixed_size_list(field.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", use_dictionary=dictionary)
    return sink.getvalue().to_pybytes()


def write_shard(
    output_dir: str, key: str, tables: dict[str, pa.Table], errors: pa.Table, marker: dict
) -> None:
    """The shard's files, then its marker: the marker says the rest is complete."""
    for model, table in tables.items():
        storage.write_atomically(embeddings_path(output_dir, model, key), parquet_bytes(table))
    storage.write_atomically(errors_path(output_dir, key), parquet_bytes(errors))
    storage.write_atomically(marker_path(output_dir, key), json.dumps(marker, sort_keys=True).encode())


def failure_path(output_dir: str, key: str) -> str:
    return storage.join(output_dir, FAILED_FOLDER, f"{key}.json")


def write_failure(output_dir: str, key: str, shard, reason: str, attempts: int) -> None:
    """A shard given up for this run: why, and what it holds (it has no marker)."""
    record = {"key": key, "reason": reason, "attempts": attempts, "inputs": len(shard.paths)}
    record["example"] = shard.paths[0] if shard.paths else ""
    storage.write_atomically(failure_path(output_dir, key), json.dumps(record, sort_keys=True).encode())


def read_failures(output_dir: str, keys) -> list[dict]:
    """The failure records of these shards (those a job gave up)."""
    paths = [failure_path(output_dir, key) for key in sorted(keys)]
    return [record for record in storage.read_many(paths, storage.read_json_if_exists) if record is not None]


def read_marker(output_dir: str, key: str) -> dict | None:
    return storage.read_json_if_exists(marker_path(output_dir, key))


def delete_shards(output_dir: str, keys: list[str], model_names: list[str]) -> None:
    """Every file of these shards; each marker last, so a shard is never half gone and
    still claimed (a kill midway leaves files of no shard, which the next run deletes)."""
    data = [embeddings_path(output_dir, name, key) for key in keys for name in model_names]
    data += [errors_path(output_dir, key) for key in keys]
    storage.delete([path for path in data if storage.exists(path)])
    storage.delete(
        [marker_path(output_dir, key) for key in keys if storage.exists(marker_path(output_dir, key))]
    )


def delete_leftover_temporaries(output_dir: str, model_names: list[str]) -> None:
    """Files a killed run was writing when it died (never renamed into place); the
    run's lease (RunLease) says no other run is writing them."""
    folders = [output_dir, storage.join(output_dir, MARKERS)]
    folders += [storage.join(output_dir, name) for name in model_names]
    patterns = [storage.join(folder, TEMPORARY_PREFIX + "*") for folder in folders]
    storage.delete([path for found in storage.match_sizes(patterns) for path in found])


class OutputBusy(ValueError):
    """Another live run holds the output folder."""


class RunLease:
    """One embed run at a time in an output folder: ``OUT/_lease.json`` names the run
    (host, pid) and is rewritten every LEASE_REFRESH_SECONDS while it runs. A second
    run stops with a clear message; a lease whose run died (its pid gone, on this
    host; or not refreshed for LEASE_EXPIRY_SECONDS, from any host) is taken over."""

    def __init__(self, output_dir: str):
        self._path = storage.join(output_dir, LEASE_FILE)
        self._me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="run-lease", daemon=True)

    def __enter__(self):
        if storage.exists(self._path):
            held = storage.read_json(self._path)
            if _alive(held, self._me):
                raise OutputBusy(
                    f"{storage.parent(self._path)} is being written by another imgembed embed "
                    f"(host {held['host']}, pid {held['pid']}, since {held['since']}); wait for it, or "
                    f"delete {self._path} if it is gone"
                )
        self._me["since"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        if storage.exists(self._path) and storage.read_json(self._path).get("pid") == self._me["pid"]:
            storage.delete([self._path])

    def _write(self) -> None:
        storage.write_atomically(self._path, json.dumps(self._me | {"refreshed": time.time()}).encode())

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_SECONDS):
            try:
                self._write()
            except Exception as error:  # a failed refresh costs nothing until the lease expires
                _log.debug("refreshing the lease failed: %s", error)


def _alive(held: dict, me: dict) -> bool:
    if time.time() - held.get("refreshed", 0) > LEASE_EXPIRY_SECONDS:
        return False
    if held.get("host") != me["host"]:
        return True
    if held.get("pid") == me["pid"]:
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    for folder in (PLAN_FOLDER, MODELS_FOLDER, FAILED_FOLDER):
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
        "reused": 0,  # inputs whose answer was copied from the shard a shard rewrote
        "reused_input_errors": 0,
        "input_errors": 0,
        "images_decoded": 0,
        "errors_by_reason": Counter(),
        "error_examples": {},
        "rows": Counter(),
        "inference_errors": Counter(),
        "model_seconds": Counter(),
        "reused_rows": Counter(),
    }
    for marker in markers:
        total["shards"] += marker.get("shards", 1)
        for name in ("inputs", "reused", "reused_input_errors", "input_errors", "images_decoded"):
            total[name] += marker.get(name, 0)
        for name in ("errors_by_reason", "rows", "inference_errors", "model_seconds", "reused_rows"):
            total[name].update(marker.get(name, {}))
        for reason, uri in marker["error_examples"].items():
            known = total["error_examples"].get(reason)
            total["error_examples"][reason] = uri if known is None else min(known, uri)
    return {name: dict(value) if isinstance(value, Counter) else value for name, value in total.items()}


@dataclasses.dataclass
class ModelSummary:
    model: str
    backend: str
    precision: str
    rows: int  # in the output, from every run
    inference_errors: int
    embedded: int  # rows this run embedded (not copied from a shard it rewrote)
    model_seconds: float  # this run's, in model calls, summed over workers
    embeddings: str
    fidelity: dict | None = None  # int8's against fp32, on images of the first int8 run

    @property
    def ms_per_image(self) -> float | None:
        return 1000 * self.model_seconds / self.embedded if self.embedded else None


@dataclasses.dataclass
class RunWork:
    """What this run did, apart from what earlier runs had committed."""

    shards_written: int
    shards_rewritten: int  # of those, replacing a shard some of whose inputs changed
    shards_kept: int  # committed before, inputs unchanged: untouched
    shards_retracted: int  # every input deleted: their rows removed
    inputs_read: int  # read and decoded or failed now
    rows_reused: int  # inputs of rewritten shards whose rows were copied, not embedded again
    new_inputs: int
    changed_inputs: int
    deleted_inputs: int
    input_errors: int  # of the inputs read now
    seconds: float


@dataclasses.dataclass
class RunSummary:
    """The output (every committed shard, of this run or before) and this run's work;
    ``balanced`` proves nothing was lost: in every shard, for every model,
    inputs = rows + read/decode errors + inference errors."""

    inputs: int
    images_decoded: int  # this run
    input_errors: int
    errors_by_reason: dict[str, int]
    error_examples: dict[str, str]
    models: list[ModelSummary]
    shards: int
    run: RunWork
    errors: str
    max_error_rate: float  # the share of failed inputs above which the run failed
    failed_shards: list[dict] = dataclasses.field(default_factory=list)  # given up this run, unmarked

    @classmethod
    def from_markers(
        cls,
        written: dict,
        kept: list[dict],
        plan: RunPlan,
        output_dir: str,
        models_run: dict,
        seconds: float,
        max_error_rate: float,
        failed_shards: list[dict] = (),
    ) -> RunSummary:
        """``written``: the sum of the markers this run wrote (the job's totals);
        ``kept``: the markers of the committed shards it left alone."""
        total = add_markers([written, *kept])
        models = [
            ModelSummary(
                name,
                model.backend,
                model.precision,
                total["rows"].get(name, 0),
                total["inference_errors"].get(name, 0),
                written["rows"].get(name, 0) - written["reused_rows"].get(name, 0),
                round(written["model_seconds"].get(name, 0.0), 3),
                embeddings_glob(storage.join(output_dir, name)),
                model.fidelity,
            )
            for name, model in models_run.items()
        ]
        run = RunWork(
            shards_written=written["shards"],
            shards_rewritten=plan.rewritten,
            shards_kept=len(plan.kept),
            shards_retracted=len(plan.retracted),
            inputs_read=written["inputs"] - written["reused"],
            rows_reused=written["reused"],
            new_inputs=plan.changes.new,
            changed_inputs=plan.changes.changed,
            deleted_inputs=plan.changes.deleted,
            input_errors=written["input_errors"] - written["reused_input_errors"],
            seconds=round(seconds, 3),
        )
        return cls(
            inputs=total["inputs"],
            images_decoded=written["images_decoded"],
            input_errors=total["input_errors"],
            errors_by_reason=total["errors_by_reason"],
            error_examples=total["error_examples"],
            models=models,
            shards=total["shards"],
            run=run,
            errors=errors_glob(output_dir),
            max_error_rate=max_error_rate,
            failed_shards=list(failed_shards),
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
        run = self.run
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.errors_by_reason.items()))
        lines = [
            f"Read {run.inputs_read} inputs in {run.shards_written} shards in {run.seconds:.1f} s; "
            f"{run.input_errors} could not be decoded"
        ]
        if run.shards_kept or run.shards_rewritten or run.shards_retracted:
            lines.append(
                f"  since the last run: {run.new_inputs} new, {run.changed_inputs} changed, "
                f"{run.deleted_inputs} deleted inputs; {run.shards_kept} shards unchanged, "
                f"{run.shards_rewritten} rewritten ({run.rows_reused} inputs' rows reused), "
                f"{run.shards_retracted} retracted"
            )
        for model in self.models:
            speed = f"{model.embedded / max(run.seconds, 1e-9):.1f} images/s end to end"
            if model.ms_per_image:
                speed += f", {model.ms_per_image:.1f} ms of model time per image"
            runs_on = model.backend + (" int8" if model.precision == "int8" else "")
            if model.fidelity:
                runs_on += (
                    f", kNN@10 {model.fidelity['knn@10_overlap']:.3f} and cosine "
                    f"{model.fidelity['cosine_mean']:.4f} of fp32"
                )
            lines += [
                f"Embedded {model.embedded} images with {model.model} on {runs_on} ({speed})",
                f"  inputs {self.inputs} = embedded {model.rows} + errors {self.input_errors + model.inference_errors}"
                f" in {self.shards} shards",
                f"  embeddings: {model.embeddings}",
            ]
        lines.append(
            f"Errors: {self.errors_total}" + (f" ({reasons})" if reasons else "") + f" in {self.errors}"
        )
        if not self.balanced:
            lines.append("ACCOUNTING MISMATCH: some inputs produced neither a row nor an error row")
        return "\n".join(lines)

    def failure_report(self) -> str | None:
        """Why the run failed, when shards were given up; else None."""
        if not self.failed_shards:
            return None
        inputs = sum(record["inputs"] for record in self.failed_shards)
        lines = [
            f"imgembed embed: {len(self.failed_shards)} shards ({inputs} inputs) failed after "
            f"{self.failed_shards[0]['attempts']} tries and have no rows yet; run the same command "
            "again to try them again. Every other shard is committed:"
        ]
        lines += [
            f"  {record['key']} ({record['inputs']} inputs, e.g. {record['example']}): {record['reason']}"
            for record in self.failed_shards[:10]
        ]
        return "\n".join(lines)


def write_summary(output_dir: str, summary: RunSummary) -> str:
    path = storage.join(output_dir, SUMMARY_FILE)
    storage.write_atomically(path, summary.to_json().encode())
    return path
