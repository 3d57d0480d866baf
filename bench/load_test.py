"""Load test of a running `imgembed serve`: by-vector and by-image queries from
concurrent clients, bounded in requests and time, loopback only.

    .venv/bin/imgembed serve --index out/index &
    .venv/bin/python bench/load_test.py --url http://127.0.0.1:8000 --markdown docs/benchmarks/service.md

Prints, for each kind, requests completed, errors, queries per second and p50/p99
latency. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import pathlib
import sys
import threading
import time
import urllib.parse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def default_image() -> str:
    import importlib.metadata

    folder = importlib.metadata.distribution("scikit-image").locate_file("skimage/data")
    return sorted(glob.glob(f"{folder}/chelsea.png"))[0]


def run_kind(url: str, kind: str, requests: int, clients: int, seconds: float, payload) -> dict:
    latencies: list[float] = []
    errors = 0
    issued = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop():
        nonlocal issued, errors
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    issued += 1
                started = time.perf_counter()
                try:
                    response = payload(http)
                    failed = response.status_code != 200
                except httpx.HTTPError:
                    failed = True
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    errors += failed

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {
        "kind": kind,
        "clients": clients,
        "completed": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "qps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=2000, help="per kind (default 2000)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120, help="time limit per kind (default 120)")
    parser.add_argument("--image", default=None, help="image to upload (default: scikit-image's chelsea.png)")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--markdown", default=None, help="write results as a markdown table here")
    args = parser.parse_args()
    host = urllib.parse.urlparse(args.url).hostname
    if host not in LOOPBACK:
        print(f"load_test: refusing {args.url}: loopback only", file=sys.stderr)
        return 2
    health = httpx.get(f"{args.url}/health", timeout=30).json()
    vectors = np.random.default_rng(0).random((64, health["dimension"])).astype(np.float32).tolist()
    counter = iter(range(10**9))
    image = pathlib.Path(args.image or default_image()).read_bytes()

    def by_vector(http):
        return http.post("/v1/search", json={"vectors": [vectors[next(counter) % 64]], "k": 10})

    def by_image(http):
        return http.post("/v1/search/image", files={"image": image}, params={"k": 10})

    results = [
        run_kind(args.url, "vector", args.requests, args.clients, args.seconds, by_vector),
        run_kind(args.url, "image", args.requests, args.clients, args.seconds, by_image),
    ]
    for result in results:
        print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    if args.markdown:
        lines = [
            "# Service load test",
            "",
            f"{health['count']:,} images, model {health['model']}, index served by `imgembed serve` on loopback; "
            f"{args.clients} concurrent clients, k=10.",
            "",
            f"Command: `python bench/load_test.py --url {args.url} --requests {args.requests} "
            f"--clients {args.clients}`",
            "",
            "| query | clients | requests | errors | QPS | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| by {r['kind']} | {r['clients']} | {r['completed']} | {r['errors']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} |"
            for r in results
        ]
        with open(args.markdown, "w") as file:
            file.write("\n".join(lines) + "\n")
    return 1 if any(result["errors"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
