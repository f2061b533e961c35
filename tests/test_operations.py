"""The runbook's operations against a real server, one behaviour per test."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2.errors
import pytest
from psycopg2 import sql

from migration.connection import connect
from migration.errors import MigrationError
from migration.operations import OPERATIONS, run
from migration.preflight import validate_schema, wal_advice
from migration.rehearsal.fingerprint import expected_after_migration
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, schema_sql, with_credentials
from migration.session import ADVISORY_KEYS, Session, Settings
from tests.operate import (
    MIGRATED_DEFAULTS,
    PLAN_KEYS,
    RUNBOOK_STEPS,
    connected,
    execute,
    operate,
    print_of,
    run_in_process,
    run_ok,
    seeded,
)

RUNBOOK_QUERIES = (  # from migration-procedures.md, "Monitoring and Logging" (trailing blanks cut)
    "SELECT * FROM migration_log ORDER BY started_at DESC;",
    """SELECT
    operation,
    status,
    started_at,
    completed_at,
    message
FROM migration_log
WHERE started_at > NOW() - INTERVAL '1 day';""",
    """SELECT
    operation,
    AVG(EXTRACT(EPOCH FROM (completed_at - started_at))) as avg_duration_seconds
FROM migration_log
WHERE status = 'completed'
GROUP BY operation;""",
)


def column_types(dsn: str) -> dict[str, str]:
    rows = execute(dsn, "SELECT table_name || '.' || column_name, data_type "
                        "FROM information_schema.columns WHERE column_name IN ('id', 'user_id') "
                        "AND table_name IN ('users', 'journal_entries', 'tags', 'reminders')")
    return {str(name): str(kind) for name, kind in rows}


def test_each_step_of_the_runbook_in_order(any_legacy_db: str) -> None:
    seeded(any_legacy_db, users=60)
    expected = None
    with connected(any_legacy_db, autocommit=False) as conn:
        expected = expected_after_migration(conn, PLAN_KEYS, defaults=MIGRATED_DEFAULTS)
    for step in RUNBOOK_STEPS:
        run_ok(any_legacy_db, step)
    after = print_of(any_legacy_db)
    assert after == expected, "\n".join(expected.diff(after))
    types = column_types(any_legacy_db)  # the runbook's own "Verify UUID types" query
    assert {name for name, kind in types.items() if kind == "uuid"} == {
        "users.id", "journal_entries.user_id", "tags.user_id", "reminders.user_id"}
    status = run_ok(any_legacy_db, "status").output
    assert "stage: migrated" in status
    run_ok(any_legacy_db, "cleanup_backup")
    assert execute(any_legacy_db, "SELECT to_regnamespace('migration_backup')") == [(None,)]


def test_each_converted_column_has_planner_statistics_after_its_step(legacy_db: str) -> None:
    """Without them the next step's joins on the new column are planned blind."""
    seeded(legacy_db, users=60)

    def analysed() -> set[str]:
        rows = execute(legacy_db, "SELECT tablename || '.' || attname FROM pg_stats "
                                  "WHERE schemaname = 'public' AND attname IN ('id', 'user_id')")
        return {str(name) for (name,) in rows}

    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    assert "users.id" in analysed()
    run_ok(legacy_db, "migrate_foreign_keys")
    assert {"journal_entries.user_id", "tags.user_id", "reminders.user_id"} <= analysed()


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_child_tables_fill_side_by_side_with_two_jobs(legacy_db: str, jobs: int) -> None:
    """With two jobs the first two tables wait for each other's first batch (a barrier that
    times out, failing the run, if they fill one after the other); with one job they never
    overlap.  Either way the end is the same."""
    seeded(legacy_db, users=60)
    with connected(legacy_db, autocommit=False) as conn:
        expected = expected_after_migration(conn, PLAN_KEYS, defaults=MIGRATED_DEFAULTS)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    barrier = threading.Barrier(2, timeout=20)
    first_batches: dict[str, int] = {}  # table -> backend pid of its first batch
    filling: list[str] = []  # tables whose fill has begun and not ended

    def fault(point: str, pid: int) -> None:
        if not point.startswith("batch "):
            return
        table = point.split()[1].split("#")[0]
        if table not in first_batches:
            first_batches[table] = pid
            filling.append(table)
            if jobs == 2 and len(first_batches) <= 2:
                barrier.wait()
        if jobs == 1:
            assert filling[-1] == table, f"{table} filled while {filling[-1]} was not done"

    with Session.open(legacy_db, Settings(batch_size=7, jobs=jobs, show_progress=False)) as s:
        s.fault = fault
        run(s, "migrate_foreign_keys", OPERATIONS["migrate_foreign_keys"])
        own_pid = s.conn.get_backend_pid()
    pids = set(first_batches.values())
    assert len(first_batches) == 3
    assert len(pids) == (3 if jobs == 2 else 1)  # a connection per fill, or the engine's own
    assert (own_pid in pids) == (jobs == 1)
    after = print_of(legacy_db)
    assert after == expected, "\n".join(expected.diff(after))


def test_a_table_is_cut_into_one_slice_per_job_each_filled_by_its_own_connection(
        legacy_db: str) -> None:
    seeded(legacy_db, users=300)  # users on more pages than there are jobs
    run_ok(legacy_db, "backup_data")
    pids: set[int] = set()

    def fault(point: str, pid: int) -> None:
        if point.startswith("batch public.users.id#"):
            pids.add(pid)

    with Session.open(legacy_db, Settings(batch_size=7, jobs=3, show_progress=False)) as s:
        s.fault = fault
        run(s, "migrate_users", OPERATIONS["migrate_users"])
    slices = execute(legacy_db, "SELECT slice, rows_done, finished FROM "
                                "migration_backup.backfill_progress WHERE table_name = 'users' "
                                "ORDER BY slice")
    assert [number for number, _, _ in slices] == [0, 1, 2]
    assert all(done > 0 and finished for _, done, finished in slices), slices
    assert sum(int(str(done)) for _, done, _ in slices) == 300
    assert len(pids) == 3


@pytest.mark.parametrize(("users", "batches"), [(60, 1), (300, 3)])
def test_a_table_of_fewer_rows_than_its_passes_takes_fewer_passes(
        legacy_db: str, users: int, batches: int) -> None:
    """A page walk takes a block in up to sixteen passes, so that a page's later updates
    find room on it; a table of fewer rows than sixteen batches takes as many passes as it
    fills batches: 60 users in one batch of 100 (then the empty one that ends the walk),
    300 in three."""
    seeded(legacy_db, users=users)
    run_ok(legacy_db, "backup_data")
    reached: list[str] = []
    run_in_process(legacy_db, "migrate_users", reached=reached,
                   settings=Settings(batch_size=100, jobs=1, show_progress=False))
    assert sum(point.startswith("batch public.users.id#") for point in reached) == batches + 1


def test_the_runbook_monitoring_queries_run_verbatim(legacy_db: str) -> None:
    seeded(legacy_db, users=10)
    run_ok(legacy_db, "full_migration")
    with connected(legacy_db) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = public")
        results = []
        for query in RUNBOOK_QUERIES:
            cur.execute(query)
            results.append(cur.fetchall())
    operations = {row[1] for row in results[0]}
    assert set(RUNBOOK_STEPS) | {"full_migration"} <= operations
    assert all(row[1] == "completed" for row in results[1])
    assert {row[0] for row in results[2]} == operations


def test_the_referential_integrity_query_of_the_runbook_finds_nothing(legacy_db: str) -> None:
    seeded(legacy_db, users=10)
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, "SELECT COUNT(*) FROM journal_entries "
                              "WHERE user_id NOT IN (SELECT id FROM users)") == [(0,)]


@pytest.mark.parametrize("step", ["backup_data", "migrate_users", "migrate_foreign_keys",
                                  "full_migration"])
def test_a_finished_operation_run_again_changes_nothing_and_says_so(
        legacy_db: str, step: str) -> None:
    seeded(legacy_db, users=20)
    run_ok(legacy_db, "full_migration")
    before = print_of(legacy_db, include_backup=True)
    again = run_ok(legacy_db, step).output
    assert print_of(legacy_db, include_backup=True) == before
    assert any(word in again for word in ("already", "kept", "complete")), again


def test_the_default_becomes_a_uuid_default_and_new_rows_get_one(legacy_db: str) -> None:
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "full_migration")
    default = execute(legacy_db, "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
                                 "JOIN pg_attribute a ON a.attrelid = d.adrelid "
                                 "AND a.attnum = d.adnum "
                                 "WHERE d.adrelid = 'users'::regclass AND a.attname = 'id'")
    assert default == [("gen_random_uuid()",)]
    rows = execute(legacy_db, "INSERT INTO users (email) VALUES ('new@x') RETURNING id")
    assert len(str(rows[0][0])) == 36


COUNTED = """
    CREATE SEQUENCE calls;
    CREATE FUNCTION counted_uuid() RETURNS uuid LANGUAGE plpgsql AS
        'BEGIN PERFORM nextval(''calls''); RETURN gen_random_uuid(); END';
    CREATE FUNCTION counted_string() RETURNS varchar LANGUAGE plpgsql AS
        'BEGIN PERFORM nextval(''calls''); RETURN gen_random_uuid()::text; END';
"""


@pytest.mark.parametrize(("default", "converted"), [
    ("counted_uuid()::varchar(36)", "counted_uuid()"),
    ("counted_string()::text", "((counted_string())::text)::uuid"),
], ids=["uuid-expression", "string-expression"])
def test_a_default_is_unwrapped_where_the_server_says_it_is_a_uuid_and_never_run(
        legacy_db: str, default: str, converted: str) -> None:
    """The swap asks the server the type of a string default's inner expression before its
    write-blocking locks, with a query that evaluates nothing: the function's side effect
    (a sequence's call) happens only for the row inserted after."""
    seeded(legacy_db, users=5)
    execute(legacy_db, COUNTED + f"ALTER TABLE users ALTER COLUMN id SET DEFAULT {default}")
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
                              "WHERE adrelid = 'users'::regclass AND adnum = "
                              "(SELECT attnum FROM pg_attribute WHERE attrelid = adrelid "
                              "AND attname = 'id')") == [(converted,)]
    assert execute(legacy_db, "SELECT is_called FROM calls") == [(False,)]
    (key,), = execute(legacy_db, "INSERT INTO users (email) VALUES ('new@x') RETURNING id")
    assert len(str(key)) == 36
    assert execute(legacy_db, "SELECT last_value, is_called FROM calls") == [(1, True)]


def test_constraints_and_indexes_keep_their_names_and_definitions(any_legacy_db: str) -> None:
    seeded(any_legacy_db, users=10)
    query = ("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated "
             "FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype <> 'n' "
             "AND conrelid <> 'migration_log'::regclass ORDER BY 1, 2")
    indexes = ("SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
               "WHERE indrelid::regclass::text IN ('users','journal_entries','tags','reminders') "
               "ORDER BY 1")
    run_ok(any_legacy_db, "validate_schema")  # creates migration_log, so the query can name it
    before = (execute(any_legacy_db, query), execute(any_legacy_db, indexes))
    run_ok(any_legacy_db, "full_migration")
    assert (execute(any_legacy_db, query), execute(any_legacy_db, indexes)) == before


def test_orphans_abort_by_default_and_change_nothing(legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, users=20)
    execute(legacy_no_fk_db, "UPDATE tags SET user_id = '00000000-0000-4000-8000-0000000000aa' "
                             "WHERE id = (SELECT min(id) FROM tags)")
    run_ok(legacy_no_fk_db, "backup_data")
    run_ok(legacy_no_fk_db, "migrate_users")
    before = print_of(legacy_no_fk_db, include_backup=True)
    result = operate(legacy_no_fk_db, "migrate_foreign_keys")
    assert result.exit_code == 1
    assert "00000000-0000-4000-8000-0000000000aa" in result.output
    assert "public.tags.user_id" in result.output
    assert print_of(legacy_no_fk_db, include_backup=True) == before


def test_orphans_quarantined_on_request_are_kept_not_deleted(legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, users=20)
    orphan = "00000000-0000-4000-8000-0000000000bb"
    execute(legacy_no_fk_db, "UPDATE reminders SET user_id = %s "
                             "WHERE id = (SELECT min(id) FROM reminders)", (orphan,))
    total = execute(legacy_no_fk_db, "SELECT count(*) FROM reminders")[0][0]
    result = run_ok(legacy_no_fk_db, "full_migration", "--orphans=quarantine")
    assert "quarantine" in result.output or "migration complete" in result.output
    assert execute(legacy_no_fk_db, "SELECT count(*) FROM reminders WHERE user_id = %s",
                   (orphan,)) == [(0,)]
    assert execute(legacy_no_fk_db,
                   'SELECT count(*) FROM migration_backup."quarantine.public.reminders" '
                   "WHERE user_id = %s", (orphan,)) == [(1,)]
    assert execute(legacy_no_fk_db, "SELECT count(*) FROM reminders")[0][0] == total - 1
    run_ok(legacy_no_fk_db, "validate_migration")
    before = print_of(legacy_no_fk_db, include_backup=True)
    refused = operate(legacy_no_fk_db, "cleanup_backup")  # the quarantine lives only there
    assert refused.exit_code == 1
    assert 'migration_backup.quarantine.public.reminders: 1' in refused.output
    assert print_of(legacy_no_fk_db, include_backup=True) == before
    forced = run_ok(legacy_no_fk_db, "cleanup_backup", "--force")
    assert "with 1 quarantined row(s) (forced)" in forced.output


@pytest.mark.parametrize("problem", ["invalid", "collision"])
def test_bad_ids_refuse_migrate_users_before_any_change(legacy_no_fk_db: str,
                                                        problem: str) -> None:
    seeded(legacy_no_fk_db, users=20)
    first = str(execute(legacy_no_fk_db, "SELECT min(id) FROM users")[0][0])
    bad = "not-a-uuid-at-all" if problem == "invalid" else first.upper()
    execute(legacy_no_fk_db, "INSERT INTO users (id, email) VALUES (%s, 'bad@x')", (bad,))
    run_ok(legacy_no_fk_db, "backup_data")
    before = print_of(legacy_no_fk_db, include_backup=True)
    result = operate(legacy_no_fk_db, "migrate_users")
    assert result.exit_code == 1
    assert bad in result.output
    assert "public.users.id" in result.output
    assert print_of(legacy_no_fk_db, include_backup=True) == before


def test_full_migration_refuses_dirty_data_before_the_backup(legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, users=30, dirty=True)
    before = print_of(legacy_no_fk_db, include_backup=True)
    result = operate(legacy_no_fk_db, "full_migration")
    assert result.exit_code == 1
    for planted in ("not-a-uuid", "00000000-0000-4000-8000-000000000001"):
        assert planted in result.output
    assert "--operation=rollback" in result.output or "rollback" in result.output
    assert print_of(legacy_no_fk_db, include_backup=True) == before


def test_migrate_foreign_keys_needs_migrated_users(legacy_db: str) -> None:
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "backup_data")
    result = operate(legacy_db, "migrate_foreign_keys")
    assert result.exit_code == 1
    assert "migrate_users first" in result.output


def test_steps_without_a_backup_are_refused(legacy_db: str) -> None:
    result = operate(legacy_db, "migrate_users")
    assert result.exit_code == 1
    assert "backup_data first" in result.output


def test_backup_is_verified_and_never_overwritten(legacy_db: str) -> None:
    seeded(legacy_db, users=10)
    run_ok(legacy_db, "backup_data")
    counts = execute(legacy_db, "SELECT table_name, row_count FROM migration_backup.backup_tables "
                                "ORDER BY 1")
    assert dict(counts) == {"journal_entries": 30, "reminders": 10, "tags": 10, "users": 10}
    execute(legacy_db, "UPDATE users SET display_name = 'changed' "
                       "WHERE id = (SELECT min(id) FROM users)")  # the application's: logged
    assert "application changed since excepted (public.users); kept" in run_ok(
        legacy_db, "backup_data").output
    execute(legacy_db, "SET uuid_migration.engine = 'on'; UPDATE users SET "
                       "display_name = 'unlogged' WHERE id = (SELECT max(id) FROM users)")
    result = operate(legacy_db, "backup_data")
    assert result.exit_code == 1
    assert "no longer matches" in result.output


def test_cleanup_needs_a_passing_validation_unless_forced(legacy_db: str) -> None:
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "backup_data")
    refused = operate(legacy_db, "cleanup_backup")
    assert refused.exit_code == 1
    assert "validate_migration" in refused.output
    forced = run_ok(legacy_db, "cleanup_backup", "--force").output
    assert "forced" in forced
    logged = execute(legacy_db, "SELECT details->>'forced' FROM migration_log "
                                "WHERE operation = 'cleanup_backup' AND status = 'completed'")
    assert logged == [("true",)]


def test_a_second_concurrent_run_is_refused_naming_the_holder(legacy_db: str) -> None:
    holder = connect(legacy_db, application_name="other-migration", autocommit=True)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s, %s)", ADVISORY_KEYS)
        result = operate(legacy_db, "backup_data")
    finally:
        holder.close()
    assert result.exit_code == 1
    assert "other-migration" in result.output
    assert execute(legacy_db, "SELECT to_regnamespace('migration_backup')") == [(None,)]


def test_a_locked_table_makes_ddl_retry_until_it_is_free(legacy_db: str, tmp_path: Path) -> None:
    """The copy column's ADD COLUMN finds users taken: its lock is asked NOWAIT, refused at
    once without queueing, and tried again until the table is free a second later."""
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "backup_data")
    blocker = connect(legacy_db, autocommit=False)
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
    releaser = threading.Timer(1.0, blocker.rollback)
    releaser.start()
    log = tmp_path / "run.log"
    try:
        result = operate(legacy_db, "migrate_users", "--lock-timeout=100", log_file=log)
    finally:
        releaser.join()
        blocker.close()
    assert result.exit_code == 0, result.output
    assert "add id_uuid to public.users: lock not granted at once (try 1, not queueing)" \
        in log.read_text()  # it was refused, went on


def test_a_lock_never_released_fails_cleanly(legacy_db: str) -> None:
    """Three short attempts (the default is 30): the failure names who held the lock."""
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "backup_data")
    blocker = connect(legacy_db, application_name="the-application", autocommit=False)
    blocker_pid = blocker.get_backend_pid()
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS SHARE MODE")
        with pytest.raises(MigrationError) as failed:
            run_in_process(legacy_db, "migrate_users", settings=Settings(
                lock_timeout_ms=20, ddl_attempts=3, show_progress=False))
    finally:
        blocker.close()
    assert "could not lock" in failed.value.message
    assert f"pid {blocker_pid} " in failed.value.hint
    assert "'the-application'" in failed.value.hint
    assert "stop the application" not in failed.value.hint
    assert column_types(legacy_db)["users.id"] == "character varying"


def test_every_engine_statement_runs_under_the_statement_timeout(legacy_db: str) -> None:
    """A runaway query is cut off; only the whole-table scans lift it, each for itself."""
    with (Session.open(legacy_db, Settings(statement_timeout_ms=1234)) as session,
          session.transaction() as cur):
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone() == ("1234ms",)
        with pytest.raises(psycopg2.errors.QueryCanceled):
            cur.execute("SELECT pg_sleep(2)")


def test_the_owner_is_no_superuser(legacy_db: str) -> None:
    assert execute(legacy_db, "SELECT rolsuper, rolcreatedb FROM pg_roles "
                              "WHERE rolname = current_user") == [(False, False)]
    seeded(legacy_db, users=5)
    run_ok(legacy_db, "full_migration")


def test_the_password_never_leaks(legacy_db: str, tmp_path: Path) -> None:
    password = legacy_db.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    seeded(legacy_db, users=5)
    log = tmp_path / "migration.log"
    outputs = [operate(legacy_db, op, log_file=log).output
               for op in ("full_migration", "status", "rollback", "validate_migration")]
    wrong = legacy_db.replace(password, password + "-wrong")
    refused = operate(wrong, "status", log_file=log)
    assert refused.exit_code == 2
    outputs.append(refused.output)
    logged = execute(legacy_db, "SELECT string_agg(migration_log::text, ' ') FROM migration_log")
    haystack = "\n".join([*outputs, log.read_text(), str(logged)])
    assert password not in haystack
    assert "***" in refused.output or "password" in refused.output


def test_names_that_need_quoting_and_other_key_types(sandbox: Sandbox) -> None:
    """A schema and tables whose names need quotes, text and varchar(64) keys."""
    schema = 'My "App"-Schema'
    legacy = (schema_sql("legacy")
              .replace("VARCHAR(36) PRIMARY KEY DEFAULT", "TEXT PRIMARY KEY DEFAULT", 1)
              .replace("user_id     VARCHAR(36) NOT NULL", "user_id VARCHAR(64) NOT NULL"))
    with sandbox.database("quoting", variant=None) as dsn:
        with connected(dsn) as conn, conn.cursor() as cur:
            cur.execute('CREATE SCHEMA "My ""App""-Schema"')
            cur.execute('SET search_path = "My ""App""-Schema"')
            cur.execute(legacy)
            cur.execute('CREATE TABLE "Audit Log" ("Entry Id" serial PRIMARY KEY, '
                        '"Who" VARCHAR(36) REFERENCES users (id))')  # and no index
            cur.execute("INSERT INTO users (id, email) SELECT gen_random_uuid()::text, g::text "
                        "FROM generate_series(1, 5) g")
            cur.execute('INSERT INTO "Audit Log" ("Who") SELECT id FROM users')
            cur.execute("INSERT INTO journal_entries (user_id, title) SELECT id, 't' FROM users")
        result = run_ok(dsn, "full_migration", f"--schema={schema}")
        assert "migration complete" in result.output
        checked = run_ok(dsn, "validate_migration", f"--schema={schema}").output
        assert ('[WARN] fk_indexes My "App"-Schema.Audit Log.Who: no index leads with the column'
                in checked)  # a warning, not a failure
        rows = execute(dsn, "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) "
                            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                            "WHERE c.relnamespace = to_regnamespace(%s) "
                            "AND a.attname IN ('id', 'user_id', 'Who') AND c.relkind = 'r' "
                            "AND c.relname IN ('users', 'journal_entries', 'Audit Log')",
                       ('"My ""App""-Schema"',))
        types = {(t, c): kind for t, c, kind in rows}
        assert types[("users", "id")] == "uuid"
        assert types[("journal_entries", "user_id")] == "uuid"
        assert types[("Audit Log", "Who")] == "uuid"  # found through its FK, not named anywhere
        run_ok(dsn, "rollback", f"--schema={schema}")
        rows = execute(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                            "WHERE attrelid = to_regclass(%s) AND attname = 'id'",
                       ('"My ""App""-Schema".users',))
        assert rows == [("text",)]


def test_a_read_only_role_cannot_run_a_changing_operation(legacy_db: str,
                                                          sandbox: Sandbox) -> None:
    """Exit 1 with the server's reason, and no partial change (a plain permission error)."""
    sandbox.admin_execute(sql.SQL(
        "DO $$BEGIN CREATE ROLE reader LOGIN PASSWORD 'reader-pw'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END$$"))
    reader = with_credentials(legacy_db, user="reader", password="reader-pw",
                              dbname=legacy_db.rsplit("/", 1)[1])
    result = operate(reader, "backup_data")
    assert result.exit_code == 1
    assert "permission denied" in result.output


@pytest.mark.parametrize(("blocker", "name"), [
    ("CREATE VIEW user_ids AS SELECT coalesce(id, '') AS id FROM users",
     "view public.user_ids"),  # uuid and varchar cannot be matched: does not compile
    ("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;"
     "CREATE FUNCTION is_short(varchar) RETURNS boolean LANGUAGE sql AS "
     "'SELECT length($1) < 36';"
     "CREATE TRIGGER users_touch BEFORE UPDATE OF id ON users "
     "FOR EACH ROW WHEN (is_short(NEW.id)) EXECUTE FUNCTION touch()",
     "trigger users_touch"),  # its WHEN takes a varchar: does not compile
    ("ALTER TABLE users ADD CONSTRAINT users_id_set CHECK (coalesce(id, '') <> '')",
     "constraint users_id_set"),  # uuid and varchar cannot be matched: does not compile
    ("ALTER TABLE users ENABLE ROW LEVEL SECURITY;"  # stored as (id)::text IN (SELECT id ...)
     "CREATE POLICY active_rows ON users USING (id IN (SELECT id FROM users WHERE is_active))",
     "policy active_rows"),
], ids=["view", "trigger", "check", "policy"])
def test_objects_the_swap_cannot_carry_are_refused_by_name(
        legacy_db: str, blocker: str, name: str) -> None:
    seeded(legacy_db, users=5)
    execute(legacy_db, blocker)
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1
    assert f"blocker public.users.id: {name} " in result.output
    assert print_of(legacy_db, include_backup=True) == before


def test_a_child_that_spells_its_parent_differently_is_reported_and_kept(
        legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, users=5)
    user = str(execute(legacy_no_fk_db, "SELECT min(id) FROM users")[0][0])
    execute(legacy_no_fk_db, "UPDATE tags SET user_id = upper(user_id) WHERE user_id = %s",
            (user,))
    report = run_ok(legacy_no_fk_db, "validate_schema", "--verbose").output
    assert "respelled_reference public.tags.user_id" in report
    assert user.upper() in report
    assert "MiB of free disk needed" in report
    run_ok(legacy_no_fk_db, "full_migration")
    assert execute(legacy_no_fk_db, "SELECT count(*) FROM tags t JOIN users u ON u.id = t.user_id "
                                    "WHERE u.id::text = %s", (user,)) == [(1,)]


def test_column_grants_on_the_key_columns_survive_the_swap_and_the_rollback(
        legacy_db: str, sandbox: Sandbox) -> None:
    sandbox.admin_execute(sql.SQL(
        "DO $$BEGIN CREATE ROLE reporting NOLOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END$$"))
    seeded(legacy_db, users=5)
    execute(legacy_db, "GRANT SELECT (id, email) ON users TO reporting;"
                       "GRANT REFERENCES (id) ON users TO PUBLIC;"
                       "GRANT SELECT (user_id), UPDATE (user_id) ON tags TO reporting "
                       "WITH GRANT OPTION")
    grants = ("SELECT c.relname, a.attname, coalesce(pg_get_userbyid(nullif(g.grantee, 0)), "
              "'PUBLIC'), g.privilege_type, g.is_grantable FROM pg_attribute a "
              "JOIN pg_class c ON c.oid = a.attrelid CROSS JOIN LATERAL aclexplode(a.attacl) g "
              "WHERE c.relname IN ('users', 'tags') AND c.relnamespace = 'public'::regnamespace "
              "AND NOT a.attisdropped "
              "ORDER BY 1, 2, 3, 4")
    before = execute(legacy_db, grants)
    assert len(before) == 5
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, grants) == before
    run_ok(legacy_db, "rollback")
    assert execute(legacy_db, grants) == before


@pytest.mark.parametrize(("full_page_writes", "max_wal", "status", "advice"), [
    ("on", 96 * 2**20, "warn", "raise max_wal_size to 4GB or more"),
    ("on", 3 * 2**30, "warn", "raise max_wal_size to 4GB or more"),
    ("on", 4 * 2**30, "info", None),
    ("off", 96 * 2**20, "info", None),
], ids=["small", "just under", "room", "full_page_writes off"])
def test_the_wal_advice_warns_where_checkpoints_fall_inside_the_migration(
        full_page_writes: str, max_wal: int, status: str, advice: str | None) -> None:
    """A plan of 1 GiB wants 4 GiB of max_wal_size when every checkpoint makes the next
    change to each page write it whole (no server: the settings are given)."""
    finding = wal_advice(full_page_writes=full_page_writes == "on", max_wal_bytes=max_wal,
                         checkpoint_timeout="5min", plan_bytes=2**30)
    assert (finding.check, finding.status.value) == ("wal", status)
    assert (finding.hint == "") if advice is None else (advice in finding.hint)
    assert "checkpoint_timeout 5min, wal_compression off" in finding.message


@pytest.mark.parametrize("max_wal", [96 * 2**20, 4 * 2**30], ids=["small", "room"])
def test_the_wal_advice_gives_the_grant_that_lets_the_engine_compress_whole_pages(
        max_wal: int) -> None:
    """A role that may not set wal_compression is told the statement that lets it; one whose
    sessions compress is not (no server: the settings are given)."""
    grant = 'GRANT SET ON PARAMETER wal_compression TO "app owner"'
    refused = wal_advice(full_page_writes=True, max_wal_bytes=max_wal, checkpoint_timeout="5min",
                         plan_bytes=2**30, grant_for="app owner")
    assert grant in refused.hint
    compressed = wal_advice(full_page_writes=True, max_wal_bytes=max_wal,
                            checkpoint_timeout="5min", plan_bytes=2**30, compression="lz4")
    assert "wal_compression lz4 in the engine's sessions" in compressed.message
    assert "GRANT" not in compressed.hint


def _wal_compression(dsn: str, settings: Settings) -> tuple[str, str]:
    """What an engine session's wal_compression is, and its pre-flight's wal hint."""
    with Session.open(dsn, settings) as session:
        with session.conn.cursor() as cur:
            cur.execute("SHOW wal_compression")
            (value,), = cur.fetchall()
        (finding,) = [f for f in validate_schema(session) if f.check == "wal"]
    return value, finding.hint


def test_the_engine_compresses_its_whole_pages_where_the_role_may(
        legacy_db: str, sandbox: Sandbox) -> None:
    """The engine's sessions set wal_compression = lz4 once the owner is granted it, not
    before (the pre-flight then gives the grant, with full-page writes on), and not with
    --no-wal-compression; other sessions keep the server's setting."""
    admin = sandbox.admin_dsn_for(urlsplit(legacy_db).path.lstrip("/"))
    (lz4, fpw), = execute(admin, "SELECT 'lz4' = ANY (enumvals), "
                                 "current_setting('full_page_writes') = 'on' "
                                 "FROM pg_settings WHERE name = 'wal_compression'")
    value, hint = _wal_compression(legacy_db, Settings(show_progress=False))
    assert value == "off"
    assert (f'GRANT SET ON PARAMETER wal_compression TO "{OWNER_ROLE}"' in hint) is (lz4 and fpw)
    execute(admin, sql.SQL("GRANT SET ON PARAMETER wal_compression TO {}").format(
        sql.Identifier(OWNER_ROLE)))
    try:
        assert _wal_compression(legacy_db, Settings(show_progress=False)) == (
            "lz4" if lz4 else "off", "")
        assert _wal_compression(legacy_db, Settings(show_progress=False,
                                                    wal_compression=False))[0] == "off"
        assert execute(legacy_db, "SHOW wal_compression") == [("off",)]
    finally:
        execute(admin, sql.SQL("REVOKE SET ON PARAMETER wal_compression FROM {}").format(
            sql.Identifier(OWNER_ROLE)))


def test_validate_schema_reads_the_server_s_wal_settings(legacy_db: str) -> None:
    """The pre-flight names the WAL settings it judged, as the server has them."""
    with Session.open(legacy_db, Settings(show_progress=False)) as session:
        found = [f for f in validate_schema(session) if f.check == "wal"]
    (fpw, wal), = execute(legacy_db, "SELECT current_setting('full_page_writes'), "
                                     "pg_size_bytes(current_setting('max_wal_size'))")
    assert len(found) == 1
    assert f"full_page_writes {fpw}," in found[0].message
    assert found[0].count == wal
