"""Fingerprints of a database: the shape and the data of its tables, to prove what a change kept.

Everything is keyed by name, never by position: the migration's
temporary-column swap moves a converted column to the end of its table, a
documented and accepted difference.  Rows enter the data digest with their
columns in name order.

The data digest of a table is a multiset hash: the sum of the md5 of every
row's text form, so it needs no ordering.  Ordering by primary key would not
do: converting text keys to uuid changes their order (``'B...'`` sorts before
``'a...'`` as text, after it as uuid), and a table need not have a key.

Reading is read-only: it works in a read-only transaction, and it leaves
the session's settings and transaction as it found them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

TableRef = tuple[str, str]
"""(schema, table)"""
ColumnRef = tuple[str, str, str]
"""(schema, table, column)"""

LOG_TABLE = "migration_log"
BACKUP_SCHEMA = "migration_backup"
BACKUP_SCHEMA_LIKE = r"migration\_backup\_%"
"""Every backup schema: the runbook key's ``migration_backup`` and another key's
``migration_backup_<schema>_<table>_<column>``; all are left out alike."""
CHANGE_LOG_FUNCTION = "log_change"
"""The function of each backup schema that the triggers calling it, on the migrated
tables, run.  They belong to the backup: they
log the application's writes while the backup exists and go with it.  Like the
rest of the backup they are left out of a fingerprint unless asked for, so
that a table compares equal before the backup and after a rollback that keeps
the backup.  This is the one place they are excluded."""

# Output of dates, numbers and names depends on these; they are set for the
# reading only (SET LOCAL in a transaction or savepoint of its own).
_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "search_path": "",  # every name in definitions comes schema-qualified
}

_CONSTRAINT_TYPES = {
    "c": "check", "f": "foreign key", "n": "not null", "p": "primary key",
    "t": "trigger", "u": "unique", "x": "exclusion",
}


@dataclass(frozen=True)
class Column:
    type: str
    not_null: bool
    default: str | None


@dataclass(frozen=True)
class Constraint:
    type: str
    definition: str
    validated: bool
    deferrable: bool
    deferred: bool


@dataclass(frozen=True)
class Index:
    definition: str
    valid: bool


@dataclass(frozen=True)
class Trigger:
    definition: str
    enabled: str
    """pg_trigger.tgenabled: O (origin), D (disabled), R (replica), A (always)."""


@dataclass(frozen=True)
class Shape:
    """A table's definition, each part keyed by name."""

    columns: Mapping[str, Column]
    constraints: Mapping[str, Constraint]
    indexes: Mapping[str, Index]
    triggers: Mapping[str, Trigger]


@dataclass(frozen=True)
class Data:
    rows: int
    digest: str


@dataclass(frozen=True)
class Fingerprint:
    schema: Mapping[TableRef, Shape]
    data: Mapping[TableRef, Data]

    def diff(self, other: Fingerprint) -> list[str]:
        """What differs from ``self`` to ``other``, one line each, for assertion messages."""
        lines = []
        for ref in sorted(self.schema.keys() | other.schema.keys()):
            name = ".".join(ref)
            old, new = self.schema.get(ref), other.schema.get(ref)
            if old is None or new is None:
                lines.append(f"table {name}: {'added' if old is None else 'missing'}")
                continue
            lines += _diff_named(f"{name} column", old.columns, new.columns)
            lines += _diff_named(f"{name} constraint", old.constraints, new.constraints)
            lines += _diff_named(f"{name} index", old.indexes, new.indexes)
            lines += _diff_named(f"{name} trigger", old.triggers, new.triggers)
        for ref in sorted(self.data.keys() & other.data.keys()):
            before, after = self.data[ref], other.data[ref]
            if before != after:
                lines.append(f"{'.'.join(ref)} data: {before.rows} rows {before.digest} -> "
                             f"{after.rows} rows {after.digest}")
        return lines


Part = Column | Constraint | Index | Trigger


def _diff_named(label: str, old: Mapping[str, Part], new: Mapping[str, Part]) -> list[str]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"{label} {name}: missing")
        elif name not in old:
            lines.append(f"{label} {name}: added {new[name]}")
        else:
            before, after = (dataclasses.asdict(old[name]), dataclasses.asdict(new[name]))
            lines += [f"{label} {name}: {field} {before[field]!r} -> {after[field]!r}"
                      for field in before if before[field] != after[field]]
    return lines


def fingerprint(
    conn: Connection,
    schemas: Collection[str] | None = None,
    *,
    include_log: bool = False,
    include_backup: bool = False,
) -> Fingerprint:
    """The fingerprint of every user table in ``schemas`` (default: all but system schemas).

    The tool's bookkeeping, the ``migration_log`` table of any schema and the
    ``migration_backup`` schema with its change-log triggers on the tables,
    is left out unless asked for.
    """
    with _reading(conn) as cur:
        return _capture(cur, schemas, include_log=include_log, include_backup=include_backup)


def expected_after_migration(
    conn: Connection,
    key_columns: Iterable[ColumnRef],
    *,
    defaults: Mapping[ColumnRef, str | None] | None = None,
    schemas: Collection[str] | None = None,
    include_log: bool = False,
    include_backup: bool = False,
) -> Fingerprint:
    """The fingerprint a legacy database should have once ``key_columns`` are uuid.

    Read from the legacy database itself: the key columns take type uuid,
    their default the one given in ``defaults`` (as ``pg_get_expr`` prints
    it, e.g. ``gen_random_uuid()``) or else the legacy one; the data is read
    with each key value cast to uuid on the server, so the digests compare
    with those of the migrated database.  A value that is no valid uuid
    raises psycopg2.errors.InvalidTextRepresentation: dirty data has no
    expected state.
    """
    keys = set(key_columns)
    defaults = dict(defaults or {})
    with _reading(conn) as cur:
        legacy = _capture(cur, schemas, include_log=include_log, include_backup=include_backup,
                          as_uuid=keys, known=keys | defaults.keys())
    schema = dict(legacy.schema)
    for ref in keys | defaults.keys():
        shape = schema[ref[:2]]
        column = shape.columns[ref[2]]
        changed = dataclasses.replace(
            column,
            type="uuid" if ref in keys else column.type,
            default=defaults.get(ref, column.default))
        schema[ref[:2]] = dataclasses.replace(shape, columns={**shape.columns, ref[2]: changed})
    return Fingerprint(schema=schema, data=legacy.data)


@contextmanager
def _reading(conn: Connection) -> Iterator[Cursor]:
    """A cursor with fixed output settings, in a transaction or savepoint of its own.

    In autocommit mode: one read-only repeatable-read transaction, so all
    tables are read from one snapshot.  Otherwise: a savepoint in the
    caller's transaction, rolled back at the end, which undoes the settings
    and keeps whatever the caller did before.
    """
    with conn.cursor() as cur:
        if conn.autocommit:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            end = "ROLLBACK"
        else:
            cur.execute("SAVEPOINT fingerprint")
            end = "ROLLBACK TO SAVEPOINT fingerprint; RELEASE SAVEPOINT fingerprint"
        try:
            cur.execute("SELECT set_config(name, value, true)"
                        " FROM unnest(%s, %s) AS s(name, value)",
                        (list(_SETTINGS), list(_SETTINGS.values())))
            yield cur
        finally:
            cur.execute(end)


def _capture(
    cur: Cursor,
    schemas: Collection[str] | None,
    *,
    include_log: bool,
    include_backup: bool,
    as_uuid: Collection[ColumnRef] = (),
    known: Collection[ColumnRef] = (),
) -> Fingerprint:
    """Read shapes and data; columns in ``as_uuid`` are read cast to uuid.

    Every column in ``known`` must exist among the tables read (ValueError).
    """
    cur.execute(
        """
        SELECT c.oid, n.nspname, c.relname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p')
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%'
           AND (%(schemas)s::name[] IS NULL OR n.nspname = ANY (%(schemas)s::name[]))
           AND (%(backup)s OR NOT (n.nspname = %(backup_schema)s
                                   OR n.nspname LIKE %(backup_like)s))
           AND (%(log)s OR c.relname <> %(log_table)s)
        """,
        {"schemas": None if schemas is None else list(schemas), "backup": include_backup,
         "backup_schema": BACKUP_SCHEMA, "backup_like": BACKUP_SCHEMA_LIKE,
         "log": include_log, "log_table": LOG_TABLE},
    )
    tables: dict[int, TableRef] = {oid: (nsp, rel) for oid, nsp, rel in cur.fetchall()}
    oids = list(tables)
    columns: dict[TableRef, dict[str, Column]] = {ref: {} for ref in tables.values()}
    constraints: dict[TableRef, dict[str, Constraint]] = {ref: {} for ref in tables.values()}
    indexes: dict[TableRef, dict[str, Index]] = {ref: {} for ref in tables.values()}
    triggers: dict[TableRef, dict[str, Trigger]] = {ref: {} for ref in tables.values()}

    cur.execute(
        """
        SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
          FROM pg_attribute a
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = ANY (%s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
        """, (oids,))
    for oid, name, *column in cur.fetchall():
        columns[tables[oid]][name] = Column(*column)
    cur.execute(
        """
        SELECT conrelid, conname, contype, pg_get_constraintdef(oid), convalidated,
               condeferrable, condeferred
          FROM pg_constraint WHERE conrelid = ANY (%s::oid[])
        """, (oids,))
    for oid, name, kind, *constraint in cur.fetchall():
        constraints[tables[oid]][name] = Constraint(
            _CONSTRAINT_TYPES.get(kind, kind), *constraint)
    cur.execute(
        """
        SELECT i.indrelid, c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = ANY (%s::oid[])
        """, (oids,))
    for oid, name, *index in cur.fetchall():
        indexes[tables[oid]][name] = Index(*index)
    cur.execute(
        """
        SELECT tgrelid, tgname, pg_get_triggerdef(oid), tgenabled
          FROM pg_trigger WHERE tgrelid = ANY (%s::oid[]) AND NOT tgisinternal
           AND (%s OR tgfoid NOT IN (
                SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE p.proname = %s AND (n.nspname = %s OR n.nspname LIKE %s)))
        """, (oids, include_backup, CHANGE_LOG_FUNCTION, BACKUP_SCHEMA, BACKUP_SCHEMA_LIKE))
    for oid, name, *trigger in cur.fetchall():
        triggers[tables[oid]][name] = Trigger(*trigger)

    schema = {ref: Shape(columns[ref], constraints[ref], indexes[ref], triggers[ref])
              for ref in tables.values()}
    unknown = [ref for ref in known
               if ref[:2] not in schema or ref[2] not in schema[ref[:2]].columns]
    if unknown:
        raise ValueError(f"no such column among the tables read: {sorted(unknown)}")
    data = {ref: _read_data(cur, ref, sorted(schema[ref].columns),
                            {column for *table, column in as_uuid if tuple(table) == ref})
            for ref in schema}
    return Fingerprint(schema=schema, data=data)


def _read_data(cur: Cursor, ref: TableRef, columns: list[str], as_uuid: set[str]) -> Data:
    """Row count and multiset digest: the sums of both halves of every row's md5."""
    values = sql.SQL(", ").join(
        sql.SQL("{}::uuid" if column in as_uuid else "{}").format(sql.Identifier(column))
        for column in columns)
    cur.execute(sql.SQL(
        """
        SELECT count(*),
               coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0),
               coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0)
          FROM (SELECT md5(ROW({})::text) AS h FROM ONLY {}.{}) AS r
        """).format(values, sql.Identifier(ref[0]), sql.Identifier(ref[1])))
    row = cur.fetchone()
    assert row is not None
    rows, high, low = row
    return Data(rows=rows, digest=f"{int(high) % 2**64:016x}{int(low) % 2**64:016x}")
