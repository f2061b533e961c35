"""Post-migration checks: one module behind ``validate_migration`` and ``verify``.

Every check only reads (it runs inside a read-only transaction when called
from ``verify``) and returns findings that name what was expected, what was
found, and up to 20 offending rows.  A check that cannot run, such as the
comparison with a backup that was cleaned up, is skipped with the reason,
never passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, recorded
from migration.catalog import ColumnState
from migration.engine.fill import _STRING_CAST
from migration.log import LOG_TABLE, of_key, recorded_in_log
from migration.model import SHADOW_NAME, KeyColumn, Table
from migration.plan import Plan
from migration.recorded import Entry
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.rows import samples_query
from migration.snapshot import Opener, Read, Readers
from migration.sqlexpr import column_list

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    cur: Cursor
    plan: Plan
    has_backup: bool
    active_runs: tuple[int, ...] = ()  # this process's own, still running, log rows
    backup_unreadable: str | None = None  # why this role cannot read the backup (private)
    log_unreadable: str | None = None  # why this role cannot read migration_log
    readers: Readers | None = None  # the heavy reads side by side (None: on cur, in order)

    def read(self, reads: Sequence[Read[T]]) -> list[T]:
        """The results of ``reads``, in their order, all read in this transaction's snapshot."""
        return (self.readers or Readers(self.cur)).run(reads)


@dataclass(frozen=True)
class Check:
    run: Callable[[Context], list[Finding]]
    describes: dict[str, str]  # the names of the findings it makes, with their meaning


def _ok(name: str, message: str) -> list[Finding]:
    return [Finding(name, Status.PASS, message)]


def key_columns_uuid(ctx: Context) -> list[Finding]:
    bad = []
    for key in ctx.plan.columns:
        info = catalog.column_info(ctx.cur.connection, key.table, key.column)
        if info is None or info.type != "uuid":
            bad.append({"column": str(key), "type": info.type if info else "missing"})
    if not bad:
        return _ok("key_columns_uuid", f"{len(ctx.plan.columns)} key columns are uuid")
    return [Finding("key_columns_uuid", Status.FAIL, f"{len(bad)} key column(s) are not uuid",
                    count=len(bad), samples=bad, expected="uuid",
                    found=", ".join(f"{b['column']}: {b['type']}" for b in bad),
                    hint="finish the migration: run migrate_users / migrate_foreign_keys")]


def no_leftovers(ctx: Context) -> list[Finding]:
    cur, left = ctx.cur, []
    for key in ctx.plan.columns:
        if not catalog.table_exists(cur.connection, key.table):
            continue
        left += [f"column {key.table}.{copy.temp}" for copy in (key, key.reversed())
                 if catalog.column_info(cur.connection, key.table, copy.temp) is not None]
        cur.execute(
            """
            SELECT 'trigger ' || tgname FROM pg_trigger
            WHERE tgrelid = to_regclass(%(t)s) AND tgname = %(sync)s
            UNION ALL
            SELECT 'constraint ' || conname FROM pg_constraint
            WHERE conrelid = to_regclass(%(t)s)
              AND (conname IN (%(filled)s, %(not_null)s) OR conname ~ %(shadow)s)
            UNION ALL
            SELECT 'index ' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = to_regclass(%(t)s)
              AND (c.relname ~ %(shadow)s OR c.relname = %(invalid)s)
            """,
            {"t": catalog.regclass(key.table), "sync": key.helper("sync"),
             "filled": key.helper("filled"), "not_null": key.helper("not_null"),
             "shadow": SHADOW_NAME, "invalid": key.invalid_index},
        )
        left += [f"{text} on {key.table}" for (text,) in cur.fetchall()]
    cur.execute("SELECT 'invalid index ' || indexrelid::regclass::text FROM pg_index "
                "WHERE indrelid = ANY (%s::regclass[]) AND NOT (indisvalid AND indisready) "
                "ORDER BY 1", ([catalog.regclass(t) for t in ctx.plan.tables
                                if catalog.table_exists(cur.connection, t)],))
    left += [text for (text,) in cur.fetchall()]
    if not left:
        return _ok("no_leftovers", "no temporary columns, triggers, constraints, copies of "
                   "indexes or foreign keys, or invalid indexes")
    return [Finding("no_leftovers", Status.FAIL, f"{len(left)} leftover object(s)",
                    count=len(left), samples=[{"object": o} for o in left],
                    expected="none", found=", ".join(left),
                    hint="run the interrupted operation again to finish it, or rollback")]


def recorded_expectations(ctx: Context) -> dict[str, Any] | None:
    """What backup_data recorded: the backup's own record (committed with the copy) while
    the backup exists and this role can read it, else the one the last completed
    backup_data left in migration_log (it outlives the backup).

    A record of an older version has no ``key_columns``: the backup's table of
    them, which every version wrote, stands in while it exists.
    """
    readable = ctx.has_backup and ctx.backup_unreadable is None
    record = backup.saved_record(ctx.cur, ctx.plan.backup_schema) if readable else None
    if record is None and ctx.log_unreadable is None:
        record = recorded_in_log(ctx.cur, ctx.plan.schema, ctx.plan.key)
    if record is not None and recorded.KEY_COLUMNS.key not in record and readable:
        record = {**record, recorded.KEY_COLUMNS.key: _saved_key_columns(ctx)}
    return record


def _saved_key_columns(ctx: Context) -> list[Entry]:
    """The key columns as the backup's ``key_columns`` table holds them, as record entries."""
    ctx.cur.execute(sql.SQL("SELECT table_schema, table_name, column_name, type, not_null, "
                            "default_expr FROM {} ORDER BY 1, 2, 3").format(
        backup.meta(ctx.plan.backup_schema, "key_columns")))
    return [{"table": str(Table(schema, table)), "column": column, "type": type_,
             "not_null": not_null, "default": default}
            for schema, table, column, type_, not_null, default in ctx.cur.fetchall()]


@dataclass(frozen=True)
class Comparison:
    """How one check judges a kind of recorded object against what is there now."""

    check: str
    kind: recorded.Kind
    what: str  # "index", "foreign key", ...
    describe: Callable[[Entry], str]  # a recorded or current state, as people read it
    judge: Callable[[Entry, Entry], bool]  # (recorded, now): is now what the record wants?
    want: Callable[[Entry], str]  # the expected state, from the recorded one
    hint: str


def _same(want: Entry, have: Entry) -> bool:
    """Whether the object is as recorded: every property the record holds (a record made
    by an older version, which recorded fewer of them, is judged on those it has)."""
    return all(key in have and have[key] == value for key, value in want.items())


def _against_record(ctx: Context, how: Comparison) -> list[Finding]:
    """One FAIL per recorded object that is gone or changed, with what was wanted and found.

    Nothing recorded is no pass: SKIP with the reason while the plan's tables
    exist, FAIL when they do not either (there is nothing to check against).
    """
    record = recorded_expectations(ctx) or {}
    entries = record.get(how.kind.key)
    if entries is None:
        return _nothing_recorded(ctx, how.check, how.kind.key)
    tables = record.get("tables")  # absent from the records of older versions (FKs only)
    findings = [Finding(how.check, Status.SKIP, "not in the record (added to the plan after "
                        "backup_data?): nothing to compare with", subject=str(table))
                for table in ctx.plan.tables if tables is not None and str(table) not in tables]
    for entry in entries:
        identity, want = how.kind.split(entry)
        have = how.kind.now(ctx.cur, identity)
        if have is not None and how.judge(want, have):
            continue
        subject = " ".join(str(identity[k]) for k in how.kind.identity)
        findings.append(Finding(
            how.check, Status.FAIL, f"{how.what} {'missing' if have is None else 'changed'} "
            "since the backup", subject=subject, expected=how.want(want),
            found="none" if have is None else how.describe(have), hint=how.hint))
    compared = f"{len(entries)} recorded {how.what}(s) as before the migration"
    if not any(f.status is Status.FAIL for f in findings):
        return _ok(how.check, compared) + findings
    return findings


def _nothing_recorded(ctx: Context, check: str, kind: str) -> list[Finding]:
    """No record of ``kind``: skipped with the reason when this role cannot read it; a
    failure while a backup exists that it can read (the backup is never without its
    record), or when the plan's tables are missing too."""
    if ctx.has_backup and ctx.backup_unreadable is not None:
        return [Finding(check, Status.SKIP, "the record of the tables cannot be read: "
                        + ctx.backup_unreadable)]
    if ctx.has_backup:
        return [Finding(check, Status.FAIL,
                        f"nothing recorded to compare with: the backup in "
                        f"{ctx.plan.backup_schema} holds no record of {kind}, and "
                        f"{ctx.plan.schema}.{LOG_TABLE} has none either",
                        expected=f"the record of {kind} backup_data keeps with the backup",
                        found="none",
                        hint="run backup_data again: it completes the record while the tables "
                             "are as the backup holds them (after a rollback, if the "
                             "migration is under way)")]
    if ctx.log_unreadable is not None:
        return [Finding(check, Status.SKIP, "the record of the tables cannot be read: "
                        + ctx.log_unreadable)]
    missing = [str(t) for t in ctx.plan.tables if not catalog.table_exists(ctx.cur.connection, t)]
    reason = (f"nothing recorded to compare with: no completed backup_data in "
              f"{ctx.plan.schema}.{LOG_TABLE} that recorded {kind}")
    if not missing:
        return [Finding(check, Status.SKIP, reason)]
    return [Finding(check, Status.FAIL, f"{reason}, and table(s) missing",
                    expected="the plan's tables, and a record of them from backup_data",
                    found=f"missing: {', '.join(missing)}",
                    hint="this database was not migrated with this tool, or not in this schema "
                         "(--schema)")]


def _index_text(state: Entry) -> str:
    flags = [] if state["valid"] else ["INVALID"]
    flags += [] if state["ready"] else ["not ready"]
    where = f" TABLESPACE {state['tablespace']}" if state.get("tablespace") else ""
    return f"{state['definition']}{where}" + (f" ({', '.join(flags)})" if flags else "")


def _foreign_key_text(state: Entry) -> str:
    return f"{state['definition']}{'' if state['validated'] else recorded.NOT_VALID}"


_REPLICA_IDENTITY = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _replica_identity_text(state: Entry) -> str:
    text = f"{_REPLICA_IDENTITY.get(state['mode'], state['mode'])}"
    return f"{text} {state['index'] or '(no index flagged)'}" if state["mode"] == "i" else text


def _publication_text(state: Entry) -> str:
    columns = "all columns" if state["columns"] is None else f"({', '.join(state['columns'])})"
    return columns + (f" WHERE {state['row_filter']}" if state["row_filter"] else "")


def _policy_text(state: Entry) -> str:
    text = (f"{'PERMISSIVE' if state['permissive'] == 'PERMISSIVE' else 'RESTRICTIVE'} "
            f"FOR {state['command']} TO {', '.join(state['roles'])}")
    text += f" USING ({state['qual']})" if state["qual"] is not None else ""
    return text + (f" WITH CHECK ({state['with_check']})" if state["with_check"] else "")


def _statistics_text(state: Entry) -> str:
    extras = [f"owner {state['owner']}"]
    extras += [] if state["target"] is None else [f"statistics target {state['target']}"]
    extras += [] if state["comment"] is None else [f"comment {state['comment']!r}"]
    kinds = {"d": "ndistinct", "f": "dependencies", "m": "mcv", "e": "expressions"}
    what = ", ".join([*state["columns"], *(state["expressions"] or [])])
    return (f"({', '.join(kinds.get(kind, kind) for kind in state['kinds'])}) ON {what} "
            f"({'; '.join(extras)})")


def _view_text(state: Entry) -> str:
    options = f"WITH ({', '.join(state['options'])}) " if state["options"] else ""
    return (f"{options}AS {state['definition']}"
            + ("" if state["works"] else " (a SELECT from it fails)"))


def _primary_key_text(state: Entry) -> str:
    return "none" if state["name"] is None else f"CONSTRAINT {state['name']} {state['definition']}"


def _not_null_text(state: Entry) -> str:
    return "NOT NULL" if state["not_null"] else "NULL allowed (no NOT NULL)"


def _default_text(state: Entry) -> str:
    return "no default" if state["default"] is None else f"DEFAULT {state['default']}"


def _defaults_allowed(recorded_default: str | None, type_now: str) -> set[str | None]:
    """The defaults a key column may have now: the recorded one while it has its string
    type, and as the swap converts it (``fill.converted_default_statement``) once it is uuid:
    ``(X)::text`` becomes ``X``, or any other ``R`` becomes ``(R)::uuid``."""
    if recorded_default is None or type_now != "uuid":
        return {recorded_default}
    cast = _STRING_CAST.match(recorded_default)
    return {f"({recorded_default})::uuid", *([cast["inner"]] if cast else [])}


def _wanted_default_text(state: Entry) -> str:
    if state["default"] is None:
        return "no default"
    wanted = sorted(str(d) for d in _defaults_allowed(state["default"], "uuid"))
    return f"DEFAULT {state['default']} (as uuid: DEFAULT {' or '.join(wanted)})"


COMPARISONS = {
    "primary_key": Comparison(
        "primary_key", recorded.PRIMARY_KEYS, "primary key", _primary_key_text, _same,
        _primary_key_text, "run the interrupted operation again to recreate it, or rollback"),
    "indexes": Comparison(
        "indexes", recorded.INDEXES, "index", _index_text,
        lambda want, have: (have["definition"] == want["definition"]
                            and have.get("tablespace") == want.get("tablespace")
                            and have["valid"] and have["ready"]),
        lambda want: _index_text({**want, "valid": True, "ready": True}),
        "recreate it from the recorded definition (CREATE INDEX CONCURRENTLY, or REINDEX "
        "an invalid one), or rollback"),
    "foreign_keys": Comparison(
        "foreign_keys", recorded.FOREIGN_KEYS, "foreign key", _foreign_key_text,
        lambda want, have: (have["definition"] == want["definition"]
                            and (have["validated"] or not want["validated"])),
        _foreign_key_text,
        "run migrate_foreign_keys again (it recreates and validates them), or recreate it "
        "from the recorded definition"),
    "replica_identity": Comparison(
        "replica_identity", recorded.REPLICA_IDENTITY, "replica identity",
        _replica_identity_text, _same, _replica_identity_text,
        "ALTER TABLE ... REPLICA IDENTITY as recorded, before logical replication needs it"),
    "publications": Comparison(
        "publications", recorded.PUBLICATIONS, "publication membership", _publication_text,
        _same, _publication_text,
        "ALTER PUBLICATION ... ADD TABLE (or SET TABLE) as recorded; subscribers may need "
        "ALTER SUBSCRIPTION ... REFRESH PUBLICATION"),
    "views": Comparison(
        "views", recorded.VIEWS, "view", _view_text, _same, _view_text,
        "create the view again as recorded (CREATE OR REPLACE VIEW), or rollback"),
    "statistics": Comparison(
        "statistics", recorded.STATISTICS, "statistics object", _statistics_text, _same,
        _statistics_text, "create it again as recorded (CREATE STATISTICS), then ANALYZE"),
    "policies": Comparison(
        "policies", recorded.POLICIES, "policy", _policy_text, _same, _policy_text,
        "recreate the policy as recorded (CREATE POLICY)"),
    "not_null": Comparison(
        "not_null", recorded.KEY_COLUMNS, "key column's NOT NULL", _not_null_text,
        lambda want, have: have["not_null"] == want["not_null"], _not_null_text,
        "ALTER TABLE ... ALTER COLUMN ... SET NOT NULL (or DROP NOT NULL) as recorded"),
    "defaults": Comparison(
        "defaults", recorded.KEY_COLUMNS, "key column's default", _default_text,
        lambda want, have: have["default"] in _defaults_allowed(want["default"], have["type"]),
        _wanted_default_text,
        "ALTER TABLE ... ALTER COLUMN ... SET DEFAULT (or DROP DEFAULT) as recorded"),
}


def no_orphans(ctx: Context) -> list[Finding]:
    cur, parent = ctx.cur, ctx.plan.parent
    parent_uuid = catalog.column_state(cur.connection, parent) is ColumnState.UUID
    skipped: dict[KeyColumn, Finding] = {}
    reads: list[Read[tuple[int, list[dict[str, Any]]]]] = []
    for key in ctx.plan.children:
        if not parent_uuid or catalog.column_state(cur.connection, key) is not ColumnState.UUID:
            skipped[key] = Finding("no_orphans", Status.SKIP,
                                   f"{key} or {parent} is not uuid (see key_columns_uuid)",
                                   subject=str(key))
            continue
        pk = catalog.primary_key(cur.connection, key.table) or [key.column]
        reads.append(Read(str(key.table), partial(samples_query, key=key, pk=pk, where=sql.SQL(
            "t.{c} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {p} p WHERE p.{pc} = t.{c})").format(
            c=sql.Identifier(key.column), p=parent.table.ident,
            pc=sql.Identifier(parent.column)))))
    counted = iter(ctx.read(reads))
    findings = []
    for key in ctx.plan.children:
        if key in skipped:
            findings.append(skipped[key])
            continue
        count, samples = next(counted)
        if count:
            findings.append(Finding("no_orphans", Status.FAIL,
                                    f"{count} row(s) refer to no {parent}", subject=str(key),
                                    count=count, samples=samples, expected="0", found=str(count),
                                    hint="restore the missing users or quarantine the rows; "
                                         "then add/validate the foreign key"))
    return findings or _ok("no_orphans", "every child row refers to an existing user")


def fk_indexes(ctx: Context) -> list[Finding]:
    """Advice, never a failure: a child column no lookup by it can use an index for.

    Losing an index is the ``indexes`` check's to report; a column that had
    only a partial index, or one where it is not first, before the migration
    has the same after it, and nothing the migration does would change that.
    """
    cur, findings = ctx.cur, []
    for key in ctx.plan.children:
        if not catalog.table_exists(cur.connection, key.table):
            findings.append(Finding("fk_indexes", Status.SKIP, "the table is missing "
                                    "(see key_columns_uuid)", subject=str(key)))
            continue
        leading = _indexes_leading_with(cur, key)
        used = _indexes_used_by_lookup(cur, key) & set(leading) if leading else set()
        if not used:
            findings.append(Finding(
                "fk_indexes", Status.WARN,
                "no index leads with the column" if not leading
                else "a lookup by the column uses none of its indexes", subject=str(key),
                expected="an index a lookup by the column uses",
                found=", ".join(leading) or "none",
                hint="consider CREATE INDEX CONCURRENTLY on the column: lookups by it and "
                     f"ON DELETE actions on {ctx.plan.parent.table} scan the table"))
    return _ok("fk_indexes", "checked which FK columns a lookup finds by index") + findings


def _indexes_leading_with(cur: Cursor, key: KeyColumn) -> list[str]:
    """Valid, ready indexes whose first column is the key column, partial ones last."""
    cur.execute(
        """
        SELECT ic.relname FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = to_regclass(%s) AND a.attname = %s
          AND i.indisvalid AND i.indisready
        ORDER BY i.indpred IS NOT NULL, ic.relname
        """,
        (catalog.regclass(key.table), key.column),
    )
    return [name for (name,) in cur.fetchall()]


def _indexes_used_by_lookup(cur: Cursor, key: KeyColumn) -> set[str]:
    """The indexes in the plan of a lookup by a sample key, sequential scans discouraged.

    The caller compares them with the column's own indexes: "some index" is
    not enough, as an index where the column is not first can serve the
    lookup by scanning the whole index, which is all a disabled seq scan asks.
    """
    cur.execute("SAVEPOINT explain_lookup")
    cur.execute("SET LOCAL enable_seqscan = off")
    cur.execute(sql.SQL("SELECT {c} FROM {t} WHERE {c} IS NOT NULL LIMIT 1").format(
        c=sql.Identifier(key.column), t=key.table.ident))
    sample = cur.fetchone()
    cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT * FROM {t} WHERE {c} = %s").format(
        c=sql.Identifier(key.column), t=key.table.ident),
        (sample[0] if sample else "00000000-0000-0000-0000-000000000000",))
    row = cur.fetchone()
    cur.execute("ROLLBACK TO SAVEPOINT explain_lookup")
    cur.execute("RELEASE SAVEPOINT explain_lookup")
    return set(_index_names(row[0] if row else []))


def _index_names(node: Any) -> list[str]:
    """Every "Index Name" in an EXPLAIN (FORMAT JSON) tree."""
    if isinstance(node, list):
        return [name for item in node for name in _index_names(item)]
    if not isinstance(node, dict):
        return []
    own = [node["Index Name"]] if "Index Name" in node else []
    return own + [name for value in node.values() for name in _index_names(value)]


def backup_comparison(ctx: Context) -> list[Finding]:
    """row_counts and uuid_values, from one pass over each table and its backup: each
    relation's digest, and the rows of a table whose digests differ, read side by side."""
    if not ctx.has_backup or ctx.backup_unreadable is not None:
        reason = ctx.backup_unreadable or (f"no backup in {ctx.plan.backup_schema} to compare "
                                           "with (cleaned up?)")
        return [Finding("row_counts", Status.SKIP, reason),
                Finding("uuid_values", Status.SKIP, reason)]
    cur, findings = ctx.cur, []
    keys_by_table: dict[Table, list[KeyColumn]] = {}
    for key in ctx.plan.columns:
        keys_by_table.setdefault(key.table, []).append(key)
    prepared = [_compare_table(cur, ctx.plan.backup_schema, table, keys)
                for table, keys in keys_by_table.items()]
    compared = [p for p in prepared if isinstance(p, _TableComparison)]
    digests = iter(ctx.read([
        Read(relation.as_string(cur), partial(backup.row_digest, relation=relation,
                                              values=c.values, log=c.log))
        for c in compared for relation in c.relations]))
    differ = [c for c in compared
              if not _digests_agree(*(next(digests) for _ in c.relations))]
    rows = dict(zip([c.table for c in differ],
                    ctx.read([Read(str(c.table), partial(_compare_rows, comparison=c))
                              for c in differ]), strict=True))
    for table_comparison in prepared:
        if isinstance(table_comparison, _TableComparison):
            findings += table_comparison.changed + rows.get(table_comparison.table, [])
        else:
            findings += table_comparison
    changed = [f for f in findings if f.status in (Status.INFO, Status.WARN)]
    counts = [f for f in findings if f.check == "row_counts" and f not in changed]
    values = [f for f in findings if f.check == "uuid_values"]
    return (counts or _ok("row_counts", "row counts equal the backup's")) + \
        (values or _ok("uuid_values", "every key equals its original string cast to uuid")) + \
        changed


@dataclass(frozen=True)
class _TableComparison:
    """One table's comparison, prepared by the checking transaction (``_compare_table``)."""

    table: Table
    compared: list[str]  # the columns compared
    values: sql.Composable  # those columns as comparable values, of the row aliased r
    relations: list[sql.Identifier]  # the backup copy, the live table, the quarantine if any
    log: backup.ChangeLog
    changed: list[Finding]  # what the change log says the application wrote


def _compare_table(cur: Cursor, schema: str, table: Table,
                   keys: list[KeyColumn]) -> _TableComparison | list[Finding]:
    """The comparison of the live table with its backup and quarantine, its reads to run
    side by side (digests first, rows if they differ, ``_compare_rows``), or the findings
    that say why there is none.

    Rows are matched on their primary key and key columns (the backup's
    strings cast to uuid where the live column is uuid now); a table without
    a primary key is compared as a multiset of its keys.  A backup row no
    live row matches is missing (row_counts); a live row no backup row
    matches has a key that is not its original (uuid_values).  Quarantined
    rows are expected to be missing.  Rows the application wrote since the
    backup (in the change log) are left out on both sides and reported as
    INFO: the other checks (key type, orphans, constraints) cover them.
    """
    conn = cur.connection
    copy, quarantined = backup.backup_name(schema, table), backup.quarantine_name(schema, table)
    if not catalog.relation_exists(cur.connection, copy):
        reason = f"the backup has no copy of {table} (added to the plan after the backup?)"
        return [Finding(check, Status.SKIP, reason, subject=str(table))
                for check in ("row_counts", "uuid_values")]
    if not catalog.table_exists(conn, table):
        return [Finding("row_counts", Status.FAIL, "the table is missing", subject=str(table),
                        expected="the table, with the backup's rows", found="no table",
                        hint="restore it: rollback recreates the data from the backup"),
                Finding("uuid_values", Status.SKIP, "the table is missing", subject=str(table))]
    states = {k.column: catalog.column_state(conn, k) for k in keys}
    present = [c for c, state in states.items() if state is not ColumnState.MISSING]
    compared = list(dict.fromkeys([*catalog.primary_key(conn, table), *present]))

    values = sql.SQL(", ").join(
        sql.SQL("({})::uuid" if states.get(c) is ColumnState.UUID
                else "({})::text").format(sql.Identifier("r", c)) for c in compared)
    relations = [copy, table.ident]
    if catalog.relation_exists(cur.connection, quarantined):
        relations.append(quarantined)
    log = backup.change_log(cur, schema, table, keys)
    return _TableComparison(table, compared, values, relations, log,
                            _changed_by_application(cur, log))


def _compare_rows(cur: Cursor, comparison: _TableComparison) -> list[Finding]:
    """The rows of a table whose digests differ from its backup's, compared: the failures
    naming them."""
    table, compared, values, log = (comparison.table, comparison.compared, comparison.values,
                                    comparison.log)
    relations = comparison.relations
    copy, quarantined = relations[0], relations[-1]  # the quarantine: when there are three

    def side(relation: sql.Identifier, tally: tuple[int, int, int]) -> sql.Composable:
        """One side of the union: the compared columns as comparable values, and what the
        row counts for: (backup, quarantine, live); rows in the change log left out."""
        return sql.SQL("SELECT {}, {} FROM {} r WHERE NOT {}").format(
            values, sql.SQL(", ").join(map(sql.Literal, tally)), relation, log.holds("r"))

    sides = [side(copy, (1, 0, 0)), side(table.ident, (0, 0, 1))]
    if len(relations) == 3:
        sides.append(side(quarantined, (0, 1, 0)))
    cols = column_list(compared)
    row_json = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(c)) for c in compared))
    cur.execute(sql.SQL(
        """
        WITH {logged}
        SELECT coalesce(sum(nb), 0)::bigint, coalesce(sum(nq), 0)::bigint,
               coalesce(sum(nl), 0)::bigint,
               coalesce(sum(nb - nq - nl) FILTER (WHERE nb - nq > nl), 0)::bigint,
               coalesce(sum(nl - nb + nq) FILTER (WHERE nl > nb - nq), 0)::bigint,
               (array_agg({row_json} ORDER BY {cols}) FILTER (WHERE nb - nq > nl))[1:%(n)s],
               (array_agg({row_json} ORDER BY {cols}) FILTER (WHERE nl > nb - nq))[1:%(n)s]
        FROM (SELECT {cols}, sum(nb) AS nb, sum(nq) AS nq, sum(nl) AS nl
              FROM ({sides}) AS u ({cols}, nb, nq, nl)
              GROUP BY {cols}) AS g
        """).format(cols=cols, sides=sql.SQL(" UNION ALL ").join(sides), row_json=row_json,
                    logged=log.cte()),
        {"n": SAMPLE_LIMIT, **log.params})
    row = cur.fetchone()
    assert row is not None
    backup_rows, quarantine_rows, live_rows, missing, extra, lost, odd = row
    expected_rows = backup_rows - quarantine_rows
    findings = []
    if expected_rows != live_rows:
        findings.append(Finding(
            "row_counts", Status.FAIL, f"{live_rows} rows, the backup has {expected_rows} "
            "(quarantined rows excluded)", subject=str(table), count=missing + extra,
            samples=([{"missing": r} for r in lost or []]
                     + [{"not in backup": r} for r in odd or []])[:SAMPLE_LIMIT],
            expected=str(expected_rows), found=str(live_rows),
            hint="compare with the backup; rollback restores it"))
    if extra:
        findings.append(Finding(
            "uuid_values", Status.FAIL,
            f"{extra} live row(s) whose keys are not the backup's strings cast to uuid",
            subject=str(table), count=extra,
            samples=([{"live": r} for r in odd or []]
                     + [{"backup": r} for r in lost or []])[:SAMPLE_LIMIT],
            expected="every row's keys equal the backup's strings cast to uuid",
            found=f"{extra} row(s) differ" + (f", {missing} backup row(s) unmatched"
                                              if missing else ""),
            hint="investigate the listed rows; rollback restores the original data"))
    return findings


def _changed_by_application(cur: Cursor, log: backup.ChangeLog) -> list[Finding]:
    """The INFO finding naming how many rows the change log holds for the table, or that the
    application truncated it, and a WARN naming the logged keys that are not UUIDs."""
    cur.execute(sql.SQL("WITH {} SELECT count(*) FILTER (WHERE NOT truncated), "
                        "coalesce(bool_or(truncated), false) FROM logged").format(log.cte()),
                log.params)
    changed, truncated = cur.fetchone() or (0, False)
    findings = []
    if truncated:
        findings.append(Finding(
            "row_counts", Status.INFO, "truncated by the application since the backup "
            f"(TRUNCATE in the change log), {changed} rows changed since: checked, not "
            "compared", subject=str(log.table), count=int(changed)))
    elif changed:
        findings.append(Finding("row_counts", Status.INFO,
                                f"{changed} rows changed by the application since the backup: "
                                "checked, not compared", subject=str(log.table),
                                count=int(changed)))
    odd, keys = log.not_uuids(cur)
    if odd:
        findings.append(Finding(
            "row_counts", Status.WARN, f"{odd} key(s) in the change log are not UUIDs: the "
            "application wrote them since the backup; they match no row", subject=str(log.table),
            count=odd, samples=keys,
            hint="find out which client writes such ids (validate_schema names any row "
                 "holding one)"))
    return findings


def _digests_agree(backup_copy: tuple[int, int], live: tuple[int, int],
                   quarantined: tuple[int, int] = (0, 0)) -> bool:
    """Whether backup minus quarantine and live hold the same multiset of compared rows,
    by their digests (``backup.row_digest``).

    Each side is reduced to its row count and the sum of a 64-bit hash of each
    row's compared values: one scan per relation, where matching the rows
    themselves groups both tables together (at 1M users the journal's 6M rows
    took 17 s, spilling to disk).  A difference that leaves both equal would
    need a 64-bit hash collision; any disagreement falls through to the
    row-by-row comparison, which finds and names the rows.
    """
    (backup_rows, backup_sum), (live_rows, live_sum), (gone_rows, gone_sum) = (
        backup_copy, live, quarantined)
    return (backup_rows - gone_rows, backup_sum - gone_sum) == (live_rows, live_sum)


def backup_private(ctx: Context) -> list[Finding]:
    """Nobody but its owner may use the backup: it holds every original id and quarantined
    row.  Reads the catalog only, so a read-only role can run it."""
    if not ctx.has_backup:
        return [Finding("backup_private", Status.SKIP,
                        f"no backup in {ctx.plan.backup_schema} (cleaned up?)")]
    shared = backup.shared_privileges(ctx.cur, ctx.plan.backup_schema)
    if not shared:
        return _ok("backup_private",
                   f"only the owner has privileges on {ctx.plan.backup_schema}")
    return [Finding("backup_private", Status.FAIL,
                    f"{len(shared)} grant(s) on the backup to others than its owner",
                    count=len(shared), samples=[{"object": p.target,
                                                 "grantee": p.grantee or "PUBLIC",
                                                 "privileges": p.privilege} for p in shared],
                    expected="privileges for the owner only",
                    found="; ".join(f"{p.grantee or 'PUBLIC'}: {p.privilege} on {p.target}"
                                    for p in shared),
                    hint=f"REVOKE ALL ON SCHEMA {ctx.plan.backup_schema} and ON ALL TABLES IN "
                         f"SCHEMA {ctx.plan.backup_schema} FROM each grantee listed")]


def migration_log(ctx: Context) -> list[Finding]:
    cur, log = ctx.cur, sql.Identifier(ctx.plan.schema, LOG_TABLE)
    if not catalog.relation_exists(cur.connection, log):
        return [Finding("migration_log", Status.FAIL, "no migration_log table",
                        expected="a log of a completed migration", found="none",
                        hint="this database was not migrated with this tool")]
    if ctx.log_unreadable is not None:
        return [Finding("migration_log", Status.SKIP, ctx.log_unreadable)]
    cur.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {log} WHERE status = 'completed' AND operation IN "
        "('migrate_foreign_keys', 'full_migration') AND {mine}), "
        "(SELECT array_agg(format('%%s #%%s since %%s', operation, id, started_at) ORDER BY id) "
        " FROM {log} WHERE status = 'running' AND NOT id = ANY (%s))").format(
        log=log, mine=of_key(cur.connection, ctx.plan.schema, ctx.plan.key)),
        (list(ctx.active_runs),))
    row = cur.fetchone()
    assert row is not None
    completed, unfinished = row
    if unfinished:
        return [Finding("migration_log", Status.FAIL,
                        f"{len(unfinished)} unfinished operation(s) in migration_log",
                        count=len(unfinished), samples=[{"run": u} for u in unfinished],
                        expected="no running operation", found="; ".join(unfinished),
                        hint="run data-migration --operation=status, then resume the operation")]
    if not completed:
        return [Finding("migration_log", Status.FAIL, "no completed migration in migration_log",
                        expected="a completed migrate_foreign_keys or full_migration",
                        found="none", hint="run the migration")]
    return _ok("migration_log", "a completed migration, no unfinished operation")


def _compare(check: str) -> Callable[[Context], list[Finding]]:
    return partial(_against_record, how=COMPARISONS[check])


CHECKS: tuple[Check, ...] = (
    Check(key_columns_uuid, {
        "key_columns_uuid": "users.id and every column referencing it are uuid"}),
    Check(no_leftovers, {
        "no_leftovers": "no temporary columns, sync triggers, fill or NOT NULL proofs, copies "
                        "of indexes or foreign keys, or invalid indexes remain"}),
    Check(_compare("primary_key"), {
        "primary_key": "every table of the plan has the primary key recorded by backup_data "
                       "(name and definition)"}),
    Check(_compare("indexes"), {
        "indexes": "every index recorded on a key column exists, with the same name and "
                   "definition, valid and ready"}),
    Check(_compare("foreign_keys"), {
        "foreign_keys": "every foreign key recorded to or from a key column exists with the "
                        "same definition (ON DELETE/UPDATE included), validated"}),
    Check(_compare("replica_identity"), {
        "replica_identity": "each table's replica identity (and its index) is the recorded one"}),
    Check(_compare("publications"), {
        "publications": "each table is in the recorded publications, with the same column "
                        "lists and row filters"}),
    Check(_compare("views"), {
        "views": "each recorded view over a key column exists with the same definition and "
                 "options, and a SELECT from it runs"}),
    Check(_compare("statistics"), {
        "statistics": "each recorded statistics object over a key column exists with the same "
                      "definition, target, owner and comment"}),
    Check(_compare("policies"), {
        "policies": "each recorded row level security policy exists unchanged"}),
    Check(_compare("not_null"), {
        "not_null": "each key column is NOT NULL, or not, as recorded by backup_data"}),
    Check(_compare("defaults"), {
        "defaults": "each key column has the recorded default (gen_random_uuid()::text become "
                    "gen_random_uuid() on uuid), or none as recorded"}),
    Check(no_orphans, {"no_orphans": "no child row refers to a missing user"}),
    Check(fk_indexes, {
        "fk_indexes": "advice (warnings only): which FK columns a lookup cannot find by index"}),
    Check(backup_comparison, {
        "row_counts": "row counts equal the backup's, quarantined rows excepted",
        "uuid_values": "every key equals its original string from the backup cast to uuid"}),
    Check(backup_private, {
        "backup_private": "only its owner has privileges on the backup schema and its "
                          "tables"}),
    Check(migration_log, {
        "migration_log": "migration_log shows a completed migration and nothing unfinished"}),
)
CHECK_NAMES: dict[str, str] = {name: text for check in CHECKS
                               for name, text in check.describes.items()}


def _log_unreadable(cur: Cursor, plan: Plan) -> str | None:
    """Why this role cannot read migration_log (private to the migrating role, as the
    backup is); None when it can, or when there is no log."""
    log = sql.Identifier(plan.schema, LOG_TABLE)
    if not catalog.relation_exists(cur.connection, log):
        return None
    cur.execute("SELECT current_user, pg_get_userbyid(relowner), "
                "has_table_privilege(oid, 'SELECT') FROM pg_class WHERE oid = to_regclass(%s)",
                (log.as_string(cur.connection),))
    row = cur.fetchone()
    if row is None or row[2]:
        return None
    return (f"{plan.schema}.{LOG_TABLE} is private to {row[1]}: role {row[0]} has no SELECT "
            f"on it; run verify as {row[1]} for this check")


def run_checks(cur: Cursor, plan: Plan, *, only: set[str] | None = None,
               active_runs: list[int] | None = None, jobs: int = 1,
               opener: Opener | None = None) -> list[Finding]:
    """Run the checks (all, or those named in ``only``) and return their findings.

    ``cur``'s transaction must be REPEATABLE READ: with ``jobs`` above one, the heavy reads
    run side by side on connections ``opener`` opens, which read its snapshot
    (``migration/snapshot.py``)."""
    has_backup = backup.exists(cur, plan.backup_schema)
    with Readers(cur, jobs, opener) as readers:
        ctx = Context(cur, plan, has_backup, tuple(active_runs or ()),
                      backup.unreadable(cur, plan.backup_schema) if has_backup else None,
                      _log_unreadable(cur, plan), readers)
        findings: list[Finding] = []
        for check in CHECKS:
            if only is not None and not only & check.describes.keys():
                continue
            findings += [f for f in check.run(ctx) if only is None or f.check in only]
    return findings
