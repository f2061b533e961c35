"""The ``migration_log`` table and the detailed log file.

A run's row is inserted as ``running`` and committed at once, so ``status``
can see an unfinished operation.  Its final update happens inside the
transaction of the operation's last change: a crash can never leave a
``completed`` row for work that was not committed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import Json

from migration import catalog
from migration.connection import Connection
from migration.model import RUNBOOK_KEY, KeyColumn, Table

LOG_TABLE = "migration_log"
KEY_COLUMN = "key_column"
"""The log's column naming the key each entry belongs to, as ``--key`` spells it: each key
migrated in the database reads and writes only its own entries."""
DEFAULT_LOG_FILE = Path("logs/migration/data_migration.log")
logger = logging.getLogger("migration")


def as_json(value: Any) -> Json:
    """``value`` as a jsonb parameter; dates, times, Decimals, UUIDs and any other value
    JSON has no type for are written as their text (a sample's primary key may hold any)."""
    return Json(value, dumps=lambda obj: json.dumps(obj, default=str))


def setup_file_log(path: Path | None) -> None:
    """Send the detailed log to ``path`` (created with its folders)."""
    logger.setLevel(logging.DEBUG)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


@dataclass(frozen=True)
class LogEntry:
    id: int
    operation: str
    status: str
    started_at: datetime
    completed_at: datetime | None
    rows_processed: int
    message: str | None
    details: dict[str, Any]


def runbook_key_spec(schema: str) -> str:
    """The runbook's key, ``users.id`` in ``schema``, as the log names it: what an entry
    written before the log named keys belongs to."""
    table, column = RUNBOOK_KEY
    return KeyColumn(Table(schema, table), column).spec


def of_key(conn: Connection, schema: str, key: str) -> sql.Composable:
    """The condition on a row of ``schema.migration_log`` that it belongs to ``key``.

    A log of an older version has no key column: all of its rows are the
    runbook key's.  (Such a log gains the column, filled with the runbook's
    key, at the next run that writes to it.)
    """
    if catalog.column_info(conn, Table(schema, LOG_TABLE), KEY_COLUMN) is None:
        return sql.SQL("true" if key == runbook_key_spec(schema) else "false")
    return sql.SQL("{} = {}").format(sql.Identifier(KEY_COLUMN), sql.Literal(key))


def recorded_in_log(cur: Cursor, schema: str, key: str) -> dict[str, Any] | None:
    """The record of the tables (``recorded.record``) the key's last completed backup_data
    left in ``schema.migration_log``; None when there is none."""
    table = sql.Identifier(schema, LOG_TABLE)
    if not catalog.relation_exists(cur.connection, table):
        return None
    cur.execute(sql.SQL("SELECT details FROM {} WHERE operation = 'backup_data' "
                        "AND status = 'completed' AND details ? 'foreign_keys' AND {} "
                        "ORDER BY id DESC LIMIT 1").format(
        table, of_key(cur.connection, schema, key)))
    row = cur.fetchone()
    return None if row is None else dict(row[0])


_SHARED = """
    SELECT DISTINCT n.nspname, c.relname, c.relkind = 'S',
           CASE WHEN g.grantee = 0 THEN NULL ELSE pg_get_userbyid(g.grantee) END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL aclexplode(c.relacl) g
    WHERE c.oid IN (to_regclass(%(log)s), pg_get_serial_sequence(%(log)s, 'id')::regclass)
      AND g.grantee <> c.relowner
"""


def _make_private(cur: Cursor, table: sql.Identifier) -> None:
    """Revoke what default privileges (ALTER DEFAULT PRIVILEGES) gave others on a log just
    created and its id sequence: it names the rows of the findings and the backup's
    record, and is readable where the backup is, by the migrating role alone.  An
    administrator may grant it to a monitoring role afterwards, knowingly."""
    cur.execute(_SHARED, {"log": table.as_string(cur.connection)})
    for schema, name, sequence, grantee in cur.fetchall():
        cur.execute(sql.SQL("REVOKE ALL ON {} {} FROM {}").format(
            sql.SQL("SEQUENCE" if sequence else "TABLE"), sql.Identifier(schema, name),
            sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC")))


class OperationLog:
    """Rows of ``<schema>.migration_log``, one per operation run, of one key's."""

    def __init__(self, conn: Connection, schema: str, key: str) -> None:
        self.conn = conn
        self.table = sql.Identifier(schema, LOG_TABLE)
        self.schema = schema
        self.key = key

    def ensure(self) -> None:
        """Create the log, or give an older one its key column (its rows are the runbook
        key's: the column's default).  Looked up first, so that an up-to-date log is not
        locked by an ALTER TABLE at every run."""
        default = sql.Literal(runbook_key_spec(self.schema))
        with self.conn, self.conn.cursor() as cur:
            if catalog.relation_exists(self.conn, self.table):
                if catalog.column_info(self.conn, Table(self.schema, LOG_TABLE),
                                       KEY_COLUMN) is None:
                    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text "
                                        "NOT NULL DEFAULT {}").format(
                        self.table, sql.Identifier(KEY_COLUMN), default))
                return
            cur.execute(sql.SQL(
                """
                CREATE TABLE IF NOT EXISTS {} (
                    id             bigserial PRIMARY KEY,
                    operation      text NOT NULL,
                    status         text NOT NULL
                        CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
                    started_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
                    completed_at   timestamptz,
                    rows_processed bigint NOT NULL DEFAULT 0,
                    message        text,
                    details        jsonb NOT NULL DEFAULT '{{}}',
                    {}             text NOT NULL DEFAULT {}
                )
                """).format(self.table, sql.Identifier(KEY_COLUMN), default))
            _make_private(cur, self.table)

    def exists(self) -> bool:
        return catalog.relation_exists(self.conn, self.table)

    def begin(self, operation: str, details: dict[str, Any], active: list[int]) -> int:
        """Insert and commit the ``running`` row of a new run.

        The caller holds the run lock, so any other ``running`` row (``active``
        lists this process's own) belongs to a run that died: it is marked
        ``interrupted`` in the same transaction.
        """
        with self.conn, self.conn.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} (operation, status, details, {}) "
                        "VALUES (%s, 'running', %s, %s) RETURNING id").format(
                    self.table, sql.Identifier(KEY_COLUMN)),
                (operation, as_json(details), self.key),
            )
            row = cur.fetchone()
            assert row is not None
            cur.execute(
                sql.SQL("UPDATE {} SET status = 'interrupted', completed_at = clock_timestamp(), "
                        "message = %s WHERE status = 'running' AND id <> %s "
                        "AND NOT id = ANY (%s)").format(self.table),
                (f"interrupted (connection or process lost); run {row[0]} took over",
                 row[0], active),
            )
        logger.info("%s: started (run %s)", operation, row[0])
        return int(row[0])

    def progress(self, cur: Cursor, run_id: int, added: int) -> None:
        """Inside the caller's batch transaction: ``added`` more rows done (an increment,
        so that connections filling columns side by side each add their own)."""
        cur.execute(sql.SQL("UPDATE {} SET rows_processed = rows_processed + %s "
                            "WHERE id = %s").format(self.table), (added, run_id))

    def finish(self, cur: Cursor, run_id: int, *, status: str, message: str, rows: int,
               details: dict[str, Any]) -> None:
        """Inside the caller's transaction: the run's final state."""
        cur.execute(
            sql.SQL("UPDATE {} SET status = %s, completed_at = clock_timestamp(), "
                    "rows_processed = %s, message = %s, details = details || %s "
                    "WHERE id = %s").format(self.table),
            (status, rows, message, as_json(details), run_id),
        )
        level = logging.INFO if status == "completed" else logging.ERROR
        logger.log(level, "run %s %s: %s", run_id, status, message)

    def entries(self, limit: int = 200) -> list[LogEntry]:
        """The key's entries, the newest first."""
        if not self.exists():
            return []
        mine = of_key(self.conn, self.schema, self.key)
        with self.conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT id, operation, status, started_at, completed_at, "
                        "rows_processed, message, details FROM {} WHERE {} "
                        "ORDER BY id DESC LIMIT %s").format(self.table, mine),
                (limit,),
            )
            return [LogEntry(*row) for row in cur.fetchall()]
