"""Progress of long loops, readable on a terminal and in a log file.

On a terminal a loop shows a tqdm bar. When stderr is not a terminal (a job's log file, a
pipe) carriage-return frames would pile up into one unreadable line, so the loop prints a
plain line every :data:`PLAIN_INTERVAL_S` seconds instead: what it does, how far it is,
its rate, the time left and the latest values it reported (the loss). The tools' shared
``--no_progress`` flag turns both off (:func:`disable`); messages passed to ``write`` are
printed either way.
"""

from __future__ import annotations

import sys
import time

#: Seconds between two plain progress lines (stderr not a terminal).
PLAIN_INTERVAL_S = 10.0

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
    """A progress report of one line every ``interval`` seconds (the tqdm calls zoo uses)."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, interval: float | None = None, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.file = file
        self._initial = initial
        self._start = time.perf_counter()
        self._last = self._start
        self._postfix = ""
        self._closed = False

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
        parts.append(f", {rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f", {1 / rate:.3g} s/{self.unit}")
        parts.append(f", {_duration(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f", {_duration((self.total - self.n) / rate)} left")
        if self._postfix:
            parts.append(f", {self._postfix}")
        return "".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self._out(), flush=True)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def write(self, message: str) -> None:
        print(message, file=self._out(), flush=True)

    def close(self) -> None:
        if not self._closed and self.n > self._initial and time.perf_counter() - self._start >= self.interval:
            print(self.line() + " (finished)", file=self._out(), flush=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(PlainProgress):
    """Progress switched off: counts, prints only what is passed to ``write``."""

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
