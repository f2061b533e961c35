"""The application writes through every stage, however it writes: the engine's triggers see
each write and its proofs never reject one the original schema accepts; the change log holds
every kind of write (TRUNCATE, NULL keys, keys that are not UUIDs), and validation, verify and
the rollback report those rows instead of failing on them.

The application is played by plain connections as the owner (no engine marker), or as the
superuser where a write needs ``session_replication_role``; the engine is stopped mid-way at
its fault points, where each bug bites.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg2.errors
import pytest
from psycopg2 import sql

from migration.model import Table, shadow_name
from migration.operations import OPERATIONS, run
from migration.session import Session, Settings
from tests.operate import execute, print_of, run_in_process, run_ok
from tests.test_rollback import UPPER, Scenario, scenario, seeded

__all__ = ["scenario", "seeded"]  # the fixtures this module borrows

REMINDERS = Table("public", "reminders")
REMINDERS_FK = "reminders_user_id_fkey"



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
    [(user,)] = execute(s.dsn, "INSERT INTO users (email) VALUES ('acted@example.com') "
                               "RETURNING id")
    [(reminder,)] = execute(s.dsn, "INSERT INTO reminders (user_id, remind_at) "
                                   "VALUES (%s, now()) RETURNING id", (user,))
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


def test_a_row_the_fill_missed_can_be_updated_before_the_proof_fills_it(
        scenario: Callable[..., Scenario]) -> None:
    """A row whose key a write the sync trigger did not see moved behind the fill's
    checkpoint has an empty copy when the fill proof comes into force (NOT VALID), and
    keeps it until ``fill_missed_rows``, after a whole-table VALIDATE.  Stopped there, the
    application updates that row, writing none of its keys: the write must succeed."""
    s = scenario()
    run_ok(s.dsn, "backup_data")
    run_ok(s.dsn, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(s.dsn, "migrate_foreign_keys", admin_dsn=s.admin_dsn,
                       settings=Settings(batch_size=3, jobs=1, show_progress=False),
                       crash_at="batch public.reminders.user_id#3")
    front = "00000000-0000-4000-8000-000000000000"
    [(original, user_id)] = execute(
        s.dsn, "SET uuid_migration.engine = 'on'; "
               "UPDATE reminders r SET id = %s FROM (SELECT max(id) AS id FROM reminders "
               "WHERE user_id IS NOT NULL AND user_id_uuid IS NULL) m WHERE r.id = m.id "
               "RETURNING m.id, r.user_id", (front,))
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
