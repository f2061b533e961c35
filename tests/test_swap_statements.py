"""A column's swap read as its statements, without a server.

``swap.ColumnSwap.statements`` builds, from what the swap reads under its locks, every
statement of one column's part of the swap before any runs; these tables of cases read
them as text (``tests.sqltext``), as pgroll's ``TestDuplicateStmtBuilder*`` and alembic's
``op_fixture`` do.  No test here asks for a database fixture (``tests/test_suite_shape.py``
runs this module against no server); the swap's server tests stay the judges of what the
statements do.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest

from migration.catalog import (
    CheckDef,
    ColumnGrant,
    ColumnInfo,
    ColumnTrigger,
    ColumnTuning,
    IndexDef,
)
from migration.engine.expand import ShadowCheck, ShadowIndex
from migration.engine.swap import ColumnSwap, Step
from migration.model import KeyColumn, Table
from tests.sqltext import text_of

USERS = Table("public", "users")
ID = KeyColumn(USERS, "id")


def index(table: Table, name: str, kind: str | None = None, **shadow: object) -> ShadowIndex:
    """The copy ``<name>_copy`` of an index (backing a constraint of ``kind``)."""
    return ShadowIndex(IndexDef(table, name, "", kind, deferrable=False, deferred=False,
                                uses_expression=False), f"{name}_copy", **shadow)


def info(kind: str, *, not_null: bool = False, default: str | None = None) -> ColumnInfo:
    return ColumnInfo(kind, is_string=kind != "uuid", not_null=not_null, default=default)


PKEY = index(USERS, "users_pkey", "p")
PLAIN = ColumnSwap(ID, info("character varying(36)", not_null=True), ColumnTuning(None, ()),
                   [], {}, [PKEY], None, None, [], [], {}, {})
"""The runbook's ``users.id``: NOT NULL, no default, its primary key, nothing else."""

PLAIN_STATEMENTS = [
    'DROP TRIGGER "migration_sync_id" ON "public"."users"',
    'ALTER TABLE "public"."users" DROP COLUMN "id"',
    'ALTER TABLE "public"."users" RENAME COLUMN "id_uuid" TO "id"',
    'ALTER TABLE "public"."users" ALTER COLUMN "id" SET NOT NULL',
    'ALTER TABLE "public"."users" DROP CONSTRAINT "migration_not_null_id"',
    'COMMENT ON COLUMN "public"."users"."id" IS NULL',
    'ALTER TABLE "public"."users" ADD CONSTRAINT "users_pkey" PRIMARY KEY USING INDEX '
    '"users_pkey_copy"',
]


def texts(steps: list[Step]) -> list[str]:
    """Each statement's text; a step that asks the server as ``<its function>``."""
    return [f"<{step.func.__name__}>" if isinstance(step, partial) else text_of(step)
            for step in steps]


def test_the_runbook_s_key_swaps_in_these_statements_in_this_order() -> None:
    assert texts(PLAIN.statements()) == PLAIN_STATEMENTS


TRIGGER = ColumnTrigger("audit_id", 'CREATE TRIGGER audit_id AFTER UPDATE OF id ON '
                        'public.users FOR EACH ROW EXECUTE FUNCTION audit()', "A", "it's audit")


@pytest.mark.parametrize(("change", "expected"), [
    ({"info": info("text")},
     [s for s in PLAIN_STATEMENTS if "NOT NULL" not in s and "not_null" not in s]),
    ({"info": info("text", not_null=True, default="(gen_random_uuid())::text"),
      "unwrapped_default": True},
     [*PLAIN_STATEMENTS[:5],
      'ALTER TABLE "public"."users" ALTER COLUMN "id" SET DEFAULT gen_random_uuid()',
      *PLAIN_STATEMENTS[5:]]),
    ({"info": info("text", not_null=True, default="(md5(random()::text))::text")},
     [*PLAIN_STATEMENTS[:5],
      'ALTER TABLE "public"."users" ALTER COLUMN "id" SET DEFAULT '
      '((md5(random()::text))::text)::uuid', *PLAIN_STATEMENTS[5:]]),
    ({"grants": [ColumnGrant("reporting", "SELECT", grantable=True),
                 ColumnGrant(None, "UPDATE", grantable=False)]},
     [*PLAIN_STATEMENTS[:5],
      'GRANT SELECT ("id") ON "public"."users" TO "reporting" WITH GRANT OPTION',
      'GRANT UPDATE ("id") ON "public"."users" TO PUBLIC', *PLAIN_STATEMENTS[5:]]),
    ({"tuning": ColumnTuning(500, ("n_distinct=-0.5",))},
     [*PLAIN_STATEMENTS[:5],
      'ALTER TABLE "public"."users" ALTER COLUMN "id" SET STATISTICS 500',
      'ALTER TABLE "public"."users" ALTER COLUMN "id" SET ("n_distinct" = \'-0.5\')',
      *PLAIN_STATEMENTS[5:]]),
    ({"comments": {("column", "id"): "it's the key", ("constraint", "users_pkey"): "pk",
                   ("index", "users_pkey"): "its index"}},
     [*PLAIN_STATEMENTS[:5], 'COMMENT ON COLUMN "public"."users"."id" IS \'it\'\'s the key\'',
      PLAIN_STATEMENTS[6], 'COMMENT ON CONSTRAINT "users_pkey" ON "public"."users" IS \'pk\'',
      'COMMENT ON INDEX "public"."users_pkey" IS \'its index\'']),
    ({"indexes": [PKEY, index(USERS, "users_by_id_email")], "replica_identity": "users_by_id_email",
      "clustered": "users_pkey"},
     [*PLAIN_STATEMENTS,
      'ALTER INDEX "public"."users_by_id_email_copy" RENAME TO "users_by_id_email"',
      'ALTER TABLE "public"."users" REPLICA IDENTITY USING INDEX "users_by_id_email"',
      'ALTER TABLE "public"."users" CLUSTER ON "users_pkey"']),
    ({"replica_identity": "another_index", "clustered": "another_index"}, PLAIN_STATEMENTS),
    ({"checks": [ShadowCheck(CheckDef("id_shape", "length(id) = 36", validated=True,
                                      no_inherit=False),
                             "id_shape_copy")], "comments": {("constraint", "id_shape"): "36"}},
     [*PLAIN_STATEMENTS,
      'ALTER TABLE "public"."users" RENAME CONSTRAINT "id_shape_copy" TO "id_shape"',
      'COMMENT ON CONSTRAINT "id_shape" ON "public"."users" IS \'36\'']),
    ({"triggers": [TRIGGER]},
     [PLAIN_STATEMENTS[0], 'DROP TRIGGER "audit_id" ON "public"."users"', *PLAIN_STATEMENTS[1:],
      TRIGGER.definition, 'ALTER TABLE "public"."users" ENABLE ALWAYS TRIGGER "audit_id"',
      'COMMENT ON TRIGGER "audit_id" ON "public"."users" IS \'it\'\'s audit\'']),
    ({"indexes": [dataclasses.replace(PKEY, original=dataclasses.replace(
        PKEY.original, constraint_type="u", deferrable=True, deferred=True))]},
     [*PLAIN_STATEMENTS[:6], 'ALTER TABLE "public"."users" ADD CONSTRAINT "users_pkey" UNIQUE '
      'USING INDEX "users_pkey_copy" DEFERRABLE INITIALLY DEFERRED']),
], ids=["nullable", "default-unwrapped", "default-cast", "grants", "tuning", "comments",
        "index-identity-cluster", "identity-elsewhere", "check", "trigger", "deferrable-unique"])
def test_what_the_column_had_is_given_to_its_copy(change: dict[str, object],
                                                  expected: list[str]) -> None:
    column = dataclasses.replace(PLAIN, **change)
    assert texts(column.statements()) == expected


EVENTS = Table("app", "events")
LEAVES = [Table("app", f"events_{n}") for n in (1, 2)]


def test_a_partitioned_table_s_key_comes_back_from_its_leaves_then_names_its_levels() -> None:
    """Each leaf's copy becomes its leaf's constraint, with a leaf's own comment and
    replica identity; then the table's constraint from the server's text, which takes
    them over; then a step that asks the server which names it gave the levels between."""
    key = KeyColumn(EVENTS, "user_id")
    pkey = index(EVENTS, "events_pkey", "p", partitioned=True,
                 parts=tuple(index(table, f"{table.name}_pkey", "p") for table in LEAVES))
    column = dataclasses.replace(
        PLAIN, key=key, info=info("text"), indexes=[pkey],
        parts={(LEAVES[0], "events_1_pkey"): ("first", True)},
        constraints={"events_pkey": "PRIMARY KEY (user_id, at)"})
    assert texts(column.statements()) == [
        'DROP TRIGGER "migration_sync_user_id" ON "app"."events"',
        'ALTER TABLE "app"."events" DROP COLUMN "user_id"',
        'ALTER TABLE "app"."events" RENAME COLUMN "user_id_uuid" TO "user_id"',
        'COMMENT ON COLUMN "app"."events"."user_id" IS NULL',
        'ALTER TABLE "app"."events_1" ADD CONSTRAINT "events_1_pkey" PRIMARY KEY USING INDEX '
        '"events_1_pkey_copy"',
        'COMMENT ON INDEX "app"."events_1_pkey" IS \'first\'',
        'ALTER TABLE "app"."events_1" REPLICA IDENTITY USING INDEX "events_1_pkey"',
        'ALTER TABLE "app"."events_2" ADD CONSTRAINT "events_2_pkey" PRIMARY KEY USING INDEX '
        '"events_2_pkey_copy"',
        'ALTER TABLE "app"."events" ADD CONSTRAINT "events_pkey" PRIMARY KEY (user_id, at)',
        "<_name_middle_levels>"]


@pytest.mark.parametrize(("recorded", "live", "expected"), [
    ("(gen_random_uuid())::text", "gen_random_uuid()",
     ['ALTER TABLE "public"."users" ALTER COLUMN "id" SET DEFAULT (gen_random_uuid())::text']),
    ("'00000000-0000-0000-0000-000000000000'::character varying",
     "('00000000-0000-0000-0000-000000000000'::character varying)::uuid",
     ['ALTER TABLE "public"."users" ALTER COLUMN "id" SET DEFAULT '
      "'00000000-0000-0000-0000-000000000000'::character varying"]),
    ("(gen_random_uuid())::text", None, []),
], ids=["unwrapped", "cast", "dropped since"])
def test_on_the_way_back_the_string_column_takes_the_default_the_backup_recorded(
        recorded: str, live: str | None, expected: list[str]) -> None:
    back = dataclasses.replace(PLAIN, key=ID.reversed(), saved_default=recorded,
                               info=info("uuid", default=live))
    assert [t for t in texts(back.statements()) if "DEFAULT" in t] == expected
    assert texts(back.statements())[2] == 'ALTER TABLE "public"."users" RENAME COLUMN ' \
                                          '"id_text" TO "id"'
