"""What is migrated: the parent key and every column that refers to it.

The parent key is the runbook's ``users.id`` unless ``--key`` names another
string column with a primary key or unique constraint on it.  For the
runbook's key the runbook's tables are the default plan; for any key, the
foreign keys found in the catalog that point at it join the plan, so nothing
that references the key is left behind with the old type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from migration import catalog
from migration.catalog import foreign_keys_to
from migration.connection import Connection
from migration.errors import MigrationError
from migration.model import RUNBOOK_KEY, KeyColumn, Table, backup_schema

DEFAULT_PARENT = RUNBOOK_KEY
DEFAULT_CHILDREN = (
    ("journal_entries", "user_id"),
    ("tags", "user_id"),
    ("reminders", "user_id"),
)
STRING_TYPES = ("text", "character varying", "character")
"""The string types a key may have (``varchar(n)``, ``char(n)`` with any length)."""


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

    @property
    def backup_schema(self) -> str:
        """Where this plan's backup, change log and functions are kept."""
        return backup_schema(self.parent)

    @property
    def key(self) -> str:
        """The parent key as ``--key`` names it, and as the log and the backup record it."""
        return self.parent.reversed().spec if self.parent.back else self.parent.spec


class BadKey(MigrationError):
    """``--key`` names no column that can be a key: refused before anything is read or
    changed."""


def parse_key(text: str, schema: str = "public") -> KeyColumn:
    """``SCHEMA.TABLE.COLUMN`` or ``TABLE.COLUMN`` (in ``schema``) as a key column.

    Names are read as PostgreSQL reads them: unquoted ones folded to lower
    case, double-quoted ones kept as written (dots, capitals, ``""`` for a
    quote), so ``app."User Accounts".uuid`` names the table ``User Accounts``.
    ValueError says what is wrong with a malformed one.
    """
    parts: list[str] = []
    current, quoted, i = "", False, 0
    token_quoted = False
    while i < len(text):
        char = text[i]
        if quoted:
            if char == '"' and text[i + 1:i + 2] == '"':
                current, i = current + '"', i + 2
                continue
            if char == '"':
                quoted = False
            else:
                current += char
        elif char == '"':
            if current:
                raise ValueError(f"--key {text!r}: a quote in the middle of a name")
            quoted = token_quoted = True
        elif char == ".":
            parts.append(_name(text, current, quoted=token_quoted))
            current, token_quoted = "", False
        else:
            if token_quoted:
                raise ValueError(f"--key {text!r}: text after a quoted name")
            current += char.lower()
        i += 1
    if quoted:
        raise ValueError(f"--key {text!r}: an unterminated quote")
    parts.append(_name(text, current, quoted=token_quoted))
    if len(parts) == 2:
        parts.insert(0, schema)
    if len(parts) != 3:
        raise ValueError(f"--key {text!r}: expected SCHEMA.TABLE.COLUMN or TABLE.COLUMN")
    return KeyColumn(Table(parts[0], parts[1]), parts[2])


def _name(text: str, name: str, *, quoted: bool) -> str:
    if not quoted:
        name = name.strip()
    if not name:
        raise ValueError(f"--key {text!r}: an empty name")
    return name


def runbook_key(schema: str = "public") -> KeyColumn:
    """The runbook's parent key, ``users.id``, in ``schema``."""
    return KeyColumn(Table(schema, DEFAULT_PARENT[0]), DEFAULT_PARENT[1])


def build_plan(conn: Connection, key: KeyColumn | None = None, schema: str = "public") -> Plan:
    """The plan for ``key``: the key and every column found referring to it through a FK.

    ``None`` is the runbook's key in ``schema``, whose plan is the runbook's
    (its tables named even before they exist; the pre-flight reports what is
    missing).  Any other key must exist, be of a string type or uuid (migrated
    already) and carry a primary key or unique constraint: MigrationError
    otherwise, before anything is read from its data.
    """
    parent = runbook_key(schema) if key is None else key
    referencing = [KeyColumn(fk.table, fk.column) for fk in foreign_keys_to(conn, parent)]
    if (parent.table.name, parent.column) == DEFAULT_PARENT:
        children = [KeyColumn(Table(parent.table.schema, t), c) for t, c in DEFAULT_CHILDREN]
    else:
        require_key(conn, parent)
        children = []
    discovered = sorted({ref for ref in referencing if ref not in children and ref != parent})
    named = tuple(with_free_names(conn, child) for child in (*children, *discovered))
    return Plan(parent=with_free_names(conn, parent), children=named,
                discovered=tuple(child for child in named if child in discovered))


NAME_CHOICES = 10


def with_free_names(conn: Connection, key: KeyColumn) -> KeyColumn:
    """``key`` with the names its temporary objects get, both ways (``KeyColumn.choice``).

    The engine's own, where a run left its copy column (it bears the mark), so
    that a resumed run finds what it began; else the first names that none of
    the application's objects bears, so that they are never taken for the
    engine's.  When every choice is taken, the first: the pre-flight names the
    objects in the way (``preflight.name_findings``).
    """
    choices = [dataclasses.replace(key, choice=n) for n in range(NAME_CHOICES)]
    marked = catalog.marked_copies(conn, key)
    return next((choice for choice in choices
                 if marked & {choice.temp, choice.reversed().temp}), None) \
        or next((choice for choice in choices
                 if not any(catalog.names_taken(conn, way)
                            for way in (choice, choice.reversed()))), key)


def require_key(conn: Connection, key: KeyColumn) -> None:
    """Refuse a key that is no column, not a string (or uuid) column, or not unique."""
    if not catalog.table_exists(conn, key.table):
        raise BadKey(f"--key {key.spec}: there is no table {key.table}",
                             hint="validate_schema --discover lists the keys there are")
    info = catalog.column_info(conn, key.table, key.column)
    if info is None:
        raise BadKey(f"--key {key.spec}: {key.table} has no column {key.column!r}",
                             hint="validate_schema --discover lists the keys there are")
    base = info.type.split("(")[0]
    if base not in (*STRING_TYPES, "uuid"):
        raise BadKey(f"--key {key.spec}: {key} is {info.type}, not a string type "
                             "(text, varchar(n), char(n))",
                             hint="only string columns holding UUIDs are converted")
    if not unique(conn, key):
        raise BadKey(f"--key {key.spec}: {key} has no primary key or unique "
                             "constraint of its own",
                             hint="a key is referred to by its values: add a primary key or "
                                  "unique constraint on it first")


def unique(conn: Connection, key: KeyColumn) -> bool:
    """Whether a unique index on the column alone (no predicate, no expression) exists:
    a primary key, a unique constraint, or a unique index (which a FK may refer to)."""
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                    "WHERE i.indrelid = to_regclass(%s) AND a.attname = %s AND i.indisunique "
                    "AND i.indnkeyatts = 1 AND i.indpred IS NULL)",
                    (catalog.regclass(key.table), key.column))
        row = cur.fetchone()
    return bool(row and row[0])
