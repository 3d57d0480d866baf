"""Throughput benchmark: decode, model and the whole pipeline, measured on the same
images in one run, with the ratios that matter.

For each model it measures
- model-only images/s for each backend (TensorFlow, TFLite/XNNPACK) and thread count,
  each alone on the machine;
- with one process per core, all at once, as the pipeline's workers run: decode +
  resize core-seconds per image over the whole corpus (bytes already in memory; the
  pipeline's own decoder and preprocessing), and the best backend's core-seconds
  per image on one thread;
- the ceiling: cores / (model core-seconds + decode core-seconds) per image;
- the pipeline, `imgembed embed` with its defaults (read -> decode -> embed -> Parquet),
  in steady state: images/s between a run on a quarter of the corpus and a run on
  all of it, which cancels the fixed start-up (the corpus is cycled until the runs
  last about a minute at the ceiling); plus wall time and peak RSS;
- the straightforward RunInference pipeline (bench/baseline_pipeline.py) the same way,
  on the corpus as it is;
- optionally, the same pipeline with --precision int8 (its model and ceiling measured
  on the int8 file the run used), the pipeline at several --batch-size values, and
  its peak RSS on 10k and on 100k images;
and prints pipeline / ceiling and pipeline / baseline.

    .venv/bin/python bench/throughput.py                       # 1200 generated photos
    .venv/bin/python bench/throughput.py --images ../shared/images/imagenet_val_1300
    .venv/bin/python bench/throughput.py --memory-check        # peak RSS: 10k vs 100k images
    .venv/bin/python bench/throughput.py --batch-sweep 8,32,128  # the pipeline by --batch-size
    .venv/bin/python bench/throughput.py --int8                # --precision int8 beside fp32

Writes docs/benchmarks/throughput.md and throughput.svg. Not a test: timings depend on
the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from corpus import write_corpus  # noqa: E402
from measure import run_measured  # noqa: E402

from imgembed.common.charts import bar_chart_svg  # noqa: E402
from imgembed.models.embedder import scale_pixels  # noqa: E402
from imgembed.models.loading import load_model, resolve_spec  # noqa: E402
from imgembed.pipelines.sources import IMAGE_EXTENSIONS  # noqa: E402
from imgembed.transforms.decode import DecodeLimits, decode_image  # noqa: E402
from imgembed.transforms.resize import Preprocessing  # noqa: E402

CORES = os.cpu_count() or 1
FILES_PER_SHARD = 500  # imgembed embed's default --files-per-shard
BIN = os.path.dirname(sys.executable)
MODEL_BATCH = 64
# Each speed is the best of a few tries: a shared machine only ever slows a try down.
REPEATS = 3
PIPELINE_TRIES = 2  # each pipeline run lasts a minute or more
# The pipeline's timed runs should last about this long at the ceiling, so that the
# noise of start-up (seconds) stays small against the difference between them.
STEADY_SECONDS = 60
# About how long each process runs the model when every core runs it.
MODEL_SECONDS = 5


def prepare_models(work: str) -> dict[str, str]:
    """1.0_224: the embedded real weights. 0.25_224: MobileNet V1 0.25 at 224 with
    seeded weights (same layers and FLOPs as TF Hub's mobilenet_v1_025_224, which
    cannot be downloaded here)."""
    from fixtures.tiny_models import save_tf2_module

    small = os.path.join(work, "mobilenet_v1_025_224_seeded")
    if not os.path.exists(small):
        save_tf2_module(small, image_size=224, depth_multiplier=0.25)
    return {"1.0_224": "mobilenet_v1_100_224_embedded", "0.25_224": small}


def baseline_savedmodel(reference: str, work: str) -> str:
    """A callable SavedModel of the model, the form Beam's stock TF handler loads."""
    import tensorflow as tf

    spec = resolve_spec(reference)
    if spec.format.value == "hub":
        return spec.source
    from imgembed.models.frozen_graph import load_module

    path = os.path.join(work, f"{spec.name}_savedmodel")
    if not os.path.exists(path):
        inner = load_module(spec.source, spec.flavour)

        class Callable(tf.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            @tf.function(
                input_signature=[tf.TensorSpec([None, spec.image_size, spec.image_size, 3], tf.float32)]
            )
            def __call__(self, images):
                return self.inner.serve(images)

        tf.saved_model.save(Callable(), path)
    return path


_start = None  # in each process of on_every_core: the barrier all of them pass together


def _keep_start(barrier) -> None:
    global _start
    _start = barrier


def _tries(work) -> list[float]:
    """Seconds of each of REPEATS runs of ``work``; every process starts each together."""
    seconds = []
    for _ in range(REPEATS):
        _start.wait()
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return seconds


def _decode_share(paths: list[str], size: int) -> tuple[int, list[float]]:
    """In one process: decode and resize ``paths``, read into memory beforehand."""
    preprocessing = Preprocessing()
    datas = [pathlib.Path(path).read_bytes() for path in paths]

    def decode_all():
        for data in datas:
            preprocessing.apply(decode_image(data, DecodeLimits(), preprocessing.decode_side(size)), size)

    return len(datas), _tries(decode_all)


def _model_share(reference: str, backend: str, images: np.ndarray, batches: int) -> tuple[int, list[float]]:
    """In one process: the model on one thread, ``batches`` times on ``images``."""
    model = load_model(resolve_spec(reference), backend, 1)
    model(images[:8])

    def run_all():
        for _ in range(batches):
            model(images)

    return len(images) * batches, _tries(run_all)


def on_every_core(task, shares: list[tuple]) -> float:
    """Core-seconds per image of ``task`` run in one process per core at once, each
    on its share, as the pipeline's workers run (cores that share caches, memory
    and a hypervisor are slower together than one alone); the best of REPEATS."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(CORES)
    with ProcessPoolExecutor(CORES, mp_context=context, initializer=_keep_start, initargs=(start,)) as pool:
        done = [future.result() for future in [pool.submit(task, *share) for share in shares]]
    images = sum(count for count, _ in done)
    return min(sum(seconds) for seconds in zip(*(tries for _, tries in done), strict=True)) / images


def decode_core_seconds(paths: list[str], size: int) -> float:
    """Decode + resize, core-seconds per image, over the whole corpus (the pipeline
    cycles through all of it) with every core decoding."""
    return on_every_core(_decode_share, [(paths[core::CORES], size) for core in range(CORES)])


def model_core_seconds(reference: str, backend: str, images: np.ndarray, images_per_sec: float) -> float:
    """The model alone on one thread per core, every core running it, for about
    MODEL_SECONDS at ``images_per_sec`` (its speed alone)."""
    batches = max(1, round(MODEL_SECONDS * images_per_sec / len(images)))
    return on_every_core(_model_share, [(reference, backend, images, batches)] * CORES)


def _rate(model, images: np.ndarray) -> float:
    started = time.perf_counter()
    model(images)
    return len(images) / (time.perf_counter() - started)


def model_batch(reference: str, paths: list[str]) -> np.ndarray:
    """The first MODEL_BATCH images as the model sees them."""
    spec = resolve_spec(reference)
    preprocessing = Preprocessing()
    pixels = [
        preprocessing.apply(
            decode_image(
                pathlib.Path(p).read_bytes(), DecodeLimits(), preprocessing.decode_side(spec.image_size)
            ),
            spec.image_size,
        )
        for p in paths[:MODEL_BATCH]
    ]
    return scale_pixels(np.stack(pixels))


def model_rates(reference: str, images: np.ndarray, backends=("tensorflow", "tflite")) -> list[dict]:
    """Each backend and thread count alone on the machine."""
    spec = resolve_spec(reference)
    rates = []
    for backend in backends:
        for threads in sorted({1, CORES}):
            if backend == "tensorflow" and threads != CORES:
                continue  # TensorFlow's threads are fixed when it starts: it uses every core
            model = load_model(spec, backend, threads)
            model(images[:8])
            rate = max(_rate(model, images) for _ in range(REPEATS))
            rates.append(
                {
                    "backend": backend,
                    "threads": threads,
                    "images_per_sec": rate,
                    "core_seconds": threads / rate,
                }
            )
    return rates


def linked_folder(paths: list[str], folder: str) -> str:
    """A folder of links to ``paths``, a path listed twice linked under two names."""
    os.makedirs(folder, exist_ok=True)
    for number, path in enumerate(paths):
        target = os.path.join(folder, f"{number:07d}{os.path.splitext(path)[1]}")
        if not os.path.exists(target):
            os.symlink(path, target)
    return folder


def steady_rate(command_for, small: list[str], large: list[str], work: str, name: str) -> tuple[dict, str]:
    """images/s between two runs of different sizes (start-up cancels out), each
    size the best of PIPELINE_TRIES runs; and what the last large run printed."""
    runs = []
    for label, paths in (("small", small), ("large", large)):
        folder = linked_folder(paths, os.path.join(work, f"{name}-{len(paths)}-input"))
        output = os.path.join(work, f"{name}-{label}-output")
        tries = [run_measured(command_for(folder, output)) for _ in range(PIPELINE_TRIES)]
        seconds = min(seconds for seconds, _, _ in tries)
        runs.append((len(paths), seconds, max(peak for _, peak, _ in tries), tries[-1][2]))
    (n_small, t_small, _, _), (n_large, t_large, peak, log) = runs
    return {
        "images_per_sec": (n_large - n_small) / max(t_large - t_small, 1e-9),
        "wall_seconds": t_large,
        "wall_images_per_sec": n_large / t_large,
        "peak_rss": peak,
        "images": n_large,
    }, log


def imgembed_command(reference: str, *flags: str):
    """``imgembed embed`` with its defaults (and ``flags``) on a folder, as a user runs it."""

    def command(folder: str, output: str) -> list[str]:
        return [
            *(os.path.join(BIN, "imgembed"), "embed", "--input", folder, "--output", output),
            *("--model", reference, "--overwrite", *flags),
        ]

    return command


def steady_corpus(paths: list[str], ceiling: float) -> tuple[list[str], list[str]]:
    """The small and large runs of steady_rate: the corpus, cycled if it is too short
    to run for STEADY_SECONDS at the ceiling, and about its first quarter. Both hold a
    whole number of shards per worker process (a shard is one worker's unit of work),
    so that neither run ends with one worker idle while the other finishes a shard:
    that idle time would not cancel out between the two runs."""
    round_of_shards = FILES_PER_SHARD * CORES
    rounds = max(4, round(max(len(paths), ceiling * STEADY_SECONDS) / round_of_shards))
    large = [paths[number % len(paths)] for number in range(rounds * round_of_shards)]
    return large[: (rounds // 4) * round_of_shards], large


def batch_sweep(result: dict, paths: list[str], work: str, sizes: list[int]) -> list[dict]:
    """The pipeline's steady images/s at several ``--batch-size`` values, on the model
    of ``result`` (bench_model's): what the default batch size rests on."""
    small, large = steady_corpus(paths, result["ceiling"])
    rows = []
    for size in sizes:
        command = imgembed_command(result["reference"], "--batch-size", str(size))
        rate, _ = steady_rate(command, small, large, work, f"{result['model']}-batch{size}")
        rows.append({"model": result["model"], "batch_size": size, **rate})
        print(json.dumps(rows[-1], default=float), flush=True)
    return rows


def bench_model(label: str, reference: str, paths: list[str], work: str) -> dict:
    spec = resolve_spec(reference)
    images = model_batch(reference, paths)
    rates = model_rates(reference, images)
    best = min(rates, key=lambda r: r["core_seconds"])
    decode_seconds = decode_core_seconds(paths, spec.image_size)
    model_seconds = model_core_seconds(reference, best["backend"], images, best["images_per_sec"])
    ceiling = CORES / (model_seconds + decode_seconds)
    small, large = steady_corpus(paths, ceiling)

    ours = imgembed_command(reference)
    saved_model = baseline_savedmodel(reference, work)

    def baseline(folder, output):
        script = os.path.join(REPO, "bench", "baseline_pipeline.py")
        return [
            sys.executable,
            script,
            f"{folder}/*",
            os.path.join(output, "embeddings"),
            saved_model,
            str(spec.image_size),
        ]

    pipeline, _ = steady_rate(ours, small, large, work, f"{label}-imgembed")
    # The baseline is slower: the corpus alone already runs it for minutes.
    straightforward, _ = steady_rate(baseline, paths[: len(paths) // 4], paths, work, f"{label}-baseline")
    result = {
        "model": label,
        "precision": "fp32",
        "reference": reference,
        "decode_core_seconds": decode_seconds,
        "model_core_seconds": model_seconds,
        "model_rates": rates,
        "ceiling": ceiling,
        "pipeline": pipeline,
        "baseline": straightforward,
        "pipeline_vs_ceiling": pipeline["images_per_sec"] / ceiling,
        "pipeline_vs_baseline": pipeline["images_per_sec"] / straightforward["images_per_sec"],
    }
    print(json.dumps(result, default=float), flush=True)
    return result


def bench_int8(fp32: dict, paths: list[str], work: str) -> dict:
    """``imgembed embed --precision int8`` the same way as ``fp32`` (bench_model's
    result), beside it: each run calibrates and checks its own int8 model, as a
    user's run does (a fixed cost per run, which the steady rate cancels); the model
    alone and the ceiling are measured on the int8 file the large run used. When the
    fidelity gate sends the run back to fp32, the row says so."""
    label, reference = fp32["model"], fp32["reference"]
    spec = resolve_spec(reference)
    # Sizes the runs only: about a minute each if int8 doubles the ceiling.
    small, large = steady_corpus(paths, 2 * fp32["ceiling"])
    name = f"{label}-imgembed-int8"
    pipeline, log = steady_rate(imgembed_command(reference, "--precision", "int8"), small, large, work, name)
    result = {
        "model": label,
        "precision": "int8",
        "reference": reference,
        "decode_core_seconds": fp32["decode_core_seconds"],
        "pipeline": pipeline,
        "baseline": fp32["baseline"],
        "pipeline_vs_baseline": pipeline["images_per_sec"] / fp32["baseline"]["images_per_sec"],
        "pipeline_vs_fp32": pipeline["images_per_sec"] / fp32["pipeline"]["images_per_sec"],
    }
    record = os.path.join(work, f"{name}-large-output", "_models", f"int8-{spec.name}.json")
    if not os.path.exists(record):  # the gate refused int8: fp32 ran
        result |= {"fallback": next((line for line in log.splitlines() if "fp32 runs" in line), log[-300:])}
    else:
        with open(record) as file:
            used = json.load(file)
        int8_file = os.path.join(os.path.dirname(record), used["file"])
        images = model_batch(int8_file, paths)
        rates = model_rates(int8_file, images, backends=("tflite",))
        best = min(rates, key=lambda r: r["core_seconds"])
        model_seconds = model_core_seconds(int8_file, "tflite", images, best["images_per_sec"])
        ceiling = CORES / (model_seconds + fp32["decode_core_seconds"])
        result |= {
            "fidelity": used["fidelity"],
            "model_core_seconds": model_seconds,
            "model_rates": rates,
            "ceiling": ceiling,
            "pipeline_vs_ceiling": pipeline["images_per_sec"] / ceiling,
            "ops_outside_xnnpack": ops_outside_xnnpack(int8_file),
        }
    print(json.dumps(result, default=float), flush=True)
    return result


def ops_outside_xnnpack(tflite_file: str) -> list[str]:
    """The ops of the model that XNNPACK's delegate left to TFLite's own kernels."""
    from imgembed.models.tflite import ops_outside_delegates

    return ops_outside_delegates(pathlib.Path(tflite_file).read_bytes())


def memory_check(work: str, counts=(10_000, 100_000), distinct: int = 1000) -> list[dict]:
    """Peak RSS of the pipeline on 10k and on 100k small images (0.25_224). The
    inputs are links to 1000 distinct photos: memory depends on how many inputs
    flow through, not on whether their pixels differ."""
    models = prepare_models(work)
    photos = write_corpus(os.path.join(work, "memory-photos"), distinct, seed=5, min_side=160, max_side=320)
    rows = []
    for count in counts:
        folder = os.path.join(work, f"memory-{count}")
        os.makedirs(folder, exist_ok=True)
        for number in range(count):
            link = os.path.join(folder, f"{number:07d}.jpg")
            if not os.path.exists(link):
                os.symlink(photos[number % distinct], link)
        output = os.path.join(work, f"memory-{count}-output")
        seconds, peak, _ = run_measured(
            [os.path.join(BIN, "imgembed"), "embed", "--input", folder, "--output", output]
            + ["--model", models["0.25_224"], "--overwrite"]
        )
        rows.append({"images": count, "seconds": seconds, "peak_rss": peak})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_description() -> str:
    """The processor's name and widest SIMD extension. Every speed in the report depends
    on them: on two 2-core machines of ours TensorFlow ran 1.0_224 at 124 and 36 to 39 images/s."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return platform.processor() or "unknown processor"
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)  # x86 only
    flags = set(flags_line.group(1).split()) if flags_line else set()
    simd = next((flag.upper() for flag in ("avx512f", "avx2", "avx", "sse4_2") if flag in flags), "")
    return ", ".join(part for part in (name.group(1) if name else "unknown processor", simd) if part)


def markdown(
    results: list[dict],
    int8: list[dict],
    corpus: str,
    command: str,
    memory: list[dict] | None,
    batches: list[dict],
) -> str:
    lines = [
        "# Throughput: pipeline against the hardware ceiling",
        "",
        f"{CORES} cores ({cpu_description()}); corpus: {corpus}. Command: `{command}`",
        "",
        "Core-seconds per image measured with every core busy (one process per core), "
        f"each speed the best of {REPEATS} tries ({PIPELINE_TRIES} for pipelines).",
        "",
        "| model | decode+resize | model (best backend, 1 thread) | ceiling | "
        "pipeline (steady) | pipeline / ceiling | baseline pipeline | pipeline / baseline | "
        "pipeline wall (start-up included) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = min(r["model_rates"], key=lambda rate: rate["core_seconds"])
        lines.append(
            f"| {r['model']} | {r['decode_core_seconds'] * 1000:.2f} ms | {best['backend']}: "
            f"{r['model_core_seconds'] * 1000:.2f} ms | {r['ceiling']:.0f}/s | {r['pipeline']['images_per_sec']:.0f}/s | "
            f"**{r['pipeline_vs_ceiling']:.2f}** | {r['baseline']['images_per_sec']:.1f}/s | "
            f"**{r['pipeline_vs_baseline']:.1f}x** | {r['pipeline']['wall_images_per_sec']:.0f}/s over "
            f"{r['pipeline']['images']} images | {r['pipeline']['peak_rss'] / 2**20:.0f} MiB |"
        )
    if int8:
        lines += [
            "",
            "`--precision int8` beside fp32, in the same run on the same images: each int8 run "
            "calibrates on 200 of its images and checks on 200 others (the default gate, kNN@10 >= 0.9 "
            "and mean cosine >= 0.98), a fixed cost per run that the steady rate cancels; model and "
            "ceiling are measured on the int8 file the large run used.",
            "",
            "| model | float layers | fidelity on the run (kNN@10, mean cosine) | model (1 thread) | ceiling | "
            "pipeline (steady) | pipeline / ceiling | **int8 / fp32 pipeline** | peak RSS | "
            "ops XNNPACK leaves to TFLite |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in int8:
            if "fallback" in r:
                lines.append(
                    f"| {r['model']} | gate refused int8: fp32 ran | {r['fallback']} | | | "
                    f"{r['pipeline']['images_per_sec']:.0f}/s | | {r['pipeline_vs_fp32']:.2f}x | "
                    f"{r['pipeline']['peak_rss'] / 2**20:.0f} MiB | |"
                )
                continue
            fidelity = r["fidelity"]
            lines.append(
                f"| {r['model']} | {fidelity['float_layers']} | {fidelity['knn@10_overlap']:.3f}, "
                f"{fidelity['cosine_mean']:.4f} | {r['model_core_seconds'] * 1000:.2f} ms | {r['ceiling']:.0f}/s | "
                f"{r['pipeline']['images_per_sec']:.0f}/s | {r['pipeline_vs_ceiling']:.2f} | "
                f"**{r['pipeline_vs_fp32']:.2f}x** | {r['pipeline']['peak_rss'] / 2**20:.0f} MiB | "
                f"{', '.join(r['ops_outside_xnnpack']) or 'none'} |"
            )
    lines += [
        "",
        f"Model alone on the machine, per backend (batch of {MODEL_BATCH} preprocessed images, best of {REPEATS}):",
        "",
        "| model | backend | threads | images/s | core-seconds per image |",
        "|---|---|---|---|---|",
    ]
    for r in results + [r for r in int8 if "model_rates" in r]:
        for rate in r["model_rates"]:
            backend = rate["backend"] + (" int8" if r["precision"] == "int8" else "")
            lines.append(
                f"| {r['model']} | {backend} | {rate['threads']} | {rate['images_per_sec']:.1f} | "
                f"{rate['core_seconds'] * 1000:.2f} ms |"
            )
    if batches:
        lines += [
            "",
            "The pipeline (steady images/s, as above) by `--batch-size` (default 32):",
            "",
            "| model | batch size | pipeline (steady) | peak RSS |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['model']} | {b['batch_size']} | {b['images_per_sec']:.0f}/s | {b['peak_rss'] / 2**20:.0f} MiB |"
            for b in batches
        ]
    if memory:
        lines += [
            "",
            "Peak RSS against corpus size (0.25_224, small images):",
            "",
            "| images | seconds | peak RSS |",
            "|---|---|---|",
        ]
        lines += [
            f"| {m['images']:,} | {m['seconds']:.0f} | {m['peak_rss'] / 2**20:.0f} MiB |" for m in memory
        ]
        lines.append(f"\n100k / 10k peak RSS: **{memory[-1]['peak_rss'] / memory[0]['peak_rss']:.2f}**")
    lines += ["", "![throughput](throughput.svg)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1200, help="generated photos (default 1200)")
    parser.add_argument(
        "--images", default=None, help="a folder of images to use instead of generated photos"
    )
    parser.add_argument("--models", default="1.0_224,0.25_224")
    parser.add_argument("--memory-check", action="store_true", help="also run 10k and 100k images (slow)")
    parser.add_argument(
        "--batch-sweep",
        default="",
        help="also run the pipeline at these --batch-size values on the last of --models (e.g. 8,32,128)",
    )
    parser.add_argument(
        "--int8", action="store_true", help="also run each model with --precision int8 beside fp32"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "throughput.md"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="imgembed-throughput-")
    models = prepare_models(work)
    if args.images:
        paths = sorted(
            path  # absolute: the runs read them through links
            for path in glob.glob(os.path.join(os.path.abspath(args.images), "*"))
            if path.lower().endswith(tuple(f".{extension}" for extension in IMAGE_EXTENSIONS))
        )
        corpus = f"{len(paths)} images from {args.images}"
    else:
        paths = write_corpus(os.path.join(work, "corpus"), args.count)
        corpus = f"{len(paths)} generated photo-like JPEGs, 300 to 4000 px on the long side"
    results = [bench_model(label, models[label], paths, work) for label in args.models.split(",")]
    int8 = [bench_int8(result, paths, work) for result in results] if args.int8 else []
    sizes = [int(size) for size in args.batch_sweep.split(",") if size]
    batches = batch_sweep(results[-1], paths, work, sizes) if sizes else []
    memory = memory_check(work) if args.memory_check else None
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        file.write(markdown(results, int8, corpus, command.strip(), memory, batches))
    chart = bar_chart_svg(
        "images/s on this machine",
        [
            (r["model"], [r["baseline"]["images_per_sec"], r["pipeline"]["images_per_sec"], r["ceiling"]])
            for r in results
        ],
        ["baseline pipeline", "imgembed pipeline", "ceiling"],
        ".0f",
    )
    with open(os.path.join(os.path.dirname(args.output), "throughput.svg"), "w") as file:
        file.write(chart)
    for r in results:
        print(
            f"{r['model']}: pipeline / ceiling {r['pipeline_vs_ceiling']:.2f}, pipeline / baseline {r['pipeline_vs_baseline']:.1f}x"
        )
    for r in int8:
        print(
            f"{r['model']} int8: pipeline / fp32 pipeline {r['pipeline_vs_fp32']:.2f}x {r.get('fallback', '')}"
        )
    print(f"wrote {args.output}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
