"""What a migration must leave as it found it, read the same way before and after.

``backup_data`` records, for every table of the plan, the objects the swap
drops and recreates or could disturb: the primary key, the indexes and
foreign keys that involve a key column, the replica identity, publication
membership, RLS policies, the views and statistics objects over the key
columns, and each key column's NOT NULL and default.  The record is kept in the
backup, written in the copy's own transaction, and in ``migration_log`` (it outlives
``cleanup_backup``); the checks look each recorded object up again by
name: one reader for both sides, so a difference is a change in the
database, never in how it was read.

Each kind of object is a ``Kind``: how to list the objects of a plan (their
identity: table and name) and how to read one object's state now (``None``
when it is gone).  A record entry is the identity and the state together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog, views
from migration.model import Table
from migration.plan import Plan

Entry = dict[str, Any]
NOT_VALID = " NOT VALID"


def _table(entry: Entry) -> Table:
    schema, name = entry["table"].split(".", 1)
    return Table(schema, name)


def _one(cur: Cursor, query: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
    cur.execute(query, params)
    row: tuple[Any, ...] | None = cur.fetchone()
    return row


def _exists(cur: Cursor, entry: Entry) -> bool:
    return catalog.table_exists(cur.connection, _table(entry))


# --- primary keys: one entry per table, name and definition None when it has none ----------

def _table_names(cur: Cursor, plan: Plan) -> list[Entry]:
    return [{"table": str(table)} for table in plan.tables]


def primary_key_now(cur: Cursor, entry: Entry) -> Entry | None:
    if not _exists(cur, entry):
        return None
    row = _one(cur, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = to_regclass(%s) AND contype = 'p'",
               (catalog.regclass(_table(entry)),))
    return {"name": row[0] if row else None, "definition": row[1] if row else None}


# --- indexes that involve a key column (key, INCLUDE, expression or predicate) --------------

def _index_names(cur: Cursor, plan: Plan) -> list[Entry]:
    found = {(str(ix.table), ix.name) for key in plan.columns
             if catalog.table_exists(cur.connection, key.table)
             for ix in catalog.indexes_on(cur.connection, key)}
    return [{"table": table, "name": name} for table, name in sorted(found)]


def index_now(cur: Cursor, entry: Entry) -> Entry | None:
    """The index of that name on that table (index names are per schema, the table's)."""
    table = _table(entry)
    row = _one(cur, "SELECT pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready, "
                    "(SELECT spcname FROM pg_tablespace WHERE oid = c.reltablespace) "
                    "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indexrelid = to_regclass(%s) AND i.indrelid = to_regclass(%s)",
               (sql.Identifier(table.schema, entry["name"]).as_string(cur.connection),
                catalog.regclass(table)))
    return None if row is None else {"definition": row[0], "valid": row[1], "ready": row[2],
                                     "tablespace": row[3]}


# --- foreign keys to or from a key column ---------------------------------------------------

def _foreign_key_names(cur: Cursor, plan: Plan) -> list[Entry]:
    conn = cur.connection
    found = {(str(fk.table), fk.name) for key in plan.columns
             if catalog.table_exists(conn, key.table)
             for fk in (*catalog.foreign_keys_from(conn, key),
                        *catalog.foreign_keys_to(conn, key))}
    return [{"table": table, "name": name} for table, name in sorted(found)]


def foreign_key_now(cur: Cursor, entry: Entry) -> Entry | None:
    """Definition without its " NOT VALID" suffix: validation is reported on its own."""
    row = _one(cur, "SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                    "WHERE conrelid = to_regclass(%s) AND conname = %s AND contype = 'f'",
               (catalog.regclass(_table(entry)), entry["name"]))
    if row is None:
        return None
    definition: str = row[0]
    return {"definition": definition.removesuffix(NOT_VALID), "validated": row[1]}


# --- replica identity ------------------------------------------------------------------------

def _tables_and_partitions(cur: Cursor, plan: Plan) -> list[Entry]:
    """The plan's tables and, for a partitioned one, its partitions at every level (each
    has a replica identity of its own)."""
    found = []
    for table in plan.tables:
        found.append({"table": str(table)})
        if catalog.table_exists(cur.connection, table):
            cur.execute("SELECT n.nspname, c.relname FROM pg_partition_tree(to_regclass(%s)) t "
                        "JOIN pg_class c ON c.oid = t.relid "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE t.level > 0 AND c.relkind = 'r' ORDER BY 1, 2",
                        (catalog.regclass(table),))
            found += [{"table": str(Table(*row))} for row in cur.fetchall()]
    return found


def replica_identity_now(cur: Cursor, entry: Entry) -> Entry | None:
    """``relreplident`` (d, n, f, i) and the index flagged as identity, if any."""
    row = _one(cur, "SELECT c.relreplident::text, (SELECT ic.relname FROM pg_index i "
                    "JOIN pg_class ic ON ic.oid = i.indexrelid "
                    "WHERE i.indrelid = c.oid AND i.indisreplident) "
                    "FROM pg_class c WHERE c.oid = to_regclass(%s)",
               (catalog.regclass(_table(entry)),))
    return None if row is None else {"mode": row[0], "index": row[1]}


# --- publication membership -----------------------------------------------------------------

_PUBLISHED_COLUMNS = """
    (SELECT array_agg(a.attname::text ORDER BY a.attname)
     FROM pg_publication_rel r JOIN pg_publication q ON q.oid = r.prpubid
     CROSS JOIN LATERAL unnest(r.prattrs) AS k(attnum)
     JOIN pg_attribute a ON a.attrelid = r.prrelid AND a.attnum = k.attnum
     WHERE q.pubname = t.pubname AND r.prrelid = to_regclass(%(table)s))"""


def _publications(cur: Cursor, table: Table, publication: str | None) -> list[Entry]:
    """Publications of the table (through FOR TABLE, TABLES IN SCHEMA or ALL TABLES): their
    column list (None: all columns) and row filter, both from PostgreSQL 15 on."""
    extras = (sql.SQL(_PUBLISHED_COLUMNS + ", t.rowfilter")
              if catalog.server_version(cur.connection) >= 150000 else sql.SQL("NULL, NULL"))
    cur.execute(sql.SQL("SELECT t.pubname::text, {} FROM pg_publication_tables t "
                        "WHERE t.schemaname = %(schema)s AND t.tablename = %(name)s "
                        "AND (%(pub)s IS NULL OR t.pubname = %(pub)s) ORDER BY 1").format(extras),
                {"table": catalog.regclass(table), "schema": table.schema, "name": table.name,
                 "pub": publication})
    return [{"publication": pub, "columns": columns, "row_filter": row_filter}
            for pub, columns, row_filter in cur.fetchall()]


def _publication_names(cur: Cursor, plan: Plan) -> list[Entry]:
    return [{"table": str(table), "publication": found["publication"]}
            for table in plan.tables for found in _publications(cur, table, None)]


def publication_now(cur: Cursor, entry: Entry) -> Entry | None:
    found = _publications(cur, _table(entry), entry["publication"])
    return None if not found else {k: v for k, v in found[0].items() if k != "publication"}


# --- row level security policies ------------------------------------------------------------

def _policies(cur: Cursor, table: Table, name: str | None) -> list[Entry]:
    cur.execute("SELECT policyname::text, permissive, roles::text[], cmd, qual, with_check "
                "FROM pg_policies WHERE schemaname = %(schema)s AND tablename = %(table)s "
                "AND (%(name)s IS NULL OR policyname = %(name)s) ORDER BY 1",
                {"schema": table.schema, "table": table.name, "name": name})
    return [{"name": n, "permissive": p, "roles": roles, "command": cmd, "qual": qual,
             "with_check": check} for n, p, roles, cmd, qual, check in cur.fetchall()]


def _policy_names(cur: Cursor, plan: Plan) -> list[Entry]:
    return [{"table": str(table), "name": found["name"]}
            for table in plan.tables for found in _policies(cur, table, None)]


def policy_now(cur: Cursor, entry: Entry) -> Entry | None:
    found = _policies(cur, _table(entry), entry["name"])
    return None if not found else {k: v for k, v in found[0].items() if k != "name"}


# --- views over a key column (and views over those) ----------------------------------------

def _view_names(cur: Cursor, plan: Plan) -> list[Entry]:
    keys = [key for key in plan.columns if catalog.table_exists(cur.connection, key.table)]
    return [{"view": str(view.view)} for view in views.dependent_views(cur.connection, keys)]


def view_now(cur: Cursor, entry: Entry) -> Entry | None:
    """The view's definition, options, triggers and rules (a materialized view's indexes),
    and whether a SELECT from it runs (``works``: a materialized view not refreshed does
    not).

    The swap creates a view again from the server's own text of it, casts
    included (``(t.user_id)::text = (u.id)::text``), so its definition reads the
    same before and after, in either direction.  Its owner, privileges and comments
    are the application's to change afterwards (the swap carries them; the tests
    prove it)."""
    name = entry["view"]
    row = _one(cur, "SELECT oid FROM pg_class WHERE oid = to_regclass(%s) "
                    "AND relkind IN ('v', 'm')",
               (catalog.regclass(Table(*name.split(".", 1))),))
    if row is None:
        return None
    view = views.read(cur, row[0])
    cur.execute("SAVEPOINT view_works")
    try:
        cur.execute(sql.SQL("SELECT * FROM {} LIMIT 1").format(view.view.ident))
        works = True
    except psycopg2.Error:
        works = False
    cur.execute("ROLLBACK TO SAVEPOINT view_works")
    return {"definition": view.definition, "options": sorted(view.options), "works": works,
            "triggers_and_rules": [found.definition for found in view.objects],
            "indexes": [definition for _, definition, _ in view.indexes]}


# --- statistics objects over a key column ---------------------------------------------------

def _statistics_names(cur: Cursor, plan: Plan) -> list[Entry]:
    found = {(str(key.table), f"{stats.schema}.{stats.name}") for key in plan.columns
             if catalog.table_exists(cur.connection, key.table)
             for stats in catalog.statistics_on(cur.connection, key)}
    return [{"table": table, "name": name} for table, name in sorted(found)]


def statistics_now(cur: Cursor, entry: Entry) -> Entry | None:
    schema, name = entry["name"].split(".", 1)
    row = _one(cur, "SELECT s.stxkind::text[], ARRAY(SELECT a.attname::text FROM pg_attribute a "
                    "WHERE a.attrelid = s.stxrelid AND a.attnum = ANY (s.stxkeys) ORDER BY 1), "
                    "pg_get_statisticsobjdef_expressions(s.oid), nullif(s.stxstattarget, -1), "
                    "pg_get_userbyid(s.stxowner), obj_description(s.oid, 'pg_statistic_ext') "
                    "FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace "
                    "WHERE n.nspname = %s AND s.stxname = %s AND s.stxrelid = to_regclass(%s)",
               (schema, name, catalog.regclass(_table(entry))))
    # the columns as a set: the server lists them in the table's order, which the swap
    # changes (the column swapped moves to the end)
    return None if row is None else {
        "kinds": sorted(row[0]), "columns": row[1], "expressions": row[2], "target": row[3],
        "owner": row[4], "comment": row[5]}


# --- the key columns: NOT NULL and default ---------------------------------------------------

def _key_column_names(cur: Cursor, plan: Plan) -> list[Entry]:
    return [{"table": str(key.table), "column": key.column} for key in plan.columns]


def key_column_now(cur: Cursor, entry: Entry) -> Entry | None:
    """The column's type, NOT NULL and default (the deparsed expression, None: none)."""
    info = catalog.column_info(cur.connection, _table(entry), entry["column"])
    return None if info is None else {"type": info.type, "not_null": info.not_null,
                                      "default": info.default}


# --- the kinds, and the record ---------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    key: str  # its list in the record (migration_log.details)
    identity: tuple[str, ...]  # the fields that name an object
    names: Callable[[Cursor, Plan], list[Entry]]  # the objects of a plan, by identity
    now: Callable[[Cursor, Entry], Entry | None]  # one object's state now; None: it is gone

    def split(self, entry: Entry) -> tuple[Entry, Entry]:
        """(identity, recorded state) of a record entry."""
        return ({k: v for k, v in entry.items() if k in self.identity},
                {k: v for k, v in entry.items() if k not in self.identity})

    def read(self, cur: Cursor, plan: Plan) -> list[Entry]:
        entries = []
        for identity in self.names(cur, plan):
            state = self.now(cur, identity)
            if state is not None:
                entries.append({**identity, **state})
        return entries


PRIMARY_KEYS = Kind("primary_keys", ("table",), _table_names, primary_key_now)
INDEXES = Kind("indexes", ("table", "name"), _index_names, index_now)
FOREIGN_KEYS = Kind("foreign_keys", ("table", "name"), _foreign_key_names, foreign_key_now)
REPLICA_IDENTITY = Kind("replica_identity", ("table",), _tables_and_partitions,
                        replica_identity_now)
PUBLICATIONS = Kind("publications", ("table", "publication"), _publication_names,
                    publication_now)
POLICIES = Kind("policies", ("table", "name"), _policy_names, policy_now)
VIEWS = Kind("views", ("view",), _view_names, view_now)
STATISTICS = Kind("statistics", ("table", "name"), _statistics_names, statistics_now)
KEY_COLUMNS = Kind("key_columns", ("table", "column"), _key_column_names, key_column_now)
KINDS = (PRIMARY_KEYS, INDEXES, FOREIGN_KEYS, REPLICA_IDENTITY, PUBLICATIONS, POLICIES, VIEWS,
         STATISTICS, KEY_COLUMNS)


def record(cur: Cursor, plan: Plan) -> dict[str, Any]:
    """Every kind's objects in the plan's tables now, and the tables recorded."""
    return {"tables": [str(table) for table in plan.tables],
            **{kind.key: kind.read(cur, plan) for kind in KINDS}}
