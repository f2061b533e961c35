"""The fill's proofs (``fill.prove_filled``) cost one scan of the table, not one each.

The ``filled`` and ``not_null`` CHECKs are validated by one ``ALTER TABLE``, which
PostgreSQL checks in one pass; rows the batches missed still make it fail, and are
filled before it is run again (``test_no_primary_key``, ``test_rollback``).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from migration.engine import fill
from migration.model import Table
from migration.rehearsal.sandbox import Sandbox
from tests.operate import connected, execute, run_in_process, run_ok, seeded


def admin_dsn(sandbox: Sandbox, dsn: str) -> str:
    return sandbox.admin_dsn_for(urlsplit(dsn).path.lstrip("/"))


def sequential_scans(admin: str, table: str) -> int:
    """The table's sequential scans, as the backends that have exited reported them."""
    for _ in range(200):  # a backend reports its counts as it exits
        if not execute(admin, "SELECT 1 FROM pg_stat_activity WHERE datname = "
                              "current_database() AND pid <> pg_backend_pid() "
                              "AND backend_type = 'client backend'"):
            break
        time.sleep(0.05)
    [(scans,)] = execute(admin, "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = %s",
                         (table,))
    return int(str(scans))


def test_two_checks_are_validated_in_one_scan(legacy_db: str, sandbox: Sandbox) -> None:
    seeded(legacy_db, users=60)
    admin = admin_dsn(sandbox, legacy_db)
    execute(legacy_db, "ALTER TABLE users ADD COLUMN id_copy uuid; "
                       "UPDATE users SET id_copy = id::uuid; "
                       "ALTER TABLE users ADD CONSTRAINT same CHECK (id_copy = id::uuid) "
                       "NOT VALID, ADD CONSTRAINT present CHECK (id_copy IS NOT NULL) NOT VALID")
    before = sequential_scans(admin, "users")
    with connected(legacy_db, autocommit=False) as conn, conn.cursor() as cur:
        fill.validate_constraints(cur, Table("public", "users"), ["same", "present"])
        conn.commit()
    assert sequential_scans(admin, "users") == before + 1
    assert execute(legacy_db, "SELECT conname, convalidated FROM pg_constraint WHERE conname "
                              "IN ('same', 'present') ORDER BY 1") == [("present", True),
                                                                       ("same", True)]


def test_the_fill_proofs_of_a_not_null_column_are_validated_together(legacy_db: str) -> None:
    seeded(legacy_db, users=60)
    run_ok(legacy_db, "backup_data")
    reached: list[str] = []
    outcome = run_in_process(legacy_db, "migrate_users", reached=reached)
    assert outcome is not None
    validations = [point for point in reached if point.startswith("validate migration_")]
    assert validations == ["validate migration_filled_id#1"], reached
    assert execute(legacy_db, "SELECT conname, convalidated FROM pg_constraint WHERE conname "
                              "IN ('migration_filled_id', 'migration_not_null_id') ORDER BY 1") == [
        ("migration_filled_id", True), ("migration_not_null_id", True)]
