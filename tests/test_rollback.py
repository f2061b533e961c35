"""Rollback from every stage, interruptions at every fault point, and nothing ever lost.

Each scenario is a clone of a seeded database.  Its fingerprint (schema and
data, by name) is taken first; the engine is driven to a stage, or killed at
a fault point, and the test proves that ``status`` tells the truth, that
resuming reaches the same end state as an uninterrupted run, and that
``rollback`` gives back the original fingerprint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import psycopg2
import psycopg2.errors
import pytest
from hypothesis import settings
from psycopg2 import sql

from migration.cli import CRASH_VARIABLE
from migration.model import Table, shadow_name
from migration.rehearsal.sandbox import Sandbox
from migration.session import Settings
from tests.operate import (
    MISSED_REMINDER,
    connected,
    execute,
    miss_a_reminder,
    operate,
    print_of,
    refusal,
    run_in_process,
    run_ok,
)
from tests.scenario import ORPHAN, UPPER, Scenario

# Rollbacks from every stage and crash: on the oldest and the newest server; the sweeps
# run once a tox run, shared between them (once, newest).
pytestmark = pytest.mark.edges


def _to_backup(s: Scenario) -> None:
    run_ok(s.dsn, "backup_data")


def _mid_users(s: Scenario) -> None:
    run_ok(s.dsn, "backup_data")
    s.crash("migrate_users", "batch public.users.id#2")


def _users(s: Scenario) -> None:
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")


def _mid_foreign_keys(s: Scenario) -> None:
    _users(s)  # journal_entries done, tags half done, reminders untouched
    s.crash("migrate_foreign_keys", "batch public.tags.user_id#1")


def _foreign_keys(s: Scenario) -> None:
    _users(s)
    run_ok(s.dsn, "migrate_foreign_keys")


def _validated(s: Scenario) -> None:
    run_ok(s.dsn, "full_migration")


def _quarantined(s: Scenario) -> None:
    run_ok(s.dsn, "full_migration", "--orphans=quarantine")


STAGES: dict[str, tuple[str, Callable[[Scenario], None], str]] = {
    # name: (schema variant, how to get there, what status must say)
    "after backup_data": ("legacy", _to_backup, "not migrated"),
    "during migrate_users": ("legacy", _mid_users, "interrupted during migrate_users"),
    "after migrate_users": ("legacy", _users,
                            "expanding (public.users.id: indexed, public.journal_entries.user_id: "
                            "string, public.tags.user_id: string, public.reminders.user_id: "
                            "string)"),
    "during migrate_foreign_keys": ("legacy", _mid_foreign_keys,
                                    "interrupted during migrate_foreign_keys"),
    "after migrate_foreign_keys": ("legacy", _foreign_keys, "migrated"),
    "after validate_migration": ("legacy", _validated, "migrated"),
    "after a quarantine": ("legacy_no_fk", _quarantined, "migrated"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_rollback_from_every_stage_restores_the_original(
        scenario: Callable[..., Scenario], stage: str) -> None:
    variant, reach, said = STAGES[stage]
    s = scenario(variant)
    reach(s)
    assert s.stage() == said
    run_ok(s.dsn, "rollback")
    s.assert_original()
    if variant == "legacy_no_fk":
        assert execute(s.dsn, "SELECT count(*) FROM reminders WHERE user_id = %s",
                       (ORPHAN,)) == [(1,)]  # the quarantined row is back
    assert "nothing to undo" in run_ok(s.dsn, "rollback").output
    s.assert_original()
    orphans = ["--orphans=quarantine"] if variant == "legacy_no_fk" else []
    run_ok(s.dsn, "full_migration", *orphans)
    if s.migrated is not None:
        s.assert_migrated()


@pytest.mark.parametrize("stage", ["after backup_data", "after migrate_users",
                                   "after validate_migration", "after a quarantine"])
def test_a_rollback_leaves_no_engine_trigger_and_cleanup_needs_no_force(
        scenario: Callable[..., Scenario], stage: str) -> None:
    """The change log stops with the rollback and says what comes next: cleanup_backup
    (no --force), or backup_data before migrating again; quarantined rows are back in
    their table before the backup can go."""
    variant, reach, _ = STAGES[stage]
    s = scenario(variant)
    reach(s)
    result = run_ok(s.dsn, "rollback")
    assert "the change log is stopped" in result.output
    assert "--operation=cleanup_backup to drop it (no --force needed" in result.output
    assert execute(s.dsn, "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                          "WHERE NOT tgisinternal") == []
    logged = execute(s.dsn, "SELECT count(*) FROM migration_backup.change_log")
    execute(s.dsn, "INSERT INTO users (email) VALUES ('after-rollback@example.com')")
    assert execute(s.dsn, "SELECT count(*) FROM migration_backup.change_log") == logged
    assert "stopped (a rollback dropped its triggers)" in run_ok(s.dsn, "status").output
    run_ok(s.dsn, "cleanup_backup")
    assert execute(s.dsn, "SELECT to_regnamespace('migration_backup')") == [(None,)]
    if variant == "legacy_no_fk":
        assert execute(s.dsn, "SELECT count(*) FROM reminders WHERE user_id = %s",
                       (ORPHAN,)) == [(1,)]


def test_after_a_rollback_migrating_again_starts_with_backup_data(
        scenario: Callable[..., Scenario]) -> None:
    """With its change log stopped, the backup could not tell the application's writes
    from losses: the steps after it refuse until backup_data starts the log again."""
    s = scenario()
    _users(s)
    run_ok(s.dsn, "rollback")
    assert "it is stopped on public.journal_entries" in refusal(s.dsn, "migrate_users")
    assert "kept" in run_ok(s.dsn, "backup_data").output
    execute(s.dsn, "INSERT INTO users (email) VALUES ('logged-again@example.com')")
    assert execute(s.dsn, "SELECT table_name, operation FROM migration_backup.change_log") \
        == [("users", "INSERT")]
    run_ok(s.dsn, "full_migration")


def _points_of(dsn: str, operation: str) -> list[str]:
    reached: list[str] = []
    run_in_process(dsn, operation, reached=reached)
    return reached


def swept(points: list[str]) -> list[str]:
    """The points a sweep crashes at: under the ci profile (derandomized, the suite's
    20-minute budget) all but the middle batches of each column's fill, whose crashes leave
    the state of the second batch's with a later checkpoint (the first, second and last
    are kept); every point under dev and deep."""
    if not settings().derandomize:
        return points
    last: dict[str, int] = {}
    for point in points:
        name, number = point.rsplit("#", 1)
        last[name] = int(number)
    return [point for point in points
            if not (point.startswith("batch ")
                    and 2 < int(point.rsplit("#", 1)[1]) < last[point.rsplit("#", 1)[0]])]


@pytest.fixture(scope="module")
def fault_points(sandbox: Sandbox, seeded_templates: dict[str, str]) -> list[str]:
    """Every point an uninterrupted full migration passes, in order."""
    name = f"{sandbox.prefix}_points"
    dsn = sandbox.clone(seeded_templates["legacy"], name)
    try:
        return _points_of(dsn, "full_migration")
    finally:
        sandbox.drop_database(name)


@pytest.mark.parametrize("half", [pytest.param(0, marks=pytest.mark.once, id="even points"),
                                  pytest.param(1, marks=pytest.mark.newest, id="odd points")])
def test_every_fault_point_resumes_to_the_same_end(
        scenario: Callable[..., Scenario], sandbox: Sandbox, fault_points: list[str],
        half: int) -> None:
    """Kill the connection at each point of a full migration, then run it again.  Half the
    points on the first server, half on the newest: each is crashed once a tox run."""
    kinds = {p.split(" ")[0].rstrip("#0123456789") for p in fault_points}
    assert {"batch", "index", "fk", "swap", "finish", "backup_data", "validate"} <= kinds
    first = scenario()  # its fingerprints taken once, not once per point
    for point in swept(fault_points)[half::2]:
        s = scenario(copy_of=first)
        s.crash("full_migration", point)
        assert s.stage().startswith("interrupted during"), point
        assert_foreign_keys_enforced(s.dsn)
        run_ok(s.dsn, "full_migration")
        s.assert_migrated()
        assert_foreign_keys_enforced(s.dsn)
        sandbox.drop_database(s.database)


ORPHAN_ROWS = {"journal_entries": {"title": "x"}, "tags": {"name": "x"},
               "reminders": {"remind_at": "2026-01-01T00:00:00Z"}}


def assert_foreign_keys_enforced(dsn: str) -> None:
    """Every child of the legacy schema refuses a row that refers to no user."""
    for table, values in ORPHAN_ROWS.items():
        row = {"user_id": ORPHAN, **values}
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, row)),
            sql.SQL(", ").join(sql.Placeholder() * len(row)))
        with pytest.raises(psycopg2.errors.ForeignKeyViolation):
            execute(dsn, statement, tuple(row.values()))


@pytest.mark.newest
@pytest.mark.parametrize("share", [4, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["every 4th point", "every point"])
def test_fault_points_roll_back_to_the_original(
        scenario: Callable[..., Scenario], sandbox: Sandbox, fault_points: list[str],
        share: int) -> None:
    """Kill the connection at a point of a full migration, then roll back."""
    first = scenario()  # its fingerprints taken once, not once per point
    for point in fault_points[::share]:
        s = scenario(copy_of=first)
        s.crash("full_migration", point)
        run_ok(s.dsn, "rollback")
        s.assert_original()
        sandbox.drop_database(s.database)


@pytest.mark.newest
def test_every_fault_point_of_rollback_leaves_a_rollback_to_finish(
        scenario: Callable[..., Scenario], sandbox: Sandbox) -> None:
    """The rollback after the swap is the migration run the other way, in steps: killed at
    any of its points, the foreign keys are in force and running it again finishes it."""
    migrated = scenario()
    run_ok(migrated.dsn, "full_migration")
    points = _points_of(scenario(copy_of=migrated).dsn, "rollback")
    kinds = {p.split(" ")[0].rstrip("#0123456789") for p in points}
    assert {"batch", "respell", "validate", "index", "fk", "swap", "finish"} <= kinds
    for point in swept(points):
        s = scenario(copy_of=migrated)
        s.crash("rollback", point)
        assert s.stage() == "interrupted during rollback"
        assert_foreign_keys_enforced(s.dsn)
        run_ok(s.dsn, "rollback")
        s.assert_original()
        sandbox.drop_database(s.database)


@pytest.mark.parametrize("point", ["batch public.users.id#2", "index users_pkey#1",
                                   "batch public.journal_entries.user_id#3",
                                   "fk journal_entries_user_id_fkey#1",
                                   "swap#1"])
def test_a_killed_process_resumes(scenario: Callable[..., Scenario], point: str) -> None:
    """SIGKILL of the whole data-migration process, then the same command again."""
    s = scenario()
    command = [sys.executable, "-m", "migration.cli", "--operation=full_migration",
               "--database-url", s.dsn, "--batch-size=7", "--quiet", "--log-file", os.devnull]
    killed = subprocess.run(command, env={**os.environ, CRASH_VARIABLE: point},
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    assert s.stage().startswith("interrupted during")
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr
    s.assert_migrated()


def test_an_interrupted_backfill_resumes_after_its_last_committed_batch(
        scenario: Callable[..., Scenario]) -> None:
    """Batches of 7: killed before the third commit, two batches and their checkpoint stay,
    and the resumed fill makes the batches an uninterrupted one makes on a copy of the
    same database, less those two.

    One fill connection, so that no other table is being filled alongside.
    """
    s = scenario()
    for step in ("backup_data", "migrate_users"):
        run_ok(s.dsn, step)
    one_by_one = Settings(batch_size=7, jobs=1, show_progress=False)
    twin, whole = scenario(copy_of=s), list[str]()
    run_in_process(twin.dsn, "migrate_foreign_keys", reached=whole, settings=one_by_one)
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(s.dsn, "migrate_foreign_keys", admin_dsn=s.admin_dsn, settings=one_by_one,
                       crash_at="batch public.journal_entries.user_id#3")
    [(done, checkpoint)] = execute(s.dsn, "SELECT rows_done, last_key FROM migration_backup."
                                          "backfill_progress WHERE table_name = 'journal_entries'")
    [(filled, rows)] = execute(s.dsn, "SELECT count(user_id_uuid), count(*) FROM journal_entries")
    assert 0 < done == filled < rows
    assert set(checkpoint) == {"page", "offset", "half", "last", "pages"}  # in the first block
    resumed: list[str] = []
    run_in_process(s.dsn, "migrate_foreign_keys", reached=resumed, settings=one_by_one)

    def batches(points: list[str]) -> int:
        return sum(p.startswith("batch public.journal_entries") for p in points)

    assert batches(resumed) == batches(whole) - 2
    s.assert_migrated()


def test_a_row_moved_out_of_the_fill_s_reach_is_filled_before_the_swap(
        scenario: Callable[..., Scenario]) -> None:
    """reminders.user_id is nullable: a row the batches missed would lose its reference at
    the swap.  Killed in the fill, an unfilled row's key is changed, which moves the row
    out of the walk's reach (``miss_a_reminder``), so the resumed fill passes it by; the
    proof finds it and it is filled.  The sync trigger
    fills a row the application writes: the move is a write it does not see (the engine's
    marker)."""
    s = scenario()
    for step in ("backup_data", "migrate_users"):
        run_ok(s.dsn, step)
    front = MISSED_REMINDER
    original, user_id = miss_a_reminder(s.dsn, s.admin_dsn)
    result = operate(s.dsn, "migrate_foreign_keys")
    assert result.exit_code == 0, result.output
    assert "public.reminders.user_id: 1 rows were missed by the batches" in result.output
    assert execute(s.dsn, "SELECT user_id = %s::uuid FROM reminders WHERE id = %s",
                   (user_id, front)) == [(True,)]
    execute(s.dsn, "UPDATE reminders SET id = %s WHERE id = %s", (original, front))
    s.assert_migrated()


def test_the_fill_proof_spares_the_swap_a_not_null_scan(scenario: Callable[..., Scenario]) -> None:
    """Killed in the swap, after the proofs were validated: SET NOT NULL on the uuid column,
    tried by hand, is proved by a constraint (the server says so at DEBUG1)."""
    s = scenario()
    _users(s)
    s.crash("migrate_foreign_keys", "swap#1")
    with connected(s.dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET client_min_messages = debug1")
        cur.execute("ALTER TABLE users ALTER COLUMN id_uuid SET NOT NULL")
        proofs = [n for n in conn.notices if "sufficient to prove" in n]
        conn.rollback()
    assert proofs, conn.notices


def test_rollback_after_cleanup_refuses_and_says_what_to_do(
        scenario: Callable[..., Scenario]) -> None:
    s = scenario()
    run_ok(s.dsn, "full_migration")
    run_ok(s.dsn, "cleanup_backup")
    before = print_of(s.dsn)
    result = operate(s.dsn, "rollback")
    assert result.exit_code == 1
    assert "nothing to roll back to" in result.output
    assert "restore" in result.output
    assert print_of(s.dsn) == before


def test_rollback_keeps_the_rows_the_application_wrote_after_the_migration(
        scenario: Callable[..., Scenario]) -> None:
    """Rolling back converts the columns back in place: rows inserted, changed or deleted
    since the backup stay as the application left them (a new id in canonical text)."""
    s = scenario()
    run_ok(s.dsn, "full_migration")
    new_id = execute(s.dsn, "INSERT INTO users (email) VALUES ('late@example.com') "
                            "RETURNING id::text")[0][0]
    execute(s.dsn, "INSERT INTO tags (user_id, name) VALUES (%s, 'late')", (new_id,))
    execute(s.dsn, "UPDATE tags SET name = 'renamed' WHERE id = "
                   "(SELECT min(id) FROM tags WHERE name <> 'late')")
    [(gone,)] = execute(s.dsn, "DELETE FROM reminders WHERE id = (SELECT min(id) FROM reminders)"
                               " RETURNING id")
    result = run_ok(s.dsn, "rollback")
    assert "4 row(s) the application changed since the backup were kept" in result.output
    assert result.output.count("by the application after the backup (change log)") == 3
    assert execute(s.dsn, "SELECT id, pg_typeof(id)::text FROM users "
                          "WHERE email = 'late@example.com'") == [(new_id, "character varying")]
    assert execute(s.dsn, "SELECT user_id FROM tags WHERE name = 'late'") == [(new_id,)]
    assert execute(s.dsn, "SELECT count(*) FROM tags WHERE name = 'renamed'") == [(1,)]
    assert execute(s.dsn, "SELECT count(*) FROM reminders WHERE id = %s", (gone,)) == [(0,)]
    after = print_of(s.dsn)
    assert after.schema == s.original.schema, "\n".join(s.original.diff(after))


def test_rollback_before_the_swap_keeps_the_application_s_writes(
        scenario: Callable[..., Scenario]) -> None:
    """Before the swap the original columns were never touched: rollback drops what was
    built beside them, and the application's writes in the meantime stay as they are."""
    s = scenario()
    _users(s)
    new_id = execute(s.dsn, "INSERT INTO users (email) VALUES ('during@example.com') "
                            "RETURNING id")[0][0]
    execute(s.dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'during')",
            (new_id,))
    [(gone,)] = execute(s.dsn, "DELETE FROM reminders WHERE id = (SELECT min(id) FROM reminders)"
                               " RETURNING id")
    result = run_ok(s.dsn, "rollback")
    assert "rolled back before the swap" in result.output
    after = print_of(s.dsn)
    assert after.schema == s.original.schema, "\n".join(s.original.diff(after))
    assert execute(s.dsn, "SELECT title FROM journal_entries WHERE user_id = %s",
                   (new_id,)) == [("during",)]
    assert execute(s.dsn, "SELECT count(*) FROM reminders WHERE id = %s", (gone,)) == [(0,)]


def test_an_index_build_left_invalid_is_built_again(scenario: Callable[..., Scenario]) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index behind (simulated
    here by marking the copy of users_pkey invalid): the next run drops and rebuilds it."""
    s = scenario()
    _users(s)
    copy = shadow_name("ix", Table("public", "users"), "users_pkey")
    execute(s.admin_dsn, "UPDATE pg_index SET indisvalid = false "
                         "WHERE indexrelid = to_regclass(%s)", (f"public.{copy}",))
    assert "users.id: proven" in run_ok(s.dsn, "status").output
    result = run_ok(s.dsn, "full_migration")
    assert f"index {copy} was left invalid by an interrupted build" in result.output
    s.assert_migrated()


def test_rows_written_after_the_swap_take_their_parent_s_original_spelling(
        scenario: Callable[..., Scenario]) -> None:
    """A user whose id was spelled in upper case, and journal entries the application
    writes for it after the swap (the uuid has no spelling): on the way back the
    entries must spell it as the user does, or the foreign key between strings fails.
    One is written before the rollback, one once the foreign key between the string
    copies is in force (the rollback interrupted there)."""
    s = scenario()
    execute(s.dsn, "INSERT INTO users (id, email) VALUES (%s, 'upper@example.com')", (UPPER,))
    execute(s.dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'before')",
            (UPPER,))
    run_ok(s.dsn, "full_migration")
    execute(s.dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'after')",
            (UPPER.lower(),))
    s.crash("rollback", "validate journal_entries_user_id_fkey#1")  # its copy is in force
    execute(s.dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'during')",
            (UPPER.lower(),))
    run_ok(s.dsn, "rollback")
    assert execute(s.dsn, "SELECT title, user_id FROM journal_entries WHERE user_id ILIKE %s "
                          "ORDER BY title", (UPPER,)) == [
        ("after", UPPER), ("before", UPPER), ("during", UPPER)]
    assert execute(s.dsn, "SELECT id FROM users WHERE email = 'upper@example.com'") == [
        (UPPER,)]


USERS_ID = ("SELECT format_type(atttypid, atttypmod), pg_get_expr(adbin, adrelid) "
            "FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum "
            "WHERE attrelid = 'users'::regclass AND attname = 'id'")


def test_the_backup_s_record_of_a_type_or_a_default_is_never_run(legacy_db: str) -> None:
    """The record of users.id in the backup, tampered with: a type that is not a type name
    stops the rollback before anything changes; a default that is not the migration's is
    not run, the string column gets the uuid column's own default, cast, with a warning."""
    execute(legacy_db, "INSERT INTO users (email) VALUES ('one@example.com')")
    original = execute(legacy_db, USERS_ID)
    run_ok(legacy_db, "full_migration")
    record = ("UPDATE migration_backup.key_columns SET {} = %s "
              "WHERE table_name = 'users' AND column_name = 'id'")
    execute(legacy_db, record.format("type"), ("text; DROP TABLE tags",))
    migrated = print_of(legacy_db)
    refused = operate(legacy_db, "rollback")
    assert refused.exit_code == 1, refused.output
    assert "the backup's record of the type of public.users.id ('text; DROP TABLE tags') " \
        "is not the name of a type" in " ".join(refused.output.split()), refused.output
    assert print_of(legacy_db) == migrated
    execute(legacy_db, record.format("type"), (original[0][0],))
    execute(legacy_db, record.format("default_expr"),
            ("(gen_random_uuid()); DROP TABLE tags; SELECT (1)::text",))
    result = run_ok(legacy_db, "rollback")
    assert "its default gen_random_uuid() is not the one the migration gave it" in " ".join(
        result.output.split()), result.output
    assert execute(legacy_db, "SELECT to_regclass('tags') IS NOT NULL") == [(True,)]
    assert execute(legacy_db, USERS_ID) == original  # the same default, derived
