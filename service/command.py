"""``imgembed serve``: the search service and its web page over an index folder.

    imgembed serve --index out/index            # http://127.0.0.1:8000/ (docs at /docs)

Several worker processes (``--workers``, default one per core) share the index's
memory-mapped files; each follows the index's live version (a new build or
``imgembed index --add`` is served within --reload-seconds, without a failed
request). HTTP is uvicorn's with httptools and uvloop; each worker accepts on its
own socket (service/workers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile

from imgembed.common.units import parse_size
from imgembed.index.vectors import IndexInputError
from imgembed.service.searcher import Limits

# How a worker process learns what to serve: uvicorn starts workers from an import
# string, so the settings travel in the environment.
SETTINGS_VARIABLE = "IMGEMBED_SERVE_SETTINGS"
# faiss's threshold for searching flat vectors with BLAS (it compares queries x d).
BLAS_FROM = 4096


def parser() -> argparse.ArgumentParser:
    defaults = Limits()
    p = argparse.ArgumentParser(prog="imgembed serve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--index", required=True, help="Index folder written by `imgembed index` (local or gs://)."
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)."
    )
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="Worker processes (default: one per core)."
    )
    p.add_argument(
        "--reload-seconds",
        type=float,
        default=2.0,
        help="How often each worker checks for a new live version of the index (default 2).",
    )
    p.add_argument(
        "--max-k",
        type=int,
        default=defaults.max_k,
        help=f"Most neighbours a request may ask for ({defaults.max_k}).",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help=f"Most vectors in one search ({defaults.max_batch}).",
    )
    p.add_argument("--max-upload-bytes", default="10MiB", help="Largest uploaded image (10MiB).")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=30.0,
        help="A worker whose event loop has not turned for this many seconds is killed and replaced (30).",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help=f"Largest decoded upload ({defaults.max_image_pixels}).",
    )
    return p


def app_from_environment():
    """The app of one worker process (uvicorn's factory)."""
    import faiss

    from imgembed.service.app import create_app
    from imgembed.service.searcher import LiveIndex

    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    # Requests run side by side in the workers already; faiss's own threads on top
    # of them would oversubscribe the cores and raise tail latency. (Thread-local in
    # OpenMP: the other threads of the worker get theirs from OMP_NUM_THREADS, main().)
    faiss.omp_set_num_threads(1)
    # Queries arrive in batches of a few to a few dozen (service/batching.py); a flat
    # coarse quantizer is then cheapest as one matrix product, which faiss 1.15 only
    # uses from 128,000 (125 queries of 1024-d): 8 queries of 2,048 lists x 1024-d
    # cost 0.14 ms each through BLAS against 0.33 without.
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM
    limits = Limits(**settings["limits"])
    live = LiveIndex(settings["index"], limits, image_threads=settings["image_threads"])
    live.watch(settings["reload_seconds"])
    app = create_app(live)
    # What is loaded by now lives as long as the worker. Frozen, it is left out of
    # the collector's full passes, which otherwise walk all of it while requests wait.
    gc.freeze()
    return app


def give_back_freed_memory() -> None:
    """Returns what was freed to the system. The supervisor only opens the index to
    check it; glibc keeps the freed heap (the lists of a fast-scan index, made of
    many small blocks) for reuse, which the supervisor never has: 218 MiB at 5M items."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from imgembed.service import workers
    from imgembed.service.searcher import LiveIndex

    try:
        limits = Limits(args.max_k, args.max_batch, parse_size(args.max_upload_bytes), args.max_image_pixels)
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if args.worker_timeout <= 0:
            raise ValueError(f"--worker-timeout must be positive, got {args.worker_timeout}")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be a TCP port, 0 to 65535, got {args.port}")
        # Opened once here first: a bad index stops the command with one line, not every worker.
        checked = LiveIndex(args.index, limits, load_image_model=False)
        sockets = workers.listening_sockets(args.host, args.port, args.workers)
    except (IndexInputError, ValueError, workers.CannotListenError) as error:
        print(f"imgembed serve: {error}", file=sys.stderr)
        return 2
    # Image queries take one core each at a time, shared out between the workers.
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    os.environ[SETTINGS_VARIABLE] = json.dumps(
        {
            "index": args.index,
            "limits": dataclasses.asdict(limits),
            "image_threads": threads,
            "reload_seconds": args.reload_seconds,
        }
    )
    print(
        f"Serving {checked.current.count:,} images from {args.index} on http://{args.host}:{sockets[0].getsockname()[1]}/ "
        f"({args.workers} worker{'s' if args.workers > 1 else ''})",
        flush=True,
    )
    del checked
    give_back_freed_memory()
    # For every thread of the workers (the search thread, service/batching.py, and the
    # image queries' threads): omp_set_num_threads() sets only the calling thread's
    # count, so the search thread ran faiss on two OpenMP threads whose spinning took
    # as much CPU as the search itself (wrk by id: 1,250 requests/s).
    os.environ["OMP_NUM_THREADS"] = "1"
    config = {
        "app": "imgembed.service.command:app_from_environment",
        "factory": True,
        "http": workers.TimelyHttp,
        "loop": "uvloop",
        "log_level": "warning",
        "access_log": False,
    }
    # Every worker's metrics in files of one folder, summed by whichever worker is
    # scraped (service/app.py); set before any worker imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="imgembed-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return workers.run(config, sockets, hung_seconds=args.worker_timeout)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
