"""``imgembed embed``: image files -> MobileNet V1 embeddings in Parquet, on Beam.

    plan_shards: inputs -> input shards (groups of files; TFRecord, tar, Parquet files)
    shards --ReadShard--> (shard, (uri, bytes)) --DecodeAndResize--> ((shard, ImageKey), {size: pixels})
          --RunInference(EmbeddingModelHandler), once per --model--> (shard, row)
          --WriteParts--> (shard, part file of rows)
    every stage's failures ---------------------------------------> (shard, error row)
    --CoGroupByKey(shard)--> WriteShard: one Parquet file per model, errors, marker

Several ``--model`` flags embed with several models in one pass: each image is
read and decoded once, resized once per input size, and each model writes its
own folder. Shards already complete in --output (same inputs, same settings) are
skipped, so a rerun after a crash finishes the rest.

Runs on any Beam runner; every flag not defined here goes to Beam (``--runner``,
``--direct_num_workers``, Dataflow's ``--project``/``--region``/``--setup_file``...).

    imgembed embed --input 'photos/*.jpg' --output out/ --model mobilenet_v1_050_160
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)

from imgembed.common.embedding_files import STAGE_INFERENCE, embedding_schema
from imgembed.common.units import parse_size
from imgembed.models import labels
from imgembed.models.errors import ModelLoadError
from imgembed.models.loading import BACKENDS, checked_meanwhile
from imgembed.models.registry import EMBEDDED_MODEL_NAME, Flavour, ModelSpec
from imgembed.pipelines import outputs
from imgembed.pipelines.dead_letters import ERRORS, METRICS_NAMESPACE
from imgembed.pipelines.default_corpus import default_corpus_patterns
from imgembed.pipelines.model_handler import EmbeddingModelHandler
from imgembed.pipelines.preprocess import DecodeAndResize
from imgembed.pipelines.records import embedding_row, error_row
from imgembed.pipelines.shards import (
    InputError,
    InputFormat,
    InputShard,
    pieces_largest_first,
    plan_shards,
    settings_key,
    shard_key,
)
from imgembed.pipelines.sources import COUNTS, IMAGE_COLUMNS, ReadShard
from imgembed.transforms.decode import DecodeLimits
from imgembed.transforms.resize import Preprocessing, ResizeMode

INFERENCE_FAILED = "inference_failed"
# Without --runner, run locally on every core; DirectRunner alone uses one.
DEFAULT_RUNNER_ARGS = [
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=0",
]
# Each local wave costs about 5 s of a whole machine (workers starting, the shard
# writes, one worker idle while the other finishes): measured, 16 shards a worker
# made 0.25_224 lose 15% to them. 64 (32,000 images a worker at the default
# --files-per-shard: 2 to 12 minutes per wave on this family) keep that near 2%,
# and a crash loses at most those minutes.
LOCAL_SHARDS_PER_WORKER = 64
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
        parser.add_argument("--output", help="Output folder (required).")
        parser.add_argument(
            "--model",
            dest="models",
            action="append",
            help="Short name (see `imgembed models`), TF Hub handle/URL, SavedModel folder, or "
            ".pb/.tflite/.h5/.keras file (add #classification for class scores); repeat to "
            f"embed with several models in one pass. Default: {EMBEDDED_MODEL_NAME}, real weights "
            "shipped offline.",
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
            "--files-per-shard",
            dest="files_per_shard",
            type=int,
            default=500,
            help="Image files per input shard: the unit of output files and of resuming. Default: 500.",
        )
        parser.add_argument(
            "--shards-per-wave",
            dest="shards_per_wave",
            type=int,
            default=None,
            help="Input shards per Beam job: each finished wave survives a crash. Default: "
            f"{LOCAL_SHARDS_PER_WORKER} per worker process on the local runner; all shards in one job "
            "on others (0 also means all).",
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            default=False,
            help="Start from an empty --output instead of resuming, and replace outputs made "
            "with other settings.",
        )


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """The validated settings of one embed run."""

    shards: tuple[InputShard, ...]
    output_dir: str
    models: tuple[ModelSpec, ...]
    preprocessing: Preprocessing
    limits: DecodeLimits
    batch_size: int
    thumbnail_size: int
    top_k: int
    backend: str
    inference_threads: int | None
    image_column: str | None
    shards_per_wave: int
    overwrite: bool

    @classmethod
    def from_options(cls, options: EmbedOptions) -> EmbedConfig:
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
        # Cheap checks first, so a typo is reported before inputs are listed or a
        # model is downloaded; then those two at once (a big bucket lists for minutes).
        preprocessing = Preprocessing(options.resize, options.central_fraction, not options.exact_jpeg_decode)
        limits = DecodeLimits(
            max_file_bytes=parse_size(options.max_file_bytes),
            max_pixels=options.max_image_pixels,
        )
        if options.files_per_shard < 1:
            raise ValueError(f"--files-per-shard must be at least 1, got {options.files_per_shard}")
        input_format = InputFormat.parse(options.input_format)
        patterns = options.inputs or default_corpus_patterns()
        with checked_meanwhile(options.models or [EMBEDDED_MODEL_NAME]) as checked_models:
            shards = tuple(plan_shards(patterns, input_format, options.files_per_shard))
            models = tuple(checked_models())
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError(
                f"two --model flags give the same name (output folder): {names}; "
                "name one of them: --model other_name=PATH"
            )
        return cls(
            shards=shards,
            output_dir=options.output.rstrip("/") or "/",
            models=models,
            preprocessing=preprocessing,
            limits=limits,
            batch_size=options.batch_size,
            thumbnail_size=options.thumbnail_size,
            top_k=options.top_k,
            backend=options.backend,
            inference_threads=options.inference_threads or _default_threads(options),
            image_column=options.image_column,
            shards_per_wave=_shards_per_wave(options),
            overwrite=options.overwrite,
        )

    def settings(self) -> dict:
        """Everything besides the inputs that decides the outputs: part of shard keys."""
        return {
            "models": [model.to_metadata() for model in self.models],
            "preprocessing": self.preprocessing.to_metadata(),
            "limits": dataclasses.asdict(self.limits),
            "thumbnail_size": self.thumbnail_size,
            "top_k": self.top_k,
            "backend": self.backend,
            "image_column": self.image_column,
        }

    def file_metadata(self, model: ModelSpec) -> dict:
        return {
            "model": model.to_metadata(),
            "preprocessing": self.preprocessing.to_metadata(),
            "backend": self.backend,
        }

    def schema(self, model: ModelSpec):
        """Of the model's embeddings files."""
        return embedding_schema(
            model.output_dim,
            self.file_metadata(model),
            self.thumbnail_size > 0,
            top_k=model.flavour is Flavour.CLASSIFICATION,
        )


def _local_workers(options: PipelineOptions) -> int | None:
    """Worker processes of the local runner; None for any other runner."""
    standard = options.view_as(StandardOptions)
    if standard.runner not in (None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner"):
        return None
    direct = options.view_as(DirectOptions)
    return (os.cpu_count() or 1) if direct.direct_num_workers == 0 else max(1, direct.direct_num_workers)


def _shards_per_wave(options: PipelineOptions) -> int:
    configured = options.view_as(EmbedOptions).shards_per_wave
    if configured is not None:
        if configured < 0:
            raise ValueError(f"--shards-per-wave must be 0 or more, got {configured}")
        return configured
    workers = _local_workers(options)
    # A local job starts in seconds, a cloud job in minutes: only locally are waves
    # cheap enough to be worth their safety.
    return LOCAL_SHARDS_PER_WORKER * workers if workers else 0


def _default_threads(options: PipelineOptions) -> int | None:
    """On the local runner, split the cores between worker processes: each running
    a model on every core would only make them wait for each other."""
    workers = _local_workers(options)
    return max(1, (os.cpu_count() or 1) // workers) if workers else None


def _inference_errors(failed, model_name: str):
    """RunInference's dead letters are (batch, exception); one error row per image."""
    batch, exception = failed
    message = f"{type(exception).__name__}: {exception}"
    Metrics.counter(METRICS_NAMESPACE, f"errors_{INFERENCE_FAILED}").inc(len(batch))
    for (shard, key), _pixels in batch:
        yield shard, error_row(key.uri, STAGE_INFERENCE, INFERENCE_FAILED, message, model_name)


def _to_row(keys, result, top_k: int | None = None):
    shard, key = keys
    return shard, embedding_row(
        key, result.inference, labels.top_k(result.inference, top_k) if top_k else None
    )


def embed_with(images, model: ModelSpec, config: EmbedConfig):
    """One model's branch: its input size -> RunInference -> rows in part files,
    (shard, part); and its (shard, error row)s."""
    step = f"[{model.name}]"
    handler = KeyedModelHandler(
        EmbeddingModelHandler(
            model, max_batch_size=config.batch_size, backend=config.backend, threads=config.inference_threads
        )
    )
    embedded, dead_letters = (
        images
        | f"Pixels{step}" >> beam.MapTuple(lambda keys, by_size, size=model.image_size: (keys, by_size[size]))
        | f"Embed{step}" >> RunInference(handler).with_exception_handling()
    )
    classifier = model.flavour is Flavour.CLASSIFICATION
    parts = (
        embedded
        | f"ToRows{step}" >> beam.MapTuple(_to_row, top_k=config.top_k if classifier else None)
        | f"WriteParts{step}"
        >> beam.ParDo(outputs.WriteParts(config.output_dir, model.name, config.schema(model)))
    )
    errors = dead_letters.failed_inferences | f"InferenceErrors{step}" >> beam.FlatMap(
        _inference_errors, model_name=model.name
    )
    return parts, errors


def schemas(config: EmbedConfig) -> dict:
    return {model.name: config.schema(model) for model in config.models}


def build_pipeline(pipeline: beam.Pipeline, config: EmbedConfig, pending: dict[str, InputShard]) -> None:
    read = (
        pipeline
        | "Pieces" >> beam.Create(pieces_largest_first(pending), reshuffle=False)
        # Spread the pieces over the workers before reading them.
        | "Spread" >> beam.Reshuffle()
        | "ReadShards"
        >> beam.ParDo(ReadShard(config.limits, config.image_column)).with_outputs(
            ERRORS, COUNTS, main="images"
        )
    )
    sizes = tuple(sorted({model.image_size for model in config.models}))
    decoded = read.images | "DecodeAndResize" >> beam.ParDo(
        DecodeAndResize(config.preprocessing, sizes, config.limits, config.thumbnail_size)
    ).with_outputs(ERRORS, main="images")
    branches = {model.name: embed_with(decoded.images, model, config) for model in config.models}
    errors = (
        read[ERRORS],
        decoded[ERRORS],
        *(errors for _, errors in branches.values()),
    ) | "AllErrors" >> beam.Flatten()
    parts = [parts for parts, _ in branches.values()] | "AllParts" >> beam.Flatten()
    groups = {"counts": read[COUNTS], "errors": errors, "parts": parts}
    settings = config.settings()
    _ = (
        groups
        | "ByShard" >> beam.CoGroupByKey()
        | "WriteShards"
        >> beam.ParDo(
            outputs.WriteShard(config.output_dir, schemas(config), settings, settings_key(settings))
        )
    )


def _plan_outputs(config: EmbedConfig) -> tuple[dict[str, InputShard], list[str], int]:
    """(shards still to do, every shard key of the run, how many were done before);
    clears what a rerun must not mix with."""
    names = [model.name for model in config.models]
    key = settings_key(config.settings())
    keyed = {shard_key(shard, key): shard for shard in config.shards}
    outputs.delete_leftover_temporaries(config.output_dir, names)
    if config.overwrite:
        outputs.delete_everything(config.output_dir, names)
    state = outputs.output_state(config.output_dir, names, set(keyed), key)
    if state.foreign:
        raise ValueError(
            f"{config.output_dir} holds shards embedded with other settings ({state.foreign[0]} ...); "
            "pass --overwrite to replace them or choose another --output"
        )
    if state.stale:
        _log.warning(
            "removing %d output files of shards whose inputs changed since the last run", len(state.stale)
        )
        FileSystems.delete(state.stale)
    pending = {k: shard for k, shard in keyed.items() if k not in state.done}
    return pending, sorted(keyed), len(state.done)


def _counter(result, name: str) -> int | None:
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))
    except NotImplementedError:  # some runners cannot report metrics
        return None
    values = [counter.result for counter in found["counters"]]
    return sum(values) if values else 0


def _model_images_per_sec(result, model_name: str) -> float | None:
    """Images per second inside one model's calls (RunInference's own metrics)."""
    step = MetricsFilter().with_step(f"Embed[{model_name}]")
    try:
        latencies = result.metrics().query(step.with_name("inference_batch_latency_micro_secs"))
        counts = result.metrics().query(step.with_name("num_inferences"))
    except NotImplementedError:  # some runners cannot report metrics
        return None
    micros = sum(distribution.result.sum for distribution in latencies["distributions"])
    inferences = sum(counter.result for counter in counts["counters"])
    return inferences / (micros / 1e6) if micros and inferences else None


def _write_job_file(result, options: PipelineOptions) -> None:
    """A dry run builds the Dataflow job without submitting it; keep its spec, and the
    pipeline graph Dataflow would run, when --dataflow_job_file asks for them."""
    from google.protobuf import json_format

    job_file = options.view_as(DebugOptions).dataflow_job_file
    job = getattr(result, "job", None)
    if job_file and job is not None:
        spec = {"job": json.loads(job.json()), "pipeline": json_format.MessageToDict(job.proto_pipeline)}
        with FileSystems.create(job_file) as file:
            file.write(json.dumps(spec, indent=1).encode())


def _waves(pending: dict[str, InputShard], size: int) -> list[dict[str, InputShard]]:
    keys = sorted(pending)
    size = size or len(keys)
    return [{key: pending[key] for key in keys[start : start + size]} for start in range(0, len(keys), size)]


def run(
    argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> outputs.RunSummary | None:
    options = PipelineOptions(argv)
    config = EmbedConfig.from_options(options.view_as(EmbedOptions))
    pending, keys, done_before = _plan_outputs(config)

    started = time.monotonic()
    decoded, model_seconds = 0, {model.name: [] for model in config.models}
    # Shards are written after a shuffle that, in batch, waits for all of a job's
    # inputs: one job per wave of shards is what lets a crash keep finished waves.
    for wave in _waves(pending, config.shards_per_wave):
        pipeline = test_pipeline or beam.Pipeline(options=options)
        build_pipeline(pipeline, config, wave)
        result = pipeline.run()
        result.wait_until_finish()
        if options.view_as(TestOptions).dry_run:
            _write_job_file(result, options)
            return None  # the job was built, not run
        decoded += _counter(result, "images_decoded") or 0
        for model in config.models:
            model_seconds[model.name].append(_model_images_per_sec(result, model.name))

    # Each shard's writer removed its parts; what is left is their empty folder.
    outputs.delete_folder(outputs.parts_folder(config.output_dir))
    summary = outputs.summarize(
        config.output_dir,
        [model.name for model in config.models],
        keys,
        done_before,
        seconds=time.monotonic() - started,
        images_decoded=decoded,
        model_images_per_sec={name: _mean(rates) for name, rates in model_seconds.items()},
    )
    outputs.write_summary(config.output_dir, summary)
    return summary


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value]
    return sum(known) / len(known) if known else None


def print_help() -> None:
    parser = argparse.ArgumentParser(
        prog="imgembed embed",
        description="Embed image files into Parquet with a MobileNet V1 model on Apache Beam. "
        "Any other flag goes to Beam (--runner, --direct_num_workers, Dataflow flags); "
        "without --runner the job runs locally on every core.",
    )
    EmbedOptions._add_argparse_args(parser)
    parser.print_help()


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    if not any(arg.startswith("--runner") for arg in argv):
        argv = [*argv, *DEFAULT_RUNNER_ARGS]
    try:
        summary = run(argv)
    except (InputError, ModelLoadError, ValueError) as error:
        print(f"imgembed embed: {error}", file=sys.stderr)
        return 2
    if summary is None:
        print("imgembed embed: dry run, nothing was embedded")
        return 0
    print(summary.report())
    return 0 if summary.balanced else 1
