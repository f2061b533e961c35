"""validate_schema: the schema and data pre-flight, before anything is changed.

It reads only (plus a ``pg_temp`` helper function on servers older than 16)
and reports, per key column, what would make the conversion fail or lose
meaning: invalid strings, ids that collide once normalised, orphans, and
objects the swap cannot carry over.  Each finding names the table and up to
20 offending rows by the table's walk key (``catalog.walk_key``: the primary
key, else a unique key, else ``ctid``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import catalog, publications, sqlexpr, views
from migration.catalog import Blocker, ColumnState
from migration.connection import Connection
from migration.log import logger
from migration.model import KeyColumn
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.rows import key_reader, orphan_condition, samples_query
from migration.session import WAL_COMPRESSION, Session, lift_statement_timeout
from migration.sqlexpr import UuidReader, is_uuid, prepare_uuid_checker


def value_findings(session: Session, cur: Cursor, key: KeyColumn,
                   read: Callable[[KeyColumn], UuidReader], *, warnings: bool) -> list[Finding]:
    """Invalid, colliding, orphaned values of one string column; with ``warnings`` also
    the non-canonical spellings and the children that spell their parent differently.

    ``read`` gives a column's reader, probed once per pre-flight.  The checks
    that find nothing on clean data cost one scan each; the sample queries
    run only where a count says there is something to show.
    """
    conn = session.conn
    pk = catalog.walk_key(conn, key.table)
    col = sql.Identifier("t", key.column)
    values = read(key)
    findings: list[Finding] = []

    def add(check: str, status: Status, where: sql.Composable, message: str, hint: str) -> int:
        count, samples = samples_query(cur, key, pk, where)
        if count:
            findings.append(Finding(check, status, message.format(count=count),
                                    subject=str(key), count=count, samples=samples, hint=hint))
        return count

    if not values.every_value_casts:
        add("invalid_uuid", Status.FAIL,
            sql.SQL("{} IS NOT NULL AND NOT {}").format(
                col, is_uuid(conn, values.as_cast_reads(col))),
            "{count} value(s) are not UUIDs PostgreSQL accepts",
            "correct or remove these rows, then run validate_schema again")
    if warnings and values.non_canonical:
        add("non_canonical", Status.WARN,
            sql.SQL("({})::text <> {}").format(values.cast(col), col),
            "{count} value(s) are spelled non-canonically (case, braces or hyphens); "
            "the uuid type keeps only the value, the original spelling stays in the backup",
            "nothing to do unless the application compares these strings verbatim")
    if values.non_canonical:  # otherwise the cast maps distinct strings to distinct uuids
        for index in collision_indexes(unique_indexes(conn, key), key.column):
            findings += collision_findings(cur, key, values, index)
    if key == session.plan.parent:
        return findings
    parent = session.plan.parent
    parents = read(parent)
    quarantine = session.settings.orphans == "quarantine"
    add("orphans", Status.WARN if quarantine else Status.FAIL,
        orphan_condition(cur, key, parent, (values, parents)),
        "{count} row(s) refer to no " + str(parent)
        + (" and will be moved to quarantine" if quarantine else ""),
        "delete them or point them at existing users, or run migrate_foreign_keys "
        f"with --orphans=quarantine (kept in {session.plan.backup_schema}, restored by "
        "rollback)")
    if (warnings and catalog.column_state(conn, parent) is not ColumnState.UUID
            and (values.non_canonical or parents.non_canonical)):  # else text = uuid equality
        add("respelled_reference", Status.INFO, sql.SQL(
            "{col} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {pcol} = {col})"
            " AND EXISTS (SELECT 1 FROM {parent} p WHERE {puuid} = {cuuid})").format(
                col=col, parent=parent.table.ident, pcol=sql.Identifier("p", parent.column),
                puuid=parents.cast(sql.Identifier("p", parent.column)),
                cuuid=values.cast(col)),
            "{count} value(s) match their parent only once both are uuids "
            "(another spelling of the same UUID); they will refer to it after the migration",
            "nothing to do; the backup keeps the original spelling")
    return findings


@dataclass(frozen=True)
class UniqueIndex:
    """A unique index that includes the key column as a plain column."""

    columns: list[str]
    nulls_distinct: bool  # as UNIQUE is by default: rows with a NULL in it never collide
    predicate: str | None  # a partial index's WHERE, as the server deparses it


def unique_indexes(conn: Any, key: KeyColumn) -> list[UniqueIndex]:
    """The unique indexes that include the key column as a plain column."""
    nulls_distinct = ("NOT i.indnullsnotdistinct" if catalog.server_version(conn) >= 150000
                      else "true")  # NULLS NOT DISTINCT exists from PostgreSQL 15
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("""
            SELECT array_agg(a.attname ORDER BY k.pos), {nulls_distinct},
                   pg_get_expr(i.indpred, i.indrelid)
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY k(attnum, pos)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indexprs IS NULL
            GROUP BY i.indexrelid
            HAVING %s = ANY (array_agg(a.attname))
            ORDER BY 1
            """).format(nulls_distinct=sql.SQL(nulls_distinct)),
            (catalog.regclass(key.table), key.column),
        )
        return [UniqueIndex(list(cols), distinct, predicate)
                for cols, distinct, predicate in cur.fetchall()]


def collision_indexes(indexes: list[UniqueIndex], column: str) -> list[UniqueIndex]:
    """The unique indexes to look for collisions through: each collision reported once.

    An index is left out when another one shows every collision it would
    (``_shows_collisions_of``): the primary key and a redundant unique index on
    the same column, or ``(id)`` and ``(id, name)``.  Of indexes that show each
    other's, the first is kept.
    """
    return [index for i, index in enumerate(indexes)
            if not any(_shows_collisions_of(other, index, column)
                       and (j < i or not _shows_collisions_of(index, other, column))
                       for j, other in enumerate(indexes) if j != i)]


def _shows_collisions_of(a: UniqueIndex, b: UniqueIndex, column: str) -> bool:
    """Whether every group of rows that collides on ``b`` lies in one that collides on
    ``a``: ``a``'s columns are among ``b``'s, it keeps every row ``b`` keeps (no
    predicate, or the same), and it does not leave out rows with a NULL that ``b``
    groups (NULLS NOT DISTINCT) in columns other than the key."""
    return (set(a.columns) <= set(b.columns)
            and a.predicate in (None, b.predicate)
            and (not a.nulls_distinct or b.nulls_distinct or a.columns == [column]))


def collision_findings(cur: Cursor, key: KeyColumn, values: UuidReader,
                       index: UniqueIndex) -> list[Finding]:
    """Rows whose unique key becomes equal once the key column is a uuid.

    Only rows the index constrains can collide: those its predicate keeps,
    and (unless it is NULLS NOT DISTINCT) those with no NULL in its columns;
    GROUP BY alone would put rows whose other columns are NULL together.
    """
    keyed = [values.cast(sql.Identifier(c)) if c == key.column else sql.Identifier(c)
             for c in index.columns]
    conditions = [values.valid(sql.Identifier(key.column))]
    if index.nulls_distinct:
        conditions += [sql.SQL("{} IS NOT NULL").format(sql.Identifier(c))
                       for c in index.columns if c != key.column]
    if index.predicate is not None:  # the server's own text of the index's WHERE
        conditions.append(sql.SQL("({})").format(sql.SQL(index.predicate)))
    cur.execute(
        sql.SQL(
            "SELECT count(*) OVER (), {cols} FROM ("
            "  SELECT array_agg({col} ORDER BY {col}) AS {cols}"
            "  FROM {table} WHERE {where}"
            "  GROUP BY {keyed} HAVING count(*) > 1) g ORDER BY 2 LIMIT {limit}").format(
            cols=sql.Identifier("spellings"), col=sql.Identifier(key.column),
            table=key.table.ident, where=sql.SQL(" AND ").join(conditions),
            keyed=sql.SQL(", ").join(keyed), limit=sql.Literal(SAMPLE_LIMIT)),
    )  # no parameters: a % in the predicate's text stays a %
    rows = cur.fetchall()
    if not rows:
        return []
    return [Finding(
        "collision", Status.FAIL,
        f"{rows[0][0]} group(s) of rows become equal on ({', '.join(index.columns)}) once "
        f"{key.column} is a uuid (the same UUID spelled differently)",
        subject=str(key), count=int(rows[0][0]),
        samples=[{"table": str(key.table), key.column: list(spellings)} for _, spellings in rows],
        hint="merge or remove the duplicates (they are the same UUID), then run again")]


def schema_findings(session: Session, key: KeyColumn) -> list[Finding]:
    conn = session.conn
    state = catalog.column_state(conn, key)
    findings = [Finding("column_state", Status.INFO, f"state: {state}", subject=str(key))]
    if state is ColumnState.MISSING:
        findings[0] = Finding("column_state", Status.FAIL, "table or column not found",
                              subject=str(key), hint="check --schema and the table names")
        return findings
    if state is ColumnState.OTHER:
        info = catalog.column_info(conn, key.table, key.column)
        findings[0] = Finding("column_state", Status.FAIL,
                              f"type {info.type if info else '?'} is neither a string nor uuid",
                              subject=str(key))
    if state is not ColumnState.UUID and not catalog.primary_key(conn, key.table):
        walk = catalog.walk_key(conn, key.table)
        findings.append(Finding(
            "walk_key", Status.INFO, "the table has no primary key: its rows are named "
            + (f"by its unique key ({', '.join(walk)})" if walk != [catalog.PAGES] else
               "by their place (ctid), and the rollback pairs them with the backup's "
               "by content"),
            subject=str(key)))
    converting = state in (ColumnState.STRING, ColumnState.BACKFILLING)
    for blocker in (*blockers(conn, key),
                    *(views.blockers(conn, key, session.plan.columns, session.plan.backup_schema,
                                     refresh=session.settings.refresh_materialized_views)
                      if converting else ())):
        reason = f" and {blocker.reason}" if blocker.reason else ""
        findings.append(Finding("blocker", Status.FAIL,
                                f"{blocker.what} depends on the column{reason}",
                                subject=str(key), hint=blocker.hint))
    if converting:
        findings += foreign_key_findings(session, key)
        findings += trigger_findings(session, key)
    findings += name_findings(conn, key.reversed() if state is ColumnState.UUID else key)
    findings += family_findings(session, key)
    return findings


def foreign_key_findings(session: Session, key: KeyColumn) -> list[Finding]:
    """The foreign keys on the column, in either direction, that the swap cannot carry.

    It carries only the plan's own: one column of the plan referring to the
    parent key.  Any other would be dropped with the column by the swap's
    ``DROP COLUMN`` (one out of a key column: no foreign key holds between
    uuid and a string column), or would make it fail (one into a key column
    other than the parent); one spanning several columns is not copied.  A
    foreign key between two columns of the plan is named once, under its
    referencing column.
    """
    plan = session.plan
    findings = []
    for fk in catalog.foreign_keys_on(session.conn, key):
        referencing = fk.table == key.table and key.column in fk.columns
        if not referencing and any(KeyColumn(fk.table, c) in plan.columns for c in fk.columns):
            continue  # the plan's own, or named under its referencing column
        target = KeyColumn(fk.referenced, fk.referenced_columns[0])
        if len(fk.columns) > 1:
            message = (f"{fk} spans {len(fk.columns)} columns: the engine carries only "
                       f"single-column foreign keys to {plan.parent}")
            hint = ("drop it before the migration and add it again after (its other columns "
                    "must then have the referenced columns' types), then run again")
        elif referencing and target == plan.parent:
            continue  # the plan's own: copied between the uuid columns, swapped with them
        elif referencing and target in plan.columns:
            message = (f"{fk}, a column of the plan that is not the parent key: the engine "
                       f"copies only foreign keys to {plan.parent}")
            hint = "drop it before the migration and add it again after, then run again"
        elif referencing:
            message = (f"{fk}, which stays {fk.referenced_types[0]}: the swap would drop it "
                       "with the column (no foreign key holds between uuid and a string)")
            hint = (f"migrate {target} first (--key={target.spec}: {key} then joins its plan "
                    "and becomes uuid with it), or drop the foreign key before the migration "
                    "and add it again after between uuid columns, then run again")
        else:
            message = (f"{fk}, and only foreign keys to {plan.parent} join the plan: the "
                       f"swap could not drop {key.column} under it")
            hint = ("drop it before the migration and add it again after, or make its "
                    "column refer to the parent key, then run again")
        findings.append(Finding("blocker", Status.FAIL, message, subject=str(key), hint=hint))
    return findings


def name_findings(conn: Connection, key: KeyColumn) -> list[Finding]:
    """Objects of the application's that bear a name the engine would create for ``key``:
    the plan gives each key names nobody has taken (``plan.with_free_names``), so these
    are found only when every choice is taken."""
    return [Finding("name_taken", Status.FAIL,
                    f"{thing} on {key.table} has a name the migration of {key.column} gives "
                    "its own temporary objects, and the migration did not create it",
                    subject=str(key),
                    hint=f"rename the application's {thing.split()[0]} (the migration would "
                         "overwrite or drop it), then run again")
            for thing in catalog.names_taken(conn, key)]


def family_findings(session: Session, key: KeyColumn) -> list[Finding]:
    """Partitions and inheritance the engine cannot carry, refused before anything is done.

    A partitioned child table is carried (its copies are added on the table
    and reach its partitions), its primary key or unique constraints over the
    key column too.  Refused: a partitioned parent key (the FK copies would
    have to reference a unique constraint on its copy, which a partitioned
    table can only get by building it under its lock), a partitioned child
    without a key to walk its fill by, a partition migrated on its own, and
    inheritance (``INHERITS``), whose children get a new column but not its
    indexes, constraints or trigger.
    """
    family = catalog.family(session.conn, key.table)
    reasons = []
    if family.partitioned and key == session.plan.parent:
        reasons.append("it is partitioned and holds the key every foreign key refers to")
    elif family.partitioned and catalog.walk_key(session.conn, key.table) == [catalog.PAGES]:
        reasons.append("it is partitioned and has no primary key or unique key over NOT NULL "
                       "columns to walk its rows by (its partitions' pages are theirs)")
    if family.partition_of:
        reasons.append(f"it is a partition of {family.partition_of}: migrate that table")
    if family.inherits:
        reasons.append(f"it inherits from {', '.join(family.inherits)} (INHERITS)")
    if family.inherited_by:
        reasons.append(f"{', '.join(family.inherited_by)} inherit(s) from it (INHERITS)")
    return [Finding("table_family", Status.FAIL, f"{key.table} cannot be migrated: {reason}",
                    subject=str(key),
                    hint="the engine carries partitioned child tables only; convert this "
                         "table by hand, or detach its children first")
            for reason in reasons]


def mentions(source: str, column: str) -> bool:
    """Whether a function body names the column as a word (``NEW.id``, not ``user_id``)."""
    return re.search(rf"(?<![\w$]){re.escape(column)}(?![\w$])", source,
                     re.IGNORECASE) is not None


def trigger_findings(session: Session, key: KeyColumn) -> list[Finding]:
    """What the fill's UPDATE of the temporary column would set off, and the
    trigger bodies that the uuid type may break.

    The fill runs with ``session_replication_role = replica`` where the role
    may set it: ordinary triggers then stay quiet, ALWAYS and REPLICA ones
    fire.  Triggers that fire, and bodies that use the key, are refused
    unless ``--allow-triggers`` accepts them (a warning each); an ON UPDATE
    rule always is, for the fill's batch statement cannot run with one.
    """
    conn = session.conn
    replica = catalog.may_skip_triggers(conn)
    allow = session.settings.allow_triggers
    status = Status.WARN if allow else Status.FAIL
    subject = str(key)
    triggers = catalog.application_triggers(conn, key)
    findings: list[Finding] = []
    for trigger in triggers:
        if trigger.fires_for_fill(replica=replica):
            findings.append(Finding(
                "trigger_fires", status,
                f"{trigger} fires for every row the fill of {key.temp} updates"
                + (" (accepted by --allow-triggers)" if allow else ""), subject=subject,
                hint="" if allow else
                "grant the role SET on session_replication_role (PostgreSQL 15+: GRANT SET ON "
                "PARAMETER session_replication_role TO ...) so that the fill skips it, or "
                "disable it around the migration (ALTER TABLE ... DISABLE TRIGGER), or pass "
                "--allow-triggers to let it fire"
                + (" (it is ENABLE ALWAYS or REPLICA: it fires even so)" if replica else "")))
        elif replica and trigger.fires_for_fill(replica=False):
            findings.append(Finding(
                "trigger_quiet", Status.INFO,
                f"{trigger} will not fire for the fill (session_replication_role = replica)",
                subject=subject))
        if mentions(trigger.source, key.column):
            findings.append(Finding(
                "trigger_uses_key", status,
                f"{trigger} names {key.column} in its function's body; once {key.column} is "
                "uuid, text operations on it fail or change meaning"
                + (" (accepted by --allow-triggers)" if allow else ""), subject=subject,
                hint="" if allow else
                f"review the body for text operations on {key.column} (lower(), ||, "
                "comparisons with text); drop the trigger before the migration and recreate "
                "it after, or pass --allow-triggers when the body is right for uuid"))
    for view in views.dependent_views(conn, (key,)):  # carried with the view
        findings += [Finding(
            "trigger_uses_key", status,
            f"trigger {found.name} on view {view.view} names {key.column} in its "
            f"function's body; once {key.column} is uuid, text operations on it fail or "
            "change meaning" + (" (accepted by --allow-triggers)" if allow else ""),
            subject=subject, hint="" if allow else
            f"review the body for text operations on {key.column}; drop the trigger before "
            "the migration and recreate it after, or pass --allow-triggers when the body is "
            "right for uuid")
            for found in view.objects if found.source and mentions(found.source, key.column)]
    findings += [Finding("rule_fires", Status.FAIL,
                         f"rule {rule} on {key.table} rewrites the fill's UPDATE "
                         f"(the batches cannot run with it)", subject=subject,
                         hint="drop it before the migration and recreate it after")
                 for rule in catalog.update_rules(conn, key.table, replica=replica)]
    return findings


def check_columns(session: Session, keys: tuple[KeyColumn, ...], *,
                  warnings: bool = False,
                  later: tuple[KeyColumn, ...] = ()) -> list[Finding]:
    """Schema and data findings for the given key columns (read-only); the steps ask
    only for what blocks them, validate_schema for the warnings too.

    ``later``: columns a later step converts, whose schema is judged now too (their
    rows are that step's to judge, with its own options): a step refuses with every
    object that stops the migration named, before it changes anything.
    """
    findings: list[Finding] = []
    readers: dict[KeyColumn, UuidReader] = {}
    with session.transaction() as cur:
        lift_statement_timeout(cur)  # counts and scans of whole tables
        prepare_uuid_checker(cur)

        def read(key: KeyColumn) -> UuidReader:
            if key not in readers:
                readers[key] = key_reader(cur, key)
            return readers[key]

        for key in keys:
            findings += schema_findings(session, key)
            if catalog.column_state(session.conn, key) in (ColumnState.STRING,
                                                           ColumnState.BACKFILLING):
                # a blocker does not hide bad values: the operator sees all at once
                findings += value_findings(session, cur, key, read, warnings=warnings)
        for key in later:
            findings += [finding for finding in schema_findings(session, key)
                         if finding.status is Status.FAIL]
    session.conn.rollback()  # nothing here is meant to last, the pg_temp helper included
    findings += publications.findings(session.conn, [
        key for key in keys if catalog.column_state(session.conn, key)
        in (ColumnState.STRING, ColumnState.BACKFILLING)],
        allowed=session.settings.allow_publications)
    session.conn.rollback()
    if not warnings:  # a step's report shows only its refusal: what it accepts, it says here
        for finding in findings:
            if finding.status is Status.WARN:
                logger.warning("%s: %s", finding.subject, finding.message)
    return findings


def validate_schema(session: Session) -> list[Finding]:
    """The whole pre-flight: server, plan, every key column, space needed."""
    conn = session.conn
    version = conn.get_parameter_status("server_version")
    findings = [Finding("server", Status.INFO, f"PostgreSQL {version}"),
                Finding("plan", Status.INFO, f"key {session.plan.key}: the backup goes to "
                        f"{session.plan.backup_schema}", subject=str(session.plan.parent))]
    for key in session.plan.discovered:
        findings.append(Finding("plan", Status.INFO,
                                f"added to the plan: a foreign key references "
                                f"{session.plan.parent}", subject=str(key)))
    findings += [Finding(
        "event_trigger", Status.WARN, f"event trigger {trigger} fires for the swap's "
        "statements, inside the transaction that holds the tables' locks: its time adds to "
        "the application's wait, and an error it raises stops the swap (nothing of it "
        "committed)", hint="rehearse measures the swap with it; disable it around the swap "
                           "(ALTER EVENT TRIGGER ... DISABLE) if it is slow or refuses DDL")
        for trigger in catalog.event_triggers(conn)]
    findings += check_columns(session, session.plan.columns, warnings=True)
    findings += subscription_findings(session)
    if all(catalog.table_exists(conn, t) for t in session.plan.tables):
        heap, index = plan_bytes(session)
        findings += [space_finding(heap, index),
                     wal_finding(conn, heap + index, compress=session.settings.wal_compression)]
        conn.rollback()
    return findings


def subscription_findings(session: Session) -> list[Finding]:
    """The subscriptions of this database that write into the plan's tables, by name.

    They may go on applying throughout: their apply worker writes with
    ``session_replication_role = replica``, which fires the engine's triggers
    (ENABLE ALWAYS), so its rows are kept in step, pass the fill's proofs and
    are in the change log.  What the operator must know: after the swap the
    publisher's string ids are read into uuid columns, so an id there that is
    not a UUID stops the subscription.
    """
    with session.conn.cursor() as cur:
        cur.execute("SELECT s.subname::text, array_agg(r.srrelid::regclass::text ORDER BY "
                    "r.srrelid::regclass::text) FROM pg_subscription_rel r "
                    "JOIN pg_subscription s ON s.oid = r.srsubid "
                    "WHERE r.srrelid IN (SELECT to_regclass(t) FROM unnest(%s::text[]) t) "
                    "GROUP BY s.subname ORDER BY 1",
                    ([catalog.regclass(table) for table in session.plan.tables],))
        rows = cur.fetchall()
    session.conn.rollback()
    return [Finding(
        "subscriptions", Status.INFO,
        f"subscription {name} writes into {', '.join(tables)}: it may go on applying "
        "throughout (its writes fire the engine's triggers, are kept in step and recorded "
        "in the change log)", subject=", ".join(tables),
        hint="after the swap its publisher's ids are read into uuid columns: run "
             "validate_schema on the publisher too, an id there that is not a UUID would "
             "stop the subscription") for name, tables in rows]


def plan_bytes(session: Session) -> tuple[int, int]:
    """Heap and index bytes of the plan's tables now."""
    sizes = [catalog.relation_bytes(session.conn, table) for table in session.plan.tables]
    return sum(heap for heap, _ in sizes), sum(index for _, index in sizes)


def space_finding(heap: int, index: int) -> Finding:
    """Disk the backup and the batched rewrite will take, from the tables' sizes now."""
    # The backup copies each heap once; filling the temporary columns writes
    # a new version of every row (about one more heap) and the swap rebuilds
    # the key indexes (at most the current index size).
    needed = 2 * heap + index
    return Finding("disk_space", Status.INFO,
                   f"about {needed / 2**20:,.1f} MiB of free disk needed "
                   f"(backup {heap / 2**20:,.1f} MiB, row versions {heap / 2**20:,.1f} MiB, "
                   f"indexes {index / 2**20:,.1f} MiB)", count=needed)


WAL_ROOM = 4
"""``max_wal_size`` under this many times the plan's tables and indexes forces checkpoints
inside the migration.  With ``full_page_writes`` on it writes about 2.2 times the plan's
bytes of WAL when no checkpoint falls inside it (537 MiB for 240 MiB at 100,000 users),
and PostgreSQL starts a checkpoint once about half of ``max_wal_size`` (``1 +
checkpoint_completion_target``) is written since the last."""


def wal_finding(conn: Connection, plan_bytes: int, *, compress: bool) -> Finding:
    """The server's WAL settings, read (no privilege needed), judged by ``wal_advice``;
    ``compress``: whether the engine's sessions were to compress their full-page images
    (``Settings.wal_compression``), which this session's own setting shows they did."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('full_page_writes') = 'on', "
                    "pg_size_bytes(current_setting('max_wal_size')), "
                    "current_setting('checkpoint_timeout'), setting, "
                    "%s = ANY (enumvals), current_user "
                    "FROM pg_settings WHERE name = 'wal_compression'", (WAL_COMPRESSION,))
        row = cur.fetchone()
    assert row is not None
    fpw, max_wal, timeout, compression, lz4, role = row
    return wal_advice(full_page_writes=fpw, max_wal_bytes=int(max_wal),
                      checkpoint_timeout=timeout, plan_bytes=plan_bytes,
                      compression=compression,
                      grant_for=role if compress and fpw and lz4 and compression == "off"
                      else None)


def wal_advice(*, full_page_writes: bool, max_wal_bytes: int, checkpoint_timeout: str,
               plan_bytes: int, compression: str = "off", grant_for: str | None = None
               ) -> Finding:
    """Whether checkpoints will fall inside the migration and multiply its WAL.

    After each checkpoint, the first change to a page writes the whole page to the WAL
    (``full_page_writes``, on in every production setting).  The fill changes every row
    of the plan in the keys' order, which is random over the pages: a page is changed
    again after nearly every checkpoint, a whole page for a row.  Measured at 100,000
    users with ``max_wal_size`` 96MB: 2,654 MiB of WAL, 14 times the one-shot rewrite's;
    with the engine's sessions compressing those pages (``wal_compression`` lz4,
    ``session.compress_wal``), 938 MiB, 5.3 times; with 4GB and no compression, 537 MiB
    (2.85 times).  At 1,000,000 users with 1GB and no compression, 25.6 GiB (13.6
    times).  A walk by pages measured no better (2,001 MiB): its updates, not HOT, add
    entries at random places of every index instead.  ``grant_for``: the role that could
    compress them, given the right to (the server has lz4, the role may not set it).
    """
    room = WAL_ROOM * plan_bytes
    settings = (f"full_page_writes {'on' if full_page_writes else 'off'}, max_wal_size "
                f"{max_wal_bytes / 2**20:,.0f} MiB, checkpoint_timeout {checkpoint_timeout}, "
                f"wal_compression {compression} in the engine's sessions")
    grant = ("" if grant_for is None else
             f"let the engine compress the whole pages it writes (a third of the WAL, "
             f"measured): GRANT SET ON PARAMETER wal_compression TO "
             f"{sqlexpr.quote_ident(grant_for)} (a superuser's step, PostgreSQL 15 and later)")
    if not full_page_writes or max_wal_bytes >= room:
        return Finding("wal", Status.INFO, f"WAL settings: {settings}", count=max_wal_bytes,
                       hint=grant)
    wanted = -(-room // 2**30)  # GiB, rounded up
    return Finding(
        "wal", Status.WARN,
        f"{settings}: max_wal_size is under {WAL_ROOM} times the plan's tables and indexes "
        f"({plan_bytes / 2**20:,.0f} MiB), so checkpoints fall inside the migration and, "
        "after each one, the next change to every page writes the whole page to the WAL "
        "again: measured, 11 to 14 times the one-shot rewrite's WAL uncompressed, 5.3 "
        "times with wal_compression lz4, where 4GB gave 2.9 times at 100,000 users. "
        "Standbys replay it and the archive keeps it",
        count=max_wal_bytes,
        hint=f"for the migration, raise max_wal_size to {wanted}GB or more and "
             "checkpoint_timeout to longer than the run (ALTER SYSTEM SET ...; SELECT "
             "pg_reload_conf(): a superuser's step, no restart), with that much room on the "
             "WAL's disk; --max-replica-lag keeps the standbys within bounds meanwhile"
             + (f"; and {grant}" if grant else ""))


UUID_FORMAT_HINT = (
    "the uuid type accepts only UUIDs: a CHECK of the format (length, pattern) has nothing "
    "left to check, drop it before the migration; otherwise rewrite it so that it holds for "
    "the uuid column (compare with ::text where text is meant), then run again")


def blockers(conn: Connection, key: KeyColumn) -> list[Blocker]:
    """Objects that depend on the column and that the swap cannot carry over.

    Rules, exclusion constraints and generated columns that mention the column
    would make ``DROP COLUMN`` fail or silently change meaning; they must be
    dealt with by a person first.  The table's own triggers that name it
    (``UPDATE OF``, ``WHEN``) are carried when they compile on uuid
    (``trigger_compiles``).  Views (and materialized views), with their rules,
    are judged by ``views.blockers``.  CHECK constraints, row-level security
    policies, expression indexes, statistics objects and publications' row
    filters are carried when their definitions compile with the column as uuid
    (``compiles_as_uuid``), and are blockers only when they do not; a
    publication's column list is carried when this role may alter it.
    The engine's own sync trigger and fill proof are not counted.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            WITH col AS (
                SELECT a.attrelid, a.attnum FROM pg_attribute a
                WHERE a.attrelid = to_regclass(%(table)s) AND a.attname = %(column)s
            )
            SELECT DISTINCT CASE d.classid
                WHEN 'pg_rewrite'::regclass THEN
                    (SELECT 'rule ' || rulename || ' on ' || ev_class::regclass::text
                     FROM pg_rewrite WHERE oid = d.objid)
                WHEN 'pg_trigger'::regclass THEN
                    (SELECT 'trigger ' || tgname || CASE WHEN tgrelid = col.attrelid THEN ''
                            ELSE ' on ' || tgrelid::regclass::text END
                     FROM pg_trigger WHERE oid = d.objid)
                WHEN 'pg_policy'::regclass THEN
                    (SELECT 'policy ' || polname || CASE WHEN polrelid = col.attrelid THEN ''
                            ELSE ' on ' || polrelid::regclass::text END
                     FROM pg_policy WHERE oid = d.objid)
                WHEN 'pg_constraint'::regclass THEN
                    (SELECT 'constraint ' || conname || CASE WHEN conrelid = col.attrelid THEN ''
                            ELSE ' on ' || conrelid::regclass::text END
                     FROM pg_constraint WHERE oid = d.objid)
                WHEN 'pg_class'::regclass THEN
                    CASE WHEN d.objid = col.attrelid THEN 'generated column'
                         ELSE 'object ' || d.objid::regclass::text END
                ELSE pg_describe_object(d.classid, d.objid, d.objsubid)
                END
            FROM col
            JOIN pg_depend d ON d.refobjid = col.attrelid AND d.refobjsubid = col.attnum
            WHERE d.deptype IN ('n', 'a')
              AND NOT (d.classid = 'pg_class'::regclass
                       AND d.objid IN (SELECT indexrelid FROM pg_index
                                       WHERE indrelid = col.attrelid))
              AND NOT (d.classid = 'pg_attrdef'::regclass)
              AND NOT (d.classid = 'pg_rewrite'::regclass AND d.objid IN (
                    SELECT r.oid FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
                    WHERE v.relkind IN ('v', 'm')))
              AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid IN (
                    SELECT oid FROM pg_constraint WHERE contype IN ('p', 'u', 'f', 'n')))
              AND NOT (d.classid = 'pg_trigger'::regclass AND d.objid IN (
                    SELECT oid FROM pg_trigger WHERE tgrelid = col.attrelid))
              AND NOT (d.classid = 'pg_constraint'::regclass AND d.objid IN (
                    SELECT oid FROM pg_constraint WHERE conrelid = col.attrelid
                    AND contype = 'c'))
              AND NOT (d.classid = 'pg_policy'::regclass)
              AND NOT (d.classid = 'pg_statistic_ext'::regclass)
              AND NOT (d.classid = 'pg_publication_rel'::regclass)
            ORDER BY 1
            """,
            {"table": catalog.regclass(key.table), "column": key.column,
             "sync": key.helper("sync")},
        )
        found = [Blocker(text) for (text,) in cur.fetchall()]
    found += [Blocker(f"generated column {name}")
              for name in catalog.generated_columns(conn, key)]
    return found + uncompilable(conn, key)


def uncompilable(conn: Connection, key: KeyColumn) -> list[Blocker]:
    """The CHECK constraints, policies, indexes, publications' row filters, triggers and
    statistics on the column whose definitions would not compile with the column as uuid
    (an index on the column itself: whose operator class or collation has no uuid form)."""
    found = []
    for check in catalog.check_constraints_on(conn, key):
        reason = catalog.compiles_as_uuid(conn, key, key.table, where=check.expression)
        if reason:
            found.append(Blocker(f"constraint {check.name} (CHECK {check.expression})", reason,
                                 UUID_FORMAT_HINT))
    for policy in catalog.policies_on(conn, key):
        reason = next((reason for reason in (
            catalog.compiles_as_uuid(conn, key, policy.table, where=expression)
            for expression in (policy.using, policy.with_check) if expression) if reason), "")
        if reason:
            on = "" if policy.table == key.table else f" on {policy.table}"
            found.append(Blocker(f"policy {policy.name}{on}", reason,
                                 "rewrite the policy so that it holds for the uuid column "
                                 "(drop it before the migration and create it again after, "
                                 "keeping the table protected), then run again"))
    for plain in catalog.indexes_on(conn, key):  # an operator class, a collation: strings only
        reason = "" if plain.uses_expression else catalog.runs_on_twin(
            conn, key, plain.definition, "cannot be built on the uuid column")
        if reason:
            found.append(Blocker(f"index {plain.name}", reason,
                                 "drop it before the migration and create it again after for "
                                 "the uuid column (its default operator class, no COLLATE), "
                                 "then run again"))
    for index in catalog.expression_indexes_on(conn, key):
        reason = catalog.compiles_as_uuid(conn, key, key.table, select=index.expressions,
                                          where=index.predicate)
        if reason:
            found.append(Blocker(f"expression index {index.name}", reason))
    for published in catalog.publications_on(conn, key):
        what = f"publication {published.publication} (its column list or row filter)"
        if not published.may_alter:
            found.append(Blocker(what, f"it is owned by {published.owner}, for whom this role "
                                 "cannot take the table out and add it back in the swap",
                                 "run the migration as a member of that role, or take the "
                                 "table out of the publication before and add it back after"))
        reason = catalog.compiles_as_uuid(conn, key, key.table, where=published.row_filter) \
            if published.row_filter else ""
        if reason:
            found.append(Blocker(what, reason))
    for trigger in catalog.column_triggers(conn, key):
        reason = catalog.trigger_compiles(conn, key, trigger)
        if reason:
            found.append(Blocker(f"trigger {trigger.name}", reason,
                                 "rewrite its WHEN or column list so that it holds for the "
                                 "uuid column, or drop it before the migration and create it "
                                 "again after"))
    for statistics in catalog.statistics_on(conn, key):
        reason = catalog.compiles_as_uuid(conn, key, key.table, select=statistics.expressions) \
            if statistics.expressions else ""
        if reason:
            found.append(Blocker(f"statistics {statistics.name}", reason))
    return found
