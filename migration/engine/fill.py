"""Filling a key column's uuid copy: the runbook's temporary column, and its proofs.

For a column ``c`` of table ``t`` (``users.id`` or a ``user_id``):

1. add ``c_uuid uuid`` and a trigger that keeps it equal to ``c::uuid`` for
   rows anyone else writes meanwhile (instant DDL);
2. fill ``c_uuid`` in batches that walk the table's pages (``Walk``; a
   partitioned table by its walk key), a commit per batch, the position saved
   with each batch so an interruption resumes there; the table is cut into
   slices (one per ``--jobs``) filled on as many connections;
3. prove ``c_uuid = c::uuid`` in every row (and, for a NOT NULL column, that
   ``c_uuid`` is NOT NULL) with CHECK constraints added NOT VALID then
   validated (no exclusive lock while they scan); rows the batches missed
   are filled by one scan first.

What follows is ``expand`` (indexes and foreign keys built beside the
column), then ``swap``.  Every step looks at the catalog to see whether it is
already done, so the whole sequence can be run again after an interruption.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import Json

from migration import backup, catalog, publications
from migration.connection import Connection, lock_tables
from migration.errors import MigrationError
from migration.log import logger
from migration.model import KeyColumn, Table
from migration.progress import Progress
from migration.session import Session
from migration.sqlexpr import column_list, row_of

# How often a backfill writes its row count to migration_log (its checkpoint
# is saved with every batch; this is only what an operator watching sees).
PROGRESS_LOG_SECONDS = 1.0

# A string-typed default wrapping a uuid expression, as deparsed:
# "(gen_random_uuid())::text" or "(uuid_generate_v4())::character varying".
_STRING_CAST = re.compile(r"^\((?P<inner>.*)\)::(text|character varying(\(\d+\))?)$")
UUID_OID = 2950  # pg_type's oid of uuid, fixed in every PostgreSQL


def add_temporary_column(session: Session, key: KeyColumn,
                         follows: KeyColumn | None = None) -> None:
    """The uuid column, its sync trigger, and the slices its backfill will walk.

    ``follows``: on the way back, the parent key whose string copy the rows
    this column refers to have; rows written meanwhile take its spelling.

    The slices' bounds are sampled first, in a transaction of their own, so
    that the DDL holds its ACCESS EXCLUSIVE lock for catalog changes only
    (sampling inside it held the lock for 90 to 130 ms at 100k rows).
    """
    schema = session.plan.backup_schema
    with session.transaction() as cur:
        walk = fill_walk(cur.connection, key.table)
        bounds = slice_bounds(cur, key, walk, session.settings.jobs)
        copy_type = backup.recorded_type(cur, schema, key) if key.back else key.copy_type

    def work(cur: Cursor) -> None:
        # What needs no write-blocking lock first, under SHARE UPDATE EXCLUSIVE (no DDL,
        # the application writes on), all of it committed with the column: the reads, the
        # engine's own records and functions, and the publications' column lists, which
        # ALTER PUBLICATION changes under that same lock (a list of the table's columns
        # now is the one without the copy).  Then ACCESS EXCLUSIVE, NOWAIT first
        # (lock_tables: an ALTER's own request waits in the queue, and the application's
        # writes queue behind it), for one round trip of statements.
        lock_tables(cur, [key.table.ident], "SHARE UPDATE EXCLUSIVE")
        # in this transaction: no change that carries the copy is ever published
        publications.narrow(cur, schema, key.table)
        backup.record_names(cur, schema, key)
        cur.execute(backup.sync_functions(schema))
        default = copy_default_statement(cur, schema, key)
        lock_tables(cur, [key.table.ident], "ACCESS EXCLUSIVE")
        cur.execute(sql.SQL("; ").join([
            sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                key.table.ident, sql.Identifier(key.temp), copy_type),
            sql.SQL("COMMENT ON COLUMN {} IS {}").format(
                sql.Identifier(key.table.schema, key.table.name, key.temp),
                sql.Literal(key.mark)),
            *([] if default is None else [default]),
            *sync_trigger_statements(schema, key, follows),
            *progress_statements(schema, key, walk, bounds)]))

    session.ddl(f"add {key.temp} to {key.table}", work)


def progress_statements(schema: str, key: KeyColumn, walk: Walk,
                        bounds: list[Any]) -> list[sql.Composable]:
    """The slices the backfill of ``key`` will walk, recorded afresh.  A page walk's last
    slice ends at the table's end when the statement runs, under the lock that adds the
    copy and its sync trigger: rows written later are the sync trigger's, and the fill's
    own updates, which move rows to new pages at the end, are not walked again."""
    progress = backup.meta(schema, "backfill_progress")
    first, last = ((sql.Literal(Json(0)), sql.SQL("to_jsonb({})").format(
        catalog.heap_pages_expression(key.table))) if walk.pages
        else (sql.Literal(None), sql.Literal(None)))
    uppers = [*(sql.Literal(Json(bound)) for bound in bounds), last]
    lowers = [first, *(sql.Literal(Json(bound)) for bound in bounds)]
    where = (sql.Literal(key.table.schema), sql.Literal(key.table.name),
             sql.Literal(key.column))
    return [
        sql.SQL("DELETE FROM {} WHERE (table_schema, table_name, column_name) = ({}, {}, {})")
        .format(progress, *where),
        sql.SQL("INSERT INTO {} (table_schema, table_name, column_name, slice, walk_key, "
                "last_key, upper_key) VALUES {}").format(progress, sql.SQL(", ").join(
            sql.SQL("({}, {}, {}, {}, {}, {}, {})").format(
                *where, sql.Literal(number), sql.Literal(list(walk.columns)), lower, upper)
            for number, (lower, upper) in enumerate(zip(lowers, uppers, strict=True))))]


def copy_default(cur: Cursor, schema: str, key: KeyColumn) -> None:
    """Give the copy its default (``copy_default_statement``)."""
    statement = copy_default_statement(cur, schema, key)
    if statement is not None:
        cur.execute(statement)  # no parameters: % stays


def copy_default_statement(cur: Cursor, schema: str, key: KeyColumn) -> sql.Composable | None:
    """The statement giving the copy the default the swap will give the column
    (``converted_default_statement``, or ``restored_default_statement`` on the way back),
    once added: the rows it has stay NULL for the fill (a default given with ``ADD COLUMN``
    would be theirs too); None where the column has none.

    A foreign key's ``SET DEFAULT`` whose copy acts first sets the copy to its default,
    which must be the key's, as uuid, for the sync trigger to tell it (``SYNC_FUNCTIONS``).
    """
    info = catalog.column_info(cur.connection, key.table, key.column)
    if info is None or info.default is None:
        return None
    copy = KeyColumn(key.table, key.temp)
    if key.back:
        return restored_default_statement(copy, backup.saved_column(cur, schema, key).default,
                                          info.default)
    return converted_default_statement(copy, info.default,
                                       unwrapped=unwraps_to_uuid(cur, info.default))


def sync_trigger(cur: Cursor, schema: str, key: KeyColumn, follows: KeyColumn | None) -> None:
    """The trigger keeping ``key``'s copy equal to it (``backup.SYNC_FUNCTIONS``), created
    or replaced, and its functions with it: BEFORE every INSERT and UPDATE (a write to any
    column fills a copy the fill has not reached), ENABLE ALWAYS in this same transaction
    (writes with ``session_replication_role = replica`` fire it too), the engine's own
    writes left out by its WHEN (they fill the copies themselves, and respell them)."""
    cur.execute(backup.sync_functions(schema))
    cur.execute(sql.SQL("; ").join(sync_trigger_statements(schema, key, follows)))


def sync_trigger_statements(schema: str, key: KeyColumn,
                            follows: KeyColumn | None) -> list[sql.Composable]:
    """``sync_trigger``'s trigger, its functions already there."""
    sync, arguments = backup.meta(schema, "sync_uuid_column"), [key.column, key.temp]
    if follows is not None:
        sync = backup.meta(schema, "sync_reference_column")
        arguments += [follows.table.schema, follows.table.name, follows.column, follows.temp]
    name = sql.Identifier(key.helper("sync"))
    return [sql.SQL("CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW "
                    "WHEN ({}) EXECUTE FUNCTION {}({})").format(
                name, key.table.ident, backup.NOT_THE_ENGINE, sync,
                sql.SQL(", ").join(map(sql.Literal, arguments))),
            sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(key.table.ident, name)]


def stale_sync_trigger(cur: Cursor, schema: str, key: KeyColumn) -> bool | None:
    """Whether ``key``'s sync trigger was made by an older version (ENABLE ORIGIN, on
    ``UPDATE OF`` the key, without a WHEN), and if so whether it follows its parent's
    spelling (``sync_reference_column``); None when it is this version's, or absent."""
    cur.execute("SELECT tgenabled = 'A' AND cardinality(tgattr::int2[]) = 0 AND tgqual IS NOT "
                "NULL, tgfoid = to_regproc(%s) FROM pg_trigger "
                "WHERE tgrelid = to_regclass(%s) AND tgname = %s",
                (backup.meta(schema, "sync_reference_column").as_string(cur),
                 catalog.regclass(key.table), key.helper("sync")))
    row = cur.fetchone()
    return None if row is None or row[0] else bool(row[1])


def upgrade_triggers(session: Session, *, back: bool) -> None:
    """Bring the triggers a run of an older version made up to this one's, each table in a
    short transaction of its own: the change log's on the plan's tables, and the sync
    triggers of the plan's copies that exist (``back``: the string copies, on the way back),
    their functions (replaced: no table lock), and those copies' defaults (``copy_default``).
    """
    schema = session.plan.backup_schema
    plan = session.plan.reversed() if back else session.plan
    with session.transaction() as cur:
        stale_logs = [table for table in sorted(plan.tables)
                      if not backup.change_log_is_current(cur, schema, table)]
        stale_syncs = {key: stale_sync_trigger(cur, schema, key) for key in plan.columns}
        if any(catalog.is_engines(cur.connection, key) for key in plan.columns):
            cur.execute(backup.sync_functions(schema))
        no_default = [key for key in plan.columns if _copy_lacks_default(cur.connection, key)]
    for key in no_default:
        session.ddl(f"give {key.temp} its default on {key.table}",
                    partial(copy_default, schema=schema, key=key))
    for table in stale_logs:
        session.ddl(f"upgrade the change log on {table}",
                    partial(backup.upgrade_change_log, schema=schema, table=table))
    for key, follows in stale_syncs.items():
        if follows is not None:
            session.ddl(f"upgrade {key.helper('sync')} on {key.table}",
                        partial(sync_trigger, schema=schema, key=key,
                                follows=plan.parent if follows else None))


def _copy_lacks_default(conn: Connection, key: KeyColumn) -> bool:
    """Whether ``key``'s copy, the engine's, has no default while the key has one (an older
    version made it so)."""
    copy = catalog.column_info(conn, key.table, key.temp)
    original = catalog.column_info(conn, key.table, key.column)
    return (copy is not None and copy.default is None and original is not None
            and original.default is not None and catalog.is_engines(conn, key))


# Rows of the primary key sampled to cut a table into slices of about equal size.
SLICE_SAMPLE_ROWS = 10_000

# The passes a page walk makes over each block of pages (``Walk``): the first
# pass's updates find their pages full and move away (every index gets an entry for
# each), the later ones find the room the pass before them freed on the same page
# (HOT: no index entry).  More passes, more of them HOT; each pass reads its pages'
# tuples once more.  At 1M with full-page writes on (docs/benchmark.md), 8, 16 and 24
# passes wrote 13, 10 and 11 GB of WAL in full_migration, the key walk 20, in about the
# same time.
PAGE_PASSES = 16


@dataclass(frozen=True)
class Walk:
    """What a fill walks a table by, chosen once per column (``fill_walk``) and
    recorded with its slices, so that a resumed run walks the same way.

    ``PAGES`` (every plain table): the slice's pages are taken in blocks of
    ``2n``, each walked in passes over line pointer numbers: a batch is the rows
    of one half of the block (``n`` pages, read by a TID range scan, PostgreSQL
    14 and later) whose line pointer is in ``[k, k+m)``, the first half then the
    second, then the next ``m`` numbers, up to the highest number in the block
    when its first batch ran, ``m`` that number's share of ``PAGE_PASSES`` (so
    that a bloated block, its numbers high, is walked in as many passes; fewer for
    a slice of fewer batches), ``n`` pages of about ``--batch-size`` rows a pass
    (``page_batch``).  A batch thus
    updates a few rows of each of its pages, on pages that stay in the buffers
    for the block's passes: each page is read once (a walk by a random UUID key
    reads a page of a table larger than the buffers for nearly every row), and
    written to WAL whole once per checkpoint at most; a page's later passes find
    the room its earlier ones freed (pruned when the scan reads the page, a batch
    after the half's previous pass committed, when the other connections'
    snapshots no longer see it), so that most updates are HOT and add no index
    entry.  The checkpoint is the block, pass and half next, with the block's
    highest line pointer number (a page number alone, as an older version saved
    it, is the start of a block).

    Columns (a partitioned table, whose ``ctid`` names a row within one
    partition only: its primary key, else a unique key over NOT NULL columns;
    ``catalog.walk_key``): a batch is the next ``n`` keys after the checkpoint,
    the checkpoint the last key.

    A row that an application's UPDATE moves behind the checkpoint (a page or
    line pointer already walked, past the walk's end, a key already passed)
    gets its copy from the sync trigger, which fires for every write; one moved
    there by a write the trigger does not see (triggers disabled) while its
    copy is still empty is not walked again: the fill proof (``prove_filled``)
    finds it and ``fill_missed_rows`` fills it, which is what makes either walk
    complete.  A page walk ends at the table's last page when the column was
    added: the fill's own updates move rows to new pages past it, or to line
    pointer numbers past their block's highest, and are not walked again; a row
    the fill moves onto a page still ahead (space a VACUUM freed there) has its
    copy, and is passed by (``batch_statement``).
    """

    columns: tuple[str, ...]

    @property
    def pages(self) -> bool:
        return self.columns == (catalog.PAGES,)


def fill_walk(conn: Connection, table: Table) -> Walk:
    """How a new fill of ``table`` walks it (``Walk``): by pages, unless it is
    partitioned (its rows are its partitions', whose page numbers overlap)."""
    if catalog.is_partitioned(conn, table):
        return Walk(tuple(catalog.walk_key(conn, table)))
    return Walk((catalog.PAGES,))


def slice_bounds(cur: Cursor, key: KeyColumn, walk: Walk, slices: int) -> list[Any]:
    """Walk key values (jsonb objects; page numbers for ``PAGES``) that cut the table
    into ``slices`` ranges.

    Keys: quantiles of a sample of the key (the same sample every time, so
    that runs are repeatable): memory stays that of the sample, whatever the
    table's size.  A table too small to sample gets one slice.  Pages: equal
    shares of the table's pages now (exact, where ``relpages`` is only as
    recent as the last VACUUM).
    """
    if slices < 2:
        return []
    if walk.pages:
        pages = catalog.heap_pages(cur.connection, key.table)
        return sorted({pages * n // slices for n in range(1, slices)} - {0})
    pk = list(walk.columns)
    estimate = catalog.estimated_rows(cur.connection, key.table)
    percent = 100.0 if estimate <= SLICE_SAMPLE_ROWS else 100.0 * SLICE_SAMPLE_ROWS / estimate
    cur.execute(sql.SQL("SELECT to_jsonb(s) FROM (SELECT {pk} FROM {table} "
                        "TABLESAMPLE SYSTEM (%s) REPEATABLE (0)) s ORDER BY {s_pk}").format(
        pk=column_list(pk), table=key.table.ident, s_pk=column_list(pk, "s")), (percent,))
    sample = [value for (value,) in cur.fetchall()]
    cuts = {len(sample) * n // slices for n in range(1, slices)}
    return [sample[i - 1] for i in sorted(cuts) if i > 0]


def _pk_value(pk: list[str], key: KeyColumn, param: str) -> sql.Composable:
    """ROW(...) of a saved walk key (jsonb parameter ``param``) typed as the table's columns."""
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.SQL("(SELECT c.{} FROM jsonb_populate_record(NULL::{}, {}) c)").format(
            sql.Identifier(p), key.table.ident, sql.Placeholder(param)) for p in pk))


def batch_statement(key: KeyColumn, walk: Walk, *, first: bool, bounded: bool,
                    backup_schema: str, cast_only: bool = False) -> sql.Composable:
    """One batch: the next stretch of the slice after its checkpoint filled by a range
    update, and the new checkpoint saved, in one statement (one round trip per batch).

    The range is found on the walk key's index (or is a TID range scan of
    pages) and the update is a range scan of it: each batch costs the same
    wherever it is in the table, and nothing but the count and the new
    checkpoint comes back.  The checkpoint is NULL when the slice is walked.
    Only the rows whose copy is still to write are written, and counted: a row
    with no key (NULL) has its copy, NULL, and one whose copy the sync trigger
    wrote, or the fill before a move put it ahead of a page walk, has it too.
    ``cast_only``: the copies are the keys' casts (``KeyColumn.copy_of``).
    """
    ranges, within, checkpoint = (_pass_range(key) if walk.pages
                                  else _key_range(key, list(walk.columns), first=first,
                                                  bounded=bounded))
    return sql.SQL(
        """
        WITH {ranges}, done AS (
            UPDATE {table} x SET {temp} = {source}
            WHERE {within} AND x.{column} IS NOT NULL AND x.{temp} IS NULL
            RETURNING 1
        ), counted AS (
            SELECT count(*) AS n, {checkpoint} AS last_key FROM done
        ), saved AS (
            UPDATE {progress} SET last_key = c.last_key, rows_done = rows_done + c.n,
                   updated_at = clock_timestamp()
            FROM counted c
            WHERE c.last_key IS NOT NULL
              AND (table_schema, table_name, column_name, slice) = %(slice)s
        )
        SELECT n, last_key FROM counted
        """
    ).format(ranges=ranges, table=key.table.ident, temp=sql.Identifier(key.temp),
             column=sql.Identifier(key.column),
             source=key.copy_of(sql.Identifier("x", key.column), cast_only=cast_only),
             within=within, checkpoint=checkpoint,
             progress=backup.meta(backup_schema, "backfill_progress"))


def _key_range(key: KeyColumn, pk: list[str], *, first: bool,
               bounded: bool) -> tuple[sql.Composable, sql.Composable, sql.Composable]:
    """The next ``n`` keys after the checkpoint (up to the slice's inclusive upper
    bound): the CTEs that find them, the update's condition, the new checkpoint."""
    conditions = []
    if not first:
        conditions.append(sql.SQL("{} > {}").format(row_of(pk), _pk_value(pk, key, "after")))
    if bounded:
        conditions.append(sql.SQL("{} <= {}").format(row_of(pk), _pk_value(pk, key, "upper")))
    x_after = (sql.SQL("true") if first
               else sql.SQL("{} > {}").format(row_of(pk, "x"), _pk_value(pk, key, "after")))
    descending = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(p)) for p in pk)
    upper = sql.SQL("ROW({})").format(sql.SQL(", ").join(
        sql.SQL("(SELECT u.{} FROM upper u)").format(sql.Identifier(p)) for p in pk))
    ranges = sql.SQL(
        """batch AS MATERIALIZED (
            SELECT {pk} FROM {table} WHERE {within} ORDER BY {pk} LIMIT %(n)s
        ), upper AS (
            SELECT {pk} FROM batch ORDER BY {descending} LIMIT 1
        )""").format(pk=column_list(pk), table=key.table.ident,
                     within=sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true"),
                     descending=descending)
    within = sql.SQL("{} AND {} <= {}").format(x_after, row_of(pk, "x"), upper)
    return ranges, within, sql.SQL("(SELECT to_jsonb(u) FROM upper u)")


def _page_range() -> tuple[sql.Composable, sql.Composable, sql.Composable]:
    """Pages ``[after, least(after + n, upper))``: the CTE that computes them, the
    update's condition (a TID range), the new checkpoint (the next page)."""
    ranges = sql.SQL(
        """pages AS (
            SELECT format('(%%s,0)', s)::tid AS start, format('(%%s,0)', e)::tid AS stop, e
            FROM (SELECT (%(after)s::jsonb)::bigint, (%(upper)s::jsonb)::bigint) b (s, u)
            CROSS JOIN LATERAL (SELECT least(s + %(n)s, u)) l (e)
            WHERE s < u
        )""")
    within = sql.SQL("x.ctid >= (SELECT start FROM pages) AND x.ctid < (SELECT stop FROM pages)")
    return ranges, within, sql.SQL("(SELECT to_jsonb(e) FROM pages)")


# A row's line pointer number, from its ctid (no function of PostgreSQL returns it).
LINE_POINTER = "({}.ctid::text::point)[1]"


def _pass_range(key: KeyColumn) -> tuple[sql.Composable, sql.Composable, sql.Composable]:
    """A page walk's batch (``Walk``): the half-block of ``n`` pages and the line pointer
    numbers ``[k, k+m)`` of the checkpoint (``after``) within ``[after, upper)``: the CTE
    that computes them (the block's highest number read by its first batch), the
    update's condition, the next checkpoint (a page number past the slice's end last,
    whose batch finds no block and ends the slice).  A block keeps the ``n`` it began
    with (in the checkpoint): a run resumed with other estimates changes the next one."""
    line_pointer = sql.SQL(LINE_POINTER)
    ranges = sql.SQL(
        """resume AS (
            SELECT (CASE jsonb_typeof(a) WHEN 'object' THEN a -> 'page' ELSE a END)::bigint AS b,
                   coalesce((a ->> 'offset')::int, 1) AS k,
                   coalesce((a ->> 'half')::int, 0) AS h,
                   (a ->> 'last')::int AS last, (%(upper)s::jsonb)::bigint AS u,
                   coalesce((a ->> 'pages')::int, %(n)s) AS n
            FROM (SELECT %(after)s::jsonb) i (a)
        ), block AS (
            SELECT b, k, h, u, n,
                   coalesce(last, (SELECT max({y_line_pointer})::int FROM {table} y
                                   WHERE y.ctid >= format('(%%s,0)', b)::tid
                                     AND y.ctid < format('(%%s,0)', least(b + 2 * n, u))::tid
                                  )) AS last
            FROM resume WHERE b < u
        ), pass AS (
            SELECT b, k, h, u, n, last,
                   k + ceil(last / %(passes)s::numeric)::int - 1 AS k_end,
                   format('(%%s,0)', least(b + h * n, u))::tid AS start,
                   format('(%%s,0)', least(b + (h + 1) * n, u))::tid AS stop
            FROM block
        )""").format(y_line_pointer=line_pointer.format(sql.Identifier("y")),
                     table=key.table.ident)
    within = sql.SQL(
        "x.ctid >= (SELECT start FROM pass) AND x.ctid < (SELECT stop FROM pass) "
        "AND {} BETWEEN (SELECT k FROM pass) AND (SELECT k_end FROM pass)").format(
        line_pointer.format(sql.Identifier("x")))
    checkpoint = sql.SQL(
        """(SELECT CASE
                WHEN h = 0 AND b + n < u
                    THEN jsonb_build_object('page', b, 'offset', k, 'half', 1, 'last', last,
                                            'pages', n)
                WHEN k_end < last
                    THEN jsonb_build_object('page', b, 'offset', k_end + 1, 'half', 0,
                                            'last', last, 'pages', n)
                ELSE to_jsonb(b + 2 * n) END
            FROM pass)""")
    return ranges, within, checkpoint


@dataclass(frozen=True)
class Slice:
    """A range of one column's backfill (pages, or keys: ``Walk``), walked by one connection."""

    key: KeyColumn
    walk: Walk
    number: int
    last_key: Any  # the checkpoint (jsonb object of the key), None before the first batch;
    # for pages, the next block, pass and half (``Walk``), first the slice's first page
    upper_key: Any  # inclusive upper bound, None for the last slice; for pages, exclusive
    rows_done: int
    share: float  # of the table's rows, to start the largest slices first

    def __str__(self) -> str:
        return f"{self.key} slice {self.number}"


def slices_of(session: Session, key: KeyColumn) -> list[Slice]:
    """The column's slices still to fill."""
    with session.transaction() as cur:
        cur.execute(sql.SQL("SELECT slice, walk_key, last_key, upper_key, rows_done, finished, "
                            "count(*) OVER () FROM {} WHERE (table_schema, table_name, "
                            "column_name) = (%s, %s, %s) ORDER BY slice").format(
            backup.meta(session.plan.backup_schema, "backfill_progress")),
            (key.table.schema, key.table.name, key.column))
        rows = cur.fetchall()
    return [Slice(key, Walk(tuple(walk)), number, last_key, upper_key, int(done), 1 / count)
            for number, walk, last_key, upper_key, done, finished, count in rows
            if not finished]


def fill_settings(session: Session) -> list[str]:
    """SET LOCALs for a transaction of the engine's fill: application triggers kept
    quiet where the role may (the fill sets the uuid column itself, so the engine's
    sync trigger need not fire either); with ``--allow-triggers`` the role's own
    search_path, so that unqualified names in the triggers that do fire resolve.
    The pre-flight has named (and, without the option, refused) any that fire."""
    statements = []
    if catalog.may_skip_triggers(session.conn):
        statements.append("SET LOCAL session_replication_role = replica")
    if session.settings.allow_triggers:
        statements.append("SET LOCAL search_path TO DEFAULT")
    return statements


def backfill(session: Session, part: Slice, run_id: int, progress: Progress,
             stop: threading.Event | None = None) -> int:
    """Fill one slice batch by batch from its checkpoint; rows written.

    Each batch is a ``Session.ddl`` transaction: a row an application holds
    is waited for ``lock_timeout`` at most, then the batch gives back the rows
    it took and is tried again.  ``stop`` ends it between two batches (a
    sibling slice failed); the checkpoint is then where the next run resumes.
    """
    key = part.key
    settings = fill_settings(session)
    if part.rows_done:
        logger.info("%s: resuming after %s (%s rows done)", part, part.last_key, part.rows_done)
    statements = {(first, cast_only): batch_statement(
        key, part.walk, first=first, bounded=part.upper_key is not None,
        backup_schema=session.plan.backup_schema, cast_only=cast_only)
        for first in (True, False) for cast_only in (True, False)}
    size, passes = (page_batch(session, part) if part.walk.pages
                    else (session.settings.batch_size, 1))
    identity = (key.table.schema, key.table.name, key.column, part.number)

    def batch(cur: Cursor, after: Any, logged: int | None, *,
              cast_only: bool) -> tuple[int, Any]:
        """One batch; ``logged``: the rows to add to migration_log's count with it, if due."""
        for setting in settings:
            cur.execute(setting)
        cur.execute(statements[after is None, cast_only], {
            "n": size, "passes": passes, "after": Json(after), "upper": Json(part.upper_key),
            "slice": identity})
        count, new_key = cur.fetchone() or (0, None)
        if new_key is None:
            cur.execute(sql.SQL("UPDATE {} SET finished = true, updated_at = "
                                "clock_timestamp() WHERE (table_schema, table_name, "
                                "column_name, slice) = %s").format(
                backup.meta(session.plan.backup_schema, "backfill_progress")), (identity,))
        elif logged is not None:
            session.log.progress(cur, run_id, logged + count)
        return count, new_key

    last_key, written, unlogged = part.last_key, 0, 0
    logged_at = time.monotonic()
    while stop is None or not stop.is_set():
        session.lag.wait(session, progress, stop)  # between batches: no lock held
        if stop is not None and stop.is_set():
            break
        started = time.monotonic()
        due = time.monotonic() - logged_at >= PROGRESS_LOG_SECONDS
        step = partial(batch, after=last_key, logged=unlogged if due else None)
        try:  # the keys' casts alone: uuid_copy's regular expression costs 14 times more
            count, new_key = session.ddl(f"batch {key}", partial(step, cast_only=True))
        except psycopg2.errors.InvalidTextRepresentation:
            # a key in the batch is no UUID (written since the pre-flight): the batch was
            # rolled back; again, with uuid_copy's stand-in for it
            count, new_key = session.ddl(f"batch {key}", partial(step, cast_only=False))
        if new_key is None:
            break
        written += count
        unlogged, logged_at = (0, time.monotonic()) if due else (unlogged + count, logged_at)
        last_key = new_key
        progress.advance(count)
        session.pace.wait(count, started, stop)  # committed: no lock held
    with session.transaction() as cur:
        session.log.progress(cur, run_id, unlogged)
    logger.info("%s: backfill %s, %s rows", part,
                "stopped" if stop is not None and stop.is_set() else "done",
                part.rows_done + written)
    return written


def walked_update(session: Session, key: KeyColumn, label: str,
                  update: Callable[[sql.Composable], sql.Composable]) -> int:
    """An UPDATE of a whole table in batches that walk it as the fill does; rows updated.

    ``update(within)`` is the statement (the table aliased ``x``, ``RETURNING
    1``), ``within`` the batch's range of walk keys (or pages) in its WHERE.
    Each batch is a ``Session.ddl`` transaction, so the engine never holds an
    application's rows across batches, nor waits for one longer than
    ``lock_timeout`` before it gives its own back and tries again (one UPDATE
    of the table held every row it had updated while it waited, without a
    bound, for one an application held).  Pages are walked up to the table's
    end when the walk begins.
    """
    with session.transaction() as cur:
        walk = Walk(tuple(catalog.walk_key(cur.connection, key.table)))
        end = catalog.heap_pages(cur.connection, key.table) if walk.pages else None
    size = batch_pages(session, key) if walk.pages else session.settings.batch_size
    settings = fill_settings(session)
    statements = {}
    for first in (True, False):
        ranges, within, checkpoint = (_page_range() if walk.pages
                                      else _key_range(key, list(walk.columns), first=first,
                                                      bounded=False))
        statements[first] = sql.SQL("WITH {}, done AS ({}) SELECT count(*), {} FROM done").format(
            ranges, update(within), checkpoint)

    def batch(cur: Cursor, after: Any) -> tuple[int, Any]:
        for setting in settings:
            cur.execute(setting)
        cur.execute(statements[after is None], {"n": size, "after": Json(after),
                                                "upper": Json(end)})
        count, checkpoint = cur.fetchone() or (0, None)
        return int(count), checkpoint

    updated, after = 0, 0 if walk.pages else None
    while True:
        session.lag.wait(session)
        started = time.monotonic()
        count, checkpoint = session.ddl(label, partial(batch, after=after))
        updated += count
        if checkpoint is None:
            return updated
        after = checkpoint
        session.pace.wait(count, started)


def batch_pages(session: Session, key: KeyColumn) -> int:
    """Pages in a batch of a page walk: about ``--batch-size`` rows, at least one page."""
    pages, rows = _pages_and_rows(session, key)
    return _pages_holding(session.settings.batch_size, pages, rows)


def page_batch(session: Session, part: Slice) -> tuple[int, int]:
    """``(n, passes)`` of a slice's page walk (``Walk``): ``PAGE_PASSES``, fewer where the
    slice holds fewer batches than that (a small table in one batch, not sixteen), and
    ``n`` for about ``--batch-size`` rows a batch."""
    pages, rows = _pages_and_rows(session, part.key)
    batches = int(rows * part.share) // session.settings.batch_size
    passes = max(1, min(PAGE_PASSES, batches))
    return _pages_holding(session.settings.batch_size * passes, pages, rows), passes


def _pages_and_rows(session: Session, key: KeyColumn) -> tuple[int, int]:
    """The pages of ``key``'s table now and its estimated rows, read outside any transaction
    of the fill's (the read one is ended)."""
    pages = catalog.heap_pages(session.conn, key.table)
    rows = catalog.estimated_rows(session.conn, key.table)
    session.conn.rollback()
    return pages, rows


def _pages_holding(wanted: int, pages: int, rows: int) -> int:
    """The pages that hold about ``wanted`` of a table's ``rows`` (at least one)."""
    return max(1, wanted * pages // rows) if rows else 1


def refuse_taken(session: Session, keys: tuple[KeyColumn, ...]) -> None:
    """Refuse when a column of a copy's name exists and is not the engine's (no mark).

    The pre-flight refuses these; a rollback after the swap runs none, so it
    asks for all its columns before it changes anything, and the fill asks again.
    """
    taken = [key for key in keys if not catalog.is_engines(session.conn, key)
             and catalog.column_info(session.conn, key.table, key.temp) is not None]
    session.conn.rollback()
    if taken:
        raise MigrationError("refused, nothing was changed: " + ", ".join(
            f"{key.table}.{key.temp}" for key in taken) + " is the application's, not a "
            "copy the migration made", hint="rename the application's column, then run again")


def fill(session: Session, keys: tuple[KeyColumn, ...], run_id: int,
         follows: dict[KeyColumn, KeyColumn] | None = None) -> int:
    """Add the temporary columns of ``keys`` and fill them; rows written.

    Every slice of every column goes to a queue served by ``jobs``
    connections, largest first: the batched UPDATE keeps one core of the
    server busy, and a server with cores to spare fills several slices in the
    time of one.  Each slice keeps its own checkpoint, so an interruption
    resumes every one of them.  With one job the engine's own connection
    does it all, slice after slice.  ``follows`` maps a column, on the way
    back, to the parent key whose spelling its rows take (``add_temporary_column``).
    """
    refuse_taken(session, keys)
    upgrade_triggers(session, back=any(key.back for key in keys))
    for key in keys:
        if catalog.column_info(session.conn, key.table, key.temp) is None:
            add_temporary_column(session, key, (follows or {}).get(key))
    rows = {key: catalog.estimated_rows(session.conn, key.table) for key in keys}
    parts = sorted((part for key in rows for part in slices_of(session, key)),
                   key=lambda p: -rows[p.key] * p.share)
    session.conn.rollback()  # no snapshot held open on this connection while they work
    if not parts:
        return 0
    progress = session.progress("fill " + ", ".join(str(key) for key in rows),
                                int(sum(rows[part.key] * part.share for part in parts)),
                                resumed=sum(part.rows_done for part in parts))
    try:
        return _fill_slices(session, parts, run_id, progress)
    finally:
        progress.close()


def _fill_slices(session: Session, parts: list[Slice], run_id: int,
                 progress: Progress) -> int:
    if session.settings.jobs < 2 or len(parts) < 2:
        return sum(backfill(session, part, run_id, progress) for part in parts)
    stop = threading.Event()

    def work(part: Slice) -> int:
        try:
            with session.worker() as worker:
                return backfill(worker, part, run_id, progress, stop)
        except BaseException:
            stop.set()  # the others stop at their next batch
            raise

    with ThreadPoolExecutor(max_workers=min(session.settings.jobs, len(parts)),
                            thread_name_prefix="fill") as pool:
        futures = [pool.submit(work, part) for part in parts]
        try:
            wait(futures)
        finally:
            stop.set()  # on an interrupt too: the fills stop at their next batch
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return sum(future.result() for future in futures)


def prove_filled(session: Session, key: KeyColumn, run_id: int) -> None:
    """Validated CHECKs that the fill is complete and right, before anything is dropped.

    ``filled``: every row's uuid column holds its string cast to uuid.  It
    names the old column, so the swap's DROP COLUMN drops it too.  When rows
    fail it, the batches missed them, and they are filled before it is
    validated again (see ``fill_missed_rows``).
    ``not_null`` (NOT NULL columns): the uuid column has no NULL, which lets
    the swap's SET NOT NULL skip its scan; it must name the uuid column only
    to outlive that drop, and SET NOT NULL must come after the rename so that
    PostgreSQL 18 names the constraint it creates after the column's name.
    Each is added NOT VALID, then both are validated by one ``ALTER TABLE``,
    which checks them in one scan of the table (two statements scanned it
    twice): no exclusive lock while it scans.  A row that fails either was
    missed by the batches (with the column NOT NULL, a filled row has a copy),
    so on a failure the missed rows are filled and both validated again.
    """
    temp, column = sql.Identifier(key.temp), sql.Identifier(key.column)
    with session.transaction() as cur:
        not_null = backup.saved_column(cur, session.plan.backup_schema, key).not_null
    proofs = {key.helper("filled"): key.same_value(temp, column)}
    if not_null:
        proofs[key.helper("not_null")] = sql.SQL("{} IS NOT NULL").format(temp)
    for name, condition in proofs.items():
        session.ddl(f"add {name}", partial(_add_check, key=key, name=name, condition=condition))
    validate = partial(validate_constraints, table=key.table, names=list(proofs))
    label = f"validate {key.helper('filled')}"
    try:
        session.ddl(label, validate)
    except psycopg2.errors.CheckViolation:
        fill_missed_rows(session, key, run_id)
        session.ddl(label, validate)


def fill_missed_rows(session: Session, key: KeyColumn, run_id: int) -> None:
    """Fill the rows the batches missed, in one more walk of the table (``walked_update``).

    A row is missed when a write moves it behind a slice's checkpoint while
    the fill runs: it changes its walk key, or (a page walk) an UPDATE puts
    its new version on a page already walked or past the walk's end.  The
    sync trigger fills the copy of every row the application writes, so only
    a write it does not see (the table's triggers disabled) leaves one.  Left
    so, a nullable reference would become NULL at the swap.  The ``filled``
    CHECK, already in force for new writes, keeps any more from appearing, so
    after this walk it validates.
    """
    temp, column = sql.Identifier(key.temp), sql.Identifier(key.column)
    missed = walked_update(session, key, f"fill missed {key}", lambda within: sql.SQL(
        "UPDATE {table} x SET {temp} = {copy} WHERE {within} AND NOT {same} "
        "RETURNING 1").format(table=key.table.ident, temp=temp,
                              copy=key.copy_of(sql.Identifier("x", key.column)),
                              within=within, same=key.same_value(temp, column)))
    with session.transaction() as cur:
        session.log.progress(cur, run_id, missed)
    logger.warning("%s: %s rows were missed by the batches (a write moved them behind the "
                   "fill's checkpoint while it ran); filled them in one more walk", key, missed)


def _add_check(cur: Cursor, key: KeyColumn, name: str, condition: sql.Composable) -> None:
    """The CHECK ``NOT VALID``, its table's ACCESS EXCLUSIVE asked ``NOWAIT`` first
    (``lock_tables``): the ALTER's own request would wait in the queue, the application's
    writes queued behind it."""
    if catalog.constraint_validity(cur.connection, key.table, name) is None:
        lock_tables(cur, [key.table.ident], "ACCESS EXCLUSIVE")
        cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}) NOT VALID").format(
            key.table.ident, sql.Identifier(name), condition))


def converted_default(cur: Cursor, key: KeyColumn, default: str) -> None:
    """Give the uuid column the old default (``converted_default_statement``)."""
    cur.execute(converted_default_statement(key, default,
                                            unwrapped=unwraps_to_uuid(cur, default)))


def unwraps_to_uuid(cur: Cursor, default: str) -> bool:
    """Whether a string column's default is a uuid expression cast to the string type
    (``gen_random_uuid()::text``).  The server says it: the type of the expression's
    result, from a query that fetches no row (``LIMIT 0`` evaluates nothing, a
    ``nextval()`` included) and locks nothing, so the swap can ask before its
    write-blocking locks."""
    match = _STRING_CAST.match(default)
    if match is None:
        return False
    cur.execute(sql.SQL("SELECT {} LIMIT 0").format(sql.SQL(match["inner"])))
    return cur.description is not None and cur.description[0].type_code == UUID_OID


def converted_default_statement(key: KeyColumn, default: str, *,
                                unwrapped: bool) -> sql.Composable:
    """The statement giving the uuid column the old default: unwrapped
    (``gen_random_uuid()::text`` becomes ``gen_random_uuid()``) where it is a uuid
    expression cast to a string (``unwraps_to_uuid``); any other kept, cast to uuid."""
    match = _STRING_CAST.match(default)
    expression = (sql.SQL(match["inner"]) if unwrapped and match
                  else sql.SQL("({})::uuid").format(sql.SQL(default)))
    return sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
        key.table.ident, sql.Identifier(key.column), expression)


_UUID_CAST = re.compile(r"^\((?P<inner>.*)\)::uuid$")


def restored_default_statement(key: KeyColumn, recorded: str | None,
                               live: str | None) -> sql.Composable | None:
    """On the way back, the string column's default: the one the backup recorded, derived
    from the uuid column's ``live`` one (``converted_default_statement``'s inverse), so that the
    record's text is never run; None where there is none to set.

    ``X`` was made of ``(X)::text`` (or ``character varying``): it becomes that cast of
    ``X`` again; ``(R)::uuid`` was made of any other ``R``: it becomes ``R``.  A uuid
    default that is neither (changed since the migration) is kept, cast to text, with a
    warning; a default dropped since, with none.
    """
    if live is None:
        if recorded is not None:
            logger.warning("%s: its default was dropped since the migration; the string "
                           "column gets none (the backup recorded %s)", key, recorded)
        return None
    string_cast = _STRING_CAST.match(recorded or "")
    uuid_cast = _UUID_CAST.match(live)
    expression: sql.Composable
    if string_cast and string_cast["inner"] == live:  # the cast's type: as the pattern reads
        expression = sql.SQL("({})::{}").format(sql.SQL(live), sql.SQL(string_cast[2]))
    elif uuid_cast and uuid_cast["inner"] == recorded:
        expression = sql.SQL(uuid_cast["inner"])
    else:
        logger.warning("%s: its default %s is not the one the migration gave it (the backup "
                       "recorded %s); the string column keeps it, cast to text",
                       key, live, recorded)
        expression = sql.SQL("({})::text").format(sql.SQL(live))
    return sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
        key.table.ident, sql.Identifier(key.column), expression)


COLUMN_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "REFERENCES"}


def grant_statement(key: KeyColumn, grant: catalog.ColumnGrant) -> sql.Composable:
    """The GRANT that gives the new column a privilege the old one had."""
    if grant.privilege not in COLUMN_PRIVILEGES:
        raise MigrationError(f"unexpected column privilege {grant.privilege!r} on {key}")
    return sql.SQL("GRANT {} ({}) ON {} TO {}{}").format(
        sql.SQL(grant.privilege), sql.Identifier(key.column), key.table.ident,
        sql.SQL("PUBLIC") if grant.grantee is None else sql.Identifier(grant.grantee),
        sql.SQL(" WITH GRANT OPTION") if grant.grantable else sql.SQL(""))


def validate_constraints(cur: Cursor, table: Table, names: list[str]) -> None:
    """VALIDATE CONSTRAINT of several CHECKs in one ALTER TABLE: PostgreSQL checks them
    all in one scan of the table (15 and 18, measured by ``pg_stat_user_tables``)."""
    cur.execute("SET LOCAL statement_timeout = 0")
    cur.execute(sql.SQL("ALTER TABLE {} {}").format(table.ident, sql.SQL(", ").join(
        sql.SQL("VALIDATE CONSTRAINT {}").format(sql.Identifier(name)) for name in names)))


def validate_constraint(cur: Cursor, table: Table, name: str) -> None:
    """VALIDATE CONSTRAINT: a scan as long as the table, under a lock that lets writes on."""
    cur.execute("SET LOCAL statement_timeout = 0")
    cur.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
        table.ident, sql.Identifier(name)))
