"""Where the embed job writes, how, and what it wrote: one set of files per input shard.

Layout under ``--output DIR`` (KEY names an input shard under the run's settings,
see pipelines/shards.py)::

    DIR/<model-name>/embeddings-KEY.parquet   the shard's rows, one per embedded image
    DIR/errors-KEY.parquet                    the shard's inputs that failed, with reasons
    DIR/_shards/KEY.json                      written last: the shard is complete, and its counts
    DIR/run_summary.json                      the sum over the run's shards
    DIR/_parts/KEY/                           while a shard is being made: its rows in parts

Rows are written where they are made, into part files of up to 500 rows
(``WriteParts``); the shuffle to the shard's writer (``WriteShard``) carries their
names and the error rows, not embeddings and thumbnails, so it stays small on every
runner (the local runner holds a shuffle in memory). The writer joins the parts
into the shard's files. Each file is written to a temporary name and renamed, and
the marker comes last, so a crash leaves either a complete shard or one that the
next run redoes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from imgembed.common.embedding_files import (
    ERROR_SCHEMA,
    MARKERS,
    PARQUET_SUFFIX,
    STAGE_INFERENCE,
    SUMMARY_FILE,
    embeddings_path,
    errors_glob,
    errors_path,
    key_of,
    marker_path,
)
from imgembed.common.embedding_files import embeddings_glob as model_glob

PARTS = "_parts"
# A shard's rows are written as a part when it has this many...
ROWS_PER_PART = 500
# ...or when the rows a worker holds for all its shards reach this size. Shards
# arrive interleaved (their pieces are dealt out largest first), and writing every
# shard's few rows each time the worker held 500 made parts of ~32 rows: 1.6 ms to
# write and read each locally (50 us a row, against 10 in 200-row parts), and a
# request apiece on an object store.
MAX_HELD_BYTES = 64 * 2**20
_log = logging.getLogger(__name__)


def parts_folder(output_dir: str, key: str | None = None) -> str:
    folder = FileSystems.join(output_dir, PARTS)
    return FileSystems.join(folder, key) if key else folder


def embeddings_glob(output_dir: str, model_name: str) -> str:
    return model_glob(FileSystems.join(output_dir, model_name))


def list_files(pattern: str) -> list[str]:
    (result,) = FileSystems.match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


def read_json(path: str) -> dict:
    with FileSystems.open(path) as file:
        return json.loads(file.read())


def write_file(path: str, data: bytes) -> None:
    _ensure_folder(path.rsplit("/", 1)[0])
    with FileSystems.create(path) as file:
        file.write(data)


def write_atomically(path: str, data: bytes) -> None:
    """Write aside, then rename: readers see the whole file or none of it."""
    temporary = FileSystems.join(path.rsplit("/", 1)[0], f".tmp-{uuid.uuid4().hex}")
    write_file(temporary, data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def delete_folder(folder: str) -> None:
    """A folder and everything in it (on object stores, under the prefix), if any."""
    # Object stores delete a prefix given a trailing slash; a local path names the folder.
    is_local = FileSystems.get_scheme(folder) is None
    try:
        FileSystems.delete([folder if is_local else folder + "/"])
    except BeamIOError:
        if FileSystems.exists(folder):
            raise


def _ensure_folder(folder: str) -> None:
    # Workers writing shards of one model race to create its folder.
    try:
        FileSystems.mkdirs(folder)
    except OSError:
        if not FileSystems.exists(folder):
            raise


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The embedding column is built from one array, not row by row."""
    columns = {}
    for field in schema:
        values = [row[field.name] for row in rows]
        if pa.types.is_fixed_size_list(field.type):
            flat = np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
            columns[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), field.type.list_size)
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    # Dictionary encoding suits ids and labels, never float vectors: trying it on
    # the embedding column made writing 5x slower and files 40% bigger.
    dictionary = [field.name for field in table.schema if not pa.types.is_fixed_size_list(field.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", use_dictionary=dictionary)
    return sink.getvalue().to_pybytes()


def read_table(path: str) -> pa.Table:
    with FileSystems.open(path) as file:
        return pq.read_table(file)


class WriteParts(beam.DoFn):
    """One model's (key, row)s -> part files under DIR/_parts/KEY/, each announced
    downstream as (key, {"model", "path", "rows"}).

    Only parts that reach the writer join the shard: a retried bundle's parts are
    announced by the attempt that succeeded, and the others are deleted with the
    folder.
    """

    def __init__(
        self,
        output_dir: str,
        model: str,
        schema: pa.Schema,
        rows_per_part: int = ROWS_PER_PART,
        max_held_bytes: int = MAX_HELD_BYTES,
    ):
        self._output_dir = output_dir
        self._model = model
        self._schema = schema
        self._rows_per_part = rows_per_part
        self._max_held_bytes = max_held_bytes

    def start_bundle(self):
        self._rows: dict[str, list[dict]] = defaultdict(list)
        self._bytes: dict[str, int] = defaultdict(int)  # of each shard's rows held
        self._held_bytes = 0

    def process(self, element):
        key, row = element
        rows = self._rows[key]
        rows.append(row)
        size = _row_bytes(row)
        self._bytes[key] += size
        self._held_bytes += size
        if len(rows) >= self._rows_per_part:
            yield from self._write_parts([key])
        elif self._held_bytes >= self._max_held_bytes:
            yield from self._write_parts(list(self._rows))

    def finish_bundle(self):
        for part in self._write_parts(list(self._rows)):
            yield GlobalWindows.windowed_value(part)

    def _write_parts(self, keys: list[str]):
        for key in keys:
            rows = self._rows.pop(key)
            self._held_bytes -= self._bytes.pop(key)
            folder = parts_folder(self._output_dir, key)
            path = FileSystems.join(folder, f"{self._model}-{uuid.uuid4().hex}{PARQUET_SUFFIX}")
            # No rename needed (a costly copy on object stores): a part is named
            # downstream only once it is whole.
            write_file(path, parquet_bytes(rows_table(rows, self._schema)))
            yield key, {"model": self._model, "path": path, "rows": len(rows)}


def _row_bytes(row: dict) -> int:
    """About what a held row costs: its arrays, strings and bytes."""
    return sum(
        value.nbytes if isinstance(value, np.ndarray) else len(value) if isinstance(value, str | bytes) else 8
        for value in row.values()
    )


class AccountingError(RuntimeError):
    """A shard's inputs are not all rows or error rows: never write such a shard."""


class WriteShard(beam.DoFn):
    """(key, {"counts": [n], "errors": [rows], "parts": [parts]}) -> the shard's files.

    Idempotent: a retry of a shard whose marker is written only cleans up its parts."""

    def __init__(self, output_dir: str, schemas: dict[str, pa.Schema], settings: dict, settings_key: str):
        self._output_dir = output_dir
        self._schemas = schemas
        self._settings = settings
        self._settings_key = settings_key

    def process(self, element):
        key, groups = element
        if not self._is_complete(key):
            self._write(key, groups)
        delete_folder(parts_folder(self._output_dir, key))
        yield key

    def _is_complete(self, key: str) -> bool:
        marker = marker_path(self._output_dir, key)
        return FileSystems.exists(marker) and read_json(marker)["settings_key"] == self._settings_key

    def _write(self, key: str, groups: dict) -> None:
        inputs = sum(groups["counts"])  # one count per piece the shard was read in
        errors = sorted(groups["errors"], key=lambda row: (row["uri"], row["stage"], row["model"] or ""))
        input_errors = [row for row in errors if row["stage"] != STAGE_INFERENCE]
        marker = {
            "key": key,
            "settings_key": self._settings_key,
            "models": sorted(self._schemas),
            "inputs": inputs,
            "input_errors": len(input_errors),
            "errors_by_reason": dict(Counter(row["reason"] for row in errors)),
            "rows": {},
            "inference_errors": {},
        }
        for model, schema in self._schemas.items():
            parts = [read_table(part["path"]) for part in groups["parts"] if part["model"] == model]
            # Sorted and in one chunk: the same rows give the same bytes on every run.
            rows = pa.concat_tables([schema.empty_table(), *parts]).sort_by("uri").combine_chunks()
            failed = sum(1 for row in errors if row["stage"] == STAGE_INFERENCE and row["model"] == model)
            duplicates = len(rows) - pc.count_distinct(rows["id"]).as_py()
            if len(rows) + len(input_errors) + failed != inputs or duplicates:
                raise AccountingError(
                    f"shard {key}, model {model}: {inputs} inputs but {len(rows)} rows + "
                    f"{len(input_errors) + failed} errors ({duplicates} duplicate ids)"
                )
            write_atomically(embeddings_path(self._output_dir, model, key), parquet_bytes(rows))
            marker["rows"][model] = len(rows)
            marker["inference_errors"][model] = failed
        write_atomically(errors_path(self._output_dir, key), parquet_bytes(rows_table(errors, ERROR_SCHEMA)))
        write_atomically(marker_path(self._output_dir, key), json.dumps(marker, sort_keys=True).encode())


@dataclasses.dataclass
class OutputState:
    """What an output folder already holds, against the shards a run plans."""

    done: set[str]  # planned shards already complete
    stale: list[str]  # files of shards this run does not plan (inputs changed since)
    foreign: list[str]  # complete shards made with other settings (model, preprocessing...)


def output_state(
    output_dir: str, model_names: list[str], planned: set[str], settings_key: str
) -> OutputState:
    markers = {key_of(path): path for path in list_files(FileSystems.join(output_dir, MARKERS, "*.json"))}
    foreign_keys = {key for key, path in markers.items() if read_json(path)["settings_key"] != settings_key}
    stale = [path for key, path in markers.items() if key not in planned and key not in foreign_keys]
    # Data files of unplanned shards go too: with a marker of these settings, their
    # inputs are planned in other shards now; without one, a crashed run left them.
    patterns = [errors_glob(output_dir)] + [embeddings_glob(output_dir, name) for name in model_names]
    stale += [
        path
        for pattern in patterns
        for path in list_files(pattern)
        if key_of(path) not in planned and key_of(path) not in foreign_keys
    ]
    done = {key for key in markers if key in planned and key not in foreign_keys}
    return OutputState(done, stale, [markers[key] for key in sorted(foreign_keys)])


def delete_leftover_temporaries(output_dir: str, model_names: list[str]) -> None:
    """Files a killed run was writing when it died (never renamed into place), and
    the parts of shards it did not finish."""
    folders = [output_dir, FileSystems.join(output_dir, MARKERS)]
    folders += [FileSystems.join(output_dir, name) for name in model_names]
    paths = [path for folder in folders for path in list_files(FileSystems.join(folder, ".tmp-*"))]
    if paths:
        FileSystems.delete(paths)
    delete_folder(parts_folder(output_dir))


def delete_everything(output_dir: str, model_names: list[str]) -> None:
    patterns = [FileSystems.join(output_dir, MARKERS, "*.json"), errors_glob(output_dir)]
    patterns += [embeddings_glob(output_dir, name) for name in model_names]
    paths = [path for pattern in patterns for path in list_files(pattern)]
    if paths:
        FileSystems.delete(paths)


@dataclasses.dataclass
class ModelSummary:
    model: str
    rows: int
    inference_errors: int
    images_per_sec_in_model: float | None  # in one stream of model calls (one worker thread)
    embeddings: str


@dataclasses.dataclass
class RunSummary:
    """What the output holds for a run's shards; ``balanced`` proves nothing was lost:
    in every shard, for every model, inputs = rows + read/decode errors + inference errors."""

    inputs: int
    images_decoded: int | None
    input_errors: int
    errors_by_reason: dict[str, int]
    models: list[ModelSummary]
    shards: int
    shards_done_before: int
    seconds: float
    errors: str

    @property
    def errors_total(self) -> int:
        return sum(self.errors_by_reason.values())

    @property
    def balanced(self) -> bool:
        return all(
            self.inputs == model.rows + self.input_errors + model.inference_errors for model in self.models
        )

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
            if model.images_per_sec_in_model:
                speed += f", {1000 / model.images_per_sec_in_model:.1f} ms of model time per image"
            lines += [
                f"Embedded {model.rows} images with {model.model} ({speed})",
                f"  inputs {self.inputs} = embedded {model.rows} + errors {self.input_errors + model.inference_errors}",
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
    keys: list[str],
    done_before: int,
    seconds: float,
    images_decoded: int | None,
    model_images_per_sec: dict[str, float | None],
) -> RunSummary:
    """Adds up the markers of the run's shards (the files they name are complete)."""
    markers = [read_json(marker_path(output_dir, key)) for key in keys]
    models = [
        ModelSummary(
            model=name,
            rows=sum(marker["rows"][name] for marker in markers),
            inference_errors=sum(marker["inference_errors"][name] for marker in markers),
            images_per_sec_in_model=model_images_per_sec.get(name),
            embeddings=embeddings_glob(output_dir, name),
        )
        for name in model_names
    ]
    reasons: Counter[str] = Counter()
    for marker in markers:
        reasons.update(marker["errors_by_reason"])
    return RunSummary(
        inputs=sum(marker["inputs"] for marker in markers),
        images_decoded=images_decoded,
        input_errors=sum(marker["input_errors"] for marker in markers),
        errors_by_reason=dict(reasons),
        models=models,
        shards=len(keys),
        shards_done_before=done_before,
        seconds=seconds,
        errors=errors_glob(output_dir),
    )


def write_summary(output_dir: str, summary: RunSummary) -> str:
    path = FileSystems.join(output_dir, SUMMARY_FILE)
    write_atomically(path, summary.to_json().encode())
    return path
