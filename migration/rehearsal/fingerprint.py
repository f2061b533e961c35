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
    """A table's definition, each part keyed by name.

    ``properties`` holds the rest of what a table carries, each as text keyed
    by what it is (``comment on column id``, ``privileges``, ``replica
    identity``, ``policy p``, ...): what a migration and its rollback must
    keep, and what would otherwise be lost unseen.
    """

    columns: Mapping[str, Column]
    constraints: Mapping[str, Constraint]
    indexes: Mapping[str, Index]
    triggers: Mapping[str, Trigger]
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    rows: int
    digest: str


@dataclass(frozen=True)
class Fingerprint:
    schema: Mapping[TableRef, Shape]
    data: Mapping[TableRef, Data]
    relations: Mapping[str, str] | None = None
    """The views and materialized views, and the policies and rules of the tables, as the
    server prints them, keyed by kind and name: compared when both sides have them.  Their
    text can change with the key columns' type (a carried view prints a cast), so a
    fingerprint expected after a migration has none (``expected_after_migration``); a
    round trip (before, and after the rollback) compares them."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprint):
            return NotImplemented
        return (self.schema == other.schema and self.data == other.data
                and (self.relations is None or other.relations is None
                     or self.relations == other.relations))

    __hash__ = None  # type: ignore[assignment]

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
            lines += _diff_text(name, old.properties, new.properties)
        if self.relations is not None and other.relations is not None:
            lines += _diff_text("relation", self.relations, other.relations)
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


def _diff_text(label: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    return [f"{label} {name}: {old.get(name)!r} -> {new.get(name)!r}"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


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
        properties = dict(shape.properties)
        if ref in keys:  # uuid has no collation
            properties.pop(f"collation of column {ref[2]}", None)
        schema[ref[:2]] = dataclasses.replace(
            shape, columns={**shape.columns, ref[2]: changed}, properties=properties)
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

    properties = _properties(cur, tables)
    schema = {ref: Shape(columns[ref], constraints[ref], indexes[ref], triggers[ref],
                         properties[ref])
              for ref in tables.values()}
    unknown = [ref for ref in known
               if ref[:2] not in schema or ref[2] not in schema[ref[:2]].columns]
    if unknown:
        raise ValueError(f"no such column among the tables read: {sorted(unknown)}")
    data = {ref: _read_data(cur, ref, sorted(schema[ref].columns),
                            {column for *table, column in as_uuid if tuple(table) == ref})
            for ref in schema}
    return Fingerprint(schema=schema, data=data,
                       relations=_relations(cur, schemas))


# What a table carries besides its columns, constraints, indexes and triggers, one row per
# (table oid, what, text).  Privileges as they are in force: the owner's defaults where none
# were ever granted (a grant revoked leaves them written out), none on a column.  Column
# options are only those ALTER COLUMN SET takes (some builds stamp others of their own); a
# collation only where it is not the type's.
# A statistics object's columns by name: the server prints them in the table's column
# order, which the swap changes (the converted column moves to the end).
_PROPERTIES = """
SELECT c.oid, 'comment', d.description FROM pg_class c
  JOIN pg_description d ON (d.objoid, d.classoid, d.objsubid) = (c.oid, 'pg_class'::regclass, 0)
 WHERE c.oid = ANY (%(oids)s)
UNION ALL
SELECT a.attrelid, 'comment on column ' || a.attname, d.description FROM pg_attribute a
  JOIN pg_description d
    ON (d.objoid, d.classoid, d.objsubid) = (a.attrelid, 'pg_class'::regclass, a.attnum)
 WHERE a.attrelid = ANY (%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT k.conrelid, 'comment on constraint ' || k.conname, d.description FROM pg_constraint k
  JOIN pg_description d ON (d.objoid, d.classoid) = (k.oid, 'pg_constraint'::regclass)
 WHERE k.conrelid = ANY (%(oids)s)
UNION ALL
SELECT i.indrelid, 'comment on index ' || c.relname, d.description FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid
  JOIN pg_description d ON (d.objoid, d.classoid) = (c.oid, 'pg_class'::regclass)
 WHERE i.indrelid = ANY (%(oids)s)
UNION ALL
SELECT t.tgrelid, 'comment on trigger ' || t.tgname, d.description FROM pg_trigger t
  JOIN pg_description d ON (d.objoid, d.classoid) = (t.oid, 'pg_trigger'::regclass)
 WHERE t.tgrelid = ANY (%(oids)s) AND NOT t.tgisinternal
UNION ALL
SELECT c.oid, 'privileges', array_to_string(ARRAY(
           SELECT x::text FROM unnest(coalesce(c.relacl, acldefault('r', c.relowner))) x
           ORDER BY 1), ' ')
  FROM pg_class c WHERE c.oid = ANY (%(oids)s)
UNION ALL
SELECT a.attrelid, 'privileges on column ' || a.attname,
       array_to_string(ARRAY(SELECT x::text FROM unnest(a.attacl) x ORDER BY 1), ' ')
  FROM pg_attribute a
 WHERE a.attrelid = ANY (%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
   AND cardinality(a.attacl) > 0
UNION ALL
SELECT a.attrelid, 'collation of column ' || a.attname, l.collname::text FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid JOIN pg_collation l ON l.oid = a.attcollation
 WHERE a.attrelid = ANY (%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
   AND a.attcollation <> t.typcollation
UNION ALL
SELECT a.attrelid, 'statistics target of column ' || a.attname, a.attstattarget::text
  FROM pg_attribute a
 WHERE a.attrelid = ANY (%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
   AND a.attstattarget >= 0
UNION ALL
SELECT a.attrelid, 'options of column ' || a.attname,
       array_to_string(ARRAY(SELECT o FROM unnest(a.attoptions) o
                             WHERE o ~ '^n_distinct(_inherited)?=' ORDER BY 1), ' ')
  FROM pg_attribute a
 WHERE a.attrelid = ANY (%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
   AND EXISTS (SELECT FROM unnest(a.attoptions) o WHERE o ~ '^n_distinct(_inherited)?=')
UNION ALL
SELECT c.oid, 'replica identity', c.relreplident::text
       || coalesce(' using ' || (SELECT ic.relname FROM pg_index i
                                  JOIN pg_class ic ON ic.oid = i.indexrelid
                                  WHERE i.indrelid = c.oid AND i.indisreplident), '')
  FROM pg_class c WHERE c.oid = ANY (%(oids)s)
UNION ALL
SELECT c.oid, 'row security', c.relrowsecurity::text || ' ' || c.relforcerowsecurity::text
  FROM pg_class c WHERE c.oid = ANY (%(oids)s)
UNION ALL
SELECT c.oid, 'options', array_to_string(c.reloptions, ' ')
  FROM pg_class c WHERE c.oid = ANY (%(oids)s) AND c.reloptions IS NOT NULL
UNION ALL
SELECT c.oid, 'tablespace', s.spcname::text
  FROM pg_class c JOIN pg_tablespace s ON s.oid = c.reltablespace
 WHERE c.oid = ANY (%(oids)s)
UNION ALL
SELECT i.indrelid, 'clustered on', c.relname::text FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid
 WHERE i.indrelid = ANY (%(oids)s) AND i.indisclustered
UNION ALL
SELECT s.stxrelid, 'statistics ' || s.stxname,
       concat_ws(' | ', s.stxkind::text,
                 (SELECT string_agg(a.attname, ', ' ORDER BY a.attname) FROM pg_attribute a
                   WHERE a.attrelid = s.stxrelid AND a.attnum = ANY (s.stxkeys)),
                 pg_get_expr(s.stxexprs, s.stxrelid), 'target ' || s.stxstattarget::text)
  FROM pg_statistic_ext s WHERE s.stxrelid = ANY (%(oids)s)
UNION ALL
SELECT r.prrelid, 'publication ' || p.pubname, coalesce(
           (SELECT string_agg(a.attname, ', ' ORDER BY a.attname) FROM pg_attribute a
             WHERE a.attrelid = r.prrelid AND a.attnum = ANY (r.prattrs)), 'all columns')
       || coalesce(' where ' || pg_get_expr(r.prqual, r.prrelid), '')
  FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
 WHERE r.prrelid = ANY (%(oids)s)
"""

# The views' and materialized views' definitions (and theirs and the tables' policies
# and rules), whose text may mention a key column's type.
_RELATIONS = r"""
SELECT CASE c.relkind WHEN 'v' THEN 'view ' ELSE 'materialized view ' END
       || quote_ident(n.nspname) || '.' || quote_ident(c.relname),
       pg_get_viewdef(c.oid) || ' | privileges '
       || array_to_string(ARRAY(SELECT x::text FROM unnest(coalesce(
                                    c.relacl, acldefault('r', c.relowner))) x ORDER BY 1), ' ')
       || coalesce(' | comment ' || obj_description(c.oid, 'pg_class'), '')
       || CASE WHEN c.relkind = 'm' THEN ' | populated ' || c.relispopulated::text ELSE '' END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('v', 'm')
   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%%'
   AND (%(schemas)s::name[] IS NULL OR n.nspname = ANY (%(schemas)s::name[]))
   AND NOT (n.nspname = %(backup_schema)s OR n.nspname LIKE %(backup_like)s)
UNION ALL
SELECT 'policy ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || '.'
       || quote_ident(p.polname),
       concat_ws(' | ', p.polpermissive::text, p.polcmd::text,
                 array_to_string(ARRAY(SELECT r::regrole::text FROM unnest(p.polroles) r
                                       ORDER BY 1), ' '),
                 pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE (%(schemas)s::name[] IS NULL OR n.nspname = ANY (%(schemas)s::name[]))
   AND n.nspname NOT LIKE 'pg\_%%'
UNION ALL
SELECT 'rule ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || '.'
       || quote_ident(r.rulename),
       pg_get_ruledef(r.oid) || ' | enabled ' || r.ev_enabled::text
  FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE r.rulename <> '_RETURN'
   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%%'
   AND (%(schemas)s::name[] IS NULL OR n.nspname = ANY (%(schemas)s::name[]))
   AND NOT (n.nspname = %(backup_schema)s OR n.nspname LIKE %(backup_like)s)
"""


def _properties(cur: Cursor, tables: Mapping[int, TableRef]) -> dict[TableRef, dict[str, str]]:
    found: dict[TableRef, dict[str, str]] = {ref: {} for ref in tables.values()}
    cur.execute(_PROPERTIES, {"oids": list(tables)})
    for oid, what, text in cur.fetchall():
        found[tables[oid]][what] = text
    return found


def _relations(cur: Cursor, schemas: Collection[str] | None) -> dict[str, str]:
    cur.execute(_RELATIONS, {"schemas": None if schemas is None else list(schemas),
                             "backup_schema": BACKUP_SCHEMA, "backup_like": BACKUP_SCHEMA_LIKE})
    return dict(cur.fetchall())


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
