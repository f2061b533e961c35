"""Names of the things the tool works on: tables, the key columns it converts, and the
objects the engine creates beside them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg2 import sql

TEMP_SUFFIX = "_uuid"


@dataclass(frozen=True, order=True)
class Table:
    schema: str
    name: str

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, order=True)
class KeyColumn:
    """A string column holding UUIDs, to be converted to ``uuid``."""

    table: Table
    column: str

    @property
    def temp(self) -> str:
        """The temporary uuid column the runbook fills before the swap (``id_uuid``)."""
        return self.column + TEMP_SUFFIX

    def helper(self, kind: str) -> str:
        """Names of the engine's temporary objects for this column (``sync``
        trigger, ``filled`` and ``not_null`` checks), within PostgreSQL's 63 bytes."""
        return f"migration_{kind}_{self.column}"[:63]

    def __str__(self) -> str:
        return f"{self.table}.{self.column}"


def shadow_name(kind: str, table: Table, original: str) -> str:
    """The name of the copy the engine builds beside an original index or constraint.

    Derived from what it copies, so a resumed run finds the copy it had begun,
    and short enough for PostgreSQL's 63 bytes whatever the original's length.
    """
    digest = hashlib.sha1(f"{table.schema}\0{table.name}\0{original}".encode()).hexdigest()
    return f"migration_{kind}_{digest[:16]}"
