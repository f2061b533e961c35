"""The statements the engine builds, read as text without a server.

Tables of cases, as alembic's ``tests/test_op.py`` and pgroll's
``TestDuplicateStmtBuilder*`` test emitted SQL: the rewrites of the server's deparsed
text, the names of the engine's objects, and the ``psycopg2.sql`` builders rendered by
``tests.sqltext.text_of``.  No test here asks for a database fixture, so a run of this
module starts no server (``tests/test_suite_shape.py`` holds it to that); the server
tests stay the judges of what the statements do.
"""

from __future__ import annotations

import pytest
from psycopg2 import sql

from migration import catalog
from migration.backup import ChangeLog, backup_name, meta, quarantine_name
from migration.catalog import ColumnGrant
from migration.engine.fill import Walk, batch_statement, grant_statement
from migration.errors import MigrationError
from migration.model import KeyColumn, Table, backup_schema, fit_name, quote_ident
from migration.sqlexpr import (
    as_cast_reads,
    column_list,
    concurrent_copy,
    foreign_references,
    partitioned_copy,
    rename_column,
    replace_relations,
    row_of,
    substitute_column,
    with_tablespace,
)
from tests.sqltext import text_of, words_of

TAGS = Table("public", "tags")
USER_ID = KeyColumn(TAGS, "user_id")
ODD = Table("App Data", 'we"ird')

PLAIN = "CREATE INDEX CONCURRENTLY c ON public.t USING btree (user_id) INCLUDE (x)"
PARTIAL = ("CREATE INDEX CONCURRENTLY c ON public.t USING btree (\"where\", lower('WHERE'))"
           " WITH (fillfactor='90') WHERE ((note)::text <> 'WHERE'::text)")


@pytest.mark.parametrize(("statement", "tablespace", "expected"), [
    (PLAIN, None, PLAIN),
    (PLAIN, "fast", PLAIN + ' TABLESPACE "fast"'),
    (PARTIAL, "Fast Disks", PARTIAL.replace(
        " WHERE ((", ' TABLESPACE "Fast Disks" WHERE ((')),
])
def test_the_tablespace_goes_before_a_partial_index_s_where(
        statement: str, tablespace: str | None, expected: str) -> None:
    """Before the predicate, never inside a name, a literal or parentheses."""
    assert with_tablespace(statement, tablespace) == expected


# --- rewrites of deparsed definitions ----------------------------------------------------------

@pytest.mark.parametrize(("definition", "expected"), [
    ("(user_id IS NOT NULL)", '("user_id_uuid" IS NOT NULL)'),
    ("lower((user_id)::text)", 'lower(("user_id_uuid")::text)'),
    ('("user_id" = USER_ID)', '("user_id_uuid" = "user_id_uuid")'),  # quoted, or folded
    ("(t.user_id = user_id)", '(t.user_id = "user_id_uuid")'),  # qualified: another table's
    ("user_id(x)", "user_id(x)"),  # a function of that name
    ("(x)::user_id", "(x)::user_id"),  # a type of that name
    ("(note = 'user_id')", "(note = 'user_id')"),  # a literal
    ('("User_Id" = 1)', '("User_Id" = 1)'),  # another column: quoted names keep their case
    ("(user_ids = user_id_x)", "(user_ids = user_id_x)"),  # whole words only
])
def test_rename_column_renames_the_references_only(definition: str, expected: str) -> None:
    assert rename_column(definition, "user_id", "user_id_uuid") == expected


@pytest.mark.parametrize(("qualifier", "options", "expected"), [
    ("tags", {}, ("((tags.user_id) = (user_id))", 2)),
    ("tags", {"unqualified": False}, ("((tags.user_id) = user_id)", 1)),
    (None, {}, ("(tags.user_id = (user_id))", 1)),
    ("users", {}, ("(tags.user_id = (user_id))", 1)),
])
def test_substitute_column_replaces_the_references_it_is_asked_for(
        qualifier: str | None, options: dict[str, bool], expected: tuple[str, int]) -> None:
    """``{}`` in the replacement stands for the reference as it was written."""
    assert substitute_column("(tags.user_id = user_id)", "user_id", "({})", qualifier,
                             **options) == expected


def test_a_name_behind_a_schema_qualified_table_or_another_alias_is_not_substituted() -> None:
    assert substitute_column("(public.tags.user_id = t.user_id)", "user_id", "x", "tags") == (
        "(public.tags.user_id = t.user_id)", 0)


@pytest.mark.parametrize(("definition", "expected"), [
    ("(user_id = tags.user_id)", 0),
    ("(t.user_id = u.user_id)", 2),
    ("(t.user_id = 'x.user_id')", 1),  # a literal names nothing
])
def test_foreign_references_count_the_names_behind_another_qualifier(
        definition: str, expected: int) -> None:
    assert foreign_references(definition, "user_id", "tags") == expected


@pytest.mark.parametrize(("definition", "expected"), [
    ("CREATE INDEX tags_user ON public.tags USING btree (user_id)",
     'CREATE INDEX CONCURRENTLY "copy" ON public.tags USING btree ("user_id_uuid")'),
    ("CREATE UNIQUE INDEX tags_user_name ON public.tags USING btree (user_id, name) "
     "WHERE (user_id IS NOT NULL)",
     'CREATE UNIQUE INDEX CONCURRENTLY "copy" ON public.tags USING btree ("user_id_uuid", '
     'name) WHERE ("user_id_uuid" IS NOT NULL)'),
    ('CREATE INDEX "Odd ""Name""" ON public.tags USING hash (user_id)',
     'CREATE INDEX CONCURRENTLY "copy" ON public.tags USING hash ("user_id_uuid")'),
])
def test_an_index_is_copied_concurrently_on_the_new_column_under_its_new_name(
        definition: str, expected: str) -> None:
    assert concurrent_copy(definition, "copy", "user_id", "user_id_uuid") == expected


def test_a_partitioned_index_is_copied_on_only_the_parent() -> None:
    definition = "CREATE INDEX j_user ON ONLY public.j USING btree (user_id)"
    assert partitioned_copy(definition, "copy", "user_id", "user_id_uuid") == (
        'CREATE INDEX "copy" ON ONLY public.j USING btree ("user_id_uuid")')


@pytest.mark.parametrize(("copy", "definition"), [
    (concurrent_copy, "CREATE INDEX j_user ON ONLY public.j USING btree (user_id)"),
    (partitioned_copy, "CREATE INDEX tags_user ON public.tags USING btree (user_id)"),
    (concurrent_copy, "ALTER TABLE public.tags ADD CONSTRAINT c CHECK (user_id <> '')"),
])
def test_an_index_of_the_other_kind_is_refused_not_rewritten(copy: object,
                                                              definition: str) -> None:
    assert callable(copy)
    with pytest.raises(ValueError, match="not an index of a"):
        copy(definition, "copy", "user_id", "user_id_uuid")


@pytest.mark.parametrize(("definition", "expected"), [
    ("SELECT t.user_id FROM public.tags t JOIN public.users u ON u.id = t.user_id",
     'SELECT t.user_id FROM "shadow"."tags" t JOIN public.users u ON u.id = t.user_id'),
    ('SELECT 1 FROM "public"."tags", other.public.tags, public.tagsx',
     'SELECT 1 FROM "shadow"."tags", other.public.tags, public.tagsx'),
    ("SELECT 'public.tags'", "SELECT 'public.tags'"),
])
def test_replace_relations_replaces_schema_qualified_names_only(definition: str,
                                                                expected: str) -> None:
    assert replace_relations(definition, {("public", "tags"): '"shadow"."tags"'}) == expected


# --- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "temp", "sync", "filled"), [
    (USER_ID, "user_id_uuid", "migration_sync_user_id", "migration_filled_user_id"),
    (USER_ID.reversed(), "user_id_text", "migration_sync_user_id", "migration_filled_user_id"),
    (KeyColumn(TAGS, "user_id", choice=2), "user_id_uuid_2", "migration_sync_user_id_2",
     "migration_filled_user_id_2"),
])
def test_a_key_names_its_copy_and_helpers_as_the_runbook_does(
        key: KeyColumn, temp: str, sync: str, filled: str) -> None:
    assert (key.temp, key.helper("sync"), key.helper("filled")) == (temp, sync, filled)


@pytest.mark.parametrize(("head", "tail", "expected_length"), [
    ("id", "_uuid", 7),
    ("c" * 58, "_uuid", 63),  # fits exactly: kept
    ("c" * 59, "_uuid", 63),  # one byte over: cut, hashed
    ("é" * 40, "_uuid", 62),  # a two-byte character is never split
])
def test_fit_name_keeps_the_tail_within_63_bytes(head: str, tail: str,
                                                 expected_length: int) -> None:
    name = fit_name(head, tail)
    assert name.endswith(tail)
    assert len(name.encode()) == expected_length
    if len((head + tail).encode()) <= 63:
        assert name == head + tail


@pytest.mark.parametrize(("key", "spec", "backup"), [
    (KeyColumn(Table("public", "users"), "id"), "public.users.id", "migration_backup"),
    (USER_ID, "public.tags.user_id", "migration_backup_public_tags_user_id"),
    (KeyColumn(ODD, "Id"), '"App Data"."we""ird"."Id"', 'migration_backup_App Data_we"ird_Id'),
])
def test_a_key_s_spec_and_backup_schema(key: KeyColumn, spec: str, backup: str) -> None:
    assert (key.spec, backup_schema(key)) == (spec, backup)


@pytest.mark.parametrize(("name", "expected"), [
    ("users", "users"), ("user_id2", "user_id2"), ("Users", '"Users"'), ("2fa", '"2fa"'),
    ("my table", '"my table"'), ('we"ird', '"we""ird"'),
])
def test_quote_ident_quotes_as_postgresql_does(name: str, expected: str) -> None:
    assert quote_ident(name) == expected


# --- psycopg2.sql builders ---------------------------------------------------------------------

COPY_OF_USER_ID = (
    'CASE WHEN "user_id" ~ \'^(\\{[0-9a-fA-F]{4}(-?[0-9a-fA-F]{4}){7}\\}|[0-9a-fA-F]{4}'
    '(-?[0-9a-fA-F]{4}){7})$\' THEN ("user_id")::uuid '
    'WHEN "user_id" IS NOT NULL THEN md5(concat("user_id"))::uuid END')
"""The uuid copy of a string key (``model.uuid_copy``): the cast where the string is a UUID,
else a stand-in, the md5 of the text the cast reads."""

@pytest.mark.parametrize(("statement", "expected"), [
    (USER_ID.copy_type, "uuid"),
    (USER_ID.reversed().copy_type, "text"),
    (USER_ID.same_value(sql.Identifier("user_id_uuid"), sql.Identifier("user_id")),
     'CASE WHEN octet_length("user_id") = 36 AND ("user_id_uuid")::text = ("user_id")::text '
     'COLLATE "C" THEN true '
     f'ELSE "user_id_uuid" IS NOT DISTINCT FROM {COPY_OF_USER_ID} END'),
    (USER_ID.copy_of(sql.Identifier("user_id")), COPY_OF_USER_ID),
    (USER_ID.copy_of(sql.Identifier("user_id"), cast_only=True), '("user_id")::uuid'),
    (USER_ID.reversed().same_value(sql.Identifier("user_id_text"), sql.Identifier("user_id")),
     '("user_id_text")::uuid IS NOT DISTINCT FROM "user_id"'),
    (column_list(["id", "Name"]), '"id", "Name"'),
    (column_list(["id", "Name"], "x"), '"x"."id", "x"."Name"'),
    (row_of(["id"]), 'ROW("id")'),
    (as_cast_reads(sql.Identifier("k"), padded=True), 'concat("k")'),
    (as_cast_reads(sql.Identifier("k"), padded=False), '"k"'),
    (backup_name("migration_backup", ODD), '"migration_backup"."App Data.we""ird"'),
    (quarantine_name("migration_backup", TAGS), '"migration_backup"."quarantine.public.tags"'),
    (meta("migration_backup", "change_log"), '"migration_backup"."change_log"'),
])
def test_builders_render_as_expected(statement: sql.Composable, expected: str) -> None:
    assert text_of(statement) == expected


@pytest.mark.parametrize(("grant", "expected"), [
    (ColumnGrant(None, "SELECT", grantable=False), 'GRANT SELECT ("user_id") ON "public"."tags" '
                                                   "TO PUBLIC"),
    (ColumnGrant("Reporting", "UPDATE", grantable=True),
     'GRANT UPDATE ("user_id") ON "public"."tags" TO "Reporting" WITH GRANT OPTION'),
])
def test_a_column_grant_is_given_again_to_the_same_grantee(grant: ColumnGrant,
                                                           expected: str) -> None:
    assert text_of(grant_statement(USER_ID, grant)) == expected


def test_a_privilege_a_column_cannot_hold_is_refused() -> None:
    with pytest.raises(MigrationError, match="unexpected column privilege 'TRUNCATE'"):
        grant_statement(USER_ID, ColumnGrant("app", "TRUNCATE", grantable=False))


@pytest.mark.parametrize(("walk", "batch", "within"), [
    (Walk(("id",)), {"first": True, "bounded": False}, 'WHERE true ORDER BY "id" LIMIT %(n)s'),
    (Walk(("id",)), {"first": False, "bounded": True},
     'WHERE ROW("id") > ROW((SELECT c."id" FROM jsonb_populate_record(NULL::"public"."tags", '
     '%(after)s) c)) AND ROW("id") <= ROW((SELECT c."id" FROM jsonb_populate_record('
     'NULL::"public"."tags", %(upper)s) c)) ORDER BY "id" LIMIT %(n)s'),
    (Walk((catalog.PAGES,)), {"first": False, "bounded": True},
     "WHERE x.ctid >= (SELECT start FROM pass) AND x.ctid < (SELECT stop FROM pass) "
     "AND (\"x\".ctid::text::point)[1] BETWEEN (SELECT k FROM pass) AND (SELECT k_end FROM pass)"),
])
def test_a_fill_batch_walks_after_its_checkpoint_up_to_its_bound(
        walk: Walk, batch: dict[str, bool], within: str) -> None:
    """One statement per batch: the range, the update of the copy from the column, the
    checkpoint saved in the backup's progress table for this slice."""
    text = words_of(batch_statement(USER_ID, walk, **batch, backup_schema="migration_backup"))
    assert within in text
    assert ('UPDATE "public"."tags" x SET "user_id_uuid" = '
            + COPY_OF_USER_ID.replace('"user_id"', '"x"."user_id"')) in text
    assert ('UPDATE "migration_backup"."backfill_progress" SET last_key = c.last_key' in text)
    assert "(table_schema, table_name, column_name, slice) = %(slice)s" in text


@pytest.mark.parametrize(("columns", "converted", "expected"), [
    ((), frozenset(), "false"),
    (("id",), frozenset({"id"}),
     '(EXISTS (SELECT 1 FROM logged g WHERE g.truncated) OR EXISTS (SELECT 1 FROM logged g '
     'WHERE "g".ident = jsonb_build_array(to_jsonb(("r"."id")::uuid))))'),
    (("id", "n"), frozenset(),
     '(EXISTS (SELECT 1 FROM logged g WHERE g.truncated) OR EXISTS (SELECT 1 FROM logged g '
     'WHERE "g".ident = jsonb_build_array(to_jsonb("r"."id"), to_jsonb("r"."n"))))'),
])
def test_the_change_log_names_a_row_by_its_key_as_uuid_where_converted(
        columns: tuple[str, ...], converted: frozenset[str], expected: str) -> None:
    log = ChangeLog("migration_backup", TAGS, columns, converted)
    assert text_of(log.holds("r")) == expected
