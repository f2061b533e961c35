"""Names of the things the tool works on: tables, the key columns it converts, and the
objects the engine creates beside them."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass

from psycopg2 import sql

BACKUP_SCHEMA = "migration_backup"
"""Where the engine keeps the runbook key's backup, change log and functions (the runbook
names it); another key's backup is kept in a schema of its own (``backup_schema``)."""
BACKUP_SCHEMA_LIKE = r"migration\_backup\_%"
"""A LIKE pattern matching every other key's backup schema (besides ``BACKUP_SCHEMA``)."""
RUNBOOK_KEY = ("users", "id")
"""The runbook's parent key (table, column), in the ``--schema`` given."""
TEMP_SUFFIX = "_uuid"
BACK_SUFFIX = "_text"
NAME_BYTES = 63
"""PostgreSQL's longest identifier (NAMEDATALEN - 1), in bytes of UTF-8: a longer one is
truncated by the server, and a catalog lookup by the full name then finds nothing."""
HASH_CHARS = 8


def fit_name(head: str, tail: str = "") -> str:
    """``head + tail`` as a name of the engine's, within PostgreSQL's 63 bytes.

    A name that fits is kept as it is (``id_uuid``, ``migration_sync_user_id``,
    as the runbook names them).  A longer one keeps ``tail``, and ``head`` is
    cut on a character boundary to make room for ``_`` and a short hash of the
    full name: two long columns that share their first 59 bytes still get
    different names, and the same column always gets the same one.
    """
    full = head + tail
    if len(full.encode()) <= NAME_BYTES:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:HASH_CHARS]
    room = NAME_BYTES - len(f"_{digest}{tail}".encode())
    cut = head.encode()[:room].decode(errors="ignore")  # drops a split last character
    return f"{cut}_{digest}{tail}"


UUID_INPUT = r"^(\{[0-9a-fA-F]{4}(-?[0-9a-fA-F]{4}){7}\}|[0-9a-fA-F]{4}(-?[0-9a-fA-F]{4}){7})$"
"""What the uuid type's input function accepts (``string_to_uuid``): 32 hex digits, a hyphen
allowed after any group of four, the whole maybe in braces.  The change log's keys are
tested with it before they are cast: the application may have written anything there, and
``verify``'s read-only transaction cannot create the checker servers before 16 need
(``sqlexpr.is_uuid``).  So is a key column's value before its copy is made (``uuid_copy``)."""


def uuid_copy(value: sql.Composable) -> sql.Composable:
    """The uuid copy of a string key's value, as the engine fills it, proves it and keeps
    it in step (the sync trigger computes the same in plpgsql, ``backup.SYNC_FUNCTIONS``):
    the value cast to uuid where it is a UUID, NULL for NULL, and for any other string a
    stand-in, ``md5`` of the text the cast reads (a ``char(n)``'s padding included, as
    its output function prints it), so that the application may write there whatever the
    original column takes.  Deterministic, so that equal strings get equal stand-ins and
    a foreign key or unique index between copies holds exactly when it holds between the
    strings; never NULL for a string, so that the NOT NULL proof holds.  A stand-in never
    becomes data: the swap refuses while any row holds one (``swap.refuse_invalid_keys``).
    """
    return sql.SQL("CASE WHEN {v} ~ {syntax} THEN ({v})::uuid "
                   "WHEN {v} IS NOT NULL THEN md5(concat({v}))::uuid END").format(
        v=value, syntax=sql.Literal(UUID_INPUT))


def spelled_as_copy(copy: sql.Composable, value: sql.Composable) -> sql.Composable:
    """True where the string ``value`` is spelled as its uuid ``copy`` prints, the way
    nearly every stored UUID is (``gen_random_uuid()::text``): then it is a UUID and the
    copy its cast, which costs a uuid's output and a comparison of bytes.

    The proofs and the invalid index ask it before ``UUID_INPUT``'s regular expression,
    which PostgreSQL's regex engine evaluates at about 5 us a row, 14 times the cast's
    cost: at 1M users the expression was a third of the migration's server time (issue
    22).  Compared in the "C" collation: a nondeterministic one could call other strings
    equal; and only at 36 bytes, the canonical length: a ``char(n)``'s text drops the
    padding that its cast reads (a padded UUID is no UUID to the cast).  NULL when either
    is NULL, so callers fall through to the full test."""
    return sql.SQL('octet_length({v}) = 36 AND ({c})::text = ({v})::text COLLATE "C"').format(
        c=copy, v=value)


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
    """A string column holding UUIDs, to be converted to ``uuid``.

    ``back`` is the same column on its way back to its string type (the
    rollback after the swap): the same engine, filling a string copy.
    """

    table: Table
    column: str
    back: bool = False
    choice: int = dataclasses.field(default=0, compare=False)
    """Which of the names the engine may give its temporary objects it uses: 0 the
    runbook's (``id_uuid``), n > 0 those names ending in ``_n``, for when the application
    has taken the first ones (``plan.with_free_names`` chooses; the same key either way)."""

    @property
    def _nth(self) -> str:
        return f"_{self.choice}" if self.choice else ""

    @property
    def temp(self) -> str:
        """The temporary column filled before the swap: the runbook's ``id_uuid``, or on
        the way back ``id_text``."""
        return fit_name(self.column, (BACK_SUFFIX if self.back else TEMP_SUFFIX) + self._nth)

    @property
    def mark(self) -> str:
        """The comment the engine gives the temporary column it creates: what tells its
        own column from an application's of the same name (the trigger and the checks
        are only ever created with the column, so the column's mark covers them)."""
        return f"uuid-migration: copy of {self.column}"

    def reversed(self) -> KeyColumn:
        return dataclasses.replace(self, back=not self.back)

    @property
    def copy_type(self) -> sql.Composable:
        """What a value of the column is cast to for its copy."""
        return sql.SQL("text" if self.back else "uuid")

    def copy_of(self, column: sql.Composable, *, cast_only: bool = False) -> sql.Composable:
        """The copy's value for the column's value ``column``: its ``uuid_copy``, or on the
        way back the uuid as text.  ``cast_only``: the cast alone, the same value for every
        UUID and an error (``invalid_text_representation``) for any other string, without
        ``uuid_copy``'s regular expression (``spelled_as_copy``): the fill's batches try it
        first (``fill.backfill``)."""
        if self.back:
            return sql.SQL("({})::text").format(column)
        return sql.SQL("({})::uuid").format(column) if cast_only else uuid_copy(column)

    def same_value(self, copy: sql.Composable, column: sql.Composable) -> sql.Composable:
        """True where the copy holds the column's value: its ``uuid_copy``, or on the way
        back a string (any spelling) of the uuid."""
        if self.back:
            return sql.SQL("({})::uuid IS NOT DISTINCT FROM {}").format(copy, column)
        return sql.SQL("CASE WHEN {spelled} THEN true ELSE {copy} IS NOT DISTINCT FROM {full} "
                       "END").format(spelled=spelled_as_copy(copy, column), copy=copy,
                                     full=uuid_copy(column))

    @property
    def invalid_index(self) -> str:
        """The name of the partial index on the string column over its rows that are not
        UUIDs (``uuid_copy``'s stand-ins), by which the swap finds them under its locks.
        An index's name is the schema's, not the table's: the table is in its hash."""
        digest = hashlib.sha1(f"{self.table.schema}\0{self.table.name}\0{self.column}"
                              .encode()).hexdigest()[:HASH_CHARS]
        return fit_name(f"migration_invalid_{self.column}", f"_{digest}{self._nth}")

    def helper(self, kind: str) -> str:
        """Names of the engine's temporary objects for this column (``sync``
        trigger, ``filled`` and ``not_null`` checks), within PostgreSQL's 63 bytes."""
        return fit_name(f"migration_{kind}_{self.column}", self._nth)

    def __str__(self) -> str:
        return f"{self.table}.{self.column}"

    @property
    def spec(self) -> str:
        """The key as ``--key`` takes it (``schema.table.column``, quoted where needed);
        what ``migration_log`` and the backup record it as."""
        return ".".join(quote_ident(part)
                        for part in (self.table.schema, self.table.name, self.column))


def is_backup_schema(name: str) -> bool:
    """Whether ``name`` is the name of a backup schema of the engine's (any key's)."""
    return name == BACKUP_SCHEMA or name.startswith(BACKUP_SCHEMA + "_")


def backup_schema(key: KeyColumn) -> str:
    """Where the backup of the plan whose parent is ``key`` is kept.

    The runbook's key keeps the runbook's ``migration_backup``; any other key
    gets its own schema, named after it, so that two keys migrated one after
    the other in one database each keep their own backup.  The schema records
    the key it belongs to (``backup.KEY_TABLE``): a name is only a name.
    """
    if (key.table.name, key.column) == RUNBOOK_KEY:
        return BACKUP_SCHEMA
    return fit_name(f"{BACKUP_SCHEMA}_{key.table.schema}_{key.table.name}_{key.column}")


_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")


def quote_ident(name: str) -> str:
    """``name`` double-quoted unless it is a plain lower-case identifier, for the key's
    ``spec``, which ``--key`` reads back; unlike PostgreSQL's quote_ident it leaves
    keywords bare (``public.order.user``).  SQL text quotes every name
    (``sqlexpr.quote_ident``)."""
    if _PLAIN_IDENTIFIER.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


SHADOW_NAME = r"^migration_(ix|fk|ck)_[0-9a-f]{16}$"
"""What every name ``shadow_name`` makes looks like (a POSIX regular expression)."""


def shadow_name(kind: str, table: Table, original: str) -> str:
    """The name of the copy the engine builds beside an original index or constraint.

    Derived from what it copies, so a resumed run finds the copy it had begun,
    and short enough for PostgreSQL's 63 bytes whatever the original's length.
    """
    digest = hashlib.sha1(f"{table.schema}\0{table.name}\0{original}".encode()).hexdigest()
    return fit_name(f"migration_{kind}_{digest[:16]}")
