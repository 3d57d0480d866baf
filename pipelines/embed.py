"""``imgembed embed``: image files -> MobileNet V1 embeddings in Parquet, on Beam.

    launcher: inputs x committed shards -> the shards to write (pipelines/plan.py),
              written as a plan beside the outputs, in parts;
              models checked, converted to TFLite and staged where workers read them
    job:      part numbers --read each part--> shard lines --Reshuffle--> EmbedShard, one
              shard at a time: read -> decode -> embed in batches -> Parquet files -> marker
    launcher: markers -> run_summary.json; exits non-zero when the error rate is too high

Each shard commits when it is done, on every runner: a killed or failed job keeps
every finished shard, and a rerun (same inputs, same settings) does only the rest.
Several ``--model`` flags embed with several models in one pass: each image is read
and decoded once, resized once per input size, and each model writes its own folder.

Runs on any Beam runner; every flag not defined here goes to Beam (``--runner``,
``--direct_num_workers``, Dataflow's ``--project``/``--region``/``--setup_file``...).

    imgembed embed --input 'photos/*.jpg' --output out/ --model mobilenet_v1_050_160
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DebugOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)

from imgembed.common import progress, storage
from imgembed.common.embedding_files import ID_SCHEME, key_of, marker_path, markers_glob
from imgembed.common.runners import (
    close_client,
    local_workers,
    spread_over,
    warn_of_stalling_dask_workers,
    with_default_runner,
)
from imgembed.common.units import parse_size
from imgembed.models.errors import ModelLoadError
from imgembed.models.loading import BACKENDS, PreparedModel, prepared_meanwhile
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import outputs
from imgembed.pipelines.default_corpus import default_corpus_patterns
from imgembed.pipelines.model_staging import MODELS_FOLDER, stage
from imgembed.pipelines.plan import RunPlan, output_state, plan_run
from imgembed.pipelines.precision import FidelityGate, Precision, as_int8, record_int8
from imgembed.pipelines.preprocess import ImagePreparer
from imgembed.pipelines.shard_worker import EmbedShard, ShardJob
from imgembed.pipelines.shards import (
    PLAN_FOLDER,
    PLAN_PARTS,
    InputError,
    InputFile,
    InputFormat,
    InputShard,
    list_inputs,
    read_plan_part,
    settings_key,
    write_plan,
)
from imgembed.pipelines.sources import DEFAULT_METADATA_FIELDS, IMAGE_COLUMNS, ReadOptions
from imgembed.transforms.decode import DecodeLimits
from imgembed.transforms.resize import Preprocessing, ResizeMode

# How often the launcher lists the markers to show progress (a listing per poll).
PROGRESS_POLL_SECONDS = 5.0
# Our exceptions that fail a job on purpose: their message is the one to show.
JOB_FAILURES = ("ShardUnreadable", "ModelFailing", "AccountingError", "ModelLoadError")
_log = logging.getLogger(__name__)


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            dest="inputs",
            action="append",
            help="File glob or folder, any Beam filesystem (gs://, s3://, local); repeat "
            "for several. Default: the sample photos that scikit-image and scikit-learn ship.",
        )
        parser.add_argument("--output", help="Output folder, any Beam filesystem (required).")
        parser.add_argument(
            "--model",
            dest="models",
            action="append",
            help="Short name (see `imgembed models`), TF Hub handle/URL, SavedModel folder, or "
            ".pb/.tflite/.h5/.keras file, local or on gs:// (add #classification for class scores); "
            f"repeat to embed with several models in one pass. Default: {EMBEDDED_MODEL_NAME}, real "
            "weights shipped offline.",
        )
        parser.add_argument(
            "--top-k",
            dest="top_k",
            type=int,
            default=5,
            help="Class names and probabilities kept per image by classification models. Default: 5.",
        )
        parser.add_argument(
            "--resize",
            default=ResizeMode.CROP.value,
            help="crop: centred square then resize; squash: resize the whole image; "
            "pad: fit inside and pad with grey. Default: crop.",
        )
        parser.add_argument(
            "--central-fraction",
            dest="central_fraction",
            type=float,
            default=1.0,
            help="Keep only this central fraction of each side first (ImageNet "
            "evaluation uses 0.875). Default: 1.0.",
        )
        parser.add_argument(
            "--exact-jpeg-decode",
            dest="exact_jpeg_decode",
            action="store_true",
            default=False,
            help="Decode JPEGs at full size even when a reduced DCT scale covers the model's input "
            "(slower; pixels differ slightly).",
        )
        parser.add_argument(
            "--batch-size",
            dest="batch_size",
            type=int,
            default=32,
            help="Largest batch given to the model. Default: 32.",
        )
        parser.add_argument(
            "--max-file-bytes",
            dest="max_file_bytes",
            default="64MiB",
            help="Larger files become error rows unread (e.g. 64MiB, 1G). Default: 64MiB.",
        )
        parser.add_argument(
            "--max-image-pixels",
            dest="max_image_pixels",
            type=int,
            default=DecodeLimits.max_pixels,
            help=f"Images with more pixels become error rows undecoded. Default: {DecodeLimits.max_pixels}.",
        )
        parser.add_argument(
            "--max-error-rate",
            dest="max_error_rate",
            type=float,
            default=0.5,
            help="The run fails (exit code 1, with the top reasons) when more than this share of "
            "the inputs became error rows for any model; 1 accepts anything. Default: 0.5.",
        )
        parser.add_argument(
            "--thumbnail-size",
            dest="thumbnail_size",
            type=int,
            default=0,
            help="Also store a JPEG thumbnail of at most this many pixels a side per image "
            "(a `thumbnail` column, for the search page). Default: 0, none.",
        )
        parser.add_argument(
            "--backend",
            default="auto",
            help="tensorflow, tflite (TensorFlow models converted to TFLite/XNNPACK, ~3x faster on CPU), "
            "or auto: tflite when its outputs match TensorFlow's on a probe batch. Default: auto.",
        )
        parser.add_argument(
            "--inference-threads",
            dest="inference_threads",
            type=int,
            default=None,
            help="Threads per model in each worker process. Default: cores / worker processes "
            "on the local runner (no oversubscription), the runtime's choice elsewhere.",
        )
        parser.add_argument(
            "--input-format",
            dest="input_format",
            default="auto",
            help="files, tfrecord (tf.train.Example with image/encoded), webdataset (.tar), parquet "
            "(an image-bytes column), or auto: by extension (.tfrecord, .tar, .parquet), else image files.",
        )
        parser.add_argument(
            "--image-column",
            dest="image_column",
            default=None,
            help=f"The image column of Parquet inputs. Default: the first of {', '.join(IMAGE_COLUMNS)}.",
        )
        parser.add_argument(
            "--metadata-fields",
            dest="metadata_fields",
            default=",".join(DEFAULT_METADATA_FIELDS),
            help="What the shards say about each image, kept in the `metadata` column: fields of "
            "img2dataset's .json sidecars, TFRecord features, other Parquet columns ('*': all; "
            "'': none). Default: key,url,caption (img2dataset's names).",
        )
        parser.add_argument(
            "--files-per-shard",
            dest="files_per_shard",
            type=int,
            default=500,
            help="Image files per input shard: the unit of work, of output files and of resuming. "
            "Default: 500.",
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            default=False,
            help="Start from an empty --output instead of resuming, and replace outputs made "
            "with other settings.",
        )
        parser.add_argument(
            "--precision",
            default="fp32",
            help="fp32, or int8: each model quantized to int8 TFLite once per output, calibrated on "
            "images of this run, and used only when it passes --min-fidelity (else fp32, with one "
            "line why). Default: fp32.",
        )
        parser.add_argument(
            "--min-fidelity",
            dest="min_fidelity",
            default="0.9,0.98",
            help="What int8 must keep of fp32 on other images of the run: kNN@10 overlap, mean "
            "cosine. Default: 0.9,0.98.",
        )


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """The validated settings of one embed run."""

    inputs: dict[str, InputFile]  # by canonical path
    files_per_shard: int
    output_dir: str
    models: tuple[PreparedModel, ...]
    preparer: ImagePreparer
    read: ReadOptions
    batch_size: int
    top_k: int
    inference_threads: int | None
    max_error_rate: float
    overwrite: bool

    @classmethod
    def from_options(cls, options: EmbedOptions, local_workers: int | None) -> EmbedConfig:
        if not options.output:
            raise ValueError("--output is required")
        if options.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {options.batch_size}")
        if options.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
        if options.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {options.top_k}")
        if not 0 <= options.thumbnail_size <= 1024:
            raise ValueError(f"--thumbnail-size must be between 0 and 1024, got {options.thumbnail_size}")
        if not 0 <= options.max_error_rate <= 1:
            raise ValueError(
                f"--max-error-rate is a share of the inputs in [0, 1], got {options.max_error_rate}"
            )
        if options.files_per_shard < 1:
            raise ValueError(f"--files-per-shard must be at least 1, got {options.files_per_shard}")
        # Cheap checks first, so a typo is reported before inputs are listed or a
        # model is downloaded; then those two at once (a big bucket lists for minutes).
        preprocessing = Preprocessing(options.resize, options.central_fraction, not options.exact_jpeg_decode)
        limits = DecodeLimits(
            max_file_bytes=parse_size(options.max_file_bytes),
            max_pixels=options.max_image_pixels,
        )
        input_format = InputFormat.parse(options.input_format)
        precision = Precision.parse(options.precision)
        gate = FidelityGate.parse(options.min_fidelity)
        fields = tuple(field.strip() for field in options.metadata_fields.split(",") if field.strip())
        patterns = options.inputs or default_corpus_patterns()
        with prepared_meanwhile(options.models or [EMBEDDED_MODEL_NAME], options.backend) as prepared:
            inputs = list_inputs(patterns, input_format)
            models = tuple(prepared())
        names = [model.spec.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError(
                f"two --model flags give the same name (output folder): {names}; "
                "name one of them: --model other_name=PATH"
            )
        sizes = tuple(sorted({model.spec.image_size for model in models}))
        threads = options.inference_threads
        if threads is None and local_workers:
            # Split the cores between local worker processes: each running a model on
            # every core would only make them wait for each other.
            threads = max(1, (os.cpu_count() or 1) // local_workers)
        output = options.output
        output_dir = storage.canonical(output.rstrip("/") or "/") if storage.is_local(output) else output
        preparer = ImagePreparer(preprocessing, sizes, limits, options.thumbnail_size)
        if precision is Precision.INT8:
            if options.overwrite:
                storage.delete_folder(storage.join(output_dir, MODELS_FOLDER))  # quantize again
            models = tuple(as_int8(model, inputs, preparer, gate, output_dir) for model in models)
        return cls(
            inputs=inputs,
            files_per_shard=options.files_per_shard,
            output_dir=output_dir,
            models=models,
            preparer=preparer,
            read=ReadOptions(limits, options.image_column, fields),
            batch_size=options.batch_size,
            top_k=options.top_k,
            inference_threads=threads,
            max_error_rate=options.max_error_rate,
            overwrite=options.overwrite,
        )

    def settings(self) -> dict:
        """Everything besides the inputs that decides the outputs: part of shard keys."""
        return {
            # Ids hash canonical URIs (imgembed 0.2): outputs of before are other settings.
            "ids": ID_SCHEME,
            "models": [
                model.spec.to_metadata() | {"backend": model.backend, "precision": model.precision}
                for model in self.models
            ],
            "preprocessing": self.preparer.preprocessing.to_metadata(),
            "limits": dataclasses.asdict(self.preparer.limits),
            "thumbnail_size": self.preparer.thumbnail_size,
            "top_k": self.top_k,
            "image_column": self.read.image_column,
            "metadata_fields": list(self.read.metadata_fields),
        }


@dataclasses.dataclass(frozen=True)
class DryRun:
    """A job that was built, and not run; ``job_file`` holds it when asked for."""

    job_file: str | None


def build_pipeline(pipeline: beam.Pipeline, job: ShardJob) -> None:
    """The whole job: its size does not depend on the number of inputs. The plan is
    read by a step, not by a source: every runner runs a ParDo (Beam's DaskRunner
    has no translation for sources), and the graph holds only the number of parts."""
    _ = (
        pipeline
        | "PlanParts" >> beam.Create(list(range(PLAN_PARTS)))
        | "ReadPlan" >> beam.FlatMap(read_plan_part, job.output_dir, job.settings_key)
        # One shard per element, spread over the workers (and not fused with the read).
        | "Spread" >> beam.Reshuffle()
        | "EmbedShards" >> beam.ParDo(EmbedShard(job))
    )


def run_work(output_dir: str, keys) -> tuple[dict, list[dict]]:
    """(the sum of the markers of the shards a job wrote, the records of those it gave
    up), read once it ended. A shard with neither was lost by the runner: the run
    fails and says which."""
    keys = sorted(keys)
    paths = [marker_path(output_dir, key) for key in keys]
    found = storage.read_many(paths, storage.read_json_if_exists)
    unmarked = [key for key, marker in zip(keys, found, strict=True) if marker is None]
    failed = outputs.read_failures(output_dir, unmarked)
    lost = sorted(set(unmarked) - {record["key"] for record in failed})
    if lost:
        raise JobFailed(f"the job ended without writing {len(lost)} shards ({lost[0]} ...)")
    return outputs.add_markers([marker for marker in found if marker is not None]), failed


def _plan_run(config: EmbedConfig, key: str, dry_run: bool) -> RunPlan:
    """What the run writes, against what the output holds; clears what the run must
    not mix with (unless it is a dry run, which changes nothing): shards replaced or
    retracted, files of no committed shard, and with --overwrite everything."""
    names = [model.spec.name for model in config.models]
    state = output_state(config.output_dir, names, key)
    if state.foreign and not config.overwrite:
        raise ValueError(
            f"{config.output_dir} holds shards embedded with other settings ({state.foreign[0]} ...), "
            "or by an imgembed before 0.2, whose ids depended on how a path was typed; "
            "pass --overwrite to replace them or choose another --output"
        )
    if config.overwrite:
        state = dataclasses.replace(state, committed={}, files_by_key={})
    plan = plan_run(state.committed, config.inputs, config.files_per_shard, key)
    if dry_run:
        return plan
    outputs.delete_leftover_temporaries(config.output_dir, names)
    storage.delete_folder(storage.join(config.output_dir, outputs.FAILED_FOLDER))  # a run's own
    if config.overwrite:
        outputs.delete_everything(config.output_dir, state.foreign, names)
        return plan
    outputs.delete_shards(config.output_dir, plan.superseded + plan.retracted, names)
    orphans = state.orphans()
    if orphans:
        _log.info("removing %d files of shards a killed run did not commit", len(orphans))
        storage.delete(orphans)
    return plan


class MarkerWatcher:
    """Shows the job's progress from outside it, on any runner: the markers of the
    run's shards, listed every PROGRESS_POLL_SECONDS while the job runs."""

    def __init__(self, output_dir: str, pending: dict[str, InputShard]):
        self._output_dir = output_dir
        self._pending = pending
        self._stop = threading.Event()
        # Image files are counted by the shard; a container's images are not known before.
        self._by_images = all(shard.kind == "files" for shard in pending.values())
        self._thread = threading.Thread(target=self._watch, name="marker-watcher", daemon=True)

    def __enter__(self):
        if self._pending:
            self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _weight(self, key: str) -> int:
        return len(self._pending[key].paths) if self._by_images else 1

    def _watch(self) -> None:
        total = sum(self._weight(key) for key in self._pending)
        seen: set[str] = set()
        with progress.phase("embed", total, "images" if self._by_images else "shards") as bar:
            while True:
                stopping = self._stop.wait(PROGRESS_POLL_SECONDS)
                try:
                    found = {key_of(path) for path in storage.list_files(markers_glob(self._output_dir))}
                except Exception as error:  # a failed listing costs a progress update, not the job
                    _log.debug("listing markers failed: %s", error)
                    found = seen
                new = (found & self._pending.keys()) - seen
                seen |= new
                bar.advance(sum(self._weight(key) for key in new))
                if stopping:
                    return


def _job_failure(error: Exception) -> str:
    """The message of the exception that failed the job on a worker, found in the
    runner's report of it (every runner wraps it in its own)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.search(rf"\b(?:{'|'.join(JOB_FAILURES)}): (.+)$", line)
        if match:
            return _without_step(match.group(1))
    return _without_step(lines[-1]) if lines else type(error).__name__


def _one_line(error: OSError) -> str:
    text = " ".join(str(error).split())
    return text if len(text) < 400 else text[:400] + " ..."


def _without_step(message: str) -> str:
    return re.sub(r" \[while running '[^']*'\]$", "", message)


class JobFailed(RuntimeError):
    """The job stopped before every shard was done; the shards done are kept."""


def _check_reachable_by_workers(options: PipelineOptions) -> None:
    """Dataflow's workers see only object storage: refuse paths of this machine's disk
    (model files are staged for them; inputs and outputs cannot be)."""
    if options.view_as(StandardOptions).runner != "DataflowRunner":
        return
    ours = options.view_as(EmbedOptions)
    if not ours.inputs:
        raise ValueError("the default corpus is on this machine: with Dataflow, pass --input gs://...")
    for flag, path in [("--input", pattern) for pattern in ours.inputs] + [("--output", ours.output or "")]:
        if storage.is_local(path):
            raise ValueError(
                f"{flag} {path} is on this machine: Dataflow workers cannot reach it (use gs://...)"
            )


def run(
    argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> outputs.RunSummary | DryRun:
    argv = sys.argv[1:] if argv is None else list(argv)
    options = PipelineOptions(argv)
    dry_run = bool(options.view_as(TestOptions).dry_run)
    _check_reachable_by_workers(options)
    config = EmbedConfig.from_options(options.view_as(EmbedOptions), local_workers(options))
    for model in config.models:
        if model.note:
            _log.warning("%s", model.note)
    # One run at a time writes an output folder (a dry run writes nothing).
    with contextlib.nullcontext() if dry_run else outputs.RunLease(config.output_dir):
        return _run(config, argv, options, dry_run, test_pipeline)


def _staged(model, output_dir: str, dry_run: bool):
    staged = stage(model, output_dir, dry_run)
    if model.precision == "int8" and not dry_run:
        record_int8(output_dir, model, staged.runtime.source)
    return staged


def _run(config: EmbedConfig, argv: list[str], options, dry_run: bool, test_pipeline):
    key = settings_key(config.settings())
    plan = _plan_run(config, key, dry_run)
    job = ShardJob(
        output_dir=config.output_dir,
        settings_key=key,
        models=tuple(_staged(model, config.output_dir, dry_run) for model in config.models),
        preparer=config.preparer,
        read=config.read,
        batch_size=config.batch_size,
        top_k=config.top_k,
        threads=config.inference_threads,
    )
    started = time.monotonic()
    written, failed = outputs.add_markers([]), []
    if plan.todo or dry_run:  # with nothing to write, no job is started
        if not dry_run:
            write_plan(config.output_dir, key, plan.todo)
            warn_of_stalling_dask_workers(argv)
        pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(spread_over(argv, PLAN_PARTS)))
        build_pipeline(pipeline, job)
        with MarkerWatcher(config.output_dir, {} if dry_run else plan.todo):
            result = None
            try:
                result = pipeline.run()
                result.wait_until_finish()
            except Exception as error:  # the runner's report of a worker's failure
                raise JobFailed(_job_failure(error)) from error
            finally:
                close_client(result)
        if dry_run:
            return DryRun(_write_job_file(result, options))
        written, failed = run_work(config.output_dir, plan.todo)
    models_run = {model.spec.name: model for model in config.models}
    summary = outputs.RunSummary.from_markers(
        written,
        list(plan.kept.values()),
        plan,
        config.output_dir,
        models_run,
        time.monotonic() - started,
        config.max_error_rate,
        failed,
    )
    outputs.write_summary(config.output_dir, summary)
    storage.delete_folder(storage.join(config.output_dir, PLAN_FOLDER))
    return summary


def _write_job_file(result, options: PipelineOptions) -> str | None:
    """A dry run builds the Dataflow job without submitting it; keep its spec, and the
    pipeline graph Dataflow would run, when --dataflow_job_file asks for them."""
    from google.protobuf import json_format

    job_file = options.view_as(DebugOptions).dataflow_job_file
    job = getattr(result, "job", None)
    if not job_file or job is None:
        return None
    spec = {"job": json.loads(job.json()), "pipeline": json_format.MessageToDict(job.proto_pipeline)}
    storage.write_bytes(job_file, json.dumps(spec, indent=1).encode())
    return job_file


def print_help() -> None:
    parser = argparse.ArgumentParser(
        prog="imgembed embed",
        description="Embed image files into Parquet with a MobileNet V1 model on Apache Beam. "
        "Any other flag goes to Beam (--runner, --direct_num_workers, Dataflow flags); "
        "without --runner the job runs locally on every core.",
    )
    EmbedOptions._add_argparse_args(parser)
    parser.print_help()


def error_rate_report(summary: outputs.RunSummary) -> str | None:
    """Why the run failed, when too many inputs became error rows; else None."""
    over = summary.over_error_rate()
    if not over:
        return None
    lines = [
        f"imgembed embed: {summary.error_rate(model):.0%} of the inputs failed for {model.model} "
        f"(more than --max-error-rate {summary.max_error_rate:g}); the most common reasons:"
        for model in over
    ]
    lines += [f"  {reason}: {count} (e.g. {example})" for reason, count, example in summary.top_reasons()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    try:
        result = run(with_default_runner(argv))
    except (InputError, ModelLoadError, ValueError) as error:
        print(f"imgembed embed: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that cannot be written (read-only, a file where a folder is)
        print(f"imgembed embed: {_one_line(error)}", file=sys.stderr)
        return 2
    except JobFailed as failure:
        print(
            f"imgembed embed: the job stopped: {failure}\n"
            "Shards finished before are kept; run the same command again to do the rest.",
            file=sys.stderr,
        )
        return 1
    if isinstance(result, DryRun):
        print(f"imgembed embed: dry run, nothing was embedded (job in {result.job_file or 'no file'})")
        return 0
    print(result.report())
    if not result.balanced:
        return 1
    if result.failed_shards:
        print(result.failure_report(), file=sys.stderr)
        return 1
    failed = error_rate_report(result)
    if failed:
        print(failed, file=sys.stderr)
        return 1
    return 0
