"""The benchmark's instruments: each one reads the server or the OS, never whole tables.

- ``LockSampler``: a thread with its own superuser connection polling ``pg_locks``
  every ``interval`` seconds (5 ms by default) for table-level locks on the plan's
  tables, recording the longest continuous hold per table and lock class.  A hold
  is one transaction (``virtualtransaction``) holding the lock in consecutive
  samples.  It is reported as the time from the first sample that saw it to the
  first sample that no longer did (``upper``), and from its first to its last
  sample (``lower``): the true hold lies between the two, and they differ by at
  most two sampling gaps.  A hold shorter than one gap may be missed entirely, so
  ``upper`` is the figure to compare with a target.  The achieved gaps (the
  sampler shares two cores with the migration) are reported with the result.
- ``wal_lsn`` / ``wal_since``: ``pg_current_wal_insert_lsn()`` (the position WAL is
  being inserted at, so WAL still in the buffers counts) and its difference.
- ``sizes``: ``pg_total_relation_size`` of the plan's tables and of the backup schema.
- ``data_digest``: per table, row count and a multiset hash of every row's text with
  columns in name order and the key columns cast to uuid (so a migrated copy and a
  legacy copy compare equal when they hold the same UUIDs); computed in the server.
- ``run_process``: a child process waited with ``os.wait4``, so its own peak RSS
  (``ru_maxrss``) is known, not the maximum over every child ever waited.
- ``ServerCpu``: CPU seconds used by a local server (the postmaster, its live children
  and the children it has reaped, from ``/proc``), a figure that other load on the
  machine changes far less than wall time does.  None for a server on another host.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Self

import psycopg2
from psycopg2 import sql

# Lock modes that block writers (INSERT/UPDATE/DELETE need ROW EXCLUSIVE).
WRITE_BLOCKING = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
EXCLUSIVE = "AccessExclusiveLock"


def _connect(dsn: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn, application_name="uuid-migration-bench", connect_timeout=10)
    conn.autocommit = True
    return conn


@dataclass
class Hold:
    table: str
    lower: float  # seconds between the first and the last sample that saw it
    upper: float  # seconds between the first sample that saw it and the first that did not
    query: str  # what the holder was running at its last sample

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class LockReport:
    interval: float
    samples: int
    max_gap: float  # the longest time between two samples actually achieved
    exclusive: dict[str, Hold] = field(default_factory=dict)  # longest ACCESS EXCLUSIVE per table
    write_blocking: dict[str, Hold] = field(default_factory=dict)  # longest SHARE or stronger

    @staticmethod
    def _longest(holds: Mapping[str, Hold]) -> Hold | None:
        return max(holds.values(), key=lambda h: h.upper, default=None)

    @property
    def longest_exclusive(self) -> Hold | None:
        return self._longest(self.exclusive)

    @property
    def longest_write_blocking(self) -> Hold | None:
        return self._longest(self.write_blocking)

    def as_dict(self) -> dict[str, object]:
        return {"interval_s": self.interval, "samples": self.samples, "max_gap_s": self.max_gap,
                "access_exclusive": {t: h.as_dict() for t, h in self.exclusive.items()},
                "write_blocking": {t: h.as_dict() for t, h in self.write_blocking.items()}}


_SAMPLE = """
SELECT c.relname, l.mode, l.virtualtransaction, left(a.query, 160)
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND c.relnamespace = to_regnamespace(%(schema)s) AND c.relname = ANY (%(tables)s)
  AND l.mode = ANY (%(modes)s)
"""


class _Tracker:
    """Continuous holds of one lock class, keyed by (table, transaction)."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], list[object]] = {}  # key -> [first, last, query]
        self.longest: dict[str, Hold] = {}

    def update(self, now: float, seen: dict[tuple[str, str], str]) -> None:
        for key, query in seen.items():
            entry = self.open.get(key)
            if entry is None:
                self.open[key] = [now, now, query]
            else:
                entry[1], entry[2] = now, query
        for key in [k for k in self.open if k not in seen]:
            self._close(key, now)

    def _close(self, key: tuple[str, str], now: float) -> None:
        first, last, query = self.open.pop(key)
        hold = Hold(key[0], float(last) - float(first), now - float(first), str(query))  # type: ignore[arg-type]
        best = self.longest.get(key[0])
        if best is None or hold.upper > best.upper:
            self.longest[key[0]] = hold

    def close_all(self, now: float) -> None:
        for key in list(self.open):
            self._close(key, now)


class LockSampler:
    """Poll pg_locks from a second connection while a method runs (use as a context manager)."""

    def __init__(self, admin_dsn: str, tables: Sequence[str], *, schema: str = "public",
                 interval: float = 0.005) -> None:
        self.dsn = admin_dsn
        self.params = {"schema": schema, "tables": list(tables), "modes": list(WRITE_BLOCKING)}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self._exclusive, self._blocking = _Tracker(), _Tracker()
        self._samples, self._max_gap = 0, 0.0
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self.own_server_cpu: float | None = None  # the sampler's backend, when it is local

    def __enter__(self) -> LockSampler:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = _connect(self.dsn)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '2s'")
                backend = conn.get_backend_pid()
                start_cpu = process_cpu(backend)
                self._ready.set()
                previous = None
                while not self._stop.is_set():
                    cur.execute(_SAMPLE, self.params)
                    rows = cur.fetchall()
                    now = time.monotonic()
                    if previous is not None:
                        self._max_gap = max(self._max_gap, now - previous)
                    previous = now
                    self._samples += 1
                    exclusive = {(t, vxid): q for t, mode, vxid, q in rows if mode == EXCLUSIVE}
                    blocking = {(t, vxid): q for t, _mode, vxid, q in rows}
                    self._exclusive.update(now, exclusive)
                    self._blocking.update(now, blocking)
                    pause = self.interval - (time.monotonic() - now)
                    if pause > 0:
                        self._stop.wait(pause)
                now = time.monotonic()
                self._exclusive.close_all(now)
                self._blocking.close_all(now)
                end_cpu = process_cpu(backend)
                if start_cpu is not None and end_cpu is not None:
                    self.own_server_cpu = end_cpu - start_cpu
        except BaseException as exc:  # reported by report()
            self._error = exc
            self._ready.set()
        finally:
            conn.close()

    def samples_taken(self) -> int:
        return self._samples

    def report(self) -> LockReport:
        if self._error is not None:
            raise RuntimeError(f"the lock sampler failed: {self._error}") from self._error
        return LockReport(self.interval, self._samples, self._max_gap,
                          dict(self._exclusive.longest), dict(self._blocking.longest))


class Sampler:
    """A thread sampling the server from a connection of its own while a method runs (use
    as a context manager).  ``_run`` is the loop, which returns once ``_stop`` is set; an
    error in it is raised by ``__exit__`` as ``error_type(failure: ...)``."""

    name = "sampler"
    failure = "the sampler failed"
    error_type: type[Exception] = RuntimeError

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._guarded, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self.error_type(f"{self.failure}: {self._error}") from self._error

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # raised by __exit__
            self._error = exc

    def _run(self) -> None:
        raise NotImplementedError


class StepWal(Sampler):
    """WAL written during each migration_log operation, sampled from a second connection
    while a method runs (use as a context manager): every ``interval`` the WAL insert
    position and the newest running operation (``migration_log``) are read, and the
    WAL since the sample before is counted to that operation ("-" when none runs: the
    process starting, or between steps).  A step's figure is within two samples'
    WAL of the truth; a method without a migration_log counts all of it to "-"."""

    name, failure = "step-wal", "the WAL sampler failed"

    def __init__(self, dsn: str, *, schema: str = "public", interval: float = 0.05) -> None:
        super().__init__(interval)
        self.dsn = dsn
        self.log = sql.Identifier(schema, "migration_log")
        self.regclass = f"{schema}.migration_log"
        self.bytes: dict[str, int] = {}

    def _sample(self, cur: Any) -> tuple[int, str]:
        cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, "
                    "to_regclass(%s) IS NOT NULL", (self.regclass,))
        position, logged = cur.fetchone() or (0, False)
        step = None
        if logged:
            cur.execute(sql.SQL("SELECT operation FROM {} WHERE status = 'running' "
                                "ORDER BY id DESC LIMIT 1").format(self.log))
            step = (cur.fetchone() or [None])[0]
        return int(position), str(step or "-")

    def _run(self) -> None:
        conn = _connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '2s'")
                previous, _ = self._sample(cur)
                while True:
                    stopping = self._stop.wait(self.interval)
                    position, step = self._sample(cur)
                    self.bytes[step] = self.bytes.get(step, 0) + position - previous
                    previous = position
                    if stopping:
                        return
        finally:
            conn.close()


def wal_lsn(admin_dsn: str) -> str:
    conn = _connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            return str((cur.fetchone() or [""])[0])
    finally:
        conn.close()


def wal_since(admin_dsn: str, lsn: str) -> int:
    conn = _connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)::bigint",
                        (lsn,))
            return int((cur.fetchone() or [0])[0])
    finally:
        conn.close()


def checkpoint(admin_dsn: str) -> None:
    conn = _connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("CHECKPOINT")
    finally:
        conn.close()


def sizes(admin_dsn: str, tables: Sequence[str], *, schema: str = "public",
          backup_schema: str = "migration_backup") -> dict[str, int]:
    """Bytes (heap + TOAST + indexes) of each table, their total, and the backup schema's."""
    conn = _connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                        "WHERE c.relnamespace = to_regnamespace(%s) AND c.relname = ANY (%s) "
                        "AND c.relkind = 'r'", (schema, list(tables)))
            result = {name: int(size) for name, size in cur.fetchall()}
            cur.execute("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "WHERE c.relnamespace = to_regnamespace(%s) AND c.relkind = 'r'",
                        (backup_schema,))
            backup = int((cur.fetchone() or [0])[0])
    finally:
        conn.close()
    return {**result, "total": sum(result.values()), "backup": backup}


def updates(admin_dsn: str, tables: Sequence[str], *, schema: str = "public"
            ) -> dict[str, dict[str, int]]:
    """Rows updated in each table so far, and of them HOT (``pg_stat_user_tables``).

    A backend reports its counts when it exits: the method's backends, whose
    client has exited, are waited for (10 s at most) before they are read.
    """
    conn = _connect(admin_dsn)
    try:
        with conn.cursor() as cur:
            for _ in range(200):
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid() "
                            "AND backend_type = 'client backend'")
                if not (cur.fetchone() or [0])[0]:
                    break
                time.sleep(0.05)
            cur.execute("SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                        "WHERE schemaname = %s AND relname = ANY (%s)", (schema, list(tables)))
            return {name: {"updated": int(updated), "hot": int(hot)}
                    for name, updated, hot in cur.fetchall()}
    finally:
        conn.close()


def data_digest(dsn: str, key_columns: Mapping[str, Sequence[str]], *,
                schema: str = "public") -> dict[str, dict[str, object]]:
    """Per table: rows and a digest of the rows, columns by name, key columns as uuid.

    Read in one repeatable-read read-only transaction with fixed output settings; the
    sum of each row's md5 needs no ordering (text and uuid keys sort differently).
    """
    conn = _connect(dsn)
    result: dict[str, dict[str, object]] = {}
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur.execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
                        "SET LOCAL extra_float_digits = 1; SET LOCAL search_path = pg_catalog")
            for table, keys in key_columns.items():
                cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = "
                            "format('%%I.%%I', %s::text, %s::text)::regclass "
                            "AND attnum > 0 AND NOT attisdropped ORDER BY attname",
                            (schema, table))
                columns = [name for (name,) in cur.fetchall()]
                values = sql.SQL(", ").join(
                    sql.SQL("({})::uuid" if c in keys else "{}").format(sql.Identifier(c))
                    for c in columns)
                cur.execute(sql.SQL(
                    "SELECT count(*), "
                    "coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0), "
                    "coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0) "
                    "FROM (SELECT md5(ROW({})::text) AS h FROM ONLY {}) r").format(
                    values, sql.Identifier(schema, table)))
                rows, high, low = cur.fetchone() or (0, 0, 0)
                result[table] = {"rows": int(rows), "columns": columns,
                                 "digest": f"{int(high) % 2**64:016x}{int(low) % 2**64:016x}"}
            cur.execute("ROLLBACK")
    finally:
        conn.close()
    return result


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one live process."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU seconds of a server running on this machine, read from /proc."""

    def __init__(self, admin_dsn: str) -> None:
        self.pid: int | None = None
        conn = _connect(admin_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)::int, "
                            "current_setting('data_directory')")
                pid, data_dir = cur.fetchone() or (None, None)
        except psycopg2.Error:
            return
        finally:
            conn.close()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            return
        if data_dir and data_dir in cmdline:  # that pid is this server, here
            self.pid = int(pid)

    def read(self) -> float | None:
        if self.pid is None:
            return None
        own = _proc_stat(self.pid)
        if own is None:
            return None
        ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _proc_stat(int(entry))
                if fields is not None and fields[1] == str(self.pid):
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessResult:
    argv: list[str]
    exit_code: int
    wall: float  # seconds from spawn to reaped
    max_rss_bytes: int  # the child's own peak resident set (ru_maxrss)
    user_cpu: float
    system_cpu: float
    stdout: str
    stderr: str


def run_process(argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> ProcessResult:
    """Run a child to completion; its wall time and its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=dict(env), cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ProcessResult(list(argv), proc.returncode, wall, int(usage.ru_maxrss) * 1024,
                             usage.ru_utime, usage.ru_stime,
                             out.read().decode(errors="replace")[-4000:],
                             err.read().decode(errors="replace")[-4000:])
