"""``imgembed watch``: keep the embeddings and the index of a growing corpus in step.

Every ``--interval`` seconds, one cycle:

    list the inputs -> embed what is new or changed, retract what was deleted
                       (pipelines/embed.py: a run starts no Beam job when nothing changed)
                    -> make the index mirror the embeddings (index/update.py ``sync_index``;
                       the first cycle builds it)

and one line says what the cycle found and did. ``imgembed serve --index`` on the
same index swaps to each new version within its ``--reload-seconds``.

Every step commits as it goes (a shard's marker, an index version's CURRENT), so
the watcher can be killed at any moment, by SIGTERM or SIGKILL: the next start
lists again and goes on from what was committed, with nothing lost and nothing
embedded twice into the output. A cycle that fails (a store that is down, a shard
that cannot be read yet) is reported in its line and tried again at the next one.

This is a loop of batch runs, on any runner the embed flags name. On a streaming
runner the same could be one job (Beam's ``fileio.MatchContinuously`` feeding the
shard worker); see the README for why the loop is the one shipped.

    imgembed watch --input gs://bucket/photos --output gs://bucket/embeddings \\
        --index gs://bucket/index --interval 10
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time

from imgembed.common import progress, storage
from imgembed.common.runners import with_default_runner
from imgembed.common.units import parse_size

_log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgembed watch",
        description="Embed what is new or changed under --input every --interval seconds and keep "
        "the --index in step. Every other flag goes to `imgembed embed` (--model, --resize, "
        "--files-per-shard, Beam's runner flags...).",
    )
    p.add_argument("--index", required=True, help="Index folder kept in step, any Beam filesystem.")
    p.add_argument(
        "--interval", type=float, default=30.0, help="Seconds from the start of a cycle to the next (30)."
    )
    p.add_argument("--cycles", type=int, default=None, help="Stop after this many cycles (default: never).")
    p.add_argument("--max-memory", default="4G", help="Memory the index may use when it is built (4G).")
    return p


@dataclasses.dataclass
class Cycle:
    """One cycle's line."""

    number: int
    new: int = 0
    changed: int = 0
    deleted: int = 0
    embedded: int = 0
    errors: int = 0
    index: str = ""
    seconds: float = 0.0
    failure: str | None = None

    def line(self) -> str:
        text = (
            f"cycle {self.number}: {self.new} new, {self.changed} changed, {self.deleted} deleted; "
            f"embedded {self.embedded}, {self.errors} error rows; {self.index}; {self.seconds:.1f} s"
        )
        return text + (f"; FAILED: {self.failure} (tried again next cycle)" if self.failure else "")


class Watcher:
    """Runs cycles until stopped (``stop()``, SIGTERM or SIGINT) or ``cycles`` are done."""

    def __init__(self, embed_argv: list[str], index_dir: str, interval: float, index_config):
        self._embed_argv = embed_argv
        self._index_dir = index_dir
        self._interval = interval
        self._config = index_config
        self._stopping = threading.Event()

    def stop(self, *_signal) -> None:
        self._stopping.set()

    def run(self, cycles: int | None = None, report=print) -> None:
        number = 0
        while not self._stopping.is_set() and (cycles is None or number < cycles):
            number += 1
            started = time.monotonic()
            report(self.cycle(number).line())
            self._stopping.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def cycle(self, number: int) -> Cycle:
        from imgembed.index.update import sync_index
        from imgembed.pipelines import embed
        from imgembed.pipelines.shards import InputError

        cycle = Cycle(number)
        started = time.monotonic()
        try:
            summary = embed.run(self._embed_argv)
            run = summary.run
            cycle.new, cycle.changed, cycle.deleted = run.new_inputs, run.changed_inputs, run.deleted_inputs
            cycle.embedded, cycle.errors = summary.models[0].embedded, run.input_errors
            folder = storage.parent(summary.models[0].embeddings)  # OUT/<model>/embeddings-*.parquet
            if summary.models[0].rows:
                report = sync_index(self._index_dir, [folder], self._config)
                cycle.index = _describe(report)
            else:
                cycle.index = "index: nothing to index yet"
        except InputError as error:  # an empty bucket: nothing to do yet
            cycle.index = f"no inputs yet ({error})"
        except (embed.JobFailed, ValueError, OSError, RuntimeError) as error:
            if number == 1 and isinstance(error, ValueError | OSError):
                raise  # a flag is wrong, or a folder unwritable: no later cycle will do better
            cycle.failure = " ".join(str(error).split())[:300]
        cycle.seconds = time.monotonic() - started
        return cycle


def _describe(report: dict) -> str:
    if "note" in report:
        return f"index {report['count']:,} items, unchanged"
    if "added" not in report:  # the first build
        return f"index built: {report['count']:,} items ({report['index']['kind']})"
    advice = ", REBUILD ADVISED" if report.get("retrain_advised") else ""
    return (
        f"index {report['count']:,} items (+{report['added']} ~{report['replaced']} -{report['removed']}, "
        f"version {report['version']}){advice}"
    )


def main(argv: list[str]) -> int:
    args, embed_argv = parser().parse_known_args(argv)
    if "-h" in argv or "--help" in argv:
        parser().print_help()
        return 0
    from imgembed.index.build import IndexConfig

    try:
        if args.interval < 0:
            raise ValueError(f"--interval must be >= 0 seconds, got {args.interval}")
        config = IndexConfig(max_memory=parse_size(args.max_memory))
    except (ValueError, OSError) as error:
        print(f"imgembed watch: {' '.join(str(error).split())[:400]}", file=sys.stderr)
        return 2
    progress.set_display(progress.Display())  # one line a cycle, no bars
    watcher = Watcher(with_default_runner(embed_argv), args.index, args.interval, config)
    # Any moment is a safe one to stop at; between cycles, the watcher stops at once.
    signal.signal(signal.SIGTERM, lambda *_: _stop_now(watcher))
    try:
        watcher.run(args.cycles, report=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError) as error:
        print(f"imgembed watch: {' '.join(str(error).split())[:400]}", file=sys.stderr)
        return 2
    return 0


def _stop_now(watcher: Watcher) -> None:
    watcher.stop()
    raise KeyboardInterrupt  # out of a cycle in progress: what it committed stays
