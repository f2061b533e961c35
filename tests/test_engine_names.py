"""The names the engine creates are its own.

Its temporary column, sync trigger and fill proofs fit PostgreSQL's 63 bytes
whatever the key column's name (a longer name would be truncated by the
server, and the engine's lookups by the full name would find nothing).  An
application object that happens to bear one of those names is left alone:
the engine takes the next names for that key (refused by name, before
anything changes, only when every choice is taken), and no rollback ever
drops it.
"""

from __future__ import annotations

import re

import psycopg2
import pytest
from psycopg2 import sql

from migration import plan
from migration.model import SHADOW_NAME, KeyColumn, Table, fit_name, shadow_name
from migration.rehearsal.sandbox import Sandbox
from tests.operate import connected, execute, operate, print_of, run_in_process, run_ok, seeded

TAGS = Table("public", "tags")
USERS = Table("public", "users")
LONG = "u" * 52 + "_user_id"  # 60 bytes: "_uuid" after it is 65
MULTIBYTE = "é" * 25 + "_user"  # 55 bytes, 30 characters: its helpers are cut mid-é


def names_of(key: KeyColumn) -> list[str]:
    return [key.temp, key.reversed().temp,
            *(key.helper(kind) for kind in ("sync", "filled", "not_null"))]


def test_short_names_are_the_runbook_s() -> None:
    assert KeyColumn(USERS, "id").temp == "id_uuid"
    assert KeyColumn(USERS, "id", back=True).temp == "id_text"
    assert KeyColumn(TAGS, "user_id").temp == "user_id_uuid"
    assert KeyColumn(TAGS, "user_id").helper("sync") == "migration_sync_user_id"
    assert KeyColumn(TAGS, "user_id").helper("not_null") == "migration_not_null_user_id"


def test_the_next_names_end_in_their_number_and_name_the_same_key() -> None:
    second = KeyColumn(TAGS, "user_id", choice=1)
    assert names_of(second) == ["user_id_uuid_1", "user_id_text_1", "migration_sync_user_id_1",
                                "migration_filled_user_id_1", "migration_not_null_user_id_1"]
    assert second == KeyColumn(TAGS, "user_id")
    assert second.reversed().choice == 1
    long = KeyColumn(TAGS, LONG, choice=9)
    assert all(len(name.encode()) <= 63 and name.endswith("_9") for name in names_of(long))
    assert set(names_of(long)).isdisjoint(names_of(KeyColumn(TAGS, LONG)))


@pytest.mark.parametrize("column", [LONG, MULTIBYTE, "é" * 31 + "x", "x" * 63])
def test_every_name_fits_63_bytes(column: str) -> None:
    key = KeyColumn(TAGS, column)
    for name in names_of(key):
        assert len(name.encode()) <= 63, name
    assert key.temp.endswith("_uuid")
    assert key.reversed().temp.endswith("_text")
    assert len(set(names_of(key))) == 5
    assert column not in names_of(key)


def test_the_cut_is_on_a_character_boundary() -> None:
    """Every length of a multibyte name: within 63 bytes, and all different."""
    names = [name for n in range(20, 32) for name in names_of(KeyColumn(TAGS, "é" * n))]
    assert all(len(name.encode()) <= 63 for name in names)
    assert len(set(names)) == len(names)


def test_long_names_sharing_their_first_bytes_differ() -> None:
    first, second = KeyColumn(TAGS, "p" * 59 + "_a"), KeyColumn(TAGS, "p" * 59 + "_b")
    for mine, theirs in zip(names_of(first), names_of(second), strict=True):
        assert mine != theirs
    assert fit_name("q" * 70) != fit_name("q" * 71)
    assert fit_name("q" * 70) == fit_name("q" * 70)  # a resumed run finds its objects again


def test_shadow_names_keep_their_form() -> None:
    for name in (shadow_name("ix", USERS, "users_pkey"),
                 shadow_name("fk", Table("public", "t" * 63), "k" * 63)):
        assert re.fullmatch(SHADOW_NAME.strip("^$"), name), name


def comment_of(dsn: str, table: str, column: str) -> object:
    rows = execute(dsn, "SELECT col_description(to_regclass(%s), attnum) FROM pg_attribute "
                        "WHERE attrelid = to_regclass(%s) AND attname = %s",
                   (table, table, column))
    assert rows, f"no column {table}.{column}"
    return rows[0][0]


APPLICATION_OBJECTS = {
    "column": ["ALTER TABLE tags ADD COLUMN user_id_uuid text",
               "UPDATE tags SET user_id_uuid = 'the application''s ' || name"],
    "trigger": ["CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                "$$BEGIN RETURN NEW; END$$",
                "CREATE TRIGGER migration_sync_user_id BEFORE INSERT ON tags "
                "FOR EACH ROW EXECUTE FUNCTION touch()"],
    "constraint": ["ALTER TABLE tags ADD CONSTRAINT migration_filled_user_id "
                   "CHECK (length(name) > 0)"],
}
TAKEN = {"column": "column user_id_uuid", "trigger": "trigger migration_sync_user_id",
         "constraint": "constraint migration_filled_user_id"}


KEPT = {"column": "SELECT user_id_uuid FROM tags ORDER BY id",
        "trigger": "SELECT tgname FROM pg_trigger WHERE tgname = 'migration_sync_user_id'",
        "constraint": "SELECT conname FROM pg_constraint "
                      "WHERE conname = 'migration_filled_user_id'"}


@pytest.mark.parametrize("kind", sorted(APPLICATION_OBJECTS))
def test_an_application_object_with_an_engine_name_is_left_alone(
        sandbox: Sandbox, legacy_db: str, kind: str) -> None:
    """The engine takes the next names (``user_id_uuid_1``, ...) for that key, finds them
    again when it resumes, and never writes into, drops or renames the application's."""
    seeded(legacy_db, users=12)
    for statement in APPLICATION_OBJECTS[kind]:
        execute(legacy_db, statement)
    before, kept = print_of(legacy_db), execute(legacy_db, KEPT[kind])
    assert kept
    with connected(legacy_db) as conn:
        admin = sandbox.admin_dsn_for(conn.info.dbname)
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(legacy_db, "full_migration", admin_dsn=admin,
                       crash_at="batch public.tags.user_id#1")
    assert comment_of(legacy_db, "tags", "user_id_uuid_1") == "uuid-migration: copy of user_id"
    assert comment_of(legacy_db, "users", "id_uuid") == "uuid-migration: copy of id"
    assert execute(legacy_db, "SELECT column_name, copy_column, sync_trigger, fill_proof "
                              "FROM migration_backup.engine_names WHERE NOT back "
                              "AND table_name IN ('users', 'tags') ORDER BY 1") \
        == [("id", "id_uuid", "migration_sync_id", "migration_filled_id"),
            ("user_id", "user_id_uuid_1", "migration_sync_user_id_1",
             "migration_filled_user_id_1")]
    assert "names public.tags.user_id: copy user_id_uuid_1, trigger migration_sync_user_id_1" \
        in run_ok(legacy_db, "status").output
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, KEPT[kind]) == kept
    assert execute(legacy_db, "SELECT format_type(atttypid, NULL) FROM pg_attribute "
                              "WHERE attrelid = 'tags'::regclass AND attname = 'user_id'") \
        == [("uuid",)]
    run_ok(legacy_db, "rollback")
    assert execute(legacy_db, KEPT[kind]) == kept
    after = print_of(legacy_db)
    assert after == before, "\n".join(before.diff(after))


def test_when_every_name_is_taken_the_migration_is_refused(
        legacy_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one choice of names only, an application column of that name is refused by name
    before anything changes, and no rollback drops it."""
    monkeypatch.setattr(plan, "NAME_CHOICES", 1)
    seeded(legacy_db, users=12)
    for statement in APPLICATION_OBJECTS["column"]:
        execute(legacy_db, statement)
    before = print_of(legacy_db)
    refused = operate(legacy_db, "full_migration")
    assert refused.exit_code == 1, refused.output
    assert f"{TAKEN['column']} on public.tags" in refused.output
    assert "rename the application's" in refused.output
    assert print_of(legacy_db) == before
    run_ok(legacy_db, "backup_data")
    run_ok(legacy_db, "rollback")  # a discard: the column is not the migration's
    after = print_of(legacy_db)
    assert after == before, "\n".join(before.diff(after))


def test_an_application_column_added_after_the_swap_is_not_filled_over(legacy_db: str) -> None:
    """The rollback takes the next name for its string copy (the rollback after the swap
    runs no pre-flight); the application's column, of the first name, keeps its values."""
    seeded(legacy_db, users=12)
    run_ok(legacy_db, "full_migration")
    execute(legacy_db, "ALTER TABLE tags ADD COLUMN user_id_text text")
    execute(legacy_db, "UPDATE tags SET user_id_text = upper(user_id::text)")  # casts, too
    kept = execute(legacy_db, "SELECT id, user_id_text FROM tags ORDER BY id")
    run_ok(legacy_db, "validate_schema")
    run_ok(legacy_db, "rollback")
    assert execute(legacy_db, "SELECT id, user_id_text FROM tags ORDER BY id") == kept
    assert execute(legacy_db, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                              "WHERE attrelid = 'tags'::regclass AND attname = 'user_id'") \
        == [("character varying(36)",)]


@pytest.mark.parametrize("column", [LONG, MULTIBYTE])
def test_a_long_key_column_migrates_and_rolls_back(legacy_db: str, column: str) -> None:
    """A discovered child with a long FK column (and a twin sharing its first 59 bytes),
    migrated and rolled back; the engine's mark never stays on a converted column."""
    seeded(legacy_db, users=12)
    twin = column[:-1] + "_"  # the same name but its last character
    execute(legacy_db, sql.SQL(
        "CREATE TABLE notes (id varchar(36) PRIMARY KEY DEFAULT gen_random_uuid()::text, "
        "{c} varchar(36) NOT NULL REFERENCES users (id), "
        "{t} varchar(36) REFERENCES users (id))").format(
        c=sql.Identifier(column), t=sql.Identifier(twin)))
    execute(legacy_db, sql.SQL("INSERT INTO notes ({c}, {t}) SELECT id, id FROM users")
            .format(c=sql.Identifier(column), t=sql.Identifier(twin)))
    execute(legacy_db, "COMMENT ON COLUMN tags.user_id IS 'owner of the tag'")
    before = print_of(legacy_db)

    run_ok(legacy_db, "validate_schema")
    run_ok(legacy_db, "backup_data")
    run_ok(legacy_db, "migrate_users")
    assert comment_of(legacy_db, "users", "id_uuid") == "uuid-migration: copy of id"
    run_ok(legacy_db, "migrate_foreign_keys")
    run_ok(legacy_db, "validate_migration")
    types = execute(legacy_db, "SELECT attname, format_type(atttypid, atttypmod) "
                               "FROM pg_attribute WHERE attrelid = 'notes'::regclass "
                               "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")
    assert dict(types) == {"id": "character varying(36)", column: "uuid", twin: "uuid"}
    assert execute(legacy_db, sql.SQL("SELECT count(*) FROM notes n JOIN users u "
                                      "ON u.id = n.{c} AND u.id = n.{t}").format(
        c=sql.Identifier(column), t=sql.Identifier(twin))) == execute(
        legacy_db, "SELECT count(*) FROM users")
    comments = {(t, c): comment_of(legacy_db, t, c)
                for t, c in (("users", "id"), ("tags", "user_id"), ("notes", column))}
    assert comments == {("users", "id"): None, ("tags", "user_id"): "owner of the tag",
                        ("notes", column): None}

    run_ok(legacy_db, "rollback")
    after = print_of(legacy_db)
    assert after == before, "\n".join(before.diff(after))
    assert {(t, c): comment_of(legacy_db, t, c) for t, c in comments} == comments


def test_a_resumed_run_keeps_the_names_it_began_with(sandbox: Sandbox, legacy_db: str) -> None:
    """The application drops its column of the first name while the migration is cut short:
    the resumed run finds its copy by the mark, under the next name, and leaves no second
    copy behind."""
    seeded(legacy_db, users=12)
    for statement in APPLICATION_OBJECTS["column"]:
        execute(legacy_db, statement)
    with connected(legacy_db) as conn:
        admin = sandbox.admin_dsn_for(conn.info.dbname)
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(legacy_db, "full_migration", admin_dsn=admin,
                       crash_at="batch public.tags.user_id#1")
    execute(legacy_db, "ALTER TABLE tags DROP COLUMN user_id_uuid")
    assert "names public.tags.user_id: copy user_id_uuid_1" in run_ok(legacy_db,
                                                                       "status").output
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, "SELECT attname FROM pg_attribute WHERE attrelid = "
                              "'tags'::regclass AND attname LIKE 'user_id%%' "
                              "AND NOT attisdropped") == [("user_id",)]
