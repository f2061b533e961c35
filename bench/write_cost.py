"""What the engine's triggers cost the application's writes (``bench/run.py --write-cost``).

One fresh clone of a scale's template is taken through the migration, and at four
states of it pgbench runs the same writes an application makes on the four tables,
unthrottled, on ``clients`` connections (one by default, so that a write's time is
the figure and not the machine's two cores), after a warm-up of the same writes that is
not measured (``WriteCostSettings``):

- ``before``: the legacy schema, no engine object (the baseline of ``expanded``);
- ``expanded``: after ``full_migration --postpone-swap``: every key column has its
  copy beside it, kept in step by its sync trigger, and the change log's trigger
  records every write (what each write pays during the migration);
- ``migrated``: after ``full_migration`` (swapped and validated): the keys are uuid,
  and the change log's trigger still records every write until ``cleanup_backup``;
- ``cleaned``: after ``cleanup_backup``: uuid keys, no engine trigger (the baseline
  of ``migrated``).

The writes, one transaction each, in equal weights: a new user, an update of a user,
a new journal entry, an update of an entry, a new tag, and a delete of a reminder
(every delete finds its row: each takes the next of the picked reminders, from a
sequence).  Rows are picked from ``bench_writes.picks``, a random sample of existing
ids taken once; the key travels as a parameter (``--protocol=prepared``), so the same
script runs on string and on uuid keys.  A pick is a primary-key read made by every
state alike.  Each state is reported as writes per second, microseconds per write
(``clients`` / rate), the server's CPU microseconds per write (all its processes, from
``/proc``, for a server on this machine: a figure the machine's other load moves far
less than the rate), and the cost of the triggers: the difference to its baseline in
microseconds and the ratio, of the time and of the CPU.  The states follow one another on one
database, so the later ones run on tables a few thousand rows larger: the comparison
is within one run, never across runs.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import probe
from migration.connection import connect
from migration.rehearsal.load import find_pgbench, libpq_env

SCHEMA = "bench_writes"
PICKS = 200_000  # at most this many picked rows of each table (fewer on smaller tables)
STATES = ("before", "expanded", "migrated", "cleaned")
# (state measured, its baseline, what its extra cost is)
COMPARISONS = (("expanded", "before", "sync triggers and change log, during the migration"),
               ("migrated", "cleaned", "change log, after full_migration until cleanup_backup"))

_RANDOM = "\\set g random(1, :picks)\n"
_PICK = _RANDOM + "SELECT user_id AS gid FROM bench_writes.picks WHERE n = :g \\gset\n"
SCRIPTS: dict[str, str] = {
    "insert_user": "INSERT INTO users (email, display_name) VALUES "
                   "('w-' || gen_random_uuid()::text || '@example.com', 'bench writer');\n",
    "update_user": _PICK + "UPDATE users SET display_name = md5(random()::text) WHERE id = :gid;\n",
    "insert_entry": _PICK + "INSERT INTO journal_entries (user_id, title, body, mood) "
                            "VALUES (:gid, 'bench', md5(random()::text), 3);\n",
    "update_entry": _RANDOM + "UPDATE journal_entries SET body = md5(random()::text) "
                    "WHERE id = (SELECT entry_id FROM bench_writes.picks WHERE n = :g);\n",
    "insert_tag": _PICK + "INSERT INTO tags (user_id, name, color) "
                          "VALUES (:gid, 'w-' || md5(random()::text), '#123456');\n",
    "delete_reminder": "SELECT nextval('bench_writes.deletes') AS d \\gset\n"
                       "DELETE FROM reminders WHERE id = (SELECT reminder_id FROM "
                       "bench_writes.picks WHERE n = :d);\n",
}

_SETUP = """
DROP SCHEMA IF EXISTS bench_writes CASCADE;
CREATE SCHEMA bench_writes;
CREATE SEQUENCE bench_writes.deletes;
CREATE TABLE bench_writes.picks (n bigint PRIMARY KEY, user_id text NOT NULL,
                                 entry_id text NOT NULL, reminder_id text NOT NULL);
INSERT INTO bench_writes.picks
SELECT u.n, u.id, e.id, r.id
FROM (SELECT id::text AS id, row_number() OVER () AS n
      FROM (SELECT id FROM users ORDER BY random() LIMIT %(n)s) s) u
JOIN (SELECT id::text AS id, row_number() OVER () AS n
      FROM (SELECT id FROM journal_entries ORDER BY random() LIMIT %(n)s) s) e USING (n)
JOIN (SELECT id::text AS id, row_number() OVER () AS n
      FROM (SELECT id FROM reminders ORDER BY random() LIMIT %(n)s) s) r USING (n);
ANALYZE bench_writes.picks;
"""

_TRIGGERS = """
SELECT c.relname || ': ' || t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace AND c.relname = ANY (%s)
ORDER BY 1
"""


@dataclass(frozen=True)
class WriteCostSettings:
    """How long each state is written to: ``seconds``, or exactly ``transactions`` per
    client when given (the suite's tiny runs), after ``warmup`` seconds (or as many
    transactions) of the same writes, not measured: the state's first writes would
    otherwise read the pages an application's writes find cached."""

    seconds: float = 20.0
    clients: int = 1
    transactions: int | None = None
    warmup: float = 5.0


class WriteCostError(RuntimeError):
    """pgbench or an engine step failed; the message says which and why."""


def _pgbench_argv(binary: Path, workdir: Path, settings: WriteCostSettings, picks: int
                  ) -> list[str]:
    argv = [str(binary), "--no-vacuum", "--protocol=prepared", f"--client={settings.clients}",
            f"--jobs={settings.clients}", f"--define=picks={picks}"]
    argv.append(f"--transactions={settings.transactions}" if settings.transactions
                else f"--time={max(1, round(settings.seconds))}")
    for name, script in SCRIPTS.items():
        path = workdir / f"{name}.sql"
        path.write_text(script)
        argv.append(f"--file={path}@1")
    return argv


_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def parse_pgbench(output: str) -> dict[str, float]:
    """Transactions, failed transactions and rate from pgbench's summary."""
    tps, processed = _TPS.search(output), _PROCESSED.search(output)
    if not tps or not processed:
        raise WriteCostError(f"pgbench printed no summary:\n{output[-1500:]}")
    failed = _FAILED.search(output)
    return {"transactions": int(processed[1]), "failed": int(failed[1]) if failed else 0,
            "tps": float(tps[1])}


def _scalar(dsn: str, query: str, params: Any = None) -> Any:
    conn = connect(dsn, readonly=True)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def engine_triggers(dsn: str, tables: list[str]) -> list[str]:
    """``table: trigger`` of every trigger on ``tables`` (the benchmark's schema has none of
    its own, so these are the engine's)."""
    conn = connect(dsn, readonly=True)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(_TRIGGERS, (tables,))
            return [str(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()


def change_log_rows(dsn: str) -> int | None:
    """Rows of ``migration_backup.change_log``; None when there is none."""
    if not _scalar(dsn, "SELECT to_regclass('migration_backup.change_log') IS NOT NULL"):
        return None
    return int(_scalar(dsn, "SELECT count(*) FROM migration_backup.change_log"))


def _pgbench(argv: list[str], owner_dsn: str, state: str) -> str:
    """Run pgbench to its end; its standard output."""
    run = subprocess.run(argv, capture_output=True, text=True, env=libpq_env(owner_dsn),
                         check=False)
    if run.returncode != 0:
        raise WriteCostError(f"pgbench in state {state} exited {run.returncode}:\n"
                             f"{run.stdout[-1500:]}\n{run.stderr[-1500:]}")
    return run.stdout


def measure_write_cost(owner_dsn: str, admin_dsn: str, tables: list[str],
                       settings: WriteCostSettings, *,
                       engine: Callable[[str, list[str]], probe.ProcessResult],
                       workdir: Path | None = None,
                       say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The four states on the database of ``owner_dsn`` (changed: use a fresh clone).

    ``engine(operation, extra_args)`` runs one engine operation on it.
    """
    binary = find_pgbench()
    workdir = Path(tempfile.mkdtemp(prefix="uuidmig-writes-", dir=workdir))
    conn = connect(owner_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(_SETUP, {"n": PICKS})
            cur.execute("SELECT count(*) FROM bench_writes.picks")
            picks = int((cur.fetchone() or [0])[0])
    finally:
        conn.close()
    argv = _pgbench_argv(binary, workdir, settings, picks)
    warmup = _pgbench_argv(binary, workdir, replace(settings, seconds=settings.warmup), picks)
    steps: dict[str, float] = {}
    server_cpu = probe.ServerCpu(admin_dsn)
    states: dict[str, dict[str, Any]] = {}
    before_each = {"expanded": ("full_migration", ["--postpone-swap"]),
                   "migrated": ("full_migration", []),
                   "cleaned": ("cleanup_backup", [])}
    for state in STATES:
        if state in before_each:
            operation, extra = before_each[state]
            say(f"write cost: {operation} {' '.join(extra)}".rstrip())
            proc = engine(operation, extra)
            if proc.exit_code != 0:
                raise WriteCostError(f"{operation} {' '.join(extra)} failed (exit "
                                     f"{proc.exit_code}):\n{proc.stdout}\n{proc.stderr}")
            steps[f"{operation} {' '.join(extra)}".rstrip()] = proc.wall
        probe.checkpoint(admin_dsn)
        _pgbench(warmup, owner_dsn, state)
        logged = change_log_rows(owner_dsn)
        cpu_before = server_cpu.read()
        figures = parse_pgbench(_pgbench(argv, owner_dsn, state))
        cpu_after = server_cpu.read()
        after = change_log_rows(owner_dsn)
        states[state] = {
            **figures, "us_per_write": settings.clients * 1e6 / figures["tps"],
            "server_cpu_us_per_write": None if cpu_before is None or cpu_after is None
            else (cpu_after - cpu_before) * 1e6 / figures["transactions"],
            "triggers": engine_triggers(owner_dsn, tables),
            "change_log_rows_added": None if logged is None or after is None
            else after - logged}
        say(f"write cost: {state}: {figures['tps']:,.0f} writes/s, "
            f"{states[state]['us_per_write']:,.0f} us a write")
    return {"clients": settings.clients, "seconds": settings.seconds, "warmup_s": settings.warmup,
            "transactions_per_client": settings.transactions, "picks": picks,
            "scripts": list(SCRIPTS), "states": states, "engine_steps_s": steps,
            "comparisons": compare(states)}


def compare(states: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each state with triggers against its baseline: extra µs a write, and the ratio."""
    found = []
    for state, baseline, what in COMPARISONS:
        with_, without = states[state], states[baseline]
        found.append({"state": state, "baseline": baseline, "what": what,
                      "tps": with_["tps"], "baseline_tps": without["tps"],
                      "us_per_write": with_["us_per_write"],
                      "baseline_us_per_write": without["us_per_write"],
                      "extra_us_per_write": with_["us_per_write"] - without["us_per_write"],
                      "ratio": with_["us_per_write"] / without["us_per_write"],
                      **_cpu_comparison(with_["server_cpu_us_per_write"],
                                        without["server_cpu_us_per_write"])})
    return found


def _cpu_comparison(with_: float | None, without: float | None) -> dict[str, float | None]:
    """The CPU figures' difference and ratio; None where a figure is missing, and no ratio
    to a baseline of 0 (a run too short for /proc's clock ticks, as in the suite's)."""
    if with_ is None or without is None:
        return {"extra_cpu_us_per_write": None, "cpu_ratio": None}
    return {"extra_cpu_us_per_write": with_ - without,
            "cpu_ratio": with_ / without if without > 0 else None}


def _opt(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def render(result: Mapping[str, Any] | None) -> list[str]:
    """The Markdown lines of one scale's write cost (none when it was not measured)."""
    if not result:
        return []
    run = (f"{result['transactions_per_client']} transactions" if
           result["transactions_per_client"] else
           f"{result['seconds']:g} s after {result.get('warmup_s', 0):g} s unmeasured")
    lines = ["", f"Cost of the engine's triggers to the application's writes (pgbench, "
                 f"{result['clients']} client(s), unthrottled, {run} per state; "
                 f"{', '.join(result['scripts'])}):", "",
             "| state | writes/s | µs a write | server CPU µs a write | failed | "
             "change log rows added | engine triggers |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["states"].items():
        added = "-" if s["change_log_rows_added"] is None else f"{s['change_log_rows_added']:,}"
        lines.append(f"| {name} | {s['tps']:,.0f} | {s['us_per_write']:,.0f} | "
                     f"{_opt(s.get('server_cpu_us_per_write'), ',.0f')} | {s['failed']} | "
                     f"{added} | {len(s['triggers'])} |")
    lines += ["", "| triggers | with: writes/s | without: writes/s | extra µs a write | "
                  "x time a write | extra server CPU µs a write | x server CPU a write |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['what']} ({c['state']} / {c['baseline']}) | {c['tps']:,.0f} | "
                     f"{c['baseline_tps']:,.0f} | {c['extra_us_per_write']:,.0f} | "
                     f"{c['ratio']:.2f} | {_opt(c.get('extra_cpu_us_per_write'), ',.0f')} | "
                     f"{_opt(c.get('cpu_ratio'), '.2f')} |")
    return lines
