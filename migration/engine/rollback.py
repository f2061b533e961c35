"""Undoing the migration from any stage, and the orphan quarantine it restores.

Before the swap, ``discard`` drops what the migration built beside the
untouched columns.  After it, ``revert`` runs the engine the other way.  Both
work in short steps that never hold a lock the application waits on for
longer than a swap, both resume after an interruption, and neither touches a
row the application wrote: the tables come back as the backup recorded them
(types, defaults, constraints and indexes by name, every id with its original
spelling, quarantined rows in place), with the application's own writes since
the backup kept and reported from the change log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, publications, views
from migration.catalog import ColumnState
from migration.engine import contract, expand, fill, pipeline
from migration.errors import MigrationError
from migration.model import KeyColumn, Table
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.rows import orphan_condition
from migration.session import Session, lift_statement_timeout
from migration.sqlexpr import column_list, prepare_uuid_checker, uuid_of


def quarantine(session: Session, cur: Cursor, *, key: KeyColumn) -> int:
    """Move the orphan rows of ``key`` into the backup schema; rows moved."""
    cur.execute("SELECT conname, conrelid::regclass::text FROM pg_constraint "
                "WHERE contype = 'f' AND confrelid = to_regclass(%s)",
                (catalog.regclass(key.table),))
    referencing = cur.fetchall()
    if referencing:
        raise MigrationError(
            f"cannot quarantine rows of {key.table}: other tables reference it "
            f"({', '.join(f'{t} ({c})' for c, t in referencing)}), and moving rows would "
            "cascade to them", hint="resolve the orphans by hand, then run again")
    columns = [c for c in backup.columns_of(cur, key.table.ident) if c != key.temp]
    schema = session.plan.backup_schema
    target = backup.quarantine_name(schema, key.table)
    backup.create_private(cur, target, sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
        target, column_list(columns), key.table.ident))
    cur.execute(sql.SQL(
        "WITH moved AS (DELETE FROM {table} t WHERE {orphan} RETURNING {cols}) "
        "INSERT INTO {target} ({plain}) SELECT {plain} FROM moved").format(
        table=key.table.ident, orphan=orphan_condition(cur, key, session.plan.parent),
        cols=column_list(columns, "t"), target=target, plain=column_list(columns)))
    moved = cur.rowcount
    cur.execute(sql.SQL(
        "INSERT INTO {} VALUES (%s, %s, %s, %s) ON CONFLICT (table_schema, table_name) "
        "DO UPDATE SET row_count = quarantine.row_count + excluded.row_count").format(
        backup.meta(schema, "quarantine")),
        (key.table.schema, key.table.name, target.strings[1], moved))
    return int(moved)


@dataclass
class RollbackResult:
    message: str
    rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


def _keys_by_table(session: Session) -> dict[Table, list[KeyColumn]]:
    grouped: dict[Table, list[KeyColumn]] = {}
    for key in session.plan.columns:
        grouped.setdefault(key.table, []).append(key)
    return grouped


def _pk_join(pk: list[str], converted: set[str]) -> sql.Composable:
    """Live row l to backup row b by primary key, whatever type the key has now."""
    return sql.SQL(" AND ").join(
        sql.SQL("l.{p} = (b.{p})::uuid" if p in converted else "l.{p} = b.{p}").format(
            p=sql.Identifier(p)) for p in pk)


_CONTENT_COLUMNS = ["migration_row", "migration_nth"]


def _numbered_content(cur: Cursor, schema: str, table: Table, converted: set[str]) -> tuple[
        sql.Composable, sql.Composable, sql.Composable, sql.Composable]:
    """For ``changed_rows``, a table whose rows have only their content: the backup and
    the live table with each row's ``content`` and its number among equal rows, the
    join on both (so that one more or one fewer duplicate shows), and the condition
    that a quarantined row q is the backup's row b."""
    columns = backup.columns_of(cur, backup.backup_name(schema, table))

    def as_uuid(value: sql.Composable) -> sql.Composable:
        return sql.SQL("({})::uuid").format(value)

    def numbered(relation: sql.Identifier, text: sql.Composable) -> sql.Composable:
        return sql.SQL("(SELECT r.*, {text} AS {row}, row_number() OVER (PARTITION BY {text}) "
                       "AS {nth} FROM {relation} r)").format(
            text=text, relation=relation, row=sql.Identifier(_CONTENT_COLUMNS[0]),
            nth=sql.Identifier(_CONTENT_COLUMNS[1]))

    frozen = frozenset(converted)
    row, nth = (sql.Identifier(c) for c in _CONTENT_COLUMNS)
    return (numbered(backup.backup_name(schema, table), content(columns, "r", as_uuid, frozen)),
            numbered(table.ident, content(columns, "r")),
            sql.SQL("l.{row} = b.{row} AND l.{nth} = b.{nth}").format(row=row, nth=nth),
            sql.SQL("{} = b.{}").format(content(columns, "q", as_uuid, frozen), row))


def changed_rows(cur: Cursor, session: Session) -> list[Finding]:
    """Rows inserted, changed or deleted since the backup, table by table.

    The application's writes are counted from the change log (INFO: the
    rollback keeps them); any other difference from the backup, a write the log
    did not see, is reported apart (WARN).  Each row is named by its key (its
    primary key, else its key columns), never by its content: the findings go
    to migration_log and the output, and no application data leaves the backup.
    """
    findings = []
    for table, keys in _keys_by_table(session).items():
        log = backup.change_log(cur, session.plan.backup_schema, table, keys)
        ignored = [k.column for k in keys] + [k.temp for k in keys]
        findings += _logged_changes(cur, table, log)
        findings += _unlogged_changes(cur, table, keys, log, ignored)
    return findings


def _logged_changes(cur: Cursor, table: Table, log: backup.ChangeLog) -> list[Finding]:
    """The rows in the change log, each by its logged key, with its last logged write."""
    if not log.columns:
        return []
    cur.execute(sql.SQL(
        """
        WITH {logged}, last AS (
            SELECT g.row_key, (SELECT c.operation FROM {change_log} c
                               WHERE (c.table_schema, c.table_name, c.row_key)
                                     = (%(log_schema)s, %(log_table)s, g.row_key)
                               ORDER BY c.id DESC LIMIT 1) AS operation
            FROM logged g)
        SELECT CASE operation WHEN 'INSERT' THEN 'inserted' WHEN 'DELETE' THEN 'deleted'
                              WHEN 'TRUNCATE' THEN 'truncated'
                              ELSE 'changed' END AS kind, count(*) OVER () AS total, row_key
        FROM last ORDER BY 1, row_key LIMIT %(n)s
        """).format(logged=log.cte(), change_log=backup.meta(log.schema, "change_log")),
        {"n": SAMPLE_LIMIT, **log.params})
    rows = cur.fetchall()
    findings = []
    if rows:
        truncated = "; it truncated the table: the backup's rows are not put back" \
            if log.truncated(cur) else ""
        findings.append(Finding(
            "changed_after_backup", Status.INFO,
            f"{rows[0][1]} row(s) were inserted, changed or deleted by the application after "
            f"the backup (change log){truncated}", subject=str(table), count=int(rows[0][1]),
            samples=[{"change": kind, "key": key} for kind, _, key in rows],
            hint="the rollback keeps them as the application left them (new ids as canonical "
                 "text)"))
    odd, keys = log.not_uuids(cur)
    if odd:
        findings.append(Finding(
            "changed_after_backup", Status.WARN,
            f"{odd} key(s) in the change log are not UUIDs: the application wrote them after "
            "the backup; they match no row", subject=str(table), count=odd, samples=keys,
            hint="find out which client writes such ids"))
    return findings


def _unlogged_changes(cur: Cursor, table: Table, keys: list[KeyColumn],
                      log: backup.ChangeLog, ignored: list[str]) -> list[Finding]:
    """Rows that differ from the backup without being in the change log."""
    conn = cur.connection
    pk = _primary_key(cur, log.schema, table, keys)
    converted = {k.column for k in keys if catalog.column_state(conn, k) is ColumnState.UUID}
    same_keys = sql.SQL(" AND ").join(
        sql.SQL("l.{c} IS NOT DISTINCT FROM (b.{c})::uuid" if k.column in converted
                else "l.{c} IS NOT DISTINCT FROM b.{c}").format(c=sql.Identifier(k.column))
        for k in keys)
    quarantined = backup.quarantine_name(log.schema, table)
    saved: sql.Composable = backup.backup_name(log.schema, table)
    live: sql.Composable = table.ident
    join: sql.Composable
    same_row: sql.Composable
    if pk:
        join, same_row = _pk_join(pk, converted), sql.SQL(" AND ").join(
            sql.SQL("q.{p} = b.{p}").format(p=sql.Identifier(p)) for p in pk)
    else:  # rows told apart by their content alone
        saved, live, join, same_row = _numbered_content(cur, log.schema, table, converted)
        ignored = ignored + _CONTENT_COLUMNS
    in_quarantine: sql.Composable = sql.SQL("false")
    if catalog.relation_exists(conn, quarantined):
        in_quarantine = sql.SQL("EXISTS (SELECT 1 FROM {} q WHERE {})").format(
            quarantined, same_row)
    named_by = pk or [k.column for k in keys]  # no primary key: the key columns name it
    row_key = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{c}, coalesce(to_jsonb(l) -> {c}, to_jsonb(b) -> {c})").format(c=sql.Literal(c))
        for c in named_by))
    cur.execute(sql.SQL(
        """
        WITH {logged}
        SELECT kind, count(*) OVER (), row_key FROM (
            SELECT CASE WHEN b IS NULL THEN 'inserted'
                        WHEN l IS NULL THEN 'deleted' ELSE 'changed' END AS kind,
                   {row_key} AS row_key,
                   coalesce(to_jsonb(l), to_jsonb(b)) AS ordering
            FROM {backup} b FULL JOIN {live} l ON {join}
            WHERE ((b IS NULL) OR (l IS NULL AND NOT {in_quarantine})
               OR (NOT (l IS NULL) AND NOT (b IS NULL) AND (
                    NOT ({same_keys})
                    OR to_jsonb(l) - %(ignored)s::text[] <> to_jsonb(b) - %(ignored)s::text[])))
              AND NOT {logged_b} AND NOT {logged_l}
        ) d ORDER BY kind, ordering LIMIT %(n)s
        """).format(logged=log.cte(), backup=saved, live=live, join=join, row_key=row_key,
                    in_quarantine=in_quarantine, same_keys=same_keys,
                    logged_b=log.holds("b"), logged_l=log.holds("l")),
        {"ignored": ignored, "n": SAMPLE_LIMIT, **log.params})
    rows = cur.fetchall()
    if not rows:
        return []
    return [Finding(
        "unlogged_change", Status.WARN,
        f"{rows[0][1]} row(s) differ from the backup without a write in the change log",
        subject=str(table), count=int(rows[0][1]),
        samples=[{"change": kind, "key": key} for kind, _, key in rows],
        hint="find out who changed them (triggers disabled, or the engine's own setting); "
             "the rollback keeps them as they are")]


def restore_quarantine(session: Session) -> int:
    """Every quarantined row put back into its table, a table per transaction; how many."""
    plan = session.plan
    return sum(session.ddl(f"restore quarantine of {table}",
                           partial(_restore_quarantine, schema=plan.backup_schema, table=table))
               for table in plan.tables)


def _restore_quarantine(cur: Cursor, *, schema: str, table: Table) -> int:
    """Put the quarantined rows of ``table`` back, in one transaction (``session.ddl``).

    The orphans were there under a ``NOT VALID`` foreign key, which refuses
    them as new rows: each such FK of the table is dropped, the rows put back,
    and the FK added again ``NOT VALID`` with its name, definition and comment,
    before the commit, so that no other transaction ever sees the table without
    it (they wait for its locks, for as long as the insert of these rows).
    """
    target = backup.quarantine_name(schema, table)
    if not catalog.relation_exists(cur.connection, target):
        return 0
    columns = backup.columns_of(cur, target)
    unchecked = catalog.unchecked_foreign_keys(cur.connection, table)
    for fk in unchecked:
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            table.ident, sql.Identifier(fk.name)))
    cur.execute(sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM {}").format(
        table.ident, target, cols=column_list(columns)))
    restored = int(cur.rowcount)
    for fk in unchecked:  # the server's own text of it, NOT VALID included
        cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            table.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))
        if fk.comment is not None:
            cur.execute(sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS %s").format(
                sql.Identifier(fk.name), table.ident), (fk.comment,))
    cur.execute(sql.SQL("DROP TABLE {}").format(target))
    cur.execute(sql.SQL("DELETE FROM {} WHERE (table_schema, table_name) = (%s, %s)").format(
        backup.meta(schema, "quarantine")), (table.schema, table.name))
    return restored


def _checksums_match(cur: Cursor, schema: str) -> list[str]:
    """Tables whose content differs from the backup's recorded checksum."""
    return [str(table) for table, count, checksum in backup.recorded_checksums(cur, schema)
            if backup.table_checksum(cur, table.ident,
                                     backup.columns_of(cur, backup.backup_name(schema, table)))
            != (count, checksum)]


def rollback(session: Session, run_id: int) -> RollbackResult:
    with session.transaction() as cur:
        states = [catalog.column_state(cur.connection, key) for key in session.plan.columns]
        has_backup = backup.exists(cur, session.plan.backup_schema)
    session.conn.rollback()
    if not has_backup and all(state is ColumnState.STRING for state in states):
        return RollbackResult("nothing to undo: no backup was taken and no key column "
                              "was changed")
    if not has_backup:
        raise MigrationError(
            f"nothing to roll back to: there is no backup in {session.plan.backup_schema} "
            "(cleanup_backup dropped it, or backup_data never ran)",
            hint="restore from the database backup taken before the migration "
                 "(pg_dump / PITR), as the runbook's prerequisites require")
    result = discard(session) if ColumnState.UUID not in states else revert(session, run_id)
    if result.details.get("ready_to_swap"):  # --postpone-swap: the log keeps going
        return result
    stopped = stop_change_log(session)
    result.message += (f"; the change log is stopped ({stopped} trigger(s) dropped) and the "
                       f"backup kept in {session.plan.backup_schema}: run "
                       "--operation=cleanup_backup to drop it (no --force needed after this "
                       "rollback), or --operation=backup_data before migrating again (it "
                       "starts the log again and keeps the backup if the tables still equal it)")
    result.details["change_log_triggers_dropped"] = stopped
    return result


def stop_change_log(session: Session) -> int:
    """Drop the change log's triggers (the row trigger and the TRUNCATE one) from each table
    of the plan, each table in a short DDL transaction under lock_timeout (DROP TRIGGER
    takes an exclusive lock for an instant): rolled back, the tables carry no engine
    trigger, and the application's writes no longer fill the log.  Quarantined rows are
    back in their tables by now; the backup stays.  Returns the triggers dropped."""
    schema = session.plan.backup_schema
    names = [backup.change_log_trigger(schema), backup.change_log_truncate_trigger(schema)]

    def drop(cur: Cursor, table: Table) -> int:
        dropped = 0  # a partition's own TRUNCATE trigger, and the table's (with its clones)
        for relation in (*reversed(catalog.partitions(cur.connection, table)), table):
            cur.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
                        "AND tgname = ANY(%s) AND NOT tgisinternal AND tgparentid = 0 "
                        "ORDER BY tgname", (catalog.regclass(relation), names))
            present = [name for (name,) in cur.fetchall()]
            for name in present:
                cur.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name),
                                                                    relation.ident))
            dropped += len(present)
        return dropped

    return sum(session.ddl(f"stop the change log on {table}", partial(drop, table=table))
               for table in sorted(session.plan.tables))


def discard(session: Session) -> RollbackResult:
    """Rollback before the swap: the original columns were never touched, so dropping what
    the migration built beside them, and putting quarantined rows back, undoes it all.

    Each drop is a short transaction of its own, so the application is never
    held up for longer than one of them; none touches the application's rows,
    so none of its writes can be lost.  Run again after an interruption, it
    finishes what is left.
    """
    plan = session.plan
    refreshed = contract.refresh_views(session, plan.backup_schema)  # a revert cut short
    dropped = sum(expand.discard(session, key) for key in (*plan.children, plan.parent))
    republished = session.ddl("restore publications", partial(  # the copies are gone
        publications.restore, schema=plan.backup_schema, tables=plan.tables))
    restored = restore_quarantine(session)
    with session.transaction("rollback") as cur:
        cur.execute(sql.SQL("DELETE FROM {}").format(
            backup.meta(plan.backup_schema, "backfill_progress")))
    if not dropped and not restored and not republished:
        return RollbackResult(f"the rollback's swap was done: {refreshed} materialized view(s) "
                              "refreshed" if refreshed else "nothing to undo: no key column was "
                              "expanded or swapped, and no row is in quarantine")
    return RollbackResult(
        f"rolled back before the swap: {dropped} object(s) the migration built beside the "
        f"original columns dropped, {restored:,} quarantined row(s) restored, {republished} "
        "publication(s) given their own definition back; the original columns were never "
        "changed", rows=restored,
        details={"dropped": dropped, "restored": restored, "republished": republished})


def revert(session: Session, run_id: int) -> RollbackResult:
    """Rollback after the swap: the same engine run the other way.

    A string copy of each key column is filled in batches (canonical text),
    then given each row's original spelling from the backup where the row
    still holds the same UUID.  The parent key goes first: a column that refers
    to it through a foreign key takes, row by row, the spelling of the row it
    refers to (strings are compared byte for byte), whatever the application
    writes meanwhile (``follow``), then each row that the backup holds its own
    original spelling (the same, under a validated foreign key; under a
    ``NOT VALID`` one, old rows may spell it otherwise).  Each copy is proven,
    its indexes and foreign keys are built beside it, and one short swap puts
    the string columns back.  The application's rows written since the backup
    are kept (with the parent's spelling, or canonical text) and reported;
    without any, the tables must equal the backup's checksums.  Interrupted, it resumes like the
    migration does.
    """
    plan = session.plan.reversed()
    parent = plan.parent
    fill.refuse_taken(session, plan.columns)  # before the parent's copy is made
    publications.refuse(session.conn, plan.columns,
                        allowed=session.settings.allow_publications)
    # the views over them must compile back
    views.refuse(session.conn, plan.columns, plan.backup_schema,
                 refresh=session.settings.refresh_materialized_views)
    referencing = {shadow.child for shadow in expand.shadow_foreign_keys(session.conn, plan)}
    session.conn.rollback()
    respelled = 0

    def fill_and_spell() -> int:
        """The string copies filled (canonical text), then given their spellings: the
        parent's first, before any child copy exists, as the children follow it."""
        nonlocal respelled
        rows = fill.fill(session, (parent,), run_id)
        respelled = respell(session, parent)
        rows += fill.fill(session, plan.children, run_id,
                             follows={key: parent for key in plan.children if key in referencing})
        for key in plan.children:  # the parent's spelling first, then a row's own original
            respelled += (follow(session, key, parent) if key in referencing else 0) \
                + respell(session, key)
        return rows

    rows = pipeline.expand_columns(session, plan, plan.columns, run_id,
                                   fill_copies=fill_and_spell).rows
    if session.settings.postpone_swap:
        return RollbackResult(
            f"ready to swap back: {rows:,} rows filled, {respelled:,} ids given their original "
            "spelling, every string copy proven with its indexes and foreign keys; the sync "
            "triggers keep the copies in step until rollback runs again without "
            "--postpone-swap, which swaps", rows=rows, details={"ready_to_swap": True})
    swapped = pipeline.swap_and_contract(session, plan).sessions
    restored = restore_quarantine(session)
    with session.transaction("rollback") as cur:
        cur.execute(sql.SQL("DELETE FROM {}").format(
            backup.meta(plan.backup_schema, "backfill_progress")))
        changes = changed_rows(cur, session)
        differing = _checksums_match(cur, plan.backup_schema) if not changes else []
    if differing:
        raise MigrationError(
            f"rolled back to the string columns, but {', '.join(differing)} differ from the "
            "backup although the application changed nothing since it",
            hint=f"the backup is kept in {plan.backup_schema}: compare the tables with it, and "
                 "report this with the log file")
    message = (f"rolled back to the string columns: {rows:,} rows filled, {respelled:,} ids "
               f"given their original spelling, {restored:,} quarantined rows restored")
    changed = sum(f.count or 0 for f in changes if f.status is Status.INFO)
    unlogged = sum(f.count or 0 for f in changes if f.check == "unlogged_change")
    if changed:
        message += f"; {changed:,} row(s) the application changed since the backup were kept"
    if unlogged:
        message += (f"; {unlogged:,} row(s) differ from the backup without a logged write, "
                    "kept as they are (see the warnings)")
    return RollbackResult(message, rows=rows + restored, findings=changes,
                          details={"respelled": respelled, "restored": restored,
                                   "kept_changes": changed, "unlogged_changes": unlogged,
                                   **swapped})


def follow(session: Session, key: KeyColumn, parent: KeyColumn) -> int:
    """Give each row of a referencing column's string copy the spelling its parent row has
    now; rows updated.  Only parents whose spelling is not canonical matter (the fill
    wrote canonical text, and rows written meanwhile took the parent's from the sync
    trigger), and after the parent's ``respell`` no write makes one: the application
    writes uuids, whose string copies are canonical.  So when the parent has none, there is
    nothing to do; else the batches walk the *parent* (``fill.walked_update``), each
    updating the children of its non-canonical parents through the child's key.  A walk of
    the child instead joined every batch with the whole parent table (a hash join over its
    sequential scan): batches x parents rows, hours at a million users."""
    parent_copy, parent_key = sql.Identifier(parent.temp), sql.Identifier(parent.column)
    with session.transaction() as cur:
        cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE {} <> ({})::text)").format(
            parent.table.ident, parent_copy, parent_key))
        respelled = bool((cur.fetchone() or [False])[0])
    if not respelled:
        return 0
    return fill.walked_update(session, parent, f"respell {key}", lambda within: sql.SQL(
        "UPDATE {child} c SET {copy} = x.{parent_copy} FROM {parent} x "
        "WHERE {within} AND x.{parent_copy} <> (x.{parent_key})::text "
        "AND c.{key} = x.{parent_key} AND c.{copy} IS DISTINCT FROM x.{parent_copy} "
        "RETURNING 1").format(
        child=key.table.ident, copy=sql.Identifier(key.temp), parent=parent.table.ident,
        parent_copy=parent_copy, parent_key=parent_key, key=sql.Identifier(key.column),
        within=within))


def respell(session: Session, key: KeyColumn) -> int:
    """Give each row's string copy its original spelling from the backup, where the row
    still holds the same UUID; rows updated.

    Each row is found in the backup by its walk key (``catalog.walk_key``: the
    primary key, else a unique key over NOT NULL columns), and only the
    backup's non-canonical spellings are read back (canonical ones are what
    the fill wrote already).  The backup's copy is read in batches of its
    pages (it has no index, and no row of it ever moves), each batch a
    ``Session.ddl`` transaction that updates the live rows it names: the
    engine never holds an application's rows across batches, nor waits for
    one longer than ``lock_timeout`` before it tries the batch again.  A table
    with neither key is respelled by content (``_respell_by_content``): its rows
    are paired across the whole table by one read, then updated in batches the
    same way.
    """
    schema = session.plan.backup_schema
    pk = catalog.walk_key(session.conn, key.table)
    converted = {k.column for k in session.plan.columns if k.table == key.table}
    saved = Table(*backup.backup_name(schema, key.table).strings)
    pages = catalog.heap_pages(session.conn, saved)
    rows = catalog.estimated_rows(session.conn, saved)
    session.conn.rollback()
    if pk == [catalog.PAGES]:
        return _respell_by_content(session, schema, key, converted)
    step = max(1, session.settings.batch_size * pages // rows) if rows else max(pages, 1)
    statement = _respell_statement(session, key, pk, converted)
    respelled = 0
    for start in range(0, pages, step):
        started = time.monotonic()
        count = session.ddl(f"respell {key}", partial(
            _respell_pages, session=session, statement=statement, start=start,
            stop=min(start + step, pages)))
        respelled += count
        session.pace.wait(count, started)
    return respelled


def _respell_settings(session: Session, cur: Cursor) -> Cursor:
    """The transaction's settings for ``respell`` (those of a fill, and the uuid checker)."""
    for setting in fill.fill_settings(session):
        cur.execute(setting)
    prepare_uuid_checker(cur)
    return cur


def _respell_statement(session: Session, key: KeyColumn, pk: list[str],
                       converted: set[str]) -> sql.Composable:
    """``respell``'s UPDATE of the rows named by the backup's pages ``[start, stop)``."""
    conn = session.conn
    keys = [f"k{i}" for i in range(len(pk))]  # the key column may be part of the pk
    join = sql.SQL(" AND ").join(
        sql.SQL("x.{} = {}").format(
            sql.Identifier(p), uuid_of(conn, sql.Identifier("s", k)) if p in converted
            else sql.Identifier("s", k)) for p, k in zip(pk, keys, strict=True))
    column = sql.Identifier(key.column)
    return sql.SQL(
        """
        WITH spelled ({keys}, spelling) AS MATERIALIZED (
            SELECT {pk}, {column} FROM {backup}
            WHERE ctid >= %(start)s::tid AND ctid < %(stop)s::tid
              AND {column} IS NOT NULL AND ({parsed})::text IS DISTINCT FROM {column}
        )
        UPDATE {table} x SET {temp} = s.spelling FROM spelled s
        WHERE {join} AND x.{column} = {original} AND x.{temp} IS DISTINCT FROM s.spelling
        """).format(keys=column_list(keys), pk=column_list(pk), column=column,
                    backup=backup.backup_name(session.plan.backup_schema, key.table),
                    parsed=uuid_of(conn, column),
                    table=key.table.ident, temp=sql.Identifier(key.temp), join=join,
                    original=uuid_of(conn, sql.Identifier("s", "spelling")))


def _respell_pages(cur: Cursor, session: Session, statement: sql.Composable, start: int,
                   stop: int) -> int:
    _respell_settings(session, cur).execute(statement, {"start": f"({start},0)",
                                                        "stop": f"({stop},0)"})
    return int(cur.rowcount)


def content(columns: list[str], alias: str,
            as_uuid: Callable[[sql.Composable], sql.Composable] | None = None,
            converted: frozenset[str] = frozenset()) -> sql.Composable:
    """A row as one text, for a table with no unique key, where content alone tells
    rows apart: each column as text, the ``converted`` ones through ``as_uuid`` (a
    backup row's strings read as the uuids the live row holds now).  Two rows have
    the same text exactly when each column IS NOT DISTINCT FROM the other's (a
    NULL prints apart from any string), and one text is hashable, where a join
    on many IS NOT DISTINCT FROM conditions would compare every pair."""
    return sql.SQL("(ROW({}))::text").format(sql.SQL(", ").join(
        sql.SQL("({})::text").format(
            as_uuid(sql.Identifier(alias, c)) if as_uuid and c in converted
            else sql.Identifier(alias, c)) for c in columns))


# The pairs ``_respell_by_content`` reads once and updates in batches: the engine's own
# temporary table, on the session's connection, across its transactions.
_PAIRS = sql.Identifier("pg_temp", "migration_respell_pairs")


def _respell_by_content(session: Session, schema: str, key: KeyColumn,
                        converted: set[str]) -> int:
    """``respell`` for a table with no unique key: its rows have nothing but their content
    to be told apart by, so a live row is matched with a backup row equal in every
    column, key columns compared as uuids (``content``).

    Rows equal in all but the spelling of an id are indistinguishable: a group
    of them is numbered on both sides (the backup's by spelling, the live ones
    by ``ctid``) and paired one to one, so the group gets back exactly the
    spellings the backup holds, each row one of them in some order.  Nothing
    can tell which row had which, and the table's content (its checksum) is the
    backup's again.  Matching on the key alone would give every row of a group
    the same spelling.  Live rows that no backup row matches (written since
    the backup) keep the canonical text.  Every backup row is read: all
    spellings count in the numbering.

    The pairing needs the whole table, so it is read once (no row lock) into a
    temporary table of the rows to respell, by ``ctid``; those are then updated
    in batches of ``--batch-size`` in ``ctid`` order, each a ``Session.ddl``
    transaction, as the other walks are: the engine never holds an
    application's rows across batches, nor waits for one longer than
    ``lock_timeout``.  A batch updates a row only where its ``ctid`` still holds
    the content it was paired by; a row the application moved meanwhile is its
    write, logged, and is kept as it is (as one statement would have).
    """
    conn = session.conn
    with session.transaction() as cur:
        columns = backup.columns_of(cur, backup.backup_name(schema, key.table))
        live = content(columns, "l")
        saved = content(columns, "b", partial(uuid_of, conn), frozenset(converted))
        lift_statement_timeout(_respell_settings(session, cur))
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_PAIRS))
        cur.execute(sql.SQL(
            """
            CREATE TEMPORARY TABLE {pairs} AS
            WITH spelled AS MATERIALIZED (
                SELECT {saved} AS row, b.{column} AS spelling,
                       row_number() OVER (PARTITION BY {saved} ORDER BY b.{column}) AS nth
                FROM {backup} b
            ), numbered AS MATERIALIZED (
                SELECT l.ctid AS row_id, {live} AS row, l.{temp} AS spelled,
                       row_number() OVER (PARTITION BY {live} ORDER BY l.ctid) AS nth
                FROM {table} l
            )
            SELECT l.row_id, l.row, s.spelling
            FROM numbered l JOIN spelled s ON (s.row, s.nth) = (l.row, l.nth)
            WHERE l.spelled IS DISTINCT FROM s.spelling
            """).format(pairs=_PAIRS, saved=saved, live=live,
                        column=sql.Identifier(key.column),
                        backup=backup.backup_name(schema, key.table), table=key.table.ident,
                        temp=sql.Identifier(key.temp)))
        cur.execute(sql.SQL("CREATE INDEX ON {} (row_id)").format(_PAIRS))
    update = sql.SQL(
        """
        WITH batch AS MATERIALIZED (
            SELECT row_id, row, spelling FROM {pairs}
            WHERE row_id > %(after)s::tid ORDER BY row_id LIMIT %(n)s
        ), done AS (
            UPDATE {table} x SET {temp} = b.spelling FROM batch b
            WHERE x.ctid = b.row_id AND {current} = b.row AND x.{temp} IS DISTINCT FROM b.spelling
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM done), (SELECT max(row_id)::text FROM batch)
        """).format(pairs=_PAIRS, table=key.table.ident, temp=sql.Identifier(key.temp),
                    current=content(columns, "x"))

    def batch(cur: Cursor, after: str) -> tuple[int, str | None]:
        _respell_settings(session, cur).execute(update, {
            "after": after, "n": session.settings.batch_size})
        count, last = cur.fetchone() or (0, None)
        return int(count), last

    updated, after = 0, "(0,0)"
    while True:
        session.lag.wait(session)
        count, last = session.ddl(f"respell {key}", partial(batch, after=after))
        updated += count
        if last is None:
            break
        after = last
    with session.transaction() as cur:
        cur.execute(sql.SQL("DROP TABLE {}").format(_PAIRS))
    return updated


def _primary_key(cur: Cursor, schema: str, table: Table, keys: list[KeyColumn]) -> list[str]:
    """The table's primary key columns, also when a swap dropped it and it is not back yet;
    without one, its walk key's, or none: the rows have only their content."""
    found = catalog.primary_key(cur.connection, table)
    if found:
        return found
    for key in keys:  # the key column itself backed the primary key the backup recorded
        if any(ix.constraint_type == "p" for ix in backup.saved_indexes(cur, schema, key)):
            return [key.column]
    walk = catalog.walk_key(cur.connection, table)
    return [] if walk == [catalog.PAGES] else walk  # []: rows told apart by content
