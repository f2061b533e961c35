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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from migration.plan import Plan
from migration.rehearsal.load import LiveLoad, LoadUnavailable, PhaseStats, find_pgbench
from migration.rehearsal.schema_load import POOL_ROWS, SchemaLoad

RATE, CLIENTS = 150.0, 4  # the live-load tests' and the benchmark's default load
PREPARED_CLIENTS = 1  # of CLIENTS, on a schema of the operator's (``SchemaLoad``)
BASELINE_S = 3.0  # seconds of load before the migration: the "before" phase
MIN_POOL_ROWS = 2000


def pool_rows_for(migration_s: float, rate: float = RATE) -> int:
    """Generated rows per table for a ``SchemaLoad`` whose migration took ``migration_s``
    without load: enough for the baseline, the migration and the rollback under load (each
    taken as half as long again) and the last second, with half again to spare.  Rows
    run out are a note, not a failure (``LoadReport.notes``)."""
    seconds = BASELINE_S + 1.0 + 3 * migration_s
    return max(MIN_POOL_ROWS, int(1.5 * rate * seconds))
STEPS = ("full_migration", "rollback")


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
               pool_rows: int = POOL_ROWS) -> LoadRun:
    """``step(name)`` for each of ``STEPS`` (its error, or None) in the database of ``dsn``
    while ``LiveLoad`` (given ``plan``: ``SchemaLoad``) writes to it; what the
    application saw.  A step that fails ends the run (the next is not tried); a host
    without pgbench 15 or later is an ``error``, not an exception."""
    result = LoadRun(rate, clients)
    try:
        load: LiveLoad = (
            LiveLoad(dsn, rate=rate, clients=clients, schema=schema) if plan is None else
            SchemaLoad(dsn, plan, rate=rate, clients=clients - PREPARED_CLIENTS,
                       prepared_clients=PREPARED_CLIENTS, pool_rows=pool_rows))
        with load:
            time.sleep(baseline_s)
            for name in STEPS:
                load.phase(name)
                error = step(name)
                if error is not None:
                    result.error = f"{name}: {error}"
                    break
            load.phase("after")
            time.sleep(1.0)  # the transactions the steps held up complete in "after"
            report = load.stop()
    except LoadUnavailable as exc:
        result.error = f"no load was run: {exc}"
        return result
    result.phases, result.transactions = report.phases, report.transactions
    result.problems = report.problems()
    result.notes = report.notes()
    if isinstance(load, SchemaLoad):
        result.notes += [f"not written: {why}" for why in load.skipped]
    return result
