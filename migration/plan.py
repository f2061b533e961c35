"""What is migrated: the parent key and every column that refers to it.

The runbook's tables are the default plan; foreign keys found in the catalog
that point at the parent key join the plan, so nothing that references
``users.id`` is left behind with the old type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from migration.catalog import foreign_keys_to
from migration.connection import Connection
from migration.model import KeyColumn, Table

DEFAULT_PARENT = ("users", "id")
DEFAULT_CHILDREN = (
    ("journal_entries", "user_id"),
    ("tags", "user_id"),
    ("reminders", "user_id"),
)


@dataclass(frozen=True)
class Plan:
    parent: KeyColumn
    children: tuple[KeyColumn, ...]
    discovered: tuple[KeyColumn, ...] = field(default=())
    """Children found through the catalog, not named by the runbook."""

    @property
    def columns(self) -> tuple[KeyColumn, ...]:
        return (self.parent, *self.children)

    @property
    def tables(self) -> tuple[Table, ...]:
        seen: dict[Table, None] = {}
        for key in self.columns:
            seen.setdefault(key.table, None)
        return tuple(seen)

    def reversed(self) -> Plan:
        """The same columns on their way back to their string types."""
        return dataclasses.replace(
            self, parent=self.parent.reversed(),
            children=tuple(key.reversed() for key in self.children),
            discovered=tuple(key.reversed() for key in self.discovered))

    @property
    def schema(self) -> str:
        """Where the tool keeps ``migration_log``: the parent table's schema."""
        return self.parent.table.schema


def build_plan(conn: Connection, schema: str = "public") -> Plan:
    """The runbook's plan in ``schema``, plus every FK column found pointing at the parent."""
    parent = KeyColumn(Table(schema, DEFAULT_PARENT[0]), DEFAULT_PARENT[1])
    children = [KeyColumn(Table(schema, t), c) for t, c in DEFAULT_CHILDREN]
    referencing = [KeyColumn(fk.table, fk.column) for fk in foreign_keys_to(conn, parent)]
    discovered = sorted({key for key in referencing if key not in children})
    return Plan(parent=parent, children=(*children, *discovered), discovered=tuple(discovered))
