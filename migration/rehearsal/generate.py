"""Data for any schema: every table of a database filled with rows its constraints accept.

``rehearse --schema-from`` loads an application's schema into a throwaway
database; :func:`populate` reads that database's catalog as it is and fills
it, one table at a time, parents before children:

1. values are made in Python, deterministically (a random generator seeded by
   ``seed`` and the table's name), and streamed with ``COPY`` into a staging
   table of the target's columns, typed by their base types (a domain is
   checked below, not by the COPY).  Columns drawing from a sequence (serial,
   identity) keep their default, evaluated in the staging table;
2. simple CHECKs (comparisons with constants, ``IN`` lists, lengths) steer
   the values; a unique column gets values injective in the row's number;
   a foreign key draws its values from the rows of the referenced table
   (whole tuples, for composite keys);
3. the one mechanism for what cannot be steered: the staging rows that fail
   a CHECK, a domain's CHECK or every partition's bounds are left out by the
   ``INSERT ... SELECT ... WHERE``, which evaluates the server's own text of
   each expression (``pg_get_expr``) over the staging table, whose columns
   have the target's names; duplicates are left out by ``ON CONFLICT DO
   NOTHING`` (or, where a deferrable unique constraint forbids that, deleted
   from the staging table first).

Cycles and self-references: a foreign key whose columns may be NULL is
filled NULL and set by an ``UPDATE`` once its target has rows; a NOT NULL
self-reference points each row at itself.  A NOT NULL cycle is an error.

The plan's key columns hold canonical lower-case UUID strings; a dirty load
then plants the problems the toolkit exists to catch, as
:mod:`migration.rehearsal.seed` does for the runbook's schema.
"""

from __future__ import annotations

import io
import random
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration.connection import Connection
from migration.model import BACKUP_SCHEMA, KeyColumn, Table
from migration.plan import Plan
from migration.rehearsal.fingerprint import LOG_TABLE
from migration.rehearsal.seed import Planted

STAGING = sql.Identifier("migration_generate_staging")
"""The temporary table the rows of one table go through (in ``pg_temp``)."""
CHUNK = 5000
"""Rows per COPY: memory holds one chunk, whatever the table's size."""
CANDIDATES = 20
"""Rows staged to find one the table accepts (``candidate``)."""
NULL_SHARE = 0.1
"""Share of NULLs in a nullable column that nothing else constrains."""


class GenerateError(RuntimeError):
    """A table whose constraints the generator cannot satisfy; the message names it."""


# --------------------------------------------------------------------------- the catalog

@dataclass(frozen=True)
class ColumnType:
    """A column's type as values are made for it: its base type, domains resolved."""

    staging: str
    """The type of the staging table's column (``format_type`` of the base type)."""
    name: str
    """``pg_type.typname`` of the scalar (the element, for an array)."""
    array: bool = False
    length: int | None = None  # varchar(n), char(n); numeric's precision
    scale: int | None = None   # numeric's scale
    labels: tuple[str, ...] = ()  # an enum's labels, in their order
    domain_checks: tuple[str, ...] = ()  # expressions over VALUE


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: ColumnType
    not_null: bool
    default: str | None
    """The column's default; for an identity column, its sequence's ``nextval``."""
    from_sequence: bool
    """Serial or identity: the default is left to work (the sequence stays ahead of the rows)."""
    identity_always: bool


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    target: Table
    target_columns: tuple[str, ...]
    name: str | None  # None: a plan child the catalog does not link to its parent


@dataclass
class TableSpec:
    table: Table
    columns: list[ColumnSpec]
    uniques: list[tuple[str, ...]]
    """Columns of each unique index (PK, UNIQUE, unique indexes; an expression index: the
    columns its expressions use)."""
    checks: list[str]
    foreign_keys: list[ForeignKey]
    partitions: list[str] = field(default_factory=list)
    """For a partitioned table: each leaf partition's constraint (a row must meet one)."""
    partitioned: bool = False
    deferrable_unique: bool = False

    def column(self, name: str) -> ColumnSpec:
        return next(c for c in self.columns if c.name == name)


_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind = 'p'
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname NOT LIKE %(backup)s
  AND NOT (c.relname = %(log)s)
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""

_COLUMNS = """
SELECT a.attname, a.atttypid, a.atttypmod, a.attnotnull, a.attidentity,
       pg_get_expr(d.adbin, d.adrelid), s.seq
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
CROSS JOIN LATERAL (SELECT pg_get_serial_sequence(%(rel)s::regclass::text, a.attname) AS seq) s
WHERE a.attrelid = %(rel)s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""

_UNIQUES = """
SELECT array(SELECT a.attname FROM pg_attribute a
             WHERE a.attrelid = i.indrelid AND a.attnum > 0
               AND (a.attnum = ANY (i.indkey) OR EXISTS (
                    SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = i.indexrelid AND d.refobjid = i.indrelid
                      AND d.refobjsubid = a.attnum))
             ORDER BY a.attnum),
       NOT i.indimmediate
FROM pg_index i WHERE i.indrelid = %(rel)s AND i.indisunique
ORDER BY i.indexrelid
"""

_CHECKS = """
SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint
WHERE conrelid = %(rel)s AND contype = 'c' ORDER BY conname
"""

_FOREIGN_KEYS = """
SELECT k.conname, tn.nspname, t.relname,
       array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i)
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.confrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE k.conrelid = %(rel)s AND k.contype = 'f' AND k.conparentid = 0
ORDER BY k.conname
"""

_LEAVES = """
SELECT pg_get_partition_constraintdef(p.relid)
FROM pg_partition_tree(%(rel)s) p WHERE p.isleaf ORDER BY p.relid::regclass::text
"""

_TYPE = """
SELECT t.typtype, t.typname, t.typbasetype, t.typtypmod, t.typelem, t.typcategory, t.typnotnull,
       format_type(t.oid, %(mod)s),
       array(SELECT pg_get_expr(c.conbin, 0) FROM pg_constraint c
             WHERE c.contypid = t.oid AND c.contype = 'c' ORDER BY c.conname),
       array(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
             ORDER BY e.enumsortorder)
FROM pg_type t WHERE t.oid = %(oid)s
"""


def _column_type(cur: Cursor, oid: int, typmod: int) -> tuple[ColumnType, bool]:
    """The type values are made for, and whether a domain on the way says NOT NULL."""
    cur.execute(_TYPE, {"oid": oid, "mod": typmod if typmod >= 0 else None})
    row = cur.fetchone()
    if row is None:
        raise GenerateError(f"type {oid} is not in pg_type")
    kind, name, base, base_mod, elem, category, not_null, formatted, checks, labels = row
    if kind == "d":
        inner, inner_not_null = _column_type(cur, base, base_mod if base_mod >= 0 else typmod)
        return (ColumnType(inner.staging, inner.name, inner.array, inner.length, inner.scale,
                           inner.labels, (*checks, *inner.domain_checks)),
                not_null or inner_not_null)
    if category == "A" and elem:
        inner, _ = _column_type(cur, elem, typmod)
        # The element's own domain checks are not applied per element: left out.
        return ColumnType(inner.staging + "[]", inner.name, array=True, length=inner.length,
                          scale=inner.scale, labels=inner.labels), False
    length = scale = None
    if name in ("varchar", "bpchar") and typmod >= 4:
        length = typmod - 4
    elif name == "numeric" and typmod >= 4:
        length, scale = (typmod - 4) >> 16 & 0xFFFF, (typmod - 4) & 0xFFFF
    return ColumnType(formatted, name, length=length, scale=scale, labels=tuple(labels)), False


def read_schema(conn: Connection, plan: Plan | None = None) -> list[TableSpec]:
    """Every table the generator fills, as the catalog describes it.

    A plan child with no foreign key to its parent gets one here (named None):
    its values are drawn from the parent's as if the catalog had it.
    """
    specs = []
    with conn.cursor() as cur:
        cur.execute(_TABLES, {"backup": BACKUP_SCHEMA.replace("_", "\\_") + "%",
                              "log": LOG_TABLE})
        for oid, schema, name, partitioned in cur.fetchall():
            specs.append(_table_spec(cur, oid, Table(schema, name), partitioned=partitioned))
    if plan is not None:
        _link_plan(specs, plan)
    return specs


def _table_spec(cur: Cursor, oid: int, table: Table, *, partitioned: bool) -> TableSpec:
    rel = {"rel": oid}
    cur.execute(_COLUMNS, rel)
    rows = cur.fetchall()
    columns = []
    for name, type_oid, typmod, not_null, identity, default, sequence in rows:
        ctype, domain_not_null = _column_type(cur, type_oid, typmod)
        from_sequence = identity in ("a", "d") or (
            sequence is not None and default is not None and "nextval(" in default)
        if identity in ("a", "d"):
            default = sql.SQL("nextval({}::regclass)").format(sql.Literal(sequence)).as_string(cur)
        columns.append(ColumnSpec(name, ctype, not_null or domain_not_null, default,
                                  from_sequence, identity == "a"))
    cur.execute(_UNIQUES, rel)
    uniques = cur.fetchall()
    cur.execute(_CHECKS, rel)
    checks = [expr for (expr,) in cur.fetchall()]
    cur.execute(_FOREIGN_KEYS, rel)
    fks = [ForeignKey(tuple(cols), Table(ts, tn), tuple(refs), name)
           for name, ts, tn, cols, refs in cur.fetchall()]
    leaves: list[str] = []
    if partitioned:
        cur.execute(_LEAVES, rel)
        leaves = [expr or "true" for (expr,) in cur.fetchall()]
    return TableSpec(table, columns, [tuple(cols) for cols, _ in uniques], checks, fks,
                     leaves, partitioned, any(deferrable for _, deferrable in uniques))


def _link_plan(specs: list[TableSpec], plan: Plan) -> None:
    parent = plan.parent
    for key in plan.children:
        spec = next((s for s in specs if s.table == key.table), None)
        if spec is None:
            raise GenerateError(f"{key}: the plan's table is not in the database")
        if not any(key.column in fk.columns for fk in spec.foreign_keys):
            spec.foreign_keys.append(
                ForeignKey((key.column,), parent.table, (parent.column,), None))


# --------------------------------------------------------------------------- simple CHECKs

_IDENT = r'(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)'
_NUMBER = r"-?\d+(?:\.\d+)?"
_COMPARISON = re.compile(
    rf"^\(*({_IDENT})\)*(?:::[a-z ]+)? (>=|<=|>|<) \(*'?({_NUMBER})'?\)*(?:::[a-z ]+)?\)*$")
_RESIDUE = re.compile(
    rf"^\(*({_IDENT})\)*(?:::[a-z ]+)? % \(*(\d+)\)*(?:::[a-z ]+)?\)* (=|<>) \(*(\d+)\)*"
    rf"(?:::[a-z ]+)?\)*$")
_LIST = re.compile(
    rf"^\(*({_IDENT})\)*(?:::[a-z ]+)? = ANY \(+ARRAY\[(.*)\]\)*(?:::[a-z ]+\[\])?\)*$")
_LENGTH = re.compile(
    rf"^(?:length|char_length)\(\(*({_IDENT})\)*(?:::text)?\) (>=|<=|>|<|=) ({_NUMBER})$")
_LIST_ITEM = re.compile(r"'((?:[^']|'')*)'(?:::[a-z ]+)?|(" + _NUMBER + ")")


@dataclass
class Steer:
    """What the parsed CHECKs say about one column's values."""

    low: Decimal | None = None
    high: Decimal | None = None
    choices: list[str] | None = None
    min_length: int = 0
    residue: tuple[int, int, bool] | None = None  # x % m = r (True) or x % m <> r (False)
    max_length: int | None = None

    def bound(self, op: str, number: Decimal) -> None:
        """``column op number``, kept as an inclusive range (a strict bound moves by one unit,
        which suits integers and numbers of up to a few decimals; the filter has the last word)."""
        step = Decimal(1) if number == number.to_integral_value() else Decimal("0.001")
        if op in (">", ">="):
            value = number + step if op == ">" else number
            self.low = value if self.low is None else max(self.low, value)
        else:
            value = number - step if op == "<" else number
            self.high = value if self.high is None else min(self.high, value)


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _conjuncts(expr: str) -> list[str]:
    """``(a) AND (b) AND ...`` at the top level, outer parentheses removed."""
    expr = expr.strip()
    while expr.startswith("(") and _closing(expr, 0) == len(expr) - 1:
        expr = expr[1:-1].strip()
    parts, depth, start, quoted = [], 0, 0, False
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and expr.startswith(" AND ", i):
            parts.append(expr[start:i])
            start = i + len(" AND ")
        i += 1
    parts.append(expr[start:])
    return [part.strip() for part in parts]


def _closing(expr: str, at: int) -> int:
    depth, quoted = 0, False
    for i in range(at, len(expr)):
        ch = expr[i]
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def steering(checks: Sequence[str]) -> dict[str, Steer]:
    """The parts of CHECK expressions this module understands, per column; the rest is
    left to the filter."""
    steers: dict[str, Steer] = {}
    for check in checks:
        for atom in _conjuncts(check):
            if match := _COMPARISON.match(atom):
                name, op, number = match.groups()
                steers.setdefault(_unquote(name), Steer()).bound(op, Decimal(number))
            elif match := _RESIDUE.match(atom):
                name, modulus, op, residue = match.groups()
                if int(modulus) > 1 and int(residue) < int(modulus):
                    steers.setdefault(_unquote(name), Steer()).residue = (
                        int(modulus), int(residue), op == "=")
            elif match := _LIST.match(atom):
                name, items = match.groups()
                values = [m.group(1).replace("''", "'") if m.group(2) is None else m.group(2)
                          for m in _LIST_ITEM.finditer(items)]
                steers.setdefault(_unquote(name), Steer()).choices = values
            elif match := _LENGTH.match(atom):
                name, op, number = match.groups()
                steer = steers.setdefault(_unquote(name), Steer())
                bound = int(Decimal(number))
                if op in (">", ">=", "="):
                    steer.min_length = max(steer.min_length, bound + (op == ">"))
                if op in ("<", "<=", "="):
                    top = bound - (op == "<")
                    steer.max_length = top if steer.max_length is None else min(
                        steer.max_length, top)
    return steers


# --------------------------------------------------------------------------- values

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
_EPOCH = datetime(2024, 1, 1)
_INT_LIMITS = {"int2": 2**15 - 1, "int4": 2**31 - 1, "int8": 2**63 - 1}


class Unsupported(Exception):
    """No values can be made for this type."""


def _allowed_offsets(low: int, residue: tuple[int, int, bool] | None) -> tuple[int, list[int]]:
    """The period of the integers from ``low`` up that meet ``residue``, and the offsets
    within one period that do (every offset of a period of 1 when there is none)."""
    if residue is None:
        return 1, [0]
    modulus, remainder, equal = residue
    return modulus, [d for d in range(modulus) if ((low + d) % modulus == remainder) == equal]


def _nth_meeting(low: int, n: int, residue: tuple[int, int, bool] | None) -> int:
    """The ``n``-th integer from ``low`` up (counting from 0) that meets ``residue``;
    injective in ``n``.  A column's last residue CHECK steers; the filter has the last word."""
    period, offsets = _allowed_offsets(low, residue)
    rounds, k = divmod(n, len(offsets))
    return low + rounds * period + offsets[k]


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = _ALPHABET[r] + digits
        if n == 0:
            return digits


@dataclass
class ValueMaker:
    """Values of one column: ``make(i)`` for row number ``i``, unique in ``i`` when asked."""

    table: Table
    column: ColumnSpec
    steer: Steer
    unique: bool
    rng: random.Random

    def make(self, i: int) -> object:
        if self.column.type.array:
            count = 1 + self.rng.randrange(3)
            return [self._scalar(i if k == 0 else self.rng.randrange(10**6),
                                 unique=self.unique and k == 0)
                    for k in range(count)]
        return self._scalar(i, unique=self.unique)

    def _scalar(self, i: int, *, unique: bool) -> object:
        ctype, steer = self.column.type, self.steer
        if steer.choices is not None:
            return self._choice(steer.choices, i, unique=unique)
        if ctype.labels:
            return self._choice(list(ctype.labels), i, unique=unique)
        name = ctype.name
        if name in _INT_LIMITS:
            return self._integer(i, _INT_LIMITS[name], unique=unique)
        if name == "numeric":
            return self._number(i, unique=unique)
        if name in ("float4", "float8"):
            low = float(steer.low) if steer.low is not None else 1.0
            return low + (i if unique else self.rng.randrange(1000)) + 0.25
        if name in ("text", "varchar", "bpchar", "name", "citext"):
            if "uuid" in (self.column.default or ""):  # a string id: gen_random_uuid()::text
                return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            return self._text(i, unique=unique)
        if name == "bool":
            return bool(i % 2) if unique else self.rng.random() < 0.5
        if name == "uuid":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        if name == "date":
            return (_EPOCH + timedelta(days=i if unique else self.rng.randrange(1000))).date()
        if name in ("timestamp", "timestamptz"):
            return _EPOCH + timedelta(minutes=i if unique else self.rng.randrange(10**6))
        if name in ("time", "timetz"):
            seconds = i % 86400 if unique else self.rng.randrange(86400)
            return f"{seconds // 3600:02}:{seconds // 60 % 60:02}:{seconds % 60:02}"
        if name == "interval":
            return f"{i if unique else self.rng.randrange(10**5)} seconds"
        if name in ("json", "jsonb"):
            return f'{{"n": {i}, "word": "{self.rng.choice(_WORDS)}"}}'
        if name == "bytea":
            return bytes(self.rng.getrandbits(8) for _ in range(4)) + i.to_bytes(8, "big")
        if name in ("inet", "cidr"):
            n = i if unique else self.rng.getrandbits(24)
            return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        raise Unsupported(ctype.staging)

    def _choice(self, choices: list[str], i: int, *, unique: bool) -> str:
        return choices[i % len(choices)] if unique else self.rng.choice(choices)

    def _integer(self, i: int, limit: int, *, unique: bool) -> int:
        low = int(self.steer.low) if self.steer.low is not None else 1
        high = int(self.steer.high) if self.steer.high is not None else min(limit, low + 10**6)
        if unique:
            return _nth_meeting(low, i, self.steer.residue)
        period, offsets = _allowed_offsets(low, self.steer.residue)
        within = (max(0, min(high, low + 1000) - low) + 1) * len(offsets) // period
        return _nth_meeting(low, self.rng.randrange(max(within, 1)), self.steer.residue)

    def _number(self, i: int, *, unique: bool) -> Decimal:
        scale = self.column.type.scale or 0
        unit = Decimal(1).scaleb(-scale)
        low = self.steer.low if self.steer.low is not None else Decimal(1)
        if unique:
            return (low + i * unit).quantize(unit)
        top = Decimal(1000)
        if self.steer.high is not None:
            top = min(top, self.steer.high - low)
        if self.column.type.length is not None:
            top = min(top, Decimal(10) ** (self.column.type.length - scale) - unit - low)
        steps = max(int(top / unit), 0)
        return (low + self.rng.randint(0, steps) * unit).quantize(unit)

    def _text(self, i: int, *, unique: bool) -> str:
        limit = min(n for n in (self.column.type.length, self.steer.max_length, 40)
                    if n is not None)
        text = _base36(i) if unique else f"{self.rng.choice(_WORDS)} {self.rng.randrange(1000)}"
        if len(text) > limit:
            if unique:
                raise GenerateError(
                    f"{self.table}.{self.column.name}: {i + 1} unique values do not fit in "
                    f"{limit} characters")
            text = text[:limit]
        return text.ljust(self.steer.min_length, "_")


# --------------------------------------------------------------------------- COPY text

def _copy_field(value: object) -> str:
    if value is None:
        return "\\N"
    return _escape(_literal(value))


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list):
        return "{" + ",".join(_array_item(item) for item in value) + "}"
    return str(value)


def _array_item(value: object) -> str:
    text = _literal(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


# --------------------------------------------------------------------------- loading

def _order(specs: Sequence[TableSpec]) -> tuple[list[TableSpec], set[tuple[Table, ForeignKey]]]:
    """Tables parents first, and the foreign keys left NULL until their target has rows
    (self-references and one nullable key per cycle)."""
    by_table = {spec.table: spec for spec in specs}
    deferred: set[tuple[Table, ForeignKey]] = set()
    for spec in specs:
        for fk in spec.foreign_keys:
            if fk.target == spec.table:
                deferred.add((spec.table, fk))
            elif fk.target not in by_table:
                raise GenerateError(f"{spec.table}: foreign key {fk.name} refers to "
                                    f"{fk.target}, a table the generator does not fill")
    ordered: list[TableSpec] = []
    done: set[Table] = set()
    while len(ordered) < len(specs):
        ready = [spec for spec in specs if spec.table not in done and all(
            fk.target in done or (spec.table, fk) in deferred for fk in spec.foreign_keys)]
        if ready:
            ordered.extend(ready)
            done.update(spec.table for spec in ready)
            continue
        breakable = [(spec.table, fk) for spec in specs if spec.table not in done
                     for fk in spec.foreign_keys
                     if fk.target not in done and (spec.table, fk) not in deferred
                     and not any(spec.column(c).not_null for c in fk.columns)]
        if not breakable:
            left = ", ".join(str(spec.table) for spec in specs if spec.table not in done)
            raise GenerateError(f"a cycle of NOT NULL foreign keys among {left}: "
                                "no table can be filled first")
        deferred.add(min(breakable, key=lambda pair: (pair[0], pair[1].columns)))
    return ordered, deferred


@dataclass
class _Draw:
    """The target rows a foreign key's values are drawn from; ``enumerated``: row n takes
    ``values[n]`` (each row its own combination), else a random one."""

    values: list[tuple[object, ...]]
    enumerated: bool = False


@dataclass
class Loader:
    cur: Cursor
    seed: int
    plan: Plan | None
    rows: int
    deferred: set[tuple[Table, ForeignKey]]
    rejected: dict[str, int] = field(default_factory=dict)
    """After a load where no row landed: each condition that left rows out, and how many."""

    def load(self, spec: TableSpec, count: int, *, start: int = 0,
             overrides: Mapping[str, object] | None = None) -> int:
        """Generate ``count`` candidate rows into ``spec.table``; the number that landed."""
        self._stage_rows(spec, count, start=start, overrides=overrides or {})
        return self._insert(spec)

    def candidate(self, spec: TableSpec, *, start: int,
                  required: Sequence[str] = ()) -> dict[str, str | None] | None:
        """One row the table would accept, not inserted: each generated column's value as
        text (columns left to their defaults are absent); None if no candidate qualifies.
        Every foreign key is drawn, none left NULL for later; ``required`` are not NULL."""
        found = self.candidates(spec, start=start, required=required)
        return found[0] if found else None

    def candidates(self, spec: TableSpec, *, start: int, required: Sequence[str] = (),
                   staged: int = CANDIDATES, limit: int = 1) -> list[dict[str, str | None]]:
        """Up to ``limit`` of ``staged`` generated rows that the table would accept one by
        one, as ``candidate`` makes them (their unique values differ, being made from
        distinct row numbers)."""
        copied = self._stage_rows(spec, staged, start=start, overrides={}, draw_all=True)
        taken = [sql.SQL("NOT EXISTS (SELECT FROM {t} x WHERE ROW({x}) = ROW({s}))").format(
            t=spec.table.ident, x=sql.SQL(", ").join(sql.Identifier("x", c) for c in cols),
            s=sql.SQL(", ").join(sql.Identifier("s", c) for c in cols))
            for cols in spec.uniques if cols]
        where = [*self._conditions(spec).values(), *taken,
                 *(sql.SQL("{} IS NOT NULL").format(sql.Identifier("s", c)) for c in required)]
        self.cur.execute(sql.SQL("SELECT {cols} FROM pg_temp.{staging} s WHERE {where} "
                                 "ORDER BY s.ctid LIMIT %s").format(
            cols=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("s", c))
                                    for c in copied),
            staging=STAGING, where=sql.SQL(" AND ").join([sql.SQL("true"), *where])), (limit,))
        rows = self.cur.fetchall()
        self.cur.execute(sql.SQL("DROP TABLE pg_temp.{}").format(STAGING))
        return [dict(zip(copied, row, strict=True)) for row in rows]

    def _stage_rows(self, spec: TableSpec, count: int, *, start: int,
                    overrides: Mapping[str, object], draw_all: bool = False) -> list[str]:
        """Generated rows in the staging table; the columns given values (the others are
        left to their defaults)."""
        rng = random.Random(f"{self.seed}:{spec.table}:{start}")
        draws, count = self._draws(spec, count, draw_all=draw_all)
        fk_columns = {c for fk in spec.foreign_keys for c in fk.columns}
        makers = self._makers(spec, rng, skip=fk_columns | set(overrides))
        keys = self._plan_keys(spec)
        copied = list(dict.fromkeys([*makers, *keys, *(c for fk in draws for c in fk.columns),
                                     *overrides]))
        defaulted = {c.name for c in spec.columns if c.default is not None and (
            c.from_sequence or c.name not in copied)}
        self._stage(spec, defaulted)
        self._copy(spec, copied, self._lines(spec, count, start, copied, makers, draws, keys,
                                             overrides, rng))
        self._self_references(spec)
        return copied

    def _makers(self, spec: TableSpec, rng: random.Random,
                skip: set[str]) -> dict[str, ValueMaker]:
        """A value maker per column the generator fills (not a sequence's, not a foreign
        key's); a column of a type it cannot make is left to its default, or NULL."""
        steers = steering([*spec.checks, *(_on_column(check, column.name)
                                           for column in spec.columns
                                           for check in column.type.domain_checks)])
        unique_columns = _injective(spec, steers, skip)
        makers = {}
        for column in spec.columns:
            if column.from_sequence or column.name in skip:
                continue
            maker = ValueMaker(spec.table, column, steers.get(column.name, Steer()),
                               column.name in unique_columns, rng)
            try:
                maker.make(0)
            except Unsupported as exc:
                if column.not_null and column.default is None:
                    raise GenerateError(f"{spec.table}.{column.name}: cannot make values of "
                                        f"type {exc}, and the column is NOT NULL without a "
                                        "default") from None
                continue
            makers[column.name] = maker
        return makers

    def _plan_keys(self, spec: TableSpec) -> set[str]:
        """The parent key column, when this is the parent's table: canonical UUID strings."""
        if self.plan is None or self.plan.parent.table != spec.table:
            return set()
        return {self.plan.parent.column}

    def _draws(self, spec: TableSpec, count: int, *,
               draw_all: bool = False) -> tuple[dict[ForeignKey, _Draw], int]:
        """For each foreign key filled now, the target's rows; and how many rows can be made
        (a unique key made only of foreign keys allows one row per combination)."""
        draws: dict[ForeignKey, _Draw] = {}
        for fk in spec.foreign_keys:
            if (spec.table, fk) in self.deferred and not draw_all:
                continue
            self.cur.execute(sql.SQL("SELECT DISTINCT {cols} FROM {t} WHERE {present} "
                                     "ORDER BY {cols}").format(
                cols=sql.SQL(", ").join(map(sql.Identifier, fk.target_columns)),
                t=fk.target.ident, present=_present(fk.target_columns)))
            draws[fk] = _Draw(self.cur.fetchall())
            if not draws[fk].values and any(spec.column(c).not_null for c in fk.columns):
                raise GenerateError(f"{spec.table}.{','.join(fk.columns)}: its foreign key "
                                    f"{fk.name} needs rows in {fk.target}, which has none")
        for cols in spec.uniques:
            keys = [fk for fk in draws if set(fk.columns) <= set(cols)]
            if not keys or not set(cols) <= {c for fk in keys for c in fk.columns}:
                continue
            radix = 1
            for fk in keys:
                values = draws[fk].values or [(None,) * len(fk.columns)]
                count = min(count, radix * len(values))
                draws[fk] = _Draw([values[n // radix % len(values)] for n in range(count)],
                                  enumerated=True)
                radix *= len(values)
        return draws, count

    def _lines(self, spec: TableSpec, count: int, start: int, copied: list[str],
               makers: Mapping[str, ValueMaker], draws: Mapping[ForeignKey, _Draw],
               keys: set[str], overrides: Mapping[str, object],
               rng: random.Random) -> Iterator[str]:
        for n in range(count):
            i = start + n
            row: dict[str, object] = {}
            for name, maker in makers.items():
                nullable = not maker.column.not_null and not maker.unique
                row[name] = None if nullable and rng.random() < NULL_SHARE else maker.make(i)
            for name in keys:
                row[name] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            for fk, draw in draws.items():
                if not draw.values:
                    continue
                nullable = not any(spec.column(c).not_null for c in fk.columns)
                if nullable and fk.name is not None and rng.random() < NULL_SHARE:
                    continue
                chosen = draw.values[n] if draw.enumerated else rng.choice(draw.values)
                row.update(zip(fk.columns, chosen, strict=True))
            row.update(overrides)
            yield "\t".join(_copy_field(row.get(name)) for name in copied) + "\n"

    def _stage(self, spec: TableSpec, defaulted: set[str]) -> None:
        """The staging table: the target's columns by base type, with the defaults of those
        left to them (a sequence's advances as the target's would)."""
        self.cur.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(STAGING))
        self.cur.execute(sql.SQL("CREATE TEMP TABLE {} ({})").format(
            STAGING, sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(
                    sql.Identifier(c.name), sql.SQL(c.type.staging),
                    sql.SQL(f" DEFAULT {c.default}") if c.name in defaulted else sql.SQL(""))
                for c in spec.columns)))

    def _copy(self, spec: TableSpec, columns: list[str], lines: Iterator[str]) -> None:
        if not columns:  # every column left to its default
            self.cur.execute(sql.SQL("INSERT INTO pg_temp.{} SELECT FROM generate_series(1, %s)")
                             .format(STAGING), (sum(1 for _ in lines),))
            return
        statement = sql.SQL("COPY pg_temp.{} ({}) FROM STDIN").format(
            STAGING, sql.SQL(", ").join(map(sql.Identifier, columns))).as_string(self.cur)
        while True:
            chunk = io.StringIO()
            written = 0
            for line in lines:
                chunk.write(line)
                written += 1
                if written == CHUNK:
                    break
            if not written:
                return
            chunk.seek(0)
            try:
                self.cur.copy_expert(statement, chunk)
            except psycopg2.DataError as exc:
                raise GenerateError(f"{spec.table}: a generated value was refused: "
                                    f"{str(exc).strip()}") from exc
            if written < CHUNK:
                return

    def _self_references(self, spec: TableSpec) -> None:
        """A NOT NULL self-reference points each staged row at itself."""
        for fk in spec.foreign_keys:
            if fk.target == spec.table and any(spec.column(c).not_null for c in fk.columns):
                self.cur.execute(sql.SQL("UPDATE pg_temp.{} SET ({}) = ROW({})").format(
                    STAGING, sql.SQL(", ").join(map(sql.Identifier, fk.columns)),
                    sql.SQL(", ").join(map(sql.Identifier, fk.target_columns))))

    def _conditions(self, spec: TableSpec) -> dict[str, sql.Composable]:
        """What a staged row must meet, by name: the table's CHECKs, its domains' CHECKs and
        (partitioned) one partition's bounds, as the server prints them."""
        conditions: dict[str, sql.Composable] = {
            check: sql.SQL("({}) IS NOT FALSE").format(sql.SQL(check))
                      for check in spec.checks}
        for column in spec.columns:
            conditions.update({
                f"{column.name}: {check}": sql.SQL("({}) IS NOT FALSE").format(
                    sql.SQL(_on_column(check, column.name)))
                for check in column.type.domain_checks})
        if spec.partitions:
            conditions["a partition's bounds"] = sql.SQL("({})").format(sql.SQL(" OR ").join(
                sql.SQL("({}) IS TRUE").format(sql.SQL(leaf)) for leaf in spec.partitions))
        return conditions

    def _insert(self, spec: TableSpec) -> int:
        """The staged rows that meet the conditions and duplicate no unique key go in; how
        many landed.  When none did, ``rejected`` says which condition left how many out."""
        conditions = self._conditions(spec)
        if spec.deferrable_unique:
            self._deduplicate(spec)
        names = sql.SQL(", ").join(sql.Identifier(c.name) for c in spec.columns)
        statement = sql.SQL("INSERT INTO {t} ({names}) {overriding}SELECT {names} FROM pg_temp.{s}"
                            " WHERE {where} ORDER BY ctid{conflict}").format(
            t=spec.table.ident, names=names, s=STAGING,
            overriding=sql.SQL("OVERRIDING SYSTEM VALUE " if any(
                c.identity_always for c in spec.columns) else ""),
            where=sql.SQL(" AND ").join([sql.SQL("true"), *conditions.values()]),
            conflict=sql.SQL("" if spec.deferrable_unique else " ON CONFLICT DO NOTHING"))
        try:
            self.cur.execute(statement)
        except psycopg2.Error as exc:
            raise GenerateError(f"{spec.table}: the generated rows were refused: "
                                f"{str(exc).strip()}") from exc
        landed = self.cur.rowcount
        self.rejected = {}
        if landed == 0 and conditions:
            self.cur.execute(sql.SQL("SELECT {} FROM pg_temp.{}").format(
                sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE NOT ({}))").format(condition)
                                   for condition in conditions.values()), STAGING))
            counts = self.cur.fetchone() or ()
            self.rejected = {text: n for text, n in zip(conditions, counts, strict=True) if n}
        self.cur.execute(sql.SQL("DROP TABLE pg_temp.{}").format(STAGING))
        return landed

    def _deduplicate(self, spec: TableSpec) -> None:
        """Where ON CONFLICT may not be used (a deferrable unique key): staged duplicates of
        a unique key, or of a row already in the table, are deleted first."""
        for cols in spec.uniques:
            if not cols:
                continue

            def of(alias: str, cols: tuple[str, ...] = cols) -> sql.Composable:
                return sql.SQL(", ").join(sql.Identifier(alias, c) for c in cols)

            self.cur.execute(sql.SQL(
                "DELETE FROM pg_temp.{s} d WHERE ctid <> (SELECT min(o.ctid) FROM pg_temp.{s} o"
                " WHERE ROW({o}) = ROW({d}))"
                " OR EXISTS (SELECT FROM {t} x WHERE ROW({x}) = ROW({d}))"
            ).format(s=STAGING, t=spec.table.ident, o=of("o"), d=of("d"), x=of("x")))

    def link(self, spec: TableSpec, fk: ForeignKey) -> None:
        """Fill a foreign key left NULL: row n of the table takes the target's row n + 1
        (cyclically).  If the UPDATE fails (a CHECK, a unique key), the rows keep NULL:
        it runs in a savepoint."""
        statement = sql.SQL(
            "WITH p AS (SELECT {ref}, row_number() OVER (ORDER BY {tcols}) AS n, "
            "count(*) OVER () AS total FROM {target} WHERE {present}), "
            "c AS (SELECT ctid AS tid, row_number() OVER (ORDER BY ctid) AS n FROM {table}) "
            "UPDATE {table} AS t SET ({cols}) = ROW({values}) FROM c, p "
            "WHERE t.ctid = c.tid AND p.n = 1 + mod(c.n, p.total)").format(
            ref=sql.SQL(", ").join(sql.SQL("{} AS {}").format(
                sql.Identifier(c), sql.Identifier(f"r{k}"))
                for k, c in enumerate(fk.target_columns)),
            tcols=sql.SQL(", ").join(map(sql.Identifier, fk.target_columns)),
            target=fk.target.ident, table=spec.table.ident, present=_present(fk.target_columns),
            cols=sql.SQL(", ").join(map(sql.Identifier, fk.columns)),
            values=sql.SQL(", ").join(sql.Identifier("p", f"r{k}")
                                      for k in range(len(fk.columns))))
        self.cur.execute("SAVEPOINT migration_generate_link")
        try:
            self.cur.execute(statement)
        except psycopg2.Error:
            self.cur.execute("ROLLBACK TO SAVEPOINT migration_generate_link")
        self.cur.execute("RELEASE SAVEPOINT migration_generate_link")


_FEW_VALUES = ("bool",)


def _injective(spec: TableSpec, steers: Mapping[str, Steer], skip: set[str]) -> set[str]:
    """The columns whose values are made injective in the row's number: one per unique key
    (the whole key is then unique), preferring a column with room for many values (not
    bounded by a CHECK, not an enum or a boolean); a key already covered needs none."""
    chosen: set[str] = set()

    def room(name: str) -> int:
        column, steer = spec.column(name), steers.get(name, Steer())
        few = column.type.labels or column.type.name in _FEW_VALUES or steer.choices
        bounded = steer.high is not None or (steer.max_length or 99) < 4
        return 2 * bool(few) + bool(bounded)

    for cols in spec.uniques:
        if chosen.intersection(cols) or any(spec.column(c).from_sequence for c in cols):
            continue
        fillable = [c for c in cols if c not in skip]  # foreign keys: see Loader._draws
        if fillable:
            chosen.add(min(fillable, key=room))
    return chosen


def _present(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier(c))
                                 for c in columns)


_VALUE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\bVALUE\b")


def _on_column(check: str, column: str) -> str:
    """A domain's CHECK over ``VALUE`` as a condition on a column of that domain."""
    ident = '"' + column.replace('"', '""') + '"'
    return _VALUE.sub(lambda m: ident if m.group(0) == "VALUE" else m.group(0), check)


# --------------------------------------------------------------------------- populate

def populate(conn: Connection, plan: Plan, *, rows: int, dirty: bool, seed: int = 0) -> Planted:
    """Fill every table of the database (the tool's own schemas left out) with up to
    ``rows`` rows each that meet its constraints, the plan's keys canonical UUID strings;
    with ``dirty``, plant the problems and say which.  One transaction, committed;
    every table analysed.  A transaction the caller has open is part of it."""
    planted = Planted()
    autocommit = conn.autocommit
    if autocommit:
        conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            specs = read_schema(conn, plan)
            ordered, deferred = _order(specs)
            by_table = {spec.table: spec for spec in specs}
            loader = Loader(cur, seed, plan, rows, deferred)
            for spec in ordered:
                if loader.load(spec, rows) == 0:
                    why = "; ".join(f"{condition} left out {n}"
                                    for condition, n in loader.rejected.items())
                    raise GenerateError(f"{spec.table}: none of the generated rows meets its "
                                        f"constraints ({why or 'duplicates of a unique key'})")
            for table, fk in sorted(deferred, key=lambda pair: (pair[0], pair[1].columns)):
                loader.link(by_table[table], fk)
            if dirty:
                _plant(loader, by_table, plan, planted, random.Random(f"{seed}:planted"))
            for spec in ordered:
                cur.execute(sql.SQL("ANALYZE {}").format(spec.table.ident))
    finally:
        if autocommit:
            conn.autocommit = True
    return planted


def _plant(loader: Loader, specs: Mapping[Table, TableSpec], plan: Plan, planted: Planted,
           rng: random.Random) -> None:
    """The problems validate_schema must find: new parent rows with invalid, colliding and
    non-canonical ids, and one orphan in each child (past its foreign key, if it has one)."""
    parent = plan.parent
    spec = specs[parent.table]
    cur = loader.cur
    start = loader.rows * 10
    cur.execute(sql.SQL("SELECT {k} FROM {t} WHERE {k} IS NOT NULL ORDER BY {k} LIMIT 1").format(
        k=sql.Identifier(parent.column), t=parent.table.ident))
    row = cur.fetchone()
    if row is None:
        raise GenerateError(f"{parent}: no parent row to plant a collision with")
    existing = str(row[0])

    def fresh() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    respelled = [fresh().replace("-", ""), fresh().upper()]
    mixed = fresh()
    respelled.append(mixed[:18].upper() + mixed[18:])
    wanted = {
        "invalid": ["not-a-uuid", "1234", fresh()[:35] + "z"],
        "twin": [existing.upper()],
        "respelled": respelled,
    }
    landed: dict[str, list[str]] = {kind: [] for kind in wanted}
    column = spec.column(parent.column)
    for kind, values in wanted.items():
        for value in values:
            start += 1
            if loader.load(spec, 1, start=start, overrides={parent.column: value}):
                held = _as_held(column, value)
                # A CHAR(n) pads a shorter spelling (the UUID without hyphens), and the
                # cast to uuid reads the padding: the value is then an invalid id.
                landed[kind if held == value else "invalid"].append(held)
    planted.invalid_ids = landed["invalid"]
    if landed["twin"]:
        planted.colliding_ids = [existing, *landed["twin"]]
    planted.non_canonical_ids = [*landed["twin"], *landed["respelled"]]
    for n, key in enumerate(plan.children, start=1):
        _plant_orphan(loader, specs[key.table], key, f"00000000-0000-4000-8000-{n:012}",
                      start + n, planted)


def _as_held(column: ColumnSpec, value: str) -> str:
    """``value`` as the column holds it, and as validate_schema names it: a CHAR(n) pads it
    with spaces to n characters."""
    if column.type.name == "bpchar" and not column.type.array and column.type.length:
        return value.ljust(column.type.length)
    return value


def _plant_orphan(loader: Loader, spec: TableSpec, key: KeyColumn, value: str, start: int,
                  planted: Planted) -> None:
    cur = loader.cur
    guarded = any(key.column in fk.columns and fk.name is not None for fk in spec.foreign_keys)
    if guarded:
        try:
            cur.execute("SET LOCAL session_replication_role = replica")
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise GenerateError(
                f"{key}: planting an orphan past its foreign key needs a superuser "
                "(session_replication_role); connect as one, or load clean data") from exc
    try:
        if loader.load(spec, 1, start=start, overrides={key.column: value}):
            planted.orphans.setdefault(str(key), []).append(value)
    finally:
        if guarded:
            cur.execute("SET LOCAL session_replication_role = DEFAULT")
