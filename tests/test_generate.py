"""The generic data generator: any schema gets rows its constraints accept, and dirt on request.

The property test draws small schemas (tests/strategies.py ``gen_schemas``);
each example gets its own empty database, filled as the owner role.  The
constraints are checked by the server: a NOT VALID copy of every CHECK and
foreign key, then VALIDATE, which scans the rows as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from psycopg2 import sql

from migration.connection import Connection
from migration.model import KeyColumn, Table
from migration.plan import Plan, build_plan, parse_key
from migration.preflight import validate_schema
from migration.rehearsal.generate import GenerateError, populate
from migration.rehearsal.rehearse import planted_checks
from migration.rehearsal.sandbox import Sandbox, schema_sql
from migration.rehearsal.seed import Planted
from migration.session import Session, Settings
from tests.operate import connected, print_of
from tests.strategies import GenColumn, GenSchema, GenTable, gen_schemas

# The rehearsal's data generator: a tool around the engine, tested on one server.
pytestmark = pytest.mark.once

_numbers = itertools.count()
UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


@contextmanager
def empty_database(sandbox: Sandbox, ddl: str | list[sql.Composable] = ()) -> Iterator[
        tuple[str, str]]:
    """A new database holding ``ddl`` (run by the owner): the owner's and the superuser's DSN."""
    name = f"{sandbox.prefix}_gen_{next(_numbers)}"
    with sandbox.database(name, variant=None) as dsn:
        with connected(dsn) as conn, conn.cursor() as cur:
            for statement in [ddl] if isinstance(ddl, str) else ddl:
                cur.execute(statement)
        yield dsn, sandbox.admin_dsn_for(name)


def violations(conn: Connection, schema: str) -> list[str]:
    """Every CHECK and foreign key of ``schema`` that its rows break, by the server's own
    VALIDATE of a NOT VALID copy (rolled back), and every table left empty."""
    broken = []
    with conn.cursor() as cur:
        cur.execute("SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) "
                    "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
                    "WHERE c.contype IN ('c', 'f') AND t.relnamespace = %s::regnamespace "
                    "ORDER BY 1, 2", (schema,))
        for table, name, definition in cur.fetchall():
            cur.execute("SAVEPOINT copy")
            try:
                cur.execute(sql.SQL("ALTER TABLE {t} ADD CONSTRAINT copy {d} NOT VALID; "
                                    "ALTER TABLE {t} VALIDATE CONSTRAINT copy").format(
                    t=sql.SQL(table), d=sql.SQL(definition)))
            except psycopg2.Error as exc:
                broken.append(f"{table} {name}: {exc.diag.message_primary}")
            cur.execute("ROLLBACK TO SAVEPOINT copy")
        cur.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relkind IN ('r', 'p') "
                    "AND c.relnamespace = %s::regnamespace AND NOT c.relispartition "
                    "ORDER BY 1", (schema,))
        for (table,) in cur.fetchall():
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(table)))
            if (cur.fetchone() or (0,))[0] == 0:
                broken.append(f"{table}: no rows")
    conn.rollback()
    return broken


def non_canonical(conn: Connection, plan: Plan) -> list[str]:
    """Plan key values that are not canonical lower-case UUID strings."""
    found = []
    with conn.cursor() as cur:
        for key in plan.columns:
            cur.execute(sql.SQL("SELECT {c} FROM {t} WHERE {c} !~ %s").format(
                c=sql.Identifier(key.column), t=key.table.ident), (UUID_PATTERN,))
            found += [f"{key}: {value}" for (value,) in cur.fetchall()]
    conn.rollback()
    return found


def gen_plan(schema: GenSchema) -> Plan:
    parent = KeyColumn(Table("gen", schema.tables[0].name), "id")
    return Plan(parent=parent, children=tuple(
        KeyColumn(Table("gen", table), column) for table, column in schema.children()))


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])
@given(schema=gen_schemas())
# The server prints a fractional BETWEEN as ``(c >= 1.5) AND (c <= (3)::numeric)``: the cast
# inside the conjunct's parentheses once hid the upper bound, and every row missed it.
@example(schema=GenSchema(tables=(
    GenTable(name="t0", id_type="varchar(36)", columns=(), composite_unique=()),
    GenTable(name="t1", id_type="uuid", columns=(
        GenColumn(name="c0", type="numeric(6,2)", not_null=True, unique=False,
                  check="{0} BETWEEN 1.5 AND 3", references=None),), composite_unique=()),
)))
# Residue CHECKs, on columns and through a domain, that the values met in a few rows or none:
# the generator steers by ``x % m = r`` and ``x % m <> r`` as well.
@example(schema=GenSchema(tables=(
    GenTable(name="t0", id_type="varchar(36)", columns=(), composite_unique=()),
    GenTable(name="t1", id_type="integer", columns=(
        GenColumn(name="c0", type="gen.odd", not_null=True, unique=False, check=None,
                  references=None),
        GenColumn(name="c1", type="integer", not_null=True, unique=True,
                  check="({0} % 97) = 50", references=None),
        GenColumn(name="c2", type="integer", not_null=True, unique=True,
                  check="({0} % 3) <> 1", references=None)), composite_unique=()),
)))
def test_generated_rows_meet_every_constraint_of_a_generated_schema(
        sandbox: Sandbox, schema: GenSchema) -> None:
    """Every table gets rows; CHECKs and FKs hold (the server validates them again); the
    plan's keys are canonical UUID strings.  As the owner, without superuser."""
    plan = gen_plan(schema)
    with (empty_database(sandbox, schema.statements()) as (dsn, _),
          connected(dsn, autocommit=False) as conn):
        planted = populate(conn, plan, rows=20, dirty=False)
        assert planted == Planted()
        assert violations(conn, "gen") == []
        assert non_canonical(conn, plan) == []


FILTERED_SCHEMA = """
CREATE SCHEMA f;
CREATE TABLE f.users (id varchar(36) PRIMARY KEY);
CREATE DOMAIN f.odd AS integer CHECK ((VALUE + 1) % 2 = 0);
CREATE TABLE f.t (
    id      integer PRIMARY KEY CHECK ((id * 7) % 3 <> 0),
    n       f.odd NOT NULL,
    word    text NOT NULL CHECK (upper(word) <> word),
    at      date NOT NULL
);
CREATE TABLE f.p (id bigint, at date NOT NULL CHECK (extract(dow FROM at) <> 0))
    PARTITION BY RANGE (at);
CREATE TABLE f.p_2024 PARTITION OF f.p FOR VALUES FROM ('2024-03-01') TO ('2025-01-01');
"""


def test_rows_that_break_a_check_it_cannot_read_are_left_out(sandbox: Sandbox) -> None:
    """CHECKs of a table and of a domain, and partition bounds, that the generator does not
    steer by: the rows that break them are filtered out, the others land."""
    plan = Plan(parent=KeyColumn(Table("f", "users"), "id"), children=())
    with (empty_database(sandbox, FILTERED_SCHEMA) as (dsn, _),
          connected(dsn, autocommit=False) as conn):
        populate(conn, plan, rows=40, dirty=False)
        assert violations(conn, "f") == []
        with conn.cursor() as cur:
            cur.execute("SELECT (SELECT count(*) FROM f.t), (SELECT count(*) FROM f.p)")
            kept = cur.fetchone()
        assert kept is not None
        assert 0 < kept[0] < 40
        assert 0 < kept[1] < 40


# --- dirty data: what validate_schema must find --------------------------------------------------

def findings_of(dsn: str, plan: Plan) -> list:  # type: ignore[type-arg]
    with connected(dsn, autocommit=False) as conn:
        return validate_schema(Session(conn, plan, Settings(show_progress=False), dsn))


def assert_all_planted(planted: Planted) -> None:
    assert len(planted.invalid_ids) == 3
    assert len(planted.colliding_ids) == 2
    assert len(planted.non_canonical_ids) == 4


def test_the_runbook_schema_dirty_holds_what_validate_schema_finds(sandbox: Sandbox) -> None:
    """The planted problems are in the data and validate_schema names every one of them."""
    with empty_database(sandbox, schema_sql("legacy")) as (dsn, admin):
        with connected(admin, autocommit=False) as conn:
            plan = build_plan(conn)
            planted = populate(conn, plan, rows=30, dirty=True)
        assert_all_planted(planted)
        assert set(planted.orphans) == {f"public.{table}.user_id" for table in (
            "journal_entries", "tags", "reminders")}
        checks = planted_checks(planted, findings_of(dsn, plan), plan)
        assert checks
        assert [check for check in checks if not check.found] == []


COMPOSITE_SCHEMA = """
CREATE SCHEMA crm;
CREATE TYPE crm.role AS ENUM ('owner', 'member');
CREATE TABLE crm.accounts (
    uuid     varchar(36) PRIMARY KEY,
    tenant   integer NOT NULL CHECK (tenant BETWEEN 1 AND 3),
    handle   text NOT NULL,
    manager  varchar(36) REFERENCES crm.accounts (uuid),
    UNIQUE (tenant, handle)
);
CREATE TABLE crm.orgs (
    id       serial PRIMARY KEY,
    name     varchar(12) NOT NULL UNIQUE,
    rank     smallint NOT NULL UNIQUE CHECK (rank BETWEEN 1 AND 40)
);
CREATE TABLE crm.profiles (account varchar(36) PRIMARY KEY REFERENCES crm.accounts (uuid));
CREATE TABLE crm.memberships (
    account  varchar(36) NOT NULL REFERENCES crm.accounts (uuid),
    org      integer NOT NULL REFERENCES crm.orgs (id),
    role     crm.role NOT NULL,
    PRIMARY KEY (account, org)
);
CREATE TABLE crm.member_notes (
    account  varchar(36),
    org      integer,
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    note     text NOT NULL CHECK (md5(note) <> ''),
    FOREIGN KEY (account, org) REFERENCES crm.memberships (account, org)
);
"""
COMPOSITE_PLAN = Plan(
    parent=KeyColumn(Table("crm", "accounts"), "uuid"),
    children=(KeyColumn(Table("crm", "accounts"), "manager"),
              KeyColumn(Table("crm", "memberships"), "account"),
              KeyColumn(Table("crm", "member_notes"), "account")))


def test_composite_keys_and_a_self_reference_dirty(sandbox: Sandbox) -> None:
    with empty_database(sandbox, COMPOSITE_SCHEMA) as (dsn, admin):
        with connected(admin, autocommit=False) as conn:
            planted = populate(conn, COMPOSITE_PLAN, rows=25, dirty=True)
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM crm.accounts")
                counts = [(cur.fetchone() or (0,))[0]]
                for table in ("orgs", "memberships", "member_notes", "profiles"):
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(
                        sql.Identifier("crm", table)))
                    counts.append((cur.fetchone() or (0,))[0])
                # The self-reference, left NULL at first, points at other accounts after.
                cur.execute("SELECT count(*) FROM crm.accounts WHERE manager IN "
                            "(SELECT uuid FROM crm.accounts)")
                managed = (cur.fetchone() or (0,))[0]
            conn.rollback()
        # Every row made it, plus what was planted: unique values by construction (orgs'
        # ranks 1 to 25 of 40), one profile per account, 25 distinct membership pairs.
        assert counts == [25 + 7 + 1, 25, 25 + 1, 25 + 1, 25]
        assert managed == 25
        assert_all_planted(planted)
        assert set(planted.orphans) == {str(key) for key in COMPOSITE_PLAN.children}
        checks = planted_checks(planted, findings_of(dsn, COMPOSITE_PLAN), COMPOSITE_PLAN)
        assert checks
        assert [check for check in checks if not check.found] == []
        with connected(admin, autocommit=False) as conn:
            # Only the planted orphans break the foreign keys.
            broken = violations(conn, "crm")
        assert len(broken) == 3, broken
        assert all("fkey" in line for line in broken), broken


def test_orphans_in_two_columns_of_one_table_are_named_under_each(sandbox: Sandbox) -> None:
    """The workflow engine's tables: three self-references and tables with two foreign keys
    to the key; each column's orphan is expected, and found, under that column."""
    ddl = (Path(__file__).resolve().parent.parent / "fixtures" / "workflow_engine.sql").read_text()
    with empty_database(sandbox, ddl) as (dsn, admin):
        with connected(admin, autocommit=False) as conn:
            plan = build_plan(conn, key=parse_key("public.act_ru_execution.id_"))
            planted = populate(conn, plan, rows=20, dirty=True)
        assert len(plan.children) == 7
        checks = planted_checks(planted, findings_of(dsn, plan), plan)
        orphans = [check for check in checks if check.check == "orphans"]
        assert sorted(check.subject for check in orphans) == sorted(map(str, plan.children))
        assert [check for check in checks if not check.found] == []


def test_the_same_seed_gives_the_same_data(sandbox: Sandbox) -> None:
    prints = []
    for _ in range(2):
        with empty_database(sandbox, COMPOSITE_SCHEMA) as (dsn, _admin):
            with connected(dsn, autocommit=False) as conn:
                populate(conn, COMPOSITE_PLAN, rows=10, dirty=False, seed=7)
            prints.append(print_of(dsn))
    assert prints[0] == prints[1], "\n".join(prints[0].diff(prints[1]))


def test_orphans_past_a_foreign_key_need_a_superuser(sandbox: Sandbox) -> None:
    """As the owner, a dirty load stops with a clear error, and nothing is left behind."""
    with empty_database(sandbox, schema_sql("legacy")) as (dsn, _):
        with connected(dsn, autocommit=False) as conn:
            before = print_of(dsn)
            with pytest.raises(GenerateError, match=r"public\.journal_entries\.user_id: "
                                                    "planting an orphan .* needs a superuser"):
                populate(conn, build_plan(conn), rows=5, dirty=True)
        assert print_of(dsn) == before


@pytest.mark.parametrize(("ddl", "message"), [
    ("CREATE TABLE public.t (id int PRIMARY KEY, p point NOT NULL)",
     r"public\.t\.p: cannot make values of type point"),
    ("CREATE TABLE public.t (id int PRIMARY KEY, n int NOT NULL CHECK (n <> n))",
     r"public\.t: none of the generated rows .*\(n <> n\).* left out 5"),
    ("CREATE TABLE public.a (id int PRIMARY KEY, b int NOT NULL);"
     "CREATE TABLE public.b (id int PRIMARY KEY, a int NOT NULL REFERENCES public.a);"
     "ALTER TABLE public.a ADD FOREIGN KEY (b) REFERENCES public.b",
     r"a cycle of NOT NULL foreign keys among public\.a, public\.b"),
])
def test_what_cannot_be_satisfied_is_named(sandbox: Sandbox, ddl: str, message: str) -> None:
    users = "CREATE TABLE public.users (id varchar(36) PRIMARY KEY);"
    plan = Plan(parent=KeyColumn(Table("public", "users"), "id"), children=())
    with (empty_database(sandbox, users + ddl) as (dsn, _),
          connected(dsn, autocommit=False) as conn,
          pytest.raises(GenerateError, match=message)):
        populate(conn, plan, rows=5, dirty=False)
