"""Running the engine from tests: through the command line, as an operator would."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from click.testing import CliRunner
from psycopg2 import sql

from migration import verify
from migration.cli import main
from migration.connection import Connection, connect, engine_application_name
from migration.operations import OPERATIONS, Outcome, run, status
from migration.rehearsal.fingerprint import Fingerprint, fingerprint
from migration.rehearsal.seed import seed
from migration.session import Session, Settings

RUNBOOK_STEPS = ("validate_schema", "backup_data", "migrate_users", "migrate_foreign_keys",
                 "validate_migration")
PLAN_KEYS = (("public", "users", "id"), ("public", "journal_entries", "user_id"),
             ("public", "tags", "user_id"), ("public", "reminders", "user_id"))
MIGRATED_DEFAULTS = {("public", "users", "id"): "gen_random_uuid()"}
SEEDED_USERS = 6


@dataclass(frozen=True)
class Result:
    exit_code: int
    output: str  # stdout and stderr together


def operate(dsn: str, operation: str, *args: str, log_file: Path | None = None) -> Result:
    """``data-migration --operation=NAME`` in-process, exit code and output captured."""
    log = ["--log-file", str(log_file)] if log_file else ["--log-file", "/dev/null"]
    result = CliRunner().invoke(
        main, [f"--operation={operation}", "--database-url", dsn, "--quiet", *log, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.output)


def run_ok(dsn: str, operation: str, *args: str) -> Result:
    result = operate(dsn, operation, *args)
    assert result.exit_code == 0, f"{operation} failed:\n{result.output}"
    return result


@contextmanager
def connected(dsn: str, *, autocommit: bool = True) -> Iterator[Connection]:
    conn = connect(dsn, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def execute(dsn: str, statement: str | sql.Composable,
            params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """One statement in its own connection; the rows it returns, if any."""
    with connected(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def seeded(dsn: str, *shapes: str, users: int = SEEDED_USERS, dirty: bool = False) -> str:
    """The legacy tables of ``dsn`` (empty) filled with ``users`` users and their rows
    (problems planted when ``dirty``), then each shape's SQL run on them; the DSN, so that
    a fixture can return it."""
    with connected(dsn, autocommit=False) as conn:
        seed(conn, users, dirty=dirty)
    for shape in shapes:
        execute(dsn, shape)
    return dsn


def print_of(dsn: str, *, include_backup: bool = False, include_log: bool = False
             ) -> Fingerprint:
    """The fingerprint of the database (migration_log and the backup on request)."""
    with connected(dsn, autocommit=False) as conn:
        return fingerprint(conn, include_log=include_log, include_backup=include_backup)


def refusal(dsn: str, operation: str = "full_migration", *args: str) -> str:
    """Run an operation that must be refused: exit 1, and the database, its backup
    included, exactly as it was.  Its output, on one line, for the reasons to be read."""
    before = print_of(dsn, include_backup=True)
    result = operate(dsn, operation, *args)
    assert result.exit_code == 1, result.output
    after = print_of(dsn, include_backup=True)
    assert after == before, "\n".join(before.diff(after))
    return " ".join(result.output.split())


def run_in_process(dsn: str, operation: str, *, admin_dsn: str | None = None,
                   crash_at: str | None = None, crash_after: int | None = None,
                   settings: Settings | None = None,
                   reached: list[str] | None = None) -> Outcome:
    """Run an operation through the engine's API.

    ``crash_at`` names a fault point (``batch public.users.id#2``), ``crash_after``
    counts them: when the engine gets there, a second session kills the
    connection that reached it (the engine's, or one of its fill workers')
    with pg_terminate_backend, as a network failure or an administrator
    would.  ``reached`` collects every point passed.
    """
    passed = reached if reached is not None else []
    with Session.open(dsn, settings or Settings(batch_size=7, show_progress=False)) as session:

        def fault(point: str, pid: int) -> None:
            passed.append(point)
            if point == crash_at or len(passed) == crash_after:
                assert admin_dsn is not None, "killing a backend needs the superuser DSN"
                execute(admin_dsn, "SELECT pg_terminate_backend(%s)", (pid,))

        session.fault = fault
        if operation == "status":
            return status(session)
        return run(session, operation, OPERATIONS[operation])


def wait_until(condition: Callable[[], bool], *, patience: float = 30.0,
               pause: float = 0.02) -> bool:
    """Call ``condition`` until it holds or ``patience`` seconds have passed; whether it held.

    The bound is for a run that never gets where it should (a hung test is worse than a
    failed one), never a measure of speed."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True


MISSED_REMINDER = "00000000-0000-4000-8000-000000000000"


def miss_a_reminder(dsn: str, admin_dsn: str) -> tuple[str, str]:
    """A row the fill's batches missed: ``migrate_foreign_keys`` killed in the reminders'
    fill, one unfilled reminder's key moved to ``MISSED_REMINDER`` by a write the sync
    trigger does not see (the engine's marker; an application's write fills the copy),
    which puts the row out of the walk's reach: past its end, or on its page past the
    highest line pointer number the walk takes there.  Its original key and its user_id."""
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(dsn, "migrate_foreign_keys", admin_dsn=admin_dsn,
                       settings=Settings(batch_size=3, jobs=1, show_progress=False),
                       crash_at="batch public.reminders.user_id#3")
    [(original, user_id, page)] = execute(
        dsn, "SET uuid_migration.engine = 'on'; "
             "UPDATE reminders r SET id = %s FROM (SELECT max(id) AS id FROM reminders "
             "WHERE user_id IS NOT NULL AND user_id_uuid IS NULL) m WHERE r.id = m.id "
             "RETURNING m.id, r.user_id, r.ctid::text::point", (MISSED_REMINDER,))
    [(end, last)] = execute(dsn, "SELECT max(upper_key::text::bigint), max((last_key ->> "
                                 "'last')::int) FROM migration_backup.backfill_progress "
                                 "WHERE table_name = 'reminders'")
    page, line_pointer = map(float, page.strip("()").split(","))
    # one page, one block: the checkpoint's highest number is that page's
    assert end == 1, end
    assert page >= end or line_pointer > last, (page, line_pointer, last)
    return str(original), str(user_id)


def run_verify(dsn: str | None, *args: str) -> Result:
    """``verify`` in-process; a crash (anything but an exit) fails the test."""
    options = ["--database-url", dsn] if dsn else []
    result = CliRunner().invoke(verify.main, [*options, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.output)


def wait_for_engine_lock_wait(dsn: str, seen: list[bool]) -> None:
    """Until an engine backend waits for a lock (at most 20 s); ``seen`` records whether."""
    for _ in range(1000):
        rows = execute(dsn, "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND application_name = %s", (engine_application_name(),))
        if rows:
            seen.append(True)
            return
        time.sleep(0.02)
    seen.append(False)


@contextmanager
def sampled(dsn: str, query: str, params: tuple[Any, ...] = ()
            ) -> Iterator[list[tuple[Any, ...]]]:
    """The rows ``query`` returns, run again and again on a connection of its own for as
    long as the with-block runs (what ``pg_locks`` showed at any moment, say): the list
    the block gets fills as it runs."""
    seen: list[tuple[Any, ...]] = []
    done = threading.Event()

    def sample() -> None:
        with connected(dsn) as conn, conn.cursor() as cur:
            while not done.is_set():
                cur.execute(query, params)
                seen.extend(cur.fetchall())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


@contextmanager
def table_locked_past_the_timeout(dsn: str, table: str, hold: float) -> Iterator[list[bool]]:
    """ACCESS EXCLUSIVE on ``table`` until an engine statement has waited ``hold`` seconds
    for it; yields whether one did."""
    blocker = connect(dsn, application_name="application", autocommit=False)
    with blocker.cursor() as cur:
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(table)))
    seen: list[bool] = []

    def release() -> None:
        wait_for_engine_lock_wait(dsn, seen)
        time.sleep(hold)
        blocker.rollback()

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        yield seen
    finally:
        releaser.join()
        blocker.close()


class Terminal(io.StringIO):
    """Output that says it is a terminal, so that progress draws its lines."""

    def isatty(self) -> bool:
        return True

    def progress(self) -> str:
        """What the progress lines drew, without the console's warnings between them.

        A warning (a lock retried because autovacuum held a table, say) is the engine's to
        print at any moment: it clears the line, prints itself and the line is drawn again.
        """
        return re.sub(r"\r\x1b\[Kwarning: [^\n]*\n", "", self.getvalue())
