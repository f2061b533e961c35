"""Expand: what the swap needs, built beside each key column while the application writes.

The fill and its proofs (``convert``) give each key column a proven uuid
copy.  Then, for each column:

- every index that involves it is built again on the copy with
  ``CREATE INDEX CONCURRENTLY`` (a primary key or unique constraint as a unique
  index, which the swap turns back into the constraint);
- every foreign key that refers to the parent key is added again between the
  copies, ``NOT VALID`` then validated, each under a short lock taken parent
  first.

From then on the old and the new references are both enforced, and the swap
only drops and renames.  ``discard`` is the inverse: it drops all of it, the
copy included, and the original columns, never touched, are as they were.

The copies' names derive from the originals' (``model.shadow_name``), so a
resumed run finds what an interrupted one built; an index that an interrupted
``CREATE INDEX CONCURRENTLY`` left invalid is dropped and built again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog, sqlexpr
from migration.catalog import ForeignKeyDef, IndexDef
from migration.connection import Connection, lock_tables
from migration.engine import parallel
from migration.engine.fill import validate_constraint
from migration.errors import MigrationError
from migration.log import logger
from migration.model import UUID_INPUT, KeyColumn, Table, shadow_name, spelled_as_copy
from migration.plan import Plan
from migration.session import Session

ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL",
           "d": "SET DEFAULT"}
MATCH = {"f": " MATCH FULL", "s": "", "p": " MATCH PARTIAL"}


@dataclass(frozen=True)
class ShadowIndex:
    """An index on a key column, and the name of its copy on the uuid column.

    A partitioned table's index has ``parts``: the copies of the indexes of
    its partitions (partitioned in turn, or plain tables, which have none).
    """

    original: IndexDef
    name: str
    partitioned: bool = False
    parts: tuple[ShadowIndex, ...] = ()

    @property
    def leaves_only(self) -> bool:
        """Whether only the leaf partitions' copies are built, unattached: so it is for a
        partitioned table's primary key or unique constraint.  PostgreSQL cannot put a
        constraint on a partitioned table's prebuilt index (no ``ADD CONSTRAINT ...
        USING INDEX`` there), so the swap makes each leaf's copy its leaf's constraint
        and then adds the table's, which takes them over instead of building."""
        return self.partitioned and self.original.constraint_type is not None

    def leaves(self) -> list[ShadowIndex]:
        """The copies on plain tables: this one, or its partitions' at every level."""
        if not self.partitioned:
            return [self]
        return [leaf for part in self.parts for leaf in part.leaves()]

    def statement(self, key: KeyColumn) -> str:
        """The copy's ``CREATE INDEX CONCURRENTLY`` (a partitioned table's: ``CREATE INDEX
        ... ON ONLY``), from the server's own definition of the original with the column
        renamed (predicates, INCLUDE lists and a unique index's partition key follow), in
        the original's tablespace."""
        copy = sqlexpr.partitioned_copy if self.partitioned else sqlexpr.concurrent_copy
        return sqlexpr.with_tablespace(
            copy(self.original.definition, self.name, key.column, key.temp),
            self.original.tablespace)


@dataclass(frozen=True)
class ShadowForeignKey:
    """A foreign key to the parent key, and the name of its copy between the copies."""

    original: ForeignKeyDef
    name: str
    child: KeyColumn  # the referencing column, going the same way as the parent
    parts: tuple[ShadowForeignKey, ...] = ()  # a partitioned child's: its partitions' clones


def shadow_indexes(conn: Connection, key: KeyColumn) -> list[ShadowIndex]:
    return [_shadow_index(conn, index) for index in catalog.indexes_on(conn, key)]


def _shadow_index(conn: Connection, index: IndexDef) -> ShadowIndex:
    partitioned = catalog.is_partitioned(conn, index.table)
    parts = (tuple(_shadow_index(conn, part) for part in catalog.index_partitions(conn, index))
             if partitioned else ())
    return ShadowIndex(index, shadow_name("ix", index.table, index.name), partitioned, parts)


def shadow_foreign_keys(conn: Connection, plan: Plan) -> list[ShadowForeignKey]:
    return [_shadow_foreign_key(conn, fk, plan)
            for fk in catalog.foreign_keys_to(conn, plan.parent)]


def _shadow_foreign_key(conn: Connection, fk: ForeignKeyDef, plan: Plan,
                        table_key: KeyColumn | None = None) -> ShadowForeignKey:
    """``table_key``: for a partition's clone, its table's column, whose copy (and names)
    the partition's column is."""
    child = KeyColumn(fk.table, fk.column, back=plan.parent.back)
    if table_key is None:  # the plan's own key, with the names it chose
        child = next((key for key in plan.columns if key == child), child)
    else:
        child = dataclasses.replace(child, choice=table_key.choice)
    parts = tuple(_shadow_foreign_key(conn, part, plan, child)
                  for part in catalog.foreign_key_partitions(conn, fk))
    return ShadowForeignKey(fk, shadow_name("fk", fk.table, fk.name), child, parts)


def unsupported_foreign_keys(conn: Connection, plan: Plan) -> list[str]:
    """FKs to the parent key that the copy between uuid columns cannot reproduce."""
    found = []
    for shadow in shadow_foreign_keys(conn, plan):
        rules = catalog.foreign_key_rules(conn, shadow.original)
        if rules is not None and rules.columns != 1:
            found.append(f"{shadow.original.table}.{shadow.original.name} "
                         f"(spans {rules.columns} columns)")
        elif shadow.child not in plan.columns:
            found.append(f"{shadow.original.table}.{shadow.original.name} "
                         f"(from {shadow.child}, which is not in the plan)")
    return found


def build_indexes(session: Session, key: KeyColumn) -> int:
    """Build the copy of every index on ``key`` that is not built yet; how many were built.
    First, going to uuid, the index the swap finds the rows that are not UUIDs by
    (``build_invalid_index``)."""
    build_invalid_index(session, key)
    return sum(build_index(session, key, shadow) for shadow in shadow_indexes(session.conn, key))


def build_all_indexes(session: Session, keys: Sequence[KeyColumn]) -> int:
    """``build_indexes`` of every key; how many indexes were built.

    With more than one job, the builds of different tables run side by side
    (``parallel.side_by_side``), the largest tables' first, each table's in its own
    order: the invalid index, then the copies.  With one, key after key as listed.
    """
    if session.settings.jobs < 2:
        return sum(build_indexes(session, key) for key in keys)
    units = [unit for key in keys for unit in [
        parallel.Unit(key.table, partial(_build_invalid_index, key=key)),
        *(parallel.Unit(shadow.original.table, partial(build_index, key=key, shadow=shadow))
          for shadow in shadow_indexes(session.conn, key))]]
    pages = {table: catalog.heap_pages(session.conn, table)
             for table in {unit.table for unit in units}}
    units.sort(key=lambda unit: -pages[unit.table])  # stable: each table's order is kept
    session.conn.rollback()
    return sum(parallel.side_by_side(session, units))


def _build_invalid_index(session: Session, key: KeyColumn) -> int:
    build_invalid_index(session, key)
    return 0


def invalid_indexes(conn: Connection, key: KeyColumn) -> list[KeyColumn]:
    """Where ``key``'s invalid index is (``KeyColumn.invalid_index``): the key itself, or
    for a partitioned table its leaf partitions' column, one index each (PostgreSQL builds
    no partitioned index ``CONCURRENTLY``; the planner reads each leaf's)."""
    with conn.cursor() as cur:
        cur.execute("SELECT n.nspname, c.relname FROM pg_partition_tree(to_regclass(%s)) t "
                    "JOIN pg_class c ON c.oid = t.relid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE t.isleaf AND c.relkind = 'r' ORDER BY 1, 2",
                    (catalog.regclass(key.table),))
        leaves = [Table(schema, name) for schema, name in cur.fetchall()]
    return [dataclasses.replace(key, table=leaf) for leaf in leaves] or [key]


def build_invalid_index(session: Session, key: KeyColumn) -> None:
    """The partial index over the rows whose string is not a UUID, built ``CONCURRENTLY``
    on a column going to uuid (none on the way back: a uuid has no invalid value).

    Such a row's copy holds a stand-in (``model.uuid_copy``), which the swap must never
    make data; it finds them under its locks through this index, almost always empty,
    without a scan.  It is on the old column (its predicate reads the copy too, see
    ``not_a_uuid``), so it goes with it at the swap, and
    ``discard`` drops it before.
    """
    if key.back:
        return
    for leaf in invalid_indexes(session.conn, key):
        valid = catalog.index_validity(session.conn, leaf.table, leaf.invalid_index)
        if valid and not catalog.index_reads_column(session.conn, leaf.table,
                                                    leaf.invalid_index, leaf.temp):
            valid = False  # an earlier version's predicate, which the swap no longer repeats
        session.conn.rollback()
        if valid:
            continue
        name = sql.Identifier(leaf.table.schema, leaf.invalid_index)
        with session.unbounded(f"index {leaf.invalid_index}") as cur:
            if valid is False:  # left invalid by an interrupted build, or an earlier version's
                cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))
            cur.execute(sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} ({}) WHERE {}").format(
                sql.Identifier(leaf.invalid_index), leaf.table.ident,
                sql.Identifier(leaf.column), not_a_uuid(leaf)))


def not_a_uuid(key: KeyColumn) -> sql.Composable:
    """The invalid index's predicate, which the swap's query repeats to be served by it:
    the string is no UUID.  A string spelled as its filled copy prints is one, which is
    asked first, as it costs far less than the regular expression (``spelled_as_copy``);
    the build evaluates it for every row, two or three times."""
    column = sql.Identifier(key.column)
    return sql.SQL("CASE WHEN {spelled} THEN false ELSE {column} !~ {syntax} END").format(
        spelled=spelled_as_copy(sql.Identifier(key.temp), column), column=column,
        syntax=sql.Literal(UUID_INPUT))


def build_index(session: Session, key: KeyColumn, shadow: ShadowIndex) -> int:
    """Build one index copy, unless it is built and valid; how many indexes were built.

    A partitioned table's index is built by building its partitions' and attaching them:
    PostgreSQL cannot build a partitioned table's index ``CONCURRENTLY``, so
    the copy is created empty ``ON ONLY`` the table (catalog work, under the
    short lock_timeout), each partition's copy is built the same way and
    attached (``ALTER INDEX ... ATTACH PARTITION``), and the server makes the
    copy valid when the last one is.  A plain table is the case with no
    partitions: the copy is built ``CONCURRENTLY``.  A resumed run finds
    what an interrupted one built or attached.  A partitioned table's constraint
    is built as its leaves' copies only (``ShadowIndex.leaves_only``).
    """
    if shadow.leaves_only:
        return sum(build_index(session, key, leaf) for leaf in shadow.leaves())
    table = shadow.original.table
    valid = catalog.index_validity(session.conn, table, shadow.name)
    session.conn.rollback()
    if valid:
        return 0
    if not shadow.partitioned:
        _build_concurrently(session, key, shadow, left_invalid=valid is False)
        return 1
    if valid is None:
        session.ddl(f"index {shadow.original.name}",
                    lambda cur: cur.execute(sql.SQL(shadow.statement(key))))
    built = 1
    for part in shadow.parts:
        built += build_index(session, key, part)
        session.ddl(f"attach {part.name}", partial(
            _attach, index=sql.Identifier(table.schema, shadow.name),
            part=sql.Identifier(part.original.table.schema, part.name)))
    logger.info("%s: index %s built as %s, %s partition(s) attached", key,
                shadow.original.name, shadow.name, len(shadow.parts))
    return built


@dataclass(frozen=True)
class ShadowCheck:
    """A CHECK constraint on a key column, and the name of its copy on the copy column."""

    original: catalog.CheckDef
    name: str


def shadow_checks(conn: Connection, key: KeyColumn) -> list[ShadowCheck]:
    return [ShadowCheck(check, shadow_name("ck", key.table, check.name))
            for check in catalog.check_constraints_on(conn, key)]


def copy_checks(session: Session, key: KeyColumn) -> int:
    """Add, ``NOT VALID`` then validated, the copy of every CHECK on ``key`` on its copy
    column; how many were added.

    A CHECK that names the old column goes with it at the swap, which only
    renames its copy: the validation scan is done here, under a lock that lets
    writes on, and no row is ever unchecked.  The copy depends on the copy
    column, so ``discard`` drops it with the column.
    """
    added = 0
    for shadow in shadow_checks(session.conn, key):
        state = catalog.constraint_validity(session.conn, key.table, shadow.name)
        session.conn.rollback()
        if state is None:
            condition = sqlexpr.rename_column(shadow.original.expression, key.column, key.temp)
            session.ddl(f"check {shadow.original.name}", partial(
                _execute, statement=sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}){} "
                                            "NOT VALID").format(
                    key.table.ident, sql.Identifier(shadow.name), sql.SQL(condition),
                    sql.SQL(" NO INHERIT" if shadow.original.no_inherit else ""))))
            added += 1
        if shadow.original.validated and not state:
            session.ddl(f"validate {shadow.original.name}",
                        partial(validate_constraint, table=key.table, name=shadow.name))
    return added


def _execute(cur: Cursor, statement: sql.Composable) -> None:
    cur.execute(statement)


def _build_concurrently(session: Session, key: KeyColumn, shadow: ShadowIndex, *,
                        left_invalid: bool) -> None:
    table = shadow.original.table
    with session.unbounded(f"index {shadow.original.name}") as cur:
        if left_invalid:
            logger.warning("%s: index %s was left invalid by an interrupted build; "
                           "building it again", key, shadow.name)
            cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(table.schema, shadow.name)))
        cur.execute(sql.SQL(shadow.statement(key)))
    logger.info("%s: index %s built as %s", key, shadow.original.name, shadow.name)


def _attach(cur: Cursor, index: sql.Identifier, part: sql.Identifier) -> None:
    """Attach a partition's index to its table's (nothing when it is attached already)."""
    cur.execute(sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(index, part))


def add_statement(conn: Connection, shadow: ShadowForeignKey,
                  parent: KeyColumn) -> sql.Composable:
    """The copy of an FK between the uuid columns, with the original's rules, NOT VALID
    (a partitioned table's: validated, see ``reference_one``)."""
    rules = catalog.foreign_key_rules(conn, shadow.original)
    if rules is None:
        raise MigrationError(f"foreign key {shadow.original.name} of {shadow.original.table} "
                             "disappeared during the migration", hint="run the step again")
    timing = ""
    if rules.deferrable:
        timing = " DEFERRABLE INITIALLY DEFERRED" if rules.deferred else " DEFERRABLE"
    return sql.SQL("ALTER TABLE {child} ADD CONSTRAINT {name} FOREIGN KEY ({column}) "
                   "REFERENCES {parent} ({parent_column}){rules}{not_valid}").format(
        child=shadow.child.table.ident, name=sql.Identifier(shadow.name),
        column=sql.Identifier(shadow.child.temp), parent=parent.table.ident,
        parent_column=sql.Identifier(parent.temp),
        rules=sql.SQL(MATCH[rules.match] + f" ON UPDATE {ACTIONS[rules.on_update]} "
                      f"ON DELETE {ACTIONS[rules.on_delete]}" + timing),
        not_valid=sql.SQL("" if shadow.parts and shadow.original.validated else " NOT VALID"))


def reference(session: Session, plan: Plan) -> int:
    """Add and validate the copy of every FK to the parent key; how many were added.

    Adding takes SHARE ROW EXCLUSIVE on both tables for an instant: they are
    locked parent first, the order in which an application writes a user and
    then its rows, under the session's short lock_timeout.  Validating scans
    the child under a lock that lets writes go on.  With more than one job, the children
    are taken side by side (``parallel.side_by_side``): a validation holds SHARE UPDATE
    EXCLUSIVE on its child and ROW SHARE on the parent, so it blocks neither another
    child's validation nor another copy's adding.  Then the copies are added first, one
    after the other on this connection (two adding at once would contend for the parent),
    except a partitioned child's, which is added after its partitions' are validated.
    """
    shadows = shadow_foreign_keys(session.conn, plan)
    session.conn.rollback()
    added = 0
    if session.settings.jobs > 1:
        added = sum(_add_copy(session, shadow, plan.parent)
                    for shadow in shadows if not shadow.parts)
    return added + sum(parallel.side_by_side(session, [
        parallel.Unit(shadow.child.table,
                      partial(reference_one, shadow=shadow, parent=plan.parent))
        for shadow in shadows]))


def reference_one(session: Session, shadow: ShadowForeignKey, parent: KeyColumn) -> int:
    """Add and validate one FK copy; how many constraints were added.

    A partitioned table's FK is added by adding its partitions' first:
    PostgreSQL 15 to 17 refuse ``NOT VALID`` on a partitioned table's FK,
    and adding it valid would scan every partition under SHARE ROW EXCLUSIVE.
    So each partition's copy is added ``NOT VALID`` and validated (no write
    blocked), and then the table's, valid: the server takes over the
    partitions' equal FKs (attaches them) instead of scanning, so it is
    catalog work under an instant lock.  A plain table is the case with no
    partitions.
    """
    added = sum(reference_one(session, part, parent) for part in shadow.parts)
    added += _add_copy(session, shadow, parent)
    child = shadow.child.table
    state = catalog.constraint_validity(session.conn, child, shadow.name)
    session.conn.rollback()
    if shadow.original.validated and not state:
        session.ddl(f"validate {shadow.original.name}",
                    partial(validate_constraint, table=child, name=shadow.name))
    return added


def _add_copy(session: Session, shadow: ShadowForeignKey, parent: KeyColumn) -> int:
    """Add the FK copy (``add_statement``) unless it is there; how many were added."""
    child = shadow.child.table
    if catalog.constraint_validity(session.conn, child, shadow.name) is not None:
        session.conn.rollback()
        return 0
    statement = add_statement(session.conn, shadow, parent)
    session.conn.rollback()
    session.ddl(f"fk {shadow.original.name}",
                partial(_add_locked, tables=(parent.table.ident, child.ident),
                        statement=statement))
    return 1


def _add_locked(cur: Cursor, tables: tuple[sql.Identifier, ...],
                statement: sql.Composable) -> None:
    """``statement`` once ``tables`` are locked, parent first, the child ``NOWAIT``
    (``lock_tables``): the parent's SHARE ROW EXCLUSIVE blocks every write to it, and is
    never held while the child's request waits."""
    lock_tables(cur, tables, "SHARE ROW EXCLUSIVE")
    cur.execute(statement)


class Stage(StrEnum):
    """How far the expansion of a column has come, once its copy exists (before that, and
    after the swap, the column's ``catalog.ColumnState`` says where it is).  The values are
    what ``status`` shows."""

    FILLING = "filling"  # the copy is being filled, or its proof not validated yet
    PROVEN = "proven"  # filled and proven; its indexes not all built
    INDEXED = "indexed"  # its indexes built beside it (no foreign key to copy, or not yet)
    REFERENCED = "referenced"  # the foreign keys between the copies validated too

    @property
    def ready(self) -> bool:
        """Whether the swap may take the column: a column that no foreign key copy
        involves is ready once indexed (``swap.require_ready`` asks the whole plan)."""
        return self in (Stage.INDEXED, Stage.REFERENCED)


def stage(conn: Connection, key: KeyColumn, plan: Plan) -> Stage | catalog.ColumnState:
    """Where the column stands: its expansion's stage while its copy exists (on the way
    back too: a uuid column's string copy), else its state (string, uuid)."""
    if catalog.column_info(conn, key.table, key.temp) is None:
        return catalog.column_state(conn, key)
    if not catalog.constraint_validity(conn, key.table, key.helper("filled")):
        return Stage.FILLING
    if not all(catalog.index_validity(conn, built.original.table, built.name)
               for shadow in shadow_indexes(conn, key)
               for built in (shadow.leaves() if shadow.leaves_only else [shadow])) or not (
            key.back or all(catalog.index_validity(conn, leaf.table, leaf.invalid_index)
                            for leaf in invalid_indexes(conn, key))):
        return Stage.PROVEN
    references = [shadow for shadow in shadow_foreign_keys(conn, plan)
                  if key in (shadow.child, plan.parent)]
    if references and all(catalog.constraint_validity(conn, shadow.child.table, shadow.name)
                          for shadow in references):
        return Stage.REFERENCED
    return Stage.INDEXED


def discard(session: Session, key: KeyColumn) -> int:
    """Drop everything expand built for ``key`` (the inverse of the fill and of this module);
    how many objects were dropped.

    Each drop is catalog work under a short lock; the copy's indexes and CHECK
    copies go with the copy.  The original column and its objects are not touched, nor
    is a column of the copy's name that the engine did not create (it bears no mark):
    it is the application's, and so are a trigger or checks of the engine's names
    beside it (the engine creates those with its column only).
    """
    def work(cur: Cursor) -> int:
        if not catalog.is_engines(cur.connection, key):
            if catalog.column_info(cur.connection, key.table, key.temp) is not None:
                logger.warning("%s: column %s is not the migration's (it bears no mark); "
                               "left as it is", key, key.temp)
            return 0
        cur.execute(
            """
            SELECT n.nspname, c.relname, k.conname
            FROM pg_constraint k
            JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON (a.attrelid, a.attnum) IN ((k.conrelid, k.conkey[1]),
                                                              (k.confrelid, k.confkey[1]))
            WHERE k.contype = 'f' AND a.attrelid = to_regclass(%s) AND a.attname = %s
            ORDER BY 1, 2, 3
            """, (catalog.regclass(key.table), key.temp))
        dropped = 0
        for schema, table, name in cur.fetchall():
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(schema, table), sql.Identifier(name)))
            dropped += 1
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
                    "AND tgname = %s", (catalog.regclass(key.table), key.helper("sync")))
        dropped += int((cur.fetchone() or [0])[0])
        cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
            sql.Identifier(key.helper("sync")), key.table.ident))
        for check in ("filled", "not_null"):
            if catalog.constraint_validity(cur.connection, key.table,
                                           key.helper(check)) is not None:
                cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    key.table.ident, sql.Identifier(key.helper(check))))
                dropped += 1
        for leaf in ([] if key.back else invalid_indexes(cur.connection, key)):
            if catalog.index_validity(cur.connection, leaf.table, leaf.invalid_index) is not None:
                cur.execute(sql.SQL("DROP INDEX {}").format(
                    sql.Identifier(leaf.table.schema, leaf.invalid_index)))
                dropped += 1
        if catalog.column_info(cur.connection, key.table, key.temp) is not None:
            cur.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                key.table.ident, sql.Identifier(key.temp)))
            dropped += 1
        return dropped

    return session.ddl(f"discard {key}", work)
