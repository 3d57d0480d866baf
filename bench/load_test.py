"""Load test of the real service, measured from outside with wrk.

    .venv/bin/python bench/load_test.py                   # 500k x 1024 synthetic index
    .venv/bin/python bench/load_test.py --index out/index # an index built from images
    .venv/bin/python bench/load_test.py --count 5000000 --dim 256 --max-memory 1G
    .venv/bin/python bench/load_test.py --image-index out/index --image photo.jpg  # by image too

Builds (or takes) an index, starts `imgembed serve` on loopback, and drives it with
wrk (Debian's; installed with apt-get when missing) from the same machine: 32
connections, k=10, each run after 5 s of the same load that is not counted, three
runs of each (the median reported, with all of them); by id
(GET /v1/neighbors/<random indexed id>) and by vector (POST /v1/search with one
vector: a random item's embedding plus 10% noise). On an
index built from images (--index or --image-index), also by image (POST /v1/search/image with a JPEG), each
run set against the model's own images/s measured right after it (the median run by
that ratio is reported). Reports requests/s, p50/p99 latency,
errors, the time the service takes to start, and its memory beyond the index: the
proportional set size (PSS) of its processes after the load, without the index's
own files mapped (page cache), less the RAM the index takes in each worker and less
the PSS of the same service over a 1000-item index (Python, the libraries).

Writes docs/benchmarks/service.md. Not a test: speeds depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from fixtures.synthetic_vectors import write_synthetic_embeddings  # noqa: E402

BIN = os.path.dirname(sys.executable)
CONNECTIONS = 32
SECONDS = 20
WARM_UP_SECONDS = 5
WORKERS = os.cpu_count() or 1

BY_ID = """
local ids = {}
for line in io.lines("%(ids)s") do ids[#ids + 1] = line end
request = function()
  return wrk.format("GET", "/v1/neighbors/" .. ids[math.random(#ids)] .. "?k=10")
end
"""
BY_BODY = """
local bodies = {}
for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
request = function()
  return wrk.format(nil, "%(path)s", nil, bodies[math.random(#bodies)])
end
"""
BY_FILE = """
local file = io.open("%(body)s", "rb")
local body = file:read("*a")
file:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=imgembedbench"
wrk.body = body
wrk.path = "%(path)s"
"""


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(prefix + ["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [process for child in children for process in descendants(int(child))]


# The index's own files; the other files of a version folder hold per-item state.
INDEX_FILES = ("index.faiss", "index.ivfdata")


def memory(pid: int, version_dir: str) -> dict[str, int]:
    """PSS of a process and its descendants (the supervisor and its workers; pages
    the workers share count once in all), in bytes: ``own`` (heap, anonymous memory,
    libraries), ``index_files`` and ``item_files`` (the version folder's files
    mapped: page cache, which the kernel can reclaim)."""
    totals = {"own": 0, "index_files": 0, "item_files": 0}
    folder = os.path.realpath(version_dir)
    for process in descendants(pid):
        try:
            with open(f"/proc/{process}/smaps") as smaps:
                text = smaps.read()
        except OSError:  # ended meanwhile
            continue
        part = "own"
        for line in text.splitlines():
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                path = fields[5] if len(fields) > 5 else ""
                if os.path.dirname(path) != folder:
                    part = "own"
                else:
                    part = "index_files" if os.path.basename(path) in INDEX_FILES else "item_files"
            elif fields[0] == "Pss:":
                totals[part] += int(fields[1]) * 1024
    return totals


def index_ram_per_process(index: str) -> int:
    """The anonymous memory that opening the index as the service does takes in one
    process: the parts faiss cannot memory-map (fast-scan PQ lists, the coarse
    quantizer), which every worker holds a copy of."""
    code = (
        "import re, sys\n"
        "def anonymous():\n"
        "    text = open('/proc/self/smaps_rollup').read()\n"
        "    return int(re.search(r'^Anonymous:\\s+(\\d+)', text, re.M).group(1)) * 1024\n"
        "from imgembed.index import store\n"
        "store.current_version(sys.argv[1])  # imports Beam's FileSystems, ~100 MiB\n"
        "before = anonymous()\n"
        "loaded = store.load(sys.argv[1], mmap=True)\n"
        "print(anonymous() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, index], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


class Server:
    def __init__(self, index: str, workers: int = WORKERS):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [os.path.join(BIN, "imgembed"), "serve", "--index", index, "--port", str(self.port)]
            + ["--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.perf_counter() - started > 600:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.start_seconds = time.perf_counter() - started
        # Every worker answers (not only the first one up).
        for _ in range(20 * workers):
            httpx.get(f"{self.url}/health", timeout=5)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def wrk(url: str, script: str, work: str, name: str, seconds: int = SECONDS) -> dict:
    path = os.path.join(work, f"{name}.lua")
    with open(path, "w") as file:
        file.write(script)
    command = [ensure_wrk(), "-t1", f"-c{CONNECTIONS}", "--latency", "-s", path, url]
    # The same load first, not counted: the pages of the memory-mapped index and
    # items a query touches come from disk the first time (p99 600 ms by id, cold).
    subprocess.run(command + [f"-d{WARM_UP_SECONDS}s"], capture_output=True, check=True)
    text = subprocess.run(command + [f"-d{seconds}s"], capture_output=True, text=True, check=True).stdout

    def latency(percentile: str) -> float:
        value, unit = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests_per_sec": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
    }


def build_index(folder: str, count: int, dim: int, max_memory: str, work: str) -> str:
    embeddings = os.path.join(work, f"synthetic-{count}x{dim}")
    if not os.path.isdir(embeddings):
        write_synthetic_embeddings(embeddings, count=count, dim=dim, files=max(1, count // 250_000))
    index = os.path.join(work, f"index-{count}x{dim}-{max_memory}")
    if not os.path.exists(os.path.join(index, "CURRENT")):
        subprocess.run(
            [os.path.join(BIN, "imgembed"), "index", "--embeddings", embeddings, "--output", index]
            + ["--max-memory", max_memory, "--no-near-duplicates", "--overwrite"],
            check=True,
        )
    return index


def sample_rows(index: str, count: int = 10_000) -> tuple[list[str], np.ndarray]:
    """Ids of random indexed items, and their raw embeddings with a little noise: a
    query "like this one", as users send them (a random vector lies far from every
    item, and probes lists unlike real queries do)."""
    from imgembed.index import store
    from imgembed.index.reader import EmbeddingSource

    loaded = store.load(index, mmap=True)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(loaded.count, size=min(count, loaded.count), replace=False))
    ids = [row["id"] for row in loaded.items.describe([int(r) for r in rows], ("id",))]
    source = EmbeddingSource.from_files([file for part in loaded.manifest["parts"] for file in part["files"]])
    vectors = source.take(rows[:200])
    noise = rng.normal(size=vectors.shape).astype(np.float32)
    scale = (
        0.1 * np.linalg.norm(vectors, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    )
    return ids, vectors + scale * noise


def multipart(image: str) -> bytes:
    with open(image, "rb") as file:
        data = file.read()
    return (
        b'--imgembedbench\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--imgembedbench--\r\n"
    )


def model_images_per_sec(index: str) -> float:
    """The index's model alone, one image at a time, one thread per core on every core:
    what the service's workers can do at most."""
    code = (
        "import sys, time, numpy as np\n"
        "from imgembed.index import store\n"
        "from imgembed.models.loading import load_model\n"
        "from imgembed.models.registry import ModelSpec\n"
        "loaded = store.load(sys.argv[1], mmap=True)\n"
        "model = load_model(ModelSpec.from_metadata(loaded.manifest['model']), threads=1)\n"
        "size = model.spec.image_size\n"
        "pixels = np.zeros([1, size, size, 3], np.uint8)\n"
        "for _ in range(20): model.embed_pixels(pixels)\n"
        "started = time.perf_counter()\n"
        "for _ in range(300): model.embed_pixels(pixels)\n"
        "print(300 / (time.perf_counter() - started))\n"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", code, index], stdout=subprocess.PIPE, text=True)
        for _ in range(WORKERS)
    ]
    return sum(float(run.communicate()[0].split()[-1]) for run in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default=None, help="an index to serve (default: build a synthetic one)")
    parser.add_argument("--count", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--max-memory", default="1G")
    parser.add_argument("--image", default=None, help="the JPEG uploaded by image queries")
    parser.add_argument(
        "--image-index",
        default=None,
        help="an index built from images, for the by-image queries (default: --index, if built from images)",
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs of each query kind (the median is reported)"
    )
    parser.add_argument("--seconds", type=int, default=SECONDS)
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "service.md"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="imgembed-load-")
    os.makedirs(work, exist_ok=True)
    index = args.index or build_index(work, args.count, args.dim, args.max_memory, work)
    baseline_index = build_index(work, 1000, args.dim, args.max_memory, work)

    from imgembed.index import store

    baseline = Server(baseline_index)
    baseline_memory = memory(baseline.process.pid, store.live_dir(baseline_index))
    baseline.stop()

    server = Server(index)
    loaded = store.load(index, mmap=True)
    count, dim, kind = (
        loaded.count,
        int(loaded.manifest["embedding_dimension"]),
        loaded.manifest["index"]["factory"],
    )
    ids, vectors = sample_rows(index)
    ids_file = os.path.join(work, "ids.txt")
    with open(ids_file, "w") as file:
        file.write("\n".join(ids) + "\n")
    bodies_file = os.path.join(work, "bodies.txt")
    with open(bodies_file, "w") as file:
        for vector in vectors:
            file.write(json.dumps({"vectors": [[round(float(v), 6) for v in vector]], "k": 10}) + "\n")

    def measure(url: str, script: str, name: str, model_index: str | None = None) -> dict:
        """The median of ``--runs`` runs, with the range of all, by requests/s. With
        ``model_index``, each run is set against that index's model alone, measured
        right after it, and the median is by that ratio: this machine's speed drifts
        (the model alone: 157 to 179 images/s within ten minutes), more than the
        service's own overhead."""
        runs = []
        for _ in range(args.runs):
            run = wrk(url, script, work, name, args.seconds)
            if model_index:
                alone = model_images_per_sec(model_index)
                run |= {"model_images_per_sec": alone, "of_model": run["requests_per_sec"] / alone}
            runs.append(run)
        runs.sort(key=lambda run: run["of_model" if model_index else "requests_per_sec"])
        return {
            **runs[len(runs) // 2],
            "runs_requests_per_sec": [run["requests_per_sec"] for run in runs],
            "runs_of_model": [run["of_model"] for run in runs] if model_index else None,
            "errors": sum(r["errors"] for r in runs),
        }

    results = {
        "by id": measure(server.url, BY_ID % {"ids": ids_file}, "by_id"),
        "by vector": measure(
            server.url,
            BY_BODY % {"bodies": bodies_file, "content_type": "application/json", "path": "/v1/search"},
            "by_vector",
        ),
    }
    served_memory = memory(server.process.pid, store.live_dir(index))
    server.stop()
    image_index = args.image_index or (index if loaded.manifest.get("preprocessing") else None)
    if image_index:
        image = args.image or default_image(work)
        body = os.path.join(work, "image-body.bin")
        with open(body, "wb") as file:
            file.write(multipart(image))
        image_server = Server(image_index)
        results["by image"] = measure(
            image_server.url,
            BY_FILE % {"body": body, "path": "/v1/search/image?k=10"},
            "by_image",
            model_index=image_index,
        )
        image_server.stop()
    index_ram = index_ram_per_process(index)
    # What the service holds for its items: its own memory and the per-item files it
    # mapped, less the same service's over 1000 items and less each worker's copy of
    # the index's RAM.
    beyond = (
        served_memory["own"]
        + served_memory["item_files"]
        - baseline_memory["own"]
        - baseline_memory["item_files"]
        - WORKERS * index_ram
    ) / count
    summary = {
        "index": kind,
        "count": count,
        "dimension": dim,
        "workers": WORKERS,
        "start_seconds": round(server.start_seconds, 2),
        "memory_bytes": served_memory,
        "baseline_memory_bytes": baseline_memory,
        "index_ram_bytes_per_worker": index_ram,
        "bytes_per_item_beyond_index": round(beyond, 1),
        "image_index": image_index,
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    write_markdown(args.output, summary, " ".join(sys.argv[1:]))
    failed = sum(result["errors"] for result in results.values())
    return 1 if failed else 0


def default_image(work: str) -> str:
    """A 320x240 photo-like JPEG, as a phone would send one resized."""
    from fixtures.images import photo_like

    path = os.path.join(work, "query.jpg")
    photo_like(3, 320, 240).save(path, "JPEG", quality=90)
    return path


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def write_markdown(path: str, summary: dict, command: str) -> None:
    own, items = summary["memory_bytes"]["own"], summary["memory_bytes"]["item_files"]
    base_own, base_items = (summary["baseline_memory_bytes"][part] for part in ("own", "item_files"))
    lines = [
        "# Service load test",
        "",
        f"`imgembed serve` ({summary['workers']} worker processes) over {summary['count']:,} vectors of "
        f"{summary['dimension']} dimensions ({summary['index']}), driven by wrk on the same machine: "
        f"{CONNECTIONS} connections, k=10, each run after {WARM_UP_SECONDS} s of the same load that is not "
        f"counted. Command: `python bench/load_test.py {command}`".rstrip(),
        "",
        "| query | requests/s (median run) | p50 ms | p99 ms | requests | errors (all runs) | requests/s of each run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in summary["results"].items():
        each = ", ".join(f"{rate:,.0f}" for rate in result["runs_requests_per_sec"])
        lines.append(
            f"| {name} | {result['requests_per_sec']:,.0f} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} | "
            f"{result['requests']:,} | {result['errors']} | {each} |"
        )
    lines += [
        "",
        f"- start-up (process start to the first answer of /health): {summary['start_seconds']} s",
        f"- memory beyond the index: {summary['bytes_per_item_beyond_index']} bytes per item, of which "
        f"{(items - base_items) / summary['count']:.1f} are per-item files mapped (page cache): the "
        f"service's own memory and the per-item files it mapped ({mib(own)} + {mib(items)}, PSS after the "
        f"load) less the same service's over 1000 items ({mib(base_own)} + {mib(base_items)}) and less "
        f"{summary['workers']} x the {mib(summary['index_ram_bytes_per_worker'])} of RAM the index takes in "
        "each worker",
        f"- the index's files mapped: {mib(summary['memory_bytes']['index_files'])} of page cache, "
        "shared by the workers (the kernel maps what queries touch, and can take it back)",
    ]
    by_image = summary["results"].get("by image")
    if by_image:
        each = ", ".join(f"{ratio:.2f}" for ratio in by_image["runs_of_model"])
        lines.append(
            f"- by image: {by_image['of_model']:.2f} of the model's own images/s (the median run: "
            f"{by_image['requests_per_sec']:.0f} against {by_image['model_images_per_sec']:.0f} images/s of the "
            "model alone, one thread per core on every core, measured right after that run; each run: "
            f"{each}), over {summary['image_index']}"
        )
    lines.append("")
    with open(path, "w") as file:
        file.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
