"""What the application's connections waited on, sampled from ``pg_stat_activity``.

A stall says how long no application write completed; the wait events of the
application's backends during it say why: a lock the engine holds or waits for
(``Lock relation``, ``Lock transactionid``), pages read back after the engine's
scans evicted them (``IO DataFileRead``), dirty buffers written out before they
could be reused (``IO DataFileWrite``), WAL (``LWLock WALWrite``), or the CPU: an
active backend with no wait event is running, or waiting for a core.

Only backends executing a statement are sampled (``state = 'active'``): a
client between its statements is the client's time, not the server's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2

from migration.connection import Connection, redact_dsn
from migration.rehearsal.poller import Poller

CPU = "CPU"
"""An active backend without a wait event: on a core, or runnable and waiting for one."""
NO_STATEMENT = "no statement running"
"""A round that found none of the application's backends executing a statement: what held
the application then was outside the server (pgbench's own process waiting for a core)."""

SAMPLE_INTERVAL_S = 0.01

_ACTIVE_WAITS = """
SELECT coalesce(wait_event_type || ' ' || wait_event, %s) FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = %s AND state = 'active'
"""

Waits = tuple[tuple[str, int], ...]
"""Wait events with how many samples saw a backend in each, most frequent first."""


@dataclass(frozen=True)
class Round:
    """One look at the application's backends: when, and what each active one waited on."""

    at: float  # epoch seconds
    waits: tuple[str, ...]


class WaitSampler(Poller):
    """Every ``interval`` seconds, the wait events of the active backends whose
    ``application_name`` is ``application_name``."""

    def __init__(self, dsn: str, application_name: str, *,
                 interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(dsn, application_name + "-waits", interval, autocommit=True)
        self.application_name = application_name
        self.rounds: list[Round] = []
        self.errors: list[str] = []

    def between(self, start: float, end: float) -> Waits:
        """The waits sampled in [start, end)."""
        return tally(self.rounds, start, end)

    def _round(self, conn: Connection) -> None:
        with conn.cursor() as cur:
            cur.execute(_ACTIVE_WAITS, (CPU, self.application_name))
            self.rounds.append(Round(time.time(), tuple(w for (w,) in cur.fetchall())))

    def _failed(self, error: psycopg2.Error) -> None:
        self.errors.append(redact_dsn(str(error)).strip().splitlines()[0])


def tally(rounds: Sequence[Round], start: float, end: float) -> Waits:
    """Each wait of the rounds in [start, end), with its count, most frequent first; a
    round without an active backend counts once as ``NO_STATEMENT``."""
    counts = Counter(wait for r in rounds if start <= r.at < end
                     for wait in r.waits or (NO_STATEMENT,))
    return tuple(counts.most_common())


def describe(waits: Waits, *, top: int = 3) -> str:
    """``IO DataFileRead 60%, CPU 25%, LWLock WALWrite 15%``, the waits of 1% or more;
    ``none sampled`` when no round fell in the window (the sampler itself held up)."""
    total = sum(n for _, n in waits)
    if not total:
        return "none sampled"
    return ", ".join(f"{wait} {100 * n / total:.0f}%" for wait, n in waits[:top]
                     if 100 * n >= total)
