"""SQL fragments shared by the checks and the steps, built with psycopg2.sql only.

Whether a string is a UUID is always decided by the server's own ``uuid``
input function: ``pg_input_is_valid`` on PostgreSQL 16 and later, a cast
inside a plpgsql exception block (a function in ``pg_temp``) before that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration.connection import Connection

_CHECKER = sql.SQL(
    """
    CREATE OR REPLACE FUNCTION pg_temp.migration_is_uuid(value text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE AS $$
    BEGIN
        PERFORM value::uuid;
        RETURN true;
    EXCEPTION WHEN invalid_text_representation THEN
        RETURN false;
    END $$
    """
)


def has_input_is_valid(conn: Connection) -> bool:
    return int(conn.server_version) >= 160000


def prepare_uuid_checker(cur: Cursor) -> None:
    """Create the pg_temp fallback where ``pg_input_is_valid`` does not exist."""
    if not has_input_is_valid(cur.connection):
        cur.execute(_CHECKER)


def is_uuid(conn: Connection, value: sql.Composable) -> sql.Composable:
    """A boolean expression: does PostgreSQL accept ``value`` as a uuid?"""
    if has_input_is_valid(conn):
        return sql.SQL("pg_input_is_valid({}, 'uuid')").format(value)
    return sql.SQL("pg_temp.migration_is_uuid({})").format(value)


def uuid_of(conn: Connection, value: sql.Composable) -> sql.Composable:
    """``value::uuid`` where PostgreSQL accepts it, NULL elsewhere (never an error)."""
    return sql.SQL("CASE WHEN {} THEN ({})::uuid END").format(is_uuid(conn, value), value)


def as_cast_reads(value: sql.Composable, *, padded: bool) -> sql.Composable:
    """The text a cast to uuid reads from a string value: a ``char(n)`` (``padded``) value
    with the spaces that pad it, which a text function would trim (``concat`` prints it
    with its type's output function, as the cast does)."""
    return sql.SQL("concat({})").format(value) if padded else value


@dataclass(frozen=True)
class UuidReader:
    """How to read one string column as uuid, and what its one scan found.

    Where every value of the column casts (the usual case, found by one bulk
    cast) a plain cast is used, which is fast; otherwise each value is tested
    first, which on servers before 16 costs a subtransaction per row.
    """

    conn: Connection
    every_value_casts: bool
    non_canonical: int = 0
    """Rows whose string is a UUID but not the uuid type's own spelling of it
    (lower case, hyphenated).  While it is 0, casting is one-to-one on the
    column: two rows that a unique index keeps apart stay apart as uuids."""
    string: bool = True  # False: the column is uuid already
    padded: bool = False
    """A ``char(n)`` column: its cast to uuid reads each value with the spaces that pad it
    (``'992a...ff    '`` is no UUID to it), while a text function trims them."""

    def as_cast_reads(self, value: sql.Composable) -> sql.Composable:
        return as_cast_reads(value, padded=self.padded)

    @property
    def canonical_strings(self) -> bool:
        """Every value is a string spelled as the uuid type spells it: two such
        strings are equal exactly when their uuids are."""
        return self.string and self.every_value_casts and not self.non_canonical

    def valid(self, value: sql.Composable) -> sql.Composable:
        if self.every_value_casts:
            return sql.SQL("{} IS NOT NULL").format(value)
        return sql.SQL("({} IS NOT NULL AND {})").format(
            value, is_uuid(self.conn, self.as_cast_reads(value)))

    def cast(self, value: sql.Composable) -> sql.Composable:
        if self.every_value_casts:
            return sql.SQL("({})::uuid").format(value)
        return sql.SQL("CASE WHEN {} THEN ({})::uuid END").format(
            is_uuid(self.conn, self.as_cast_reads(value)), value)


def reader(cur: Cursor, table: sql.Identifier, column: str, *,
           padded: bool = False) -> UuidReader:
    """Read the column once: does every value cast, and how many are non-canonical.

    The bulk cast runs in a savepoint; the first invalid value aborts it, and
    the count is then taken again with the per-value test.  ``padded``: a
    ``char(n)`` column (``UuidReader.padded``).
    """
    col = sql.Identifier(column)
    count = sql.SQL("SELECT count(*) FILTER (WHERE ({})::text <> {}) FROM {}")
    cur.execute("SAVEPOINT bulk_cast")
    try:
        cur.execute(count.format(sql.SQL("({})::uuid").format(col), col, table))
    except psycopg2.errors.InvalidTextRepresentation:
        cur.execute("ROLLBACK TO SAVEPOINT bulk_cast")
        testing = UuidReader(cur.connection, every_value_casts=False, padded=padded)
        cur.execute(count.format(testing.cast(col), col, table))
        return UuidReader(cur.connection, every_value_casts=False,
                          non_canonical=int((cur.fetchone() or [0])[0]), padded=padded)
    non_canonical = int((cur.fetchone() or [0])[0])
    cur.execute("RELEASE SAVEPOINT bulk_cast")
    return UuidReader(cur.connection, every_value_casts=True, non_canonical=non_canonical,
                      padded=padded)


def column_list(names: list[str], prefix: str | None = None) -> sql.Composable:
    """``a, b`` or ``p.a, p.b``."""
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)


def comment_on(target: sql.Composable, text: str | None) -> list[sql.Composable]:
    """``COMMENT ON target IS text``, or nothing where there is no text."""
    return [] if text is None else [
        sql.SQL("COMMENT ON {} IS {}").format(target, sql.Literal(text))]


def row_of(names: list[str], prefix: str | None = None) -> sql.Composable:
    """``ROW(a, b)``, a comparable tuple even for one column."""
    return sql.SQL("ROW({})").format(column_list(names, prefix))


# A definition as the server deparses it, token by token: string literals and
# quoted identifiers whole, so that nothing inside them is ever taken for a name.
_TOKEN = re.compile(r"""
      (?P<string>[Ee]?'(?:[^']|'')*')
    | (?P<quoted>"(?:[^"]|"")*")
    | (?P<word>[^\W\d][\w$]*)
    | (?P<space>\s+)
    | (?P<other>::|.)
""", re.VERBOSE | re.DOTALL)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _tokens(text: str) -> list[tuple[str, str]]:
    found = [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(text)]
    if "".join(value for _, value in found) != text:
        raise ValueError(f"cannot read the definition: {text}")
    return found


def _names(token: tuple[str, str]) -> str | None:
    """The identifier a token spells, or None for anything else."""
    kind, value = token
    if kind == "quoted":
        return value[1:-1].replace('""', '"')
    return value.lower() if kind == "word" else None


def rename_column(definition: str, column: str, new: str) -> str:
    """``definition`` (deparsed by the server) with every reference to ``column`` renamed.

    A word is a column reference unless it is qualified (next to a ``.``), a
    function name (before ``(``) or a type (after ``::``); literals and quoted
    identifiers are read whole.  The server checks the result when it runs it.
    """
    return substitute_column(definition, column, quote_ident(new))[0]


def substitute_column(definition: str, column: str, replacement: str,
                      qualifier: str | None = None, *, unqualified: bool = True
                      ) -> tuple[str, int]:
    """``definition`` with each reference to ``column`` replaced by ``replacement``
    (``{}`` in it standing for the reference as written), and how many were replaced.

    References are the unqualified words ``rename_column`` renames (unless
    ``unqualified`` is false) and, when ``qualifier`` is given, ``qualifier.column``.
    """
    tokens = _tokens(definition)
    solid = [i for i, token in enumerate(tokens) if token[0] != "space"]
    out = [value for _, value in tokens]
    replaced = 0
    for at, i in enumerate(solid):
        if _names(tokens[i]) != column:
            continue
        before = [tokens[j] for j in solid[max(at - 3, 0):at]]
        after = tokens[solid[at + 1]][1] if at + 1 < len(solid) else ""
        if after in (".", "("):
            continue
        if before[-1:] and before[-1][1] in (".", "::"):
            if (qualifier is None or before[-1][1] != "." or len(before) < 2
                    or _names(before[-2]) != qualifier
                    or (len(before) == 3 and before[0][1] == ".")):
                continue
            start = solid[at - 2]
            reference = "".join(out[start:i + 1])
            out[start:i] = [""] * (i - start)
        elif not unqualified:
            continue
        else:
            reference = quote_ident(column) if tokens[i][0] == "quoted" else tokens[i][1]
        out[i] = replacement.replace("{}", reference) if "{}" in replacement else replacement
        replaced += 1
    return "".join(out), replaced


def foreign_references(definition: str, column: str, table: str) -> int:
    """How many times ``definition`` names ``column`` behind a qualifier other than
    ``table`` (``alias.column``): the text alone cannot tell which table that is."""
    solid = [token for token in _tokens(definition) if token[0] != "space"]
    return sum(1 for qualifier, dot, token in zip(solid, solid[1:], solid[2:], strict=False)
               if dot[1] == "." and _names(token) == column and _names(qualifier) != table)


def concurrent_copy(index_definition: str, name: str, column: str, new_column: str) -> str:
    """``CREATE [UNIQUE] INDEX CONCURRENTLY name ...`` on ``new_column``: the deparsed
    definition of an index on ``column``, built again under another name."""
    return _index_copy(index_definition, name, column, new_column, partitioned=False)


def partitioned_copy(index_definition: str, name: str, column: str, new_column: str) -> str:
    """``CREATE [UNIQUE] INDEX name ON ONLY ...`` on ``new_column``: the deparsed
    definition of a partitioned table's index on ``column``, created again empty (and
    invalid) under another name, for its partitions' copies to be attached to it."""
    return _index_copy(index_definition, name, column, new_column, partitioned=True)


def _index_copy(index_definition: str, name: str, column: str, new_column: str, *,
                partitioned: bool) -> str:
    tokens = _tokens(rename_column(index_definition, column, new_column))
    words = [i for i, (kind, _) in enumerate(tokens) if kind != "space"]
    keywords = [tokens[i][1].upper() for i in words[:6]]
    head = ["CREATE", "UNIQUE", "INDEX"] if keywords[1:2] == ["UNIQUE"] else ["CREATE", "INDEX"]
    at = len(head)  # where the index's name stands
    if (keywords[:at] != head or keywords[at + 1] != "ON"
            or (keywords[at + 2] == "ONLY") is not partitioned):
        kind = "a partitioned" if partitioned else "a plain"
        raise ValueError(f"not an index of {kind} table: {index_definition}")
    return ("".join(value for _, value in tokens[:words[at]])
            + ("" if partitioned else "CONCURRENTLY ")
            + quote_ident(name) + "".join(value for _, value in tokens[words[at] + 1:]))


def with_tablespace(statement: str, tablespace: str | None) -> str:
    """A ``CREATE INDEX`` statement built in ``tablespace`` (None: the default), which
    ``pg_get_indexdef`` leaves out: the clause goes before a partial index's ``WHERE``."""
    if tablespace is None:
        return statement
    tokens = _tokens(statement)
    depth, at = 0, len(tokens)
    for i, (kind, value) in enumerate(tokens):
        depth += {"(": 1, ")": -1}.get(value, 0) if kind == "other" else 0
        if depth == 0 and kind == "word" and value.upper() == "WHERE":
            at = i
            break
    head = "".join(value for _, value in tokens[:at]).rstrip()
    tail = "".join(value for _, value in tokens[at:])
    return f"{head} TABLESPACE {quote_ident(tablespace)}" + (f" {tail}" if tail else "")


def replace_relations(definition: str, relations: dict[tuple[str, str], str]) -> str:
    """``definition`` (deparsed by the server, every relation schema-qualified) with each
    ``schema.name`` found in ``relations`` replaced by the text given for it."""
    tokens = _tokens(definition)
    solid = [i for i, token in enumerate(tokens) if token[0] != "space"]
    out = [value for _, value in tokens]
    for at in range(len(solid) - 2):
        first, dot, last = (tokens[i] for i in solid[at:at + 3])
        schema, name = _names(first), _names(last)
        before = tokens[solid[at - 1]][1] if at else ""
        if (dot[1] != "." or schema is None or name is None or before == "."
                or (schema, name) not in relations):
            continue
        out[solid[at]:solid[at + 2] + 1] = [""] * (solid[at + 2] - solid[at] + 1)
        out[solid[at]] = relations[(schema, name)]
    return "".join(out)
