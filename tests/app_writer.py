"""The application, for tests: a writer on its own connection, and the twin that judges it.

The writer runs :class:`tests.strategies.AppWrite` lists, each write in a transaction of
its own, as the application role (``APP_ROLE``: SELECT, INSERT, UPDATE, DELETE and
TRUNCATE on the tables, no more, and ``SET`` on ``session_replication_role``, granted by
the test server's superuser: ``GRANT SET ON PARAMETER``, PostgreSQL 15 and later), and
keeps a ledger of what committed and what was refused (the SQLSTATE).

Its oracle is a twin: a clone of the same template that no migration touches, given the
same writes in the same order.  Whatever the twin accepts, the migrating database must
accept, with the same rows affected, and both must end with equal data.  The twin has the
key type the application sees on the migrating side at that moment: when the migration's
swap has made the keys uuid, the twin's are converted by hand, in one transaction (the
one-shot ``ALTER COLUMN ... TYPE``, ``bench.methods.one_shot``), and back the same way
when the rollback's swap has made them strings again.  A key value names a row by its
UUID: each database resolves a :class:`KeyPick` against its own keys, spelled as it
holds them.  Converted back, the twin's ids take the spellings they had at first, as a
rollback gives them back from its backup.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from bench.methods import one_shot
from migration import catalog
from migration.connection import Connection, connect
from migration.model import UUID_INPUT, KeyColumn, Table
from migration.plan import build_plan
from migration.rehearsal.sandbox import Sandbox, with_credentials
from tests.strategies import AppWrite, KeyPick, app_writes, spell

APP_ROLE = "uuidmig_app"
SYSTEM_USER = "00000000-0000-4000-8000-000000000001"
"""The user ``notes.user_id`` falls back to (ON DELETE SET DEFAULT)."""
WRITTEN_AT = "2030-06-01 12:00:00+00"
"""The creation time of the rows the application writes (the same on both sides)."""
NOWHERE = "00000000-0000-0000-0000-000000000000"
"""A key no row has: what an ``existing`` pick of an empty table, or a ``default`` one
used to find a row, resolves to."""

APP_SCHEMA = f"""
CREATE TABLE notes (
    id      varchar(36) PRIMARY KEY DEFAULT gen_random_uuid()::text,
    user_id varchar(36) DEFAULT '{SYSTEM_USER}'
            CONSTRAINT notes_user_id_fkey REFERENCES users (id) ON DELETE SET DEFAULT,
    body    text);
CREATE TABLE memberships (
    user_id varchar(36) CONSTRAINT memberships_user_id_fkey
            REFERENCES users (id) ON DELETE RESTRICT,
    role    text NOT NULL);
"""
"""Added to the legacy schema: an ON DELETE SET DEFAULT child and a RESTRICT child
without a primary key, whose ``user_id`` may be NULL."""
APP_DATA = f"""
INSERT INTO users (id, email) VALUES ('{SYSTEM_USER}', 'system@example.test');
INSERT INTO users (id, email)
SELECT upper(gen_random_uuid()::text), 'upper' || g || '@example.test'
FROM generate_series(1, 8) g;
INSERT INTO journal_entries (user_id, title)
SELECT id, 'upper' FROM users WHERE id <> lower(id);
INSERT INTO reminders (user_id, remind_at)
SELECT id, '2030-01-01' FROM users WHERE id <> lower(id);
INSERT INTO notes (user_id, body) SELECT id, 'note of ' || email FROM users;
INSERT INTO memberships (user_id, role) SELECT id, 'member' FROM users WHERE id = lower(id);
INSERT INTO memberships (user_id, role) VALUES (NULL, 'nobody'), (NULL, 'nobody');
"""
"""Upper-case users (so that a rollback has spellings to give back), and rows in the new
tables, two of them identical (nothing tells them apart but their place).  The seeded
users have tags and memberships, so deleting one is refused (NO ACTION, RESTRICT); the
upper-case ones have none: deleting one cascades, sets NULL and sets the default."""


@dataclass(frozen=True)
class AppTable:
    name: str
    key: str | None  # its primary key; None: it has none, rows are found by user_id
    reference: str | None  # its column referring to users.id
    value: str  # a plain text column the writes change
    extra: tuple[tuple[str, str], ...] = ()  # NOT NULL columns and the text an insert gives
    unique: tuple[str, ...] = ()  # a unique constraint over its reference: an upsert's arbiter


TABLES = (
    AppTable("users", "id", None, "display_name"),  # email: made unique per write
    AppTable("journal_entries", "id", "user_id", "title"),
    AppTable("tags", "id", "user_id", "name", unique=("user_id", "name")),
    AppTable("reminders", "id", "user_id", "note", (("remind_at", "2030-01-01 00:00+00"),)),
    AppTable("notes", "id", "user_id", "body"),
    AppTable("memberships", None, "user_id", "role"),
)
BY_NAME = {table.name: table for table in TABLES}

ALL_COLUMNS = {
    "users": ("id", "email", "display_name", "is_active", "created_at"),
    "journal_entries": ("id", "user_id", "title", "body", "mood", "created_at"),
    "tags": ("id", "user_id", "name", "color"),
    "reminders": ("id", "user_id", "remind_at", "note", "payload", "done"),
    "notes": ("id", "user_id", "body"),
    "memberships": ("user_id", "role"),
}
"""Every column of the application's tables, as the application knows them (the
engine's copies left out)."""


def writes_to(tables: Sequence[AppTable], *, excluded: Collection[str] = (),
              max_size: int = 6) -> st.SearchStrategy[list[AppWrite]]:
    """``strategies.app_writes`` over these tables (the parent first)."""
    return app_writes(tables=[t.name for t in tables], keyed=[t.name for t in tables if t.key],
                      children=[t.name for t in tables if t.reference], excluded=excluded,
                      max_size=max_size)


_UUID = re.compile(r"(\{)?[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}(?(1)\})")
"""PostgreSQL's uuid input (see tests/strategies.py): balanced braces, 32 hex digits, at
most one hyphen after any group of four but the last."""


def canonical(text: str | None) -> str | None:
    """The canonical spelling of the UUID ``text`` spells; any other string as it is."""
    if text is None or not _UUID.fullmatch(text):
        return text
    digits = re.sub(r"[{}-]", "", text).lower()
    return spell(int(digits, 16))


@dataclass(frozen=True)
class Outcome:
    """What one write did: its SQLSTATE when refused, else the rows it touched."""

    write: str
    sqlstate: str | None
    rows: int
    generated: str | None = None  # the key the column's default gave, if any

    def __str__(self) -> str:
        return f"{self.write}: {self.sqlstate or 'ok'} ({self.rows} rows)"


def ensure_app_role(sandbox: Sandbox, password: str) -> None:
    """The application's role, with the right to SET session_replication_role."""
    sandbox.admin_execute(sql.SQL(
        "DO $$BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END$$;"
        "ALTER ROLE {role} LOGIN NOSUPERUSER PASSWORD {pw};"
        "GRANT SET ON PARAMETER session_replication_role TO {role}"
    ).format(role=sql.Identifier(APP_ROLE), pw=sql.Literal(password)))


def app_dsn(sandbox: Sandbox, password: str, dbname: str) -> str:
    return with_credentials(sandbox.admin_dsn, user=APP_ROLE, password=password,
                            dbname=dbname)


def build_template(owner_dsn: str) -> None:
    """The application's tables and rows, on a seeded legacy database, and the
    application role's rights on them (run as the owner)."""
    with _connection(owner_dsn) as conn, conn, conn.cursor() as cur:
        cur.execute(APP_SCHEMA + APP_DATA)
    grant_app_role(owner_dsn)


def grant_app_role(owner_dsn: str) -> None:
    """The application role's rights on every table of ``public`` (run as the owner)."""
    with _connection(owner_dsn) as conn, conn, conn.cursor() as cur:
        cur.execute(sql.SQL(
            "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public "
            "TO {}").format(sql.Identifier(APP_ROLE)))


# ---------------------------------------------------------------- the writer

Keys = list[tuple[str, str]]
"""A table's keys: (canonical UUID, spelling held), in UUID order."""


class Writer:
    """The application on its own connection: runs writes, one transaction each."""

    def __init__(self, dsn: str, tables: Sequence[AppTable] = TABLES) -> None:
        self.tables = tables  # those the database has
        self.conn = connect(dsn, application_name="uuidmig application writer")
        self.count = 0  # writes run so far: makes each new user's email unique
        self.generated: str | None = None  # the key the twin is to take from a default
        self.returned: str | None = None  # the key this database's default gave
        with self.conn.cursor() as cur:
            cur.execute("SET statement_timeout = '60s'")  # a write blocked for good fails
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def run(self, writes: Sequence[AppWrite],
            generated: Sequence[str | None] | None = None, *, fix: bool = True
            ) -> list[Outcome]:
        """Each write, then (``fix``) the removal of every invalid key the writes used (the
        application fixes its mistakes): the ledger of all of them.

        ``generated``: for each write, the key another database's default gave it, to be
        written here instead of this one's (random) default.
        """
        given = list(generated or [None] * len(writes))
        ledger = [self._one(write, key) for write, key in zip(writes, given, strict=True)]
        invalid = sorted({pick.text for write in writes for pick in (write.key, write.ref)
                          if pick.source == "invalid"})
        if invalid and fix:
            ledger.append(self.clean_up(invalid))
        return ledger

    def clean_up(self, invalid: list[str]) -> Outcome:
        """Delete the rows that hold one of the keys ``invalid`` (``_clean_up``)."""
        return self._transaction("clean up invalid keys",
                                 lambda cur: self._clean_up(cur, invalid))

    def _one(self, write: AppWrite, generated: str | None) -> Outcome:
        self.count += 1
        self.generated = generated
        name = f"{write.label} {write.table} key={_show(write.key)} ref={_show(write.ref)}"
        if write.kind == "copy":
            return self._transaction(name, lambda cur: self._copy(cur, write))
        if not write.replica:
            return self._transaction(name, lambda cur: self._statement(cur, write))

        def replica(cur: Cursor) -> int:
            # Only what the constraints accept is replayed in replica mode, which checks
            # none: tried first as it is, then undone and done again as a replica.
            cur.execute("SAVEPOINT as_is")
            self._statement(cur, write)
            cur.execute("ROLLBACK TO SAVEPOINT as_is")
            cur.execute("SET LOCAL session_replication_role = replica")
            return self._statement(cur, write)

        return self._transaction(name, replica)

    def _transaction(self, name: str, work: Callable[[Cursor], int]) -> Outcome:
        self.returned = None
        try:
            with self.conn.cursor() as cur:
                rows = work(cur)
            self.conn.commit()
            return Outcome(name, None, int(rows), self.returned)
        except psycopg2.Error as exc:
            self.conn.rollback()
            return Outcome(name, exc.pgcode, 0)

    # -- key values

    def _keys(self, cur: Cursor, table: str, column: str) -> Keys:
        cur.execute(sql.SQL("SELECT DISTINCT {c}::text FROM {t} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(column), t=sql.Identifier(table)))
        held = [(canonical(text), text) for (text,) in cur.fetchall()]
        return sorted((str(value), text) for value, text in held if value != text or
                      _UUID.fullmatch(text))

    def _value(self, pick: KeyPick, keys: Keys) -> str | None:
        """The text a pick means in this database; None for NULL."""
        match pick.source:
            case "null":
                return None
            case "new" | "invalid":
                return pick.text
            case "default":
                return NOWHERE
        if not keys:
            return NOWHERE
        value, held = keys[pick.index % len(keys)]
        if pick.source == "existing":
            return held
        bits = int(value.replace("-", ""), 16)
        for text in (spell(bits, hyphens=pick.hyphens, braces=pick.braces, upper=pick.upper),
                     spell(bits, hyphens=(), braces=True), value.upper(), value):
            if text != held:
                return text
        raise AssertionError("unreachable: the spellings above are all different")

    def _row_keys(self, cur: Cursor, table: AppTable) -> Keys:
        return self._keys(cur, table.name, table.key or table.reference or "")

    # -- statements

    def _insert_values(self, cur: Cursor, write: AppWrite, table: AppTable
                       ) -> tuple[list[str], list[object]]:
        columns: list[str] = []
        values: list[object] = []
        users = self._keys(cur, "users", "id")
        if table.key and write.key.source == "default" and self.generated is not None:
            columns.append(table.key)
            values.append(self.generated)
        elif table.key and write.key.source != "default":
            columns.append(table.key)
            values.append(self._value(write.key, self._row_keys(cur, table)))
        if table.reference and write.ref.source != "default":
            columns.append(table.reference)
            values.append(self._value(write.ref, users))
        columns.append(table.value)
        values.append(write.text)
        if table.name == "users":
            columns.append("email")
            values.append(f"app{self.count}@example.test")
        if table.name in ("users", "journal_entries"):  # not now(): both sides the same
            columns.append("created_at")
            values.append(WRITTEN_AT)
        for name, text in table.extra:
            columns.append(name)
            values.append(text)
        return columns, values

    def _statement(self, cur: Cursor, write: AppWrite) -> int:
        """The write's statement; the rows it touched."""
        table = BY_NAME[write.table]
        ident = sql.Identifier(table.name)
        found = table.key or table.reference or ""
        # A table without a key is searched the way its rows can be told apart: NULL too.
        equal = sql.SQL("{} = %s" if table.key else "{} IS NOT DISTINCT FROM %s").format(
            sql.Identifier(found))
        row = self._value(write.key, self._row_keys(cur, table))
        users = self._keys(cur, "users", "id")
        match write.kind:
            case "insert" | "upsert":
                columns, values = self._insert_values(cur, write, table)
                statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    ident, sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(sql.Placeholder() * len(values)))
                if write.kind == "upsert" and table.key in columns:
                    changed = [c for c in columns if c != table.key]
                    statement += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                        sql.Identifier(table.key or ""), sql.SQL(", ").join(
                            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                            for c in changed))
                elif write.kind == "upsert" and table.unique:  # its child key's index
                    statement += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {v} = EXCLUDED.{v}"
                                         ).format(sql.SQL(", ").join(map(sql.Identifier,
                                                                         table.unique)),
                                                  v=sql.Identifier(table.value))
                elif write.kind == "upsert":
                    statement += sql.SQL(" ON CONFLICT DO NOTHING")
                if table.key:
                    statement += sql.SQL(" RETURNING {}::text").format(
                        sql.Identifier(table.key))
                cur.execute(statement, values)
                self._returned(cur, write.key)
            case "update":
                cur.execute(sql.SQL("UPDATE {} SET {} = %s WHERE {}").format(
                    ident, sql.Identifier(table.value), equal), (write.text, row))
            case "update_key" | "update_ref":
                column = table.key if write.kind == "update_key" and table.key else found
                source = table.key if column == table.key else table.reference
                assert source is not None
                picks = self._row_keys(cur, table) if source == table.key else users
                if write.ref.source != "default":
                    new: sql.Composable = sql.Literal(self._value(write.ref, picks))
                else:
                    new = (sql.SQL("DEFAULT") if self.generated is None
                           else sql.Literal(self.generated))
                cur.execute(sql.SQL("UPDATE {} SET {c} = {} WHERE {} RETURNING {c}::text").format(
                    ident, new, equal, c=sql.Identifier(column)), (row,))
                self._returned(cur, write.ref)
            case "delete":
                cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(ident, equal), (row,))
            case "truncate":
                cur.execute(sql.SQL("TRUNCATE {}").format(ident))
            case "orm_update":
                every = ALL_COLUMNS[table.name]
                cur.execute(sql.SQL("SELECT {} FROM {} WHERE {}").format(
                    sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c))
                                       for c in every), ident, equal), (row,))
                current = cur.fetchone()
                if current is None:
                    return 0
                values = [write.text if c == table.value else v
                          for c, v in zip(every, current, strict=True)]
                cur.execute(sql.SQL("UPDATE {} SET {} WHERE {}").format(
                    ident, sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c))
                                              for c in every), equal), (*values, row))
            case _:
                raise ValueError(f"no such write: {write.kind}")
        return max(cur.rowcount, 0)

    def _returned(self, cur: Cursor, pick: KeyPick) -> None:
        """Keep the key a default gave (RETURNING), for the twin to write the same."""
        rows = cur.fetchall()
        if pick.source == "default" and len(rows) == 1:
            self.returned = rows[0][0]

    def _copy(self, cur: Cursor, write: AppWrite) -> int:
        table = BY_NAME[write.table]
        columns, values = self._insert_values(cur, write, table)
        line = ",".join("" if v is None else '"' + str(v).replace('"', '""') + '"'
                        for v in values)
        cur.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
            sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
        ).as_string(cur), io.StringIO(line + "\n"))
        return max(cur.rowcount, 0)

    def _clean_up(self, cur: Cursor, invalid: list[str]) -> int:
        """Delete every row a key column of which holds one of ``invalid`` (as text, so
        that the statement runs on uuid columns too), children first."""
        rows = 0
        for table in reversed(self.tables):
            checks = [sql.SQL("{}::text = ANY (%s)").format(sql.Identifier(c))
                      for c in (table.key, table.reference) if c]
            cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
                sql.Identifier(table.name), sql.SQL(" OR ").join(checks)),
                [invalid] * len(checks))
            rows += cur.rowcount
        return rows


def _show(pick: KeyPick) -> str:
    return f"{pick.source}({pick.text!r})" if pick.text else pick.source


# ---------------------------------------------------------------- the twin and the data


def key_type(dsn: str) -> str:
    """The type of ``users.id``."""
    with _connection(dsn) as conn:
        info = catalog.column_info(conn, Table("public", "users"), "id")
    assert info is not None
    return info.type


class Twin:
    """The untouched clone: the same writes, no migration; its keys take the type the
    migrating side's have, converted by hand when that side swaps."""

    def __init__(self, owner_dsn: str, application_dsn: str,
                 tables: Sequence[AppTable] = TABLES) -> None:
        self.dsn = owner_dsn
        self.writer = Writer(application_dsn, tables)
        with _connection(owner_dsn) as conn:
            plan = build_plan(conn)
            self.columns = {key: catalog.column_info(conn, key.table, key.column)
                            for key in plan.columns}
            with conn.cursor() as cur:
                cur.execute("SELECT id::uuid, id FROM users WHERE id::uuid::text <> id")
                self.spellings = cur.fetchall()
            conn.rollback()
        """The users' ids spelled otherwise than canonically, as the twin first holds them:
        what a rollback gives back (from its backup) to the rows whose UUID they spell."""

    def close(self) -> None:
        self.writer.close()

    def follow(self, migrating_dsn: str) -> None:
        """Give the keys the type they have on the migrating side, if they have not."""
        wanted, held = key_type(migrating_dsn), key_type(self.dsn)
        if wanted == held:
            return
        if wanted == "uuid":
            one_shot(self.dsn)
        else:
            self._back_to_strings()

    def _back_to_strings(self) -> None:
        """The one-shot conversion backwards: every key column back to its type and default,
        the ids that were spelled otherwise spelled so again, the foreign keys dropped and
        added again around it all, in one transaction."""
        with _connection(self.dsn) as conn, conn, conn.cursor() as cur:
            cur.execute("SET LOCAL search_path = pg_catalog, pg_temp")
            parent = KeyColumn(Table("public", "users"), "id")
            foreign_keys = catalog.foreign_keys_to(conn, parent)
            for fk in foreign_keys:
                cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    fk.table.ident, sql.Identifier(fk.name)))
            for key, info in self.columns.items():
                assert info is not None
                column = sql.Identifier(key.column)
                cur.execute(sql.SQL("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT, "
                                    "ALTER COLUMN {c} TYPE {type} USING {c}::text").format(
                    t=key.table.ident, c=column, type=sql.SQL(info.type)))
                if info.default is not None:
                    cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                        key.table.ident, column, sql.SQL(info.default)))
            cur.execute("CREATE TEMPORARY TABLE spellings (value uuid PRIMARY KEY, "
                        "spelled text NOT NULL) ON COMMIT DROP")
            cur.executemany("INSERT INTO spellings VALUES (%s, %s)", self.spellings)
            for key in self.columns:
                cur.execute(sql.SQL("UPDATE {t} SET {c} = s.spelled FROM spellings s "
                                    "WHERE {c} = s.value::text").format(
                    t=key.table.ident, c=sql.Identifier(key.column)))
            for fk in foreign_keys:
                cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    fk.table.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))


def write_both(writer: Writer, twin: Twin, migrating_dsn: str, writes: Sequence[AppWrite],
               *, fix: bool = True) -> tuple[list[str], list[Outcome]]:
    """The writes on the migrating side (``writer``'s) and on the twin, once the twin's
    keys have the type the migrating side's have: each write that ended otherwise than on
    the twin, as a line, and the twin's ledger.  ``fix``: ``Writer.run``'s."""
    twin.follow(migrating_dsn)
    ours = writer.run(writes, fix=fix)
    theirs = twin.writer.run(writes, [done.generated for done in ours[:len(writes)]], fix=fix)
    return ([f"{mine} (no migration: {other.sqlstate or 'ok'}, {other.rows} rows)"
             for mine, other in zip(ours, theirs, strict=True)
             if (mine.sqlstate, mine.rows) != (other.sqlstate, other.rows)], theirs)


@contextmanager
def _connection(dsn: str) -> Iterator[Connection]:
    conn = connect(dsn)
    try:
        yield conn
    finally:
        conn.close()


def not_uuids(dsn: str, tables: Sequence[AppTable] = TABLES) -> list[str]:
    """The values of the migration's key columns (``users.id``, and each ``user_id``,
    which refers to it) that are not UUIDs: rows the application wrote and left."""
    found: set[str] = set()
    with _connection(dsn) as conn, conn.cursor() as cur:
        for table in tables:
            for column in ("id" if table.name == "users" else None, table.reference):
                if column is not None:
                    cur.execute(sql.SQL("SELECT {c}::text FROM {t} WHERE {c}::text !~ %s").format(
                        c=sql.Identifier(column), t=sql.Identifier(table.name)), (UUID_INPUT,))
                    found |= {text for (text,) in cur.fetchall()}
        conn.rollback()
    return sorted(found)


def table_values(dsn: str) -> dict[str, list[tuple[str | None, ...]]]:
    """Every row of the application's tables as text, sorted (the engine's columns left
    out).  Keys compare as spelled: the twin's have the type the migrating side's have,
    and the spellings a rollback gives back."""
    out = {}
    with _connection(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        for table, columns in ALL_COLUMNS.items():
            cur.execute(sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c))
                                   for c in columns), sql.Identifier(table)))
            out[table] = sorted(cur.fetchall(),
                                key=lambda row: [(v is None, v or "") for v in row])
        conn.rollback()
    return out


def value_diff(expected: dict[str, list[tuple[str | None, ...]]],
               found: dict[str, list[tuple[str | None, ...]]]) -> list[str]:
    """The rows only one side has, table by table, a few each."""
    lines = []
    for table in expected:
        missing = sorted(set(expected[table]) - set(found[table]), key=str)
        extra = sorted(set(found[table]) - set(expected[table]), key=str)
        if missing or extra or len(expected[table]) != len(found[table]):
            lines.append(f"{table}: {len(expected[table])} rows expected, "
                         f"{len(found[table])} found; missing {missing[:3]}; extra {extra[:3]}")
    return lines
