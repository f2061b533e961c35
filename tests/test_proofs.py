"""The fill's proofs (``fill.prove_filled``) cost one scan of the table, not one each.

The ``filled`` and ``not_null`` CHECKs are validated by one ``ALTER TABLE``, which
PostgreSQL checks in one pass; rows the batches missed still make it fail, and are
filled before it is run again (``test_no_primary_key``, ``test_rollback``).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from psycopg2 import sql

from migration.engine import expand, fill, swap
from migration.engine.expand import not_a_uuid
from migration.model import UUID_INPUT, KeyColumn, Table, uuid_copy
from migration.plan import build_plan
from migration.rehearsal.sandbox import Sandbox
from migration.session import Session, Settings
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


SPELLINGS = [
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",  # as uuid prints it: the shortcut's case
    "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
    "a0eebc999c0b4ef8bb6d6bb9bd380a11",
    "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",  # one digit short
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ",
    "not-a-uuid",
    "",
    None,
]


@pytest.mark.parametrize("column_type", ["text", "char(40)"])
def test_the_proof_and_the_invalid_index_read_every_spelling_as_the_regular_expression_does(
        legacy_db: str, column_type: str) -> None:
    """``spelled_as_copy`` lets the ``filled`` proof and the invalid index's predicate skip
    ``UUID_INPUT``'s regular expression for a key spelled as its copy prints: it must leave
    what each says of every spelling as it was, for a right copy, wrong ones and none; in
    a ``char(n)`` too, whose padding the cast reads and its text drops."""
    key = KeyColumn(Table("pg_temp", "spelled"), "user_id")
    copy, column = sql.Identifier(key.temp), sql.Identifier(key.column)
    full_proof = sql.SQL("{} IS NOT DISTINCT FROM {}").format(copy, uuid_copy(column))
    full_invalid = sql.SQL("{} !~ {}").format(column, sql.Literal(UUID_INPUT))
    with connected(legacy_db, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TEMP TABLE spelled ({} {}, {} uuid)").format(
            column, sql.SQL(column_type), copy))
        copies = [uuid_copy(column), sql.SQL("gen_random_uuid()"), sql.SQL("NULL::uuid"),
                  uuid_copy(sql.SQL("({})::text").format(column))]  # the padding dropped
        for value in SPELLINGS:
            for made in copies:
                cur.execute(sql.SQL("TRUNCATE spelled; INSERT INTO spelled ({}) VALUES (%s); "
                                    "UPDATE spelled SET {} = {}").format(column, copy, made),
                            (value,))
                cur.execute(sql.SQL("SELECT {}, {}, {}, {} FROM spelled").format(
                    key.same_value(copy, column), full_proof, not_a_uuid(key), full_invalid))
                proof, expected_proof, invalid, expected_invalid = cur.fetchone() or ()
                assert (proof, invalid) == (expected_proof, expected_invalid), (value, made)


def test_an_invalid_index_an_earlier_version_built_is_built_again(legacy_db: str) -> None:
    """The swap's query finds the rows that are no UUID through the invalid index only if
    it repeats the index's predicate: an index of the same name whose predicate does not
    read the copy (an earlier version's, left by a migration this one resumes) is built
    again with the current one, and the swap's query is then served by it."""
    seeded(legacy_db, users=20)
    run_ok(legacy_db, "backup_data")
    run_ok(legacy_db, "migrate_users")
    run_ok(legacy_db, "migrate_foreign_keys", "--postpone-swap")
    key = KeyColumn(Table("public", "users"), "id")
    execute(legacy_db, sql.SQL("DROP INDEX {}; CREATE INDEX {} ON users (id) WHERE id !~ {}")
            .format(sql.Identifier(key.invalid_index), sql.Identifier(key.invalid_index),
                    sql.Literal(UUID_INPUT)))
    with Session.open(legacy_db, Settings(show_progress=False)) as session:
        expand.build_invalid_index(session, key)
    [(definition,)] = execute(legacy_db, "SELECT pg_get_indexdef(to_regclass(%s))",
                              (key.invalid_index,))
    assert key.temp in str(definition), definition
    with connected(legacy_db, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # as the swap asks, under its locks
        cur.execute(sql.SQL("EXPLAIN ") + swap.locked_check(cur, build_plan(conn)).select)
        plan = "\n".join(str(line) for (line,) in cur.fetchall())
    assert key.invalid_index in plan, plan
    assert "Seq Scan" not in plan, plan
