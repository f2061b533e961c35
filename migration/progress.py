"""A one-line console progress display for batched steps: rows, rows/s, ETA."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """Redraws one line on stderr; silent when stderr is not a terminal or when disabled.

    One display serves every connection of a fill (``advance`` is
    thread-safe), so parallel slices share one line instead of overwriting
    each other's.  Rows done before this run (``resumed``) count towards the
    total but not towards the rate.
    """

    def __init__(self, label: str, total: int, *, resumed: int = 0,
                 enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 0)
        self.resumed = resumed
        self.done = 0  # by this run
        self.started = time.monotonic()
        self.enabled = enabled and sys.stderr.isatty()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self.note: str | None = None  # why the work stands still (a standby is behind)

    def advance(self, rows: int) -> None:
        with self._lock:
            self.done += rows
            now = time.monotonic()
            if self.enabled and now - self._last_draw >= 0.2:
                self._last_draw = now
                sys.stderr.write("\r" + self.line(now) + "\x1b[K")
                sys.stderr.flush()

    def pause(self, note: str | None) -> None:
        """Show ``note`` on the line (drawn at once) while the work waits; None: it goes on."""
        with self._lock:
            self.note = note
            if self.enabled:
                self._last_draw = time.monotonic()
                sys.stderr.write("\r" + self.line(self._last_draw) + "\x1b[K")
                sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        done = self.resumed + self.done
        text = f"{self.label}: {done:,} rows, {rate:,.0f} rows/s"
        if self.total > done and rate > 0:
            text += f", ETA {(self.total - done) / rate:,.0f} s"
        if self.note is not None:
            text += f", {self.note}"
        return text

    def close(self) -> None:
        if self.enabled:
            with self._lock:
                sys.stderr.write("\r" + self.line() + "\x1b[K\n")
                sys.stderr.flush()
