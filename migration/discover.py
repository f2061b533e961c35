"""``validate_schema --discover``: which string columns of the database hold only UUIDs.

It lists every ``text``, ``varchar`` or ``char`` column, in every schema but
the system's and the engine's backups, that holds at least one value and only
values PostgreSQL accepts as a uuid, with its row counts, whether a primary key
or unique constraint is on it, the foreign keys between such columns, and the
``--key`` to pass for each one that can be a parent key.  A sample of each
column is read first; only a column whose sample is all UUIDs is read whole.
It changes nothing: one transaction, rolled back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import click
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration.catalog import regclass
from migration.connection import ConnectError, connected, redact_dsn
from migration.model import BACKUP_SCHEMA, BACKUP_SCHEMA_LIKE, KeyColumn, Table
from migration.sqlexpr import as_cast_reads, is_uuid, prepare_uuid_checker

SAMPLE_ROWS = 100
EXIT_OK, EXIT_ERROR = 0, 2

_STRING_COLUMNS = """
    SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND a.attnum > 0 AND NOT a.attisdropped
      AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)
      AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%'
      AND n.nspname <> %(backup)s AND n.nspname NOT LIKE %(backup_like)s
    ORDER BY 1, 2, a.attnum
"""

# Each column pair of each foreign key (a composite one gives one pair per column).
_FOREIGN_KEYS = """
    SELECT n.nspname, c.relname, a.attname, rn.nspname, r.relname, ra.attname, k.conname
    FROM pg_constraint k
    CROSS JOIN LATERAL unnest(k.conkey, k.confkey) AS p(attnum, refnum)
    JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = p.attnum
    JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
    JOIN pg_attribute ra ON ra.attrelid = k.confrelid AND ra.attnum = p.refnum
    WHERE k.contype = 'f' AND k.conparentid = 0
    ORDER BY 1, 2, 7
"""

# 'p' or 'u' for a primary key or unique index on the column alone, NULL for none.
_UNIQUE = """
    SELECT CASE WHEN bool_or(i.indisprimary) THEN 'p' WHEN bool_or(i.indisunique) THEN 'u' END
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass(%s) AND a.attname = %s AND i.indisunique
      AND i.indnkeyatts = 1 AND i.indpred IS NULL
"""


@dataclass
class Candidate:
    """A string column holding only UUIDs."""

    column: str  # as --key spells it
    type: str
    rows: int  # rows of the table
    values: int  # non-null values of the column
    constraint: str | None  # "primary key", "unique" or None
    references: list[str] = field(default_factory=list)  # candidates it refers to
    referenced_by: list[str] = field(default_factory=list)  # candidates referring to it

    @property
    def key_option(self) -> str | None:
        """The ``--key`` that migrates this column as a parent key, if it can be one."""
        return f"--key {self.column}" if self.constraint or self.referenced_by else None


@dataclass(frozen=True)
class Reference:
    column: str
    refers_to: str
    constraint: str


@dataclass(frozen=True)
class Discovery:
    columns: list[Candidate]
    foreign_keys: list[Reference]


def holds_only_uuids(cur: Cursor, key: KeyColumn, *,
                     padded: bool = False) -> tuple[int, int] | None:
    """(rows, non-null values) of a column with at least one value, all UUIDs; else None.

    A sample of the first values read decides first: a column of names or
    codes is never read whole.  ``padded``: a ``char(n)`` column, whose values
    are read with their padding, as the migration's cast reads them.
    """
    value = sql.Identifier(key.column)
    test = is_uuid(cur.connection, as_cast_reads(value, padded=True) if padded
                   else sql.SQL("{}::text").format(value))
    cur.execute(sql.SQL("SELECT count(*), coalesce(bool_and({test}), false) FROM "
                        "(SELECT {v} FROM {t} WHERE {v} IS NOT NULL LIMIT %s) s").format(
        test=test, v=value, t=key.table.ident), (SAMPLE_ROWS,))
    sampled, all_uuids = cur.fetchone() or (0, False)
    if not sampled or not all_uuids:
        return None
    cur.execute(sql.SQL("SELECT count(*), count({v}), count(*) FILTER (WHERE {v} IS NOT NULL "
                        "AND NOT {test}) FROM {t}").format(
        v=value, test=test, t=key.table.ident))
    rows, values, invalid = cur.fetchone() or (0, 0, 1)
    return None if invalid else (int(rows), int(values))


def discover(cur: Cursor) -> Discovery:
    """Read the catalog and the candidate columns' data (no write)."""
    prepare_uuid_checker(cur)
    cur.execute(_STRING_COLUMNS, {"backup": BACKUP_SCHEMA, "backup_like": BACKUP_SCHEMA_LIKE})
    found: dict[tuple[str, str, str], Candidate] = {}
    for schema, table, column, type_name in cur.fetchall():
        key = KeyColumn(Table(schema, table), column)
        counts = holds_only_uuids(cur, key, padded=type_name.startswith("character("))
        if counts is None:
            continue
        cur.execute(_UNIQUE, (regclass(key.table), column))
        kind = (cur.fetchone() or [None])[0]
        found[(schema, table, column)] = Candidate(
            key.spec, type_name, *counts,
            {"p": "primary key", "u": "unique"}.get(kind or ""))
    cur.execute(_FOREIGN_KEYS)
    references = []
    for schema, table, column, ref_schema, ref_table, ref_column, name in cur.fetchall():
        child, parent = found.get((schema, table, column)), found.get(
            (ref_schema, ref_table, ref_column))
        if child is None or parent is None:
            continue
        child.references.append(parent.column)
        parent.referenced_by.append(child.column)
        references.append(Reference(child.column, parent.column, name))
    return Discovery(list(found.values()), references)


def as_json(found: Discovery) -> dict[str, Any]:
    return {"columns": [{**asdict(c), "key_option": c.key_option} for c in found.columns],
            "foreign_keys": [asdict(r) for r in found.foreign_keys]}


def render(found: Discovery) -> str:
    if not found.columns:
        return "no string column holding only UUIDs was found"
    header = ("column", "type", "rows", "values", "constraint", "refers to", "--key to pass")
    rows = [(c.column, c.type, f"{c.rows:,}", f"{c.values:,}", c.constraint or "-",
             ", ".join(c.references) or "-", c.key_option or "-") for c in found.columns]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [f"{len(found.columns)} string column(s) holding only UUIDs:", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in (header, tuple("-" * w for w in widths), *rows)]
    lines += ["", f"foreign keys between them ({len(found.foreign_keys)}):"]
    lines += [f"  {r.column} -> {r.refers_to} ({r.constraint})" for r in found.foreign_keys]
    return "\n".join(lines)


def discover_command(dsn: str, fmt: str) -> int:
    """``validate_schema --discover``: print what was found; the exit code."""
    try:
        with connected(dsn) as conn, conn.cursor() as cur:
            cur.execute("SET LOCAL search_path = pg_catalog, pg_temp")
            found = discover(cur)
            conn.rollback()
    except ConnectError as exc:
        click.echo(f"error: {redact_dsn(str(exc)).strip()}", err=True)
        return EXIT_ERROR
    click.echo(json.dumps(as_json(found), indent=2) if fmt == "json" else render(found))
    return EXIT_OK
