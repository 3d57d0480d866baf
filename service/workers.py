"""Worker processes that each accept connections on their own socket.

uvicorn's ``--workers`` hands one listening socket to every worker, and the worker
that wakes first accepts every connection waiting. Under wrk's 32 connections half
the runs put all of them on one worker: by id 1,500 requests/s against 2,650 when
they split. Here each worker listens on its own socket, bound with SO_REUSEPORT to
the same address, and the kernel spreads new connections over the sockets by a hash
of the client's address and port.

The price: a connection waits for the worker the kernel dealt it to, even while
another is idle (nginx's `reuseport` makes the same trade). Requests here take
milliseconds, and image queries run in each worker's thread pool, so a worker
stays responsive.

The sockets are made here, in the supervisor, and outlive their workers:
connections that reach a worker's socket while it restarts wait in the socket's
backlog for the replacement. A worker that dies is reported and replaced; one
that keeps dying right after it starts (CRASH_LOOP_*) stops the service, since
restarting it again would only hide the fault.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
import threading
import time

import uvicorn
from uvicorn.config import STARTUP_FAILURE

# Sockets travel to the spawned workers pickled (as uvicorn's own supervisor sends them).
multiprocessing.allow_connection_pickling()
# A fresh interpreter per worker: the supervisor has faiss loaded, and forking a
# process with OpenMP's threads running can leave the child with held locks.
_SPAWN = multiprocessing.get_context("spawn")
BACKLOG = 2048  # uvicorn's default
STOP_SECONDS = 30  # a worker still busy this long after SIGTERM is killed
# A worker that dies within CRASH_LOOP_SECONDS of starting, CRASH_LOOP_DEATHS times
# running, has a fault that another restart will not fix.
CRASH_LOOP_SECONDS = 30
CRASH_LOOP_DEATHS = 5


class CannotListenError(OSError):
    pass


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets listening on host:port, the kernel balancing between them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Without SO_REUSEPORT first: it fails when anything else listens there,
    # another `imgembed serve` included, which would otherwise share the port.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise CannotListenError(f"cannot listen on {host}:{port}: {error.strerror}") from error
        port = probe.getsockname()[1]  # a port of 0 chooses one, the same for all
    sockets = []
    for _ in range(count):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(BACKLOG)
        sockets.append(listener)
    return sockets


def _serve(listener: socket.socket, config: dict) -> None:
    """One worker: uvicorn's server on its own socket (it stops on SIGINT or SIGTERM)."""
    uvicorn.Server(uvicorn.Config(**config)).run(sockets=[listener])


def run(config: dict, sockets: list[socket.socket]) -> int:
    """Serves ``uvicorn.Config(**config)`` with one worker per socket until SIGINT or
    SIGTERM, replacing a worker that dies. Returns 1 if a worker could not start, or
    kept dying as soon as it started (the reason is on stderr), 0 otherwise."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def start(listener: socket.socket):
        worker = _SPAWN.Process(target=_serve, args=(listener, config), daemon=True)
        worker.start()
        return worker, time.monotonic()

    workers = [start(listener) for listener in sockets]
    early_deaths = [0] * len(sockets)
    failed = False
    while not stop.wait(0.5):
        for slot, (worker, started) in enumerate(workers):
            if worker.is_alive():
                continue
            if worker.exitcode == STARTUP_FAILURE:  # the app cannot load: every restart would fail alike
                failed = True
                break
            early_deaths[slot] = (
                early_deaths[slot] + 1 if time.monotonic() - started < CRASH_LOOP_SECONDS else 0
            )
            if early_deaths[slot] >= CRASH_LOOP_DEATHS:
                _say(
                    f"a worker died {early_deaths[slot]} times running within {CRASH_LOOP_SECONDS} s "
                    f"of starting (the last {_death(worker.exitcode)}); stopping"
                )
                failed = True
                break
            _say(f"worker {worker.pid} {_death(worker.exitcode)}; starting another")
            workers[slot] = start(sockets[slot])
        if failed:
            break
    for worker, _ in workers:
        if worker.is_alive():
            worker.terminate()
    for worker, _ in workers:
        worker.join(STOP_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join()
    return 1 if failed else 0


def _death(exitcode: int) -> str:
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _say(message: str) -> None:
    print(f"imgembed serve: {message}", file=sys.stderr, flush=True)
