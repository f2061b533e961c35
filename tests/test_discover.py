"""``validate_schema --discover``: the string columns holding only UUIDs, and their keys."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest

from migration.rehearsal.sandbox import Sandbox
from tests.operate import execute, operate, print_of, run_ok
from tests.shapes import ACCOUNTS, KEYCLOAK

_numbers = itertools.count()

# Beside the two shapes of test_key: a column whose first 150 values are UUIDs and
# whose last is not (the sample passes, the full scan must not), an empty column,
# and a uuid column with neither a key nor a reference.
OTHERS = """
CREATE SCHEMA misc;
CREATE TABLE misc.codes (n int PRIMARY KEY, code text, nothing varchar(36), copy text);
INSERT INTO misc.codes SELECT i, gen_random_uuid()::text, NULL, gen_random_uuid()::text
    FROM generate_series(1, 150) i;
INSERT INTO misc.codes VALUES (151, 'not-a-uuid', NULL, gen_random_uuid()::text);
"""


@pytest.fixture(scope="module")
def database(sandbox: Sandbox) -> Iterator[str]:
    with sandbox.database(f"discover_{next(_numbers)}", variant=None) as dsn:
        execute(dsn, ACCOUNTS + KEYCLOAK + OTHERS)
        yield dsn


def discovered(dsn: str) -> dict[str, object]:
    result = run_ok(dsn, "validate_schema", "--discover", "--format=json")
    found: dict[str, object] = json.loads(result.output)
    return found


def test_discover_lists_uuid_columns_with_counts_keys_and_references(database: str) -> None:
    before = print_of(database, include_log=True, include_backup=True)
    found = discovered(database)
    columns = {c["column"]: c for c in found["columns"]}  # type: ignore[attr-defined]
    assert sorted(columns) == [
        "app.accounts.uuid", "app.sessions.account_uuid", "audit.events.account",
        "misc.codes.copy", "public.keycloak_role.id", "public.user_entity.id",
        "public.user_role_mapping.role_id", "public.user_role_mapping.user_id"]
    accounts = columns["app.accounts.uuid"]
    assert accounts["rows"] == accounts["values"] == 120
    assert accounts["constraint"] == "primary key"
    assert accounts["key_option"] == "--key app.accounts.uuid"
    assert sorted(accounts["referenced_by"]) == ["app.sessions.account_uuid",
                                                 "audit.events.account"]
    events = columns["audit.events.account"]
    assert (events["rows"], events["values"]) == (360, 240)  # every third is NULL
    assert events["references"] == ["app.accounts.uuid"]
    assert events["key_option"] is None
    assert columns["misc.codes.copy"]["constraint"] is None
    assert columns["misc.codes.copy"]["key_option"] is None
    assert columns["public.user_entity.id"]["type"] == "character varying(36)"
    assert {(r["column"], r["refers_to"]) for r in found["foreign_keys"]} == {  # type: ignore[attr-defined]
        ("app.sessions.account_uuid", "app.accounts.uuid"),
        ("audit.events.account", "app.accounts.uuid"),
        ("public.user_role_mapping.role_id", "public.keycloak_role.id"),
        ("public.user_role_mapping.user_id", "public.user_entity.id")}
    # read-only: not even migration_log is created
    assert print_of(database, include_log=True, include_backup=True) == before


def test_discover_as_text_names_the_keys_to_pass(database: str) -> None:
    text = run_ok(database, "validate_schema", "--discover").output
    assert "8 string column(s) holding only UUIDs" in text
    assert "--key public.user_entity.id" in text
    assert "public.user_role_mapping.user_id -> public.user_entity.id" in text
    assert "misc.codes.code" not in text


def test_discover_leaves_out_backups_of_a_migration(database: str) -> None:
    """A backup schema's copies hold the original strings: they are no candidates."""
    run_ok(database, "backup_data", "--key", "user_entity.id")
    try:
        names = {c["column"] for c in discovered(database)["columns"]}  # type: ignore[attr-defined]
        assert not any(name.startswith("migration_backup") for name in names)
        assert len(names) == 8
    finally:
        run_ok(database, "cleanup_backup", "--key", "user_entity.id", "--force")


@pytest.mark.parametrize("operation", ["status", "full_migration", "validate_migration"])
def test_discover_belongs_to_validate_schema(database: str, operation: str) -> None:
    result = operate(database, operation, "--discover")
    assert result.exit_code == 2, result.output
    assert "--discover belongs to --operation=validate_schema" in result.output
