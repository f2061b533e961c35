"""Legacy data generated inside the server, for the rehearsal and the benchmark.

``S`` users, ``3S`` journal entries of about 200 bytes, ``S`` tags and ``S``
reminders (one in ten without a user), made with ``generate_series`` so that
loading costs little next to what is measured.  A dirty dataset also plants
the problems the toolkit exists to catch, and says which it planted.
(The test suite's own generated data are hypothesis strategies in tests/.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration.catalog import regclass
from migration.connection import Connection
from migration.model import Table

_CLEAN = """
INSERT INTO {users} (id, email, display_name, is_active, created_at)
SELECT gen_random_uuid()::text, 'user' || g || '@example.com', 'User ' || g, g %% 7 <> 0,
       timestamptz '2024-01-01' + g * interval '1 minute'
FROM generate_series(1, %(n)s) g;
INSERT INTO {journal} (user_id, title, body, mood, created_at)
SELECT u.id, 'Entry ' || k, repeat(md5(u.id || k), 6), 1 + (k %% 5),
       u.created_at + k * interval '1 day'
FROM {users} u CROSS JOIN generate_series(1, 3) k;
INSERT INTO {tags} (user_id, name, color)
SELECT u.id, 'tag', '#00aa00' FROM {users} u;
INSERT INTO {reminders} (user_id, remind_at, note, payload)
SELECT CASE WHEN row_number() OVER () %% 10 = 0 THEN NULL ELSE u.id END,
       u.created_at + interval '1 week', 'call back', jsonb_build_object('n', 1)
FROM {users} u;
ANALYZE {users}; ANALYZE {journal}; ANALYZE {tags}; ANALYZE {reminders};
"""


@dataclass
class Planted:
    """What a dirty dataset holds on purpose, to compare with what validate_schema finds."""

    invalid_ids: list[str] = field(default_factory=list)
    colliding_ids: list[str] = field(default_factory=list)
    non_canonical_ids: list[str] = field(default_factory=list)
    orphans: dict[str, list[str]] = field(default_factory=dict)
    """The orphans planted in each child column, by its name (schema.table.column), or by its
    table's where the table has one key column (the runbook's)."""


def seed(conn: Connection, users: int, *, schema: str = "public", dirty: bool = False) -> Planted:
    """Fill the legacy tables (empty) of ``schema``; plant problems when ``dirty``."""
    names = {
        "users": Table(schema, "users").ident, "journal": Table(schema, "journal_entries").ident,
        "tags": Table(schema, "tags").ident, "reminders": Table(schema, "reminders").ident,
    }
    planted = Planted()
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL(_CLEAN).format(**names), {"n": users})
        if dirty:
            _plant(cur, names, planted, schema)
    return planted


def _plant(cur: Cursor, names: dict[str, sql.Identifier], planted: Planted, schema: str) -> None:
    planted.invalid_ids = ["not-a-uuid", "1234", "0f8fad5b-d9cb-469f-a165-70867728950z"]
    cur.execute(sql.SQL("INSERT INTO {} (id, email) SELECT v, 'bad' || v || '@example.com' "
                        "FROM unnest(%s::text[]) v").format(names["users"]),
                (planted.invalid_ids,))
    cur.execute(sql.SQL("SELECT id FROM {} WHERE id ~ '^[0-9a-f-]{{36}}$' ORDER BY id "
                        "LIMIT 5").format(names["users"]))
    sample = [row[0] for row in cur.fetchall()]
    # The same UUID a second time, uppercase: two users that are one once converted.
    planted.colliding_ids = [sample[0], sample[0].upper()]
    cur.execute(sql.SQL("INSERT INTO {} (id, email) VALUES (%s, 'twin@example.com')").format(
        names["users"]), (sample[0].upper(),))
    # Accepted by the uuid type but not canonical (braces would not fit in 36 characters).
    respelled = [sample[1].replace("-", ""), sample[2].upper(),
                 sample[3][:18].upper() + sample[3][18:]]
    for old, new in zip(sample[1:4], respelled, strict=True):
        _respell_user(cur, names, old, new)
    planted.non_canonical_ids = [sample[0].upper(), *respelled]
    for table in ("tags", "reminders"):
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f' "
                    "AND conrelid = to_regclass(%s))",
                    (regclass(Table(schema, table)),))
        has_fk = (cur.fetchone() or [True])[0]
        if not has_fk:
            orphan = "00000000-0000-4000-8000-00000000000" + ("1" if table == "tags" else "2")
            cur.execute(sql.SQL("UPDATE {} SET user_id = %s WHERE id = "
                                "(SELECT min(id) FROM {})").format(names[table], names[table]),
                        (orphan,))
            planted.orphans[table] = [orphan]


def _respell_user(cur: Cursor, names: dict[str, sql.Identifier], old: str, new: str) -> None:
    """Change a user's id spelling and its children's with it (the FKs have no ON UPDATE)."""
    cur.execute(sql.SQL("INSERT INTO {u} (id, email, display_name, is_active, created_at) "
                        "SELECT %s, email || '.new', display_name, is_active, created_at "
                        "FROM {u} WHERE id = %s").format(u=names["users"]), (new, old))
    for table in ("journal", "tags", "reminders"):
        cur.execute(sql.SQL("UPDATE {} SET user_id = %s WHERE user_id = %s").format(
            names[table]), (new, old))
    cur.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(names["users"]), (old,))
