"""Post-migration checks: one module behind ``validate_migration`` and ``verify``.

Every check only reads (it runs inside a read-only transaction when called
from ``verify``) and returns findings that name what was expected, what was
found, and up to 20 offending rows.  A check that cannot run, such as the
comparison with a backup that was cleaned up, is skipped with the reason,
never passed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog
from migration.catalog import ColumnState
from migration.log import LOG_TABLE
from migration.model import KeyColumn
from migration.plan import Plan
from migration.preflight import samples_query
from migration.report import SAMPLE_LIMIT, Finding, Status
from migration.sqlexpr import column_list


@dataclass(frozen=True)
class Context:
    cur: Cursor
    plan: Plan
    has_backup: bool
    active_runs: tuple[int, ...] = ()  # this process's own, still running, log rows


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
        if catalog.column_info(cur.connection, key.table, key.temp) is not None:
            left.append(f"column {key.table}.{key.temp}")
        cur.execute(
            """
            SELECT 'trigger ' || tgname FROM pg_trigger
            WHERE tgrelid = to_regclass(%(t)s) AND tgname = %(sync)s
            UNION ALL
            SELECT 'constraint ' || conname FROM pg_constraint
            WHERE conrelid = to_regclass(%(t)s) AND conname = %(not_null)s
            """,
            {"t": catalog.regclass(key.table), "sync": key.helper("sync"),
             "not_null": key.helper("not_null")},
        )
        left += [f"{text} on {key.table}" for (text,) in cur.fetchall()]
    cur.execute("SELECT 'invalid index ' || indexrelid::regclass::text FROM pg_index "
                "WHERE indrelid = ANY (%s::regclass[]) AND NOT (indisvalid AND indisready) "
                "ORDER BY 1", ([catalog.regclass(t) for t in ctx.plan.tables
                                if catalog.table_exists(cur.connection, t)],))
    left += [text for (text,) in cur.fetchall()]
    if not left:
        return _ok("no_leftovers", "no temporary columns, triggers, constraints or invalid indexes")
    return [Finding("no_leftovers", Status.FAIL, f"{len(left)} leftover object(s)",
                    count=len(left), samples=[{"object": o} for o in left],
                    expected="none", found=", ".join(left),
                    hint="run the interrupted operation again to finish it, or rollback")]


def primary_key(ctx: Context) -> list[Finding]:
    parent = ctx.plan.parent
    found = catalog.primary_key(ctx.cur.connection, parent.table)
    if found == [parent.column]:
        return _ok("primary_key", f"{parent.table} has its primary key on {parent.column}")
    return [Finding("primary_key", Status.FAIL, "primary key missing or on other columns",
                    subject=str(parent.table), expected=f"PRIMARY KEY ({parent.column})",
                    found=f"PRIMARY KEY ({', '.join(found)})" if found else "none",
                    hint="run migrate_users again to recreate it, or rollback")]


def foreign_keys(ctx: Context) -> list[Finding]:
    cur = ctx.cur
    parent = ctx.plan.parent
    if ctx.has_backup:
        expected = {(fk.table, fk.name): fk for fk in backup.saved_foreign_keys(cur)}
    else:
        expected = {(fk.table, fk.name): fk
                    for fk in catalog.foreign_keys_to(cur.connection, parent)}
    present = {(fk.table, fk.name): fk for fk in catalog.foreign_keys_to(cur.connection, parent)}
    problems = []
    for ident, want in sorted(expected.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        have = present.get(ident)
        name = f"{ident[0]}.{ident[1]}"
        if have is None:
            problems.append({"constraint": name, "problem": f"missing (want {want.definition})"})
        elif want.validated and not have.validated:
            problems.append({"constraint": name, "problem": "NOT VALID (convalidated = false)"})
    if not problems:
        return _ok("foreign_keys", f"{len(expected)} foreign key(s) to {parent} present"
                   + (" and validated" if expected else ""))
    return [Finding("foreign_keys", Status.FAIL, f"{len(problems)} foreign key problem(s)",
                    count=len(problems), samples=problems,
                    expected=f"every recorded FK to {parent} present and validated",
                    found="; ".join(f"{p['constraint']}: {p['problem']}" for p in problems),
                    hint="run migrate_foreign_keys again (it recreates and validates them)")]


def no_orphans(ctx: Context) -> list[Finding]:
    cur, parent = ctx.cur, ctx.plan.parent
    findings = []
    for key in ctx.plan.children:
        if catalog.column_state(cur.connection, key) is not ColumnState.UUID or \
                catalog.column_state(cur.connection, parent) is not ColumnState.UUID:
            continue  # reported by key_columns_uuid
        pk = catalog.primary_key(cur.connection, key.table)
        count, samples = samples_query(cur, key, pk, sql.SQL(
            "t.{c} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {p} p WHERE p.{pc} = t.{c})").format(
            c=sql.Identifier(key.column), p=parent.table.ident, pc=sql.Identifier(parent.column)))
        if count:
            findings.append(Finding("no_orphans", Status.FAIL,
                                    f"{count} row(s) refer to no {parent}", subject=str(key),
                                    count=count, samples=samples, expected="0", found=str(count),
                                    hint="restore the missing users or quarantine the rows; "
                                         "then add/validate the foreign key"))
    return findings or _ok("no_orphans", "every child row refers to an existing user")


def fk_indexes(ctx: Context) -> list[Finding]:
    cur, findings = ctx.cur, []
    for key in ctx.plan.children:
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
        names = [n for (n,) in cur.fetchall()]
        if not names or not _planner_uses_index(cur, key):
            findings.append(Finding(
                "fk_indexes", Status.FAIL,
                "no valid index leads with the column" if not names
                else "the planner does not use an index for a lookup by this column",
                subject=str(key), expected="a valid, ready index on the column, used by lookups",
                found=", ".join(names) or "none",
                hint="recreate the index (REINDEX or run migrate_foreign_keys again)"))
    return findings or _ok("fk_indexes", "every FK column has a valid index the planner uses")


def _planner_uses_index(cur: Cursor, key: KeyColumn) -> bool:
    """EXPLAIN a lookup by a sample key, sequential scans discouraged (tiny tables)."""
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
    plan_text = json.dumps(row[0] if row else [])
    return "Index" in plan_text


def backup_comparison(ctx: Context) -> list[Finding]:
    """row_counts and uuid_values, from one pass over each table and its backup."""
    if not ctx.has_backup:
        reason = f"no backup in {backup.SCHEMA} to compare with (cleaned up?)"
        return [Finding("row_counts", Status.SKIP, reason),
                Finding("uuid_values", Status.SKIP, reason)]
    cur, findings = ctx.cur, []
    keys_by_table: dict[Any, list[KeyColumn]] = {}
    for key in ctx.plan.columns:
        keys_by_table.setdefault(key.table, []).append(key)
    for table, keys in keys_by_table.items():
        findings += _compare_table(cur, table, keys)
    counts = [f for f in findings if f.check == "row_counts"]
    values = [f for f in findings if f.check == "uuid_values"]
    return (counts or _ok("row_counts", "row counts equal the backup's")) + \
        (values or _ok("uuid_values", "every key equals its original string cast to uuid"))


def _compare_table(cur: Cursor, table: Any, keys: list[KeyColumn]) -> list[Finding]:
    conn = cur.connection
    pk = catalog.primary_key(conn, table)
    converted = {k.column for k in keys if catalog.column_state(conn, k) is ColumnState.UUID}

    def as_uuid(alias: str, column: str) -> sql.Composable:
        """The backup's string cast to uuid where the live column is uuid now."""
        expr = sql.Identifier(alias, column)
        if column in converted and alias == "b":
            return sql.SQL("({})::uuid").format(expr)
        return expr

    join = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(as_uuid("b", p), as_uuid("l", p)) for p in pk)
    same = sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT DISTINCT FROM {}").format(as_uuid("b", k.column),
                                                     as_uuid("l", k.column)) for k in keys)
    quarantined = backup.quarantine_name(table)
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (quarantined.as_string(conn),))
    has_quarantine = bool((cur.fetchone() or [False])[0])
    not_quarantined = sql.SQL("true") if not has_quarantine else sql.SQL(
        "NOT EXISTS (SELECT 1 FROM {q} q WHERE {cond})").format(
        q=quarantined, cond=sql.SQL(" AND ").join(
            sql.SQL("q.{p} = b.{p}").format(p=sql.Identifier(p)) for p in pk))
    cur.execute(sql.SQL(
        """
        SELECT count(b.*) FILTER (WHERE {nq}), count(l.*),
               count(*) FILTER (WHERE l IS NULL AND {nq}) AS missing,
               count(*) FILTER (WHERE b IS NULL) AS extra,
               count(*) FILTER (WHERE NOT (b IS NULL) AND NOT (l IS NULL) AND NOT ({same})),
               (array_agg(to_jsonb(b) ORDER BY {bpk}) FILTER (
                    WHERE l IS NULL AND {nq}))[1:%(n)s],
               (array_agg(to_jsonb(l) ORDER BY {lpk}) FILTER (
                    WHERE b IS NULL OR NOT ({same})))[1:%(n)s]
        FROM {backup} b FULL JOIN {live} l ON {join}
        """).format(nq=not_quarantined, same=same, backup=backup.backup_name(table),
                    live=table.ident, join=join, bpk=column_list(pk, "b"),
                    lpk=column_list(pk, "l")),
        {"n": SAMPLE_LIMIT})
    row = cur.fetchone()
    assert row is not None
    expected_rows, live_rows, missing, extra, changed, lost, odd = row
    findings = []
    if expected_rows != live_rows:
        findings.append(Finding("row_counts", Status.FAIL,
                                f"{live_rows} rows, the backup has {expected_rows} "
                                "(quarantined rows excluded)", subject=str(table),
                                count=abs(expected_rows - live_rows),
                                samples=[{"missing": r} for r in (lost or [])],
                                expected=str(expected_rows), found=str(live_rows),
                                hint="compare with the backup; rollback restores it"))
    if missing or extra or changed:
        findings.append(Finding(
            "uuid_values", Status.FAIL,
            f"{missing} backup row(s) without their live row, {extra} live row(s) not in the "
            f"backup, {changed} key value(s) differing from the original cast to uuid",
            subject=str(table), count=missing + extra + changed,
            samples=[{"missing": r} for r in (lost or [])] + [{"live": r} for r in (odd or [])],
            expected="every row's keys equal the backup's strings cast to uuid",
            found=f"{missing + extra + changed} difference(s)",
            hint="investigate the listed rows; rollback restores the original data"))
    return findings


def migration_log(ctx: Context) -> list[Finding]:
    cur, log = ctx.cur, sql.Identifier(ctx.plan.schema, LOG_TABLE)
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (log.as_string(cur.connection),))
    if not (cur.fetchone() or [False])[0]:
        return [Finding("migration_log", Status.FAIL, "no migration_log table",
                        expected="a log of a completed migration", found="none",
                        hint="this database was not migrated with this tool")]
    cur.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {log} WHERE status = 'completed' AND operation IN "
        "('migrate_foreign_keys', 'full_migration')), "
        "(SELECT array_agg(format('%%s #%%s since %%s', operation, id, started_at) ORDER BY id) "
        " FROM {log} WHERE status = 'running' AND NOT id = ANY (%s))").format(log=log),
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


CHECKS: tuple[Check, ...] = (
    Check(key_columns_uuid, {
        "key_columns_uuid": "users.id and every column referencing it are uuid"}),
    Check(no_leftovers, {
        "no_leftovers": "no temporary columns, sync triggers, NOT NULL helpers or invalid "
                        "indexes remain"}),
    Check(primary_key, {"primary_key": "users has its primary key on id"}),
    Check(foreign_keys, {
        "foreign_keys": "every foreign key to users.id is present and validated"}),
    Check(no_orphans, {"no_orphans": "no child row refers to a missing user"}),
    Check(fk_indexes, {
        "fk_indexes": "each FK column has a valid index that a lookup by it uses"}),
    Check(backup_comparison, {
        "row_counts": "row counts equal the backup's, quarantined rows excepted",
        "uuid_values": "every key equals its original string from the backup cast to uuid"}),
    Check(migration_log, {
        "migration_log": "migration_log shows a completed migration and nothing unfinished"}),
)
CHECK_NAMES: dict[str, str] = {name: text for check in CHECKS
                               for name, text in check.describes.items()}


def run_checks(cur: Cursor, plan: Plan, *, only: set[str] | None = None,
               active_runs: list[int] | None = None) -> list[Finding]:
    """Run the checks (all, or those named in ``only``) and return their findings."""
    ctx = Context(cur, plan, backup.exists(cur), tuple(active_runs or ()))
    findings: list[Finding] = []
    for check in CHECKS:
        if only is not None and not only & check.describes.keys():
            continue
        findings += [f for f in check.run(ctx) if only is None or f.check in only]
        if check.run is key_columns_uuid and not catalog.table_exists(cur.connection,
                                                                      plan.parent.table):
            break  # nothing else can be looked at; the finding says the table is missing
    return findings
