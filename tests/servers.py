"""Starts the real `imgembed serve` on a free loopback port for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

BIN = os.path.dirname(sys.executable)
START_TIMEOUT_SECS = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(index_dir, *flags: str, log_path=None):
    """Yields the base URL once /health answers; stops the server afterwards. Its
    output goes to ``log_path`` when given."""
    port = free_port()
    # Its log goes to a file: a pipe nobody reads would fill up and stall the server.
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [os.path.join(BIN, "imgembed"), "serve", "--index", str(index_dir), "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_SECS
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {START_TIMEOUT_SECS} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def child_processes(pid: int) -> list[int]:
    """The worker processes ``pid`` spawned (multiprocessing's spawn_main children)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listed:
            children += [int(child) for child in listed.read().split()]
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    workers.append(child)
        except FileNotFoundError:
            pass
    return workers


def connections_by_process(port: int) -> dict[int, int]:
    """How many established TCP connections to local ``port`` each process holds,
    read from /proc as `ss -tnp` would: which worker accepted what."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local_port, state = int(fields[1].rsplit(":", 1)[1], 16), fields[3]
                if local_port == port and state == "01":  # ESTABLISHED, server side
                    inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            held = sum(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # ended meanwhile, or not ours
            continue
        if held:
            counts[int(pid)] = held
    return counts
