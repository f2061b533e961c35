"""backup_data while the application writes: the change log, the snapshot, and checks that know.

The application is played by plain SQL connections (no engine marker): its
writes between the runbook's steps must be logged, excluded from the
comparison with the backup and reported, while a row lost without going
through the application's logged writes must still fail the checks.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import psycopg2
import pytest
from psycopg2 import sql

from migration import backup, verify
from migration.errors import MigrationError
from migration.operations import OPERATIONS, run
from migration.rehearsal.sandbox import Sandbox
from migration.report import Finding, Status
from migration.session import Session, Settings
from tests.operate import (
    connected,
    execute,
    operate,
    print_of,
    refusal,
    run_in_process,
    run_ok,
    seeded,
    table_locked_past_the_timeout,
)

USERS = 12
CHANGED = "rows changed by the application since the backup: checked, not compared"
# A user with two journal entries and a reminder: deleting it deletes the
# entries (ON DELETE CASCADE) and sets the reminder's user_id to NULL.
PARENT = """
WITH u AS (INSERT INTO users (email) VALUES ('parent@example.com') RETURNING id),
     j AS (INSERT INTO journal_entries (user_id, title)
           SELECT id, t FROM u, (VALUES ('a'), ('b')) AS v (t)),
     r AS (INSERT INTO reminders (user_id, remind_at) SELECT id, now() FROM u)
SELECT id FROM u
"""


@pytest.fixture
def db(legacy_db: str) -> str:
    seeded(legacy_db, users=USERS)
    return legacy_db


def logged(dsn: str) -> list[tuple[object, ...]]:
    """(table, operation, number of keys) in the change log."""
    return execute(dsn, "SELECT table_name, operation, count(*) FROM migration_backup.change_log "
                        "GROUP BY 1, 2 ORDER BY 1, 2")


def changed_counts(findings: list[Finding]) -> dict[str, int]:
    return {f.subject: f.count for f in findings if f.status is Status.INFO}


def test_backup_copies_while_a_writer_holds_its_transaction_and_takes_access_share_only(
        db: str) -> None:
    """A writer whose transaction (ROW EXCLUSIVE on users, uncommitted) is open across
    the whole copy does not stop it; another commits while the copy's transaction is open."""
    seen: dict[str, set[str]] = {}
    with connected(db, autocommit=False) as writer, \
            Session.open(db, Settings(show_progress=False, lock_timeout_ms=300,
                                      ddl_attempts=2)) as session:

        def fault(point: str, pid: int) -> None:
            if point == "backup_data: change log started#1":
                with writer.cursor() as cur:
                    cur.execute("INSERT INTO users (email) VALUES ('open@example.com')")
                # committed before the snapshot: in the copy, so not left in the log
                execute(db, "UPDATE reminders SET note = 'before' "
                            "WHERE id = (SELECT min(id) FROM reminders)")
            if point == "backup_data#1":  # the snapshot's transaction, before its commit
                seen["locks"] = {str(mode) for (mode,) in execute(
                    db, "SELECT DISTINCT mode FROM pg_locks WHERE pid = %s AND relation = ANY "
                        "('{users,journal_entries,tags,reminders}'::regclass[])", (pid,))}
                execute(db, "SET lock_timeout = 1000; "
                            "UPDATE tags SET name = 'during' WHERE id = (SELECT min(id) FROM tags)")

        session.fault = fault
        outcome = run(session, "backup_data", OPERATIONS["backup_data"])
        writer.commit()
    assert seen["locks"] == {"AccessShareLock"}
    assert outcome.rows > USERS
    assert execute(db, "SELECT count(*) FROM migration_backup.\"public.users\" "
                       "WHERE email = 'open@example.com'") == [(0,)]
    assert logged(db) == [("tags", "UPDATE", 1), ("users", "INSERT", 1)]
    assert execute(db, "SELECT count(*) FROM migration_backup.\"public.reminders\" "
                       "WHERE note = 'before'") == [(1,)]


def test_a_writer_open_before_the_backup_makes_it_give_up_cleanly_and_rerun(db: str) -> None:
    """CREATE TRIGGER needs SHARE ROW EXCLUSIVE for an instant: it waits for a writer's open
    transaction, at most lock_timeout per attempt, then gives up and leaves nothing."""
    settings = Settings(show_progress=False, lock_timeout_ms=100, ddl_attempts=2)
    with connected(db, autocommit=False) as writer:
        with writer.cursor() as cur:
            cur.execute("UPDATE users SET display_name = 'open' WHERE id = (SELECT min(id) "
                        "FROM users)")
        with pytest.raises(MigrationError, match="could not lock the tables"):
            run_in_process(db, "backup_data", settings=settings)
        assert execute(db, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == [(0,)]
        assert execute(db, "SELECT to_regnamespace('migration_backup')") == [(None,)]
        writer.commit()
    run_in_process(db, "backup_data", settings=settings)
    assert logged(db) == []


def test_application_writes_are_logged_and_engine_writes_are_not(db: str) -> None:
    parent = execute(db, PARENT)[0][0]
    run_ok(db, "backup_data")
    assert logged(db) == []
    execute(db, "INSERT INTO users (email) VALUES ('new@example.com')")
    execute(db, "UPDATE tags SET name = name || '!' WHERE id IN "
                "(SELECT id FROM tags ORDER BY id LIMIT 2)")
    execute(db, "DELETE FROM users WHERE id = %s", (parent,))  # cascades
    application = [("journal_entries", "DELETE", 2), ("reminders", "UPDATE", 1),
                   ("tags", "UPDATE", 2), ("users", "DELETE", 1), ("users", "INSERT", 1)]
    assert logged(db) == application
    assert execute(db, "SELECT row_key FROM migration_backup.change_log "
                       "WHERE operation = 'DELETE' AND table_name = 'users'") == [({"id": parent},)]
    execute(db, "SET uuid_migration.engine = 'on'; "
                "UPDATE tags SET name = 'engine' WHERE id = (SELECT max(id) FROM tags)")
    run_ok(db, "migrate_users")  # the engine's batches, under its marker
    assert logged(db) == application


def test_an_application_role_without_rights_on_the_backup_writes_and_is_logged(
        db: str, sandbox: Sandbox) -> None:
    run_ok(db, "backup_data")
    admin = sandbox.admin_dsn_for(db.rsplit("/", 1)[1])
    execute(admin, "DO $$BEGIN CREATE ROLE uuidmig_app; "
                   "EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    execute(db, sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON users, journal_entries, tags, "
                        "reminders TO {}").format(sql.Identifier("uuidmig_app")))
    execute(admin, "SET ROLE uuidmig_app; INSERT INTO public.users (email) VALUES ('app@x.org')")
    assert logged(db) == [("users", "INSERT", 1)]


def application_writes(dsn: str, step: int) -> None:
    """What the application does between two steps: an insert, an update, a delete."""
    execute(dsn, "INSERT INTO users (email) VALUES (%s)", (f"app{step}@example.com",))
    execute(dsn, "UPDATE tags SET name = name || %s WHERE id = (SELECT min(id) FROM tags)",
            (str(step),))
    execute(dsn, "DELETE FROM reminders WHERE id = (SELECT min(id) FROM reminders)")


def test_validation_after_application_writes_between_steps_passes_and_reports_them(
        db: str) -> None:
    # The backup holds this user's id in upper case: the log matches it as a uuid.
    execute(db, "INSERT INTO users (id, email) VALUES (upper(gen_random_uuid()::text), "
                "'upper@example.com')")
    for step, name in enumerate(("validate_schema", "backup_data", "migrate_users",
                                 "migrate_foreign_keys")):
        run_ok(db, name)
        application_writes(db, step)
    execute(db, "UPDATE users SET display_name = 'renamed' WHERE email = 'upper@example.com'")
    outcome = run_in_process(db, "validate_migration")
    assert changed_counts(outcome.findings) == {
        "public.users": 3 + 1, "public.tags": 1, "public.reminders": 3}
    assert all(f.status is not Status.FAIL for f in outcome.findings)
    shown = run_ok(db, "validate_migration").output
    assert f"public.users: 4 {CHANGED}" in shown


def test_verify_passes_under_application_writes(db: str) -> None:
    run_ok(db, "full_migration")
    application_writes(db, 9)
    findings = verify.run(db, "public", None)
    assert changed_counts(findings) == {"public.users": 1, "public.tags": 1,
                                        "public.reminders": 1}
    assert [f for f in findings if f.status is Status.FAIL] == []


@pytest.mark.parametrize("silently", [
    "SET uuid_migration.engine = 'on'; {}",
    "ALTER TABLE reminders DISABLE TRIGGER USER; {}; ALTER TABLE reminders ENABLE TRIGGER USER",
])
def test_a_row_lost_outside_the_application_still_fails_row_counts(db: str,
                                                                   silently: str) -> None:
    run_ok(db, "full_migration")
    application_writes(db, 1)
    execute(db, silently.format("DELETE FROM reminders WHERE id = (SELECT max(id) FROM reminders)"))
    result = operate(db, "validate_migration", "--format", "json")
    assert result.exit_code == 1
    assert '"check": "row_counts",\n      "status": "fail"' in result.output
    assert "public.reminders" in result.output


def test_rollback_counts_the_application_changes_from_the_log(db: str) -> None:
    run_ok(db, "full_migration")
    application_writes(db, 1)
    execute(db, "UPDATE tags SET name = 'second' WHERE id = (SELECT max(id) FROM tags)")
    execute(db, "SET uuid_migration.engine = 'on'; "
                "UPDATE journal_entries SET title = 'silent' WHERE id = "
                "(SELECT min(id) FROM journal_entries)")
    kept = run_in_process(db, "rollback")  # keeps them all, and says which were whose
    by_table = {(f.subject, "application" in f.message): f.count for f in kept.findings}
    assert by_table == {("public.users", True): 1, ("public.tags", True): 2,
                        ("public.reminders", True): 1, ("public.journal_entries", False): 1}
    kinds = {s["change"] for f in kept.findings for s in f.samples}
    assert kinds == {"inserted", "changed", "deleted"}
    assert kept.details["kept_changes"] == 4
    assert kept.details["unlogged_changes"] == 1


def test_triggers_stay_out_of_fingerprints_and_go_with_the_backup(db: str) -> None:
    before = print_of(db)
    run_ok(db, "backup_data")
    assert print_of(db) == before
    triggers = print_of(db, include_backup=True).schema[("public", "users")].triggers
    assert set(triggers) == {backup.CHANGE_LOG_TRIGGER,
                             backup.change_log_truncate_trigger(backup.BACKUP_SCHEMA)}
    run_ok(db, "cleanup_backup", "--force")
    assert execute(db, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == [(0,)]
    execute(db, "INSERT INTO users (email) VALUES ('after@example.com')")  # nothing to call


def failed_checks(dsn: str) -> set[str]:
    return {f.check for f in verify.run(dsn, "public", None) if f.status is Status.FAIL}


HAND_DROPPED = ("DROP INDEX ix_tags_user_id; "
                "ALTER TABLE reminders DROP CONSTRAINT reminders_user_id_fkey")


def test_a_crash_as_backup_data_commits_keeps_the_record_with_the_backup(
        db: str, sandbox: Sandbox) -> None:
    """The record of the tables is committed with the copy: killed before its log row is
    finished, backup_data leaves both, and after the migration (backup_data not run again,
    or run again: it keeps the backup) verify still catches an index and a foreign key
    dropped by hand."""
    admin = sandbox.admin_dsn_for(db.rsplit("/", 1)[1])
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(db, "backup_data", admin_dsn=admin, crash_at="finish backup_data#1")
    run_ok(db, "migrate_users")
    run_ok(db, "migrate_foreign_keys")
    run_ok(db, "full_migration")
    execute(db, HAND_DROPPED)
    assert failed_checks(db) == {"indexes", "foreign_keys"}


def older_version_backup(dsn: str) -> None:
    """The backup as an older version left it when killed before its log row was finished:
    no record with the copy, none in migration_log."""
    execute(dsn, "DROP TABLE migration_backup.recorded_objects; "
                 "DELETE FROM migration_log WHERE operation = 'backup_data'")


def test_backup_data_completes_the_record_of_an_older_backup_of_unchanged_tables(
        db: str) -> None:
    run_ok(db, "backup_data")
    older_version_backup(db)
    application_writes(db, 1)  # logged: the tables still are the backup's
    assert "kept" in run_ok(db, "backup_data").output
    run_ok(db, "full_migration")
    execute(db, HAND_DROPPED)
    assert failed_checks(db) == {"indexes", "foreign_keys"}


def test_backup_data_under_way_without_a_record_says_to_roll_back_first(db: str) -> None:
    run_ok(db, "backup_data")
    run_ok(db, "migrate_users")
    older_version_backup(db)
    assert failed_checks(db) >= {"indexes", "foreign_keys", "primary_key"}  # never skipped
    output = refusal(db, "backup_data")
    assert "holds no record" in output
    assert "--operation=rollback" in output
    run_ok(db, "rollback")
    run_ok(db, "backup_data")
    run_ok(db, "full_migration")
    assert failed_checks(db) == set()


def test_the_copy_is_not_cut_by_the_statement_timeout(db: str) -> None:
    """Once the change log has started, its copy of tags waits a second for a lock, five
    times the statement timeout."""
    waited: list[list[bool]] = []
    with ExitStack() as stack:

        def lock_tags(point: str, pid: int) -> None:
            if point == "backup_data: change log started#1":
                waited.append(stack.enter_context(
                    table_locked_past_the_timeout(db, "tags", hold=1.0)))

        with Session.open(db, Settings(show_progress=False, statement_timeout_ms=200,
                                       lock_timeout_ms=5000)) as session:
            session.fault = lock_tags
            outcome = run(session, "backup_data", OPERATIONS["backup_data"])
    assert waited == [[True]]
    assert outcome.rows > USERS


def test_the_rollback_names_rows_by_key_and_no_application_data_leaves_the_backup(
        db: str) -> None:
    run_ok(db, "full_migration")
    execute(db, "UPDATE users SET email = 'private-mail@example.com' "
                "WHERE id = (SELECT min(id::text)::uuid FROM users)")
    execute(db, "SET uuid_migration.engine = 'on'; UPDATE journal_entries "
                "SET title = 'private-title' WHERE id = (SELECT min(id) FROM journal_entries)")
    result = run_ok(db, "rollback", "--verbose")
    [(details,)] = execute(db, "SELECT details::text FROM migration_log "
                               "WHERE operation = 'rollback' AND status = 'completed'")
    for shown in (result.output, details):
        assert "private-mail" not in shown
        assert "private-title" not in shown
    [user_id] = execute(db, "SELECT min(id) FROM users")[0]  # text again
    [journal_id] = execute(db, "SELECT min(id) FROM journal_entries")[0]
    findings = {f["check"]: f["samples"] for f in json.loads(details)["findings"]}
    assert findings == {"changed_after_backup": [{"change": "changed", "key": {"id": user_id}}],
                        "unlogged_change": [{"change": "changed", "key": {"id": journal_id}}]}


def test_after_the_migration_status_shows_the_change_log_and_the_report_when_to_clean_up(
        db: str) -> None:
    result = run_ok(db, "full_migration")
    assert "run --operation=cleanup_backup" in result.output
    assert "every application write adds a row to migration_backup.change_log" in result.output
    assert "change log: 0 row(s)" in run_ok(db, "status").output
    application_writes(db, 1)
    assert "change log: 3 row(s)" in run_ok(db, "status").output
