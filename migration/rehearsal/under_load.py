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
fail the rehearsal.  pgbench's scripts write the runbook's tables, so the option
does not go with ``--schema-from``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from migration.rehearsal.load import LiveLoad, LoadUnavailable, PhaseStats, find_pgbench

RATE, CLIENTS = 150.0, 4  # the live-load tests' and the benchmark's default load
BASELINE_S = 3.0  # seconds of load before the migration: the "before" phase
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
               baseline_s: float = BASELINE_S) -> LoadRun:
    """``step(name)`` for each of ``STEPS`` (its error, or None) in the database of ``dsn``
    while ``LiveLoad`` writes to it; what the application saw.  A step that fails
    ends the run (the next is not tried); a host without pgbench 15 or later is an
    ``error``, not an exception."""
    result = LoadRun(rate, clients)
    try:
        with LiveLoad(dsn, rate=rate, clients=clients, schema=schema) as load:
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
    return result
