"""Standbys and logical subscribers kept within ``--max-replica-lag`` of the primary.

The fill writes its WAL as fast as the server takes it (3.3 GB at 1M users); a
standby that replays slower falls behind by as much, and the failover window
grows with the table.  Between two batches (never inside a transaction, so no
lock is held while it waits) the engine looks how far behind the primary's WAL
each consumer is and, while one is further behind than the limit, waits for it.

What "behind" means, in seconds, for a consumer whose position is ``p`` (a
standby's ``replay_lsn`` in ``pg_stat_replication``, a logical walsender's
likewise, an inactive logical slot's ``confirmed_flush_lsn``): how long ago the
primary had already written WAL past ``p``, from samples of
``pg_current_wal_lsn()`` the throttle takes at each look.  It grows while a
standby's replay stands still, whether or not WAL flows meanwhile, and is 0
for a consumer at the primary's position (``replay_lag`` is NULL then).  For a
connected consumer the server's own ``replay_lag`` is taken when it says more
(it also covers the time before this run's first sample).  The samples' age
is a lower bound of the true lag: the WAL just past ``p`` was written no later.

A role without ``pg_read_all_stats`` (``pg_monitor``) sees the rows of
``pg_stat_replication`` with their positions NULL: the engine warns once, and
does not wait for what it cannot see.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from migration.log import logger
from migration.progress import Progress

if TYPE_CHECKING:
    from migration.session import Session

# The option's default: a standby half a minute behind is one an operator would fail
# over to with half a minute of writes still to replay, a window most on-call runbooks
# already alert on; the fill, which can wait, should not make it longer.
DEFAULT_MAX_REPLICA_LAG_S = 30.0
# How often the lag is looked at while the consumers keep up, and while one is waited for.
CHECK_INTERVAL_S = 1.0
# Samples of the primary's WAL position kept (one a look at most: over an hour's worth).
SAMPLES = 4096

# Every consumer of this server's WAL: the walsenders (physical standbys, logical
# subscribers, connected), and this database's logical slots nobody consumes now.
_CONSUMERS = """
    SELECT format('standby %s (pid %s%s)', quote_literal(application_name), pid,
                  ', ' || client_addr) || CASE WHEN slot_name IS NULL THEN ''
                                              ELSE ', slot ' || quote_literal(slot_name) END,
           pg_wal_lsn_diff(replay_lsn, '0/0')::float8, extract(epoch FROM replay_lag)::float8,
           state IS NULL
    FROM pg_stat_replication LEFT JOIN pg_replication_slots ON active_pid = pid
    UNION ALL
    SELECT format('logical slot %s (inactive)', quote_literal(slot_name)),
           pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::float8, NULL, false
    FROM pg_replication_slots
    WHERE slot_type = 'logical' AND NOT active AND database = current_database()
    ORDER BY 1
"""


@dataclass(frozen=True)
class Behind:
    """A consumer of the primary's WAL and how many seconds it is behind."""

    name: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.name} is {self.seconds:,.1f} s behind"


class Throttle:
    """Waits, between batches, while a consumer is further behind than ``limit`` seconds.

    One throttle serves a session and its fill workers (it is thread-safe):
    while one of them waits for a standby, the others wait for it at their
    next batch.  ``limit`` 0 turns it off.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._samples: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (time, bytes)
        self._next_look = 0.0
        self._warned_hidden = False
        self._lock = threading.Lock()
        self.hidden = 0
        """Standbys whose lag this role could not read at the last look (``behind``)."""

    def wait(self, session: Session, progress: Progress | None = None,
             stop: threading.Event | None = None) -> None:
        """Return at once when the consumers keep up (looked at once a second at most),
        else wait until they do, showing the pause on ``progress``; or until ``stop`` is
        set (a sibling fill failed, or the run was interrupted).  Call it outside a
        transaction: the session's connection is used for the look, and committed."""
        if self.limit <= 0:
            return
        with self._lock:
            if time.monotonic() < self._next_look:
                return
            paused_at: float | None = None
            while stop is None or not stop.is_set():
                behind = [b for b in self.behind(session) if b.seconds > self.limit]
                if not behind:
                    break
                worst = max(behind, key=lambda b: b.seconds)
                if paused_at is None:
                    paused_at = time.monotonic()
                    logger.warning("%s (more than --max-replica-lag=%g s): pausing until it "
                                   "catches up", "; ".join(map(str, behind)), self.limit)
                    session.point("standbys behind")
                if progress is not None:
                    progress.pause(f"paused, {worst}")
                (stop or threading.Event()).wait(CHECK_INTERVAL_S)
            if paused_at is not None:
                logger.warning("%s after a pause of %.1f s", "stopped" if stop is not None
                               and stop.is_set() else "the standbys caught up: resuming",
                               time.monotonic() - paused_at)
                if progress is not None:
                    progress.pause(None)
            self._next_look = time.monotonic() + CHECK_INTERVAL_S

    def behind(self, session: Session) -> list[Behind]:
        """Every consumer this role can see, with its lag (``Behind``), in one transaction;
        a sample of the primary's position taken with it."""
        with session.transaction() as cur:
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
            row = cur.fetchone()
            assert row is not None
            current = float(row[0])
            cur.execute(_CONSUMERS)
            consumers = cur.fetchall()
        now = time.monotonic()
        self._samples.append((now, current))
        hidden = [name for name, _, _, is_hidden in consumers if is_hidden]
        self.hidden = len(hidden)
        if hidden and not self._warned_hidden:
            self._warned_hidden = True
            logger.warning("this role cannot read the lag of %s standby(s) in "
                           "pg_stat_replication (it needs pg_monitor or pg_read_all_stats): "
                           "--max-replica-lag cannot hold the migration back for them",
                           len(hidden))
        return [Behind(str(name), max(self._age(position, current, now), float(lag or 0)))
                for name, position, lag, is_hidden in consumers
                if not is_hidden and position is not None]

    def _age(self, position: float, current: float, now: float) -> float:
        """Seconds since the primary first had WAL past ``position``, as far as the
        samples tell (0 at the primary's position)."""
        if position >= current:
            return 0.0
        return now - next(t for t, lsn in self._samples if lsn > position)
