"""Benchmark: downtime, lock time, scale and memory of the migration, against the
one-shot rewrite and the runbook's naive loop, on identical copies of the data.

    python bench/run.py --scales 100000,1000000 --batch-sizes 1000,10000,50000 \\
        --json bench/results/run.json [--pg-bin DIR | --pg=embedded | --pg-dsn DSN]

What it does, per scale S (``--scales``):

1. builds one template database with the legacy schema and S users, 3S journal
   entries (~200 bytes of text each), S tags and S reminders, generated inside the
   server (``migration.rehearsal.seed``), then ``VACUUM (FREEZE, ANALYZE)`` so every copy starts
   with the same visibility state;
2. for each measured method, a fresh clone of it (``CREATE DATABASE ... TEMPLATE``),
   a ``CHECKPOINT``, then the method in its own process:
   - ``one_shot``: one transaction, drop FKs, ``ALTER COLUMN ... TYPE uuid USING``
     on the four columns, re-add FKs (the physical-limit reference);
   - ``naive_loop``: the runbook read literally (``bench.methods``): keyset batches
     of 1000, a commit per batch, then a swap that rebuilds everything under lock;
   - ``full_migration``: ``python -m migration.cli --operation=full_migration`` at the
     default batch size (1000) and at every ``--batch-sizes`` value; its per-step
     times come from ``migration_log`` (started_at/completed_at);
   - ``verify`` (``python -m migration.verify``, the read-only checks in one
     snapshot) on the default-batch migrated copy, then ``rollback`` from that
     finished migration;
3. reports per method: wall seconds (process spawn to exit), rows per second (rows
   of the four tables), ratio to ``one_shot``, the longest ACCESS EXCLUSIVE hold of
   any transaction on the plan's tables and the longest write-blocking (SHARE or
   stronger) hold, both sampled from ``pg_locks`` by a second connection every 5 ms
   (``--sample-ms``; see ``bench.probe`` for the resolution: the figure is an upper
   bound within two sampling gaps, and the achieved gaps are in the JSON), WAL bytes
   (``pg_current_wal_insert_lsn`` difference), as a ratio to the one-shot's and, for the
   engine, per step (sampled), rows updated and HOT-updated per table
   (``pg_stat_user_tables``), tables plus indexes before and after
   (``pg_total_relation_size``) and the backup schema's size, and the peak RSS of the
   method's process (``os.wait4`` rusage);
4. checks that every method ends with the same data (a digest over the four tables,
   columns by name, keys compared as uuid), and that the rollback restores the
   original text exactly;
5. prints Markdown tables and the targets of issue 6, and writes everything, with
   the server version and settings, to ``--json``;
6. with ``--live-load``: ``one_shot`` and ``full_migration`` (default batch) again, each
   on a fresh clone under the same application load (``migration.rehearsal.load``:
   pgbench at ``--load-rate`` with ``--load-clients``, plus the orphan prober), started
   ``--load-warmup`` seconds before the method: the longest write stall during it (no
   application transaction completing), p99 and max latency before and during it, the
   seconds some foreign key was unenforced, failed application transactions and
   committed writes missing afterwards.  The method's exit code is recorded, not raised.
7. with ``--write-cost``: what the engine's triggers cost the application's writes, on a
   clone of its own (``bench.write_cost``: pgbench before, during and after
   ``full_migration`` and after ``cleanup_backup``);
8. with ``--standby``: a streaming standby of the server (``bench.standby``), and each
   method's longest replay lag in bytes and seconds; full_migration runs with
   ``--max-replica-lag`` (the engine's default, or the one given) and once more, at the
   default batch size on a clone of its own, without one (0): the two lags side by side,
   with the seconds the limit held the run back.

A failed rollback is recorded with its exit code and error, not raised: the figures of
the scale's other methods are kept.

``--skip naive_loop,verify,rollback`` leaves those methods out (the one-shot and
full_migration always run: the ratios need both).

By default it starts its own throwaway server: the local PostgreSQL 15 binaries
(/usr/lib/postgresql/15/bin) with shared_buffers=512MB when present, else the
embedded wheel (``--pg-setting`` adds settings).  No table is ever fetched into
Python: the benchmark's own memory stays flat whatever the scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg2 import sql

from bench import probe
from bench.standby import ReplayLag, caught_up, start_standby
from bench.write_cost import WriteCostSettings, measure_write_cost
from bench.write_cost import render as render_write_cost
from migration.connection import connect
from migration.lag import DEFAULT_MAX_REPLICA_LAG_S
from migration.plan import build_plan
from migration.rehearsal.load import LiveLoad, PhaseStats
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, prepare
from migration.rehearsal.seed import seed
from migration.rehearsal.throwaway import Server, embedded_bin_dir, from_dsn, start_cluster
from migration.rehearsal.waits import describe as describe_waits

REPO = Path(__file__).resolve().parent.parent
LOCAL_PG15 = Path("/usr/lib/postgresql/15/bin")
DEFAULT_SETTINGS = ("shared_buffers=512MB",)
DEFAULT_BATCH = 1000  # the engine's default (--batch-size)
RUNBOOK_STEPS = ("validate_schema", "backup_data", "migrate_users", "migrate_foreign_keys",
                 "validate_migration")
REPORTED_SETTINGS = ("shared_buffers", "work_mem", "maintenance_work_mem", "max_wal_size",
                     "checkpoint_timeout", "wal_level", "fsync", "full_page_writes",
                     "synchronous_commit", "wal_buffers", "effective_io_concurrency",
                     "max_parallel_maintenance_workers", "max_parallel_workers_per_gather",
                     "autovacuum", "jit")
MiB = 1024 * 1024
SKIPPABLE = ("naive_loop", "verify", "rollback")  # --skip: all but the one-shot and ours
# --standby: full_migration once more, on a clone of its own, the standbys not waited for
NO_LAG_LIMIT = f"full_migration b={DEFAULT_BATCH} without --max-replica-lag"
_PAUSE = re.compile(r"after a pause of ([\d.]+) s")  # the engine's line as the fill goes on


class BenchError(RuntimeError):
    """A measured method exited with an error."""


# -- databases --------------------------------------------------------------------------------

def _admin(box: Sandbox, dbname: str | None = None) -> Any:
    conn = connect(box.admin_dsn if dbname is None else box.admin_dsn_for(dbname),
                   autocommit=True)
    return conn


def _server_major(box: Sandbox) -> int:
    conn = _admin(box)
    try:
        return int(conn.server_version) // 10000
    finally:
        conn.close()


def clone(box: Sandbox, template: str, name: str) -> str:
    """A fresh copy of ``template`` owned by the owner role; its owner DSN."""
    box.drop_database(name)
    strategy = sql.SQL(" STRATEGY FILE_COPY") if _server_major(box) >= 15 else sql.SQL("")
    box.admin_execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}{}").format(
        sql.Identifier(name), sql.Identifier(template), sql.Identifier(OWNER_ROLE), strategy))
    return box.owner_dsn(name)


def prepare_scale(box: Sandbox, users: int) -> dict[str, Any]:
    """The seeded template of one scale, with its rows, size and expected digests."""
    name = f"{box.prefix}_bench_s{users}"
    box.drop_database(name)
    owner_dsn = box.create_database(name, variant="legacy")
    started = time.monotonic()
    conn = connect(owner_dsn)
    try:
        seed(conn, users)
        plan = build_plan(conn)
    finally:
        conn.close()
    admin = _admin(box, name)
    try:
        with admin.cursor() as cur:
            cur.execute("VACUUM (FREEZE, ANALYZE)")
    finally:
        admin.close()
    seconds = time.monotonic() - started
    keys: dict[str, list[str]] = {}
    for key in plan.columns:
        keys.setdefault(key.table.name, []).append(key.column)
    tables = list(keys)
    as_uuid = probe.data_digest(owner_dsn, keys)
    as_text = probe.data_digest(owner_dsn, {t: [] for t in tables})
    return {"users": users, "template": name, "seed_s": seconds, "tables": tables,
            "keys": keys, "rows": sum(int(str(d["rows"])) for d in as_uuid.values()),
            "rows_by_table": {t: d["rows"] for t, d in as_uuid.items()},
            "size": probe.sizes(box.admin_dsn_for(name), tables),
            "expected_digest": as_uuid, "original_digest": as_text}


# -- running one method -----------------------------------------------------------------------

def _env(dsn: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DATABASE_URL"] = dsn
    return env


def method_command(method: str, *, batch_size: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "bench.methods", method]
    return argv + (["--batch-size", str(batch_size)] if batch_size else [])


def verify_command() -> list[str]:
    """The ``verify`` console command (read-only checks in one snapshot)."""
    return [sys.executable, "-m", "migration.verify", "--format", "json"]


def migration_command(operation: str, log_file: Path, *, batch_size: int = DEFAULT_BATCH
                      ) -> list[str]:
    return [sys.executable, "-m", "migration.cli", f"--operation={operation}",
            "--batch-size", str(batch_size), "--quiet", "--format", "json",
            "--log-file", str(log_file)]


def measure(box: Sandbox, dbname: str, scale: dict[str, Any], label: str, argv: list[str], *,
            sample_interval: float, check: bool = True, standby: bool = False
            ) -> dict[str, Any]:
    """Run ``argv`` against ``dbname`` (owner DSN in DATABASE_URL) and take every figure.

    A method that exits non-zero raises ``BenchError``, unless ``check`` is false: then
    its exit code and error are recorded (``exit_code``, ``error``) with its figures, so
    that a failed rollback does not take the run's other figures with it.  With
    ``standby``, the standby first catches up, and its replay lag is sampled throughout.
    """
    admin_db = box.admin_dsn_for(dbname)
    owner_dsn = box.owner_dsn(dbname)
    before = probe.sizes(admin_db, scale["tables"])
    updated_before = probe.updates(admin_db, scale["tables"])
    probe.checkpoint(box.admin_dsn)
    server_cpu = probe.ServerCpu(box.admin_dsn)
    load_before = os.getloadavg()
    lsn = probe.wal_lsn(box.admin_dsn)
    engine = engine_version()
    if standby:
        caught_up(box.admin_dsn)
    with probe.LockSampler(admin_db, scale["tables"], interval=sample_interval) as sampler, \
            probe.StepWal(admin_db, interval=max(sample_interval, 0.02)) as step_wal, \
            (ReplayLag(box.admin_dsn) if standby else nullcontext()) as lag:
        cpu_before = server_cpu.read()
        proc = probe.run_process(argv, env=_env(owner_dsn), cwd=str(REPO))
        cpu_after = server_cpu.read()
    wal = probe.wal_since(box.admin_dsn, lsn)
    server_cpu_s = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu_s = max(0.0, cpu_after - cpu_before - (sampler.own_server_cpu or 0.0))
    if proc.exit_code != 0 and check:
        raise BenchError(f"{label} failed (exit {proc.exit_code}):\n{proc.stdout}\n{proc.stderr}")
    locks = sampler.report()
    after = probe.sizes(admin_db, scale["tables"])
    updated = probe.updates(admin_db, scale["tables"])
    exclusive, blocking = locks.longest_exclusive, locks.longest_write_blocking
    return {
        "label": label, "database": dbname, "engine": engine, "wall_s": proc.wall,
        "rows": scale["rows"],
        "rows_per_s": scale["rows"] / proc.wall,
        "max_access_exclusive_s": exclusive.upper if exclusive else 0.0,
        "max_access_exclusive_table": exclusive.table if exclusive else None,
        "max_access_exclusive_query": exclusive.query if exclusive else None,
        "max_write_blocking_s": blocking.upper if blocking else 0.0,
        "max_write_blocking_table": blocking.table if blocking else None,
        "max_write_blocking_query": blocking.query if blocking else None,
        "locks": locks.as_dict(), "wal_bytes": wal, "wal_bytes_by_step": step_wal.bytes,
        "size_before": before, "size_after": after,
        "updates": {t: {k: v - updated_before.get(t, {}).get(k, 0) for k, v in u.items()}
                    for t, u in updated.items()},
        "peak_rss_bytes": proc.max_rss_bytes, "cpu_user_s": proc.user_cpu,
        "cpu_system_s": proc.system_cpu, "server_cpu_s": server_cpu_s,
        "sampler_server_cpu_s": sampler.own_server_cpu,
        "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
        "argv": [a for a in proc.argv if "://" not in a],
        "stdout_tail": proc.stdout[-1000:], "exit_code": proc.exit_code,
        "error": (failed_step(owner_dsn) or _last_error(proc.stderr)) if proc.exit_code else None,
        "stderr_tail": proc.stderr[-2000:] if proc.exit_code else "",
        "replay_lag": lag.as_dict() if lag is not None else None,
    }


@dataclass(frozen=True)
class LoadSettings:
    """The application load of ``--live-load``."""

    rate: float = 150.0  # transactions per second, all clients together
    clients: int = 4
    warmup: float = 3.0  # seconds of load before the method starts ("before" phase)


def _phase(stats: PhaseStats) -> dict[str, Any]:
    return {"seconds": stats.seconds, "transactions": stats.transactions,
            "failures": stats.failures, "p50_ms": stats.latency_p50_ms,
            "p99_ms": stats.latency_p99_ms, "max_ms": stats.latency_max_ms,
            "longest_stall_s": stats.longest_stall_s,
            "longest_stall_at_s": stats.longest_stall_at,
            "longest_stall_step": stats.longest_stall_step,
            "longest_due_stall_s": stats.longest_due_stall_s,
            "waits": list(stats.waits), "due_stall_waits": list(stats.due_stall_waits)}


def measure_live(owner_dsn: str, label: str, argv: list[str], load: LoadSettings
                 ) -> dict[str, Any]:
    """Run ``argv`` under the application load; what the application saw."""
    with LiveLoad(owner_dsn, rate=load.rate, clients=load.clients) as live:
        time.sleep(load.warmup)
        live.phase("during")
        proc = probe.run_process(argv, env=_env(owner_dsn), cwd=str(REPO))
        live.phase("after")
        time.sleep(1.0)  # the transactions the method held up complete in "after"
        report = live.stop()
    before, during = report.phase("before"), report.phase("during")
    reasons = sorted({f"{f.script}: {f.reason}" for f in report.failures})
    return {
        "label": label, "exit_code": proc.exit_code, "wall_s": proc.wall,
        "rate": load.rate, "clients": load.clients,
        "before": _phase(before), "during": _phase(during),
        "after": _phase(report.phase("after")),
        "longest_stall_s": during.longest_stall_s,
        "longest_stall_at_s": during.longest_stall_at,
        "longest_stall_step": during.longest_stall_step,
        "longest_due_stall_s": during.longest_due_stall_s,
        "fk_unenforced_s": report.fk_unenforced_s,
        "orphans_accepted": len(report.orphans_accepted),
        "probe_errors": len(report.probe_errors), "probes": report.probes,
        "failed_transactions": len(report.failures), "failure_reasons": reasons[:10],
        "transactions": report.transactions,
        "missing_writes": len(report.missing_writes),
        "ledger_rows": sum(report.ledger_rows.values()),
        "problems": report.problems(),
        "error": (failed_step(owner_dsn) or _last_error(proc.stderr)) if proc.exit_code else None,
        "stdout_tail": proc.stdout[-1000:], "stderr_tail": proc.stderr[-1000:],
    }


def _last_error(stderr: str) -> str:
    """The last line of a process's stderr that names an error (a traceback's last line)."""
    lines = [line.strip() for line in stderr.splitlines() if "error" in line.lower()]
    return lines[-1] if lines else stderr.strip()[-200:]


def failed_step(owner_dsn: str, schema: str = "public") -> str | None:
    """The message of the last failed migration_log operation, if there is one."""
    conn = connect(owner_dsn, readonly=True)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (sql.Identifier(schema, "migration_log").as_string(conn),))
            if not (cur.fetchone() or [False])[0]:
                return None
            cur.execute(sql.SQL("SELECT coalesce(message, operation) FROM {} "
                                "WHERE status = 'failed' ORDER BY id DESC LIMIT 1").format(
                sql.Identifier(schema, "migration_log")))
            row = cur.fetchone()
            return str(row[0]).splitlines()[0] if row else None
    finally:
        conn.close()


def migration_steps(owner_dsn: str, schema: str = "public") -> list[dict[str, Any]]:
    """Every migration_log row, oldest first, with its duration."""
    conn = connect(owner_dsn, readonly=True)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL(
                "SELECT id, operation, status, rows_processed, "
                "extract(epoch FROM completed_at - started_at)::float8 "
                "FROM {} ORDER BY id").format(sql.Identifier(schema, "migration_log")))
            return [{"id": i, "operation": op, "status": st, "rows": rows, "seconds": secs}
                    for i, op, st, rows, secs in cur.fetchall()]
    finally:
        conn.close()


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)$")


def log_timeline(path: Path) -> list[dict[str, Any]]:
    """The engine's log file as events, each with the seconds since the one before."""
    events: list[dict[str, Any]] = []
    previous = None
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
        events.append({"message": match[3][:160], "level": match[2],
                       "since_previous_s": (at - previous).total_seconds() if previous else 0.0})
        previous = at
    return events


def paused_s(log_file: Path) -> float:
    """The seconds the engine's log says a run waited for the standbys (--max-replica-lag)."""
    if not log_file.exists():
        return 0.0
    text = log_file.read_text(errors="replace")
    return sum((float(found[1]) for found in _PAUSE.finditer(text)), 0.0)


def _check_data(box: Sandbox, dbname: str, scale: dict[str, Any], result: dict[str, Any], *,
                original: bool = False) -> None:
    """Record whether the method's data equal the expected state (``data_equal``).

    Expected: the template's rows with the keys cast to uuid, or for the
    rollback the template's rows exactly as they were.  Tables that differ are
    listed in ``data_differences``.
    """
    keys = {t: [] for t in scale["tables"]} if original else scale["keys"]
    digest = probe.data_digest(box.owner_dsn(dbname), keys)
    expected = scale["original_digest" if original else "expected_digest"]
    differing = [t for t in scale["tables"]
                 if (digest[t]["rows"], digest[t]["digest"])
                 != (expected[t]["rows"], expected[t]["digest"])]
    result["data_equal"] = not differing
    if differing:
        result["data_differences"] = {t: {"found": digest[t], "expected": expected[t]}
                                      for t in differing}


# -- one scale, the whole run -----------------------------------------------------------------

def run_scale(box: Sandbox, users: int, batch_sizes: Sequence[int], *,
              sample_interval: float = 0.005, methods: Sequence[str] = ("one_shot", "naive_loop"),
              workdir: Path | None = None, live_load: LoadSettings | None = None,
              skip: Sequence[str] = (), write_cost: WriteCostSettings | None = None,
              standby: bool = False, max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG_S,
              say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every method on fresh clones of one seeded scale, but those in ``skip``
    (``SKIPPABLE``), and with ``write_cost`` the triggers' cost to the application's
    writes (``bench.write_cost``) on a clone of its own; the figures as a dict.

    ``standby``: full_migration runs with ``--max-replica-lag=max_replica_lag``, and once
    more at the default batch size with 0 (``NO_LAG_LIMIT``), for the two lags side by side.
    """
    methods = [method for method in methods if method not in skip]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="uuidmig-bench-"))
    say(f"S={users:,}: seeding")
    scale = prepare_scale(box, users)
    say(f"S={users:,}: {scale['rows']:,} rows seeded in {scale['seed_s']:.1f} s, "
        f"{scale['size']['total'] / MiB:.0f} MiB")
    results: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    writes: dict[str, Any] | None = None
    template = scale["template"]
    created: list[str] = []

    def fresh(name: str) -> str:
        created.append(name)
        return clone(box, template, name)

    def lag_limit(seconds: float) -> list[str]:
        """A full_migration's ``--max-replica-lag`` with a standby (none without one)."""
        return ["--max-replica-lag", f"{seconds:g}"] if standby else []

    def limited(result: dict[str, Any], seconds: float, log_file: Path) -> None:
        """Record a full_migration's lag limit and the seconds it held the run back."""
        if standby:
            result.update(max_replica_lag_s=seconds, replica_lag_paused_s=paused_s(log_file))

    def one(label: str, method: str, argv: list[str], dbname: str, *, check: bool = True,
            **extra: Any) -> dict[str, Any]:
        say(f"S={users:,}: {label}")
        result = measure(box, dbname, scale, label, argv, sample_interval=sample_interval,
                         check=check, standby=standby)
        result.update(method=method, **extra)
        if result["exit_code"]:
            say(f"S={users:,}: {label} FAILED (exit {result['exit_code']}): {result['error']}")
        say(f"S={users:,}: {label}: {result['wall_s']:.2f} s, longest ACCESS EXCLUSIVE "
            f"{result['max_access_exclusive_s'] * 1000:.0f} ms, "
            f"peak RSS {result['peak_rss_bytes'] / MiB:.0f} MiB")
        results.append(result)
        return result

    try:
        for method in methods:
            name = f"{template}_{method}"
            fresh(name)
            result = one(method, method, method_command(method), name)
            _check_data(box, name, scale, result)
            box.drop_database(name)
        kept = None
        for batch in sorted({DEFAULT_BATCH, *batch_sizes}):
            name = f"{template}_ours_{batch}"
            fresh(name)
            log_file = workdir / f"s{users}_b{batch}.log"
            label = f"full_migration b={batch}" + (" (default)" if batch == DEFAULT_BATCH else "")
            result = one(label, "full_migration", migration_command("full_migration", log_file,
                                                                    batch_size=batch)
                         + lag_limit(max_replica_lag), name, batch_size=batch,
                         default=batch == DEFAULT_BATCH)
            limited(result, max_replica_lag, log_file)
            result["steps"] = migration_steps(box.owner_dsn(name))
            result["timeline"] = log_timeline(log_file)
            _check_data(box, name, scale, result)
            if batch == DEFAULT_BATCH:
                kept = name
            else:
                box.drop_database(name)
        assert kept is not None
        if standby:
            name = f"{template}_ours_no_lag_limit"
            fresh(name)
            log_file = workdir / f"s{users}_no_lag_limit.log"
            result = one(NO_LAG_LIMIT, "full_migration_no_lag_limit",
                         migration_command("full_migration", log_file) + lag_limit(0.0), name,
                         batch_size=DEFAULT_BATCH)
            limited(result, 0.0, log_file)
            _check_data(box, name, scale, result)
            box.drop_database(name)
        if "verify" not in skip:
            one("verify", "verify", verify_command(), kept)
        if "rollback" not in skip:
            log_file = workdir / f"s{users}_rollback.log"
            # The way out is measured to the end: a failure is reported with the figures.
            result = one("rollback", "rollback", migration_command("rollback", log_file), kept,
                         check=False)
            result["timeline"] = log_timeline(log_file)
            if result["exit_code"] == 0:
                _check_data(box, kept, scale, result, original=True)
        box.drop_database(kept)
        if live_load is not None:
            for label, argv in live_methods(workdir / f"s{users}_live.log"):
                name = f"{template}_live_{label}"
                say(f"S={users:,}: {label} under load")
                live.append(measure_live(fresh(name), label, argv, live_load))
                box.drop_database(name)
        if write_cost is not None:
            name = f"{template}_writes"
            dsn = fresh(name)
            log_file = workdir / f"s{users}_writes.log"

            def engine(operation: str, extra: list[str]) -> probe.ProcessResult:
                return probe.run_process(migration_command(operation, log_file) + extra,
                                         env=_env(dsn), cwd=str(REPO))

            writes = measure_write_cost(dsn, box.admin_dsn, scale["tables"], write_cost,
                                        engine=engine, workdir=workdir,
                                        say=lambda text: say(f"S={users:,}: {text}"))
            box.drop_database(name)
    finally:
        for name in [*created, template]:
            box.drop_database(name)
    _derive(results)
    return {"users": users, **{k: v for k, v in scale.items()
                               if k not in ("expected_digest", "original_digest")},
            "digests": {"migrated": scale["expected_digest"],
                        "original": scale["original_digest"]},
            "results": results, "live_load": live, "write_cost": writes}


def live_methods(log_file: Path) -> list[tuple[str, list[str]]]:
    """What ``--live-load`` runs under the load: the one-shot, and ours at the default batch."""
    return [("one_shot", method_command("one_shot")),
            ("full_migration", migration_command("full_migration", log_file))]


def _derive(results: list[dict[str, Any]]) -> None:
    """Ratios to the one-shot rewrite and to the default migration; the best batch size."""
    base = next((r for r in results if r["method"] == "one_shot"), None)
    ours = [r for r in results if r["method"] == "full_migration"]
    default = next((r for r in ours if r.get("default")), None)
    best = min(ours, key=lambda r: r["wall_s"], default=None)
    for result in results:
        result["ratio_to_one_shot"] = result["wall_s"] / base["wall_s"] if base else None
        result["wal_ratio_to_one_shot"] = (result["wal_bytes"] / base["wal_bytes"]
                                           if base and base["wal_bytes"] else None)
        result["ratio_to_full_migration"] = (result["wall_s"] / default["wall_s"]
                                             if default else None)
        result["best"] = result is best


def server_info(box: Sandbox, server: Server | None, start_settings: Sequence[str]
                ) -> dict[str, Any]:
    conn = _admin(box)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version(), current_setting('server_version')")
            version, short = cur.fetchone() or ("", "")
            cur.execute("SELECT name, current_setting(name) FROM pg_settings "
                        "WHERE name = ANY (%s) ORDER BY name", (list(REPORTED_SETTINGS),))
            settings = dict(cur.fetchall())
    finally:
        conn.close()
    return {"version": short, "version_full": version,
            "backend": server.describe() if server else "given sandbox",
            "start_settings": list(start_settings), "settings": settings}


def engine_version() -> str:
    """A digest of the engine's source (every ``migration/**/*.py``, the engine's
    subpackage included) as the measured process loads it.

    Recorded with every measurement: other people may change the engine during a
    long run, and figures from two versions must not be compared unawares.
    """
    digest = hashlib.sha256()
    package = REPO / "migration"
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "migration"],
                               capture_output=True, text=True, check=False, timeout=10)
        return out.stdout.strip() + ("+dirty migration/" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_benchmark(box: Sandbox, scales: Sequence[int], batch_sizes: Sequence[int], *,
                  server: Server | None = None, start_settings: Sequence[str] = (),
                  sample_interval: float = 0.005, live_load: LoadSettings | None = None,
                  skip: Sequence[str] = (), write_cost: WriteCostSettings | None = None,
                  standby: bool = False, max_replica_lag: float = DEFAULT_MAX_REPLICA_LAG_S,
                  say: Callable[[str], None] = lambda s: None,
                  partial: Callable[[dict[str, Any]], object] = lambda r: None) -> dict[str, Any]:
    """Every scale in turn; ``partial`` gets the report so far after each one.

    ``standby``: the server streams to a standby (``bench.standby``); each method's
    replay lag is sampled, and the owner role is granted ``pg_monitor``, as an operator
    who wants ``--max-replica-lag`` to hold the engine back grants it; full_migration runs
    with ``max_replica_lag``, and once more without a limit (``run_scale``).
    """
    if standby:
        box.admin_execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(OWNER_ROLE)))
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started_at": started.isoformat(), "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "server": server_info(box, server, start_settings),
        "parameters": {"scales": list(scales), "batch_sizes": list(batch_sizes),
                       "default_batch_size": DEFAULT_BATCH, "lock_sample_interval_s":
                       sample_interval,
                       "live_load": asdict(live_load) if live_load else None,
                       "skipped": list(skip),
                       "write_cost": asdict(write_cost) if write_cost else None,
                       "standby": standby,
                       "max_replica_lag_s": max_replica_lag if standby else None},
        "scales": [],
    }
    for users in scales:
        report["scales"].append(run_scale(box, users, batch_sizes,
                                          sample_interval=sample_interval,
                                          live_load=live_load, skip=skip,
                                          write_cost=write_cost, standby=standby,
                                          max_replica_lag=max_replica_lag, say=say))
        report["targets"] = evaluate_targets(report)
        report["engine_versions"] = sorted({r["engine"] for s in report["scales"]
                                            for r in s["results"]})
        partial(report)
    report["finished_at"] = datetime.now(UTC).isoformat()
    if len(report["engine_versions"]) > 1:
        say("WARNING: the engine's source changed during the run "
            f"({', '.join(report['engine_versions'])}); see each result's 'engine'")
    return report


# -- targets and rendering --------------------------------------------------------------------

def _pick(scale: dict[str, Any], method: str, *, best: bool = False) -> dict[str, Any] | None:
    rows = [r for r in scale["results"] if r["method"] == method]
    if method == "full_migration":
        rows = [r for r in rows if r.get("best" if best else "default")]
    return rows[0] if rows else None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets, at the largest scale (ratios within the same run)."""
    scales = sorted(report["scales"], key=lambda s: s["users"])
    if not scales:
        return []
    big, small = scales[-1], scales[0]
    targets: list[dict[str, Any]] = []

    def target(name: str, value: float | None, limit: float, goal: float | None,
               unit: str) -> None:
        met = value is not None and value <= limit
        targets.append({"target": name, "value": value, "limit": limit, "goal": goal,
                        "unit": unit, "met": met,
                        "goal_met": value is not None and goal is not None and value <= goal})

    default, best = _pick(big, "full_migration"), _pick(big, "full_migration", best=True)
    label = f"S={big['users']:,}"
    for which, result in (("default batch", default), ("best batch", best)):
        target(f"full_migration ({which}{', b=' + str(result['batch_size']) if result else ''}) "
               f"/ one-shot, {label}", result["ratio_to_one_shot"] if result else None,
               2.0, 1.5, "x")
    target(f"WAL of full_migration (default batch) / one-shot's, {label}",
           default.get("wal_ratio_to_one_shot") if default else None, 1.5, 1.5, "x")
    worst_lock = max((r["max_access_exclusive_s"] for s in scales for r in s["results"]
                      if r["method"] == "full_migration"), default=None)
    target("longest ACCESS EXCLUSIVE hold of full_migration, any scale and batch",
           worst_lock, 1.0, 0.1, "s")
    if len(scales) > 1:
        small_default = _pick(small, "full_migration")
        factor = big["users"] / small["users"]
        growth = (default["wall_s"] / small_default["wall_s"]
                  if default and small_default else None)
        target(f"full_migration time S={big['users']:,} / S={small['users']:,} "
               f"(x{factor:g} data)", growth, 1.1 * factor, None, "x")
    rss = [r["peak_rss_bytes"] / MiB for s in scales for r in s["results"]
           if r["method"] == "full_migration"]
    target("peak RSS of the full_migration process, any scale", max(rss, default=None), 150.0,
           None, "MiB")
    if len(scales) > 1:
        per_scale = [max(r["peak_rss_bytes"] for r in s["results"]
                         if r["method"] == "full_migration") / MiB for s in scales]
        target("peak RSS spread between scales (same at both)",
               max(per_scale) - min(per_scale), 10.0, None, "MiB")
    verify = _pick(big, "verify")
    target(f"verify / full_migration (default), {label}",
           verify["ratio_to_full_migration"] if verify else None, 0.5, None, "x")
    return targets


def _mb(value: float) -> str:
    return f"{value / MiB:,.0f}"


def _cpu(result: dict[str, Any]) -> str:
    client = result["cpu_user_s"] + result["cpu_system_s"]
    server = result.get("server_cpu_s")
    return f"{client:.1f}" if server is None else f"{server:.1f}+{client:.1f}"


def _lock(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _opt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _opt_s(value: float | None) -> str:
    """Seconds, or "-" in a report from before the figure was taken."""
    return "-" if value is None else f"{value:.2f}"


def render_live(live: list[dict[str, Any]]) -> list[str]:
    """The live-load table of one scale (no lines when it was not run)."""
    if not live:
        return []
    lines = ["", f"Under load ({live[0]['rate']:g} tps, {live[0]['clients']} clients; "
                 "latency in ms, before / during the method):", "",
             "| method | exit | wall s | longest write stall s (when, step) | with a "
             "transaction due s | p99 | max | FK unenforced s | failed tx | "
             "committed writes missing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in live:
        before, during = r["before"], r["during"]
        lines.append(
            f"| {r['label']} | {r['exit_code']} | {r['wall_s']:.2f} | "
            f"{r['longest_stall_s']:.2f}{_stall_when(r)} | "
            f"{_opt_s(r.get('longest_due_stall_s'))} | {_opt_ms(before['p99_ms'])} / "
            f"{_opt_ms(during['p99_ms'])} | {_opt_ms(before['max_ms'])} / "
            f"{_opt_ms(during['max_ms'])} | {r['fk_unenforced_s']:.1f} | "
            f"{r['failed_transactions']} of {r['transactions'] + r['failed_transactions']} | "
            f"{r['missing_writes']} of {r['ledger_rows']} |")
    reasons = sorted({reason for r in live for reason in r["failure_reasons"]})
    return (lines + [f"- {r['label']} exited {r['exit_code']}: {r['error']}" for r in live
                     if r["exit_code"] and r.get("error")]
            + [f"- failed: {reason}" for reason in reasons]
            + [_waited_on(r) for r in live if "due_stall_waits" in r["during"]])


def _waited_on(result: dict[str, Any]) -> str:
    """What the application's backends were sampled waiting on during the method's longest
    stall with a transaction due, and during the whole method."""
    def told(waits: list[list[Any]]) -> str:
        return describe_waits(tuple((str(wait), int(n)) for wait, n in waits))
    during = result["during"]
    return (f"- {result['label']}: the application waited on {told(during['due_stall_waits'])}"
            f" in its longest stall with a transaction due, on {told(during['waits'])} during "
            "the method")


def _stall_when(result: dict[str, Any]) -> str:
    """`` (at 41.2 s, migrate_foreign_keys)``: when in the method the longest stall began,
    and the migration_log step under way (none for the one-shot); empty in older reports."""
    if "longest_stall_at_s" not in result:
        return ""
    step = result["longest_stall_step"]
    return f" (at {result['longest_stall_at_s']:.1f} s{', ' + step if step else ''})"


def render_replay_lag(results: list[dict[str, Any]]) -> list[str]:
    """The standby's replay lag per method (no lines without ``--standby``)."""
    lagged = [r for r in results if r.get("replay_lag")]
    if not lagged:
        return []
    lines = ["", "Streaming standby on this machine (the owner granted pg_monitor, so the "
                 "engine's default --max-replica-lag applies):", "",
             "| method | WAL MiB | longest replay lag MiB | longest replay lag s |",
             "|---|---:|---:|---:|"]
    for r in lagged:
        lag = r["replay_lag"]
        lines.append(f"| {r['label']} | {_mb(r['wal_bytes'])} | "
                     f"{lag['max_replay_lag_bytes'] / MiB:,.1f} | "
                     f"{lag['max_replay_lag_s']:,.2f} |")
    limited = next((r for r in lagged if r["method"] == "full_migration" and r.get("default")
                    and "max_replica_lag_s" in r), None)
    unlimited = next((r for r in lagged if r["method"] == "full_migration_no_lag_limit"), None)
    if limited is None or unlimited is None:
        return lines
    lines += ["", f"full_migration (b={DEFAULT_BATCH}) with and without --max-replica-lag, each "
                  "on a clone of its own, the standby caught up before each:", "",
              "| full_migration | wall s | WAL MiB | longest replay lag MiB | "
              "longest replay lag s | paused s |", "|---|---:|---:|---:|---:|---:|"]
    for r, name in ((limited, f"with --max-replica-lag={limited['max_replica_lag_s']:g}"),
                    (unlimited, "without (--max-replica-lag=0)")):
        lag = r["replay_lag"]
        lines.append(f"| {name} | {r['wall_s']:.2f} | {_mb(r['wal_bytes'])} | "
                     f"{lag['max_replay_lag_bytes'] / MiB:,.1f} | "
                     f"{lag['max_replay_lag_s']:,.2f} | {r['replica_lag_paused_s']:.1f} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    server = report["server"]
    lines = [f"PostgreSQL {server['version']} ({server['backend']}); "
             + ", ".join(f"{k}={v}" for k, v in server["settings"].items()
                         if k in ("shared_buffers", "max_wal_size", "maintenance_work_mem",
                                  "fsync", "full_page_writes")),
             f"lock sampling every {report['parameters']['lock_sample_interval_s'] * 1000:g} ms; "
             f"commit {report.get('commit')}; engine source "
             f"{', '.join(report.get('engine_versions', [])) or '?'}"
             + (" (CHANGED DURING THE RUN: figures mix engine versions)"
                if len(report.get("engine_versions", [])) > 1 else ""), ""]
    for scale in report["scales"]:
        lines += [f"### S = {scale['users']:,} users ({scale['rows']:,} rows, "
                  f"{_mb(scale['size']['total'])} MiB of tables and indexes)", "",
                  "| method | wall s | rows/s | x one-shot | longest ACCESS EXCLUSIVE | "
                  "longest write-blocking lock | WAL MiB | WAL x one-shot | "
                  "tables+indexes after MiB | backup MiB | peak RSS MiB | "
                  "CPU s server+client | load | data |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in scale["results"]:
            label = r["label"] + (" **best**" if r.get("best") else "")
            data = {True: "equal", False: "DIFFERENT"}.get(r.get("data_equal"), "-")
            lines.append(
                f"| {label} | {r['wall_s']:.2f} | {r['rows_per_s']:,.0f} | "
                f"{r['ratio_to_one_shot']:.2f} | {_lock(r['max_access_exclusive_s'])} "
                f"({r['max_access_exclusive_table'] or '-'}) | "
                f"{_lock(r['max_write_blocking_s'])} | {_mb(r['wal_bytes'])} | "
                f"{_ratio(r.get('wal_ratio_to_one_shot'))} | "
                f"{_mb(r['size_after']['total'])} | {_mb(r['size_after']['backup'])} | "
                f"{_mb(r['peak_rss_bytes'])} | {_cpu(r)} | "
                f"{r['load_average_before']:.1f} | {data} |")
        lines += [f"- {r['label']} FAILED (exit {r['exit_code']}): {r['error']}"
                  for r in scale["results"] if r.get("exit_code")]
        lines += render_replay_lag(scale["results"])
        ours = [r for r in scale["results"] if r["method"] == "full_migration"]
        if ours:
            lines += ["", "| full_migration step (s) | " + " | ".join(RUNBOOK_STEPS) + " |",
                      "|---|" + "---:|" * len(RUNBOOK_STEPS)]
            for r in ours:
                steps = {s["operation"]: s["seconds"] for s in r["steps"]}
                lines.append(f"| {r['label']} | " + " | ".join(
                    f"{steps[s]:.2f}" if steps.get(s) is not None else "-"
                    for s in RUNBOOK_STEPS) + " |")
                wal = r.get("wal_bytes_by_step") or {}
                lines.append(f"| {r['label']}: WAL MiB | " + " | ".join(
                    _mb(wal[s]) if s in wal else "-" for s in RUNBOOK_STEPS) + " |")
        lines += render_live(scale.get("live_load") or [])
        lines += render_write_cost(scale.get("write_cost"))
        lines.append("")
    if report.get("targets"):
        lines += ["### Targets (issue 6)", "", "| target | measured | limit | goal | met |",
                  "|---|---:|---:|---:|---|"]
        for t in report["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:.3g} {t['unit']}"
            goal = "-" if t["goal"] is None else f"{t['goal']:g} {t['unit']}"
            met = ("yes" if t["met"] else "**no**") + (
                " (goal met)" if t["goal_met"] else "")
            lines.append(f"| {t['target']} | {value} | {t['limit']:g} {t['unit']} | {goal} | "
                         f"{met} |")
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give positive integers: {text!r}")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(values) - set(SKIPPABLE))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"cannot skip {', '.join(unknown)}: give some of {', '.join(SKIPPABLE)}")
    return values


def _bin_dir(args: argparse.Namespace) -> tuple[Path, str]:
    """The binaries of the server the benchmark starts (not for --pg=dsn), and their kind."""
    if args.pg == "embedded" or (args.pg == "auto" and not args.pg_bin
                                 and not (LOCAL_PG15 / "initdb").exists()):
        return embedded_bin_dir(), "embedded"
    return Path(args.pg_bin or LOCAL_PG15), "bin"


def start(args: argparse.Namespace) -> tuple[Server, list[str]]:
    """The server the benchmark runs on, and the settings it was started with."""
    if args.pg == "dsn" or (args.pg == "auto" and args.pg_dsn):
        if not args.pg_dsn:
            raise SystemExit("--pg=dsn needs --pg-dsn (a superuser DSN)")
        if args.standby:
            raise SystemExit("--standby needs a server the benchmark starts, not --pg-dsn")
        return from_dsn(args.pg_dsn), []
    settings = [*DEFAULT_SETTINGS, *args.pg_setting]
    bin_dir, backend = _bin_dir(args)
    return start_cluster(bin_dir, backend=backend, settings=settings), settings


def _write(args: argparse.Namespace, report: dict[str, Any]) -> str:
    """Write the report where asked (after each scale, then at the end); its Markdown."""
    text = render_markdown(report)
    for path, content in ((args.json, json.dumps(report, indent=2, default=str) + "\n"),
                          (args.markdown, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=_ints, default=[100_000, 1_000_000],
                        help="numbers of users S, comma-separated (default 100000,1000000)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1000, 10_000, 50_000],
                        help="full_migration batch sizes to try (default 1000,10000,50000); "
                             f"the default {DEFAULT_BATCH} always runs")
    parser.add_argument("--json", type=Path, help="write the full report there")
    parser.add_argument("--markdown", type=Path, help="write the Markdown tables there too")
    parser.add_argument("--pg", choices=("auto", "bin", "embedded", "dsn"), default="auto",
                        help="server: auto = --pg-dsn if given, else local PostgreSQL 15 "
                             f"binaries ({LOCAL_PG15}) if present, else the embedded wheel")
    parser.add_argument("--pg-bin", type=Path, help="folder with initdb/pg_ctl")
    parser.add_argument("--pg-dsn", help="superuser DSN of an existing server (databases "
                                         "named bench_* are created and dropped there)")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server setting for a server the benchmark starts "
                             f"(always: {', '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--sample-ms", type=float, default=5.0,
                        help="pg_locks sampling period in ms (default 5)")
    parser.add_argument("--live-load", action="store_true",
                        help="also run one_shot and full_migration under an application "
                             "load (pgbench) and report what the application saw")
    parser.add_argument("--load-rate", type=float, default=LoadSettings.rate,
                        help=f"--live-load: transactions per second (default "
                             f"{LoadSettings.rate:g})")
    parser.add_argument("--load-clients", type=int, default=LoadSettings.clients,
                        help=f"--live-load: pgbench clients (default {LoadSettings.clients})")
    parser.add_argument("--load-warmup", type=float, default=LoadSettings.warmup,
                        help="--live-load: seconds of load before the method starts "
                             f"(default {LoadSettings.warmup:g})")
    parser.add_argument("--write-cost", action="store_true",
                        help="also measure what the engine's triggers cost the application's "
                             "writes: pgbench unthrottled before, during (--postpone-swap) and "
                             "after full_migration, and after cleanup_backup, on a clone")
    parser.add_argument("--write-seconds", type=float, default=WriteCostSettings.seconds,
                        help="--write-cost: seconds of writes per state (default "
                             f"{WriteCostSettings.seconds:g})")
    parser.add_argument("--write-clients", type=int, default=WriteCostSettings.clients,
                        help="--write-cost: pgbench clients (default "
                             f"{WriteCostSettings.clients})")
    parser.add_argument("--standby", action="store_true",
                        help="stream to a hot standby (pg_basebackup) on this machine and "
                             "report each method's longest replay lag, bytes and seconds")
    parser.add_argument("--max-replica-lag", type=float, default=DEFAULT_MAX_REPLICA_LAG_S,
                        metavar="SECONDS",
                        help="--standby: full_migration's --max-replica-lag (default "
                             f"{DEFAULT_MAX_REPLICA_LAG_S:g}, the engine's); it also runs once "
                             "without one (0), for the two replay lags side by side")
    parser.add_argument("--skip", type=_methods, default=[], metavar="METHODS",
                        help="methods not to run, comma-separated, of "
                             f"{', '.join(SKIPPABLE)} (the one-shot and full_migration "
                             "always run: the ratios need both)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the Markdown of an earlier --json report and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0
    if args.pg_bin and args.pg == "auto":
        args.pg = "bin"

    def say(text: str) -> None:
        print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)

    server, settings = start(args)
    standby = None
    try:
        conn = connect(server.admin_dsn, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            server.version = str((cur.fetchone() or [""])[0]).split()[0]
        conn.close()
        say(f"server: {server.describe()}")
        box = prepare(server.admin_dsn, prefix="bench")
        if args.standby:
            standby = start_standby(server.admin_dsn, _bin_dir(args)[0])
            say(f"standby streaming on port {standby.port}")
        try:
            report = run_benchmark(box, args.scales, args.batch_sizes, server=server,
                                   start_settings=settings,
                                   sample_interval=args.sample_ms / 1000, say=say,
                                   live_load=LoadSettings(args.load_rate, args.load_clients,
                                                          args.load_warmup)
                                   if args.live_load else None, skip=args.skip,
                                   write_cost=WriteCostSettings(args.write_seconds,
                                                                args.write_clients)
                                   if args.write_cost else None, standby=args.standby,
                                   max_replica_lag=args.max_replica_lag,
                                   partial=lambda report: _write(args, report))
        finally:
            for variant in ("legacy", "legacy_no_fk"):
                box.drop_database(box.template(variant))
    finally:
        if standby is not None:
            standby.stop()
        server.stop()
    print(_write(args, report))
    if args.json:
        say(f"report written to {args.json}")
    different = [f"S={scale['users']}: {r['label']}" for scale in report["scales"]
                 for r in scale["results"] if r.get("data_equal") is False]
    if different:
        say("DATA DIFFER from the expected state after: " + "; ".join(different))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
