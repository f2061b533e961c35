"""Around the swap: the operator learns which client sessions connected before it (their
prepared statements may fail)."""

from __future__ import annotations

import psycopg2.errors
import pytest

from migration.connection import connect
from migration.rehearsal.seed import seed
from tests.operate import connected, execute, run_ok

PLAN = (("users", "id"), ("journal_entries", "user_id"), ("tags", "user_id"),
        ("reminders", "user_id"))


def key_types(dsn: str) -> set[str]:
    """The types the plan's key columns have now."""
    return {str(kind) for table, column in PLAN for (kind,) in execute(
        dsn, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public' "
             "AND (table_name, column_name) = (%s, %s)", (table, column))}


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_the_sessions_connected_before_the_swap_are_named_until_they_are_recycled(
        legacy_db: str) -> None:
    with connected(legacy_db, autocommit=False) as conn:
        seed(conn, 20)
    before = connect(legacy_db, application_name="billing-app", autocommit=True)
    try:
        with before.cursor() as cur:
            cur.execute("PREPARE newest AS SELECT * FROM users ORDER BY email LIMIT 1")
            cur.execute("EXECUTE newest")
        output = one_line(run_ok(legacy_db, "full_migration").output)
        assert ("1 client session(s) connected before the swap: statements they prepared "
                "over the converted tables may fail") in output
        assert "application 'billing-app', user app_owner, from 127.0.0.1: 1 session(s)" \
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
