"""The unit of work: one input shard, from its inputs to its committed files.

``EmbedShard`` takes a shard's line of the plan and does everything for it on one
worker, without waiting for any other shard: read (ahead of decoding), decode and
resize, embed in batches with each model, then write the shard's files and, last,
its marker (pipelines/outputs.py). A killed or failed job keeps every shard that
finished, and a rerun redoes only the rest; a shard whose marker exists is only
counted again. Models are loaded once per worker process and shared by its
threads (``apache_beam.utils.shared.Shared``).

Every input of the shard ends as a row per model or an error row: the shard is
not written unless rows and errors account for exactly the inputs it planned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from imgembed.common import storage
from imgembed.common.embedding_files import (
    STAGE_DECODE,
    STAGE_INFERENCE,
    STAGE_READ,
    embedding_schema,
    embeddings_path,
    errors_path,
)
from imgembed.models import labels
from imgembed.models.registry import Flavour
from imgembed.pipelines import outputs
from imgembed.pipelines.model_handler import EmbeddingModelHandler
from imgembed.pipelines.model_staging import StagedModel
from imgembed.pipelines.preprocess import ImagePreparer
from imgembed.pipelines.records import ImageKey, Rows, error_row, errors_table
from imgembed.pipelines.shards import InputShard
from imgembed.pipelines.sources import READ_AHEAD_FILES, ReadOptions, read_shard
from imgembed.transforms.decode import ImageError

METRICS_NAMESPACE = "imgembed"
INFERENCE_FAILED = "inference_failed"
# An unexpected exception while decoding: the message names its type.
DECODE_FAILED = "decode_failed"
# A failed batch is tried again after each of these pauses (seconds), then image
# by image: what fails alone is that image's fault; if every image of a batch
# fails alone, the model is broken, and the shard is not written.
MODEL_RETRY_PAUSES = (0.2, 1.0)
# A shard that fails (a read fault that outlasts its retries, a failing model, a
# bug) is tried again after each of these pauses (seconds), then given up for this
# run: reported, not committed.
SHARD_RETRY_PAUSES = (2.0, 10.0)
_log = logging.getLogger(__name__)


# The lines of TensorFlow's error messages that say where, not what.
_TENSORFLOW_BOILERPLATE = ("Graph execution error", "Detected at node", "<stack traces", "[[{{node")


def describe(error: BaseException) -> str:
    """One line naming an exception (TensorFlow's span a graph's worth of lines)."""
    lines = [line.strip() for line in str(error).splitlines()]
    useful = [line for line in lines if line and not line.startswith(_TENSORFLOW_BOILERPLATE)]
    return f"{type(error).__name__}: {useful[0] if useful else ''}".rstrip(": ")


class AccountingError(RuntimeError):
    """A shard's rows and errors are not exactly its inputs: never write such a shard."""


class ModelFailing(RuntimeError):
    """A model fails on every image it is given: a fault of the model or the worker."""


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for any shard of the run; none of it a path of the
    launcher's disk."""

    output_dir: str
    settings_key: str
    models: tuple[StagedModel, ...]
    preparer: ImagePreparer
    read: ReadOptions
    batch_size: int
    top_k: int
    threads: int | None

    def schema(self, model: StagedModel):
        return embedding_schema(
            model.spec.output_dim,
            {
                "model": model.spec.to_metadata(),
                "preprocessing": self.preparer.preprocessing.to_metadata(),
                "backend": model.backend,
                "precision": model.precision,
                # What serving needs to embed uploads as the corpus was: an int8 model
                # is its own file (the index keeps a copy), a float one is the model.
                "runtime": model.runtime.source if model.precision == "int8" else None,
                "fidelity": model.fidelity,
            },
            self.preparer.thumbnail_size > 0,
            top_k=self._is_classifier(model),
        )

    @staticmethod
    def _is_classifier(model: StagedModel) -> bool:
        return model.spec.flavour is Flavour.CLASSIFICATION


class EmbedShard(beam.DoFn):
    """A plan line -> the shard's marker (its counts), once its files are written."""

    def __init__(self, job: ShardJob):
        self._job = job
        self._handlers = {
            model.spec.name: EmbeddingModelHandler(
                model.runtime, max_batch_size=job.batch_size, backend=model.backend, threads=job.threads
            )
            for model in job.models
        }
        self._shared = {name: shared.Shared() for name in self._handlers}
        self._inputs = Metrics.counter(METRICS_NAMESPACE, "inputs")
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._written = Metrics.counter(METRICS_NAMESPACE, "shards_written")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "shards_complete_before")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "shards_failed")

    def setup(self):
        self._reader = ThreadPoolExecutor(READ_AHEAD_FILES, thread_name_prefix="read-ahead")
        # Loaded once per worker process: every thread and bundle of it shares each model.
        self._models = {
            name: self._shared[name].acquire(handler.load_model) for name, handler in self._handlers.items()
        }

    def teardown(self):
        self._reader.shutdown(cancel_futures=True)

    def process(self, line: str):
        key, shard = InputShard.from_json(line)
        marker = outputs.read_marker(self._job.output_dir, key)
        if marker is not None:
            self._skipped.inc()
            yield marker
            return
        for attempt, pause in enumerate((*SHARD_RETRY_PAUSES, None)):
            try:
                marker = self._embed(key, shard)
            except Exception as error:  # noqa: BLE001 - any fault: the shard's, tried again, then reported
                failure = describe(error)
                _log.warning("shard %s failed (try %d): %s", key, attempt + 1, failure)
                if pause is not None:
                    time.sleep(pause)
                continue
            self._written.inc()
            yield marker
            return
        # As img2dataset does: one shard that keeps failing must not stop the others.
        # It stays without a marker (a rerun tries it again); the launcher lists it.
        self._failed.inc()
        outputs.write_failure(self._job.output_dir, key, shard, failure, attempt + 1)

    # --- one shard -----------------------------------------------------------------

    def _embed(self, key: str, shard: InputShard) -> dict:
        job = self._job
        rows = {model.spec.name: Rows(job.schema(model)) for model in job.models}
        reused, errors = self._reused(shard)
        seconds = dict.fromkeys(rows, 0.0)
        batch: list[tuple[ImageKey, dict[int, np.ndarray]]] = []
        uris = sorted(shard.reused)
        decoded = 0
        for record in read_shard(shard.without(shard.reused), job.read, self._reader):
            uris.append(record.uri)
            if isinstance(record.data, ImageError):
                errors.append(self._error(record.uri, STAGE_READ, record.data.reason, record.data.message))
                continue
            try:
                batch.append(job.preparer.prepare(record.uri, record.data, record.metadata))
                decoded += 1
            except ImageError as error:
                errors.append(self._error(record.uri, STAGE_DECODE, error.reason, error.message))
            except Exception as error:  # a decoder bug must cost one row, not the shard
                errors.append(self._error(record.uri, STAGE_DECODE, DECODE_FAILED, describe(error)))
            if len(batch) == job.batch_size:
                self._embed_batch(batch, rows, errors, seconds)
                batch = []
        if batch:
            self._embed_batch(batch, rows, errors, seconds)
        self._inputs.inc(len(uris) - len(shard.reused))
        self._decoded.inc(decoded)
        tables = {name: model_rows.table() for name, model_rows in rows.items()}
        if shard.reused:  # in the order a shard made at once would have: by URI
            tables = {
                name: _by_uri(pa.concat_tables([reused[name], table])) for name, table in tables.items()
            }
        errors.sort(key=lambda row: (row["uri"], row["stage"], row["model"] or ""))
        marker = self._marker(key, shard, uris, tables, errors, seconds, decoded)
        marker |= _reuse_counts(shard, reused, errors)
        outputs.write_shard(job.output_dir, key, tables, errors_table(errors), marker)
        if shard.rewrites:  # committed: the shard it replaces goes
            outputs.delete_shards(job.output_dir, [shard.rewrites], list(rows))
        return marker

    def _reused(self, shard: InputShard) -> tuple[dict[str, pa.Table], list[dict]]:
        """The rows and error rows of the inputs a rewritten shard copies from the
        shard it replaces, unchanged: (each model's rows, error rows)."""
        if not shard.reused:
            return {}, []
        wanted = pa.array(sorted(shard.reused))
        job = self._job

        def rows_of(path: str) -> pa.Table:
            with storage.open_file(path) as file:
                table = pq.read_table(file)
            return table.filter(pc.is_in(table.column("uri"), value_set=wanted))

        tables = {
            model.spec.name: rows_of(embeddings_path(job.output_dir, model.spec.name, shard.rewrites)).cast(
                job.schema(model)
            )
            for model in job.models
        }
        errors = rows_of(errors_path(job.output_dir, shard.rewrites)).to_pylist()
        return tables, errors

    def _error(self, uri: str, stage: str, reason: str, message: str, model: str | None = None) -> dict:
        Metrics.counter(METRICS_NAMESPACE, f"errors_{reason}").inc()
        return error_row(uri, stage, reason, message, model)

    def _embed_batch(self, batch, rows: dict[str, Rows], errors: list[dict], seconds: dict) -> None:
        for model in self._job.models:
            name = model.spec.name
            size = model.spec.image_size
            keys = [key for key, _ in batch]
            pixels = [by_size[size] for _, by_size in batch]
            started = time.perf_counter()
            vectors, failures = self._call_with_retries(name, pixels)
            seconds[name] += time.perf_counter() - started
            classifier = model.spec.flavour is Flavour.CLASSIFICATION
            for key, vector, failure in zip(keys, vectors, failures, strict=True):
                if failure is not None:
                    errors.append(self._error(key.uri, STAGE_INFERENCE, INFERENCE_FAILED, failure, name))
                else:
                    top = labels.top_k(vector, self._job.top_k) if classifier else None
                    rows[name].add(key, vector, top)

    def _call_with_retries(self, name: str, pixels: list[np.ndarray]):
        """(vectors, failures): one vector or one failure message per image."""
        handler, model = self._handlers[name], self._models[name]
        latency = Metrics.distribution(METRICS_NAMESPACE, f"inference_batch_latency_micro_secs[{name}]")
        for pause in (*MODEL_RETRY_PAUSES, None):
            started = time.perf_counter()
            try:
                vectors = [result.inference for result in handler.run_inference(pixels, model)]
            except Exception as error:  # the model's own errors, of any kind
                last = error
                if pause is not None:
                    time.sleep(pause)
                continue
            latency.update(int((time.perf_counter() - started) * 1e6))
            return vectors, [None] * len(pixels)
        # The batch keeps failing: find the images that fail alone.
        vectors, failures = [], []
        for image in pixels:
            try:
                (result,) = handler.run_inference([image], model)
                vectors.append(result.inference)
                failures.append(None)
            except Exception as error:  # this image's own failure
                vectors.append(None)
                failures.append(describe(error))
        if all(failure is not None for failure in failures) and not self._answers_probe(name, pixels[0]):
            # Not these images' fault: the model fails on a plain grey image too.
            raise ModelFailing(
                f"model {name} failed on each of {len(pixels)} images and on a probe: {describe(last)}"
            ) from last
        return vectors, failures

    def _answers_probe(self, name: str, like: np.ndarray) -> bool:
        """Whether the model embeds a plain grey image of the same shape: when every
        image of a batch failed, it tells an image's own fault (a row) from the
        model's (a shard to try again), even for a batch of one."""
        try:
            self._handlers[name].run_inference([np.full_like(like, 128)], self._models[name])
        except Exception:  # noqa: BLE001 - whatever it raises, the model is failing
            return False
        return True

    def _marker(self, key, shard: InputShard, uris, tables, errors, seconds, decoded) -> dict:
        """The shard's counts, once they are proven to account for every planned input."""
        if len(uris) != len(set(uris)):
            raise AccountingError(f"shard {key}: an input was read twice")
        if shard.kind == "files" and sorted(uris) != sorted(shard.paths):
            missing = sorted(set(shard.paths) - set(uris))[:3]
            raise AccountingError(
                f"shard {key}: {len(shard.paths)} files planned, {len(uris)} read ({missing} ...)"
            )
        input_errors = [row for row in errors if row["stage"] != STAGE_INFERENCE]
        counted = {row["uri"] for row in input_errors}
        for name, table in tables.items():
            failed = {
                row["uri"] for row in errors if row["stage"] == STAGE_INFERENCE and row["model"] == name
            }
            embedded = table["uri"].to_pylist()
            answered = [*embedded, *counted, *failed]
            if len(answered) != len(set(answered)) or set(answered) != set(uris):
                raise AccountingError(
                    f"shard {key}, model {name}: {len(uris)} inputs but {len(embedded)} rows + "
                    f"{len(counted) + len(failed)} errors"
                )
        examples: dict[str, str] = {}
        for row in errors:
            examples.setdefault(row["reason"], row["uri"])
        reasons: dict[str, int] = {}
        for row in errors:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        return {
            "key": key,
            "settings_key": self._job.settings_key,
            "shard": shard.inputs(),
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
            "models": sorted(tables),
            "inputs": len(uris),
            "images_decoded": decoded,
            "input_errors": len(input_errors),
            "errors_by_reason": reasons,
            "error_examples": examples,
            "rows": {name: table.num_rows for name, table in tables.items()},
            "inference_errors": {
                name: sum(1 for row in errors if row["stage"] == STAGE_INFERENCE and row["model"] == name)
                for name in tables
            },
            "model_seconds": {name: round(value, 4) for name, value in seconds.items()},
        }


def _by_uri(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [("uri", "ascending")]))


def _reuse_counts(shard: InputShard, reused: dict[str, pa.Table], errors: list[dict]) -> dict:
    """What a rewritten shard copied instead of embedding, for the run's summary."""
    if not shard.rewrites:
        return {}
    copied = set(shard.reused)
    return {
        "replaces": [shard.rewrites],
        "reused": len(copied),
        "reused_rows": {name: table.num_rows for name, table in reused.items()},
        "reused_input_errors": sum(
            1 for row in errors if row["uri"] in copied and row["stage"] != STAGE_INFERENCE
        ),
    }
