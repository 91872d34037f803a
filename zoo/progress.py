"""Progress of long loops, readable on a terminal and in a log file.

On a terminal a loop shows a tqdm bar. When stderr is not a terminal (a job's log file, a
pipe) carriage-return frames would pile up into one unreadable line, so the loop prints a
plain line every :data:`PLAIN_INTERVAL_S` seconds instead: what it does, how far it is,
its rate, the time left and the latest values it reported (the loss). A loop whose steps
are long (a chunk of exact log densities takes minutes) still gets a line every interval,
from a heartbeat thread, so a log never falls silent while work goes on. The tools' shared
``--no_progress`` flag turns both off (:func:`disable`); messages passed to ``write`` are
printed either way.
"""

from __future__ import annotations

import sys
import threading
import time

#: Seconds between two plain progress lines (stderr not a terminal).
PLAIN_INTERVAL_S = 10.0

#: The heartbeat waits at least this long between lines, whatever ``interval`` is.
HEARTBEAT_FLOOR_S = 1.0

_enabled = True


def disable() -> None:
    """No progress output from here on (the tools' ``--no_progress``)."""
    global _enabled
    _enabled = False


def enable() -> None:
    global _enabled
    _enabled = True


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class PlainProgress:
    """A progress report of one line every ``interval`` seconds (the tqdm calls zoo uses).

    Lines come from ``update`` when one falls due, and from a heartbeat thread when no
    update has come for an interval (the count then stands still, the clock does not).
    """

    _heartbeat = True

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, interval: float | None = None, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.file = file
        self._initial = initial
        self._start = time.perf_counter()
        self._last = self._start
        self._postfix = ""
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self._heartbeat:
            threading.Thread(target=self._beat, name=f"progress {desc}", daemon=True).start()

    def _out(self):
        return self.file if self.file is not None else sys.stderr

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n} {self.unit}")
        if done > 0:
            parts.append(f", {rate:.3g} {self.unit}/s" if rate >= 1 else f", {1 / rate:.3g} s/{self.unit}")
        parts.append(f", {_duration(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f", {_duration((self.total - self.n) / rate)} left")
        if self._postfix:
            parts.append(f", {self._postfix}")
        return "".join(parts)

    def _print_if_due(self, interval: float) -> None:
        with self._lock:
            now = time.perf_counter()
            if not self._closed and now - self._last >= interval:
                self._last = now
                print(self.line(), file=self._out(), flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.interval, HEARTBEAT_FLOOR_S) / 4):
            self._print_if_due(max(self.interval, HEARTBEAT_FLOOR_S))

    def update(self, n: int = 1) -> None:
        self.n += n
        self._print_if_due(self.interval)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def write(self, message: str) -> None:
        print(message, file=self._out(), flush=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if not self._closed and self.n > self._initial and time.perf_counter() - self._start >= self.interval:
                print(self.line() + " (finished)", file=self._out(), flush=True)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(PlainProgress):
    """Progress switched off: counts, prints only what is passed to ``write``."""

    _heartbeat = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self._closed = True


def bar(total=None, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True, leave: bool = True):
    """A progress report for a loop of ``total`` ``unit``: a tqdm bar on a terminal, plain lines otherwise.

    ``enabled=False`` (or :func:`disable`) silences it.
    """
    if not (enabled and _enabled):
        return _Silent(total, desc, unit, initial)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc or None, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, initial)
