"""A corpus that grows by a few files: what a rerun redoes.

    .venv/bin/python bench/corpus_growth.py                      # ../shared's 1,300 ImageNet photos
    .venv/bin/python bench/corpus_growth.py --photos 'my/*.jpg'   # any photos

Two copies of the photos (2,600 files for the 1,300 ImageNet validation images of
../shared) are embedded with the default model, 100 files a shard, through a
relative path, and indexed. Then one file is added that sorts before every other,
one is deleted from the middle, and one is rewritten with other bytes; the same
command runs again through the absolute path, and `imgembed index --sync` follows.
Prints, as JSON, what the rerun embedded and wrote, which embeddings files it
left untouched, and the seconds of each step; writes docs/benchmarks/growth.md.

``--compare-with DIR`` also runs the embed steps with another imgembed (an
unpacked wheel of an earlier commit: ``pip wheel --no-deps`` of it, unzipped),
to measure how the plan of before behaved, in a column of its own (earlier
imgembeds had no --sync).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IMGEMBED_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
DEFAULT_PHOTOS = os.path.join(SHARED, "images", "imagenet_val_1300", "*.JPEG")
BIN = os.path.dirname(sys.executable)
MODEL = "mobilenet_v1_100_224_embedded"


def imgembed(args: list[str], cwd: str, pythonpath: str | None) -> tuple[float, str]:
    """Runs an imgembed command; (seconds, its output)."""
    env = dict(os.environ)
    command = [os.path.join(BIN, "imgembed"), *args]
    if pythonpath:  # another imgembed, ahead of the installed one
        env["PYTHONPATH"] = pythonpath
        command = [sys.executable, "-c", "import sys; from imgembed.cli import main; sys.exit(main())", *args]
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"imgembed {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return round(time.monotonic() - started, 1), done.stdout


def parquet_files(folder: str) -> dict[str, int]:
    return {path: os.stat(path).st_mtime_ns for path in glob.glob(f"{folder}/**/*.parquet", recursive=True)}


def rows_in(paths) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def run(photos: list[str], work: str, pythonpath: str | None) -> dict:
    corpus = os.path.join(work, "corpus")
    for copy in ("a", "b"):
        os.makedirs(os.path.join(corpus, copy))
        for path in photos:
            shutil.copy(path, os.path.join(corpus, copy, os.path.basename(path)))
    embed = ["embed", f"--model={MODEL}", "--files-per-shard=100", "--output=out"]
    figures = {"files": 2 * len(photos)}
    figures["first_embed_s"], _ = imgembed([*embed, "--input=corpus"], work, pythonpath)
    out = os.path.join(work, "out")
    if not pythonpath:
        figures["first_index_s"], _ = imgembed(
            ["index", "--embeddings", f"out/{MODEL}", "--output", "index"], work, pythonpath
        )
    before = parquet_files(out)

    names = sorted(os.listdir(os.path.join(corpus, "a")))
    shutil.copy(photos[0], os.path.join(corpus, "a", "0000_added_first.jpg"))  # sorts first
    os.remove(os.path.join(corpus, "a", names[len(names) // 2]))
    shutil.copy(photos[1], os.path.join(corpus, "b", names[10]))  # other bytes, same name
    figures["rerun_embed_s"], _ = imgembed([*embed, f"--input={corpus}"], work, pythonpath)
    after = parquet_files(out)
    written = [path for path in after if before.get(path) != after[path]]
    summary = json.loads(pathlib.Path(out, "run_summary.json").read_text())
    figures |= {
        "rerun_files_written": len(written),
        "rerun_rows_written": rows_in(path for path in written if f"/{MODEL}/" in path),
        "files_untouched": sum(1 for path, mtime in before.items() if after.get(path) == mtime),
        "files_before": len(before),
        "rows_after": summary["models"][0]["rows"],
    }
    if "run" in summary:  # imgembed 0.2's own count
        figures["rerun_images_embedded"] = summary["models"][0]["embedded"]
        figures["rerun_rows_reused"] = summary["run"]["rows_reused"]
    if not pythonpath:
        figures["sync_s"], text = imgembed(
            ["index", "--sync", "--embeddings", f"{out}/{MODEL}", "--output", "index"], work, pythonpath
        )
        figures["sync"] = text.splitlines()[0]
    return figures


def _version(pythonpath: str) -> str:
    text = pathlib.Path(pythonpath, "imgembed", "__init__.py").read_text()
    return text.split("__version__ = ", 1)[1].split()[0].strip("\"'")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="A glob of photos (../shared's ImageNet).")
    parser.add_argument("--compare-with", default=None, help="Also run the embed steps with this imgembed.")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "growth.md"))
    args = parser.parse_args()
    photos = sorted(glob.glob(args.photos))
    if len(photos) < 20:
        print(f"corpus_growth: too few photos match {args.photos}", file=sys.stderr)
        return 2
    runs = [("this imgembed", None)]
    if args.compare_with:
        runs.append((f"imgembed {_version(args.compare_with)} (--compare-with)", args.compare_with))
    columns = {}
    for name, pythonpath in runs:
        with tempfile.TemporaryDirectory(prefix="imgembed-growth-") as work:
            columns[name] = run(photos, work, pythonpath)
    print(json.dumps(columns, indent=2))
    names = list(columns)
    rows = "\n".join(
        f"| {figure} | " + " | ".join(str(columns[name].get(figure, "")) for name in names) + " |"
        for figure in columns["this imgembed"]
    )
    command = "bench/corpus_growth.py" + (f" --compare-with {args.compare_with}" if args.compare_with else "")
    pathlib.Path(args.output).write_text(
        "# A corpus that grows: what a rerun redoes\n\n"
        f"`.venv/bin/python {command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; generated "
        "by it, see its docstring for the scenario).\n\n"
        f"| figure | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n{rows}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
