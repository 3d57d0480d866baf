"""The command line's edge: what a run prints besides its results.

Quiet by default: Beam, TensorFlow, absl, XNNPACK and gRPC say nothing, and our own
warnings are one plain line each; ``--verbose`` brings everything back. Python's
logging and warnings are set before those libraries load. Their C++ parts log
through absl, which TensorFlow 2.21 starts before any setting can reach it (it
ignores TF_CPP_MIN_LOG_LEVEL for its start-up lines), so the process's native
stderr goes through a filter that drops absl's log lines and passes everything
else; child processes (the model check, local Beam workers) inherit both the
filter and the environment.

Long phases show progress (imgembed/common/progress.py): a bar on a terminal, else
a plain line when a phase starts and ends and at least every LINE_SECONDS.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
import warnings

from imgembed.common import progress

QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # what TensorFlow's C++ logging still honours
    "GRPC_VERBOSITY": "ERROR",  # Beam's worker channels
    "PYTHONWARNINGS": "ignore",  # in child interpreters, as simplefilter here
}
# Native log lines: absl's "I1203 10:02:03.123 4242 file.cc:12] ..." (info, warning,
# error; fatal ones pass), its notice before initialisation, TensorFlow's CPU
# feature note, and TFLite's XNNPACK line (written in pieces: two workers' copies
# can interleave, so it is matched anywhere in a line).
NATIVE_NOISE = re.compile(
    rb"^([IWE]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\]"
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|To enable the following instructions:"
    # faiss's own, from its C++: a small training sample (the report says what was built).
    rb"|WARNING clustering \d+ points to \d+ centroids)"
    rb"|Created TensorFlow Lite XNNPACK delegate"
)
THIRD_PARTY_LOGGERS = (
    "apache_beam",
    "tensorflow",
    "absl",
    "tfx_bsl",
    "tensorflow_transform",
    "urllib3",
    "google",
)
LINE_SECONDS = 30.0
SHORT_PHASE_SECONDS = 5.0
BAR_REFRESH_SECONDS = 1.0


def configure(verbose: bool) -> None:
    """Call before anything imports TensorFlow or Beam."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in THIRD_PARTY_LOGGERS:
        # Their warnings are theirs (a retried credential lookup, an unparsed flag); a
        # failure that matters reaches us as an exception, reported with its input.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    _filter_native_stderr()


def _filter_native_stderr() -> None:
    """Points file descriptor 2 at a pipe whose reader drops NATIVE_NOISE lines."""
    sys.stderr.flush()
    real = os.dup(2)
    reader, writer = os.pipe()
    os.dup2(writer, 2)
    os.close(writer)

    def pump():
        with os.fdopen(reader, "rb") as lines:
            for line in lines:
                if not NATIVE_NOISE.search(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        os.dup2(real, 2)  # closes our end of the pipe: the reader drains what is left
        thread.join(timeout=2.0)

    atexit.register(restore)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.ERROR else "error: "
        return f"imgembed: {level}{record.getMessage()}"


def show_progress(stream=None) -> None:
    stream = stream or sys.stderr
    progress.set_display(BarDisplay(stream) if stream.isatty() else LineDisplay(stream))


def _rate_and_eta(phase: progress.Phase, elapsed: float) -> str:
    if not phase.done or elapsed <= 0:
        return ""
    rate = phase.done / elapsed
    text = f", {rate:,.0f} {phase.unit}/s" if rate >= 10 else f", {rate:,.2f} {phase.unit}/s"
    if phase.total:
        text += f", about {_duration((phase.total - phase.done) / rate)} left"
    return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class LineDisplay(progress.Display):
    """For logs and pipes: a line every LINE_SECONDS while phases run (so a silent
    minute means something is stuck), and one when a phase that took a while ends.
    Phases of a few seconds say nothing."""

    def __init__(self, stream, every: float = LINE_SECONDS):
        self._stream = stream
        self._every = every
        self._started: dict[progress.Phase, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._tick, name="progress-lines", daemon=True).start()

    def _line(self, text: str) -> None:
        self._stream.write(f"imgembed: {text}\n")
        self._stream.flush()

    def _status(self, phase: progress.Phase, started: float) -> str:
        elapsed = time.monotonic() - started
        count = f"{phase.done:,}" + (f"/{phase.total:,}" if phase.total else "") + f" {phase.unit}"
        share = f" ({phase.done / phase.total:.0%})" if phase.total else ""
        return f"{phase.name}: {count}{share} after {_duration(elapsed)}{_rate_and_eta(phase, elapsed)}"

    def started(self, phase):
        with self._lock:
            self._started[phase] = time.monotonic()

    def finished(self, phase):
        with self._lock:
            started = self._started.pop(phase, time.monotonic())
        took = time.monotonic() - started
        if took >= SHORT_PHASE_SECONDS:
            count = f", {phase.done:,} {phase.unit}" if phase.done else ""
            self._line(f"{phase.name}: done in {_duration(took)}{count}")

    def _tick(self):
        while True:
            time.sleep(self._every)
            with self._lock:
                running = list(self._started.items())
            for phase, started in running:
                self._line(self._status(phase, started))


class BarDisplay(progress.Display):
    """For a terminal: a tqdm bar per phase, redrawn at least every second (so the
    elapsed time moves during a long call that reports nothing)."""

    def __init__(self, stream):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._stream = stream
        self._bars: dict[progress.Phase, object] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._tick, name="progress-bars", daemon=True).start()

    def started(self, phase):
        bar = self._tqdm(
            total=phase.total, desc=phase.name, unit=f" {phase.unit}", file=self._stream, dynamic_ncols=True
        )
        with self._lock:
            self._bars[phase] = bar

    def updated(self, phase):
        with self._lock:
            bar = self._bars.get(phase)
            if bar is None:
                return
            if bar.total != phase.total:
                bar.total = phase.total
            bar.update(phase.done - bar.n)

    def finished(self, phase):
        with self._lock:
            bar = self._bars.pop(phase, None)
        if bar is not None:
            bar.update(phase.done - bar.n)
            bar.close()

    def _tick(self):
        while True:
            time.sleep(BAR_REFRESH_SECONDS)
            with self._lock:
                for bar in self._bars.values():
                    bar.refresh()
