"""Logical publications through the migration: no engine column ever reaches a subscriber.

A publication that names a table of the plan without a column list publishes every
column, the engine's copy (``id_uuid``; ``id_text`` on the way back) included, from
the first batch on; a subscriber whose table lacks it stops on every change
("logical replication target relation ... is missing replicated column") and the
publisher keeps the slot's WAL.  So, on PostgreSQL 15 and later, the transaction
that adds a copy column also puts the table in each such publication with an
explicit list of its other columns (``narrow``): no change that carries the copy is
ever published.  PostgreSQL has no ``ALTER PUBLICATION ... SET COLUMNS``: the table
is dropped from the publication and added back with the list (and its row filter)
in that transaction, which its subscribers see only as the same columns as before.
The publication's original definition is put back (``restore``) in the swap's
transaction, or by a rollback before the swap once the copies are dropped.  Which
publications were narrowed is recorded in the backup schema's ``published_columns``
in the same transactions, so a resumed run finds them as it left them.  A list the
publication had already is kept: it cannot hold the copy.

Where no list can be set (``FOR ALL TABLES``, ``TABLES IN SCHEMA``, PostgreSQL
before 15, a publication this role may not alter, ``REPLICA IDENTITY FULL`` while
updates or deletes are published, a partitioned table published without
``publish_via_partition_root``) the migration is refused up front (``findings``),
naming each publication and what its subscribers must do first, unless the operator
passes ``--allow-publications``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, sqlexpr
from migration.connection import Connection
from migration.errors import MigrationError
from migration.log import logger
from migration.model import KeyColumn, Table
from migration.report import Finding, Status, failures

RECORD = "published_columns"  # the backup schema's record of them (backup.PUBLISHED_COLUMNS)
_COPY_MARK = "uuid-migration: copy of %"  # model.KeyColumn.mark, whatever the column


@dataclass(frozen=True)
class Membership:
    """A publication that publishes a table of the plan (or one of its partitions)."""

    publication: str
    table: Table
    all_tables: bool  # FOR ALL TABLES
    named: bool  # FOR TABLE names the table itself (else TABLES IN SCHEMA, or a partition)
    columns: tuple[str, ...] | None  # its column list; None: all columns
    row_filter: str | None
    owner: str
    may_alter: bool  # this role is a member of the publication's owner
    publishes_changes: bool  # UPDATE or DELETE
    via_root: bool
    replica_full: bool
    partitioned: bool
    generated: bool  # publishes stored generated columns (PostgreSQL 18)


def memberships(conn: Connection, table: Table) -> list[Membership]:
    """Every publication that publishes ``table`` or one of its partitions, however it
    takes it in (``pg_publication_tables`` expands the three forms)."""
    modern = catalog.server_version(conn) >= 150000
    columns = sql.SQL(
        "CASE WHEN r.prattrs IS NULL THEN NULL ELSE ARRAY(SELECT a.attname::text "
        "FROM unnest(r.prattrs) k(attnum) JOIN pg_attribute a ON a.attrelid = r.prrelid "
        "AND a.attnum = k.attnum ORDER BY a.attnum) END, pg_get_expr(r.prqual, r.prrelid)"
        if modern else "NULL::text[], NULL::text")
    generated = sql.SQL("p.pubgencols = 's'" if catalog.server_version(conn) >= 180000
                        else "false")
    with conn.cursor() as cur:
        cur.execute(sql.SQL(
            """
            WITH target AS MATERIALIZED (
                SELECT oid, relreplident, relkind FROM pg_class WHERE oid = to_regclass(%s)
            ), tree AS MATERIALIZED (
                SELECT oid AS relid FROM target
                UNION SELECT x.relid FROM target, pg_partition_tree(target.oid) x
            )
            SELECT DISTINCT p.pubname::text, p.puballtables, r.oid IS NOT NULL, {columns},
                   pg_get_userbyid(p.pubowner)::text, pg_has_role(p.pubowner, 'MEMBER'),
                   p.pubupdate OR p.pubdelete, p.pubviaroot, c.relreplident = 'f',
                   c.relkind = 'p', {generated}
            FROM target c
            JOIN pg_publication_tables t ON true
            JOIN pg_namespace n ON n.nspname = t.schemaname
            JOIN pg_class published ON published.relnamespace = n.oid
                 AND published.relname = t.tablename
            JOIN pg_publication p ON p.pubname = t.pubname
            LEFT JOIN pg_publication_rel r ON r.prpubid = p.oid AND r.prrelid = c.oid
            WHERE published.oid IN (SELECT relid FROM tree)
            ORDER BY 1
            """).format(columns=columns, generated=generated), (catalog.regclass(table),))
        return [Membership(name, table, every, named,
                           None if listed is None else tuple(listed), *rest)
                for name, every, named, listed, *rest in cur.fetchall()]


def problem(conn: Connection, found: Membership) -> str:
    """Why ``narrow`` cannot keep the engine's columns from this publication's
    subscribers; "" when it can (or need not: the publication has a column list)."""
    if found.all_tables:
        return "is FOR ALL TABLES, which takes no column list"
    if not found.named:
        return ("takes it in through TABLES IN SCHEMA or by a partition, which takes no "
                "column list")
    if catalog.server_version(conn) < 150000:
        return (f"is on PostgreSQL {conn.get_parameter_status('server_version')}, which has "
                "no publication column lists (15 and later have)")
    if found.columns is not None:
        return ""
    if not found.may_alter:
        return (f"is owned by {found.owner}, for whom this role cannot set a column list "
                "(ALTER PUBLICATION)")
    if found.replica_full and found.publishes_changes:
        return ("publishes its updates and deletes under REPLICA IDENTITY FULL, which takes "
                "no column list that leaves a column out")
    if found.partitioned and not found.via_root:
        return ("publishes a partitioned table without publish_via_partition_root, which "
                "takes no column list")
    return ""


def _by_table(keys: Iterable[KeyColumn]) -> dict[Table, list[KeyColumn]]:
    grouped: dict[Table, list[KeyColumn]] = {}
    for key in keys:
        grouped.setdefault(key.table, []).append(key)
    return grouped


def findings(conn: Connection, keys: Iterable[KeyColumn], *, allowed: bool) -> list[Finding]:
    """A finding per publication that would send the engine's copies of ``keys`` to its
    subscribers: refused (FAIL), or named (WARN) when the operator ``allowed`` it."""
    found = []
    for table, columns in _by_table(keys).items():
        copies = ", ".join(key.temp for key in columns)
        steps = "; ".join(sql_text(table, key) for key in columns)
        published = memberships(conn, table)
        found += _respelled(conn, [key for key in columns if not key.back],
                            sorted({membership.publication for membership in published}))
        for membership in published:
            reason = problem(conn, membership)
            if not reason:
                continue
            name = membership.publication
            found.append(Finding(
                "publications", Status.WARN if allowed else Status.FAIL,
                f"publication {name} publishes {table} and {reason}: from the first batch "
                f"it would send the engine's column(s) {copies}, and a subscriber whose table "
                "lacks them stops on every change" + (" (accepted: --allow-publications)"
                                                      if allowed else ""),
                subject=str(table),
                hint=f"on every subscriber of {name}, first add the engine's columns to the "
                     f"table, as nullable columns ({steps}), or pause the subscription "
                     "(ALTER SUBSCRIPTION ... DISABLE) and add them before enabling it again "
                     "(the changes written meanwhile carry them); then run again with "
                     "--allow-publications"))
    return found


_CANONICAL = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def _respelled(conn: Connection, keys: list[KeyColumn], published: list[str]) -> list[Finding]:
    """A warning per published key column holding ids not in canonical form: from the swap
    on they are sent in canonical form, and a subscriber still holding the old spelling
    no longer finds those rows for the publisher's updates and deletes, which PostgreSQL
    skips with a log line only (no apply error)."""
    if not published:
        return []
    found = []
    with conn.cursor() as cur:
        cur.execute("SET LOCAL statement_timeout = 0")  # a scan of the column
        for key in keys:
            cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} !~ %s").format(
                key.table.ident, sql.Identifier(key.column)), (_CANONICAL,))
            count = int((cur.fetchone() or [0])[0])
            if count:
                found.append(Finding(
                    "publications", Status.WARN,
                    f"{count} id(s) of {key} are not in canonical form, and publication(s) "
                    f"{', '.join(published)} publish {key.table}: from the swap on they are "
                    "sent in canonical form, and a subscriber that holds them as they are "
                    "spelled now no longer finds those rows for the publisher's updates and "
                    "deletes, which PostgreSQL skips without an error", subject=str(key),
                    count=count,
                    hint=f"migrate each subscriber first (its uuid columns match any "
                         f"spelling), or, its subscription disabled, give those ids their "
                         f"canonical form there at the swap ({key.column}::uuid::text, with "
                         "the columns that refer to them)"))
    conn.rollback()
    return found


def sql_text(table: Table, key: KeyColumn) -> str:
    """The statement a subscriber runs to take the engine's copy of ``key``."""
    return (f"ALTER TABLE {_quoted(table.schema)}.{_quoted(table.name)} ADD COLUMN "
            f"{_quoted(key.temp)} {'text' if key.back else 'uuid'}")


def _quoted(name: str) -> str:
    """A name as SQL reads it back: double-quoted unless it is a plain lower-case word."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def refuse(conn: Connection, keys: Iterable[KeyColumn], *, allowed: bool) -> None:
    """``findings``' refusal, for a step the pre-flight does not run (the rollback after the
    swap); the allowed ones are only logged by the caller's report."""
    bad = failures(findings(conn, keys, allowed=allowed))
    conn.rollback()
    if bad:
        raise MigrationError(
            f"refused, nothing was changed: {len(bad)} publication(s) would send the engine's "
            "columns to subscribers that lack them", hint=bad[0].hint, findings=bad)


def narrow(cur: Cursor, schema: str, table: Table) -> None:
    """In the transaction that adds a copy column to ``table``: each publication that names
    it without a column list gets the list of its columns but the engine's copies, and is
    recorded.  The others were refused up front, or accepted."""
    conn = cur.connection
    if catalog.server_version(conn) < 150000:
        return
    for found in memberships(conn, table):
        if found.columns is not None or problem(conn, found):
            continue
        cur.execute("SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
                    "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
                    "AND (attgenerated = '' OR (attgenerated = 's' AND %s)) "
                    "AND (col_description(attrelid, attnum) LIKE %s) IS NOT TRUE",
                    (catalog.regclass(table), found.generated, _COPY_MARK))
        columns = (cur.fetchone() or [None])[0] or []
        for statement in _republished(found, columns):
            cur.execute(statement)
        record = backup.meta(schema, RECORD)
        backup.create_private(cur, record, sql.SQL(backup.PUBLISHED_COLUMNS).format(record))
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT DO NOTHING")
                    .format(record), (found.publication, table.schema, table.name))
        logger.info("publication %s: %s published with a column list of its own columns "
                    "until the swap (its subscribers lack the engine's)", found.publication,
                    table)


def restore(cur: Cursor, schema: str, tables: Iterable[Table]) -> int:
    """Each publication ``narrow`` gave a column list to, on ``tables``, back as it was
    (no list, its row filter kept), and its record forgotten: after a rollback before the
    swap dropped the copies.  How many were put back."""
    statements, restored = restore_statements(cur, schema, tables)
    for statement in statements:
        cur.execute(statement)
    return restored


def restore_statements(cur: Cursor, schema: str,
                       tables: Iterable[Table]) -> tuple[list[sql.Composable], int]:
    """What ``restore`` does, as statements read for the swap's transaction (which sends
    them with its own once it holds the tables), and how many publications they put
    back.  Read under locks that stop any DDL on ``tables``."""
    record = backup.meta(schema, RECORD)
    if not catalog.relation_exists(cur.connection, record):
        return [], 0
    statements: list[sql.Composable] = []
    restored = 0
    for table in tables:
        cur.execute(sql.SQL("SELECT publication FROM {} WHERE (table_schema, table_name) = "
                            "(%s, %s)").format(record), (table.schema, table.name))
        names = {name for (name,) in cur.fetchall()}
        if not names:
            continue
        statements.append(sql.SQL("DELETE FROM {} WHERE (table_schema, table_name) = ({}, {})")
                          .format(record, sql.Literal(table.schema), sql.Literal(table.name)))
        for found in memberships(cur.connection, table):
            if found.publication in names and found.named:
                statements += _republished(found, None)
                restored += 1
    return statements, restored


def _republished(found: Membership, columns: list[str] | None) -> list[sql.Composable]:
    """The table out of the publication and back in, with ``columns`` (None: all) and its
    row filter (the server's own text, read in this transaction)."""
    return [sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(found.publication), found.table.ident),
            add_table(found.publication, found.table, columns, found.row_filter)]


def add_table(publication: str, table: Table, columns: Sequence[str] | None,
              row_filter: str | None) -> sql.Composable:
    """``ALTER PUBLICATION ... ADD TABLE`` with ``columns`` (None: all) and the row filter
    (the server's own text, read in the same transaction)."""
    statement = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
        sql.Identifier(publication), table.ident)
    if columns is not None:
        statement += sql.SQL(" ({})").format(sqlexpr.column_list(list(columns)))
    if row_filter is not None:
        statement += sql.SQL(" WHERE ({})").format(sql.SQL(row_filter))
    return statement


def after_swap(conn: Connection, keys: Iterable[KeyColumn]) -> str:
    """What the subscribers of the plan's tables receive once the swap is done, for the
    operator; "" when no publication publishes them."""
    published = sorted({found.publication for table in _by_table(keys)
                        for found in memberships(conn, table)})
    if not published:
        return ""
    names = ", ".join(str(key) for key in keys)
    return (f"publication(s) {', '.join(published)}: their subscribers now receive {names} "
            "as uuid text, which their string columns take as they are (a subscription "
            "created WITH (binary = true) must be set to binary = false); migrate each "
            "subscriber on its own when it suits")
