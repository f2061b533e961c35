"""Writing a generated Dataset into a database with the legacy schema."""

from __future__ import annotations

from dataclasses import fields

from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extras import Json, execute_values

from tests.strategies import Dataset


def load(conn: Connection, dataset: Dataset, schema: str = "public") -> None:
    """Insert every row of ``dataset`` into the tables of ``schema``.

    One INSERT per table (the page is as large as the table), parents before
    children so that the foreign keys accept the rows.  It runs in the
    caller's transaction and commits nothing.
    """
    with conn.cursor() as cur:
        for table, rows in dataset.tables().items():
            if not rows:
                continue
            columns = [column.name for column in fields(rows[0])]
            statement = sql.SQL("INSERT INTO {}.{} ({}) VALUES %s").format(
                sql.Identifier(schema), sql.Identifier(table),
                sql.SQL(", ").join(map(sql.Identifier, columns)))
            values = [[_adapt(getattr(row, column)) for column in columns] for row in rows]
            execute_values(cur, statement.as_string(conn), values, page_size=len(values))


def _adapt(value: object) -> object:
    """JSON payloads go as jsonb; a Python None stays SQL NULL."""
    return Json(value) if isinstance(value, dict) else value
