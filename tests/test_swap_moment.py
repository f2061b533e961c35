"""Around the swap: the operator chooses its moment (``--postpone-swap``), and learns which
client sessions connected before it (their prepared statements may fail)."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg2.errors
import pytest
from click.testing import CliRunner
from psycopg2 import sql

from migration import verify
from migration.connection import connect
from migration.rehearsal.sandbox import Sandbox, with_credentials
from tests.operate import execute, run_ok, seeded

PLAN = (("users", "id"), ("journal_entries", "user_id"), ("tags", "user_id"),
        ("reminders", "user_id"))


def key_types(dsn: str) -> set[str]:
    """The types the plan's key columns have now."""
    return {str(kind) for table, column in PLAN for (kind,) in execute(
        dsn, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public' "
             "AND (table_name, column_name) = (%s, %s)", (table, column))}


def test_recycle_sessions_ends_only_the_idle_sessions_of_the_named_roles(
        legacy_db: str, sandbox: Sandbox) -> None:
    """``--recycle-sessions``: right after the swap, the sessions of the named roles that
    connected before it and are idle are ended; one idle in a transaction, and one of a
    role the migrating role may not signal (a superuser's), are left and named, and a
    session of a role not named is not touched."""
    seeded(legacy_db, users=20)
    admin_dsn = sandbox.admin_dsn_for(urlsplit(legacy_db).path.lstrip("/"))  # superuser
    idle = connect(legacy_db, application_name="billing-app", autocommit=True)
    in_transaction = connect(legacy_db, application_name="billing-batch", autocommit=False)
    superuser = connect(admin_dsn, application_name="console", autocommit=True)
    database = urlsplit(legacy_db).path.lstrip("/")
    execute(admin_dsn, "CREATE ROLE recycle_not_named LOGIN PASSWORD 'not-named-pw'")
    other = connect(with_credentials(admin_dsn, user="recycle_not_named", password="not-named-pw",
                                     dbname=database), application_name="reports",
                    autocommit=True)
    try:
        with idle.cursor() as cur:
            cur.execute("PREPARE newest AS SELECT * FROM users ORDER BY email LIMIT 1")
        pid = {name: conn.get_backend_pid() for name, conn in (
            ("idle", idle), ("in_transaction", in_transaction), ("superuser", superuser))}
        with in_transaction.cursor() as cur:
            cur.execute("SELECT 1")  # idle in a transaction that holds no lock of ours
        with superuser.cursor() as cur:
            cur.execute("SELECT current_user")
            (superuser_role,) = cur.fetchone()

        output = one_line(run_ok(legacy_db, "full_migration",
                                 f"--recycle-sessions=app_owner,{superuser_role}").output)
        assert (f"--recycle-sessions left 2 session(s) of app_owner, {superuser_role}"
                in output)
        assert f"{pid['in_transaction']} (app_owner, idle in transaction)" in output
        assert f"{pid['superuser']} ({superuser_role}, state hidden)" in output
        (details,) = execute(legacy_db, "SELECT details FROM migration_log WHERE operation = "
                                        "'migrate_foreign_keys' ORDER BY id DESC LIMIT 1")[0]
        assert details["sessions_recycled"] == [f"{pid['idle']} (app_owner, idle)"]

        with pytest.raises(psycopg2.OperationalError), idle.cursor() as cur:
            cur.execute("EXECUTE newest")  # ended: its pool opens a new session
        for kept in (in_transaction, superuser, other):
            with kept.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
    finally:
        for conn in (idle, in_transaction, superuser, other):
            conn.close()
        execute(admin_dsn, "DROP ROLE IF EXISTS recycle_not_named")


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_the_sessions_connected_before_the_swap_are_named_until_they_are_recycled(
        legacy_db: str) -> None:
    seeded(legacy_db, users=20)
    before = connect(legacy_db, application_name="billing-app", autocommit=True)
    try:
        with before.cursor() as cur:
            cur.execute("PREPARE newest AS SELECT * FROM users ORDER BY email LIMIT 1")
            cur.execute("EXECUTE newest")
            # the address the server sees: loopback here, the bridge's gateway under Docker
            cur.execute("SELECT coalesce(host(inet_client_addr()), 'local')")
            (address,) = cur.fetchone()
        output = one_line(run_ok(legacy_db, "full_migration").output)
        assert ("1 client session(s) connected before the swap: statements they prepared "
                "over the converted tables may fail") in output
        assert f"application 'billing-app', user app_owner, from {address}: 1 session(s)" \
            in output
        with before.cursor() as cur, pytest.raises(psycopg2.errors.FeatureNotSupported,
                                                   match="cached plan must not change"):
            cur.execute("EXECUTE newest")  # what the listing is for
        after = connect(legacy_db, application_name="reporting-app", autocommit=True)
        try:
            status = one_line(run_ok(legacy_db, "status").output)
            assert "client sessions: 1 client session(s) connected before the swap" in status
            assert "'billing-app'" in status
            assert "reporting-app" not in status
        finally:
            after.close()
    finally:
        before.close()
    status = one_line(run_ok(legacy_db, "status").output)
    assert "client sessions: every one connected after the swap of run" in status
    assert "billing-app" not in status


def log_row(dsn: str, operation: str) -> tuple[str, str, bool]:
    """The last row of ``operation`` in migration_log: status, message, ready to swap."""
    [(status, message, ready)] = execute(
        dsn, "SELECT status, message, coalesce((details->>'ready_to_swap')::boolean, false) "
             "FROM migration_log WHERE operation = %s ORDER BY id DESC LIMIT 1", (operation,))
    return str(status), str(message), bool(ready)


def out_of_step(dsn: str, copy: str) -> int:
    """Rows whose engine copy differs from the key column (as uuids)."""
    return sum(int(str(count)) for table, column in PLAN for (count,) in execute(
        dsn, sql.SQL("SELECT count(*) FROM {} WHERE ({})::uuid IS DISTINCT FROM ({})::uuid")
        .format(sql.Identifier(table), sql.Identifier(f"{column}_{copy}"),
                sql.Identifier(column))))


def application_writes(dsn: str, n: int) -> str:
    """Writes of every kind on the plan's tables; the new user's id."""
    [(user,)] = execute(dsn, "INSERT INTO users (email) VALUES (%s) RETURNING id",
                        (f"late-{n}@example.com",))
    execute(dsn, "INSERT INTO journal_entries (user_id, title) VALUES (%s, 'late')", (user,))
    execute(dsn, "UPDATE tags SET user_id = %s WHERE id = (SELECT min(id) FROM tags)", (user,))
    execute(dsn, "UPDATE reminders SET user_id = NULL WHERE id = (SELECT min(id) FROM reminders "
                 "WHERE user_id IS NOT NULL)")
    execute(dsn, "DELETE FROM journal_entries WHERE id = (SELECT min(id) FROM journal_entries "
                 "WHERE title <> 'late')")
    return str(user)


def holds_writes(dsn: str, user: str) -> None:
    assert execute(dsn, "SELECT count(*) FROM journal_entries WHERE user_id = %s "
                        "AND title = 'late'", (user,)) == [(1,)]
    assert execute(dsn, "SELECT count(*) FROM tags WHERE user_id = %s", (user,)) == [(1,)]


def change_log_triggers(dsn: str) -> int:
    """The change log's triggers (row and TRUNCATE) on the plan's tables."""
    [(count,)] = execute(dsn, "SELECT count(*) FROM pg_trigger "
                              "WHERE tgname ~ '^migration_change_log'")
    return int(count)


def test_postpone_swap_stops_ready_to_swap_and_the_next_run_swaps(legacy_db: str) -> None:
    seeded(legacy_db, users=30)
    output = one_line(run_ok(legacy_db, "full_migration", "--postpone-swap").output)
    assert output.startswith("ready to swap: 4 column(s) expanded and proven")
    assert "next: data-migration --operation=full_migration (without --postpone-swap) swaps" \
        in output
    assert key_types(legacy_db) == {"character varying"}
    assert log_row(legacy_db, "migrate_foreign_keys")[::2] == ("completed", True)
    assert log_row(legacy_db, "migrate_foreign_keys")[1].startswith("ready to swap")
    assert log_row(legacy_db, "full_migration")[::2] == ("completed", True)
    assert "stage: ready to swap" in one_line(run_ok(legacy_db, "status").output)
    user = application_writes(legacy_db, 1)
    assert out_of_step(legacy_db, "uuid") == 0
    output = one_line(run_ok(legacy_db, "full_migration").output)
    assert output.startswith("migration complete and validated")
    assert key_types(legacy_db) == {"uuid"}
    holds_writes(legacy_db, user)
    assert CliRunner().invoke(verify.main, ["--database-url", legacy_db]).exit_code == 0

    output = one_line(run_ok(legacy_db, "rollback", "--postpone-swap").output)
    assert output.startswith("ready to swap back")
    assert "next: data-migration --operation=rollback (without --postpone-swap) swaps" in output
    assert key_types(legacy_db) == {"uuid"}
    assert "stage: ready to swap back" in one_line(run_ok(legacy_db, "status").output)
    assert change_log_triggers(legacy_db) == 4 * 2  # still logging while the swap waits
    other = application_writes(legacy_db, 2)
    assert out_of_step(legacy_db, "text") == 0
    run_ok(legacy_db, "rollback")
    assert key_types(legacy_db) == {"character varying"}
    holds_writes(legacy_db, other)
