"""Online means online: the application keeps writing while the migration runs.

``LiveLoad`` (pgbench at a fixed rate, a ledger of every committed write, an orphan
prober) runs while ``data-migration`` works, as a subprocess, as an operator would
run it.  Afterwards: the migration and ``verify`` succeeded, no application
transaction failed, no orphan was ever accepted, and every committed write is in
the tables with its values.  No timing is asserted here (stalls and latencies are
the benchmark's: ``bench/run.py --live-load``).

The first tests prove the instrument: a quiet load is reported clean, and a load
during which a foreign key is dropped, a committed write is undone and a client's
connection is killed reports each of those.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2.errors
import pytest
from psycopg2 import sql

from bench.run import LoadSettings, render_markdown, run_benchmark
from migration.connection import connect
from migration.operations import Outcome, run
from migration.rehearsal.load import (
    SCRIPTS,
    LiveLoad,
    LoadReport,
    aborted_clients,
    parse_log_line,
    phase_stats,
)
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.waits import NO_STATEMENT, Round, WaitSampler, tally
from migration.rehearsal.waits import describe as describe_waits
from migration.session import Session, Settings
from tests.operate import execute, seeded, wait_until

USERS = 10_000
BATCH = 100  # small batches: the migration lasts a few seconds under the load
RATE, CLIENTS = 150, 4
REPO = Path(__file__).resolve().parent.parent
LEDGER_KINDS = {"user", "entry", "tag", "reminder_deleted"}


@pytest.fixture(scope="module")
def seeded_template(sandbox: Sandbox) -> Iterator[str]:
    """The legacy tables seeded with USERS users once for the module: its name, to clone
    (seeding them took a second or more a test)."""
    name = f"{sandbox.prefix}_live_load_seeded"
    sandbox.drop_database(name)
    seeded(sandbox.create_database(name), users=USERS)
    try:
        yield name
    finally:
        sandbox.drop_database(name)


@pytest.fixture
def seeded_db(sandbox: Sandbox, seeded_template: str) -> Iterator[str]:
    """A fresh clone of the seeded template, dropped after the test."""
    name = f"{seeded_template}_{next(_clones)}"
    try:
        yield sandbox.clone(seeded_template, name)
    finally:
        sandbox.drop_database(name)


_clones = itertools.count()


@pytest.mark.once
@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_its_own_copy_of_the_seeded_tables(seeded_db: str, turn: str) -> None:
    """The template seeded once is cloned for each test: one test's write is not seen by
    the next."""
    assert execute(seeded_db, "SELECT count(*) FROM users") == [(USERS,)]
    execute(seeded_db, "INSERT INTO users (email) VALUES ('isolation@example.com')")


def data_migration(dsn: str, operation: str, log: Path, *args: str
                   ) -> subprocess.CompletedProcess[str]:
    """``data-migration --operation=...`` in its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "migration.cli", f"--operation={operation}", "--database-url",
         dsn, "--batch-size", str(BATCH), "--quiet", "--log-file", str(log), *args],
        capture_output=True, text=True, cwd=REPO, timeout=900, check=False)


def verify(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migration.verify", "--database-url", dsn],
                          capture_output=True, text=True, cwd=REPO, timeout=900, check=False)


def exited(name: str, proc: subprocess.CompletedProcess[str]) -> list[str]:
    """A problem line when the process did not exit 0, with the end of what it said."""
    if proc.returncode == 0:
        return []
    said = (proc.stdout + proc.stderr).strip().splitlines()
    telling = [line.strip() for line in said if re.search(r"\b(error|fail|FAIL)", line)]
    return [f"{name} exited {proc.returncode}: " + " | ".join(telling[:12] or said[-6:])]


def alter_under_load(dsn: str, statement: str, attempts: int = 50) -> None:
    """The test's own DDL while the application writes: as the engine does it, a short
    lock_timeout and retries, deadlocks included (a plain ALTER deadlocked with pgbench's
    transactions once on CI, failing the test for its own setup)."""
    for attempt in range(1, attempts + 1):
        try:
            execute(dsn, "SET lock_timeout = '200ms'; " + statement)
            return
        except (psycopg2.errors.LockNotAvailable, psycopg2.errors.DeadlockDetected):
            if attempt == attempts:
                raise
            time.sleep(0.05)


def settle(seconds: float = 1.0) -> None:
    """Let the load run a moment in its current phase."""
    time.sleep(seconds)


# -- the instrument ---------------------------------------------------------------------------

@pytest.fixture
def quiet_report(seeded_db: str) -> Iterator[LoadReport]:
    with LiveLoad(seeded_db, rate=RATE, clients=CLIENTS) as load:
        settle(2.0)
        load.phase("quiet")
        for body in ("first", "second"):  # one row written twice: its last write counts
            execute(seeded_db, _LEDGERED_UPDATE, (body,))
        settle(2.0)
        yield load.stop()


_LEDGERED_UPDATE = """
WITH e AS (UPDATE journal_entries SET body = %s
           WHERE id = (SELECT min(id) FROM journal_entries) RETURNING id, user_id, body)
INSERT INTO live_load.ledger (kind, row_id, user_id, payload)
SELECT 'entry', id::text, user_id::text, body FROM e
"""


@pytest.mark.once
def test_a_quiet_load_is_clean_and_writes_every_kind(quiet_report: LoadReport) -> None:
    report = quiet_report
    assert report.problems() == [], "\n".join(report.problems())
    assert report.transactions > 0
    assert [p.name for p in report.phases] == ["before", "quiet"]
    assert all(p.transactions > 0 and p.latency_max_ms is not None for p in report.phases)
    assert set(report.ledger_rows) == LEDGER_KINDS, report.ledger_rows
    assert report.probes > 0
    assert report.fk_unenforced_s == 0


def test_a_child_without_a_foreign_key_is_not_probed(legacy_no_fk_db: str) -> None:
    """The runbook's original schema (``rehearse``'s dataset with planted problems) has no
    foreign key on tags and reminders: an orphan accepted there is the schema's, not a
    migration's, and the prober does not try them (journal_entries it still does)."""
    seeded(legacy_no_fk_db, users=100)
    with LiveLoad(legacy_no_fk_db, rate=RATE, clients=CLIENTS) as load:
        settle()
        report = load.stop()
    assert report.probes > 0
    assert report.orphans_accepted == []
    assert report.problems() == [], "\n".join(report.problems())
    assert load.prober.tables == ("journal_entries",)


def test_a_key_spelled_otherwise_is_the_same_key(legacy_no_fk_db: str) -> None:
    """A rollback past the swap gives a child's key its parent's original spelling (case,
    hyphens: the backup's), where the ledger has the text a write saw while the column was
    uuid: the same UUID, no write lost."""
    seeded(legacy_no_fk_db, users=100)
    with LiveLoad(legacy_no_fk_db, rate=RATE, clients=CLIENTS) as load:
        assert wait_until(lambda: execute(legacy_no_fk_db, "SELECT count(*) FROM "
                                          "live_load.ledger WHERE kind = 'tag'") != [(0,)])
        respelled = execute(legacy_no_fk_db, _RESPELL_ONE_TAG)
        report = load.stop()
    assert len(respelled) == 1
    assert report.missing_writes == [], report.missing_writes


_RESPELL_ONE_TAG = """
UPDATE tags SET user_id = upper(replace(user_id, '-', ''))
WHERE id::text = (SELECT row_id FROM live_load.ledger WHERE kind = 'tag' ORDER BY seq LIMIT 1)
RETURNING user_id
"""


@pytest.mark.once
def test_the_instrument_sees_an_unenforced_fk_a_lost_write_and_a_failed_client(
        seeded_db: str, sandbox: Sandbox) -> None:
    admin = sandbox.admin_dsn_for(urlsplit(seeded_db).path.lstrip("/"))
    with LiveLoad(seeded_db, rate=RATE, clients=CLIENTS) as load:
        settle()
        alter_under_load(seeded_db, "ALTER TABLE tags DROP CONSTRAINT tags_user_id_fkey")
        settle(0.5)
        alter_under_load(seeded_db, "ALTER TABLE tags ADD CONSTRAINT tags_user_id_fkey "
                                    "FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID")
        for statement in _UNDO_ONE_WRITE_OF_EACH_KIND:
            execute(seeded_db, statement)
        execute(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'uuidmig-live-load' LIMIT 1")
        settle(0.5)
        report = load.stop()
    assert {o.table for o in report.orphans_accepted} == {"tags"}
    assert report.fk_unenforced_s > 0
    assert sorted(m.kind for m in report.missing_writes) == sorted(LEDGER_KINDS)
    assert len(report.failures) == 1, report.failures
    # the server's FATAL, or the lost connection when pgbench does not get to read it
    assert re.search("terminat|backend died", report.failures[0].reason), report.failures
    assert len(report.problems()) == 4, report.problems()  # failures, orphans, lost, exit


def test_an_error_in_the_block_propagates_and_ends_the_load(seeded_db: str) -> None:
    load = LiveLoad(seeded_db, rate=RATE, clients=CLIENTS)

    def migrate_and_break() -> None:
        with load:
            assert load.running
            raise RuntimeError("the migration broke")

    with pytest.raises(RuntimeError, match="the migration broke"):
        migrate_and_break()
    assert not load.running
    assert load.report is None  # no ledger check on a database in an unknown state


# Behind the load's back (loaded users and their entries are not among its picks).
_UNDO_ONE_WRITE_OF_EACH_KIND = (
    "DELETE FROM tags WHERE id = (SELECT row_id FROM live_load.ledger WHERE kind = 'tag' "
    "ORDER BY seq LIMIT 1)",
    "UPDATE users SET email = 'changed-' || email WHERE id = "
    "(SELECT row_id FROM live_load.ledger WHERE kind = 'user' ORDER BY seq LIMIT 1)",
    "UPDATE journal_entries SET body = 'changed' WHERE id = (SELECT row_id FROM "
    "live_load.ledger WHERE kind = 'entry' AND user_id IN (SELECT row_id FROM live_load.ledger "
    "WHERE kind = 'user') ORDER BY seq LIMIT 1)",
    "INSERT INTO reminders (id, user_id, remind_at) SELECT row_id, user_id, now() "
    "FROM live_load.ledger WHERE kind = 'reminder_deleted' ORDER BY seq LIMIT 1",
)


@pytest.mark.once
def test_a_deadlocked_application_transaction_is_counted_not_retried(
        seeded_db: str, sandbox: Sandbox) -> None:
    """The cycle today's swaps make: a new user holds its users row, waits for journal_entries."""
    admin = sandbox.admin_dsn_for(urlsplit(seeded_db).path.lstrip("/"))
    with LiveLoad(seeded_db, rate=RATE, clients=CLIENTS) as load:
        settle()
        conn = connect(admin)  # superuser: deadlock_timeout is the superuser's to set
        try:
            for _ in range(50):  # until a new user's transaction is caught in the middle
                with conn, conn.cursor() as cur:
                    cur.execute("SET LOCAL deadlock_timeout = '60s'")  # the application gives
                    cur.execute("LOCK TABLE journal_entries IN SHARE MODE")
                    if _new_user_waits(admin, seconds=2.0):
                        cur.execute("LOCK TABLE users IN SHARE MODE")
                        break
                settle(0.2)  # every client was in another script: let them go, try again
            else:
                pytest.fail("no new user's transaction waited on journal_entries in 50 tries")
        finally:
            conn.close()
        settle(0.5)
        report = load.stop()
    assert {(f.script, f.reason) for f in report.failures} == {("new_user", "deadlock")}
    assert report.missing_writes == []  # what the failed transactions wrote was rolled back
    assert report.transactions > 0


def _new_user_waits(admin: str, seconds: float) -> bool:
    """Whether, within ``seconds``, a transaction holding users waits for journal_entries."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if execute(admin, _NEW_USER_WAITING)[0][0]:
            return True
        time.sleep(0.02)
    return False


_NEW_USER_WAITING = """
SELECT EXISTS (SELECT 1 FROM pg_locks w JOIN pg_locks h ON h.pid = w.pid
               WHERE NOT w.granted AND w.relation = 'public.journal_entries'::regclass
                 AND h.granted AND h.relation = 'public.users'::regclass
                 AND h.mode = 'RowExclusiveLock')
"""


def test_stalls_and_latencies_come_from_the_transaction_log() -> None:
    lines = ["0 1 5000 0 100 0", "1 1 7000 1 100 500000", "0 2 deadlock 0 101 0",
             "2 1 3000 4 103 0", "3 9 1000 4 98 0", "short line"]
    txs = [tx for tx in map(parse_log_line, lines) if tx]
    stats = phase_stats("during", 99.0, 104.0, txs)
    assert (stats.transactions, stats.failures) == (3, 1)
    assert (stats.latency_p50_ms, stats.latency_p99_ms, stats.latency_max_ms) == (5, 7, 7)
    # The failed transaction completes nothing: the stall runs from 100.5 to 103.
    assert stats.longest_stall_s == pytest.approx(2.5)
    assert stats.longest_stall_at == pytest.approx(1.5)
    # Of those 2.5 s, only the last 3 ms had a transaction due (scheduled at 102.997); the
    # longest such time is the 7 ms of the second one (due at 100.493, done at 100.5).
    assert stats.longest_due_stall_s == pytest.approx(0.007)
    assert stats.longest_due_stall_at == pytest.approx(1.493)
    assert [t.script for t in txs] == ["new_user", "update_entry", "new_user", "read_user",
                                       "read_user"]


@pytest.mark.once
def test_the_longest_stall_is_placed_in_the_step_under_way(legacy_db: str) -> None:
    """The report says when in the phase its longest stall began, and which step of
    ``migration_log`` was under way then, the innermost: here one that holds the four
    tables a second, run inside another."""
    seeded(legacy_db, users=20)
    def hold(session: Session, run_id: int) -> Outcome:
        with session.transaction() as cur:
            cur.execute("LOCK TABLE public.users, public.journal_entries, public.tags, "
                        "public.reminders IN ACCESS EXCLUSIVE MODE")
            settle()
        return Outcome("held")

    def around(session: Session, run_id: int) -> Outcome:
        settle(0.5)
        run(session, "hold_tables", hold)
        settle(0.5)
        return Outcome("done")

    with LiveLoad(legacy_db, rate=RATE, clients=CLIENTS) as load:
        settle(0.5)
        load.phase("migration")
        with Session.open(legacy_db, Settings(show_progress=False)) as session:
            run(session, "around", around)
        load.phase("after")
        settle(0.5)
        report = load.stop()
    stats = report.phase("migration")
    assert stats.longest_stall_step == "hold_tables", report.describe()
    assert report.phase("before").longest_stall_step == ""
    assert (f"longest stall {stats.longest_stall_s:.2f} s at {stats.longest_stall_at:.1f} s "
            "(hold_tables)") in report.describe()
    # Its cause, sampled: the application's backends queued on the tables' lock.
    assert stats.due_stall_waits[0][0] == "Lock relation", stats.due_stall_waits
    assert "waiting on Lock relation " in report.describe().splitlines()[1]
    assert report.phase("before").waits[0][0] != "Lock relation", report.phase("before").waits


def test_the_wait_sampler_goes_on_through_a_lost_connection(legacy_db: str,
                                                            sandbox: Sandbox) -> None:
    """A round's error is recorded and the next round reconnects (``Poller``): the sampler
    and the orphan prober outlive a server restart or an administrator's kill."""
    admin = sandbox.admin_dsn_for(urlsplit(legacy_db).path.lstrip("/"))
    sampler = WaitSampler(legacy_db, "an-application", interval=0.01)
    sampler.start()
    try:
        assert wait_until(lambda: len(sampler.rounds) >= 3)
        execute(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'an-application-waits'")
        assert wait_until(lambda: bool(sampler.errors))
        after = len(sampler.rounds)
        assert wait_until(lambda: len(sampler.rounds) >= after + 3)
    finally:
        sampler.stop()
    # the server's FATAL, or the connection closed before libpq read it
    assert re.search("terminat|closed the connection", sampler.errors[0]), sampler.errors
    assert not sampler._thread.is_alive()
    assert all(r.waits == () for r in sampler.rounds)  # no backend of that name, ever


def test_the_waits_of_a_window_are_tallied_and_told_most_frequent_first() -> None:
    rounds = [Round(10.0, ("CPU", "IO DataFileRead")), Round(10.01, ("IO DataFileRead",)),
              Round(10.02, ("IO DataFileRead",)), Round(10.025, ()),
              Round(10.03, ("Lock relation",) * 4), Round(10.04, ("CPU",))]
    assert tally(rounds, 10.0, 10.02) == (("IO DataFileRead", 2), ("CPU", 1))
    assert tally(rounds, 10.02, 10.03) == (("IO DataFileRead", 1), (NO_STATEMENT, 1))
    assert tally(rounds, 10.03, 11.0) == (("Lock relation", 4), ("CPU", 1))
    assert describe_waits(tally(rounds, 0, 11), top=2) == "Lock relation 40%, IO DataFileRead 30%"
    assert describe_waits(tally(rounds, 10.026, 10.03)) == "none sampled"
    assert describe_waits((("Lock relation", 200), ("CPU", 1))) == "Lock relation 100%"


@pytest.mark.once
def test_the_benchmark_reports_what_the_application_saw(sandbox: Sandbox) -> None:
    """``bench/run.py --live-load``: one_shot and full_migration again, under the load."""
    report = run_benchmark(sandbox, [300], [100], sample_interval=0.002,
                           live_load=LoadSettings(rate=RATE, clients=CLIENTS, warmup=1.0))
    live = {r["label"]: r for r in report["scales"][0]["live_load"]}
    assert list(live) == ["one_shot", "full_migration"]
    assert report["parameters"]["live_load"] == {"rate": RATE, "clients": CLIENTS,
                                                 "warmup": 1.0}
    one_shot = live["one_shot"]
    for result in live.values():
        assert result["before"]["transactions"] > 0
        assert result["before"]["p99_ms"] is not None
        assert result["probes"] > 0
        assert result["ledger_rows"] > 0
        # A failed run names its failed step from migration_log (the one-shot keeps none).
        assert (result["error"] is None) == (result["exit_code"] == 0), result["error"]
    # One transaction drops and re-adds the FKs: no other session ever sees them missing,
    # and it writes no application row (it may die in a deadlock with the readers).
    assert (one_shot["fk_unenforced_s"], one_shot["orphans_accepted"]) == (0, 0)
    assert one_shot["missing_writes"] == 0
    text = render_markdown(report)
    assert "Under load (150 tps, 4 clients" in text
    assert f"| one_shot | {one_shot['exit_code']} |" in text
    assert one_shot["longest_stall_step"] == ""  # no step: the one-shot keeps no log
    for result in live.values():  # what the application waited on, from the samples
        told = describe_waits(tuple(map(tuple, result["during"]["due_stall_waits"])))
        assert (f"- {result['label']}: the application waited on {told} in its longest "
                "stall with a transaction due, on ") in text
    assert sum(n for _, n in live["full_migration"]["during"]["waits"]) > 0
    assert (f"| {one_shot['longest_stall_s']:.2f} (at {one_shot['longest_stall_at_s']:.1f} s) |"
            in text)
    assert render_markdown(json.loads(json.dumps(report, default=str))) == text


# -- the migration under load -----------------------------------------------------------------

@pytest.mark.edges
def test_full_migration_under_load_is_online(seeded_db: str, tmp_path: Path) -> None:
    with LiveLoad(seeded_db, rate=RATE, clients=CLIENTS) as load:
        settle()
        load.phase("migration")
        migrated = data_migration(seeded_db, "full_migration", tmp_path / "migration.log")
        load.phase("after")
        settle()
        report = load.stop()
    checked = verify(seeded_db)
    problems = [*exited("full_migration", migrated), *exited("verify", checked),
                *report.problems()]
    assert not problems, "\n".join([*problems, report.describe()])


@pytest.mark.edges
def test_rollback_under_load_keeps_the_applications_writes(seeded_db: str,
                                                           tmp_path: Path) -> None:
    with LiveLoad(seeded_db, rate=RATE, clients=CLIENTS) as load:
        settle()
        load.phase("migration")
        migrated = data_migration(seeded_db, "full_migration", tmp_path / "migration.log")
        load.phase("rollback")
        rolled_back = data_migration(seeded_db, "rollback", tmp_path / "rollback.log")
        load.phase("after")
        settle()
        report = load.stop()
    still_text = execute(seeded_db, sql.SQL(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'users' AND column_name = 'id'"))
    problems = [*exited("full_migration", migrated), *exited("rollback", rolled_back),
                *report.problems()]
    if still_text != [("character varying",)]:
        problems.append(f"users.id after the rollback: {still_text}")
    assert not problems, "\n".join([*problems, report.describe()])


def test_an_aborted_client_is_read_in_both_of_pgbench_s_wordings() -> None:
    """The server's error when pgbench read it; the lost connection when it did not."""
    scripts = list(SCRIPTS)
    failures = aborted_clients([
        "pgbench: error: client 3 script 1 aborted in command 4 query 0: FATAL:  "
        "terminating connection due to administrator command",
        "pgbench: error: client 0 aborted in command 5 (SQL) of script 2; perhaps the "
        "backend died while processing",
        "pgbench: error: Run was aborted; the above results are incomplete."])
    assert [(f.script, f.reason) for f in failures] == [
        (scripts[1], "FATAL:  terminating connection due to administrator command"),
        (scripts[2], "perhaps the backend died while processing")]
