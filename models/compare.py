"""``imgembed compare``: several variants on the same images, side by side.

For each model: images per second (model calls only, over all cores, and per
core), bytes per stored vector, kNN@10 agreement with the reference variant (the
largest, unless ``--reference`` names one), and ImageNet top-1 when labels are
given (through the model's classification sibling: ``..._classification`` in the
registry, ``#classification`` for files). Writes compare.json, compare.md and
compare.html (a table and bar charts) into ``--output``.

    imgembed compare --model mobilenet_v1_100_224_embedded --model small=m_025_128.tflite \\
        --images 'photos/*.jpg' --labels labels.csv --output docs/variants
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
import time

import numpy as np

from imgembed.common import progress
from imgembed.common.charts import bar_chart_svg
from imgembed.models.errors import ModelLoadError
from imgembed.models.evaluation import KNN, embed_all, knn_overlap, read_images, read_labels, top1
from imgembed.models.loading import load_model, resolve_spec
from imgembed.models.registry import KNOWN_MODELS, NUM_CLASSES, Flavour, Format, ModelSpec
from imgembed.transforms.resize import Preprocessing


@dataclasses.dataclass
class VariantResult:
    name: str
    image_size: int
    dimension: int
    bytes_per_vector: int
    images_per_sec: float
    images_per_sec_per_core: float
    knn_agreement: float | None = None
    top1: float | None = None


def classification_sibling(spec: ModelSpec) -> ModelSpec | None:
    """The same network's ImageNet classifier, when one exists."""
    if spec.flavour is Flavour.CLASSIFICATION:
        return spec if spec.output_dim in (NUM_CLASSES, NUM_CLASSES - 1) else None
    if f"{spec.name}_classification" in KNOWN_MODELS:
        return KNOWN_MODELS[f"{spec.name}_classification"]
    try:
        if spec.format is Format.HUB and "/feature_vector/" in spec.source:
            sibling = resolve_spec(spec.source.replace("/feature_vector/", "/classification/"))
        elif spec.format is not Format.HUB:
            sibling = resolve_spec(spec.source + "#classification")
        else:
            return None
    except ModelLoadError:
        return None
    return sibling if sibling.output_dim in (NUM_CLASSES, NUM_CLASSES - 1) else None


def timed_embeddings(
    spec: ModelSpec, images_by_size, repeats: int = 1, clock=time.perf_counter
) -> tuple[np.ndarray, float]:
    """(vectors, images per second of the model calls, warm); ``clock`` is injectable."""
    embedder = load_model(spec)
    images = images_by_size(spec.image_size)
    embed_all(embedder, images[:8])  # warm up: tracing, allocation
    started = clock()
    for _ in range(repeats):
        vectors = embed_all(embedder, images)
    return vectors, repeats * len(images) / (clock() - started)


def compare(
    specs: list[ModelSpec], images_by_size, paths, labels, reference: str | None, clock=time.perf_counter
) -> list[VariantResult]:
    reference = reference or max(specs, key=lambda s: (s.output_dim, s.image_size)).name
    cores = os.cpu_count() or 1
    results, vectors = [], {}
    for spec in specs:
        with progress.phase(f"compare: {spec.name}"):
            vectors[spec.name], speed = timed_embeddings(spec, images_by_size, clock=clock)
        results.append(
            VariantResult(
                spec.name, spec.image_size, spec.output_dim, spec.output_dim * 4, speed, speed / cores
            )
        )
        if labels:
            sibling = classification_sibling(spec)
            if sibling is not None:
                scores = (
                    vectors[spec.name]
                    if sibling is spec
                    else embed_all(load_model(sibling), images_by_size(sibling.image_size))
                )
                results[-1].top1 = top1(scores, paths, labels)
    if reference not in vectors:
        raise ValueError(f"--reference {reference} is not one of the models compared")
    for result in results:
        result.knn_agreement = knn_overlap(vectors[reference], vectors[result.name])
    return results


def markdown(results: list[VariantResult], reference: str, images: int) -> str:
    lines = [
        f"| model | input | dim | bytes/vector | images/s | images/s per core | kNN@{KNN} vs {reference} | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        top = "-" if r.top1 is None else f"{r.top1:.3f}"
        lines.append(
            f"| {r.name} | {r.image_size} | {r.dimension} | {r.bytes_per_vector:,} | {r.images_per_sec:.1f} | "
            f"{r.images_per_sec_per_core:.1f} | {r.knn_agreement:.3f} | {top} |"
        )
    return f"{images} images.\n\n" + "\n".join(lines) + "\n"


def _bars(title: str, values: list[tuple[str, float | None]], fmt: str) -> str:
    return bar_chart_svg(title, [(name, [value]) for name, value in values], [], fmt)


def html_report(results: list[VariantResult], reference: str, images: int) -> str:
    names = [r.name for r in results]
    charts = [
        _bars(
            "images/s per core",
            list(zip(names, [r.images_per_sec_per_core for r in results], strict=True)),
            ".1f",
        ),
        _bars(
            f"kNN@{KNN} agreement with {reference}",
            list(zip(names, [r.knn_agreement for r in results], strict=True)),
            ".3f",
        ),
        _bars("ImageNet top-1", list(zip(names, [r.top1 for r in results], strict=True)), ".3f"),
        _bars(
            "bytes per vector",
            list(zip(names, [float(r.bytes_per_vector) for r in results], strict=True)),
            ",.0f",
        ),
    ]
    header = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in ["model", "input", "dim", "bytes/vector", "images/s", "per core", "kNN@10", "top-1"]
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in [
                r.name, r.image_size, r.dimension, r.bytes_per_vector, f"{r.images_per_sec:.1f}",
                f"{r.images_per_sec_per_core:.1f}", f"{r.knn_agreement:.3f}", "-" if r.top1 is None else f"{r.top1:.3f}",
            ]
        )
        + "</tr>"
        for r in results
    )  # fmt: skip
    return (
        "<!doctype html><meta charset='utf-8'><title>imgembed variant comparison</title>"
        f"<h1>MobileNet V1 variants on {images} images</h1><table border='1' cellpadding='4'>"
        f"<tr>{header}</tr>{body}</table>" + "".join(f"<p>{chart}</p>" for chart in charts)
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgembed compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", required=True, help="A model reference (repeat; name=ref to name it)."
    )
    parser.add_argument("--images", required=True, help="Glob of the images to compare on.")
    parser.add_argument("--sample", type=int, default=500, help="Images used (500).")
    parser.add_argument("--labels", default=None, help="'file name,class' lines (1001-way): adds top-1.")
    parser.add_argument(
        "--reference",
        default=None,
        help="The variant kNN agreement is measured against (default: the largest).",
    )
    parser.add_argument("--output", required=True, help="Folder for compare.json, compare.md, compare.html.")
    parser.add_argument("--resize", default="crop")
    parser.add_argument("--central-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        preprocessing = Preprocessing(args.resize, args.central_fraction)
        specs = [resolve_spec(reference) for reference in args.model]
        cache: dict[int, np.ndarray] = {}
        paths: list[str] = []

        def images_by_size(size: int) -> np.ndarray:
            if size not in cache:
                cache[size], used = read_images(args.images, args.sample, preprocessing, size, args.seed)
                paths[:] = used  # the same seeded sample at every size
            return cache[size]

        images_by_size(specs[0].image_size)
        labels = read_labels(args.labels) if args.labels else None
        reference = args.reference or max(specs, key=lambda s: (s.output_dim, s.image_size)).name
        results = compare(specs, images_by_size, paths, labels, reference)
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"imgembed compare: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    count = len(paths)
    with open(os.path.join(args.output, "compare.json"), "w") as file:
        json.dump(
            {"images": count, "reference": reference, "results": [dataclasses.asdict(r) for r in results]},
            file,
            indent=2,
        )
    table = markdown(results, reference, count)
    with open(os.path.join(args.output, "compare.md"), "w") as file:
        file.write("# MobileNet V1 variants compared\n\n" + table)
    with open(os.path.join(args.output, "compare.html"), "w") as file:
        file.write(html_report(results, reference, count))
    print(table + f"\nwritten to {args.output}/compare.{{json,md,html}}")
    return 0
