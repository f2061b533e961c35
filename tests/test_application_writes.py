"""The application writes through every stage, however it writes: the engine's triggers see
each write and its proofs never reject one the original schema accepts; the change log holds
every kind of write (TRUNCATE, NULL keys, keys that are not UUIDs), and validation, verify and
the rollback report those rows instead of failing on them.

The application is played by plain connections as the owner (no engine marker), or as the
superuser where a write needs ``session_replication_role``; the engine is stopped mid-way at
its fault points, where each bug bites.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import psycopg2.errors
import pytest
from psycopg2 import sql

from migration import backup, verify
from migration.engine import swap
from migration.errors import MigrationError
from migration.model import Table, shadow_name
from migration.operations import OPERATIONS, run
from migration.plan import build_plan
from migration.rehearsal.fingerprint import Fingerprint
from migration.report import Status
from migration.session import Session, Settings
from tests.operate import (
    MISSED_REMINDER,
    connected,
    execute,
    miss_a_reminder,
    operate,
    print_of,
    run_ok,
)
from tests.scenario import UPPER, Scenario

# The engine under every kind of application write: on the oldest and the newest server.
pytestmark = pytest.mark.edges

REMINDERS = Table("public", "reminders")
REMINDERS_FK = "reminders_user_id_fkey"
ENGINE_TRIGGERS = ("SELECT c.relname, t.tgname, t.tgenabled::text FROM pg_trigger t "
                   "JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal "
                   "AND c.relname IN ('users', 'journal_entries', 'tags', 'reminders') "
                   "ORDER BY 1, 2")


def a_user_with_a_reminder(dsn: str) -> tuple[str, str]:
    """A new user and a reminder of theirs, written by the application: their ids as text
    (strings or uuids, as the columns are now)."""
    [(user,)] = execute(dsn, "INSERT INTO users (email) VALUES ('acted@example.com') "
                             "RETURNING id::text")
    [(reminder,)] = execute(dsn, "INSERT INTO reminders (user_id, remind_at) "
                                 "VALUES (%s, now()) RETURNING id::text", (user,))
    return str(user), str(reminder)


def action_triggers(dsn: str, event: int) -> list[tuple[object, ...]]:
    """The foreign keys of reminders whose trigger on users fires for ``event`` (tgtype
    bit: 8 DELETE, 16 UPDATE), in the order they fire (their names' byte order)."""
    return execute(dsn, "SELECT c.conname FROM pg_trigger t "
                        "JOIN pg_constraint c ON c.oid = t.tgconstraint "
                        "WHERE t.tgrelid = 'users'::regclass "
                        "AND c.conrelid = 'reminders'::regclass AND t.tgtype & %s <> 0 "
                        "ORDER BY t.tgname COLLATE \"C\"", (event,))


@pytest.mark.parametrize(("action", "event", "write", "after"), [
    ("ON DELETE SET NULL", 8, "DELETE FROM users WHERE id = %(old)s", None),
    ("ON DELETE SET DEFAULT", 8, "DELETE FROM users WHERE id = %(old)s", None),
    ("ON UPDATE CASCADE", 16, "UPDATE users SET id = %(new)s WHERE id = %(old)s", "new"),
])
def test_a_foreign_key_action_keeps_the_copy_in_step_when_the_copy_s_trigger_fires_first(
        scenario: Callable[..., Scenario], action: str, event: int, write: str,
        after: str | None) -> None:
    """The original FK and its copy both act on the same write, in the order of their
    triggers' names, which end with their OIDs compared as text: once the OID counter has
    passed a power of ten ("1000151" < "18093"), the copy's fires first.  Here the original
    is made again once its copy exists (a later OID, as many digits): the copy's fires
    first.  It writes the copy column alone; the sync trigger must keep the pair equal, or
    the fill proof rejects the application's write."""
    s = scenario()
    again = sql.SQL("ALTER TABLE reminders DROP CONSTRAINT {fk}, ADD CONSTRAINT {fk} "
                    "FOREIGN KEY (user_id) REFERENCES users (id) {action}").format(
        fk=sql.Identifier(REMINDERS_FK), action=sql.SQL(action))
    execute(s.dsn, again)
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    user, reminder = a_user_with_a_reminder(s.dsn)
    s.crash("migrate_foreign_keys", "swap#1")  # every copy built and in force, no swap
    execute(s.dsn, again)
    assert action_triggers(s.dsn, event) == [
        (shadow_name("fk", REMINDERS, REMINDERS_FK),), (REMINDERS_FK,)]
    new = str(uuid.uuid4())
    execute(s.dsn, write, {"old": user, "new": new})
    expected = None if after is None else new
    assert execute(s.dsn, "SELECT user_id, user_id_uuid::text FROM reminders WHERE id = %s",
                   (reminder,)) == [(expected, expected)]
    run_ok(s.dsn, "migrate_foreign_keys")
    run_ok(s.dsn, "validate_migration")


NOBODY = "00000000-0000-0000-0000-000000000000"  # the "deleted user" a child's default names


def falling_back_to_nobody(dsn: str, action: str) -> sql.Composable:
    """Make reminders.user_id default to NOBODY, a user, under a foreign key with
    ``action``; the statement that makes that foreign key again (a later OID)."""
    execute(dsn, "INSERT INTO users (id, email) VALUES (%s, 'nobody@example.com')", (NOBODY,))
    again = sql.SQL("ALTER TABLE reminders DROP CONSTRAINT {fk}, ADD CONSTRAINT {fk} "
                    "FOREIGN KEY (user_id) REFERENCES users (id) {action}").format(
        fk=sql.Identifier(REMINDERS_FK), action=sql.SQL(action))
    execute(dsn, sql.SQL("ALTER TABLE reminders ALTER user_id SET DEFAULT {}").format(
        sql.Literal(NOBODY)))
    execute(dsn, again)
    return again


@pytest.mark.parametrize("order", ["copy first", "original first"])
@pytest.mark.parametrize(("action", "event", "write"), [
    ("ON DELETE SET DEFAULT", 8, "DELETE FROM users WHERE id = %(old)s"),
    ("ON UPDATE SET DEFAULT", 16, "UPDATE users SET id = %(new)s WHERE id = %(old)s"),
])
@pytest.mark.parametrize("stage", ["expansion", "rollback"])
def test_set_default_to_a_default_that_is_a_row_keeps_the_copy_in_step(
        scenario: Callable[..., Scenario], stage: str, action: str, event: int, write: str,
        order: str) -> None:
    """``SET DEFAULT`` where the child's key has a default naming a row (a "deleted user"):
    the server checks, after the action, that no row still refers to the old key, so the
    copy's action cannot wait for the original's; both must land on the default, in both
    trigger orders, during the expansion and after the swap on the way back."""
    s, back, copy_first = scenario(), stage == "rollback", order == "copy first"
    again = falling_back_to_nobody(s.dsn, action)
    run_ok(s.dsn, "full_migration" if back else "backup_data")
    if not back:
        run_ok(s.dsn, "migrate_users")
    user, reminder = a_user_with_a_reminder(s.dsn)
    s.crash("rollback" if back else "migrate_foreign_keys", "swap#1")  # copies in force
    if copy_first:
        execute(s.dsn, again)
    original, copy = (REMINDERS_FK,), (shadow_name("fk", REMINDERS, REMINDERS_FK),)
    assert action_triggers(s.dsn, event) == ([copy, original] if copy_first
                                             else [original, copy])
    execute(s.dsn, write, {"old": user, "new": str(uuid.uuid4())})
    temp = "user_id_text" if back else "user_id_uuid::text"
    assert execute(s.dsn, f"SELECT user_id::text, {temp} FROM reminders WHERE id::text = %s",
                   (reminder,)) == [(NOBODY, NOBODY)]
    run_ok(s.dsn, "rollback" if back else "migrate_foreign_keys")
    if not back:
        run_ok(s.dsn, "validate_migration")
    assert execute(s.dsn, "SELECT user_id::text FROM reminders WHERE id::text = %s",
                   (reminder,)) == [(NOBODY,)]


def test_a_resumed_run_gives_an_older_run_s_copies_their_default_and_rule(
        scenario: Callable[..., Scenario]) -> None:
    """A run of an older version left copies without a default and sync functions that
    knew no SET DEFAULT (played here by a body that does nothing): the next run gives the
    copies their defaults and replaces the functions, and a SET DEFAULT whose copy acts
    first then succeeds."""
    s = scenario()
    again = falling_back_to_nobody(s.dsn, "ON DELETE SET DEFAULT")
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    user, reminder = a_user_with_a_reminder(s.dsn)
    s.crash("migrate_foreign_keys", "swap#1")
    execute(s.dsn, "ALTER TABLE reminders ALTER user_id_uuid DROP DEFAULT; "
                   "CREATE OR REPLACE FUNCTION migration_backup.sync_uuid_column() "
                   "RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")
    execute(s.dsn, again)
    s.crash("migrate_foreign_keys", "swap#1")
    execute(s.dsn, "DELETE FROM users WHERE id = %s", (user,))
    assert execute(s.dsn, "SELECT user_id, user_id_uuid::text FROM reminders WHERE id = %s",
                   (reminder,)) == [(NOBODY, NOBODY)]
    run_ok(s.dsn, "migrate_foreign_keys")
    run_ok(s.dsn, "validate_migration")


def test_a_row_the_fill_missed_can_be_updated_before_the_proof_fills_it(
        scenario: Callable[..., Scenario]) -> None:
    """A row that a write the sync trigger did not see moved out of the fill's reach
    (``miss_a_reminder``) has an empty copy when the fill proof comes into force (NOT VALID), and
    keeps it until ``fill_missed_rows``, after a whole-table VALIDATE.  Stopped there, the
    application updates that row, writing none of its keys: the write must succeed."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    front = MISSED_REMINDER
    original, user_id = miss_a_reminder(s.dsn, s.admin_dsn)
    s.crash("migrate_foreign_keys", "fill missed public.reminders.user_id#1")
    assert execute(s.dsn, "SELECT convalidated FROM pg_constraint "
                          "WHERE conname = 'migration_filled_user_id' "
                          "AND conrelid = 'reminders'::regclass") == [(False,)]
    execute(s.dsn, "UPDATE reminders SET note = note, done = done WHERE id = %s", (front,))
    assert execute(s.dsn, "SELECT user_id_uuid = %s::uuid FROM reminders WHERE id = %s",
                   (user_id, front)) == [(True,)]
    run_ok(s.dsn, "migrate_foreign_keys")
    execute(s.dsn, "SET uuid_migration.engine = 'on'; UPDATE reminders SET id = %s "
                   "WHERE id = %s", (original, front))
    s.assert_migrated()


UPSERTS = [
    # the parent's key: a conflict, then none
    ("INSERT INTO users (id, email) SELECT id, 'taken@example.com' FROM users "
     "WHERE email = 'upsert@example.com' "
     "ON CONFLICT (id) DO UPDATE SET display_name = 'upserted'", 1),
    ("INSERT INTO users (id, email) VALUES (%(new)s, 'fresh@example.com') "
     "ON CONFLICT (id) DO UPDATE SET display_name = 'upserted'", 1),
    # a unique constraint over a child's key, inferred and by name
    ("INSERT INTO tags (user_id, name) SELECT user_id, name FROM tags WHERE name = 'upsert' "
     "ON CONFLICT (user_id, name) DO UPDATE SET color = '#00ff00'", 1),
    ("INSERT INTO tags (user_id, name) SELECT id, 'fresh' FROM users "
     "WHERE email = 'upsert@example.com' "
     "ON CONFLICT (user_id, name) DO UPDATE SET color = '#00ff00'", 1),
    ("INSERT INTO tags (user_id, name) SELECT user_id, name FROM tags WHERE name = 'upsert' "
     "ON CONFLICT ON CONSTRAINT tags_user_id_name_key DO NOTHING", 0),
]
COPIED = {  # a row for each table by COPY, the user's id spelled upper-case; its marker
    "users": ("id, email", "{new_upper},copied@example.com", "email = 'copied@example.com'"),
    "journal_entries": ("user_id, title", "{user_upper},copied", "title = 'copied'"),
    "tags": ("user_id, name", "{user_upper},copied", "name = 'copied'"),
    "reminders": ("user_id, remind_at, note", "{user_upper},2030-01-01 00:00+00,copied",
                  "note = 'copied'"),
}


@pytest.mark.parametrize("stage", ["expansion", "rollback"])
def test_upserts_and_copy_write_as_without_the_migration(
        scenario: Callable[..., Scenario], stage: str) -> None:
    """``INSERT ... ON CONFLICT DO UPDATE`` against the key's unique index and a unique
    constraint over a child's key, and ``COPY`` into each table, with every copy, index
    and foreign key of the expansion (or of the rollback, after the swap) in force: each
    affects the rows it would without the migration, and the run then finishes."""
    s, back = scenario(), stage == "rollback"
    user = str(uuid.uuid4()).upper()
    execute(s.dsn, "INSERT INTO users (id, email) VALUES (%s, 'upsert@example.com')", (user,))
    execute(s.dsn, "INSERT INTO tags (user_id, name) VALUES (%s, 'upsert')", (user,))
    run_ok(s.dsn, "full_migration" if back else "backup_data")
    if not back:
        run_ok(s.dsn, "migrate_users")
    s.crash("rollback" if back else "migrate_foreign_keys", "swap#1")  # copies in force
    new = str(uuid.uuid4())
    with connected(s.dsn) as conn, conn.cursor() as cur:
        for statement, rows in UPSERTS:
            cur.execute(statement, {"new": new})
            assert cur.rowcount == rows, statement
        for table, (columns, line, _) in COPIED.items():
            row = line.format(new_upper=str(uuid.uuid4()).upper(), user_upper=user)
            cur.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
                sql.Identifier(table), sql.SQL(columns)).as_string(cur), io.StringIO(row + "\n"))
            assert cur.rowcount == 1, table
    assert execute(s.dsn, "SELECT display_name, count(*) FROM users WHERE display_name "
                          "= 'upserted' GROUP BY 1") == [("upserted", 1)]
    assert execute(s.dsn, "SELECT name, color FROM tags WHERE name IN ('fresh', 'upsert') "
                          "ORDER BY 1") == [("fresh", None), ("upsert", "#00ff00")]
    run_ok(s.dsn, "rollback" if back else "migrate_foreign_keys")
    if not back:
        run_ok(s.dsn, "validate_migration")
    for table, (_, _, marker) in COPIED.items():
        assert execute(s.dsn, sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            sql.Identifier(table), sql.SQL(marker))) == [(1,)], table
    assert execute(s.dsn, "SELECT user_id::text FROM tags WHERE name = 'copied'") == [
        (user if back else user.lower(),)]


def rollback_writing(dsn: str, point: str, statement: str) -> list[psycopg2.Error]:
    """Roll back, the application running ``statement`` when the engine reaches ``point``;
    the errors the application got."""
    errors: list[psycopg2.Error] = []
    with Session.open(dsn, Settings(batch_size=7, show_progress=False)) as session:

        def fault(reached: str, pid: int) -> None:
            if reached == point:
                try:
                    execute(dsn, statement)
                except psycopg2.Error as error:
                    errors.append(error)

        session.fault = fault
        run(session, "rollback", OPERATIONS["rollback"])
    return errors


@pytest.mark.parametrize("point", [
    "add user_id_text to public.journal_entries#1",  # the user's copy respelled, no child's
    "validate journal_entries_user_id_fkey#1",  # the foreign key between the copies in force
])
def test_a_write_that_keeps_the_key_keeps_its_original_spelling_on_the_way_back(
        scenario: Callable[..., Scenario], point: str) -> None:
    """An ORM writes every column back (``SET id = id``) during a rollback after the swap:
    the string copy keeps the spelling ``respell`` gave it, or the foreign keys between the
    copies (byte for byte) refuse the write, or the rollback fails when it validates them."""
    s = scenario()
    execute(s.dsn, "INSERT INTO users (id, email) VALUES (%s, 'upper@example.com')", (UPPER,))
    execute(s.dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'upper')",
            (UPPER,))
    before = print_of(s.dsn)
    run_ok(s.dsn, "full_migration")
    assert rollback_writing(s.dsn, point, "UPDATE users SET id = id, email = email, "
                                          "display_name = display_name "
                                          "WHERE email = 'upper@example.com'") == []
    after = print_of(s.dsn)
    assert after == before, "\n".join(before.diff(after))


def test_writes_in_replica_mode_fire_the_engine_s_triggers(
        scenario: Callable[..., Scenario]) -> None:
    """Logical replication's apply, ``pg_restore --disable-triggers`` and bulk loaders write
    with ``session_replication_role = replica``, which skips ENABLE ORIGIN triggers (the
    default).  Played by the superuser (only it, or a role granted SET on the parameter,
    may set it): its rows get their copies and are in the change log."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    replica = "SET session_replication_role = replica; "
    execute(s.admin_dsn, replica + "INSERT INTO users (email) VALUES ('replica@example.com')")
    execute(s.admin_dsn, replica + "UPDATE users SET id = upper(id) "
                                   "WHERE email = 'replica@example.com'")
    assert execute(s.dsn, "SELECT id_uuid = id::uuid FROM users "
                          "WHERE email = 'replica@example.com'") == [(True,)]
    assert execute(s.dsn, "SELECT operation, count(*) FROM migration_backup.change_log "
                          "WHERE table_name = 'users' GROUP BY 1 ORDER BY 1") == [
        ("INSERT", 1), ("UPDATE", 2)]
    assert {(table, name): state for table, name, state in execute(s.dsn, ENGINE_TRIGGERS)} == {
        **{(table, name): "A" for table in ("journal_entries", "reminders", "tags", "users")
           for name in (backup.CHANGE_LOG_TRIGGER,
                        backup.change_log_truncate_trigger(backup.BACKUP_SCHEMA))},
        ("users", "migration_sync_id"): "A"}
    run_ok(s.dsn, "migrate_foreign_keys")
    run_ok(s.dsn, "validate_migration")


def test_a_resumed_run_makes_an_older_backup_s_triggers_fire_always(
        scenario: Callable[..., Scenario]) -> None:
    """A backup an older version took has ENABLE ORIGIN triggers, a sync trigger on UPDATE
    OF the key only and no TRUNCATE trigger: the next step brings them up to date."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    truncate = backup.change_log_truncate_trigger(backup.BACKUP_SCHEMA)
    for table in ("users", "journal_entries", "tags", "reminders"):
        execute(s.dsn, sql.SQL("ALTER TABLE {table} ENABLE TRIGGER {log}; "
                               "DROP TRIGGER {truncate} ON {table}").format(
            table=sql.Identifier(table), log=sql.Identifier(backup.CHANGE_LOG_TRIGGER),
            truncate=sql.Identifier(truncate)))
    execute(s.dsn, "CREATE OR REPLACE TRIGGER migration_sync_id BEFORE INSERT OR UPDATE OF id "
                   "ON users FOR EACH ROW EXECUTE FUNCTION "
                   "migration_backup.sync_uuid_column('id', 'id_uuid')")
    s.crash("migrate_foreign_keys", "swap#1")
    states = execute(s.dsn, ENGINE_TRIGGERS)
    assert {state for _, _, state in states} == {"A"}
    assert len(states) == 4 * 2 + 4  # the change log's two on each table, four sync triggers
    execute(s.admin_dsn, "SET session_replication_role = replica; "
                         "UPDATE users SET email = email WHERE id = (SELECT min(id) FROM users)")
    run_ok(s.dsn, "migrate_foreign_keys")
    run_ok(s.dsn, "validate_migration")


def test_an_application_truncate_is_logged_reported_and_kept_by_the_rollback(
        scenario: Callable[..., Scenario]) -> None:
    """Row triggers do not see a TRUNCATE: a statement trigger logs it, and the table's
    rows are then all the application's, reported, not compared; the rollback keeps the
    truncation (and the row written since), as it keeps the application's other writes."""
    s = scenario()
    run_ok(s.dsn, "full_migration")
    execute(s.dsn, "TRUNCATE reminders")
    execute(s.dsn, "INSERT INTO reminders (user_id, remind_at, note) "
                   "SELECT id, now(), 'after' FROM users ORDER BY id LIMIT 1")
    assert execute(s.dsn, "SELECT operation FROM migration_backup.change_log "
                          "WHERE table_name = 'reminders' ORDER BY id") == [
        ("TRUNCATE",), ("INSERT",)]
    checked = run_ok(s.dsn, "validate_migration").output
    assert "public.reminders: truncated by the application since the backup" in checked
    findings = verify.run(s.dsn, "public", None)
    assert [f for f in findings if f.status is Status.FAIL] == []
    assert any(f.subject == "public.reminders" and "truncated" in f.message for f in findings)
    rolled = run_ok(s.dsn, "rollback")
    assert "it truncated the table: the backup's rows are not put back" in rolled.output
    assert execute(s.dsn, "SELECT note FROM reminders") == [("after",)]
    after = print_of(s.dsn)
    assert after.schema == s.original.schema, "\n".join(s.original.diff(after))


def test_a_null_key_in_a_table_without_a_primary_key_matches_its_log_entry(
        no_pk_db: str) -> None:
    """user_devices is logged by user_id (it has no primary key): a row the application
    inserts with a NULL user_id is in the log as NULL, which must match it."""
    run_ok(no_pk_db, "full_migration")
    execute(no_pk_db, "INSERT INTO user_devices (user_id, device) VALUES (NULL, 'no-user')")
    run_ok(no_pk_db, "validate_migration")
    assert [f for f in verify.run(no_pk_db, "public", None) if f.status is Status.FAIL] == []
    result = run_ok(no_pk_db, "rollback")
    assert "unlogged" not in result.output
    assert execute(no_pk_db, "SELECT count(*) FROM user_devices WHERE device = 'no-user'") == [
        (1,)]


def test_a_key_that_is_not_a_uuid_in_the_change_log_is_a_finding_not_a_failure(
        scenario: Callable[..., Scenario]) -> None:
    """An id that is not a UUID, written and deleted by the application after the backup,
    stays in the change log: validation, verify and the rollback name it (table and value)
    and run to the end."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    execute(s.dsn, "INSERT INTO users (id, email) VALUES ('not-a-uuid', 'bad@example.com')")
    execute(s.dsn, "DELETE FROM users WHERE id = 'not-a-uuid'")
    run_ok(s.dsn, "migrate_users")
    run_ok(s.dsn, "migrate_foreign_keys")
    checked = " ".join(run_ok(s.dsn, "validate_migration").output.split())
    assert "public.users: 1 key(s) in the change log are not UUIDs" in checked, checked
    assert "not-a-uuid" in checked
    findings = verify.run(s.dsn, "public", None)
    assert [f for f in findings if f.status is Status.FAIL] == []
    named = [f for f in findings if f.status is Status.WARN and f.subject == "public.users"]
    assert [sample["id"] for f in named for sample in f.samples] == ["not-a-uuid"]
    rolled = operate(s.dsn, "rollback")
    assert rolled.exit_code == 0, rolled.output
    assert "not-a-uuid" in rolled.output
    s.assert_original()


NOT_A_UUID = "not-a-uuid"
STAND_IN = "SELECT md5(%s)::uuid::text"
"""The copy an id that is not a UUID gets (``model.uuid_copy``)."""


def writing_at(dsn: str, operation: str, point: str, statements: list[str]
               ) -> tuple[MigrationError | None, Fingerprint]:
    """``operation``, the application running ``statements`` (each must succeed) when the
    engine reaches ``point``: its refusal if it refused, and the database (its backup
    included) as it was once they had run."""
    seen: list[Fingerprint] = []
    with Session.open(dsn, Settings(batch_size=7, show_progress=False)) as session:

        def fault(reached: str, pid: int) -> None:
            if reached == point:
                for statement in statements:
                    execute(dsn, statement)
                seen.append(print_of(dsn, include_backup=True))

        session.fault = fault
        try:
            run(session, operation, OPERATIONS[operation])
            refused = None
        except MigrationError as error:
            refused = error
    assert len(seen) == 1, f"{point} was not reached"
    return refused, seen[0]


@pytest.mark.parametrize("then", ["fixed", "rolled back"])
def test_ids_that_are_not_uuids_written_during_the_expansion_are_taken_and_refused_at_the_swap(
        scenario: Callable[..., Scenario], then: str) -> None:
    """The original schema takes any string as an id, so the application's writes must
    succeed while the columns are expanded: a user written during the users' fill, and
    rows referring to it during a later run, after its pre-flight.  Their copies hold a
    stand-in (equal for equal strings, so the foreign keys between the copies hold), which
    the swap must never make a value: it refuses, naming each column, row and value, and
    changes nothing.  Once the rows are corrected the migration completes and verify
    passes; a rollback from there gives the database back as it was, with the rows."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    # ahead of the fill's checkpoint: a later batch fills it again, and the proof checks it
    done, _ = writing_at(s.dsn, "migrate_users", "batch public.users.id#1", [
        f"INSERT INTO users (id, email) VALUES ('{NOT_A_UUID}', 'not@example.com')"])
    assert done is None, done
    run_ok(s.dsn, "migrate_foreign_keys", "--postpone-swap")
    with connected(s.dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # as the swap asks, under its locks
        plan = build_plan(conn)
        cur.execute(sql.SQL("EXPLAIN ") + swap.locked_check(cur, plan).select)
        read = "\n".join(str(line) for (line,) in cur.fetchall())
        for key in plan.columns:
            assert key.invalid_index in read, read
        assert "Seq Scan" not in read, read
    refused, before = writing_at(s.dsn, "migrate_foreign_keys", "add migration_filled_user_id#1", [
        f"INSERT INTO journal_entries (user_id, title) VALUES ('{NOT_A_UUID}', 'not')",
        f"INSERT INTO reminders (user_id, remind_at) VALUES ('{NOT_A_UUID}', now())"])
    assert refused is not None, "the swap made a stand-in a value"
    [(stand_in,)] = execute(s.dsn, STAND_IN, (NOT_A_UUID,))
    for table, column in (("users", "id"), ("journal_entries", "user_id"),
                          ("reminders", "user_id")):
        assert execute(s.dsn, sql.SQL("SELECT {}::text FROM {} WHERE {} = %s").format(
            sql.Identifier(f"{column}_uuid"), sql.Identifier(table), sql.Identifier(column)),
            (NOT_A_UUID,)) == [(stand_in,)]
    after = print_of(s.dsn, include_backup=True)
    assert after == before, "\n".join(before.diff(after))
    assert str(refused).startswith("swap refused, nothing was changed"), str(refused)
    [(entry,)] = execute(s.dsn, "SELECT id FROM journal_entries WHERE user_id = %s",
                         (NOT_A_UUID,))
    named = {finding.subject: finding.samples for finding in refused.findings}
    assert named["public.users.id"] == [{"table": "public.users", "id": NOT_A_UUID}]
    assert named["public.journal_entries.user_id"] == [
        {"table": "public.journal_entries", "id": entry, "user_id": NOT_A_UUID}]
    assert [sample["user_id"] for sample in named["public.reminders.user_id"]] == [NOT_A_UUID]
    assert "public.users.id: 'not-a-uuid'" in str(refused)
    assert "ready to swap" in s.stage()
    if then == "fixed":
        [(reminder, user)] = execute(
            s.dsn, "UPDATE reminders SET user_id = (SELECT min(id) FROM users) "
                   "WHERE user_id = %s RETURNING id, user_id", (NOT_A_UUID,))
        execute(s.dsn, "DELETE FROM users WHERE id = %s", (NOT_A_UUID,))  # and its entries
        run_ok(s.dsn, "migrate_foreign_keys")
        run_ok(s.dsn, "validate_migration")
        assert [f for f in verify.run(s.dsn, "public", None) if f.status is Status.FAIL] == []
        assert execute(s.dsn, "SELECT user_id::text FROM reminders WHERE id = %s",
                       (reminder,)) == [(user,)]
    else:
        run_ok(s.dsn, "rollback")
        assert execute(s.dsn, "SELECT (SELECT count(*) FROM users WHERE id = %s), "
                              "(SELECT count(*) FROM journal_entries WHERE user_id = %s), "
                              "(SELECT count(*) FROM reminders WHERE user_id = %s)",
                       (NOT_A_UUID,) * 3) == [(1, 1, 1)]  # the application's rows are kept
        execute(s.dsn, "DELETE FROM reminders WHERE user_id = %s", (NOT_A_UUID,))
        execute(s.dsn, "DELETE FROM users WHERE id = %s", (NOT_A_UUID,))
        s.assert_original()
