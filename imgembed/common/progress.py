"""Progress of long phases: reported by library code, shown by the command line.

Library code says what it is doing and never draws anything:

    with progress.phase("add", total=count, unit="vectors") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

As with logging, nothing is shown until the application installs a display
(``imgembed/cli.py`` shows bars on a terminal and timed lines otherwise).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Phase:
    """One phase's counter; a display reads ``done`` and ``total``."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name = name
        self.total = total
        self.unit = unit
        self.done = 0
        self._lock = threading.Lock()  # phases may be advanced from worker threads

    def advance(self, count: int = 1) -> None:
        with self._lock:
            self.done += count
        _display.updated(self)

    def set_total(self, total: int | None) -> None:
        self.total = total
        _display.updated(self)


class Display:
    """What a display implements; this one shows nothing."""

    def started(self, phase: Phase) -> None:
        pass

    def updated(self, phase: Phase) -> None:
        pass

    def finished(self, phase: Phase) -> None:
        pass


_display: Display = Display()


def set_display(display: Display) -> None:
    global _display
    _display = display


def start(name: str, total: int | None = None, unit: str = "items") -> Phase:
    """A phase that has begun; ``finish`` it (or use ``phase``, which does)."""
    current = Phase(name, total, unit)
    _display.started(current)
    return current


def finish(current: Phase) -> None:
    _display.finished(current)


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Phase]:
    current = start(name, total, unit)
    try:
        yield current
    finally:
        finish(current)
