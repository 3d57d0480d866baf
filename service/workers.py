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
restarting it again would only hide the fault. A worker whose event loop stops
turning (its heartbeat, written by every tick of uvicorn's loop, is HUNG_SECONDS
old) is killed and replaced too, as gunicorn's arbiter does.

A connection gets HEADER_SECONDS to send its request line and headers
(``TimelyHttp``), and an idle kept-alive one uvicorn's keep-alive timeout: a
client that opens connections and sends nothing, or a byte at a time, does not
hold them for good.
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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
# A worker whose loop has not ticked for this long is hung (--worker-timeout); one
# that has not ticked yet is still loading its index for at most STARTUP_SECONDS.
HUNG_SECONDS = 30.0
STARTUP_SECONDS = 600
# A request's line and headers must arrive within this many seconds.
HEADER_SECONDS = 10


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


class TimelyHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request line and headers
    have not all arrived HEADER_SECONDS after it opened or after its request began
    (uvicorn itself waits for them for ever)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def on_message_begin(self):
        super().on_message_begin()
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def on_headers_complete(self):
        self._stop_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc):
        self._stop_header_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self):
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self):
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _BeatingServer(uvicorn.Server):
    """uvicorn's server, writing the time into ``heartbeat`` at every tick of its
    loop (ten a second): a loop that is stuck stops writing it."""

    def __init__(self, config: uvicorn.Config, heartbeat):
        super().__init__(config)
        self._heartbeat = heartbeat

    async def on_tick(self, counter: int) -> bool:
        self._heartbeat.value = time.monotonic()
        return await super().on_tick(counter)


def _serve(listener: socket.socket, config: dict, heartbeat) -> None:
    """One worker: uvicorn's server on its own socket (it stops on SIGINT or SIGTERM)."""
    _BeatingServer(uvicorn.Config(**config), heartbeat).run(sockets=[listener])


def run(config: dict, sockets: list[socket.socket], hung_seconds: float = HUNG_SECONDS) -> int:
    """Serves ``uvicorn.Config(**config)`` with one worker per socket until SIGINT or
    SIGTERM, replacing a worker that dies. Returns 1 if a worker could not start, or
    kept dying as soon as it started (the reason is on stderr), 0 otherwise."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def start(listener: socket.socket):
        heartbeat = _SPAWN.Value("d", 0.0, lock=False)  # seconds (monotonic) of its loop's last tick
        worker = _SPAWN.Process(target=_serve, args=(listener, config, heartbeat), daemon=True)
        worker.start()
        return worker, time.monotonic(), heartbeat

    workers = [start(listener) for listener in sockets]
    early_deaths = [0] * len(sockets)
    failed = False
    while not stop.wait(0.5):
        for slot, (worker, started, heartbeat) in enumerate(workers):
            if worker.is_alive():
                _kill_if_hung(worker, started, heartbeat.value, hung_seconds)
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
    for worker, _, _ in workers:
        if worker.is_alive():
            worker.terminate()
    for worker, _, _ in workers:
        worker.join(STOP_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join()
    return 1 if failed else 0


def _kill_if_hung(worker, started: float, last_tick: float, hung_seconds: float) -> None:
    now = time.monotonic()
    stuck = now - last_tick > hung_seconds if last_tick else now - started > STARTUP_SECONDS
    if stuck:
        what = (
            f"answered nothing for {hung_seconds:g} s"
            if last_tick
            else f"did not start in {STARTUP_SECONDS} s"
        )
        _say(f"worker {worker.pid} {what}; killing it")
        worker.kill()
        worker.join()


def _death(exitcode: int) -> str:
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _say(message: str) -> None:
    print(f"imgembed serve: {message}", file=sys.stderr, flush=True)
