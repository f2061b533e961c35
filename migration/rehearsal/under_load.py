"""``rehearse --live-load``: the migration and its rollback while an application writes.

On a clone of the rehearsal's prepared database, ``load.LiveLoad`` (pgbench at a
fixed rate on the runbook's tables, a ledger of every committed write, an orphan
prober: the live-load tests' and the benchmark's machinery) runs a baseline, then
``full_migration`` and ``rollback`` each as a phase of its own, then a last
second for the transactions they held up.  What the application saw, per phase:
transactions, failures, p50 / p99 / max latency, and the longest time in which
no transaction completed (the write stall); and what an online migration must not
do (``LoadReport.problems``): application transactions that failed (with
pgbench's reason), committed writes missing or changed, orphans accepted.  Those
fail the rehearsal.

Given a plan (``--schema-from``), the load is ``schema_load.SchemaLoad``: scripts made
for the plan's tables, one of the clients with statements prepared before the
migration (``-M prepared``); what those fail with after the swap is reported with
its SQLSTATE (``notes``), as the application's to handle, like ``prepared``'s.

Meanwhile ``LagWatch`` reads the replication lag of the server (its standbys and logical
slots) with ``--max-replica-lag``'s reader, ``lag.Throttle.behind``, on a connection of
its own, and keeps the consumer furthest behind in each phase (``ReplicaLag``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import psycopg2

from migration.connection import ConnectError, redact_dsn
from migration.errors import MigrationError
from migration.lag import Behind
from migration.model import KeyColumn
from migration.plan import Plan
from migration.rehearsal.load import LiveLoad, LoadUnavailable, PhaseStats, find_pgbench
from migration.rehearsal.schema_load import POOL_ROWS, SchemaLoad
from migration.session import Session, Settings

RATE, CLIENTS = 150.0, 4  # the live-load tests' and the benchmark's default load
PREPARED_CLIENTS = 1  # of CLIENTS, on a schema of the operator's (``SchemaLoad``)
BASELINE_S = 3.0  # seconds of load before the migration: the "before" phase
LAG_INTERVAL_S = 0.5  # how often LagWatch reads the replication lag, and at each phase
MIN_POOL_ROWS = 2000


def pool_rows_for(migration_s: float, rate: float = RATE) -> int:
    """The transactions a ``SchemaLoad``'s pools are sized for (each table's its share) when
    its migration took ``migration_s`` without load: enough for the baseline, the migration
    and the rollback under load (each taken as half as long again) and the last second,
    with half again to spare.  Rows run out are a note, not a failure (``LoadReport.notes``)."""
    seconds = BASELINE_S + 1.0 + 3 * migration_s
    return max(MIN_POOL_ROWS, int(1.5 * rate * seconds))
STEPS = ("full_migration", "rollback")


@dataclass
class ReplicaLag:
    """The replication lag of the load's server while it ran, as ``lag.Throttle`` reads it."""

    longest: dict[str, Behind] = field(default_factory=dict)
    """Per phase, the standby or logical slot seen furthest behind in it, and how far."""
    consumers: list[str] = field(default_factory=list)
    """Every standby and logical slot seen."""
    hidden: int = 0
    """The most standbys at one look whose lag this role could not read (no pg_monitor)."""
    error: str = ""
    """Why the lag could not be read; empty when it was."""

    def lines(self) -> list[str]:
        """For the report: the longest lag per phase, or why there is none."""
        if self.error:
            return [f"replication lag not read: {self.error}"]
        lines = [f"longest replication lag in {phase}: {behind}"
                 for phase, behind in self.longest.items()]
        if self.hidden:
            lines.append(f"replication lag: this role cannot read the lag of {self.hidden} "
                         "standby(s) in pg_stat_replication (it needs pg_monitor or "
                         "pg_read_all_stats)")
        elif not self.consumers:
            lines.append("replication lag: no standby or logical slot on the rehearsal server")
        return lines


class LagWatch:
    """``with LagWatch(dsn) as watch: watch.phase("full_migration"); ...; watch.report()``.

    In a thread, every ``interval`` seconds and at each ``phase``, the standbys and logical
    slots of the server of ``dsn`` and how far behind each is: ``lag.Throttle.behind``, the
    reader of ``--max-replica-lag``, on a session of its own (``key`` and ``schema`` name
    its plan, which it does not use).  A connection or read that fails ends the watch with
    its ``error``, never the load.
    """

    def __init__(self, dsn: str, *, key: KeyColumn | None = None, schema: str = "public",
                 interval: float = LAG_INTERVAL_S) -> None:
        self.dsn, self.key, self.schema, self.interval = dsn, key, schema, interval
        self._result = ReplicaLag()
        self._phase = "before"
        self._lock = threading.Lock()
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-lag", daemon=True)

    def __enter__(self) -> LagWatch:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def phase(self, name: str) -> None:
        """From now on, the lag read counts in phase ``name`` (read at once)."""
        with self._lock:
            self._phase = name
        self._wake.set()

    def report(self) -> ReplicaLag:
        """What was read, once the with-block has ended."""
        assert not self._thread.is_alive(), "the watch is still running"
        return self._result

    def _run(self) -> None:
        try:
            with Session.open(self.dsn, Settings(show_progress=False), key=self.key,
                              schema=self.schema, lock=False) as session:
                while True:
                    with self._lock:
                        phase = self._phase
                    self._record(phase, session.lag.behind(session), session.lag.hidden)
                    if self._stop.is_set():
                        return
                    self._wake.wait(self.interval)
                    self._wake.clear()
        except (ConnectError, MigrationError, psycopg2.Error) as exc:
            self._result.error = redact_dsn(str(exc)).strip()

    def _record(self, phase: str, behind: list[Behind], hidden: int) -> None:
        result = self._result
        result.hidden = max(result.hidden, hidden)
        for consumer in behind:
            if consumer.name not in result.consumers:
                result.consumers.append(consumer.name)
            worst = result.longest.get(phase)
            if worst is None or consumer.seconds > worst.seconds:
                result.longest[phase] = consumer


@dataclass
class LoadRun:
    """The application's view of the migration and the rollback under load."""

    rate: float
    clients: int
    phases: list[PhaseStats] = field(default_factory=list)
    transactions: int = 0
    problems: list[str] = field(default_factory=list)
    error: str = ""
    """Why the load or a step did not run through; empty when both did."""
    rows: dict[str, int] = field(default_factory=dict)
    """The rows each step that ran through reported (converted, restored), by step."""
    notes: list[str] = field(default_factory=list)
    """What the clients with prepared statements failed with (``LoadReport.notes``), and
    the writes the schema does not allow (``SchemaLoad.skipped``): not failures."""
    replica_lag: ReplicaLag | None = None
    """The server's standbys and logical slots, their longest lag per phase (``LagWatch``)."""

    def failed(self) -> list[str]:
        """What fails the rehearsal: the error, and what the application saw go wrong."""
        return [*([self.error] if self.error else []), *self.problems]


def available() -> bool:
    """Whether this host has a pgbench the load can use (15 or later)."""
    try:
        find_pgbench()
    except LoadUnavailable:
        return False
    return True


def under_load(dsn: str, step: Callable[[str], str | None], *, schema: str = "public",
               rate: float = RATE, clients: int = CLIENTS,
               baseline_s: float = BASELINE_S, plan: Plan | None = None,
               pool_rows: int = POOL_ROWS, lag_dsn: str | None = None) -> LoadRun:
    """``step(name)`` for each of ``STEPS`` (its error, or None) in the database of ``dsn``
    while ``LiveLoad`` (given ``plan``: ``SchemaLoad``) writes to it; what the
    application saw, and the replication lag of its server read meanwhile (``LagWatch``,
    as the role of ``lag_dsn``, by default ``dsn``'s: reading a standby's lag takes
    ``pg_monitor``).  A step that fails ends the run (the next is not tried); a host
    without pgbench 15 or later is an ``error``, not an exception."""
    result = LoadRun(rate, clients)
    try:
        load: LiveLoad = (
            LiveLoad(dsn, rate=rate, clients=clients, schema=schema) if plan is None else
            SchemaLoad(dsn, plan, rate=rate, clients=clients - PREPARED_CLIENTS,
                       prepared_clients=PREPARED_CLIENTS, pool_rows=pool_rows))
        with load, LagWatch(lag_dsn or dsn, key=None if plan is None else plan.parent,
                            schema=schema) as watch:
            time.sleep(baseline_s)
            for name in STEPS:
                load.phase(name)
                watch.phase(name)
                error = step(name)
                if error is not None:
                    result.error = f"{name}: {error}"
                    break
            load.phase("after")
            watch.phase("after")
            time.sleep(1.0)  # the transactions the steps held up complete in "after"
            report = load.stop()
        result.replica_lag = watch.report()
    except LoadUnavailable as exc:
        result.error = f"no load was run: {exc}"
        return result
    result.phases, result.transactions = report.phases, report.transactions
    result.problems = report.problems()
    result.notes = report.notes()
    if isinstance(load, SchemaLoad):
        result.notes += [f"not written: {why}" for why in load.skipped]
    return result
