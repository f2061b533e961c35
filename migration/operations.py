"""The runbook's operations, each recorded in ``migration_log``.

Every operation is a function of a Session returning an Outcome; ``run``
wraps it with its log row.  Refusals are MigrationErrors raised before
anything changes; they are logged as ``failed`` with the findings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import psycopg2
from psycopg2 import sql

from migration import backup, catalog, checks, clients, preflight, publications, take_backup, views
from migration.catalog import ColumnState
from migration.connection import Connection, redact_dsn
from migration.engine import contract, expand, fill, pipeline, rollback, swap
from migration.errors import MigrationError
from migration.log import LogEntry, logger
from migration.model import KeyColumn, Table
from migration.report import Finding, Status, failures
from migration.session import Session


@dataclass
class Outcome:
    message: str
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


Operation = Callable[[Session, int], Outcome]

# Operations that change the tables or the backup: cleanup_backup asks that
# the last validate_migration come after the last of them.
CHANGING = ("backup_data", "migrate_users", "migrate_foreign_keys", "rollback")


def run(session: Session, name: str, operation: Operation) -> Outcome:
    """Run one operation between its ``running`` and final log states."""
    run_id = session.log.begin(name, {"batch_size": session.settings.batch_size,
                                      "plan": [str(k) for k in session.plan.columns]},
                               session.active_runs)
    session.active_runs.append(run_id)
    paced = session.pace.totals()
    try:
        outcome = operation(session, run_id)
    except MigrationError as exc:
        _record_failure(session, run_id, str(exc), exc.findings)
        raise
    except psycopg2.Error as exc:
        if not session.conn.closed and not isinstance(exc, psycopg2.OperationalError):
            _record_failure(session, run_id, redact_dsn(str(exc)).strip(), [])
        raise  # a lost connection leaves the row "running": status says "interrupted"
    finally:
        session.active_runs.remove(run_id)
    with session.transaction(f"finish {name}") as cur:
        session.log.finish(cur, run_id, status="completed", message=outcome.message,
                           rows=outcome.rows,
                           details={**outcome.details, **session.pace.record(name, paced),
                                    "findings": [f.as_dict() for f in outcome.findings]})
    return outcome


def _record_failure(session: Session, run_id: int, message: str,
                    findings: list[Finding]) -> None:
    session.conn.rollback()
    with session.transaction() as cur:
        session.log.finish(cur, run_id, status="failed", message=message, rows=0,
                           details={"findings": [f.as_dict() for f in findings]})


def refuse_on_failures(findings: list[Finding], what: str) -> None:
    bad = failures(findings)
    if bad:
        raise MigrationError(
            f"{what} refused, nothing was changed: {len(bad)} problem(s) found",
            hint="fix what is listed, then run again (validate_schema shows the full report)",
            findings=findings)


def validate_schema(session: Session, run_id: int) -> Outcome:
    findings = preflight.validate_schema(session)
    refuse_on_failures(findings, "validate_schema")
    warnings = sum(f.status is Status.WARN for f in findings)
    return Outcome(f"schema and data ready for migration ({warnings} warning(s))",
                   findings=findings)


def backup_data(session: Session, run_id: int) -> Outcome:
    """Start the change log (a short lock per table), then copy from one snapshot (no lock)."""
    with session.transaction() as cur:
        taken = backup.exists(cur, session.plan.backup_schema)
        stopped = taken and bool(backup.change_log_stopped(cur, session.plan))
    if not taken or stopped:  # stopped by a rollback: the backup is kept if still equal
        session.ddl("backup_data: change log",
                    lambda cur: backup.start_change_log(cur, session.plan))
        session.point("backup_data: change log started")

    with ExitStack() as stack:
        # The copy keeps one snapshot, its transaction open to the end: the standbys' lag is
        # read on a connection of its own (``Throttle.wait`` commits the one it is given).
        looker = stack.enter_context(session.worker()) if session.lag.limit > 0 else None
        watched = looker is not None and bool(session.lag.behind(looker))
        # In batches of pages when a pause between them may be asked for; 0: at once.
        batch_size = session.settings.batch_size if session.pace.limit > 0 or watched else 0
        progress = (stack.enter_context(closing(session.progress("backup_data", 0)))
                    if batch_size else None)

        def paced(table: Table, rows: int, started: float) -> None:
            session.point(f"backup_data: batch {table}")
            if progress is not None:
                progress.advance(rows)
            session.pace.wait(rows, started)
            if looker is not None:
                session.lag.wait(looker, progress)

        result = session.ddl("backup_data", lambda cur: take_backup.create(
            cur, session.plan, batch_size=batch_size, after_batch=paced))
    return Outcome(result.message, rows=result.rows, details=result.expectations)


def migrate_users(session: Session, run_id: int) -> Outcome:
    """Expand ``users.id``: its uuid copy filled and proven, its indexes built beside it.

    The column changes type at the swap, in migrate_foreign_keys, together
    with every column that refers to it: no foreign key is ever dropped
    without its copy already enforced.
    """
    parent = session.plan.parent
    with session.transaction() as cur:
        backup.require(cur, session.plan, "migrate_users")
    if catalog.column_state(session.conn, parent) is ColumnState.UUID:
        return Outcome(f"{parent} is uuid already: nothing to do")
    children = tuple(key for key in session.plan.children
                     if catalog.column_state(session.conn, key) is not ColumnState.UUID)
    refuse_on_failures(preflight.check_columns(session, (parent,), later=children),
                       "migrate_users")
    expanded = pipeline.expand_columns(
        session, session.plan, (parent,), run_id, references=False,
        fill_copies=lambda: fill.fill(session, (parent,), run_id))
    return Outcome(f"{parent} expanded: {parent.temp} filled ({expanded.rows:,} rows) and "
                   f"proven, {expanded.indexes} index(es) built beside it; it becomes uuid at "
                   "the swap, in migrate_foreign_keys", rows=expanded.rows)


def migrate_foreign_keys(session: Session, run_id: int) -> Outcome:
    """Expand every child column, copy the foreign keys between the uuid columns, swap."""
    plan = session.plan
    parent = plan.parent
    with session.transaction() as cur:
        backup.require(cur, plan, "migrate_foreign_keys")
    states = {key: catalog.column_state(session.conn, key) for key in plan.columns}
    if all(state is ColumnState.UUID for state in states.values()):
        refreshed = contract.contract(session, plan)  # a swap cut short after its commit
        return Outcome("every key column is uuid already: "
                       + (f"{refreshed} materialized view(s) refreshed" if refreshed
                          else "nothing to do"))
    if not swap.is_ready(expand.stage(session.conn, parent, plan)):
        raise MigrationError(f"{parent} is not expanded yet", hint="run migrate_users first")
    unsupported = expand.unsupported_foreign_keys(session.conn, plan)
    if unsupported:
        raise MigrationError("migrate_foreign_keys refused, nothing was changed: foreign keys "
                             "the engine cannot copy: " + ", ".join(unsupported),
                             hint="drop them before the migration and recreate them after")
    pending = tuple(key for key in plan.children if states[key] is not ColumnState.UUID)
    findings = preflight.check_columns(session, pending)
    refuse_on_failures(findings, "migrate_foreign_keys")
    quarantined = quarantine_orphans(session, findings) \
        if session.settings.orphans == "quarantine" else 0
    expanded = pipeline.expand_columns(session, plan, pending, run_id,
                                       fill_copies=lambda: fill.fill(session, pending, run_id))
    rows = expanded.rows
    built_beside = (f"{rows:,} rows filled, {expanded.indexes} index(es) and "
                    f"{expanded.foreign_keys} foreign key(s) built beside them")
    if session.settings.postpone_swap:
        message = (f"ready to swap: {len(plan.columns)} column(s) expanded and proven "
                   f"({built_beside}); the sync triggers keep the copies in step until "
                   "migrate_foreign_keys runs again without --postpone-swap, which swaps")
        if quarantined:
            message += f"; {quarantined} orphan row(s) moved to quarantine in {plan.backup_schema}"
        return Outcome(message, rows=rows, findings=findings,
                       details={"quarantined": quarantined, "ready_to_swap": True})
    swapped = pipeline.swap_and_contract(session, plan)
    message = f"{len(plan.columns)} column(s) swapped to uuid together ({built_beside})"
    if quarantined:
        message += f"; {quarantined} orphan row(s) moved to quarantine in {plan.backup_schema}"
    published = publications.after_swap(session.conn, plan.columns)
    session.conn.rollback()
    if published:  # on the console as it happens, in full_migration too
        logger.warning("%s", published)
    return Outcome(message, rows=rows, findings=findings,
                   details={"quarantined": quarantined,
                            "swap_lock_ms": round(swapped.stall_s * 1000, 3),
                            "subscribers": published, **swapped.sessions})


def quarantine_orphans(session: Session, findings: list[Finding]) -> int:
    """Move the orphans the pre-flight found into the backup schema; rows moved."""
    moved = 0
    for key in session.plan.children:
        if any(f.check == "orphans" and f.subject == str(key) for f in findings):
            moved += session.ddl(f"quarantine orphans of {key}",
                                 partial(rollback.quarantine, session, key=key))
    return moved


def validate_migration(session: Session, run_id: int) -> Outcome:
    with session.transaction() as cur:
        # One snapshot for every check, shared with the connections reading side by side.
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        findings = checks.run_checks(cur, session.plan, active_runs=session.active_runs,
                                     jobs=session.settings.jobs,
                                     opener=partial(_worker_connection, session))
    session.conn.rollback()
    bad = failures(findings)
    if bad:
        raise MigrationError(f"validate_migration: {len(bad)} check(s) failed",
                             hint="see each failed check's next step", findings=findings)
    skipped = sum(f.status is Status.SKIP for f in findings)
    return Outcome(f"all checks passed ({skipped} skipped)", findings=findings)


@contextmanager
def _worker_connection(session: Session) -> Iterator[Connection]:
    """A connection of the session's workers (``Session.worker``), for the checks' readers."""
    with session.worker() as worker:
        yield worker.conn


def cleanup_backup(session: Session, run_id: int) -> Outcome:
    entries = session.log.entries(limit=10_000)
    last_change = next((e for e in entries if e.operation in CHANGING and e.id != run_id), None)
    last_check = next((e for e in entries if e.operation == "validate_migration"), None)
    validated = (last_check is not None and last_check.status == "completed"
                 and (last_change is None or last_check.id > last_change.id))
    # A completed rollback left the tables as the backup holds them (it checks so):
    # the backup has nothing more to give, and nothing to validate.
    rolled_back = (last_change is not None and last_change.operation == "rollback"
                   and last_change.status == "completed")
    validated = validated or rolled_back
    if not validated and not session.settings.force:
        raise MigrationError(
            "cleanup_backup refused: no passing validate_migration after the last change "
            f"({last_change.operation if last_change else 'none'})",
            hint="run validate_migration first; --force drops the backup anyway (logged)")

    with session.transaction() as cur:
        quarantined = backup.quarantined_rows(cur, session.plan.backup_schema)
    if quarantined and not session.settings.force:
        raise MigrationError(
            f"cleanup_backup refused: {sum(quarantined.values())} quarantined row(s) exist "
            "only in the backup schema (" + ", ".join(
                f"{name}: {rows}" for name, rows in quarantined.items()) + ")",
            hint="put them back or delete them yourself, then run cleanup_backup again; "
                 "--force drops them with the backup (logged)")

    dropped = session.ddl("cleanup_backup", partial(contract.drop_backup,
                                                    backup_schema=session.plan.backup_schema))
    message = f"{session.plan.backup_schema} dropped" if dropped else "there was no backup to drop"
    if session.settings.force and not validated:
        message += " (forced without a passing validate_migration)"
    if quarantined:
        message += f" with {sum(quarantined.values())} quarantined row(s) (forced)"
    return Outcome(message, details={"forced": session.settings.force and not validated,
                                     "quarantined_rows_dropped": quarantined})


def full_migration(session: Session, run_id: int) -> Outcome:
    """The five steps in order, each logged as its own operation, stopping at the first failure."""
    done: list[str] = []
    rows = 0
    for name in ("validate_schema", "backup_data", "migrate_users", "migrate_foreign_keys",
                 "validate_migration"):
        try:
            outcome = run(session, name, OPERATIONS[name])
        except MigrationError as exc:
            raise MigrationError(
                f"full_migration stopped at {name} (done: {', '.join(done) or 'nothing'}): "
                f"{exc.message}",
                hint=f"fix the cause and run --operation=full_migration again (it resumes), "
                     f"or --operation=rollback. {exc.hint}", findings=exc.findings) from None
        logger.info("%s: %s", name, outcome.message)
        done.append(name)
        if name in ("migrate_users", "migrate_foreign_keys"):
            rows += outcome.rows  # the rows converted, as the steps count them
        if outcome.details.get("ready_to_swap"):  # --postpone-swap
            return Outcome(f"{outcome.message} (done: {', '.join(done)}; full_migration run "
                           "again without --postpone-swap swaps and validates)", rows=rows,
                           details={"ready_to_swap": True})
    schema = session.plan.backup_schema
    return Outcome("migration complete and validated: " + ", ".join(done) + ". The backup "
                   f"stays in {schema}, for a rollback, with its change log: every application "
                   f"write adds a row to {schema}.change_log (status shows its size). Once "
                   "verify passes and no rollback will be needed, run "
                   "--operation=cleanup_backup: it drops both, and the log's triggers",
                   rows=rows)


def status(session: Session) -> Outcome:
    """Where the migration stands, from the catalog and migration_log (reads only)."""
    stages = _stages(session)
    lines = [f"{key}: {where}" for key, where in stages.items()]
    with session.transaction() as cur:
        has_backup = backup.exists(cur, session.plan.backup_schema)
        chosen = backup.chosen_names(cur, session.plan.backup_schema) if has_backup else []
        progress = []
        if has_backup:
            cur.execute(sql.SQL("SELECT table_schema, table_name, column_name, sum(rows_done), "
                                "max(updated_at) FROM {} GROUP BY 1, 2, 3 ORDER BY 5").format(
                backup.meta(session.plan.backup_schema, "backfill_progress")))
            progress = cur.fetchall()
    session.conn.rollback()
    lines.insert(0, f"key: {session.plan.key}")
    lines.append(f"backup: {'present' if has_backup else 'none'} ({session.plan.backup_schema})")
    if has_backup:
        lines.append(_change_log_line(session))
    lines += [f"names {line}" for line in chosen]
    for schema, table, column, rows, at in progress:
        lines.append(f"backfill {schema}.{table}.{column}: {rows:,} rows done (at {at})")
    entries = session.log.entries(limit=50)
    unfinished = [e for e in entries if e.status == "running"]
    verb = "running" if session.lock_holder() else "interrupted during"
    lines += [f"{verb} {e.operation} (run {e.id}, started {e.started_at}, "
              f"{e.rows_processed:,} rows done)" for e in unfinished]
    lines += _sessions_since_swap(session, entries)
    lines.append("recent operations:")
    lines += [_log_line(e) for e in reversed(entries[:20])]
    stage = f"{verb} {unfinished[0].operation}" if unfinished else stage_of(session)
    if unfinished and (empty := _left_empty(session)):
        lines.insert(1, empty.removeprefix("; "))
    return Outcome(f"stage: {stage}\n" + "\n".join(lines),
                   details={"stage": stage, "key": session.plan.key})


def _change_log_line(session: Session) -> str:
    """The change log's size, and whether its triggers still log every application write."""
    plan = session.plan
    with session.transaction() as cur:
        rows, size = backup.change_log_size(cur, plan.backup_schema)
        stopped = backup.change_log_stopped(cur, plan)
    session.conn.rollback()
    line = f"change log: {rows:,} row(s), {size / 1024:,.0f} kB ({plan.backup_schema}.change_log)"
    if len(stopped) == len(plan.tables):
        return line + "; stopped (a rollback dropped its triggers)"
    return line + ("; each application write to the plan's tables adds a row until "
                   "cleanup_backup drops it with the backup")


def _sessions_since_swap(session: Session, entries: list[LogEntry]) -> list[str]:
    """The client sessions still connected that connected before the last swap (its time is
    in its log row): their prepared statements may fail until they are recycled."""
    swapped = next((entry for entry in entries if entry.status == "completed"
                    and (entry.details or {}).get("swapped_at")), None)
    if swapped is None:
        return []
    at = datetime.fromisoformat(swapped.details["swapped_at"])
    sessions = clients.connected_before(session.conn, at)
    if not sessions:
        return [f"client sessions: every one connected after the swap of run {swapped.id}"]
    return [f"client sessions: {clients.advice(sessions)}"]


def _log_line(entry: LogEntry) -> str:
    took = (f"{(entry.completed_at - entry.started_at).total_seconds():.1f} s"
            if entry.completed_at else "-")
    started = entry.started_at.strftime("%Y-%m-%d %H:%M:%S")
    first_line = (entry.message or "").splitlines()[0] if entry.message else ""
    return (f"  #{entry.id} {entry.operation:22} {entry.status:9} {started} {took:>9} "
            f"{entry.rows_processed:>12,} rows  {first_line}")


@dataclass(frozen=True)
class _Place:
    """Where a column stands (``expand.stage``), and whether that is its string copy's
    stage on the way back (a uuid column the rollback is taking back to its string)."""

    where: expand.Stage | ColumnState
    back: bool = False

    def __str__(self) -> str:
        return f"uuid, on its way back: {self.where}" if self.back else str(self.where)


def _stages(session: Session) -> dict[KeyColumn, _Place]:
    """Each column's place."""
    conn, plan = session.conn, session.plan
    stages = {}
    for key in plan.columns:
        back = key.reversed()
        stages[key] = (_Place(expand.stage(conn, back, plan.reversed()), back=True)
                       if catalog.column_info(conn, key.table, back.temp) is not None
                       else _Place(expand.stage(conn, key, plan)))
    conn.rollback()
    return stages


def stage_of(session: Session) -> str:
    """Where the migration stands, from the catalog alone: one line for an operator."""
    return _stage(_stages(session)) + _left_empty(session)


def _left_empty(session: Session) -> str:
    """What stage_of adds when the swap's materialized views are not refreshed yet."""
    empty = views.left_empty(session.conn, session.plan.backup_schema)
    session.conn.rollback()
    if not empty:
        return ""
    return ("; materialized view(s) left empty by the swap until they are refreshed: "
            + ", ".join(map(str, empty)))


def _stage(stages: dict[KeyColumn, _Place]) -> str:
    places = stages.values()
    if all(place == _Place(ColumnState.UUID) for place in places):
        return "migrated"
    if all(place == _Place(ColumnState.STRING) for place in places):
        return "not migrated"
    ready = all(swap.is_ready(place.where) for place in places)
    if ready and not any(place.back for place in places):
        return ("ready to swap (every column expanded and proven: migrate_foreign_keys or "
                "full_migration without --postpone-swap swaps)")
    if ready and all(place.back for place in places):
        return ("ready to swap back (every column's string copy expanded and proven: rollback "
                "without --postpone-swap swaps)")
    going = "rolling back" if any(place.back for place in places) else "expanding"
    return f"{going} (" + ", ".join(f"{key}: {place}" for key, place in stages.items()) + ")"


def rollback_operation(session: Session, run_id: int) -> Outcome:
    result = rollback.rollback(session, run_id)
    return Outcome(result.message, rows=result.rows, findings=result.findings,
                   details=result.details)


OPERATIONS: dict[str, Operation] = {
    "validate_schema": validate_schema,
    "backup_data": backup_data,
    "migrate_users": migrate_users,
    "migrate_foreign_keys": migrate_foreign_keys,
    "validate_migration": validate_migration,
    "cleanup_backup": cleanup_backup,
    "full_migration": full_migration,
    "rollback": rollback_operation,
}
