"""The live load for any plan: pgbench scripts made from the schema ``--schema-from`` gave.

``SchemaLoad`` is ``load.LiveLoad`` (pgbench, the ledger, the orphan prober) with
scripts, ledger and probes made from the catalog for the tables of a plan, where
``LiveLoad``'s are written for the runbook's four tables:

- rows come from ``generate``'s value rules (``Loader.candidates``: NOT NULL,
  CHECKs, unique columns, foreign keys drawn from existing rows), made before the
  load starts into one pool table per table of the plan (``live_load.pool_<n>``,
  the values as text), and taken by a counter of its own (``live_load.drawn_<n>``),
  so that no generated row is written twice; each pool holds the table's share of
  the transactions the load is sized for (``pool_sizes``), by the weights of the
  scripts that write it, so a schema of many tables does not generate each table's
  rows for every transaction (41 tables: 41 times the rows);
- a *family* is a new row of the key's table with a fresh UUID key
  (``gen_random_uuid()``) and one row in each child table referring to it, in one
  transaction (``new_family``); ``delete_family`` deletes the latest family: the
  children whose foreign key does not cascade are deleted first, the others go with
  the parent (``ON DELETE CASCADE``);
- the key is updated (``rekey_family``) only where the foreign keys make it legal:
  on families whose children are all in tables whose foreign key is
  ``ON UPDATE CASCADE`` (``new_rekeyable_family`` makes them when some children's
  foreign key does not cascade).  No such foreign key: no key update, and
  ``SchemaLoad.skipped`` says so;
- other rows: a child row referring to an existing key (picked from
  ``live_load.picks``, a snapshot of the keys when the load starts), and a non-key
  column updated in the key's table and in each child (a column of no foreign key, no
  multi-column CHECK or unique key, not of the row's identity).

Every write records in ``live_load.ledger``, in its own transaction, each row it
wrote (``write``) or removed (``gone``, cascades included), as two JSON objects:
``ident``, the row's identity (its primary key, or a unique key over NOT NULL
columns: ``catalog.walk_key``; with neither, the whole record), and ``expect``,
the identity, the key columns (lower-case text, as a ``uuid`` prints them) and the
column updates change.  A key update records the family's rows ``gone`` before it
and ``write`` after it, so the latest entry of each identity holds.  Afterwards,
each table is checked against its latest entries (``_check_ledger``): a ``write``
must be there with those values, a ``gone`` must not.

Values reach the server as pgbench parameters (``:k``, ``:gid``): the key's type is
inferred from its column at each execution with ``-M extended``, and at the first
with ``-M prepared`` (``prepared_clients``), whose writes after the swap fail as an
application's pool would.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration.catalog import PAGES, regclass, walk_key
from migration.connection import Connection, connect
from migration.model import Table
from migration.plan import Plan
from migration.rehearsal.generate import Loader, TableSpec, read_schema
from migration.rehearsal.load import (
    LiveLoad,
    LoadUnavailable,
    MissingWrite,
    Probe,
)

POOL_ROWS = 20_000
"""Transactions the pools are sized for (each table's pool its share, with ``MIN_POOL``
at least): enough for minutes of the default load."""
MIN_POOL = 100
"""Generated rows of a table, however small its share of the transactions."""
STAGED = 2
"""Rows staged per pool row wanted: some fail a CHECK the values are not steered by."""
MAX_RECORD = 40
"""Columns a record may hold (``jsonb_build_object`` takes up to 100 arguments)."""
SCHEMA = sql.Identifier("live_load")

_SETUP = """
DROP SCHEMA IF EXISTS live_load CASCADE;
CREATE SCHEMA live_load;
CREATE TABLE live_load.ledger (
    seq bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL CHECK (op IN ('write', 'gone')),
    ident jsonb NOT NULL, expect jsonb NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE live_load.picks (n int PRIMARY KEY, key text NOT NULL);
CREATE TABLE live_load.families (n bigserial PRIMARY KEY, parent_key text NOT NULL,
                                 rekeyable boolean NOT NULL);
"""

# The foreign key actions of a column of a child referring to the parent key.
_ACTIONS = """
SELECT k.confupdtype, k.confdeltype FROM pg_constraint k
JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
WHERE k.contype = 'f' AND k.conparentid = 0 AND k.conrelid = to_regclass(%s)
  AND k.confrelid = to_regclass(%s) AND a.attname = %s
"""

# Columns that a CHECK or a unique index ties to another column.
_TIED = """
SELECT a.attname FROM pg_constraint k
JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
WHERE k.conrelid = to_regclass(%(rel)s) AND k.contype = 'c' AND cardinality(k.conkey) > 1
UNION
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = to_regclass(%(rel)s) AND i.indisunique AND i.indnatts > 1
"""


@dataclass(frozen=True)
class Part:
    """A table of the plan as the load writes it."""

    number: int
    spec: TableSpec
    keys: tuple[str, ...]
    """The plan's key columns in this table (the parent key first in the key's table)."""
    columns: tuple[str, ...]
    """The other columns a generated row gives values (the rest keep their defaults)."""
    ident: tuple[str, ...]
    """The row's identity: a primary key or unique key over NOT NULL columns; () if none."""
    payload: str | None
    """The column an UPDATE changes; None when no column can be changed alone."""
    update_cascades: bool = False
    """A child whose every key column's foreign key is ON UPDATE CASCADE."""
    delete_cascades: bool = False
    """A child whose every key column's foreign key is ON DELETE CASCADE."""
    constrained: bool = False
    """A child whose every key column has a foreign key (the prober tries orphans there)."""

    @property
    def table(self) -> Table:
        return self.spec.table

    @property
    def pool(self) -> sql.Identifier:
        return sql.Identifier("live_load", f"pool_{self.number}")

    @property
    def drawn(self) -> sql.Identifier:
        """The counter of the pool's rows taken."""
        return sql.Identifier("live_load", f"drawn_{self.number}")

    @property
    def draw(self) -> sql.Composable:
        """The script's variable holding the number of the pool row it takes (``take``)."""
        return sql.SQL(f":d{self.number}")

    def take(self) -> sql.Composable:
        """The next row of the pool, into ``draw``: a column of a ``\\gset`` SELECT."""
        return sql.SQL("nextval({}) AS {}").format(
            sql.Literal(f"live_load.drawn_{self.number}"), sql.SQL(f"d{self.number}"))

    @property
    def tbl(self) -> sql.Composable:
        return sql.Literal(str(self.table))

    @property
    def name(self) -> str:
        """The table in a script's name (pgbench names files after scripts)."""
        return f"{self.number}_" + re.sub(r"\W+", "_", self.table.name)[:30]

    def record_columns(self) -> list[str]:
        if not self.ident:
            return list(dict.fromkeys([*self.keys, *self.columns]))[:MAX_RECORD]
        return list(dict.fromkeys([*self.ident, *self.keys,
                                   *([self.payload] if self.payload else [])]))

    def _object(self, columns: Iterable[str]) -> sql.Composable:
        return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(c), sql.SQL(
                "lower({}::text)" if c in self.keys else "{}::text").format(
                    sql.Identifier("t", c)))
            for c in columns))

    @property
    def expect(self) -> sql.Composable:
        """The recorded values of row ``t`` (JSON): identity, keys, the updated column."""
        return self._object(self.record_columns())

    @property
    def identity(self) -> sql.Composable:
        """The identity of row ``t`` (JSON)."""
        return self._object(self.ident) if self.ident else self.expect

    @property
    def generated(self) -> list[str]:
        """The columns the pool gives values, in its order."""
        return [c for c in self.columns if c not in self.keys]

    @staticmethod
    def pool_column(index: int) -> sql.Identifier:
        """The pool's column of the ``index``-th of ``generated``: not the table's name,
        which may be the pool's row number's (``n``)."""
        return sql.Identifier(f"c{index}")

    def cast(self, column: str) -> sql.Composable:
        """Pool row ``p``'s value of ``column``, as the column's (base) type."""
        return sql.SQL("p.{}::{}").format(self.pool_column(self.generated.index(column)),
                                          sql.SQL(self.spec.column(column).type.staging))

    def matching(self, variable: str) -> sql.Composable:
        """Row ``t`` refers to (or, in the key's table, is) the key in ``:variable``."""
        return sql.SQL(" OR ").join(sql.SQL("t.{} = :{}").format(sql.Identifier(k),
                                                                   sql.SQL(variable))
                                    for k in self.keys)


class SchemaLoad(LiveLoad):
    """``LiveLoad`` on the tables of ``plan`` (any schema); ``skipped`` says which writes
    the schema does not allow, and why."""

    def __init__(self, dsn: str, plan: Plan, *, pool_rows: int = POOL_ROWS,
                 rate: float = 150, clients: int = 4, prepared_clients: int = 0,
                 probe_interval: float = 0.1, max_seconds: int = 3600,
                 pgbench: Path | None = None) -> None:
        self.plan, self.pool_rows = plan, pool_rows
        self.skipped: list[str] = []
        self.pool_sizes: dict[int, int] = {}
        """Generated rows per table (``Part.number``), row 0 for the prober apart."""
        conn = connect(dsn, readonly=True)
        try:
            self.parts = parts(conn, plan)
            self.scripts = {name: (weight, script.as_string(conn))
                            for name, (weight, script) in self._scripts().items()}
        finally:
            conn.close()
        super().__init__(dsn, rate=rate, clients=clients, schema=plan.schema,
                         probe_interval=probe_interval, max_seconds=max_seconds,
                         pgbench=pgbench, prepared_clients=prepared_clients)

    @property
    def parent(self) -> Part:
        return self.parts[0]

    @property
    def children(self) -> list[Part]:
        return [part for part in self.parts[1:] if part.table != self.parent.table]

    # -- the scripts ---------------------------------------------------------------------

    def _scripts(self) -> dict[str, tuple[int, sql.Composable]]:
        """Each script by name, with its weight (pgbench's ``--file=...@weight``)."""
        parent, children = self.parent, self.children
        cascading = [c for c in children if c.update_cascades]
        self_refs = parent.keys[1:]
        scripts: dict[str, tuple[int, sql.Composable]] = {}
        draws: Counter[int] = Counter()  # the weight of the scripts taking rows of a part

        def add(name: str, weight: int, script: sql.Composable,
                taking: Sequence[Part] = ()) -> None:
            scripts[name] = (weight, script)
            draws.update({part.number: weight for part in taking})

        rekeyable = not self_refs and len(cascading) == len(children)
        add("new_family", 3, self._new_family(children, rekeyable=rekeyable),
            [parent, *children])
        if self_refs:
            self.skipped.append(f"key updates: {parent.table} refers to itself "
                                f"({', '.join(self_refs)})")
        elif not cascading and children:
            self.skipped.append(f"key updates: no foreign key to {self.plan.parent} is "
                                "ON UPDATE CASCADE, so no key of a row with children may change")
        else:
            if not rekeyable:
                add("new_rekeyable_family", 1, self._new_family(cascading, rekeyable=True),
                    [parent, *cascading])
            add("rekey_family", 1, self._rekey(cascading))
        add("delete_family", 1, self._delete())
        for part in self.parts:
            if part.payload is None or not part.ident:
                self.skipped.append(f"updates of {part.table}: no column can be changed on "
                                    "its own" if part.ident else
                                    f"updates of {part.table}: its rows have no identity "
                                    "(no primary key or unique key over NOT NULL columns)")
            else:
                add(f"update_{part.name}", 2, self._update(part), [part])
        for part in children:
            add(f"insert_{part.name}", 2, self._insert_child(part), [part])
        total = sum(weight for weight, _ in scripts.values())
        self.pool_sizes = {part.number: max(MIN_POOL, math.ceil(
            self.pool_rows * draws[part.number] / total)) for part in self.parts}
        return scripts

    def _inserted(self, part: Part, keys: sql.Composable) -> sql.Composable:
        """INSERT pool row ``:d`` into ``part`` with its key columns set to ``keys``; ledgered."""
        columns = [c for c in part.columns if c not in part.keys]
        return sql.SQL(
            "WITH r AS (INSERT INTO {table} AS t ({names}) SELECT {values} FROM {pool} p "
            "WHERE p.n = {draw} RETURNING {ident} AS ident, {expect} AS expect)\n"
            "INSERT INTO live_load.ledger (tbl, op, ident, expect) "
            "SELECT {tbl}, 'write', ident, expect FROM r;\n").format(
            table=part.table.ident, pool=part.pool, draw=part.draw, tbl=part.tbl,
            names=sql.SQL(", ").join(map(sql.Identifier, [*part.keys, *columns])),
            values=sql.SQL(", ").join([*(keys for _ in part.keys), *map(part.cast, columns)]),
            ident=part.identity, expect=part.expect)

    def _recorded(self, part: Part, op: str, variable: str, *,
                  parent_only: bool = False) -> sql.Composable:
        """Ledger the rows of ``part`` that refer to (or are) the key in ``:variable``."""
        where = (sql.SQL("t.{} = :{}").format(sql.Identifier(part.keys[0]), sql.SQL(variable))
                 if parent_only else part.matching(variable))
        return sql.SQL("INSERT INTO live_load.ledger (tbl, op, ident, expect) "
                       "SELECT {tbl}, {op}, {ident}, {expect} FROM {table} t WHERE {where};\n"
                       ).format(tbl=part.tbl, op=sql.Literal(op), ident=part.identity,
                                expect=part.expect, table=part.table.ident, where=where)

    def _new_family(self, children: Sequence[Part], *, rekeyable: bool) -> sql.Composable:
        return sql.Composed([
            sql.SQL("SELECT {}, gen_random_uuid()::text AS k \\gset\nBEGIN;\n").format(
                sql.SQL(", ").join(part.take() for part in [self.parent, *children])),
            self._inserted(self.parent, sql.SQL(":k")),
            *(self._inserted(child, sql.SQL(":k")) for child in children),
            sql.SQL("INSERT INTO live_load.families (parent_key, rekeyable) "
                    "VALUES (:k, {});\nEND;\n").format(sql.Literal(rekeyable))])

    _FAMILY = ("SELECT count(*) AS found, coalesce(max(n), 0) AS fam, "
               "coalesce(max(parent_key), '') AS old, gen_random_uuid()::text AS k "
               "FROM (SELECT n, parent_key FROM live_load.families {where} "
               "ORDER BY n DESC LIMIT 1 FOR UPDATE SKIP LOCKED) f \\gset\n\\if :found\n")

    def _rekey(self, children: Sequence[Part]) -> sql.Composable:
        """The latest rekeyable family's key changed; its children follow by cascade."""
        parent = self.parent
        family = [parent, *children]
        return sql.Composed([
            sql.SQL("BEGIN;\n"), sql.SQL(self._FAMILY).format(where=sql.SQL("WHERE rekeyable")),
            *(self._recorded(p, "gone", "old", parent_only=p is parent) for p in family),
            sql.SQL("UPDATE {} AS t SET {} = :k WHERE t.{} = :old;\n").format(
                parent.table.ident, sql.Identifier(parent.keys[0]),
                sql.Identifier(parent.keys[0])),
            *(self._recorded(p, "write", "k", parent_only=p is parent) for p in family),
            sql.SQL("UPDATE live_load.families SET parent_key = :k WHERE n = :fam;\n"
                    "\\endif\nEND;\n")])

    def _delete(self) -> sql.Composable:
        """The latest family deleted: children whose key does not cascade first."""
        parent, children = self.parent, self.children
        return sql.Composed([
            sql.SQL("BEGIN;\n"), sql.SQL(self._FAMILY).format(where=sql.SQL("")),
            *(self._recorded(p, "gone", "old", parent_only=p is parent)
              for p in [parent, *children]),
            *(sql.SQL("DELETE FROM {} AS t WHERE {};\n").format(c.table.ident,
                                                                c.matching("old"))
              for c in children if not c.delete_cascades),
            sql.SQL("DELETE FROM {} AS t WHERE t.{} = :old;\n").format(
                parent.table.ident, sql.Identifier(parent.keys[0])),
            sql.SQL("DELETE FROM live_load.families WHERE n = :fam;\n\\endif\nEND;\n")])

    @staticmethod
    def _pick(part: Part) -> sql.Composable:
        """An existing key into ``:gid``, and the next row of ``part``'s pool."""
        return sql.SQL("\\set g random(1, :picks)\n"
                       "SELECT key AS gid, {} FROM live_load.picks WHERE n = :g \\gset\n"
                       ).format(part.take())

    def _update(self, part: Part) -> sql.Composable:
        """A non-key column of a row of an existing key (in a child: one row referring to
        it) set to a generated value."""
        assert part.payload is not None
        if part is self.parent:
            row = sql.SQL("t.{} = :gid").format(sql.Identifier(part.keys[0]))
        else:
            row = sql.SQL("(t.tableoid, t.ctid) = (SELECT tableoid, ctid FROM {} WHERE {} = :gid"
                          " LIMIT 1)").format(part.table.ident, sql.Identifier(part.keys[0]))
        return sql.Composed([self._pick(part), sql.SQL(
            "BEGIN;\n"
            "WITH r AS (UPDATE {table} AS t SET {payload} = {value} FROM {pool} p "
            "WHERE p.n = {draw} AND {row} RETURNING {ident} AS ident, {expect} AS expect)\n"
            "INSERT INTO live_load.ledger (tbl, op, ident, expect) "
            "SELECT {tbl}, 'write', ident, expect FROM r;\nEND;\n").format(
            table=part.table.ident, payload=sql.Identifier(part.payload),
            value=part.cast(part.payload), pool=part.pool, draw=part.draw, row=row,
            ident=part.identity, expect=part.expect, tbl=part.tbl)])

    def _insert_child(self, part: Part) -> sql.Composable:
        """A child row referring to an existing key."""
        return sql.Composed([self._pick(part), sql.SQL("BEGIN;\n"),
                             self._inserted(part, sql.SQL(":gid")), sql.SQL("END;\n")])

    # -- LiveLoad's hooks ------------------------------------------------------------------

    def _probes(self) -> list[Probe]:
        """An orphan into each child whose key columns all have a foreign key."""
        probes: list[Probe] = []
        for part in self.children:
            if not part.constrained:
                continue
            columns = [c for c in part.columns if c not in part.keys]
            statement = sql.SQL("INSERT INTO {} AS t ({}) SELECT {} FROM {} p WHERE p.n = 0"
                                ).format(part.table.ident,
                                         sql.SQL(", ").join(map(sql.Identifier,
                                                                [*part.keys, *columns])),
                                         sql.SQL(", ").join([*(sql.SQL("%s") for _ in part.keys),
                                                             *map(part.cast, columns)]),
                                         part.pool)
            probes.append((str(part.table), statement, len(part.keys)))
        return probes

    def _prepare_database(self) -> int:
        """The ledger, the picks, and each table's pool of generated rows; how many picks."""
        parent = self.parent
        conn = connect(self.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(_SETUP)
                cur.execute(sql.SQL("INSERT INTO live_load.picks (n, key) SELECT row_number() "
                                    "OVER (), {k}::text FROM {t} WHERE {k} IS NOT NULL").format(
                    k=sql.Identifier(parent.keys[0]), t=parent.table.ident))
                picks = cur.rowcount
                if picks < 1:
                    raise LoadUnavailable(f"the load needs keys to refer to: {parent.table} "
                                          "is empty")
                loader = Loader(cur, seed=0, plan=self.plan, rows=0, deferred=set())
                for part in self.parts:
                    self._pool(cur, loader, part)
        finally:
            conn.close()
        return picks

    def _pool(self, cur: Cursor, loader: Loader, part: Part) -> None:
        """``pool_sizes`` + 1 generated rows of ``part`` (row 0 for the prober), as text,
        and the counter of those taken."""
        size = self.pool_sizes[part.number]
        cur.execute(sql.SQL("CREATE SEQUENCE {}").format(part.drawn))
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(part.table.ident))
        (existing,) = cur.fetchone() or (0,)
        rows = loader.candidates(part.spec, start=10 * int(existing) + 1000,
                                 staged=STAGED * (size + 1), limit=size + 1)
        if not rows:
            raise LoadUnavailable(f"{part.table}: no generated row meets its constraints")
        columns = part.generated
        cur.execute(sql.SQL("CREATE TABLE {} (n int PRIMARY KEY{})").format(
            part.pool, sql.SQL("").join(sql.SQL(", {} text").format(part.pool_column(i))
                                        for i in range(len(columns)))))
        if columns:
            cur.execute(sql.SQL("INSERT INTO {} SELECT * FROM unnest(%s::int[], {})").format(
                part.pool, sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in columns)),
                [list(range(len(rows))), *([row.get(c) for row in rows] for c in columns)])
        else:
            cur.execute(sql.SQL("INSERT INTO {} SELECT generate_series(0, %s)").format(
                part.pool), (len(rows) - 1,))

    def _check_ledger(self) -> tuple[list[MissingWrite], Counter[str]]:
        """Each table against the latest ledger entry of each of its rows; the entries per
        table and kind (``schema.table write``, ``... gone``)."""
        missing: list[MissingWrite] = []
        conn = connect(self.dsn, readonly=True)
        try:
            with conn, conn.cursor() as cur:
                for part in self.parts:
                    cur.execute(_CHECK.format(table=part.table.ident, ident=part.identity,
                                              expect=part.expect), (str(part.table),))
                    missing += [MissingWrite(f"{op} {part.table}", ident, None, expect)
                                for op, ident, expect in cur.fetchall()]
                cur.execute("SELECT tbl || ' ' || op, count(*) FROM live_load.ledger "
                            "GROUP BY 1")
                counts = Counter({kind: int(n) for kind, n in cur.fetchall()})
        finally:
            conn.close()
        return missing, counts

    def _exhausted(self) -> list[str]:
        conn = connect(self.dsn, readonly=True)
        try:
            with conn, conn.cursor() as cur:
                found = []
                for part in self.parts:
                    cur.execute(sql.SQL("SELECT CASE WHEN is_called THEN last_value ELSE 0 "
                                        "END FROM {}").format(part.drawn))
                    (drawn,) = cur.fetchone() or (0,)
                    cur.execute(sql.SQL("SELECT max(n) FROM {}").format(part.pool))
                    (size,) = cur.fetchone() or (0,)
                    if int(drawn) > int(size or 0):
                        found.append(str(part.table))
        finally:
            conn.close()
        return found

    def _unwritten(self, ledger_rows: Counter[str]) -> list[str]:
        return [str(part.table) for part in self.parts
                if not ledger_rows.get(f"{part.table} write")]


# The latest entry of each row of one table, and those the table contradicts.
_CHECK = sql.SQL("""
WITH latest AS (
    SELECT DISTINCT ON (ident) op, ident, expect FROM live_load.ledger
    WHERE tbl = %s ORDER BY ident, seq DESC),
rows AS (SELECT {ident} AS ident, {expect} AS expect FROM {table} t)
SELECT op, ident::text, expect::text FROM latest l
WHERE (op = 'write' AND NOT EXISTS (SELECT FROM rows r WHERE r.expect = l.expect))
   OR (op = 'gone' AND EXISTS (SELECT FROM rows r WHERE r.ident = l.ident))
ORDER BY op, ident::text
""")


def parts(conn: Connection, plan: Plan) -> list[Part]:
    """The tables of ``plan`` as the load writes them, the key's table first."""
    specs = {spec.table: spec for spec in read_schema(conn, plan)}
    found = []
    with conn.cursor() as cur:
        for number, table in enumerate(plan.tables):
            spec = specs[table]
            keys = tuple(k.column for k in plan.columns if k.table == table)
            actions = []
            if table != plan.parent.table:
                for key in keys:
                    cur.execute(_ACTIONS, (regclass(table), regclass(plan.parent.table), key))
                    actions.append(cur.fetchone())
            cur.execute(_TIED, {"rel": regclass(table)})
            tied = {name for (name,) in cur.fetchall()}
            ident = tuple(c for c in walk_key(conn, table) if c != PAGES)
            columns = tuple(c.name for c in spec.columns if not c.from_sequence)
            foreign = {c for fk in spec.foreign_keys for c in fk.columns}
            payload = next((c for c in columns if c not in keys and c not in ident
                            and c not in foreign and c not in tied), None)
            found.append(Part(
                number, spec, keys, columns, ident, payload,
                update_cascades=bool(actions) and all(a is not None and a[0] == "c"
                                                      for a in actions),
                delete_cascades=bool(actions) and all(a is not None and a[1] == "c"
                                                      for a in actions),
                constrained=bool(actions) and all(a is not None for a in actions)))
    return found
