"""Beam workers that share nothing with the launcher but the network: Beam's
portable job service, and an external worker pool started in its own mount
namespace with a private /tmp (and HOME there), so a worker that tries a path of
the launcher's disk (the pytest tmp_path, the launcher's model cache) fails.

Only the code the workers run stays visible: when the checkout or its virtualenv
lies under /tmp (a fresh clone in /tmp/fresh), each is bind-mounted back at its
own path over the private /tmp, through a private tmpfs on /mnt that the host
never sees."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.servers import free_port

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISOLATED_SCRIPT = (
    "{keep} mount -t tmpfs tmpfs /tmp && {restore}"
    " mkdir -p /tmp/home && printf '%s' \"$CREDENTIALS_JSON\" > /tmp/adc.json"
    " && export HOME=/tmp/home GOOGLE_APPLICATION_CREDENTIALS=/tmp/adc.json"
    " && cd /tmp/home && exec {command}"
)


def _kept_under_tmp() -> list[str]:
    """The checkout and the virtualenv, where they lie under /tmp (a folder inside
    another kept one comes back with it)."""
    kept: list[str] = []
    for path in sorted({os.path.realpath(path) for path in (REPO, sys.prefix)}):  # parents first
        if path.startswith("/tmp/") and not any(path.startswith(parent + "/") for parent in kept):
            kept.append(path)
    return kept


def isolated(command: list[str], env: dict[str, str], credentials_json: str, log) -> subprocess.Popen:
    """Starts ``command`` in a mount namespace of its own with a private /tmp (HOME and
    its Google credentials there), in a session of its own, so that its processes
    can be stopped, or killed, together."""
    kept = _kept_under_tmp()
    keep = "mount -t tmpfs tmpfs /mnt && " if kept else ""
    restore = ""
    for number, path in enumerate(map(shlex.quote, kept)):
        keep += f"mkdir /mnt/kept{number} && mount --bind {path} /mnt/kept{number} && "
        restore += f" mkdir -p {path} && mount --bind /mnt/kept{number} {path} &&"
    script = ISOLATED_SCRIPT.format(keep=keep, restore=restore, command=shlex.join(command))
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=os.environ | env | {"CREDENTIALS_JSON": credentials_json, "PATH": f"{BIN}:{os.environ['PATH']}"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def can_isolate() -> str | None:
    """None when this machine can make a private mount namespace; else why not."""
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp"],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"unshare --mount failed: {done.stderr.strip()}"


def wait_for_port(port: int, process: subprocess.Popen, log, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{what} exited: {log.read()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within 60 s")
        time.sleep(0.2)


@contextlib.contextmanager
def isolated_workers(env: dict[str, str], credentials_json: str):
    """Yields the runner flags of a job service whose workers run isolated."""
    job_port, pool_port = free_port(), free_port()
    # Logs go to files: a pipe nobody reads fills up and stalls the writer.
    job_log, pool_log = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    job_service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apache_beam.runners.portability.local_job_service_main",
            f"--port={job_port}",
        ],
        stdout=job_log,
        stderr=subprocess.STDOUT,
    )
    pool_command = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main"]
    pool = isolated([*pool_command, f"--service_port={pool_port}"], env, credentials_json, pool_log)
    try:
        wait_for_port(job_port, job_service, job_log, "the job service")
        wait_for_port(pool_port, pool, pool_log, "the worker pool")
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        os.killpg(pool.pid, signal.SIGTERM)
        job_service.terminate()
        for process in (pool, job_service):
            process.wait(timeout=30)
        job_log.close()
        pool_log.close()
