"""A live application load, to judge whether a migration is online: pgbench plus an FK prober.

``LiveLoad`` runs, while the block inside it migrates the database:

- ``pgbench`` on this host (PostgreSQL 15+, for ``--max-tries`` and
  ``--failures-detailed``) against the DSN's server, at a fixed ``--rate`` with
  ``clients`` connections, running the application's writes on the legacy schema:
  a new user with two journal entries (INSERT users, then INSERT journal_entries,
  one transaction), an entry update, a new tag, a reminder delete, and reads by
  ``user_id``.  The SQL holds whether the key columns are ``varchar`` or ``uuid``,
  or one of each mid-migration: ids come from column defaults or travel as
  parameters (``-M extended``, unnamed statements, so the server infers their type
  from the column at every execution), and never meet another key column in a
  comparison.  ``--max-tries=1``: a failed transaction (deadlock, serialization) is
  counted, never retried away; any other error aborts its client and is counted too.
  Every transaction is logged (``-l``) so stalls and latencies are computed here.
- a ledger: every writing transaction also records what it wrote in
  ``live_load.ledger`` in the same transaction, so that after the run every committed
  write can be checked to be present with its values (and every delete absent).
  Existing users are picked from ``live_load.picks``, a snapshot of the user ids taken
  when the load starts.  The ``live_load`` schema is the harness's, not the
  migration's: the plan never looks at it.
- a prober: a thread with its own connection that every ``probe_interval`` tries to
  insert an orphan (a ``user_id`` no user has) into each child table and rolls back.
  An accepted orphan means a foreign key was not enforced at that moment.  Only the
  children whose ``user_id`` has a foreign key when the load starts are tried: the
  runbook's original schema has none on tags and reminders, and the migration adds none.
- a wait sampler (``waits``): what pgbench's backends wait on, every 10 ms, so that each
  phase's longest stall comes with its cause.

The connection reaches pgbench through PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE
in its environment, never on its command line; no password is ever printed.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from migration.connection import Connection, connect, redact_dsn
from migration.log import LOG_TABLE
from migration.rehearsal.poller import Poller
from migration.rehearsal.throwaway import ServerUnavailable, embedded_bin_dir
from migration.rehearsal.waits import Waits, WaitSampler
from migration.rehearsal.waits import describe as describe_waits

LOAD_SCHEMA = "live_load"
APPLICATION_NAME = "uuidmig-live-load"
ORPHAN_USER_ID = "00000000-0000-4000-8000-00000000dead"
CHILD_TABLES = ("journal_entries", "tags", "reminders")
MIN_PGBENCH_MAJOR = 15

_PICK = "SELECT user_id AS gid FROM live_load.picks WHERE n = :g \\gset\n"

# name -> (weight, script).  One transaction per script; :picks is the number of picks.
SCRIPTS: dict[str, tuple[int, str]] = {
    "new_user": (3, """\
BEGIN;
INSERT INTO users (email, display_name)
  VALUES ('load-' || gen_random_uuid()::text || '@example.com', 'Load user')
  RETURNING id::text AS uid, email AS uemail \\gset
INSERT INTO live_load.ledger (kind, row_id, user_id, payload) VALUES ('user', :uid, :uid, :uemail);
WITH e AS (INSERT INTO journal_entries (user_id, title, body, mood)
           VALUES (:uid, 'Load entry 1', md5(random()::text), 3) RETURNING id, user_id, body)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
  SELECT 'entry', id::text, user_id::text, body FROM e;
WITH e AS (INSERT INTO journal_entries (user_id, title, body, mood)
           VALUES (:uid, 'Load entry 2', md5(random()::text), 4) RETURNING id, user_id, body)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
  SELECT 'entry', id::text, user_id::text, body FROM e;
END;
"""),
    "update_entry": (3, """\
\\set g random(1, :picks)
BEGIN;
""" + _PICK + """\
WITH e AS (UPDATE journal_entries SET body = md5(random()::text)
           WHERE id = (SELECT id FROM journal_entries WHERE user_id = :gid
                       ORDER BY created_at LIMIT 1)
           RETURNING id, user_id, body)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
  SELECT 'entry', id::text, user_id::text, body FROM e;
END;
"""),
    "new_tag": (2, """\
\\set g random(1, :picks)
BEGIN;
""" + _PICK + """\
WITH t AS (INSERT INTO tags (user_id, name, color)
           VALUES (:gid, 'load-' || md5(random()::text), '#123456') RETURNING id, user_id, name)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
  SELECT 'tag', id::text, user_id::text, name FROM t;
END;
"""),
    "delete_reminder": (1, """\
\\set g random(1, :picks)
BEGIN;
""" + _PICK + """\
WITH d AS (DELETE FROM reminders
           WHERE id = (SELECT id FROM reminders WHERE user_id = :gid LIMIT 1)
           RETURNING id, user_id)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
  SELECT 'reminder_deleted', id::text, user_id::text, '' FROM d;
END;
"""),
    "read_user": (3, """\
\\set g random(1, :picks)
BEGIN;
""" + _PICK + """\
SELECT email, display_name FROM users WHERE id = :gid;
SELECT id, title, mood FROM journal_entries WHERE user_id = :gid ORDER BY created_at DESC LIMIT 10;
SELECT name FROM tags WHERE user_id = :gid;
END;
"""),
}

_LEDGER = """
CREATE SCHEMA IF NOT EXISTS live_load;
DROP TABLE IF EXISTS live_load.ledger, live_load.picks;
CREATE TABLE live_load.ledger (
    seq bigserial PRIMARY KEY, kind text NOT NULL, row_id text NOT NULL, user_id text,
    payload text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE live_load.picks (n int PRIMARY KEY, user_id text NOT NULL);
"""

# Writes recorded in the ledger that are not in the tables as recorded (latest per row).
# A user key is compared as the UUID its text spells (case, hyphens and braces aside): a
# rollback past the swap gives it back the backup's spelling, which a write made while the
# column was uuid did not see.
_MISSING = """
WITH latest AS (
    SELECT DISTINCT ON (kind, row_id) kind, row_id, user_id, payload
    FROM live_load.ledger ORDER BY kind, row_id, seq DESC)
SELECT kind, row_id, user_id, payload FROM latest l
WHERE CASE kind
  WHEN 'user' THEN NOT EXISTS (SELECT 1 FROM {users} u WHERE u.email = l.payload
                               AND translate(lower(u.id::text), '{{}}-', '')
                                   = translate(lower(l.row_id), '{{}}-', ''))
  WHEN 'entry' THEN NOT EXISTS (SELECT 1 FROM {journal} j WHERE j.id::text = l.row_id
                                AND translate(lower(j.user_id::text), '{{}}-', '')
                                    = translate(lower(l.user_id), '{{}}-', '')
                                AND j.body = l.payload)
  WHEN 'tag' THEN NOT EXISTS (SELECT 1 FROM {tags} t WHERE t.id::text = l.row_id
                              AND translate(lower(t.user_id::text), '{{}}-', '')
                                  = translate(lower(l.user_id), '{{}}-', '')
                              AND t.name = l.payload)
  WHEN 'reminder_deleted' THEN EXISTS (SELECT 1 FROM {reminders} r WHERE r.id::text = l.row_id)
  END
ORDER BY kind, row_id
"""

# The child tables whose user_id a foreign key constrains (the prober's, at its start).
_CONSTRAINED = """
SELECT DISTINCT c.relname FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
WHERE k.contype = 'f' AND n.nspname = %s AND c.relname = ANY (%s) AND a.attname = 'user_id'
"""

_PROBES = {
    "journal_entries": "INSERT INTO {} (user_id, title) VALUES (%s, 'orphan probe')",
    "tags": "INSERT INTO {} (user_id, name) VALUES (%s, 'orphan probe')",
    "reminders": "INSERT INTO {} (user_id, remind_at) VALUES (%s, now())",
}


class LoadUnavailable(RuntimeError):
    """No usable pgbench (PostgreSQL 15 or later) on this host."""


# -- the report -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """A transaction that did not commit: when (epoch seconds, None if unknown) and why;
    ``prepared``: on a client whose statements were prepared (``-M prepared``)."""

    at: float | None
    script: str
    reason: str
    prepared: bool = False

    @property
    def sqlstate(self) -> str | None:
        """The SQLSTATE the reason names: pgbench prints the server's message, not its
        code, so it is read from the message (``SQLSTATES``); None when not one of those."""
        return next((code for words, code in SQLSTATES if words in self.reason), None)

    @property
    def from_preparing(self) -> bool:
        """A statement prepared before the swap that the new type breaks: the application's
        to handle (recycle its pools), not a failure of the migration."""
        return self.prepared and self.sqlstate in PREPARED_BREAKS


# What the server's messages and pgbench's words say, and their SQLSTATE.
SQLSTATES = (
    ("but expression is of type", "42804"),  # a parameter prepared as the string type
    ("operator does not exist", "42883"),  # uuid = character varying
    ("cached plan must not change result type", "0A000"),
    ("serialization", "40001"),
    ("deadlock", "40P01"),
    ("lock timeout", "55P03"),
    ("violates foreign key constraint", "23503"),
    ("violates unique constraint", "23505"),
    ("violates check constraint", "23514"),
    ("violates not-null constraint", "23502"),
)
PREPARED_BREAKS = frozenset({"42804", "42883", "0A000"})


@dataclass(frozen=True)
class Orphan:
    """An orphan insert the server accepted: a foreign key was not enforced then."""

    at: float
    table: str


@dataclass(frozen=True)
class ProbeError:
    """A probe that failed otherwise than with the foreign-key violation it expects."""

    at: float
    table: str
    error: str


@dataclass(frozen=True)
class MissingWrite:
    """A committed write (ledger row) not in the tables with its values, or a delete undone."""

    kind: str
    row_id: str
    user_id: str | None
    payload: str


@dataclass(frozen=True)
class PhaseStats:
    """The load during one phase (``before``, ``migration``...): between two marks."""

    name: str
    seconds: float
    transactions: int
    failures: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    longest_stall_s: float  # longest time in the phase with no transaction completing
    longest_stall_at: float  # seconds after the phase began that stall began
    longest_stall_step: str = ""
    """The ``migration_log`` operation under way for most of that stall (the innermost:
    ``backup_data`` rather than the ``full_migration`` around it); empty when none was."""
    longest_due_stall_s: float = 0.0
    """The longest time in the phase in which some transaction was due (its scheduled start
    had passed) and none completed: the stall without pgbench's own idle gaps, which at
    150 transactions a second reach 70 ms over minutes with no migration at all."""
    longest_due_stall_at: float = 0.0  # seconds after the phase began that stall began
    waits: Waits = ()
    """What the application's backends waited on during the phase (``waits``)."""
    due_stall_waits: Waits = ()
    """What they waited on during the longest stall with a transaction due: its cause."""


@dataclass
class LoadReport:
    transactions: int
    failures: list[Failure]
    orphans_accepted: list[Orphan]
    probe_errors: list[ProbeError]
    probes: int
    fk_unenforced_s: float  # seconds during which some probe round accepted an orphan
    missing_writes: list[MissingWrite]
    ledger_rows: Counter[str]
    phases: list[PhaseStats]
    started_at: float
    pgbench_exit: int
    pgbench_summary: str
    pgbench_errors: list[str] = field(default_factory=list)
    prepared_failures: list[Failure] = field(default_factory=list)
    """Failures of the clients with prepared statements (``LiveLoad.prepared_clients``)."""
    prepared_exit: int = 0
    pool_exhausted: list[str] = field(default_factory=list)
    """Tables whose generated rows the load used up (a ``SchemaLoad``): it wrote no more."""
    unwritten: list[str] = field(default_factory=list)
    """Tables the load is to write on where it committed no write (a ``SchemaLoad``)."""

    def phase(self, name: str) -> PhaseStats:
        return next(p for p in self.phases if p.name == name)

    @property
    def longest_stall_s(self) -> float:
        return max((p.longest_stall_s for p in self.phases), default=0.0)

    def problems(self) -> list[str]:
        """What an online migration must not do, each with its figures; empty when clean."""
        found: list[str] = []
        failed = [*self.failures, *(f for f in self.prepared_failures if not f.from_preparing)]
        if failed:
            reasons = Counter(f"{f.script}: {f.reason}"
                              + (f" (SQLSTATE {f.sqlstate})" if f.sqlstate else "")
                              for f in failed)
            found.append(f"{len(failed)} of {self.transactions + len(failed)} "
                         "application transactions failed: "
                         + "; ".join(f"{n}x {r}" for r, n in reasons.most_common(5)))
        if self.orphans_accepted:
            tables = Counter(o.table for o in self.orphans_accepted)
            first = min(o.at for o in self.orphans_accepted) - self.started_at
            last = max(o.at for o in self.orphans_accepted) - self.started_at
            found.append(f"{len(self.orphans_accepted)} orphan inserts accepted "
                         f"({dict(tables)}) between {first:.1f} s and {last:.1f} s of the load: "
                         f"foreign keys unenforced for about {self.fk_unenforced_s:.1f} s")
        if self.probe_errors:
            errors = Counter(f"{e.table}: {e.error}" for e in self.probe_errors)
            found.append(f"{len(self.probe_errors)} orphan probes failed otherwise than with "
                         "a foreign-key violation: "
                         + "; ".join(f"{n}x {r}" for r, n in errors.most_common(3)))
        if self.missing_writes:
            kinds = Counter(m.kind for m in self.missing_writes)
            found.append(f"{len(self.missing_writes)} committed writes missing or changed "
                         f"({dict(kinds)}) of {sum(self.ledger_rows.values())} recorded, e.g. "
                         + "; ".join(f"{m.kind} {m.row_id}" for m in self.missing_writes[:3]))
        if self.pgbench_exit != 0:
            found.append(f"pgbench exited {self.pgbench_exit}: "
                         + " | ".join(self.pgbench_errors[:3]))
        if self.prepared_exit != 0 and not all(f.from_preparing
                                               for f in self.prepared_failures):
            found.append(f"pgbench -M prepared exited {self.prepared_exit}")
        if self.unwritten:
            found.append("no write of the load was committed on "
                         + ", ".join(self.unwritten))
        return found

    def notes(self) -> list[str]:
        """What the clients with statements prepared before the swap saw: each failure the
        new type causes, with its SQLSTATE (the application's to handle, see ``prepared``);
        and generated rows used up.  Neither fails the load."""
        known = Counter(f"{f.script}: {f.reason} (SQLSTATE {f.sqlstate})"
                        for f in self.prepared_failures if f.from_preparing)
        return [f"{n}x on a client with prepared statements: {reason}"
                for reason, n in known.most_common()] + (
            ["the load used up its generated rows of " + ", ".join(self.pool_exhausted)
             + ": it inserted no more there (a larger pool_rows, or a lower rate)"]
            if self.pool_exhausted else [])

    def describe(self) -> str:
        """One line per phase: transactions, failures, latencies, longest stall and what
        the application waited on during it."""
        return "\n".join(
            f"{p.name}: {p.seconds:.1f} s, {p.transactions} tx, {p.failures} failed, "
            f"p50 {_ms(p.latency_p50_ms)} p99 {_ms(p.latency_p99_ms)} "
            f"max {_ms(p.latency_max_ms)}, longest stall {stall_when(p)} "
            f"(waiting on {describe_waits(p.due_stall_waits)})"
            for p in self.phases)


def stall_when(stats: PhaseStats) -> str:
    """A phase's longest stall, when it began and during which step: ``0.09 s at 41.2 s
    (migrate_foreign_keys)``."""
    step = f" ({stats.longest_stall_step})" if stats.longest_stall_step else ""
    return (f"{stats.longest_stall_s:.2f} s at {stats.longest_stall_at:.1f} s{step}, "
            f"{stats.longest_due_stall_s:.2f} s with a transaction due")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# -- pgbench ----------------------------------------------------------------------------------

def _major(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\) (\d+)", out)
    return int(match[1]) if match else None


def find_pgbench() -> Path:
    """UUIDMIG_PGBENCH, else the embedded wheel's, else local PostgreSQL's, else PATH's."""
    candidates: list[Path] = []
    if os.environ.get("UUIDMIG_PGBENCH"):
        candidates.append(Path(os.environ["UUIDMIG_PGBENCH"]))
    with contextlib.suppress(ServerUnavailable):
        candidates.append(embedded_bin_dir() / "pgbench")
    candidates += sorted(Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin/pgbench"))[::-1]
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        major = _major(candidate) if candidate.exists() else None
        if major is not None and major >= MIN_PGBENCH_MAJOR:
            return candidate
    raise LoadUnavailable(f"no pgbench {MIN_PGBENCH_MAJOR} or later among "
                          f"{', '.join(map(str, candidates)) or 'nothing'}")


def libpq_env(dsn: str) -> dict[str, str]:
    """The connection of ``dsn`` as libpq environment variables (password included)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
             "dbname": "PGDATABASE", "sslmode": "PGSSLMODE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({names[k]: str(v) for k, v in params.items() if k in names})
    env["PGAPPNAME"] = APPLICATION_NAME
    return env


def pgbench_command(binary: Path, workdir: Path, *, rate: float, clients: int, picks: int,
                    max_seconds: int, scripts: Mapping[str, tuple[int, str]] = SCRIPTS,
                    protocol: str = "extended", prefix: str = "tx") -> list[str]:
    argv = [str(binary), "--no-vacuum", f"--protocol={protocol}", f"--client={clients}",
            f"--rate={rate:g}", f"--time={max_seconds}", "--log",
            f"--log-prefix={workdir / prefix}", "--max-tries=1", "--failures-detailed",
            "--verbose-errors", f"--define=picks={picks}"]
    for name, (weight, _script) in scripts.items():
        argv.append(f"--file={workdir / (name + '.sql')}@{weight}")
    return argv


@dataclass(frozen=True)
class _Tx:
    done: float  # epoch seconds the transaction ended
    latency: float | None  # seconds from its scheduled start; None when it failed
    script: str
    outcome: str  # "ok", or pgbench's failure word (failed, deadlock, serialization)


def parse_log_line(line: str, scripts: Sequence[str] = tuple(SCRIPTS)) -> _Tx | None:
    """``client tx time script epoch us [lag]``: time is µs, or why it failed."""
    fields = line.split()
    if len(fields) < 6:
        return None
    done = int(fields[4]) + int(fields[5]) / 1e6
    script = scripts[int(fields[3])]
    if fields[2].isdigit():
        return _Tx(done, int(fields[2]) / 1e6, script, "ok")
    return _Tx(done, None, script, fields[2])


def step_during(steps: Sequence[tuple[str, float, float]], start: float, end: float) -> str:
    """The innermost of ``steps`` (operation, start, end) under way for half the time from
    ``start`` to ``end`` or more, the one that began last; empty when none was.  (A stall
    begins with the last transaction completed before its cause, which may be before
    the step that caused it began.)"""
    half = (end - start) / 2
    under_way = [step for step in steps if min(end, step[2]) - max(start, step[1]) >= half]
    return max(under_way, key=lambda step: step[1])[0] if under_way else ""


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)  # nearest rank
    return sorted_values[rank]


def phase_stats(name: str, start: float, end: float, txs: list[_Tx]) -> PhaseStats:
    """Figures of the transactions that ended in [start, end)."""
    inside = sorted((t for t in txs if start <= t.done < end), key=lambda t: t.done)
    latencies = sorted(t.latency * 1000 for t in inside if t.latency is not None)
    completed = [t for t in inside if t.outcome == "ok"]
    stall, stall_at, previous = 0.0, 0.0, start
    for moment in [*(t.done for t in completed), end]:
        if moment - previous > stall:
            stall, stall_at = moment - previous, previous - start
        previous = moment
    due_stall, due_stall_from = _due_stall(start, end, completed, txs)
    return PhaseStats(name, end - start, len(latencies),
                      sum(1 for t in inside if t.outcome != "ok"),
                      _percentile(latencies, 0.50), _percentile(latencies, 0.99),
                      latencies[-1] if latencies else None, stall, stall_at,
                      longest_due_stall_s=due_stall, longest_due_stall_at=due_stall_from - start)


def _due_stall(start: float, end: float, completed: list[_Tx], txs: list[_Tx]
               ) -> tuple[float, float]:
    """The longest time from ``start`` to ``end`` in which a transaction was due and none of
    ``completed`` (in order) completed, and when it began.  A gap before a completion is
    counted from the earliest scheduled start (completion less latency) of the transactions
    completing then or later, those after ``end`` included, when that is later than the
    gap's start."""
    later = [t.done - t.latency for t in txs
             if t.done >= end and t.outcome == "ok" and t.latency is not None]
    due = min(later, default=math.inf)  # the earliest due of what completes from here on
    longest, began, following = 0.0, start, end
    for tx in [*reversed(completed), None]:
        gap_from = max(start if tx is None else tx.done, due)
        if following - gap_from > longest:
            longest, began = following - gap_from, gap_from
        if tx is not None:
            due = min(due, tx.done - (tx.latency or 0.0))
            following = tx.done
    return longest, began


_ABORTED = re.compile(r"client (\d+) (?:script (\d+) )?aborted in command (\d+)[^:;]*: (.*)")
# A connection lost before the server's error reached pgbench (an administrator's
# pg_terminate_backend, a crash) is told in other words, with no reason after a colon.
_LOST = re.compile(r"client \d+ aborted in command \d+ \(\w+\) of script (\d+); (.*)")


def aborted_clients(stderr: list[str], scripts: Sequence[str] = tuple(SCRIPTS), *,
                    prepared: bool = False) -> list[Failure]:
    """The clients pgbench's standard error says it gave up on, with the reason."""
    found = [Failure(None, scripts[int(m[2] or 0)], m[4], prepared)
             for m in map(_ABORTED.search, stderr) if m]
    return found + [Failure(None, scripts[int(m[1])], m[2], prepared)
                    for m in map(_LOST.search, stderr) if m]


# -- the prober -------------------------------------------------------------------------------

Probe = tuple[str, sql.Composable, int]
"""A child table's name, an INSERT into it, and how many of its parameters there are:
each is the orphan's key."""


def runbook_probes(schema: str) -> list[Probe]:
    """The orphan inserts into the runbook's child tables."""
    return [(table, sql.SQL(_PROBES[table]).format(sql.Identifier(schema, table)), 1)
            for table in CHILD_TABLES]


class OrphanProber(Poller):
    """Every ``interval`` seconds, try an orphan insert into each child table and roll back."""

    def __init__(self, dsn: str, *, schema: str, interval: float,
                 probes: Sequence[Probe] | None = None) -> None:
        super().__init__(dsn, APPLICATION_NAME + "-prober", interval)
        self.schema = schema
        self.probes = list(runbook_probes(schema) if probes is None else probes)
        self.accepted: list[Orphan] = []
        self.errors: list[ProbeError] = []
        self.rounds: list[tuple[float, bool]] = []  # (when, an orphan was accepted)
        self.tables = tuple(table for table, _, _ in self.probes)
        """The child tables probed."""

    def unenforced_seconds(self, until: float) -> float:
        """Time from each round that accepted an orphan to the next round."""
        ends = [at for at, _ in self.rounds[1:]] + [until]
        return sum(end - at for (at, bad), end in zip(self.rounds, ends, strict=True) if bad)

    def _failed(self, error: psycopg2.Error) -> None:  # the connection lost: recorded
        self.errors.append(ProbeError(time.time(), "-", redact_dsn(str(error)).strip()))

    def _round(self, conn: Connection) -> None:
        at, accepted = time.time(), False
        for table, statement, params in self.probes:
            try:
                with conn.cursor() as cur:
                    cur.execute(statement, (ORPHAN_USER_ID,) * params)
                self.accepted.append(Orphan(at, table))
                accepted = True
            except psycopg2.errors.ForeignKeyViolation:
                pass
            except psycopg2.DatabaseError as exc:
                if conn.closed:
                    raise
                self.errors.append(ProbeError(at, table, str(exc).strip().splitlines()[0]))
            finally:
                if not conn.closed:
                    conn.rollback()
        self.rounds.append((at, accepted))


# -- the load ---------------------------------------------------------------------------------

class LiveLoad:
    """``with LiveLoad(dsn) as load: load.phase("migration"); ...; report = load.stop()``.

    The phase ``before`` runs from the moment every client is connected to the first
    ``phase()`` mark; ``stop()`` ends the last phase.  ``max_seconds`` bounds pgbench's
    run (``--time``); ``stop()`` ends it sooner with SIGALRM, pgbench's own end-of-run
    signal, so its summary and per-transaction log are complete.

    ``prepared_clients`` more clients run the same scripts in a second pgbench with
    ``-M prepared``: each statement prepared at its first execution, as a driver that
    caches server-side statements does; the rate is shared in proportion to the clients.
    What they fail with after the swap is told apart (``LoadReport.notes``).

    The scripts, the ledger and its check, and the probes are the runbook's tables';
    ``schema_load.SchemaLoad`` makes them for any plan by overriding ``scripts``,
    ``_prepare_database``, ``_check_ledger`` and ``_probes``.
    """

    scripts: Mapping[str, tuple[int, str]] = SCRIPTS

    def __init__(self, dsn: str, *, rate: float = 150, clients: int = 4,
                 schema: str = "public", probe_interval: float = 0.1,
                 max_seconds: int = 3600, pgbench: Path | None = None,
                 prepared_clients: int = 0) -> None:
        self.dsn, self.rate, self.clients, self.schema = dsn, rate, clients, schema
        self.prepared_clients = prepared_clients
        self.max_seconds = max_seconds
        self.binary = pgbench or find_pgbench()
        self.prober = OrphanProber(dsn, schema=schema, interval=probe_interval,
                                   probes=self._probes())
        self.waits = WaitSampler(dsn, APPLICATION_NAME)
        self.marks: list[tuple[str, float]] = []
        self.report: LoadReport | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="uuidmig-load-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared_proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LiveLoad:
        try:
            self.start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:  # after an error in the block, only clean up: the error is the news
            if kind is None and self.report is None and self._proc is not None:
                self.stop()
        finally:
            self._cleanup()

    def start(self) -> None:
        picks = self._prepare_database()
        for name, (_weight, script) in self.scripts.items():
            (self._workdir / f"{name}.sql").write_text(script)
        share = self.rate / (self.clients + self.prepared_clients)
        self._proc = self._pgbench(picks, self.clients, share * self.clients, "extended", "")
        if self.prepared_clients:
            self._prepared_proc = self._pgbench(picks, self.prepared_clients,
                                                share * self.prepared_clients, "prepared", "p")
        self._wait_connected()
        self.prober.start()
        self.waits.start()
        self.marks.append(("before", time.time()))

    def _pgbench(self, picks: int, clients: int, rate: float, protocol: str,
                 prefix: str) -> subprocess.Popen[bytes]:
        """A pgbench with its standard output, error and transaction log under ``prefix``."""
        argv = pgbench_command(self.binary, self._workdir, rate=rate, clients=clients,
                               picks=picks, max_seconds=self.max_seconds, scripts=self.scripts,
                               protocol=protocol, prefix=prefix + "tx")
        with open(self._workdir / f"{prefix}stdout", "wb") as out, \
                open(self._workdir / f"{prefix}stderr", "wb") as err:
            return subprocess.Popen(argv, stdout=out, stderr=err, cwd=self._workdir,
                                    env=libpq_env(self.dsn))

    @property
    def running(self) -> bool:
        """pgbench is running (the prober runs as long as it does)."""
        return self._proc is not None and self._proc.poll() is None

    def phase(self, name: str) -> None:
        """From now on, transactions count in phase ``name``."""
        self.marks.append((name, time.time()))

    def stop(self) -> LoadReport:
        """End the load, then check the ledger against the tables; the report."""
        assert self._proc is not None, "the load was not started"
        ended = time.time()
        self.prober.stop()
        self.waits.stop()
        procs = [proc for proc in (self._proc, self._prepared_proc) if proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGALRM)
        exit_code, *prepared_exit = [proc.wait() for proc in procs]
        names = tuple(self.scripts)
        txs, failures, stderr = self._outcome("", names, prepared=False)
        prepared_txs, prepared_failures, _ = self._outcome("p", names, prepared=True)
        txs += prepared_txs
        bounds = [*self.marks[1:], ("", ended)]
        steps = self._steps()
        phases = [phase_stats(name, start, end, txs)
                  for (name, start), (_, end) in zip(self.marks, bounds, strict=True)]
        phases = [replace(stats, longest_stall_step=step_during(
                      steps, start + stats.longest_stall_at,
                      start + stats.longest_stall_at + stats.longest_stall_s),
                      waits=self.waits.between(start, end),
                      due_stall_waits=self.waits.between(
                          start + stats.longest_due_stall_at,
                          start + stats.longest_due_stall_at + stats.longest_due_stall_s))
                  for stats, (_, start), (_, end) in zip(phases, self.marks, bounds,
                                                         strict=True)]
        missing, ledger_rows = self._check_ledger()
        self.report = LoadReport(
            transactions=sum(1 for t in txs if t.outcome == "ok"), failures=failures,
            orphans_accepted=list(self.prober.accepted), probe_errors=list(self.prober.errors),
            probes=len(self.prober.rounds), fk_unenforced_s=self.prober.unenforced_seconds(ended),
            missing_writes=missing, ledger_rows=ledger_rows, phases=phases,
            started_at=self.marks[0][1], pgbench_exit=exit_code,
            pgbench_summary=(self._workdir / "stdout").read_text(errors="replace"),
            pgbench_errors=[line for line in stderr if "error" in line.lower()],
            prepared_failures=prepared_failures, prepared_exit=sum(prepared_exit),
            pool_exhausted=self._exhausted(), unwritten=self._unwritten(ledger_rows))
        return self.report

    def _outcome(self, prefix: str, names: Sequence[str], *,
                 prepared: bool) -> tuple[list[_Tx], list[Failure], list[str]]:
        """The transactions one pgbench logged, its failures, and its standard error."""
        txs = [tx for path in sorted(self._workdir.glob(f"{prefix}tx.*"))
               for tx in (parse_log_line(line, names) for line in path.read_text().splitlines())
               if tx]
        path = self._workdir / f"{prefix}stderr"
        stderr = path.read_text(errors="replace").splitlines() if path.exists() else []
        failures = [Failure(t.done, t.script, t.outcome, prepared)
                    for t in txs if t.outcome != "ok"]
        return txs, failures + aborted_clients(stderr, names, prepared=prepared), stderr

    def _probes(self) -> list[Probe]:
        """The prober's orphan inserts: into the runbook's children that have a foreign key
        on ``user_id`` now (its generated dataset with planted problems has none on tags and
        reminders, as the runbook's schema: an orphan there is the schema's, not a
        migration's)."""
        conn = connect(self.dsn, application_name=APPLICATION_NAME + "-prober")
        try:
            with conn.cursor() as cur:
                cur.execute(_CONSTRAINED, (self.schema, list(CHILD_TABLES)))
                found = {str(name) for (name,) in cur.fetchall()}
        finally:
            conn.close()
        return [probe for probe in runbook_probes(self.schema) if probe[0] in found]

    def _exhausted(self) -> list[str]:
        """Tables whose generated rows ran out (none: the runbook's load makes its own)."""
        return []

    def _unwritten(self, ledger_rows: Counter[str]) -> list[str]:
        """Tables with no committed write in ``ledger_rows`` (the runbook's load: unchecked)."""
        return []

    def _prepare_database(self) -> int:
        """The ledger and the picks (a snapshot of the user ids); how many picks."""
        conn = connect(self.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(_LEDGER)
                cur.execute(sql.SQL("INSERT INTO live_load.picks (n, user_id) "
                                    "SELECT row_number() OVER (), id::text FROM {}").format(
                    sql.Identifier(self.schema, "users")))
                picks = cur.rowcount
        finally:
            conn.close()
        if picks < 1:
            raise LoadUnavailable("the load needs users to pick from: the users table is empty")
        return picks

    def _wait_connected(self, timeout: float = 30.0) -> None:
        """Until every pgbench client is connected (or pgbench died, or timeout)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        conn = connect(self.dsn, autocommit=True)
        try:
            with conn.cursor() as cur:
                while True:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                "= %s AND datname = current_database()", (APPLICATION_NAME,))
                    connected = int((cur.fetchone() or [0])[0])
                    if connected >= self.clients + self.prepared_clients:
                        return
                    died = [(proc, prefix) for proc, prefix in
                            ((self._proc, ""), (self._prepared_proc, "p"))
                            if proc is not None and proc.poll() is not None]
                    if died or time.monotonic() > deadline:
                        prefix = died[0][1] if died else ""
                        err = (self._workdir / f"{prefix}stderr").read_text(errors="replace")
                        raise LoadUnavailable(f"pgbench did not start: {redact_dsn(err)[-800:]}")
                    time.sleep(0.05)
        finally:
            conn.close()

    def _steps(self) -> list[tuple[str, float, float]]:
        """The operations ``migration_log`` (in the load's schema) recorded, as (operation,
        start, end) in epoch seconds, one still running ending now; none without a log, or
        where the role may not read it."""
        table = sql.Identifier(self.schema, LOG_TABLE)
        conn = connect(self.dsn, readonly=True)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(cur),))
                if not (cur.fetchone() or [False])[0]:
                    return []
                cur.execute(sql.SQL(
                    "SELECT operation, extract(epoch FROM started_at)::float8, "
                    "extract(epoch FROM coalesce(completed_at, clock_timestamp()))::float8 "
                    "FROM {} ORDER BY id").format(table))
                return [(str(name), float(start), float(end))
                        for name, start, end in cur.fetchall()]
        except psycopg2.errors.InsufficientPrivilege:
            return []
        finally:
            conn.close()

    def _check_ledger(self) -> tuple[list[MissingWrite], Counter[str]]:
        names = {name: sql.Identifier(self.schema, table) for name, table in
                 (("users", "users"), ("journal", "journal_entries"), ("tags", "tags"),
                  ("reminders", "reminders"))}
        conn = connect(self.dsn, readonly=True)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL(_MISSING).format(**names))
                missing = [MissingWrite(*row) for row in cur.fetchall()]
                cur.execute("SELECT kind, count(*) FROM live_load.ledger GROUP BY kind")
                counts = Counter({kind: int(n) for kind, n in cur.fetchall()})
        finally:
            conn.close()
        return missing, counts

    def _cleanup(self) -> None:
        for proc in (self._proc, self._prepared_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.prober.stop()
        self.waits.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)
