"""How soon an uploaded image can be searched: `imgembed watch` on a real
GCS-protocol server, measured from outside.

    .venv/bin/python bench/watch_latency.py                  # 5 images/s for 180 s, real weights
    .venv/bin/python bench/watch_latency.py --rate 2 --seconds 60 --no-kill

A GCS-protocol server (gcp-storage-emulator, as the tests start it) holds the
inputs, the embeddings and the index. `imgembed watch` keeps them in step and
`imgembed serve` answers from the index. JPEGs are uploaded at --rate a second;
a poller asks the service for each uploaded image by id (GET /v1/items/<id>, as
a user would) until it answers 200. The latency of an image is from the end of
its upload to its first 200. Halfway through, the watcher and its workers are
SIGKILLed and started again (--no-kill: not). At the end every upload must be
searchable, each exactly once in the embeddings and in the index, with no
request answered >= 500.

Prints the figures as JSON and writes docs/benchmarks/watch.md. Not a test (the
test suite runs the same trial, small, in tests/test_growing_corpus.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from fixtures.images import photo_like  # noqa: E402

BIN = os.path.dirname(sys.executable)
POLL_SECONDS = 0.5  # the gap between two asks for one pending image


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    photo_like(seed, 320, 240).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@contextlib.contextmanager
def started(command: list[str], log: pathlib.Path):
    """A process in a session of its own (its workers die with it), output to ``log``."""
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)


class Poller:
    """Asks the service for every uploaded image until it is found; notes when."""

    def __init__(self, url: str):
        import httpx

        self._client = httpx.Client(base_url=url, timeout=30)
        self._pending: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.found: dict[str, float] = {}  # id -> seconds from upload to searchable
        self.statuses: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def uploaded(self, image_id: str, at: float) -> None:
        with self._lock:
            self._pending[image_id] = at

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending.items())
            started = time.monotonic()
            for image_id, uploaded in pending:
                response = self._client.get(f"/v1/items/{image_id}")
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    with self._lock:
                        del self._pending[image_id]
                    self.found[image_id] = time.monotonic() - uploaded
            self._stop.wait(max(0.05, POLL_SECONDS - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


def trial(
    gcs,
    work: pathlib.Path,
    model: str,
    rate: float,
    seconds: float,
    kill: bool,
    interval: float = 5.0,
    first: int = 20,
) -> dict:
    """Uploads ``first`` images, starts the watcher and, once it built the index, the
    service; then uploads ``rate`` images a second for ``seconds`` (the watcher
    SIGKILLed and restarted halfway with ``kill``) and polls for each. Returns the
    figures; raises if an upload was never found."""
    from imgembed.common import storage
    from imgembed.common.embedding_files import embeddings_glob, image_id
    from imgembed.index import store
    from tests.servers import free_port

    root = gcs.url(f"watch-{os.getpid()}-{int(time.time())}")
    inputs, output, index = (storage.join(root, name) for name in ("in", "out", "index"))
    watch = [os.path.join(BIN, "imgembed"), "watch", f"--input={inputs}", f"--output={output}"]
    watch += [f"--index={index}", f"--interval={interval}", f"--model={model}", "--files-per-shard=100"]
    seed = 0

    def upload(poller: Poller | None) -> None:
        nonlocal seed
        path = storage.join(inputs, f"{seed:06d}.jpg")
        storage.write_bytes(path, jpeg(seed))
        seed += 1
        if poller is not None:
            poller.uploaded(image_id(path), time.monotonic())

    for _ in range(first):
        upload(None)
    log = work / "watch.log"
    kills = 0
    watcher = contextlib.ExitStack()
    process = watcher.enter_context(started(watch, log))
    wait_for(lambda: store.exists(index), 600, "the first index")
    port = free_port()
    serve = [os.path.join(BIN, "imgembed"), "serve", f"--index={index}", f"--port={port}"]
    serve += ["--workers=1", "--reload-seconds=0.5"]
    with started(serve, work / "serve.log") as service:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), 300, "the service")
        poller = Poller(url)
        began = time.monotonic()
        count = 0
        while time.monotonic() - began < seconds:
            upload(poller)
            count += 1
            if kill and not kills and time.monotonic() - began >= seconds / 2:
                os.killpg(process.pid, signal.SIGKILL)  # the watcher and its Beam workers, mid-cycle
                process.wait()
                kills += 1
                watcher.close()
                watcher = contextlib.ExitStack()
                process = watcher.enter_context(started(watch, log))
            time.sleep(max(0.0, began + count / rate - time.monotonic()))
        try:
            wait_for(lambda: poller.waiting == 0, 300, "every upload searchable")
        finally:
            poller.stop()
            watcher.close()
        assert service.poll() is None, "the service died"
    latencies = sorted(poller.found.values())
    table = _read_embeddings(embeddings_glob(storage.join(output, _model_folder(output))))
    uris = table.column("uri").to_pylist()
    manifest = store.load(index).manifest
    return {
        "uploads": count + first,
        "polled": count,  # the uploads after the service started
        "rate_per_second": rate,
        "seconds": seconds,
        "watcher_killed": kills,
        "searchable": len(latencies),
        "latency_p50_s": round(_quantile(latencies, 0.5), 1),
        "latency_p95_s": round(_quantile(latencies, 0.95), 1),
        "latency_max_s": round(latencies[-1], 1),
        "requests": sum(poller.statuses.values()),
        "responses_5xx": sum(n for status, n in poller.statuses.items() if status >= 500),
        "rows": len(uris),
        "duplicate_rows": len(uris) - len(set(uris)),
        "index_count": manifest["count"],
        "cycles": sum(1 for line in log.read_text().splitlines() if line.startswith("cycle ")),
        "failed_cycles": sum(1 for line in log.read_text().splitlines() if "FAILED" in line),
    }


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _quantile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))]


def _model_folder(output: str) -> str:
    from imgembed.common import storage

    return json.loads(storage.read_bytes(storage.join(output, "run_summary.json")))["models"][0]["model"]


def _read_embeddings(pattern: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgembed.common import storage

    return pa.concat_tables(
        pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in storage.list_files(pattern)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5.0, help="Images uploaded a second (5).")
    parser.add_argument("--seconds", type=float, default=180.0, help="How long uploads go on (180).")
    parser.add_argument("--interval", type=float, default=5.0, help="The watcher's --interval (5).")
    parser.add_argument("--model", default="mobilenet_v1_100_224_embedded", help="The watcher's --model.")
    parser.add_argument("--no-kill", action="store_true", help="Do not SIGKILL the watcher halfway.")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "watch.md"))
    args = parser.parse_args()
    from tests.gcs import gcs_server

    with tempfile.TemporaryDirectory(prefix="imgembed-watch-") as folder:
        work = pathlib.Path(folder)
        os.environ["IMGEMBED_CACHE_DIR"] = str(work / "cache")
        with gcs_server(work) as gcs:
            os.environ.update(gcs.env)
            figures = trial(gcs, work, args.model, args.rate, args.seconds, not args.no_kill, args.interval)
    print(json.dumps(figures, indent=2))
    write_doc(args.output, figures, args)
    return 0


def write_doc(path: str, figures: dict, args) -> None:
    command = f".venv/bin/python bench/watch_latency.py --rate {args.rate:g} --seconds {args.seconds:g}"
    command += f" --interval {args.interval:g} --model {args.model}" + (" --no-kill" if args.no_kill else "")
    rows = "\n".join(f"| {name} | {value} |" for name, value in figures.items())
    pathlib.Path(path).write_text(
        "# Watch: from upload to searchable\n\n"
        f"`{command}` (generated by it; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores).\n\n"
        "Inputs, embeddings and index on a GCS-protocol server on loopback; `imgembed watch` and "
        "`imgembed serve` on the same machine; latency from the end of an upload to the service's "
        "first 200 for that image's id.\n\n"
        f"| figure | value |\n|---|---|\n{rows}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
