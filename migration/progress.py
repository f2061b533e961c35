"""A one-line console progress display for batched steps: rows, rows/s, ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """Redraws one line on stderr; silent when stderr is not a terminal or when disabled."""

    def __init__(self, label: str, total: int, *, enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.started = time.monotonic()
        self.enabled = enabled and sys.stderr.isatty()
        self._last_draw = 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.2:
            self._last_draw = now
            sys.stderr.write("\r" + self.line(now) + "\x1b[K")
            sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,} rows, {rate:,.0f} rows/s"
        if self.total > self.done and rate > 0:
            text += f", ETA {(self.total - self.done) / rate:,.0f} s"
        return text

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + self.line() + "\x1b[K\n")
            sys.stderr.flush()
