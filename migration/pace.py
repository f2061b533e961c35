"""``--max-rows-per-second``: the steps that write a table's worth, at a bounded rate.

The fill writes as fast as the server takes it, and its WAL with it: a standby, a
subscriber, an archive or a shared disk then takes it at that rate too.  With a
bound, each batch of such a step (the fill's, the backup's copy, the rollback's
fill, follow and respell) is followed by a pause long enough that the rows
written stay under the bound: a batch of ``n`` rows takes ``n / bound`` seconds,
its own time included (``pause_after``).  The pause comes after the batch has
committed (the backup's copy, one snapshot, pauses between its statements), so
no row lock is held while it waits; it sleeps, and keeps nothing but counters.

One pacer serves a session and its fill workers: their batches share one
schedule (``Pacer.schedule``), so ``--jobs`` connections together stay under
the bound, not each of them.  No credit is saved up while the work stands still
(a standby waited for, a lock retried): the batch after it is paced on its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from migration.log import logger


def pause_after(rows: int, elapsed: float, limit: float) -> float:
    """Seconds to wait after a batch that wrote ``rows`` in ``elapsed`` seconds, so that
    its rows per second, the pause included, are at most ``limit`` (0: no bound)."""
    if limit <= 0 or rows <= 0:
        return 0.0
    return max(0.0, rows / limit - elapsed)


@dataclass(frozen=True)
class Paced:
    """What a pacer did: the batches it saw, their rows, how many waited and how long."""

    batches: int = 0
    rows: int = 0
    waits: int = 0
    waited_s: float = 0.0


class Pacer:
    """Paces the batches of one session and its workers to at most ``limit`` rows per
    second (0: no bound).  Thread-safe."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._free_at = 0.0  # when the rows of the batches so far are paid for
        self._done = Paced()
        self._lock = threading.Lock()

    def schedule(self, rows: int, started: float, now: float) -> float:
        """The pause of a batch of ``rows`` that began at ``started`` and ended ``now``
        (``time.monotonic``): measured from when the batches before it were paid for, if
        later, so that batches of several workers share the bound."""
        with self._lock:
            pause = pause_after(rows, now - max(started, self._free_at), self.limit)
            self._free_at = now + pause
            done = self._done
            self._done = Paced(done.batches + 1, done.rows + rows, done.waits + (pause > 0),
                               done.waited_s + pause)
        return pause

    def wait(self, rows: int, started: float, stop: threading.Event | None = None) -> None:
        """After a batch of ``rows`` begun at ``started``: sleep as long as the bound asks
        (``stop`` ends the sleep: a sibling failed, or the run was interrupted).  Call it
        with no lock held: after the batch's commit, or between a snapshot's statements."""
        if self.limit <= 0:
            return
        pause = self.schedule(rows, started, time.monotonic())
        if pause > 0:
            (stop or threading.Event()).wait(pause)

    def totals(self) -> Paced:
        with self._lock:
            return self._done

    def record(self, name: str, since: Paced) -> dict[str, Any]:
        """What was paced since ``since`` (``totals`` before ``name`` ran), logged, and
        for migration_log's details: ``{"paced": {...}}``; none without a bound or batches."""
        done = self.totals()
        batches, rows = done.batches - since.batches, done.rows - since.rows
        if self.limit <= 0 or not batches:
            return {}
        waits, waited = done.waits - since.waits, done.waited_s - since.waited_s
        logger.info("%s: paced to at most %g rows/s: %s rows in %s batches, %s of which "
                    "waited, %.1f s in all", name, self.limit, f"{rows:,}", batches, waits,
                    waited)
        return {"paced": {"max_rows_per_second": self.limit, "batches": batches, "rows": rows,
                          "waits": waits, "waited_s": round(waited, 3)}}
