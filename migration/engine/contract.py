"""Contract: what follows the swap, once the new columns are the table's, and the backup's
drop that ends a migration.

Nothing here changes a row or holds a lock that blocks the application's writes: the
swap already made the columns final.  What is left is what the swap could not do in its
milliseconds: statistics for the planner (the new columns and the statistics objects the
swap created again start without any) and the materialized views it created empty.  Each
is its own short transaction, and each finds what is left to do by reading the catalog or
the backup's record, so an interrupted contract is finished by running the operation
again.  The contract has no inverse: it only restores what the swap's columns had.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, views
from migration.connection import lift_statement_timeout
from migration.log import logger
from migration.model import KeyColumn, Table
from migration.plan import Plan
from migration.session import Session


def contract(session: Session, plan: Plan, analyze: Iterable[Table] = ()) -> int:
    """After the swap of ``plan``: ``analyze`` (the tables whose statistics objects the
    swap created again, empty), the materialized views it created empty refreshed, then
    each swapped column's statistics; how many views were refreshed."""
    for table in analyze:
        with session.transaction() as cur:
            cur.execute(sql.SQL("ANALYZE {}").format(table.ident))
    refreshed = refresh_views(session, plan.backup_schema)
    for key in plan.columns:
        refresh_statistics(session, key)
    return refreshed


def refresh_statistics(session: Session, key: KeyColumn) -> None:
    """ANALYZE the swapped column if it has no statistics yet.

    The new column starts without any: the planner then guesses its
    selectivity, and a join on it (the next step's orphan check on 1M users
    took 39 s instead of 4) can pick a plan far from the best.  ANALYZE
    samples a fixed number of rows and takes a lock that blocks neither
    reads nor writes.
    """
    def work(cur: Cursor) -> None:
        cur.execute("SELECT 1 FROM pg_stats WHERE (schemaname, tablename, attname) "
                    "= (%s, %s, %s)", (key.table.schema, key.table.name, key.column))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("ANALYZE {} ({})").format(key.table.ident,
                                                          sql.Identifier(key.column)))

    session.ddl(f"analyze {key}", work)


def refresh_views(session: Session, backup_schema: str) -> int:
    """Fill the materialized views the swap created empty (``views.left_empty``),
    innermost first; how many.

    Each ``REFRESH`` runs its query without a time limit, holding its view's
    exclusive lock (its readers wait for it; the tables it reads stay open to
    writes), and forgets the view in the same transaction.
    """
    pending = views.left_empty(session.conn, backup_schema)
    session.conn.rollback()
    for view in pending:
        session.ddl(f"refresh {view}", partial(_refresh, view=view, backup_schema=backup_schema))
        logger.info("materialized view %s refreshed", view)
    return len(pending)


def _refresh(cur: Cursor, view: Table, backup_schema: str) -> None:
    lift_statement_timeout(cur)
    cur.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(view.ident))
    cur.execute(sql.SQL("DELETE FROM {} WHERE view_schema = %s AND view_name = %s").format(
        views.pending_table(backup_schema)), (view.schema, view.name))


def drop_backup(cur: Cursor, backup_schema: str) -> bool:
    """The backup schema dropped, and with its change-log function the triggers on the
    tables; whether there was one."""
    existed = backup.exists(cur, backup_schema)
    cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(backup_schema)))
    return existed
