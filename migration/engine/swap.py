"""The swap: one short transaction in which the parent key and every column that refers
to it take their uuid copies' places.

Everything that scans or builds was done by ``expand`` while the application
wrote; what is left is catalog work, so the exclusive locks are held for
milliseconds whatever the tables' sizes:

1. lock the views over the columns (``views``), outermost first, then the
   tables, parent first, then the children in name order, every lock asked
   ``NOWAIT`` (``lock_tables``; ``Session.ddl`` retries within milliseconds,
   and lets the first lock wait only after many tries), so the swap never
   waits in a lock queue, where the application would queue behind it: first
   in SHARE UPDATE EXCLUSIVE, which stops any DDL on them but lets the
   application read and write, while the catalog is read (what each column
   carries over) and every statement built, then in ACCESS EXCLUSIVE, for
   three round trips: the locks in one statement, one check (keys written
   since that are not UUIDs; views created over the columns since the read,
   which are read again), and the statements, sent in one;
2. drop the old foreign keys to the parent key (their copies are in force),
   the policies, the views and the statistics objects over the columns, and
   the tables taken out of the publications whose column lists or row filters
   use them;
3. for each column: drop its sync trigger, the table's triggers that name it
   (``UPDATE OF``, ``WHEN``; created again after the rename) and the old column
   (its indexes, constraints and the fill proof go with it), rename the copy, ``SET NOT
   NULL`` (proved by the validated ``not_null`` CHECK, no scan), the default,
   column grants, comments, statistics target and options (``n_distinct``);
   each index copy takes its original's name, and a primary key or unique
   constraint comes back ``USING INDEX`` (a partitioned table's on each leaf
   partition, then added on the table, which takes the leaves' over); replica
   identity and the ``CLUSTER`` mark follow their index;
4. the views and statistics objects are created again, and the tables put
   back in their publications, from the server's own text read in this
   transaction, and those given a column list while the copies existed
   (``publications.narrow``) get their original definition back; the FK copies
   take their originals' names; the policies are created again.

After the commit, the contract (``contract.contract``) analyzes the tables with
statistics objects (the objects created again are empty) and refreshes the
materialized views carried (created again empty, and recorded as such in the
swap's transaction), each holding only its own lock.

No foreign key is ever missing: until the commit the old ones are enforced,
after it the copies, which were validated before.  The transaction runs
under the session's ``lock_timeout`` and is retried on a lock timeout, a
lock not free at once or a deadlock, so the application waits for the hold
alone (and up to that long per attempt only once the swap has fallen back to
waiting in the queue), and not at all while the swap waits between attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, publications, sqlexpr, views
from migration.catalog import ColumnState, IndexDef
from migration.connection import Connection, lock_tables
from migration.engine.expand import (
    ShadowCheck,
    ShadowForeignKey,
    ShadowIndex,
    Stage,
    not_a_uuid,
    shadow_checks,
    shadow_foreign_keys,
    shadow_indexes,
    stage,
)
from migration.engine.fill import (
    converted_default_statement,
    grant_statement,
    restored_default_statement,
    unwraps_to_uuid,
)
from migration.errors import MigrationError
from migration.log import logger
from migration.model import KeyColumn, Table
from migration.plan import Plan
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.session import Session

Step = sql.Composable | Callable[[Cursor], None]
"""One step of the swap: a statement, or, where the server must answer as the swap goes, a
function of its cursor, which ends a round trip (``run``): which names the server gave a
partitioned index's middle levels (``_name_middle_levels``), the materialized views to
refresh recorded (``views.mark_pending``)."""


@dataclass(frozen=True)
class ColumnSwap:
    """What one column's swap carries over, read inside the swap's transaction."""

    key: KeyColumn
    info: catalog.ColumnInfo
    tuning: catalog.ColumnTuning
    grants: list[catalog.ColumnGrant]
    comments: dict[tuple[str, str], str]
    indexes: list[ShadowIndex]
    replica_identity: str | None
    clustered: str | None  # the table's index CLUSTER last used
    triggers: list[catalog.ColumnTrigger]  # the table's own that name the column
    checks: list[ShadowCheck]
    parts: dict[tuple[Table, str], tuple[str | None, bool]]
    """A partitioned table's indexes' partitions, by (partition, index name): each one's
    own comment, and whether it is its partition's replica identity."""
    constraints: dict[str, str]
    """A partitioned table's primary key or unique constraints over the column, by name,
    as the server prints them: added again at the swap, they take over their leaves'."""
    saved_default: str | None = None
    """On the way back, the string column's default as the backup recorded it."""
    unwrapped_default: bool = False
    """On the way to uuid, whether the string default is a uuid expression cast to the
    string type (``fill.unwraps_to_uuid``), which the column's default then is."""

    def statements(self) -> list[Step]:
        """The column's part of the swap, in order: its sync trigger and the triggers that
        name it dropped, the old column dropped and the copy renamed, then what the old
        column had given to the new one.  Built from what was read under the swap's locks;
        nothing here asks the server, but the two steps that must (``Step``)."""
        key, table, name = self.key, self.key.table.ident, sql.Identifier(self.key.column)
        steps: list[Step] = [
            sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(key.helper("sync")), table),
            *(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger.name), table)
              for trigger in self.triggers),  # they would stop the drop; created again below
            sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(table, name),
            sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                table, sql.Identifier(key.temp), name)]
        if self.info.not_null:  # after the rename: PostgreSQL 18 names the constraint after it
            steps += [sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(table, name),
                      sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                          table, sql.Identifier(key.helper("not_null")))]
        if key.back:
            restored = restored_default_statement(key, self.saved_default, self.info.default)
            steps += [] if restored is None else [restored]
        elif self.info.default is not None:
            steps.append(converted_default_statement(key, self.info.default,
                                                     unwrapped=self.unwrapped_default))
        steps += [grant_statement(key, grant) for grant in self.grants]
        if self.tuning.statistics_target is not None:
            steps.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
                table, name, sql.Literal(self.tuning.statistics_target)))
        if self.tuning.options:
            steps.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET ({})").format(
                table, name, sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(option), sql.Literal(value))
                    for option, value in (text.split("=", 1) for text in self.tuning.options))))
        # exactly the original's comment, none if it had none: the copy's mark must not stay
        steps.append(sql.SQL("COMMENT ON COLUMN {} IS {}").format(
            sql.Identifier(key.table.schema, key.table.name, key.column),
            sql.Literal(self.comments.get(("column", key.column)))))
        for index in self.indexes:
            steps += (self._from_leaves(index) if index.leaves_only
                      else self._take_name(index))
            steps += sqlexpr.comment_on(sql.SQL("CONSTRAINT {} ON {}").format(
                sql.Identifier(index.original.name), table),
                self.comments.get(("constraint", index.original.name)))
            steps += sqlexpr.comment_on(sql.SQL("INDEX {}").format(
                sql.Identifier(key.table.schema, index.original.name)),
                self.comments.get(("index", index.original.name)))
        for check in self.checks:
            steps.append(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                table, sql.Identifier(check.name), sql.Identifier(check.original.name)))
            steps += sqlexpr.comment_on(sql.SQL("CONSTRAINT {} ON {}").format(
                sql.Identifier(check.original.name), table),
                self.comments.get(("constraint", check.original.name)))
        for trigger in self.triggers:
            steps += trigger_statements(key.table, trigger)
        carried = {index.original.name for index in self.indexes}
        if self.replica_identity in carried:
            steps.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
                table, sql.Identifier(self.replica_identity or "")))
        if self.clustered in carried:
            steps.append(sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(
                table, sql.Identifier(self.clustered or "")))
        return steps

    def _take_name(self, index: ShadowIndex) -> list[Step]:
        """The index copy becomes the original: the constraint it backed, or its name."""
        if index.original.constraint_type:
            return [add_using_index(index)]
        return self._rename_index(index)

    def _rename_index(self, index: ShadowIndex) -> list[Step]:
        """The index copy takes its original's name; a partitioned table's, and each of its
        partitions' (the old ones went with the old column), with a partition's own
        comment and replica identity."""
        original = index.original
        return [sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.Identifier(original.table.schema, index.name),
                    sql.Identifier(original.name)),
                *self._part_comment_and_identity(original),
                *(step for part in index.parts for step in self._rename_index(part))]

    def _from_leaves(self, index: ShadowIndex) -> list[Step]:
        """A partitioned table's primary key or unique constraint back, without a build.

        Each leaf partition's copy becomes its leaf's constraint (``USING INDEX``,
        under the leaf's original name); then the constraint added on the table,
        from the server's own text read in this transaction, finds on every leaf
        an equal constraint and attaches it instead of building one.  The levels
        in between are created by that statement under names of the server's
        choosing, which are then given back their originals' (a ``Step`` that asks).
        """
        original = index.original
        steps: list[Step] = []
        for leaf in index.leaves():
            steps += [add_using_index(leaf), *self._part_comment_and_identity(leaf.original)]
        steps.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            original.table.ident, sql.Identifier(original.name),
            sql.SQL(self.constraints[original.name])))
        steps.append(partial(_name_middle_levels, index=index))
        return steps

    def _part_comment_and_identity(self, original: IndexDef) -> list[Step]:
        """A partition's index's own comment and replica identity, as they were."""
        comment, identity = self.parts.get((original.table, original.name), (None, False))
        steps: list[Step] = list(sqlexpr.comment_on(sql.SQL("INDEX {}").format(
            sql.Identifier(original.table.schema, original.name)), comment))
        if identity:
            steps.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
                original.table.ident, sql.Identifier(original.name)))
        return steps


def require_ready(session: Session, plan: Plan) -> None:
    """Refuse unless every column of the plan is ready for the swap, naming those that are
    not with their stage."""
    stages = {key: stage(session.conn, key, plan) for key in plan.columns}
    session.conn.rollback()
    waiting = [f"{key} ({where})" for key, where in stages.items() if not is_ready(where)]
    if waiting:
        raise MigrationError("the swap needs every column expanded: " + ", ".join(waiting),
                             hint="run migrate_users, then migrate_foreign_keys")


def is_ready(where: Stage | ColumnState) -> bool:
    """Whether a column at ``where`` (``expand.stage``) is ready for the swap."""
    return isinstance(where, Stage) and where.ready


@dataclass(frozen=True)
class Committed:
    """A swap done: how long it held the tables, and what it left for the contract."""

    held_s: float
    """From the moment its last attempt was granted the parent's lock to the commit's
    return: the time the application's writes (and reads) of the plan's tables were
    blocked, the migration's write stall.  An upper bound: the commit returns after
    deleting the files of the indexes the old columns took with them, which PostgreSQL
    does once the locks are released (measured: an 84 MB index's commit took 23 ms, a
    waiter had the lock after 7)."""
    analyze: list[Table]
    """The tables whose statistics objects it created again, empty until analyzed."""


def swap(session: Session, plan: Plan) -> Committed:
    """The parent key and all its children to uuid (or back), in one short transaction,
    once every column is ready (``require_ready``) with its checks copied
    (``expand.copy_checks``): ``pipeline.swap_and_contract`` says so."""
    locked: list[float] = []  # when the tables' locks were granted, in the last attempt
    analyze = session.ddl("swap", lambda cur: _swap(cur, plan, locked))
    held = time.monotonic() - locked[-1]
    logger.info("%s and %s column(s) referring to it swapped %s; the write-blocking lock "
                "was held %.1f ms", plan.parent, len(plan.children),
                "back to their string types" if plan.parent.back else "to uuid", held * 1000)
    return Committed(held, analyze)


def _swap(cur: Cursor, plan: Plan, locked: list[float]) -> list[Table]:
    """The swap's transaction; the tables whose statistics objects it created again.

    Under ACCESS EXCLUSIVE every round trip is the application's wait too (on a busy
    two-core machine, 4 to 10 ms each): everything that needs an answer is read before,
    under SHARE UPDATE EXCLUSIVE, and the statements are built from it; under the
    write-blocking locks go one statement for the locks, one query (``locked_check``:
    the keys that are not UUIDs, and whether the views over the columns are still
    those read), the statements (``run``: one round trip, or more only where a step
    must ask the server, ``Step``) and the commit."""
    conn = cur.connection
    children = sorted({key.table for key in plan.children} - {plan.parent.table})
    # The views outermost first, as an application's query takes them (the view, then
    # what it reads), then the tables; one attempt waits for the first lock only. A
    # materialized view cannot be locked so: its drop takes its lock, and its readers
    # lock nothing else after it (it holds its own rows), so they close no cycle.
    relations = [*(view.view.ident for view in reversed(views.dependent_views(
        conn, plan.columns)) if not view.materialized),
        *(table.ident for table in (plan.parent.table, *children))]
    # The catalog is read under SHARE UPDATE EXCLUSIVE, which every DDL that could change
    # what is read here (indexes, constraints, triggers, comments, statistics, options,
    # publications) conflicts with, and the application's reads and writes do not; only
    # then is ACCESS EXCLUSIVE asked, for the statements alone.
    lock_tables(cur, relations, "SHARE UPDATE EXCLUSIVE")
    cur.execute(views.signature(plan.columns))  # first: a view created after is seen
    seen_views = (cur.fetchone() or [None])[0]
    carried_views = views.dependent_views(conn, plan.columns)
    check = locked_check(cur, plan)
    references = shadow_foreign_keys(conn, plan)
    fk_comments = {fk.original.name: catalog.comments(conn, fk.child.table, fk.child.column)
                   .get(("constraint", fk.original.name)) for fk in references}
    columns = [_column_swap(cur, plan, key) for key in plan.columns]
    statistics = sorted({found for key in plan.columns
                         for found in catalog.statistics_on(conn, key)},
                        key=lambda found: (found.schema, found.name))
    published = sorted({entry for key in plan.columns
                        for entry in catalog.publications_on(conn, key)},
                       key=lambda entry: (entry.publication, entry.table))
    republished, _ = publications.restore_statements(cur, plan.backup_schema, plan.tables)
    policies = _policies(cur, plan)
    cur.execute("SELECT current_user::text, current_setting('enable_seqscan')")
    user, scans = cur.fetchone() or ("", "on")

    lock_tables(cur, relations, "ACCESS EXCLUSIVE")
    locked.append(time.monotonic())
    cur.execute(check.query)
    invalid, views_now = cur.fetchone() or ([], None)
    if any(invalid):
        refuse_invalid_keys(check, invalid)
    if views_now != seen_views:  # a view was created over a column after they were read
        carried_views = views.dependent_views(conn, plan.columns)
    policies = _lock_policy_tables(cur, plan, policies)
    steps: list[Step] = [
        sql.SQL("SELECT set_config('enable_seqscan', {}, true)").format(sql.Literal(scans)),
        *(sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(policy.name),
                                                 policy.table.ident) for policy in policies),
        *views.drop_statements(carried_views),
        *(sql.SQL("DROP STATISTICS {}").format(sql.Identifier(found.schema, found.name))
          for found in statistics),
        *(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
            sql.Identifier(entry.publication), entry.table.ident) for entry in published),
        *(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            fk.child.table.ident, sql.Identifier(fk.original.name)) for fk in references),
        *(step for column in columns for step in column.statements()),
        *views.create_statements(carried_views, user),
        *([partial(views.mark_pending, views=carried_views, backup_schema=plan.backup_schema)]
          if views.to_refresh(carried_views) else []),
        *(statement for found in statistics for statement in _statistics(found, user)),
        *(publications.add_table(entry.publication, entry.table, entry.columns,
                                 entry.row_filter) for entry in published),
        *republished,  # as before the copies
        *(statement for fk in references for statement in _fk_name(fk)),
        *(comment for fk in references for comment in sqlexpr.comment_on(
            sql.SQL("CONSTRAINT {} ON {}").format(sql.Identifier(fk.original.name),
                                                  fk.child.table.ident),
            fk_comments[fk.original.name])),
        *(statement for policy in policies for statement in _policy(policy))]
    run(cur, steps)
    return sorted({found.table for found in statistics})


def _column_swap(cur: Cursor, plan: Plan, key: KeyColumn) -> ColumnSwap:
    """What ``key``'s swap carries over, read under the swap's SHARE UPDATE EXCLUSIVE."""
    conn = cur.connection
    indexes = shadow_indexes(conn, key)
    info = _info(conn, key)
    return ColumnSwap(
        key, info, catalog.column_tuning(conn, key.table, key.column),
        catalog.column_grants(conn, key.table, key.column),
        catalog.comments(conn, key.table, key.column), indexes,
        catalog.replica_identity_index(conn, key.table),
        catalog.clustered_index(conn, key.table), catalog.column_triggers(conn, key),
        shadow_checks(conn, key),
        {(part.original.table, part.original.name): catalog.index_comment_and_identity(
            conn, part.original.table, part.original.name)
         for index in indexes for part in _parts(index)},
        {index.original.name: _constraint_definition(conn, index.original)
         for index in indexes if index.leaves_only},
        backup.saved_column(cur, plan.backup_schema, key).default if key.back else None,
        not key.back and info.default is not None and unwraps_to_uuid(cur, info.default))


def run(cur: Cursor, steps: list[Step]) -> None:
    """The steps in order: each run of statements in one round trip, a step that asks
    the server on its own."""
    batch: list[sql.Composable] = []
    for step in [*steps, None]:
        if isinstance(step, sql.Composable):
            batch.append(step)
            continue
        if batch:
            cur.execute(sql.SQL("; ").join(batch))
            batch = []
        if step is not None:
            step(cur)


@dataclass(frozen=True)
class LockedCheck:
    """The swap's one query under its write-blocking locks, and what reads its answer."""

    select: sql.Composable
    columns: list[tuple[KeyColumn, list[str]]]
    """Each column checked for keys that are not UUIDs, with the names of what a row
    found holds: its primary key's other columns, then the key."""

    @property
    def query(self) -> sql.Composable:
        """The check as sent: sequential scans off, for the invalid indexes' scans."""
        return sql.SQL("SET LOCAL enable_seqscan = off; ") + self.select


def locked_check(cur: Cursor, plan: Plan) -> LockedCheck:
    """One query of two values: the rows holding keys that are not UUIDs, a few per
    column, read from its invalid index (``expand.build_invalid_index``, whose predicate
    it repeats; no ORDER BY, by which the planner could walk the primary key instead),
    none on the way back, where the keys are uuid; and the views' signature
    (``views.signature``)."""
    conn = cur.connection
    columns: list[tuple[KeyColumn, list[str]]] = []
    found: list[sql.Composable] = []
    if not plan.parent.back:
        for key in plan.columns:
            named = [*(c for c in catalog.primary_key(conn, key.table) if c != key.column),
                     key.column]
            columns.append((key, named))
            found.append(sql.SQL("(SELECT coalesce(json_agg(json_build_array({})), '[]') "
                                 "FROM (SELECT {} FROM {} WHERE {} LIMIT {}) x)").format(
                sql.SQL(", ").join(sql.SQL("x.") + sql.Identifier(name) for name in named),
                sqlexpr.column_list(named), key.table.ident, not_a_uuid(key),
                sql.Literal(SAMPLE_LIMIT + 1)))
    return LockedCheck(sql.SQL("SELECT json_build_array({}), ({})").format(
        sql.SQL(", ").join(found), views.signature(plan.columns)), columns)


def refuse_invalid_keys(check: LockedCheck, invalid: list[list[list[object]]]) -> None:
    """Refuse the swap, before it changes anything, while a row of the plan holds a key
    that is not a UUID: the application wrote it after the pre-flight (the expansion
    accepts whatever the original column takes), and its copy holds a stand-in
    (``model.uuid_copy``), which must never become its value.

    Found under the swap's locks, so no write comes between the check and the swap;
    each column's query is an index scan of its invalid index
    (``expand.build_invalid_index``, whose predicate it repeats; sequential scans are
    off for it: the planner, which takes most strings for no UUID, would rather scan
    the table), which holds only such rows, so it costs microseconds whatever the
    table's size."""
    findings: list[Finding] = []
    values: list[str] = []  # a few of each column's, for the message
    for (key, names), rows in zip(check.columns, invalid, strict=True):
        if not rows:
            continue
        rows = sorted(rows, key=str)
        samples = [{"table": str(key.table), **dict(zip(names, row, strict=True))}
                   for row in rows[:SAMPLE_LIMIT]]
        more = "more than " if len(rows) > SAMPLE_LIMIT else ""
        findings.append(Finding(
            "invalid_uuid", Status.FAIL, f"{more}{len(samples)} value(s) are not UUIDs "
            "PostgreSQL accepts (the application wrote them while the column was "
            "expanded)", subject=str(key), count=len(samples), samples=samples))
        values.append(f"{key}: " + ", ".join(repr(row[-1]) for row in rows[:3])
                      + (", ..." if len(rows) > 3 else ""))
    if findings:
        raise MigrationError(
            "swap refused, nothing was changed: the application wrote keys that are not "
            f"UUIDs ({'; '.join(values)}); every column stays expanded beside its original, "
            "its copy kept in step, ready to swap",
            hint="correct or delete these rows, then run migrate_foreign_keys (or "
                 "full_migration) again, which swaps; or --operation=rollback",
            findings=findings)


def _statistics(found: catalog.StatisticsDef, user: str) -> list[sql.Composable]:
    """A statistics object again, from the server's own text read in this transaction
    (it names the column, which now has the new type), as ``user`` creates it; its
    target, owner and comment."""
    name = sql.Identifier(found.schema, found.name)
    statements: list[sql.Composable] = [sql.SQL(found.definition)]
    if found.target is not None:
        statements.append(sql.SQL("ALTER STATISTICS {} SET STATISTICS {}").format(
            name, sql.Literal(found.target)))
    if user != found.owner:
        statements.append(sql.SQL("ALTER STATISTICS {} OWNER TO {}").format(
            name, sql.Identifier(found.owner)))
    return [*statements, *sqlexpr.comment_on(sql.SQL("STATISTICS {}").format(name), found.comment)]


def _policies(cur: Cursor, plan: Plan) -> list[catalog.PolicyDef]:
    """The policies that depend on the plan's columns."""
    return sorted({policy for key in plan.columns
                   for policy in catalog.policies_on(cur.connection, key)},
                  key=lambda policy: (policy.table, policy.name))


def _lock_policy_tables(cur: Cursor, plan: Plan,
                        policies: list[catalog.PolicyDef]) -> list[catalog.PolicyDef]:
    """The ``policies`` read under the plan's tables' locks, their other tables locked too
    (after the plan's, in name order), and read again then when there are any: they are
    dropped before the columns and created again, from the definitions read here, after
    the renames, so no table is ever unprotected.  (A policy's DDL takes ACCESS EXCLUSIVE
    on its table: the SHARE UPDATE EXCLUSIVE held on the plan's tables keeps theirs.)"""
    others = sorted({policy.table for policy in policies} - set(plan.tables))
    if not others:
        return policies
    lock_tables(cur, [table.ident for table in others], "ACCESS EXCLUSIVE", wait=False)
    return _policies(cur, plan)


def _policy(policy: catalog.PolicyDef) -> list[sql.Composable]:
    roles = sql.SQL(", ").join(sql.SQL("PUBLIC") if role is None else sql.Identifier(role)
                               for role in policy.roles)
    statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
        sql.Identifier(policy.name), policy.table.ident,
        sql.SQL("PERMISSIVE" if policy.permissive else "RESTRICTIVE"),
        sql.SQL(policy.command), roles)
    if policy.using is not None:  # the server's own text, read in this transaction
        statement += sql.SQL(" USING ({})").format(sql.SQL(policy.using))
    if policy.with_check is not None:
        statement += sql.SQL(" WITH CHECK ({})").format(sql.SQL(policy.with_check))
    return [statement, *sqlexpr.comment_on(sql.SQL("POLICY {} ON {}").format(
        sql.Identifier(policy.name), policy.table.ident), policy.comment)]


def _info(conn: Connection, key: KeyColumn) -> catalog.ColumnInfo:
    info = catalog.column_info(conn, key.table, key.column)
    if info is None:
        raise MigrationError(f"{key} disappeared during the migration",
                             hint="run --operation=status, then rollback")
    return info


TRIGGER_STATES = {"A": "ENABLE ALWAYS", "R": "ENABLE REPLICA", "D": "DISABLE"}
"""``ALTER TABLE ... <state> TRIGGER`` for each pg_trigger.tgenabled but the default (O)."""


def trigger_statements(table: Table, trigger: catalog.ColumnTrigger) -> list[sql.Composable]:
    """A trigger that names the key column again, on the new column: from the server's own
    text read in the swap's transaction, with its state and comment."""
    name = sql.Identifier(trigger.name)
    statements: list[sql.Composable] = [sql.SQL(trigger.definition)]
    if trigger.enabled in TRIGGER_STATES:
        statements.append(sql.SQL("ALTER TABLE {} " + TRIGGER_STATES[trigger.enabled]
                                  + " TRIGGER {}").format(table.ident, name))
    return [*statements, *sqlexpr.comment_on(sql.SQL("TRIGGER {} ON {}").format(name, table.ident),
                                     trigger.comment)]


def add_using_index(index: ShadowIndex) -> sql.Composable:
    """The primary key or unique constraint of a plain table put back on its copy, which
    takes the constraint's name."""
    original = index.original
    kind = "PRIMARY KEY" if original.constraint_type == "p" else "UNIQUE"
    timing = ""
    if original.deferrable:
        timing = (" DEFERRABLE INITIALLY DEFERRED" if original.deferred
                  else " DEFERRABLE INITIALLY IMMEDIATE")
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} " + kind + " USING INDEX {}"
                   + timing).format(original.table.ident, sql.Identifier(original.name),
                                    sql.Identifier(index.name))


def _constraint_definition(conn: Connection, index: IndexDef) -> str:
    definition = catalog.constraint_definition(conn, index.table, index.name)
    if definition is None:
        raise MigrationError(f"constraint {index.name} of {index.table} disappeared during "
                             "the migration", hint="run --operation=status, then rollback")
    return definition


def _name_middle_levels(cur: Cursor, index: ShadowIndex) -> None:
    parent = Table(index.original.table.schema, index.original.name)
    for part in index.parts:
        if not part.partitioned:
            continue
        chosen = catalog.attached_index(cur.connection, parent, part.original.table)
        if chosen is not None and chosen != part.original.name:  # renames its constraint too
            cur.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(part.original.table.schema, chosen),
                sql.Identifier(part.original.name)))
        _name_middle_levels(cur, part)


def _parts(index: ShadowIndex) -> list[ShadowIndex]:
    """A partitioned index's partitions, at every level."""
    return [found for part in index.parts for found in (part, *_parts(part))]


def _fk_name(fk: ShadowForeignKey) -> list[sql.Composable]:
    """The FK copy takes its original's name; a partitioned table's, and each of its
    partitions' (PostgreSQL does not rename those with their table's)."""
    return [sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
        fk.child.table.ident, sql.Identifier(fk.name), sql.Identifier(fk.original.name)),
        *(statement for part in fk.parts for statement in _fk_name(part))]
