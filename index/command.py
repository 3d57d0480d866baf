"""``imgembed index``: build a FAISS index from embeddings, or add to one.

    imgembed index --embeddings out/mobilenet_v1_100_224_embedded --output out/index
    imgembed index --add --embeddings out2/mobilenet_v1_100_224_embedded --output out/index
    imgembed index --sync --embeddings out/mobilenet_v1_100_224_embedded --output out/index
    imgembed index ... --distributed --runner DataflowRunner --project P --temp_location gs://b/tmp

Flags not listed here go to Beam when --distributed or a tf.Transform stage is given;
Beam's --temp_location is where their workers exchange files.
"""

from __future__ import annotations

import argparse
import functools
import sys

from imgembed.common.runners import with_default_runner
from imgembed.common.units import format_size, parse_size
from imgembed.index import store
from imgembed.index.build import IndexConfig, add_locally, build
from imgembed.index.reader import EmbeddingSource
from imgembed.index.update import add_to_index, sync_index
from imgembed.index.vectors import IndexInputError, Metric
from imgembed.transforms.embedding_transform import TransformOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgembed index", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--embeddings",
        action="append",
        required=True,
        help="A model folder written by `imgembed embed` (repeatable).",
    )
    p.add_argument("--output", required=True, help="Index folder, any Beam filesystem (local, gs://...).")
    p.add_argument("--metric", default="cosine", help="cosine (default; vectors are L2-normalised) or l2.")
    p.add_argument("--max-memory", default="4G", help="Memory the index may use, e.g. 500M, 4G (default 4G).")
    p.add_argument("--recall-target", type=float, default=0.95, help="recall@10 to tune for (default 0.95).")
    p.add_argument(
        "--index-type", default=None, help="A faiss index_factory string that overrides the choice."
    )
    changes = p.add_mutually_exclusive_group()
    changes.add_argument(
        "--add",
        action="store_true",
        help="Add the embeddings of new images (another folder) to the index in --output, without retraining.",
    )
    changes.add_argument(
        "--sync",
        action="store_true",
        help="Make the index in --output mirror --embeddings, without retraining: rows of embedding files "
        "gone (images deleted or changed since) removed, rows of new files added. Builds it if there is none.",
    )
    p.add_argument("--distributed", action="store_true", help="Add vectors with a Beam job (IVF indexes).")
    p.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.95,
        help="Cosine similarity of near duplicates (default 0.95).",
    )
    p.add_argument(
        "--no-near-duplicates", action="store_true", help="Find exact copies only (faster on huge corpora)."
    )
    p.add_argument(
        "--dims", type=int, default=None, help="tf.Transform stage: centre, then PCA to this many dimensions."
    )
    p.add_argument(
        "--whiten", action="store_true", help="With --dims: unit variance per principal component."
    )
    p.add_argument(
        "--center", action="store_true", help="tf.Transform stage without PCA: L2-normalise and centre."
    )
    p.add_argument(
        "--no-transform-report", action="store_true", help="Skip building a raw-vector index for comparison."
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing index in --output.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the training and query samples.")
    return p


def describe_update(report: dict, index_dir: str) -> str:
    if "note" in report:
        return f"Nothing to change in {index_dir}: {report['note']}"
    files = report["files"]
    return "\n".join(
        [
            f"Updated {index_dir} to {report['count']:,} vectors (version {report['version']}, "
            f"{report['seconds']:.1f} s): {report['added']:,} images added, {report['replaced']:,} replaced, "
            f"{report['removed']:,} removed",
            f"  files: {files['added']} new, {files['removed']} gone, {files['kept']} kept; "
            f"{report['unchanged']:,} unchanged rows of rewritten files added again",
            f"  {report['why']}",
        ]
        + (
            ["  RETRAIN ADVISED: rebuild the index (imgembed index --overwrite)"]
            if report["retrain_advised"]
            else []
        )
    )


def describe(report: dict, index_dir: str) -> str:
    if "added" in report:
        return describe_update(report, index_dir)
    plan = report["index"]
    recall = "  ".join(f"{k} {v:.3f}" for k, v in report["recall"].items())
    k = min(10, report["count"] - 1)
    met = "met" if report["meets_target"] else "NOT MET (raise --max-memory or lower --recall-target)"
    params = ", ".join(f"{k}={v}" for k, v in report["search_params"].items()) or "exact"
    latency = report.get("latency", {})
    duplicates = report["duplicates"]
    transform = report.get("transform")
    transform_lines = []
    if transform:
        before, after = transform.get("before"), transform.get("after")
        transform_lines.append(
            f"  tf.Transform: {transform['input_dim']} -> {transform['output_dim']} dims "
            f"(explained variance {transform['explained_variance']:.3f}), graph in {index_dir}/transform"
        )
        if before and after:
            key = next(key for key in before if key.startswith("recall@"))
            transform_lines.append(
                f"  vs raw vectors: {key} {before[key]:.3f} -> {after[key]:.3f} (against raw exact search); "
                f"index {format_size(before['index_bytes'])} -> {format_size(after['index_bytes'])}"
            )
    return "\n".join(
        [
            f"Index: {plan['kind']} ({plan['factory']})",
            f"  why: {plan['reason']}",
            *(
                f"  tried first: {tried['kind']} ({tried['factory']}), recall@{k} {tried[f'recall@{k}']:.3f}"
                for tried in report.get("tried", [])
            ),
            f"  {report['count']:,} vectors x {report['dimension']}-d, {report['metric']}; "
            f"{format_size(report['index_bytes'])} on disk, about "
            f"{format_size(plan['estimated_bytes'] or report['index_bytes'])} in RAM when loaded",
            f"  {recall}   (target recall@{k} >= {report['recall_target']}: {met})",
            f"  search: {params}; one query p50 {latency.get('single_query_p50_ms', 0)} ms; "
            f"batch {latency.get('batch_qps', 0):,.0f} queries/s",
            "  built in {:.1f} s ({})".format(
                sum(report["seconds"].values()),
                ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
            ),
            f"  duplicates: {duplicates['clusters']} clusters, {duplicates['rows_in_clusters']} rows "
            f"(near-duplicate threshold {duplicates['near_duplicate_threshold']}), "
            f"{duplicates['exact_duplicate_rows']} rows with an exact copy"
            + (
                f"; {duplicates['pair_recall']:.3f} of {duplicates['pairs_checked']} true pairs of sample rows found"
                if duplicates.get("pair_recall") is not None
                else ""
            ),
            *transform_lines,
            f"  written to {index_dir}/ ({store.REPORT_FILE} has the details)",
        ]
    )


def main(argv: list[str]) -> int:
    args, beam_args = parser().parse_known_args(argv)
    uses_beam = args.distributed or args.dims is not None or args.whiten or args.center
    if beam_args and not uses_beam:
        print(
            f"imgembed index: unknown flags {beam_args} (Beam flags need --distributed or --dims)",
            file=sys.stderr,
        )
        return 2
    beam_args = with_default_runner(beam_args)
    try:
        transform = None
        if args.dims is not None or args.whiten or args.center:
            transform = TransformOptions(dims=args.dims, whiten=args.whiten)
        config = IndexConfig(
            metric=Metric.parse(args.metric),
            max_memory=parse_size(args.max_memory),
            recall_target=args.recall_target,
            factory=args.index_type,
            dedup_threshold=None if args.no_near_duplicates else args.dedup_threshold,
            seed=args.seed,
            transform=transform,
            compare_raw=not args.no_transform_report,
            beam_args=tuple(beam_args),
        )
        add = add_locally
        if args.distributed:
            from imgembed.index.beam_build import add_with_beam

            add = functools.partial(add_with_beam, pipeline_args=beam_args)
        if args.add:
            report = add_to_index(args.output, args.embeddings, config, add)
        elif args.sync:
            report = sync_index(args.output, args.embeddings, config, add)
        else:
            report = build(
                EmbeddingSource(args.embeddings), args.output, config, add, overwrite=args.overwrite
            )
    except (IndexInputError, ValueError) as error:
        print(f"imgembed index: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an --output that cannot be written (read-only, a file)
        print(
            f"imgembed index: cannot write {args.output}: {' '.join(str(error).split())[:400]}",
            file=sys.stderr,
        )
        return 2
    print(describe(report, args.output))
    # A build that missed its recall target with every kind it tried is a failure;
    # an add that advises a retrain still added its rows.
    return 0 if report.get("meets_target", True) else 1
