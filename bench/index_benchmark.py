"""Index benchmark: imgembed's index choice next to autofaiss's, same data, same budget.

For each dataset and memory budget it builds one index with `imgembed index` and one
with `autofaiss build_index` (installed in its own virtualenv, bench/.venv-autofaiss,
so it never touches the project's pins), each in a subprocess whose peak RSS is
recorded, then measures both in this process on the same queries against the same
exact ground truth: recall@10 (the query itself excluded, ties counted) and batch QPS.

    .venv/bin/python bench/index_benchmark.py                    # 1M x 256 synthetic + real
    .venv/bin/python bench/index_benchmark.py --count 100000     # quicker
    .venv/bin/python bench/index_benchmark.py --scale-count 5000000 --work /tmp/bench  # + 5M x 256

``--scale-count`` adds one build at scale (structured synthetic vectors with 2%
near copies, `--max-memory 1G`, default flags, near duplicates on): its wall time
per phase, peak RSS, recall@10 and batch QPS, from its own report.

Writes docs/benchmarks/index.md. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from measure import run_measured  # noqa: E402

from fixtures.synthetic_vectors import write_synthetic_embeddings  # noqa: E402
from imgembed.common.units import format_size  # noqa: E402
from imgembed.index import store  # noqa: E402
from imgembed.index.evaluate import exact_neighbours, recall  # noqa: E402
from imgembed.index.reader import EmbeddingSource  # noqa: E402
from imgembed.index.vectors import Metric, prepare  # noqa: E402

AUTOFAISS_VENV = os.path.join(REPO, "bench", ".venv-autofaiss")
AUTOFAISS_VERSION = "2.18.0"
QUERIES = 1000
K = 10


def ensure_autofaiss() -> str:
    binary = os.path.join(AUTOFAISS_VENV, "bin", "autofaiss")
    if not os.path.exists(binary):
        subprocess.run([sys.executable, "-m", "venv", AUTOFAISS_VENV], check=True)
        pip = os.path.join(AUTOFAISS_VENV, "bin", "pip")
        # autofaiss 2.18 calls faiss with keyword arguments that faiss 1.8+ refuses,
        # and needs numpy 1.x, which pyarrow 16+ does not accept.
        pins = [f"autofaiss=={AUTOFAISS_VERSION}", "faiss-cpu==1.7.4", "pyarrow<16"]
        subprocess.run([pip, "install", "-q", *pins], check=True)
    return binary


def export_npy(source: EmbeddingSource, metric: Metric, folder: str) -> None:
    """autofaiss reads .npy files; same rows, same order, already prepared."""
    os.makedirs(folder, exist_ok=True)
    for number, (_, vectors) in enumerate(source.vector_batches()):
        np.save(os.path.join(folder, f"{number:06d}.npy"), prepare(vectors, metric))


def batch_qps(index: faiss.Index, vectors: np.ndarray) -> float:
    index.search(vectors[:10], K)  # warm up
    started = time.perf_counter()
    index.search(vectors, K)
    return len(vectors) / (time.perf_counter() - started)


def bench_dataset(name: str, embeddings: str, budgets: list[str], work: str) -> list[dict]:
    metric = Metric.COSINE
    source = EmbeddingSource(embeddings)
    rng = np.random.default_rng(7)
    queries = exact_neighbours(source, metric, source.sample_ids(QUERIES, rng), K)
    npy_dir = os.path.join(work, f"{name}-npy")
    export_npy(source, metric, npy_dir)
    autofaiss = ensure_autofaiss()
    rows = []
    for budget in budgets:
        ours_dir = os.path.join(work, f"{name}-{budget}-imgembed")
        seconds, peak, _ = run_measured(
            [
                os.path.join(os.path.dirname(sys.executable), "imgembed"),
                "index",
                "--embeddings",
                embeddings,
                "--output",
                ours_dir,
                "--max-memory",
                budget,
                "--no-near-duplicates",
                "--overwrite",
            ]
        )
        ours = store.load(ours_dir)
        report = store.read_json(ours.directory, store.REPORT_FILE)
        rows.append(
            {
                "dataset": name,
                "budget": budget,
                "system": "imgembed",
                "index": report["index"]["factory"],
                "params": ",".join(f"{k}={v}" for k, v in report["search_params"].items()) or "-",
                "build_s": seconds,
                "train_add_s": report["seconds"]["train"] + report["seconds"]["add"],
                "peak_rss": peak,
                "index_bytes": report["index_bytes"],
                "ram_bytes": report["index"]["estimated_bytes"] or report["index_bytes"],
                "recall@10": recall(ours.index, queries, K),
                "qps": batch_qps(ours.index, queries.vectors),
            }
        )
        theirs_path = os.path.join(work, f"{name}-{budget}-autofaiss.index")
        infos_path = theirs_path + ".json"
        seconds, peak, _ = run_measured(
            [
                autofaiss,
                "build_index",
                f"--embeddings={npy_dir}",
                f"--index_path={theirs_path}",
                f"--index_infos_path={infos_path}",
                "--metric_type=ip",
                f"--max_index_memory_usage={budget}",
                "--current_memory_available=16G",
            ]
        )
        with open(infos_path) as file:
            infos = json.load(file)
        theirs = faiss.read_index(theirs_path)
        faiss.ParameterSpace().set_index_parameters(theirs, infos["index_param"])
        rows.append(
            {
                "dataset": name,
                "budget": budget,
                "system": f"autofaiss {AUTOFAISS_VERSION}",
                "index": infos["index_key"],
                "params": infos["index_param"],
                "build_s": seconds,
                "train_add_s": None,
                "peak_rss": peak,
                "index_bytes": os.path.getsize(theirs_path),
                "ram_bytes": os.path.getsize(theirs_path),
                "recall@10": recall(theirs, queries, K),
                "qps": batch_qps(theirs, queries.vectors),
            }
        )
        for row in rows[-2:]:
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    return rows


def bench_scale(count: int, dim: int, budget: str, work: str) -> dict:
    embeddings = os.path.join(work, f"synthetic-{count}x{dim}-near-copies")
    if not glob.glob(os.path.join(embeddings, "*.parquet")):
        write_synthetic_embeddings(embeddings, count, dim, files=max(1, count // 100_000), near_copies=0.02)
    output = os.path.join(work, f"index-{count}x{dim}-{budget}")
    binary = os.path.join(os.path.dirname(sys.executable), "imgembed")
    seconds, peak, _ = run_measured(
        [
            binary,
            "index",
            "--embeddings",
            embeddings,
            "--output",
            output,
            "--max-memory",
            budget,
            "--overwrite",
        ]
    )
    report = store.read_json(store.live_dir(output), store.REPORT_FILE)  # no need to open 5 GB of index
    return {
        "data": f"synthetic {count:,}x{dim}",
        "budget": budget,
        "index": report["index"]["factory"],
        "wall_s": seconds,
        "phases": report["seconds"],
        "peak_rss": peak,
        "recall@10": report["recall"]["recall@10"],
        "qps": report["latency"]["batch_qps"],
        "duplicates": report["duplicates"],
    }


def scale_markdown(row: dict) -> str:
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in row["phases"].items())
    share = row["phases"].get("duplicates", 0) / row["wall_s"]
    return "\n".join(
        [
            "",
            f"## {row['data']} under `--max-memory {row['budget']}`, default flags",
            "",
            "| index | wall | peak RSS | recall@10 | batch QPS | duplicates' share | phases |",
            "|---|---|---|---|---|---|---|",
            f"| `{row['index']}` | {row['wall_s']:.0f} s | {format_size(row['peak_rss'])} | "
            f"{row['recall@10']:.3f} | {row['qps']:,.0f} | {share:.0%} | {phases} |",
            "",
            f"Duplicate pass: pair recall {row['duplicates'].get('pair_recall')} on "
            f"{row['duplicates'].get('pairs_checked')} true pairs of sample rows.",
            "",
        ]
    )


def markdown(rows: list[dict], command: str, notes: str) -> str:
    lines = [
        "# Index benchmark: imgembed vs autofaiss",
        "",
        notes,
        "",
        f"Command: `{command}`",
        "",
        "| data | budget | system | index | search params | build s | peak RSS | file | RAM | recall@10 | batch QPS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['budget']} | {r['system']} | `{r['index']}` | `{r['params']}` | "
            f"{r['build_s']:.0f} | {format_size(r['peak_rss'])} | {format_size(r['index_bytes'])} | "
            f"{format_size(r['ram_bytes'])} | {r['recall@10']:.3f} | {r['qps']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budgets", default="300M,100M", help="comma-separated, for the synthetic data")
    parser.add_argument("--real-embeddings", default=None, help="a model folder of `imgembed embed` output")
    parser.add_argument("--real-budgets", default="1G,1M")
    parser.add_argument("--scale-count", type=int, default=0, help="also one default build this large")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "index.md"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="imgembed-index-bench-")
    synthetic = os.path.join(work, f"synthetic-{args.count}x{args.dim}")
    if not glob.glob(os.path.join(synthetic, "*.parquet")):
        write_synthetic_embeddings(synthetic, args.count, args.dim, files=16)
    rows = bench_dataset(f"synthetic {args.count:,}x{args.dim}", synthetic, args.budgets.split(","), work)
    if args.real_embeddings:
        real = EmbeddingSource(args.real_embeddings)
        rows += bench_dataset(
            f"real {real.count:,}x{real.dim}", args.real_embeddings, args.real_budgets.split(","), work
        )
    notes = (
        f"Machine: {os.cpu_count()} cores. Both systems index the same L2-normalised vectors (cosine) "
        f"under the same `max memory`; recall@10 and QPS are measured here on the same {QUERIES} "
        "corpus queries against exact search (each query's own row excluded, ties counted), "
        "with each system's chosen search parameters. Build s is the whole command "
        "(imgembed's includes its own recall measurement); peak RSS is the build process tree's."
        " Budgets are given as each tool parses them (imgembed: decimal M/G; autofaiss: its own units)."
        " The real embeddings are the 1300 ImageNet validation images of ../shared, embedded first with"
        " `imgembed embed --input '../shared/images/imagenet_val_1300/*.JPEG' --output /tmp/inet`."
    )
    command = "python bench/index_benchmark.py " + " ".join(sys.argv[1:])
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    text = markdown(rows, command.strip(), notes)
    if args.scale_count:
        text += scale_markdown(bench_scale(args.scale_count, args.dim, "1G", work))
    with open(args.output, "w") as file:
        file.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
