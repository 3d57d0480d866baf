"""A real Dask cluster for the tests, as users start one: `dask scheduler` and
`dask worker` processes from the command line, each worker in a mount namespace
of its own with a private /tmp (tests/beam_workers.py), so that a path of the
launcher's disk fails on the workers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from imgembed.common.runners import DASK_RUNNER, NO_DASK_PROFILER
from tests.beam_workers import isolated, wait_for_port
from tests.servers import free_port

BIN = os.path.dirname(sys.executable)
START_SECONDS = 120
# As scripts/dask_cluster.sh starts workers: without the statistical profiler, whose
# sys._current_frames() every 10 ms deadlocks a worker now and then on CPython 3.11
# (gh-106883; the scheduler restarts it only after worker-ttl, 5 minutes).
NO_PROFILER = dict([NO_DASK_PROFILER.split("=")])
NANNY_SAYS_ENDED = r"Worker process (\d+) (was killed by signal \d+|exited with status \d+)"


@dataclasses.dataclass
class DaskCluster:
    address: str
    workers: list[subprocess.Popen]  # each the session of a `dask worker` (its nanny and worker)
    logs: list  # what the scheduler, then each worker's nanny and worker, printed

    @property
    def runner_flags(self) -> list[str]:
        return [f"--runner={DASK_RUNNER}", f"--dask_client_address={self.address}"]

    def worker_pids(self) -> dict[int, str]:
        """The processes that run tasks now (a nanny's child), as a marker records
        them, and the name of the worker each is."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            names = _names(client)
            return {pid: names[address] for address, pid in client.run(os.getpid).items()}

    def restarts(self) -> dict[int, tuple[str, str]]:
        """The worker processes a nanny replaced: pid -> (worker name, how it ended),
        from the nanny's own line ("Worker process 4038 was killed by signal 9")."""
        ended = {}
        for number, log in enumerate(self.logs[1:]):
            for pid, how in re.findall(NANNY_SAYS_ENDED, _read(log)):
                ended[int(pid)] = (f"worker-{number}", how)
        return ended

    def log_tails(self, characters: int = 3000) -> str:
        """The end of every process's log, for a failure message."""
        tails = []
        names = ["scheduler", *(f"worker-{number}" for number in range(len(self.workers)))]
        for name, log in zip(names, self.logs, strict=True):
            tails.append(f"--- {name} ---\n{_read(log)[-characters:]}")
        return "\n".join(tails)

    def is_running_a_task(self, number: int) -> bool:
        """Whether worker ``number`` is running a task now (so killing it loses one)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            names = _names(client)
            return any(
                names.get(address) == f"worker-{number}" and keys
                for address, keys in client.processing().items()
            )

    def kill_worker(self, number: int) -> None:
        """SIGKILL of a worker's whole session, as a machine that dies."""
        os.killpg(self.workers[number].pid, signal.SIGKILL)
        self.workers[number].wait()


def _read(log) -> str:
    """All a running process has written to ``log`` so far, read without moving
    the offset it shares with that process (a seek would make it write over the start)."""
    return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0).decode(errors="replace")


def _names(client) -> dict[str, str]:
    """Each worker's address -> its --name."""
    return {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}


@contextlib.contextmanager
def dask_cluster(env: dict[str, str], credentials_json: str, workers: int = 2):
    """A scheduler on loopback and ``workers`` isolated workers of one thread each."""
    port = free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(workers + 1)]  # noqa: SIM115 - closed below
    scheduler = subprocess.Popen(
        [os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", f"--port={port}"]
        + ["--dashboard-address", ":0"],
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"tcp://127.0.0.1:{port}"
    started = []
    try:
        wait_for_port(port, scheduler, logs[0], "the dask scheduler")
        for number in range(workers):
            command = [os.path.join(BIN, "dask"), "worker", address, "--nthreads", "1"]
            command += ["--name", f"worker-{number}", "--dashboard-address", ":0"]
            started.append(isolated(command, env | NO_PROFILER, credentials_json, logs[number + 1]))
        cluster = DaskCluster(address, started, logs)
        deadline = time.monotonic() + START_SECONDS
        while len(cluster.worker_pids()) < workers:
            if time.monotonic() > deadline:
                logs[1].seek(0)
                raise RuntimeError(
                    f"dask workers did not join within {START_SECONDS} s: {logs[1].read()[-2000:]}"
                )
            time.sleep(0.5)
        yield cluster
    finally:
        for process in [*started, scheduler]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*started, scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
