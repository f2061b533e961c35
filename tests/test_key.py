"""``--key``: any string-UUID parent key, on schemas that are not the runbook's.

Two shapes: (a) ``app.accounts(uuid text)`` referenced from another table
of its schema and from a nullable column of another schema (ON DELETE SET
NULL); (b) a Keycloak-like ``user_entity(id varchar(36))`` referenced from a
join table whose composite primary key includes the reference.  Each is
migrated, verified and rolled back to its exact fingerprint; both are then
migrated in one database one after the other, each with its own log rows and
backup schema.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
from psycopg2 import sql

from migration import cli, verify
from migration.model import KeyColumn, Table, backup_schema
from migration.plan import parse_key
from migration.rehearsal.fingerprint import Fingerprint, fingerprint
from migration.rehearsal.sandbox import Sandbox
from migration.session import Session, Settings
from tests.operate import connected, execute, operate, print_of, run_ok
from tests.shapes import ACCOUNTS, KEYCLOAK

_numbers = itertools.count()

ACCOUNTS_KEY = "app.accounts.uuid"
ACCOUNTS_COLUMNS = (("app", "accounts", "uuid"), ("app", "sessions", "account_uuid"),
                    ("audit", "events", "account"))

KEYCLOAK_KEY = "user_entity.id"
KEYCLOAK_COLUMNS = (("public", "user_entity", "id"), ("public", "user_role_mapping", "user_id"))

SHAPES = {"accounts": (ACCOUNTS, ACCOUNTS_KEY, ACCOUNTS_COLUMNS),
          "keycloak": (KEYCLOAK, KEYCLOAK_KEY, KEYCLOAK_COLUMNS)}


@pytest.fixture
def database(sandbox: Sandbox) -> Iterator[str]:
    with sandbox.database(f"key_{next(_numbers)}", variant=None) as dsn:
        yield dsn


def tables_print(dsn: str) -> Fingerprint:
    """The application's tables (the tool's log and backups left out)."""
    with connected(dsn, autocommit=False) as conn:
        return fingerprint(conn)


def types_of(dsn: str, columns: tuple[tuple[str, str, str], ...]) -> set[str]:
    return {str(execute(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                             "WHERE attrelid = to_regclass(format('%%I.%%I', %s, %s)) "
                             "AND attname = %s", column)[0][0]) for column in columns}


def values_of(dsn: str, columns: tuple[tuple[str, str, str], ...]) -> dict[str, list[str]]:
    """Each column's values as uuids (from text or uuid alike), sorted; NULL as "none"."""
    return {".".join(c): sorted(str(v) for (v,) in execute(dsn, sql.SQL(
        "SELECT coalesce(({})::text::uuid::text, 'none') FROM {}").format(
        sql.Identifier(c[2]), sql.Identifier(c[0], c[1])))) for c in columns}


def verify_run(dsn: str, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner
    result = CliRunner().invoke(verify.main, ["--database-url", dsn, *args])
    return result.exit_code, result.output


# -- parse_key ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("app.accounts.uuid", ("app", "accounts", "uuid")),
    ("accounts.uuid", ("public", "accounts", "uuid")),
    ("App.Accounts.UUID", ("app", "accounts", "uuid")),
    ('app."User Accounts".uuid', ("app", "User Accounts", "uuid")),
    ('"my.schema"."a""b".Id', ("my.schema", 'a"b', "id")),
])
def test_parse_key_reads_names_as_postgresql_does(text: str,
                                                  expected: tuple[str, str, str]) -> None:
    key = parse_key(text)
    assert (key.table.schema, key.table.name, key.column) == expected
    assert parse_key(key.spec) == key  # the spelling the log records reads back the same


@pytest.mark.parametrize("text", ["uuid", "a.b.c.d", 'app."open.uuid', "app..uuid",
                                  'app."x"y.uuid'])
def test_a_malformed_key_is_a_usage_error(text: str) -> None:
    with pytest.raises(ValueError, match="--key"):
        parse_key(text)
    result = operate("postgresql://nobody@localhost:1/none", "status", "--key", text)
    assert result.exit_code == 2, result.output


def test_the_command_that_resumes_repeats_the_key_it_was_given() -> None:
    """A failed or interrupted step prints the command that goes on; the steps before the
    backup read no recorded key, so a key other than the runbook's is repeated, shell-quoted,
    and so are a schema other than public and the options that accept what would be refused."""
    assert cli._rerun("migrate_users", None, "public") == "--operation=migrate_users"
    assert cli._rerun("migrate_users", parse_key("public.users.id"), "public") == \
        "--operation=migrate_users"
    assert cli._rerun("backup_data", parse_key('app."My Accounts".uuid'), "public") == \
        """--operation=backup_data --key 'app."My Accounts".uuid'"""
    assert cli._rerun("full_migration", None, "My App",
                      ["--allow-triggers", "--refresh-materialized-views"]) == \
        "--operation=full_migration --schema='My App' --allow-triggers " \
        "--refresh-materialized-views"


def test_each_key_has_its_own_backup_schema_within_63_bytes() -> None:
    assert backup_schema(KeyColumn(Table("public", "users"), "id")) == "migration_backup"
    assert backup_schema(KeyColumn(Table("app", "accounts"), "uuid")) == \
        "migration_backup_app_accounts_uuid"
    long = backup_schema(KeyColumn(Table("s" * 60, "t" * 60), "c"))
    assert len(long.encode()) <= 63
    assert long != backup_schema(
        KeyColumn(Table("s" * 60, "t" * 61), "c"))


# -- one key ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_another_key_is_migrated_verified_and_rolled_back_exactly(database: str,
                                                                  shape: str) -> None:
    schema, key, columns = SHAPES[shape]
    execute(database, schema)
    before, values = tables_print(database), values_of(database, columns)

    migrated = run_ok(database, "full_migration", "--key", key)
    assert "migration complete" in migrated.output
    assert types_of(database, columns) == {"uuid"}
    assert values_of(database, columns) == values
    spec = parse_key(key).spec
    assert execute(database, "SELECT DISTINCT key_column FROM "
                             f"{parse_key(key).table.schema}.migration_log") == [(spec,)]

    code, output = verify_run(database)  # the key the backup records
    assert code == 0, output
    with Session.open(database, Settings(show_progress=False), lock=False) as session:
        assert session.plan.parent == parse_key(key)  # the API finds it as well
    status = run_ok(database, "status")
    assert f"key: {spec}" in status.output
    assert "stage: migrated" in status.output
    for column in columns:
        assert f"{'.'.join(column)}: uuid" in status.output

    run_ok(database, "rollback")
    assert tables_print(database) == before
    assert "stage: not migrated" in run_ok(database, "status").output


def test_a_quoted_key_is_migrated_and_found_again_from_its_backup(database: str) -> None:
    """Names with dots, capitals and quotes: the log and the backup record the key as --key
    spells it, and the operations without --key read it back."""
    execute(database, """
        CREATE SCHEMA "My App";
        CREATE TABLE "My App"."User.Accounts" ("UUID" text PRIMARY KEY);
        CREATE TABLE "My App"."a""b" (n int PRIMARY KEY,
            ref text REFERENCES "My App"."User.Accounts" ("UUID"));
        INSERT INTO "My App"."User.Accounts" SELECT gen_random_uuid() FROM generate_series(1, 20);
        INSERT INTO "My App"."a""b" SELECT row_number() OVER (), "UUID"
            FROM "My App"."User.Accounts";
        """)
    before = tables_print(database)
    key = '"My App"."User.Accounts"."UUID"'
    run_ok(database, "full_migration", "--key", key)
    assert types_of(database, (("My App", "User.Accounts", "UUID"), ("My App", 'a"b', "ref"))) \
        == {"uuid"}
    assert execute(database, 'SELECT DISTINCT key_column FROM "My App".migration_log') == [
        (key,)]
    code, output = verify_run(database)
    assert code == 0, output
    assert f"key: {key}" in run_ok(database, "status").output
    run_ok(database, "rollback")
    assert tables_print(database) == before


@pytest.mark.parametrize(("key", "why"), [
    ("app.nothing.uuid", "there is no table app.nothing"),
    ("app.accounts.nothing", "has no column 'nothing'"),
    ("audit.events.id", "is bigint, not a string type"),
    ("app.sessions.token", "has no primary key or unique constraint"),
])
def test_a_key_that_cannot_be_one_is_refused_and_nothing_changes(database: str, key: str,
                                                                  why: str) -> None:
    execute(database, ACCOUNTS)
    before = print_of(database, include_log=True, include_backup=True)
    for operation in ("validate_schema", "full_migration", "rollback"):
        result = operate(database, operation, "--key", key)
        assert result.exit_code == 1, result.output
        assert why in result.output
    assert print_of(database, include_log=True, include_backup=True) == before


# -- two keys in one database ----------------------------------------------------------


ROLE_KEY = "public.keycloak_role.id"


def test_two_keys_keep_their_own_log_and_backup(database: str) -> None:
    """Two keys of one schema, one after the other: one migration_log, a table in both
    plans (user_role_mapping refers to both), each key with its own rows and backup."""
    execute(database, KEYCLOAK)
    before = tables_print(database)
    run_ok(database, "full_migration", "--key", KEYCLOAK_KEY)
    only_one = run_ok(database, "status")  # one backup: its key, without --key
    assert "key: public.user_entity.id" in only_one.output
    run_ok(database, "full_migration", "--key", ROLE_KEY)
    assert types_of(database, (*KEYCLOAK_COLUMNS, ("public", "keycloak_role", "id"),
                               ("public", "user_role_mapping", "role_id"))) == {"uuid"}

    schemas = execute(database, "SELECT nspname FROM pg_namespace WHERE nspname LIKE "
                                "'migration\\_backup%%' ORDER BY 1")
    assert schemas == [("migration_backup_public_keycloak_role_id",),
                       ("migration_backup_public_user_entity_id",)]
    assert execute(database, "SELECT key FROM migration_backup_public_keycloak_role_id."
                             "backup_key UNION ALL SELECT key FROM "
                             "migration_backup_public_user_entity_id.backup_key") == [
        (ROLE_KEY,), ("public.user_entity.id",)]
    # the shared table logs its writes for each backup, by a trigger of each key's
    assert execute(database, "SELECT tgname FROM pg_trigger WHERE tgrelid = "
                             "'public.user_role_mapping'::regclass AND tgname LIKE "
                             "'migration\\_change\\_log%%' ORDER BY 1") == [
        ("migration_change_log_public_keycloak_role_id",),
        ("migration_change_log_public_user_entity_id",),
        ("migration_change_log_truncate_public_keycloak_role_id",),
        ("migration_change_log_truncate_public_user_entity_id",)]
    logged = execute(database, "SELECT key_column, count(*) FROM public.migration_log "
                               "GROUP BY 1 ORDER BY 1")
    assert logged == [(ROLE_KEY, 6), ("public.user_entity.id", 6)]  # full_migration + 5 steps

    # several recorded keys: without --key, a usage error naming the choices
    for operation in ("status", "rollback", "validate_migration", "cleanup_backup"):
        result = operate(database, operation)
        assert result.exit_code == 2, result.output
        assert f"--key {ROLE_KEY}" in result.output
        assert "--key public.user_entity.id" in result.output
    code, output = verify_run(database)
    assert code == 2, output
    assert "--key public.user_entity.id" in output
    with Session.open(database, Settings(show_progress=False), lock=False) as session:
        assert session.plan.key == "public.users.id"  # the API's default: the runbook's

    # each key's status, checks and cleanup read its own log rows only
    status = run_ok(database, "status", "--key", KEYCLOAK_KEY).output
    assert "public.user_entity.id: uuid" in status
    assert "keycloak_role" not in status
    code, output = verify_run(database, "--key", ROLE_KEY, "--format", "json")
    assert code == 0, output
    assert json.loads(output)["passed"]
    # the first key's checks read its own backup_data record, not the last one logged
    code, output = verify_run(database, "--key", KEYCLOAK_KEY, "--strict")
    assert code == 0, output
    run_ok(database, "validate_migration", "--key", KEYCLOAK_KEY)

    # the last key first: its backup was taken with the first key migrated
    run_ok(database, "rollback", "--key", ROLE_KEY)
    assert types_of(database, (("public", "user_role_mapping", "role_id"),)) == {
        "character varying(255)"}
    assert types_of(database, KEYCLOAK_COLUMNS) == {"uuid"}
    run_ok(database, "cleanup_backup", "--key", ROLE_KEY, "--force")
    # one backup left: the operations without --key find its key again
    run_ok(database, "rollback")
    assert tables_print(database) == before


def test_cli_key_option_lands_in_options() -> None:
    names = {param.name for param in cli.main.params}
    assert {"key", "discover"} <= names


def test_a_failure_names_the_key_to_resume_with(database: str) -> None:
    execute(database, ACCOUNTS)
    result = operate(database, "migrate_users", "--key", ACCOUNTS_KEY)
    assert result.exit_code == 1, result.output
    assert "needs the backup in migration_backup_app_accounts_uuid" in result.output
    assert "state: not migrated (key app.accounts.uuid: the commands that resume or roll " \
           "back need --key app.accounts.uuid)" in result.output
    result = operate(database, "validate_schema", "--discover", "--key", ACCOUNTS_KEY)
    assert result.exit_code == 2, result.output


def test_an_older_backup_and_log_belong_to_the_runbooks_key(legacy_db: str) -> None:
    """A migration_backup and a migration_log written before keys were recorded are the
    runbook key's: the log gains its key column, filled with that key, at the next run."""
    run_ok(legacy_db, "backup_data")
    execute(legacy_db, "DROP TABLE migration_backup.backup_key; "
                       "ALTER TABLE public.migration_log DROP COLUMN key_column")
    assert "backup_data" in run_ok(legacy_db, "status").output  # read without the column
    execute(legacy_db, ACCOUNTS)
    run_ok(legacy_db, "backup_data", "--key", ACCOUNTS_KEY)
    result = operate(legacy_db, "status")
    assert result.exit_code == 2, result.output
    assert "--key public.users.id" in result.output
    assert "--key app.accounts.uuid" in result.output
    run_ok(legacy_db, "validate_schema")
    assert execute(legacy_db, "SELECT key_column, count(*) FROM public.migration_log "
                              "GROUP BY 1") == [("public.users.id", 2)]
