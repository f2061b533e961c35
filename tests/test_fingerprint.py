"""Fingerprints see every change that matters, none that does not, and change nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg2.errors
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from migration.connection import connect
from migration.rehearsal.fingerprint import ColumnRef, expected_after_migration, fingerprint
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox
from tests.loader import load
from tests.strategies import Dataset, JournalEntry, Reminder, Tag, User, datasets

T0 = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
ADA = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
BOB = "B1EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12"
CY = "{c2eebc999c0b4ef8bb6d6bb9bd380a13}"
FIXED = Dataset(
    users=(User(ADA, "ada@example.test", "Ada ✓", is_active=True, created_at=T0),
           User(BOB, "bob@example.test", None, is_active=False,
                created_at=T0.astimezone(timezone(timedelta(hours=5, minutes=45)))),
           User(CY, "cy@example.test", "", is_active=True, created_at=T0 - timedelta(days=9000))),
    journal_entries=(
        JournalEntry("d3eebc99-9c0b-4ef8-bb6d-6bb9bd380a14", ADA, "first", None, 3, T0),
        JournalEntry("e4eebc999c0b4ef8bb6d6bb9bd380a15", BOB, "ß\ttab", "body", None, T0)),
    tags=(Tag("f5eebc99-9c0b-4ef8-bb6d-6bb9bd380a16", ADA, "work", "#ff0000"),
          Tag("06eebc99-9c0b-4ef8-bb6d-6bb9bd380a17", CY, "home", None)),
    reminders=(
        Reminder("17eebc99-9c0b-4ef8-bb6d-6bb9bd380a18", ADA, T0, "call", {"k": [1, "x", None]},
                 done=False),
        Reminder("28eebc99-9c0b-4ef8-bb6d-6bb9bd380a19", None, T0, None, None, done=True)),
)

TABLES = ("users", "journal_entries", "tags", "reminders")
KEYS: list[ColumnRef] = [("public", table, "id") for table in TABLES] + [
    ("public", table, "user_id") for table in TABLES[1:]]
NEW_DEFAULTS: dict[ColumnRef, str | None] = {
    ("public", table, "id"): "gen_random_uuid()" for table in TABLES}

# The conversion by hand: in place for most columns, by the temporary-column
# swap for reminders.user_id, which moves it to the end of its table.
HAND_MIGRATION = """
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_user_id_fkey;
ALTER TABLE tags DROP CONSTRAINT tags_user_id_fkey;
ALTER TABLE reminders DROP CONSTRAINT reminders_user_id_fkey;
ALTER TABLE users ALTER COLUMN id DROP DEFAULT, ALTER COLUMN id TYPE uuid USING id::uuid,
    ALTER COLUMN id SET DEFAULT gen_random_uuid();
ALTER TABLE journal_entries ALTER COLUMN id DROP DEFAULT,
    ALTER COLUMN id TYPE uuid USING id::uuid, ALTER COLUMN id SET DEFAULT gen_random_uuid(),
    ALTER COLUMN user_id TYPE uuid USING user_id::uuid;
ALTER TABLE tags ALTER COLUMN id DROP DEFAULT,
    ALTER COLUMN id TYPE uuid USING id::uuid, ALTER COLUMN id SET DEFAULT gen_random_uuid(),
    ALTER COLUMN user_id TYPE uuid USING user_id::uuid;
ALTER TABLE reminders ALTER COLUMN id DROP DEFAULT,
    ALTER COLUMN id TYPE uuid USING id::uuid, ALTER COLUMN id SET DEFAULT gen_random_uuid(),
    ADD COLUMN user_id_uuid uuid;
UPDATE reminders SET user_id_uuid = user_id::uuid;
ALTER TABLE reminders DROP COLUMN user_id;
ALTER TABLE reminders RENAME COLUMN user_id_uuid TO user_id;
CREATE INDEX ix_reminders_user_id ON reminders (user_id) WHERE user_id IS NOT NULL;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;
ALTER TABLE tags ADD CONSTRAINT tags_user_id_fkey FOREIGN KEY (user_id) REFERENCES users (id);
ALTER TABLE reminders ADD CONSTRAINT reminders_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE SET NULL;
"""

TOUCH_TRIGGER = """
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch();
"""


def load_fixed(dsn: str) -> str:
    """FIXED loaded into the legacy database ``dsn`` and committed; the DSN."""
    conn = connect(dsn)
    try:
        load(conn, FIXED)
        conn.commit()
    finally:
        conn.close()
    return dsn


@pytest.fixture
def loaded(legacy_db: str) -> str:
    """The legacy database holding FIXED, committed: for a test that commits or clones it."""
    return load_fixed(legacy_db)


@pytest.fixture(scope="module")
def loaded_once(sandbox: Sandbox) -> Iterator[str]:
    """One legacy database holding FIXED for the module's ``conn`` tests, which never
    commit: a database each cost more than most of these tests."""
    with sandbox.database(f"{sandbox.prefix}_fingerprint_loaded") as dsn:
        yield load_fixed(dsn)


@pytest.fixture
def conn(loaded_once: str) -> Iterator[Connection]:
    """A session on the loaded database; whatever a test does is rolled back, so every
    test sees FIXED as loaded."""
    session = connect(loaded_once)
    yield session
    session.rollback()
    session.close()


def db_name(dsn: str) -> str:
    return str(psycopg2.extensions.parse_dsn(dsn)["dbname"])


# ---------------------------------------------------------------- equal when nothing changed


def test_a_copy_has_the_same_fingerprint(sandbox: Sandbox, loaded: str) -> None:
    copy = db_name(loaded) + "_copy"
    sandbox.admin_execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
        sql.Identifier(copy), sql.Identifier(db_name(loaded)), sql.Identifier(OWNER_ROLE)))
    try:
        with connect(loaded) as original, connect(sandbox.owner_dsn(copy)) as duplicate:
            expected, got = fingerprint(original), fingerprint(duplicate)
        original.close()
        duplicate.close()
    finally:
        sandbox.drop_database(copy)
    assert got == expected, expected.diff(got)
    assert expected.diff(got) == []
    assert expected.data[("public", "users")].rows == len(FIXED.users)


@pytest.fixture
def twin(sandbox: Sandbox, legacy_no_fk_db: str) -> Iterator[tuple[Connection, Connection]]:
    """Two fresh databases of the no-FK variant."""
    with sandbox.database(db_name(legacy_no_fk_db) + "_twin", variant="legacy_no_fk") as other:
        first, second = connect(legacy_no_fk_db), connect(other)
        yield first, second
        first.close()
        second.close()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=datasets(clean=False, foreign_keys=False))
def test_the_same_rows_loaded_in_another_order_give_the_same_fingerprint(
    twin: tuple[Connection, Connection], dataset: Dataset
) -> None:
    first, second = twin
    backwards = dataclasses.replace(
        dataset, users=dataset.users[::-1], journal_entries=dataset.journal_entries[::-1],
        tags=dataset.tags[::-1], reminders=dataset.reminders[::-1])
    try:
        load(first, dataset)
        load(second, backwards)
        expected, got = fingerprint(first), fingerprint(second)
        assert got == expected, expected.diff(got)
    finally:
        first.rollback()
        second.rollback()


def test_moving_a_column_to_the_end_changes_nothing(conn: Connection) -> None:
    with conn.cursor() as cur:  # the server prints its columns in the table's order
        cur.execute("CREATE STATISTICS tags_color_name ON color, name FROM tags")
    before = fingerprint(conn)
    with conn.cursor() as cur:
        cur.execute("""
            ALTER TABLE tags ADD COLUMN color_new char(7);
            UPDATE tags SET color_new = color;
            ALTER TABLE tags DROP COLUMN color;
            ALTER TABLE tags RENAME COLUMN color_new TO color;
            CREATE STATISTICS tags_color_name ON color, name FROM tags;
            SELECT attname FROM pg_attribute
             WHERE attrelid = 'tags'::regclass AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum DESC LIMIT 1""")
        assert cur.fetchone() == ("color",)
    after = fingerprint(conn)
    assert after == before, before.diff(after)


# ---------------------------------------------------------------- different when something changed


CHANGES = {
    # name: (setup, change, a fragment of the diff, the one table whose data changes)
    "one value": ("", "UPDATE users SET display_name = 'Ada' WHERE display_name = 'Ada ✓'",
                  "public.users data", "users"),
    "NULL to empty": ("", "UPDATE journal_entries SET body = '' WHERE body IS NULL",
                      "public.journal_entries data", "journal_entries"),
    "a microsecond": ("", "UPDATE reminders SET remind_at = remind_at - interval '1 us'",
                      "public.reminders data", "reminders"),
    "a key's case": ("", "UPDATE tags SET id = upper(id) WHERE name = 'work'",
                     "public.tags data", "tags"),
    "inside a payload": ("", """UPDATE reminders SET payload = '{"k": [1, "x", 0]}'
                                 WHERE payload IS NOT NULL""", "public.reminders data",
                         "reminders"),
    "one default": ("", "ALTER TABLE users ALTER COLUMN is_active SET DEFAULT false",
                    "public.users column is_active: default 'true' -> 'false'", None),
    "an index definition": ("", """DROP INDEX ix_tags_user_id;
                                   CREATE INDEX ix_tags_user_id ON tags (user_id DESC)""",
                            "public.tags index ix_tags_user_id: definition", None),
    "a constraint name": ("", """ALTER TABLE journal_entries RENAME CONSTRAINT
                                 journal_entries_mood_check TO journal_entries_mood_range""",
                          "public.journal_entries constraint journal_entries_mood_check: "
                          "missing", None),
    "a column type": ("", "ALTER TABLE tags ALTER COLUMN color TYPE varchar(7)",
                      "public.tags column color: type 'character(7)'", None),
    "nullability": ("", "ALTER TABLE journal_entries ALTER COLUMN title DROP NOT NULL",
                    "public.journal_entries column title: not_null True -> False", None),
    "a constraint not validated": (
        "", """ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_mood_check,
               ADD CONSTRAINT journal_entries_mood_check CHECK (mood BETWEEN 1 AND 5) NOT VALID""",
        "journal_entries_mood_check: validated True -> False", None),
    "a deferrable foreign key": (
        "", "ALTER TABLE tags ALTER CONSTRAINT tags_user_id_fkey DEFERRABLE",
        "public.tags constraint tags_user_id_fkey: deferrable False -> True", None),
    "a trigger added": ("", TOUCH_TRIGGER, "public.users trigger users_touch: added", None),
    "a trigger disabled": (TOUCH_TRIGGER, "ALTER TABLE users DISABLE TRIGGER users_touch",
                           "public.users trigger users_touch: enabled 'O' -> 'D'", None),
    "a table added": ("", "CREATE TABLE notes (id int)", "table public.notes: added", None),
    "a table's comment": ("", "COMMENT ON TABLE users IS 'people'",
                          "public.users comment: None -> 'people'", None),
    "a column's comment": ("", "COMMENT ON COLUMN tags.name IS 'label'",
                           "public.tags comment on column name: None -> 'label'", None),
    "a constraint's comment": ("", "COMMENT ON CONSTRAINT tags_user_id_fkey ON tags IS 'x'",
                               "public.tags comment on constraint tags_user_id_fkey", None),
    "an index's comment": ("", "COMMENT ON INDEX ix_tags_user_id IS 'x'",
                           "public.tags comment on index ix_tags_user_id", None),
    "a grant": ("", "GRANT SELECT ON users TO PUBLIC", "public.users privileges", None),
    "a column's grant": ("", "GRANT UPDATE (email) ON users TO PUBLIC",
                         "public.users privileges on column email", None),
    "a collation": ("", 'ALTER TABLE users ALTER COLUMN email TYPE text COLLATE "C"',
                    "public.users collation of column email: None -> 'C'", None),
    "a statistics target": ("", "ALTER TABLE tags ALTER COLUMN name SET STATISTICS 500",
                            "public.tags statistics target of column name", None),
    "n_distinct": ("", "ALTER TABLE tags ALTER COLUMN name SET (n_distinct = 10)",
                   "public.tags options of column name", None),
    "the replica identity": ("", "ALTER TABLE tags REPLICA IDENTITY FULL",
                             "public.tags replica identity: 'd' -> 'f'", None),
    "row security": ("", "ALTER TABLE tags ENABLE ROW LEVEL SECURITY",
                     "public.tags row security: 'false false' -> 'true false'", None),
    "storage options": ("", "ALTER TABLE tags SET (fillfactor = 80)",
                        "public.tags options: None -> 'fillfactor=80'", None),
    "the CLUSTER mark": ("", "ALTER TABLE tags CLUSTER ON ix_tags_user_id",
                         "public.tags clustered on: None -> 'ix_tags_user_id'", None),
    "a statistics object": ("", "CREATE STATISTICS tags_stats ON user_id, name FROM tags",
                            "public.tags statistics tags_stats: None", None),
    "a publication": ("", "CREATE PUBLICATION fingerprint_pub FOR TABLE tags",
                      "public.tags publication fingerprint_pub: None -> 'all columns'", None),
    "a view": ("CREATE VIEW user_ids AS SELECT id FROM users",
               "CREATE OR REPLACE VIEW user_ids AS SELECT id, email FROM users",
               "relation view public.user_ids", None),
    "a policy": ("", "CREATE POLICY own_tags ON tags USING (name <> 'x')",
                 "relation policy public.tags.own_tags: None", None),
    "a rule": ("", "CREATE RULE keep_tags AS ON DELETE TO tags DO INSTEAD NOTHING",
               "relation rule public.tags.keep_tags: None", None),
}


@pytest.mark.parametrize("name", CHANGES)
def test_a_change_changes_the_fingerprint(conn: Connection, name: str) -> None:
    setup, change, fragment, data_table = CHANGES[name]
    with conn.cursor() as cur:
        if setup:
            cur.execute(setup)
        before = fingerprint(conn)
        cur.execute(change)
        assert cur.rowcount != 0
    after = fingerprint(conn)
    assert after != before
    differences = before.diff(after)
    assert any(fragment in line for line in differences), differences
    changed = {ref for ref in before.data if before.data[ref] != after.data.get(ref)}
    if data_table is None:
        assert changed == set()
    else:
        assert after.schema == before.schema
        assert changed == {("public", data_table)}
        assert after.data[("public", data_table)].rows == before.data[("public", data_table)].rows


# ---------------------------------------------------------------- reading changes nothing


def test_reading_is_read_only_and_leaves_the_session_alone(loaded: str) -> None:
    with connect(loaded) as setup, setup.cursor() as cur:  # types whose output settings change
        cur.execute("""
            CREATE TABLE oddities (f float8, i interval, b bytea, d date);
            INSERT INTO oddities
            VALUES (0.1::float8 + 0.2, '1 day -2 hours', '\\x00ff', '2024-02-29')""")
    setup.close()
    with connect(loaded, readonly=True, autocommit=True) as reader:
        reference = fingerprint(reader)
        assert fingerprint(reader) == reference
        assert reader.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    reader.close()

    session = connect(loaded)
    try:
        with session.cursor() as cur:
            cur.execute("SET TimeZone = 'Asia/Kathmandu'; SET DateStyle = 'SQL, DMY';"
                        " SET search_path = pg_catalog; SET extra_float_digits = -3;"
                        " SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'")
            session.commit()  # settings for the session, which a rollback does not undo
            odd = _settings(cur)
            assert fingerprint(session) == reference

            cur.execute("INSERT INTO public.users (email) VALUES ('new@example.test')")
            seen = fingerprint(session)
            assert session.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            cur.execute("SELECT count(*) FROM public.users")
            assert cur.fetchone() == (len(FIXED.users) + 1,)
            assert seen.schema == reference.schema
            assert seen.data[("public", "users")].rows == len(FIXED.users) + 1

            session.rollback()
            assert fingerprint(session) == reference
            assert _settings(cur) == odd
    finally:
        session.close()

    with connect(loaded, readonly=True) as reader:
        assert fingerprint(reader) == reference
        assert expected_after_migration(reader, KEYS).data != reference.data
    reader.close()


def _settings(cur: psycopg2.extensions.cursor) -> list[tuple[str, str]]:
    cur.execute("SELECT name, setting FROM pg_settings WHERE source = 'session' ORDER BY name")
    return cur.fetchall()


def test_the_tools_bookkeeping_is_left_out_unless_asked(conn: Connection) -> None:
    before = fingerprint(conn)
    with conn.cursor() as cur:
        cur.execute("""
            CREATE TABLE migration_log (id serial PRIMARY KEY, operation text);
            INSERT INTO migration_log (operation) VALUES ('backup_data');
            CREATE SCHEMA migration_backup;
            CREATE TABLE migration_backup.users AS TABLE users;
            CREATE SCHEMA audit;
            CREATE TABLE audit.migration_log (id int);
            CREATE TABLE audit.events (id int)""")
    assert set(fingerprint(conn).schema) == set(before.schema) | {("audit", "events")}
    assert set(fingerprint(conn, include_log=True).schema) == set(before.schema) | {
        ("audit", "events"), ("public", "migration_log"), ("audit", "migration_log")}
    assert set(fingerprint(conn, include_backup=True).schema) == set(before.schema) | {
        ("audit", "events"), ("migration_backup", "users")}
    assert fingerprint(conn, ["public"]) == before


# ---------------------------------------------------------------- expected after migration


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset=datasets())
def test_expected_after_migration_matches_a_migration_by_hand(
    legacy_db: str, dataset: Dataset
) -> None:
    session = connect(legacy_db)
    try:
        load(session, dataset)
        expected = expected_after_migration(session, KEYS, defaults=NEW_DEFAULTS)
        with session.cursor() as cur:
            cur.execute(HAND_MIGRATION)
        got = fingerprint(session)
        assert got == expected, expected.diff(got)
    finally:
        session.rollback()
        session.close()


def test_expected_after_migration_without_new_defaults_keeps_the_legacy_ones(
    conn: Connection,
) -> None:
    expected = expected_after_migration(conn, KEYS)
    users = expected.schema[("public", "users")].columns
    assert users["id"].type == "uuid"
    assert users["id"].default == "(gen_random_uuid())::text"
    assert users["email"] == fingerprint(conn).schema[("public", "users")].columns["email"]


def test_expected_after_migration_refuses_invalid_keys(conn: Connection) -> None:
    bad = dataclasses.replace(FIXED.users[0], id="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
                              email="bad@example.test")
    load(conn, Dataset(users=(bad,), journal_entries=(), tags=(), reminders=()))
    with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
        expected_after_migration(conn, KEYS)
    with conn.cursor() as cur:  # the caller's transaction is still usable
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone() == (len(FIXED.users) + 1,)


def test_expected_after_migration_refuses_unknown_columns(conn: Connection) -> None:
    with pytest.raises(ValueError, match="no such column"):
        expected_after_migration(conn, [("public", "users", "uid")])
    with pytest.raises(ValueError, match="no such column"):
        expected_after_migration(conn, KEYS, schemas=["elsewhere"])


def test_an_expected_fingerprint_leaves_views_policies_and_rules_to_the_round_trip(
        conn: Connection) -> None:
    """Their text may change with the key's type (a carried view prints a cast): a
    fingerprint expected after a migration holds none, and compares without them."""
    with conn.cursor() as cur:
        cur.execute("CREATE VIEW user_ids AS SELECT id FROM users")
    expected = expected_after_migration(conn, [])
    assert expected.relations is None
    actual = fingerprint(conn)
    assert actual.relations is not None
    assert "view public.user_ids" in actual.relations
    assert actual == expected
    assert expected == actual
