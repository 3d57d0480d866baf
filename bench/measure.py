"""Running a command while measuring its wall time and peak memory."""

from __future__ import annotations

import subprocess
import sys
import time

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(done.stderr[-4000:] if done.returncode else '')\n"
    "print(done.stdout + done.stderr[-4000:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Runs a command; returns wall seconds, the peak RSS of its largest process in
    bytes (Beam workers included: they are its descendants), and its output (stdout,
    then the end of stderr)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{done.stderr}")
    output, peak_kb = done.stdout.rsplit("MAXRSS_KB", 1)
    return seconds, int(peak_kb) * 1024, output
