"""Smoke writes: each table of the plan takes an INSERT, an UPDATE and a DELETE, and no trace.

One database, filled by the generator and migrated once for the module; each
test that adds a trigger drops it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg2 import sql

from migration.plan import Plan, build_plan
from migration.rehearsal.generate import populate
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.smoke import (
    BINDINGS,
    OPERATIONS,
    SmokeResult,
    binding_failures,
    migration_failures,
    smoke_writes,
)
from tests.operate import connected, execute, print_of, run_ok

TABLES = ["public.users", "public.journal_entries", "public.tags", "public.reminders"]


def smoke(dsn: str) -> tuple[Plan, list[SmokeResult]]:
    with connected(dsn) as conn:
        plan = build_plan(conn)
        return plan, smoke_writes(conn, plan)


def every_write(results: list[SmokeResult]) -> set[tuple[str, str, str]]:
    return {(r.table, r.operation, r.binding) for r in results}


ALL_WRITES = {(t, op, b) for t in TABLES for op in OPERATIONS for b in BINDINGS}


@pytest.fixture(scope="module")
def migrated(sandbox: Sandbox) -> Iterator[str]:
    """A generated runbook dataset, migrated; the owner's DSN."""
    with sandbox.database(f"{sandbox.prefix}_smoke", variant="legacy") as dsn:
        with connected(dsn) as conn:
            populate(conn, build_plan(conn), rows=20, dirty=False)
        before = smoke(dsn)[1]
        assert every_write(before) == ALL_WRITES
        assert [r for r in before if not r.ok] == [], "string keys take both bindings"
        run_ok(dsn, "full_migration")
        yield dsn


def test_every_write_passes_untyped_and_the_varchar_binding_is_reported(migrated: str) -> None:
    before = print_of(migrated, include_backup=True)
    _, results = smoke(migrated)
    assert every_write(results) == ALL_WRITES
    assert migration_failures(results) == []
    assert all(r.ok for r in results if r.binding == "unknown")
    varchar = [r for r in results if r.binding == "varchar"]
    assert binding_failures(results) == varchar  # every varchar write, and nothing else
    assert {r.sqlstate for r in varchar} == {"42883", "42804"}
    assert any("uuid = character varying" in (r.error or "") for r in varchar)
    after = print_of(migrated, include_backup=True)
    assert after == before, "\n".join(before.diff(after))


@pytest.mark.parametrize(("event", "body", "broken", "message"), [
    ("INSERT", "NEW.user_id := lower(NEW.user_id);", {"insert"}, "lower(uuid)"),
    ("INSERT OR UPDATE", "IF substr(NEW.user_id, 1, 8) = '00000000' THEN RETURN NULL; END IF;",
     {"insert", "update"}, "substr(uuid"),
])
def test_a_trigger_that_uses_the_id_as_text_fails_its_write(
        migrated: str, event: str, body: str, broken: set[str], message: str) -> None:
    """A trigger body is compiled at its first call: only a write finds it broken."""
    function = sql.Identifier("public", "tags_normalise")
    execute(migrated, sql.SQL(
        "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN " + body +
        " RETURN NEW; END$$; CREATE TRIGGER tags_normalise BEFORE {e} ON public.tags "
        "FOR EACH ROW EXECUTE FUNCTION {f}()").format(f=function, e=sql.SQL(event)))
    try:
        before = print_of(migrated, include_backup=True)
        _, results = smoke(migrated)
        failed = migration_failures(results)
        assert {(r.table, r.operation, r.binding) for r in failed if r.error
                and message in r.error} == {("public.tags", op, "unknown") for op in broken}
        assert all("tags_normalise" in (r.error or "") for r in failed
                   if r.error and message in r.error), failed
        assert all(r.ok for r in results if r.binding == "unknown" and r.table != "public.tags")
        # A write that fails untyped too is not the application's binding to change.
        assert not any(r.table == "public.tags" and r.operation in broken
                       for r in binding_failures(results))
        assert print_of(migrated, include_backup=True) == before
    finally:
        execute(migrated, sql.SQL("DROP FUNCTION {} CASCADE").format(function))


def test_it_needs_no_open_transaction(migrated: str) -> None:
    with connected(migrated, autocommit=False) as conn:
        plan = build_plan(conn)
        with pytest.raises(RuntimeError, match="its own transaction"):
            smoke_writes(conn, plan)


def test_only_a_type_mismatch_of_a_write_that_passes_untyped_is_the_binding() -> None:
    def write(binding: str, sqlstate: str | None, table: str = "public.t") -> SmokeResult:
        return SmokeResult(table, "insert", binding, ok=sqlstate is None,  # type: ignore[arg-type]
                           error=sqlstate and "refused", sqlstate=sqlstate)

    untyped_ok, mismatch = write("unknown", None), write("varchar", "42883")
    other = write("varchar", "23505", "public.u")
    results = [untyped_ok, mismatch, write("unknown", None, "public.u"), other,
               write("unknown", "42883", "public.v"), write("varchar", "42804", "public.v")]
    assert binding_failures(results) == [mismatch]
    assert migration_failures(results) == [other, *results[4:]]
