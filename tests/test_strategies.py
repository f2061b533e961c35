"""The strategies agree with PostgreSQL, and the loader puts in the database what they planted."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from migration.connection import connect
from migration.rehearsal.sandbox import Sandbox
from tests.loader import load
from tests.strategies import (
    ALL_UPPER,
    HYPHEN_SLOTS,
    KEY_LENGTH,
    MUTATIONS,
    SPELLINGS,
    Dataset,
    JournalEntry,
    Planted,
    Ref,
    Reminder,
    Tag,
    User,
    datasets,
    invalid_uuid_texts,
    spell,
    uuid_candidates,
    uuid_texts,
)

# The suite's own strategies against the server's uuid input: the same on every version.
pytestmark = pytest.mark.once

KEY_COLUMNS = [("users", "id"), ("journal_entries", "id"), ("journal_entries", "user_id"),
               ("tags", "id"), ("tags", "user_id"), ("reminders", "id"), ("reminders", "user_id")]
CHILDREN = ("journal_entries", "tags", "reminders")


def accepts_uuid(cur: Cursor) -> sql.SQL:
    """SQL telling whether the text ``{}`` is a valid uuid on this server, errors aside.

    PostgreSQL 16 has pg_input_is_valid; before it, a function in pg_temp
    tries the cast (created in the current transaction; STRICT like
    pg_input_is_valid, so NULL stays NULL).
    """
    if cur.connection.server_version >= 160000:
        return sql.SQL("pg_input_is_valid({}, 'uuid')")
    cur.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.accepts_uuid(t text) RETURNS boolean
        LANGUAGE plpgsql STRICT AS $$
        BEGIN PERFORM t::uuid; RETURN true;
        EXCEPTION WHEN invalid_text_representation THEN RETURN false;
        END $$""")
    return sql.SQL("pg_temp.accepts_uuid({})")


def server_accepts(cur: Cursor, texts: list[str]) -> list[bool]:
    """What the server makes of each text, in one query."""
    cur.execute(sql.SQL(
        "SELECT {} FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n"
    ).format(accepts_uuid(cur).format(sql.Identifier("t"))), (texts,))
    return [accepted for accepted, in cur.fetchall()]


@pytest.fixture(scope="module")
def server(sandbox: Sandbox) -> Iterator[Cursor]:
    """A session on the maintenance database: parsing uuids needs no tables."""
    conn = connect(sandbox.admin_dsn, autocommit=True)
    with conn.cursor() as cur:
        yield cur
    conn.close()


# ---------------------------------------------------------------- uuid texts


EXAMPLE = 0xA0EEBC999C0B4EF8BB6D6BB9BD380A11


@pytest.mark.parametrize("text", [
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
    "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
])
def test_the_server_accepts(server: Cursor, text: str) -> None:
    assert server_accepts(server, [text]) == [True]


@pytest.mark.parametrize("text", [
    "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
    "a0-eebc999c0b4ef8bb6d6bb9bd380a11",
    "a0eebc999c0b4ef8bb6d6bb9bd380a11-",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ",
    "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
])
def test_the_server_rejects(server: Cursor, text: str) -> None:
    assert server_accepts(server, [text]) == [False]


def test_spell_writes_those_spellings() -> None:
    assert spell(EXAMPLE) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert spell(EXAMPLE, upper=ALL_UPPER) == "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"
    assert spell(EXAMPLE, hyphens=HYPHEN_SLOTS) == "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"
    assert spell(EXAMPLE, hyphens=(), braces=True) == "{a0eebc999c0b4ef8bb6d6bb9bd380a11}"
    assert spell(EXAMPLE, hyphens=(8, 8, 12, 16, 20)) == "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11"
    assert spell(EXAMPLE, hyphens=(2,)) == "a0-eebc999c0b4ef8bb6d6bb9bd380a11"


@given(data=st.data())
def test_every_spelling_and_mutation_agrees_with_the_server(
    server: Cursor, data: st.DataObject
) -> None:
    """Each example checks a few strings of every kind, all in one query."""
    labelled = [(f"{name} (accepted)", text, True) for name in SPELLINGS for text in data.draw(
        st.lists(uuid_texts(spellings=[name]), min_size=2, max_size=8), label=name)]
    labelled += [(f"{kind} (rejected)", text, False) for kind in MUTATIONS for text in data.draw(
        st.lists(invalid_uuid_texts(kinds=[kind]), min_size=2, max_size=8), label=kind)]
    verdicts = server_accepts(server, [text for _, text, _ in labelled])
    assert [(label, text) for (label, text, expected), got in zip(labelled, verdicts, strict=True)
            if got != expected] == []


@given(candidates=st.lists(uuid_candidates(max_length=KEY_LENGTH), min_size=50, max_size=150))
def test_storable_candidates_agree_with_the_server(
    server: Cursor, candidates: list[tuple[str, bool]]
) -> None:
    """What datasets draw from: every key fits VARCHAR(36) and means what it claims."""
    texts = [text for text, _ in candidates]
    verdicts = server_accepts(server, texts)
    assert [(text, expected) for (text, expected), got in zip(candidates, verdicts, strict=True)
            if got != expected] == []
    assert max(map(len, texts)) <= KEY_LENGTH


def test_mutations_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="fits"):
        invalid_uuid_texts(kinds=["urn_prefix"], max_length=KEY_LENGTH)


# ---------------------------------------------------------------- datasets and the loader


def found(cur: Cursor) -> Planted:
    """The dirt in the database, found by SQL alone, in the terms of Planted."""
    accepts = accepts_uuid(cur)

    def rows(query: sql.Composable) -> list[tuple[Any, ...]]:
        cur.execute(query)
        return cur.fetchall()

    def as_uuid(column: sql.Composable) -> sql.Composable:
        return sql.SQL("CASE WHEN {} THEN {}::uuid END").format(accepts.format(column), column)

    invalid = set()
    for table, column in KEY_COLUMNS:
        col = sql.Identifier(column)
        invalid |= {Ref(table, column, pk, value) for pk, value in rows(sql.SQL(
            "SELECT id, {} FROM {} WHERE {} IS NOT NULL AND NOT {}"
        ).format(col, sql.Identifier(table), col, accepts.format(col)))}
    collisions = {tuple(pair) for pair, in rows(sql.SQL(
        "SELECT array_agg(id ORDER BY id COLLATE \"C\") FROM users WHERE {}"
        " GROUP BY {} HAVING count(*) > 1"
    ).format(accepts.format(sql.Identifier("id")), as_uuid(sql.Identifier("id"))))}
    unmatched, orphans = set(), set()
    for table in CHILDREN:
        child = sql.Identifier("c", "user_id")
        unmatched |= {Ref(table, "user_id", pk, value) for pk, value in rows(sql.SQL(
            "SELECT id, user_id FROM {} AS c WHERE user_id IS NOT NULL"
            " AND NOT EXISTS (SELECT FROM users AS u WHERE u.id = c.user_id)"
        ).format(sql.Identifier(table)))}
        orphans |= {Ref(table, "user_id", pk, value) for pk, value in rows(sql.SQL(
            "SELECT id, user_id FROM {} AS c WHERE {}"
            " AND NOT EXISTS (SELECT FROM users AS u WHERE {} = {})"
        ).format(sql.Identifier(table), accepts.format(child),
                 as_uuid(sql.Identifier("u", "id")), as_uuid(child)))}
    nulls = {pk for pk, in rows(sql.SQL("SELECT id FROM reminders WHERE user_id IS NULL"))}
    return Planted(invalid_ids=frozenset(invalid), collisions=frozenset(collisions),
                   orphans=frozenset(orphans), respelled=frozenset(unmatched - orphans),
                   null_user_ids=frozenset(nulls))


def counts(cur: Cursor) -> dict[str, int]:
    result = {}
    for table in ("users", *CHILDREN):
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        (result[table],) = cur.fetchone() or (None,)
    return result


@pytest.fixture
def no_fk(legacy_no_fk_db: str) -> Iterator[Connection]:
    conn = connect(legacy_no_fk_db)
    yield conn
    conn.close()


@pytest.fixture
def any_fk(any_legacy_db: str) -> Iterator[Connection]:
    conn = connect(any_legacy_db)
    yield conn
    conn.close()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=datasets(clean=False, foreign_keys=False))
def test_loader_plants_what_the_dirty_dataset_records(no_fk: Connection, dataset: Dataset) -> None:
    planted = dataset.planted
    assert all([planted.invalid_ids, planted.collisions, planted.orphans, planted.respelled])
    try:
        load(no_fk, dataset)
        with no_fk.cursor() as cur:
            assert counts(cur) == {table: len(rows) for table, rows in dataset.tables().items()}
            assert found(cur) == planted
    finally:
        no_fk.rollback()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=datasets())
def test_clean_datasets_load_with_foreign_keys_and_hold_no_dirt(
    any_fk: Connection, dataset: Dataset
) -> None:
    try:
        load(any_fk, dataset)
        with any_fk.cursor() as cur:
            assert counts(cur) == {table: len(rows) for table, rows in dataset.tables().items()}
            assert found(cur) == Planted(null_user_ids=dataset.planted.null_user_ids)
    finally:
        any_fk.rollback()


@pytest.mark.parametrize("flag", ["orphans", "respelled_children"])
def test_unloadable_dirt_is_refused(flag: str) -> None:
    planting: dict[str, Any] = {flag: True}
    with pytest.raises(ValueError, match="foreign_keys=False"):
        datasets(clean=False, **planting)
    with pytest.raises(ValueError, match="clean=False"):
        datasets(foreign_keys=False, **planting)


def test_loader_sends_one_statement_per_table(legacy_db: str) -> None:
    executed: list[str] = []

    class Counting(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            executed.append(str(query)[:30])
            super().execute(query, vars)

    moment = datetime(2024, 2, 29, 12, tzinfo=UTC)
    users = tuple(User(spell(i), f"{i}@example.test", None, is_active=True, created_at=moment)
                  for i in range(150))
    dataset = Dataset(
        users=users,
        journal_entries=tuple(JournalEntry(spell(i), users[i % 150].id, "t", None, 1, moment)
                              for i in range(300)),
        tags=tuple(Tag(spell(i), users[i % 150].id, f"tag{i}", "#00ff00") for i in range(300)),
        reminders=tuple(Reminder(spell(i), None, moment, None, {"n": i}, done=False)
                        for i in range(300)),
    )
    conn = connect(legacy_db)
    try:
        conn.cursor_factory = Counting
        load(conn, dataset)
        conn.cursor_factory = psycopg2.extensions.cursor
        with conn.cursor() as cur:
            assert counts(cur) == {"users": 150, "journal_entries": 300, "tags": 300,
                                   "reminders": 300}
        assert len(executed) == 4, executed
    finally:
        conn.close()
