"""``--operation=rehearse``: the runbook's "Testing Procedures" in one command.

The runbook asks for a staging run of the full migration, rollback tested at
each step, timing measured for the production data size and the batch size
tuned.  A rehearsal does all of it on scratch databases it makes itself:

1. a generated legacy dataset (``migration.rehearsal.seed``), with the problems the
   toolkit exists to catch planted in it unless ``clean``; the dirty dataset
   uses the schema variant without foreign keys on tags and reminders, so
   orphans can exist;
2. ``validate_schema``, then the remedies an operator would apply (bad ids
   removed or merged in this copy, ``--orphans=quarantine``), then
   ``validate_schema`` again;
3. on a clone per batch size tried, the batched steps, timed from
   ``migration_log``;
4. the runbook step by step on another clone; after each stage a copy of it
   is rolled back and its fingerprint compared with the database before the
   migration;
5. a final ``full_migration`` with the batch size kept (``batching``), and
   ``verify`` (the read-only post-migration check);
6. with rows to project for, the final migration again on smaller clean
   datasets, so that each step's time is fit over several sizes
   (``projection``).

Clones are ``CREATE DATABASE ... TEMPLATE`` of the prepared database: a file
copy, far cheaper than generating the data again.

With ``--schema-from`` (``schema_source``) the prepared database holds the
application's schema instead, filled by ``generate.populate`` for the plan of
``--key``; the same cycle follows.  After each rollback and after the final
migration, the smoke writes (``smoke.smoke_writes``) try an INSERT, UPDATE
and DELETE on every table of the plan; the report lists what depends on the
key columns, carried or refused (``inventory``).  Statements prepared before
the final migration on a connection kept open through it, as an application's
pool keeps them, are executed after the swap, and each that fails is reported
with its cause and the advice (``prepared``).

Where: with no database URL, a throwaway server (Docker when it answers,
else the embedded wheel) that is removed at the end, also on Ctrl-C.  With a
URL, the tables of that database are never touched: the URL names a server
and a role with CREATEDB, on which the rehearsal creates its own databases
(``uuidmig_rehearse_<random>_*``) and drops them at the end.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import click
import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import make_dsn, parse_dsn

from migration import preflight, verify
from migration.catalog import foreign_keys_to, regclass
from migration.connection import ConnectError, connected, describe_dsn, redact_dsn
from migration.errors import MigrationError
from migration.log import DEFAULT_LOG_FILE, logger
from migration.model import KeyColumn, Table
from migration.operations import OPERATIONS, quarantine_orphans, run
from migration.plan import DEFAULT_CHILDREN, DEFAULT_PARENT, Plan, build_plan, parse_key
from migration.rehearsal import schema_source, throwaway
from migration.rehearsal.batching import REPEATS, choose, sizes_to_try
from migration.rehearsal.fingerprint import Fingerprint, fingerprint
from migration.rehearsal.generate import GenerateError, populate
from migration.rehearsal.inventory import inventory
from migration.rehearsal.prepared import Prepared
from migration.rehearsal.projection import SIZES, project, table_sizes
from migration.rehearsal.report import (
    BATCHED_STEPS,
    PlantedCheck,
    Report,
    RollbackCheck,
    Run,
    SmokeRun,
    SmokeWrite,
    StepTiming,
    as_json,
    render_text,
    report_format,
    step_message,
    write_report,
)
from migration.rehearsal.sandbox import OWNER_ROLE, prepare, schema_sql
from migration.rehearsal.seed import Planted, seed
from migration.rehearsal.smoke import binding_failures, smoke_writes
from migration.rehearsal.under_load import STEPS as STEPS_UNDER_LOAD
from migration.rehearsal.under_load import LoadRun, available, pool_rows_for, under_load
from migration.report import Finding, Status, failures
from migration.rows import orphan_condition
from migration.session import Session, Settings
from migration.sqlexpr import is_uuid, prepare_uuid_checker, uuid_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_BATCH_SIZES = (1000, 10_000, 50_000)
# Where a rollback is rehearsed from, in the runbook's order.  "quarantine"
# is the first half of migrate_foreign_keys (orphans moved, nothing converted)
# and is rehearsed only when there are orphans to quarantine.
STAGES = ("backup_data", "migrate_users", "quarantine", "migrate_foreign_keys",
          "validate_migration")
TRIAL_STEPS = ("backup_data", *BATCHED_STEPS)  # what a batch size trial runs on its clone

Say = Callable[[str], None]


def _silent(message: str) -> None:
    """The progress callback of a quiet rehearsal."""


# --- its log: a file of its own ------------------------------------------------------------------

class RehearsalMark(logging.Filter):
    """Marks each line of the rehearsal's log: a rehearsal, and the scratch database it is about.

    The engine's lines (``run 3 failed: validate_schema refused``) would
    otherwise read like a production run's; each clone numbers its runs anew.
    """

    def __init__(self) -> None:
        super().__init__()
        self.database = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.database = self.database
        return True


_MARK = RehearsalMark()


def rehearsal_log_file() -> Path:
    """``logs/migration/rehearse-<timestamp>.log``: beside the operator's log, never in it."""
    return DEFAULT_LOG_FILE.with_name(f"rehearse-{time.strftime('%Y%m%d-%H%M%S')}.log")


@contextmanager
def rehearsal_log(path: Path) -> Iterator[None]:
    """The detailed log of one rehearsal in ``path``, for the duration of a with-block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [rehearsal, database %(database)s] %(message)s"))
    handler.addFilter(_MARK)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        _MARK.database = "-"


def _on(dsn: str) -> str:
    """``dsn``, after marking the log lines that follow with its database."""
    _MARK.database = parse_dsn(dsn).get("dbname", "-")
    return dsn


@dataclass(frozen=True)
class RehearsalOptions:
    users: int = 10_000
    dirty: bool = True
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    production: Mapping[str, int] | None = None
    """Rows to project the time for (parse_production_rows); None: ``sizes_from``'s."""
    sizes_from: str | None = None
    """A database whose tables' sizes to project for when ``production`` is None (the
    database the schema came from); neither: no projection."""
    schema: str = "public"
    orphans: str = "abort"  # validate_schema's first look; orphans found switch to quarantine
    lock_timeout_ms: int = Settings.lock_timeout_ms  # as the command line's
    jobs: int = 2
    schema_from: str | None = None
    """A DSN or SQL file whose schema replaces the runbook's fixture (schema_source)."""
    key: KeyColumn | None = None
    """The parent key of the plan; None: the runbook's users.id in ``schema``."""
    progress: bool = False
    """The fills' progress line on stderr (a terminal only), as the other operations show it."""
    allow_triggers: bool = False  # as the migration takes them: rehearsed as it will run
    refresh_materialized_views: bool = False
    live_load: bool = False
    """The migration and the rollback once more on a clone, under pgbench (``under_load``)."""

    def settings(self, *, batch_size: int, orphans: str) -> Settings:
        return Settings(batch_size=batch_size, lock_timeout_ms=self.lock_timeout_ms,
                        orphans=orphans, jobs=self.jobs, show_progress=self.progress,
                        allow_triggers=self.allow_triggers,
                        refresh_materialized_views=self.refresh_materialized_views)


# --- pure parts: options and arithmetic ----------------------------------------------------------

def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text.strip()!r}") from None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1000,10000"`` -> (1000, 10000), in the order given, without repeats."""
    sizes = [_count(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"expected positive whole numbers separated by commas, got {text!r}")
    return tuple(dict.fromkeys(sizes))


def parse_production_rows(text: str, parent_key: KeyColumn | None = None) -> dict[str, int]:
    """``"1000000"`` (users) or ``"users=1000000,journal_entries=3500000"``.

    The names are the generated dataset's tables (the runbook's plan); tables
    not named follow users in the rehearsal's proportions, so users must be
    named unless every table is.  With ``--key`` the parent is the key's
    table, and the other tables, known only once the schema is loaded, are
    not checked here.
    """
    parent, tables = DEFAULT_PARENT[0], (DEFAULT_PARENT[0], *(t for t, _ in DEFAULT_CHILDREN))
    if parent_key is not None:
        parent, tables = parent_key.table.name, (parent_key.table.name,)
    if "=" not in text:
        spec = {parent: _count(text)}
    else:
        pairs = [part.partition("=") for part in text.split(",")]
        spec = {table.strip(): _count(count) for table, _, count in pairs}
    unknown = sorted(spec.keys() - set(tables))
    if unknown and parent_key is None:
        raise ValueError(f"unknown table(s) {', '.join(unknown)}; the tables are "
                         f"{', '.join(tables)}")
    if parent not in spec and spec.keys() != set(tables):
        raise ValueError(f"give {parent}=N, or every table ({', '.join(tables)})")
    if min(spec.values()) < 0 or spec.get(parent, 1) < 1:
        raise ValueError(f"expected positive row counts, got {text!r}")
    return spec


def production_rows(spec: Mapping[str, int], measured: Mapping[str, int],
                    parent: str) -> dict[str, int]:
    """Rows per table in production: as given, else in the rehearsal's proportion to ``parent``."""
    scale = spec[parent] / measured[parent] if parent in spec else 0.0
    return {table: spec.get(table, round(rows * scale)) for table, rows in measured.items()}


def planted_checks(planted: Planted, findings: Sequence[Finding], plan: Plan) -> list[PlantedCheck]:
    """Each planted value, and whether a finding of the expected check names it in its samples."""
    named: dict[tuple[str, str], set[str]] = {}
    for finding in findings:
        column = finding.subject.rsplit(".", 1)[-1]
        values = named.setdefault((finding.check, finding.subject), set())
        for sample in finding.samples:
            value = sample.get(column)
            values.update(map(str, value) if isinstance(value, list) else [str(value)])
    parent = str(plan.parent)
    children: dict[str, str] = {}  # orphans are planted by column, or by table name
    for key in plan.children:
        for name in (str(key), str(key.table), key.table.name):
            children.setdefault(name, str(key))
    expected = [("invalid_uuid", parent, v) for v in planted.invalid_ids]
    expected += [("collision", parent, v) for v in planted.colliding_ids]
    expected += [("non_canonical", parent, v) for v in planted.non_canonical_ids]
    expected += [("orphans", children[table], v)
                 for table, values in planted.orphans.items() for v in values]
    return [PlantedCheck(check, subject, value, value in named.get((check, subject), set()))
            for check, subject, value in expected]


# --- scratch databases ---------------------------------------------------------------------------

@dataclass
class Scratch:
    """The databases of one rehearsal on one server, created and dropped by ``admin_dsn``'s role."""

    admin_dsn: str
    description: str
    prefix: str
    owner: str | None = None
    """The role owning the databases (the migration connects as it); None: the admin role."""
    owner_password: str | None = None
    created: list[str] = field(default_factory=list)

    def dsn(self, name: str) -> str:
        return make_dsn(self.admin_dsn, dbname=name, user=self.owner, password=self.owner_password)

    def create(self, suffix: str, *, template: str = "template0") -> str:
        name = f"{self.prefix}_{suffix}"
        owner = (sql.SQL(" OWNER {}").format(sql.Identifier(self.owner)) if self.owner
                 else sql.SQL(""))
        self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(
            sql.Identifier(name), sql.Identifier(template), owner))
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        self.created.remove(name)

    def _execute(self, statement: sql.Composable) -> None:
        with connected(self.admin_dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(statement)


@contextmanager
def scratch_databases(database_url: str | None) -> Iterator[Scratch]:
    """A throwaway server, or scratch databases on the server of ``database_url``."""
    if database_url is None:
        with throwaway.running_server() as server:
            box = prepare(server.admin_dsn, prefix="rehearse")
            yield Scratch(server.admin_dsn, f"throwaway server, {server.describe()}, removed "
                          "at the end", "rehearse", OWNER_ROLE, box.owner_password)
        return
    _require_createdb(database_url)
    scratch = Scratch(database_url, f"scratch databases on {describe_dsn(database_url)}, "
                      "dropped at the end", f"uuidmig_rehearse_{secrets.token_hex(3)}")
    try:
        yield scratch
    finally:
        _drop_all(scratch)


def _require_createdb(database_url: str) -> None:
    with connected(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
        row = cur.fetchone()
    if not (row and row[0]):
        raise MigrationError(
            f"rehearse with --database-url needs a role with CREATEDB ({describe_dsn(database_url)}"
            " has none): it creates scratch databases there and never touches that database",
            hint="give a role with CREATEDB, or omit --database-url to use a throwaway server")


def _drop_all(scratch: Scratch) -> None:
    """Drop what is left (after an interrupt); say what could not be dropped."""
    for name in list(scratch.created):
        try:
            scratch.drop(name)
        except (ConnectError, psycopg2.Error) as exc:
            logger.error("rehearse: could not drop %s: %s", name, redact_dsn(str(exc)))
            click.echo(f"warning: scratch database {name} was not dropped: drop it by hand",
                       err=True)


# --- the steps -----------------------------------------------------------------------------------

def load_dataset(scratch: Scratch, options: RehearsalOptions, *, suffix: str = "prepared",
                 clean: bool = False) -> tuple[str, Planted]:
    """A new database with the legacy schema and generated data; its name, what was planted.

    ``clean``: no problems planted, on the schema variant of ``options`` all the same (a
    size of the projection's fit must differ from the rehearsal's dataset in size only).
    """
    name = scratch.create(suffix)
    with connected(_on(scratch.dsn(name))) as conn:
        with conn, conn.cursor() as cur:
            schema = sql.Identifier(options.schema)
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}; SET search_path = {}").format(
                schema, schema))
            cur.execute(schema_sql("legacy_no_fk" if options.dirty else "legacy"))
        planted = seed(conn, options.users, schema=options.schema,
                       dirty=options.dirty and not clean)
    return name, planted


# --- --schema-from: the application's schema, generated data, smoke writes ----------------------

def load_application_schema(scratch: Scratch, options: RehearsalOptions, report: Report,
                            say: Say, *, suffix: str = "prepared",
                            clean: bool = False) -> tuple[str, Planted]:
    """A new database with the schema of ``options.schema_from``, filled by ``populate``
    (``options.users`` rows in the key's table, the others in proportion); ``clean`` as
    for ``load_dataset``."""
    assert options.schema_from is not None
    text, origin = schema_source.read_schema(options.schema_from)
    name = scratch.create(suffix)
    loaded = schema_source.apply_schema(_on(scratch.dsn(name)), text, origin)
    report.schema_source, report.schema_skipped = origin, loaded.skipped
    say(f"rehearse: schema of {origin} loaded ({loaded.applied} statements, "
        f"{len(loaded.skipped)} left out)")
    # The server's administrator fills it: an orphan is planted past a foreign key with
    # session_replication_role, which only a superuser may set.
    with connected(make_dsn(scratch.admin_dsn, dbname=name), autocommit=True) as conn:
        plan = build_plan(conn, key=options.key, schema=options.schema)
        report.key = str(plan.parent)
        planted = populate(conn, plan, rows=options.users, dirty=options.dirty and not clean)
    say(f"rehearse: {options.users:,} rows of {plan.parent.table} generated, every table "
        "filled" + (", with planted problems" if options.dirty else ""))
    return name, planted


def smoke_run(dsn: str, plan: Plan, after: str) -> SmokeRun:
    """The smoke writes on every table of ``plan`` in the database of ``dsn``."""
    try:
        with connected(_on(dsn)) as conn:
            results = smoke_writes(conn, plan)
    except GenerateError as exc:  # no row could be made: no write was tried, say why
        return SmokeRun(after, [SmokeWrite(str(plan.parent.table), "generate", "-", ok=False,
                                           error=str(exc))])
    return SmokeRun.of(after, results, binding_failures(results))


def _smoke_summary(run: SmokeRun) -> str:
    broken = [w for w in run.writes if run.broken(w)]
    notes = [w for w in run.writes if run.compatibility(w)]
    return (f"{len(run.writes) - len(broken) - len(notes)} passed"
            + (f", {len(notes)} refused only with the key bound as varchar" if notes else "")
            + (f", {len(broken)} FAILED: " + "; ".join(
                f"{w.operation} {w.table} ({w.binding}): {w.error}" for w in broken)
               if broken else ""))


def validate(session: Session) -> tuple[list[Finding], str]:
    """validate_schema's findings and message, whether it passed or refused."""
    try:
        outcome = run(session, "validate_schema", OPERATIONS["validate_schema"])
    except MigrationError as exc:
        return exc.findings, exc.message
    return outcome.findings, outcome.message


def apply_remedies(session: Session,
                   findings: Sequence[Finding]) -> tuple[list[str], list[Finding]]:
    """Fix in this copy the failures an operator would fix; (what was done, what has no remedy).

    Orphans need no change here: the rest of the rehearsal runs with
    ``--orphans=quarantine``.  Everything happens in one transaction.
    """
    done, left = [], []
    keys = {str(key): key for key in session.plan.columns}
    with session.transaction() as cur:
        prepare_uuid_checker(cur)
        for finding in findings:
            key = keys.get(finding.subject)
            if finding.check == "orphans" and key is not None and _not_movable(cur, session.plan,
                                                                                key):
                done.append(_remove_orphans(cur, session.plan, key))
            elif finding.check == "orphans":
                done.append(f"{finding.count} row(s) of {finding.subject} refer to no row of "
                            f"{session.plan.parent.table}: "
                            "--orphans=quarantine (moved to migration_backup by "
                            "migrate_foreign_keys, restored by rollback)")
            elif finding.status is not Status.FAIL:
                continue
            elif finding.check == "invalid_uuid" and key is not None:
                done.append(_remove_invalid(cur, session.plan, key))
            elif finding.check == "collision" and key == session.plan.parent:
                done.append(_merge_spellings(cur, session.plan))
            else:
                left.append(finding)
    return done, left


def _remove_invalid(cur: Cursor, plan: Plan, key: KeyColumn) -> str:
    """Delete the rows whose key is no UUID, and the rows referring to them, at any depth
    (an application's schema may hang tables under the plan's children)."""
    column = sql.Identifier(key.column)
    invalid = sql.SQL("{c} IS NOT NULL AND NOT {valid}").format(
        c=column, valid=is_uuid(cur.connection, _as_cast_reads(column)))
    referring = _delete_referring(cur, key.table, invalid, seen=(key.table,))
    cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(key.table.ident, invalid))
    message = f"removed {cur.rowcount} row(s) of {key.table} whose {key.column} is not a UUID"
    return message + (f", and {referring} row(s) referring to them" if referring else "")


def _as_cast_reads(column: sql.Composable) -> sql.Composable:
    """The text the cast to uuid reads from a string column: its output, which keeps a
    CHAR(n)'s padding (passed as text, a CHAR is trimmed and a padded UUID would pass for
    valid, then fail the migration's cast).  ``concat`` of a NULL is empty, not a UUID."""
    return sql.SQL("concat({})").format(column)


def _not_movable(cur: Cursor, plan: Plan, key: KeyColumn) -> bool:
    """Whether the quarantine could not take ``key``'s orphans and give them back: other
    tables refer to its table (it refuses to move those rows), or a foreign key guards
    the column (the orphans were planted past it; the rollback could not restore them)."""
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f' "
                "AND confrelid = to_regclass(%s) AND conrelid <> confrelid)",
                (regclass(key.table),))
    referenced = bool((cur.fetchone() or [False])[0])
    return referenced or any((fk.table, fk.column) == (key.table, key.column)
                             for fk in foreign_keys_to(cur.connection, plan.parent))


def _remove_orphans(cur: Cursor, plan: Plan, key: KeyColumn) -> str:
    """Delete the orphans of ``key`` and the rows referring to them, where the quarantine
    cannot move them (``_not_movable``)."""
    orphan = sql.SQL("ctid IN (SELECT t.ctid FROM {} t WHERE {})").format(
        key.table.ident, orphan_condition(cur, key, plan.parent))
    referring = _delete_referring(cur, key.table, orphan, seen=(key.table,))
    cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(key.table.ident, orphan))
    return (f"removed {cur.rowcount} row(s) of {key.table} whose {key.column} refers to no row "
            f"of {plan.parent.table}, and {referring} row(s) referring to them (planted past a "
            "foreign key, or referred to by other tables: the quarantine could not move them "
            "and give them back)")


def _delete_referring(cur: Cursor, table: Table, where: sql.Composable,
                      seen: tuple[Table, ...]) -> int:
    """Delete the rows of every table whose foreign key refers to the rows of ``table``
    that ``where`` selects, deepest first; the rows deleted."""
    cur.execute(
        "SELECT n.nspname, c.relname, "
        "  array(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY u(n, i) "
        "        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY i), "
        "  array(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY u(n, i) "
        "        JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY i) "
        "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE k.contype = 'f' AND k.confrelid = to_regclass(%s) ORDER BY 1, 2",
        (regclass(table),))
    deleted = 0
    for schema, name, columns, referenced in cur.fetchall():
        child = Table(schema, name)
        if child in seen:
            continue
        selected = sql.SQL("({}) IN (SELECT {} FROM {} WHERE {})").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(map(sql.Identifier, referenced)), table.ident, where)
        deleted += _delete_referring(cur, child, selected, (*seen, child))
        cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(child.ident, selected))
        deleted += cur.rowcount
    return deleted


def _merge_spellings(cur: Cursor, plan: Plan) -> str:
    """Keep one row per UUID among users spelled differently (the canonical spelling if any).

    Rows referring to another spelling are pointed at the one kept, then the
    other spellings are deleted: the merge the validate_schema hint asks for.
    """
    parent, merge = plan.parent, sql.Identifier("pg_temp", "rehearse_merge")
    column = sql.Identifier(parent.column)
    as_uuid = uuid_of(cur.connection, _as_cast_reads(column))
    cur.execute(sql.SQL(
        "CREATE TEMP TABLE rehearse_merge ON COMMIT DROP AS "
        "SELECT spelling, keeper FROM (SELECT {c} AS spelling, first_value({c}) OVER "
        "(PARTITION BY {u} ORDER BY ({u})::text = {c} DESC, {c}) AS keeper "
        "FROM {t} WHERE {valid}) s WHERE spelling <> keeper").format(
        c=column, u=as_uuid, t=parent.table.ident,
        valid=is_uuid(cur.connection, _as_cast_reads(column))))
    repointed = 0
    for child in plan.children:
        cur.execute(sql.SQL("UPDATE {} c SET {col} = m.keeper FROM {} m "
                            "WHERE c.{col} = m.spelling").format(
            child.table.ident, merge, col=sql.Identifier(child.column)))
        repointed += cur.rowcount
    cur.execute(sql.SQL("DELETE FROM {} p USING {} m WHERE p.{} = m.spelling").format(
        parent.table.ident, merge, column))
    return (f"merged {cur.rowcount} duplicate spelling(s) in {parent} into the row kept, "
            f"{repointed} referring row(s) pointed at it")


def step_tables(step: str, plan: Plan) -> tuple[str, ...]:
    """The tables whose size a step's duration follows."""
    if step == "migrate_users":
        return (plan.parent.table.name,)
    if step == "migrate_foreign_keys":
        return tuple(dict.fromkeys(key.table.name for key in plan.children))
    return tuple(table.name for table in plan.tables)


def _timings(session: Session, rows: Mapping[str, int], after: int) -> list[StepTiming]:
    """The steps logged after log row ``after``, timed by their migration_log rows.

    full_migration's own row is left out: each of its steps has a row.
    """
    timings = []
    for entry in reversed(session.log.entries(limit=50)):  # oldest first
        if entry.id <= after or entry.completed_at is None or entry.operation == "full_migration":
            continue
        tables = step_tables(entry.operation, session.plan)
        timings.append(StepTiming(entry.operation,
                                  (entry.completed_at - entry.started_at).total_seconds(),
                                  sum(rows[t] for t in tables), tables))
    return timings


def _error(exc: MigrationError | psycopg2.Error) -> str:
    if isinstance(exc, MigrationError):
        return exc.message
    return redact_dsn(str(exc)).strip()


def _stall(session: Session, after: int) -> float | None:
    """The seconds the swap logged after log row ``after`` held the write-blocking lock."""
    for entry in session.log.entries(limit=50):
        if entry.id > after and entry.operation == "migrate_foreign_keys" \
                and "swap_lock_ms" in entry.details:
            return float(entry.details["swap_lock_ms"]) / 1000
    return None


_STARTED = "%s: started (run %s)"  # the engine's line as an operation starts (log.begin)
_SLICE_ENDED = "%s: backfill %s, %s rows"  # the engine's line as a slice's fill ends (backfill)


class StepsSaid(logging.Handler):
    """While installed, says each operation the engine starts (its ``started`` log line),
    with where it runs: the progress of a rehearsal's steps, full_migration's too."""

    def __init__(self, say: Say, where: str) -> None:
        super().__init__(logging.INFO)
        self.say, self.where = say, where

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == _STARTED and isinstance(record.args, tuple):
            self.say(f"rehearse: {self.where}: {record.args[0]}")


class InFill(logging.Handler):
    """While installed, calls ``action`` once, in the middle of ``operation``'s fill: as the
    first of its slices is filled (``fill.fill`` adds the copy column of every column of the
    step before it fills any slice, so they are all there, and the other slices are still
    filling, or queued).  It runs on the thread of that slice's connection, which has
    committed its last batch and holds no lock then; the handler's lock keeps the other
    fill connections' lines waiting meanwhile."""

    def __init__(self, operation: str, action: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.operation, self.action = operation, action
        self.started = self.done = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.done or not isinstance(record.args, tuple):
            return
        if record.msg == _STARTED:
            self.started = record.args[0] == self.operation
        elif record.msg == _SLICE_ENDED and self.started and record.args[1] == "done":
            self.done = True
            self.action()


@contextmanager
def steps_said(say: Say, where: str) -> Iterator[None]:
    """``StepsSaid`` for a with-block, the engine's INFO lines let through meanwhile."""
    with _handling(StepsSaid(say, where)):
        yield


@contextmanager
def _handling(handler: logging.Handler) -> Iterator[None]:
    """``handler`` on the engine's logger for a with-block, its INFO lines let through."""
    level = logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def migrate(dsn: str, steps: Sequence[str], options: RehearsalOptions, rows: Mapping[str, int],
            *, batch_size: int, orphans: str, say: Say = _silent, where: str = "") -> Run:
    """The runbook's ``steps`` with one batch size, each timed; each said as it starts."""
    result = Run(batch_size)
    try:
        with steps_said(say, where or f"batch size {batch_size:,}"), \
                Session.open(_on(dsn), options.settings(batch_size=batch_size, orphans=orphans),
                             key=options.key, schema=options.schema) as session:
            last = max((e.id for e in session.log.entries(limit=1)), default=0)
            for step in steps:
                run(session, step, OPERATIONS[step])
            result.steps = _timings(session, rows, last)
            result.stall = _stall(session, last)
    except (MigrationError, psycopg2.Error) as exc:
        result.error = _error(exc)
    return result


def final_migration(dsn: str, plan: Plan, options: RehearsalOptions, rows: Mapping[str, int],
                    *, batch_size: int, orphans: str, say: Say = _silent
                    ) -> tuple[Run, list[Finding], list[Finding]]:
    """``full_migration`` with an application's pool beside it (``Prepared``): its statements
    prepared before the expansion, executed while ``migrate_foreign_keys`` fills the
    children's copies (``InFill``: every copy column of the plan added, the parent's
    filled, the swap still to come; at scale the fill lasts hours) and after the swap.
    The run, then what the statements gave during the fill and after the swap (none when
    the run failed)."""
    during: list[Finding] = []
    after: list[Finding] = []
    with Prepared.open(dsn, plan) as pool:  # as an application's pool, before the migration
        def filling() -> None:
            during.extend(pool.after("during the fill (before the swap)"))

        with _handling(InFill("migrate_foreign_keys", filling)):
            final = migrate(dsn, ("full_migration",), options, rows, batch_size=batch_size,
                            orphans=orphans, say=say, where="final migration")
        if not final.error:
            after = pool.after("after the swap")
    return final, during, after


def verify_timed(dsn: str, options: RehearsalOptions, plan: Plan,
                 rows: Mapping[str, int]) -> tuple[list[Finding], StepTiming]:
    """``verify``, the read-only production check, timed."""
    started = time.monotonic()
    findings = verify.run(_on(dsn), options.schema, None, key=options.key)
    tables = step_tables("verify", plan)
    return findings, StepTiming("verify", time.monotonic() - started,
                                sum(rows[t] for t in tables), tables)


def _quarantine(session: Session) -> None:
    """The first half of migrate_foreign_keys: orphans moved to the backup, nothing converted."""
    quarantine_orphans(session, preflight.check_columns(session, session.plan.children))


def rollbacks_from_each_stage(scratch: Scratch, prepared: str, baseline: Fingerprint,
                              options: RehearsalOptions, *, batch_size: int, orphans: str,
                              say: Say, smoke: list[SmokeRun] | None = None
                              ) -> list[RollbackCheck]:
    """The runbook step by step on one clone; after each stage a copy of it is rolled back
    (and, given ``smoke``, the smoke writes run on it).

    Copying the database at each stage runs every step once, where a fresh
    clone per stage would run the first steps again for each later stage.
    """
    settings = options.settings(batch_size=batch_size, orphans=orphans)
    chain = scratch.create("stages", template=prepared)
    checks: list[RollbackCheck] = []
    try:
        with steps_said(say, "runbook step by step, a copy rolled back after each stage"):
            for stage in STAGES:
                if stage == "quarantine" and orphans != "quarantine":
                    continue
                try:
                    with Session.open(_on(scratch.dsn(chain)), settings, key=options.key,
                                      schema=options.schema) as session:
                        if stage == "quarantine":
                            _quarantine(session)
                        else:
                            run(session, stage, OPERATIONS[stage])
                except (MigrationError, psycopg2.Error) as exc:
                    checks.append(RollbackCheck(stage, passed=False, message=step_message(
                        stage, _error(exc), joiner=" failed: ")))
                    break
                runs = len(smoke) if smoke is not None else 0
                checks.append(rollback_copy(scratch, chain, stage, baseline, settings,
                                            options.schema, key=options.key, smoke=smoke))
                say(f"rehearse: rollback after {stage}: "
                    + ("passed" if checks[-1].passed else "FAILED")
                    + (f"; smoke writes: {_smoke_summary(smoke[-1])}"
                       if smoke is not None and len(smoke) > runs else ""))
    finally:
        scratch.drop(chain)
    return checks


def rollback_copy(scratch: Scratch, source: str, stage: str, baseline: Fingerprint,
                  settings: Settings, schema: str, *, key: KeyColumn | None = None,
                  smoke: list[SmokeRun] | None = None) -> RollbackCheck:
    """A copy of ``source`` rolled back, its fingerprint compared with ``baseline``;
    given ``smoke``, the smoke writes on the rolled-back copy are added to it."""
    name = scratch.create(f"rollback_{stage}", template=source)
    try:
        with Session.open(_on(scratch.dsn(name)), settings, key=key, schema=schema) as session:
            outcome = run(session, "rollback", OPERATIONS["rollback"])
            entry = session.log.entries(limit=1)[0]
            plan = session.plan
        with connected(scratch.dsn(name), autocommit=True) as conn:
            differences = baseline.diff(fingerprint(conn))
        if smoke is not None:
            smoke.append(smoke_run(scratch.dsn(name), plan, f"rollback from {stage}"))
    except (MigrationError, psycopg2.Error) as exc:
        return RollbackCheck(stage, passed=False, message=_error(exc))
    finally:
        scratch.drop(name)
    seconds = ((entry.completed_at or entry.started_at) - entry.started_at).total_seconds()
    if differences:
        return RollbackCheck(stage, passed=False, seconds=seconds,
                             message=f"{len(differences)} difference(s) from the fingerprint",
                             differences=tuple(differences))
    return RollbackCheck(stage, passed=True, seconds=seconds,
                         message=f"{outcome.message}; fingerprint matches")


def live_load_run(scratch: Scratch, prepared: str, options: RehearsalOptions, *,
                  batch_size: int, orphans: str, say: Say, plan: Plan | None = None,
                  migration_s: float = 0.0) -> LoadRun:
    """``full_migration`` then ``rollback`` on a clone of ``prepared`` (not migrated yet)
    under pgbench's load (``under_load``; given ``plan``, scripts made for its tables, with
    rows for a migration of about ``migration_s``); what the application saw."""
    name = scratch.create("live_load", template=prepared)
    settings = options.settings(batch_size=batch_size, orphans=orphans)
    rows: dict[str, int] = {}

    def step(operation: str) -> str | None:
        try:
            with Session.open(_on(scratch.dsn(name)), settings, key=options.key,
                              schema=options.schema) as session:
                rows[operation] = run(session, operation, OPERATIONS[operation]).rows
        except (MigrationError, psycopg2.Error) as exc:
            return _error(exc)
        return None

    try:
        with steps_said(say, "under live load"):
            result = under_load(scratch.dsn(name), step, schema=options.schema, plan=plan,
                                pool_rows=pool_rows_for(migration_s),
                                lag_dsn=make_dsn(scratch.admin_dsn, dbname=name))
    finally:
        scratch.drop(name)
    result.rows = rows
    stall = max((p.longest_stall_s for p in result.phases if p.name in STEPS_UNDER_LOAD),
                default=0.0)
    say(f"rehearse: under live load: {result.transactions:,} application transactions, "
        f"longest stall {stall:.2f} s, " + ("; ".join(result.failed()) or "nothing failed"))
    return result


# --- the whole rehearsal -------------------------------------------------------------------------

def rehearse(database_url: str | None, options: RehearsalOptions, say: Say = _silent) -> Report:
    """The rehearsal on a throwaway server (no URL) or scratch databases; its report."""
    started = time.monotonic()
    say = _logged(say)
    with scratch_databases(database_url) as scratch:
        say(f"rehearse: a rehearsal on {scratch.description} (databases {scratch.prefix}_*); "
            "no other database is touched")
        report = Report(server=scratch.description, users=options.users, dirty=options.dirty)
        _rehearse_on(scratch, options, report, say)
    report.seconds = time.monotonic() - started
    return report


def _logged(say: Say) -> Say:
    """``say``, and the same line in the rehearsal's log."""
    def both(message: str) -> None:
        logger.info("%s", message)
        say(message)
    return both


def _rehearse_on(scratch: Scratch, options: RehearsalOptions, report: Report, say: Say) -> None:
    if options.schema_from is None:
        prepared, planted = load_dataset(scratch, options)
        say(f"rehearse: {options.users:,} users generated"
            + (" with planted problems" if options.dirty else ""))
    else:
        prepared, planted = load_application_schema(scratch, options, report, say)
    dsn = _on(scratch.dsn(prepared))
    with Session.open(dsn, options.settings(batch_size=options.batch_sizes[0],
                                            orphans=options.orphans),
                      key=options.key, schema=options.schema) as session:
        report.found, message = validate(session)
        say(f"rehearse: {step_message('validate_schema', message)}")
        report.planted = planted_checks(planted, report.found, session.plan)
        report.remedies, report.unremedied = apply_remedies(session, report.found)
    orphans = ("quarantine" if any(f.check == "orphans" for f in report.found)
               else options.orphans)
    with Session.open(dsn, options.settings(batch_size=options.batch_sizes[0], orphans=orphans),
                      key=options.key, schema=options.schema) as session:
        report.ready, report.ready_message = validate(session)
        plan = session.plan
        report.dependents = inventory(session.conn, plan, report.ready)
    if not any(f.check == "orphans" for f in report.ready):  # the remedies removed them all
        orphans = options.orphans
    say(f"rehearse: after {len(report.remedies)} remedies, "
        f"{step_message('validate_schema', report.ready_message)}")
    if report.unremedied or failures(report.ready):
        return
    with connected(dsn, autocommit=True) as conn:
        baseline = fingerprint(conn)
    report.rows = {t.name: baseline.data[(t.schema, t.name)].rows for t in plan.tables}
    report.key = str(plan.parent)

    best = try_batch_sizes(scratch, prepared, options, report, orphans, say)
    if best is None:
        return
    report.rollbacks = rollbacks_from_each_stage(scratch, prepared, baseline, options,
                                                 batch_size=best, orphans=orphans, say=say,
                                                 smoke=report.smoke)
    if options.live_load:  # on a clone of the prepared database before it is migrated
        trial_s = max(t.batched_seconds for t in report.trials
                      if t.batch_size == best and not t.error)
        report.live_load = live_load_run(scratch, prepared, options, batch_size=best,
                                         orphans=orphans, say=say,
                                         plan=None if options.schema_from is None else plan,
                                         migration_s=trial_s)
    report.final, report.prepared_during, report.prepared = final_migration(
        dsn, plan, options, report.rows, batch_size=best, orphans=orphans, say=say)
    if report.final.error:
        return
    say("rehearse: statements prepared before the final migration: " + ", ".join(
        f"{sum(f.status is Status.WARN for f in found)} of {len(found)} fail {moment}"
        for found, moment in ((report.prepared_during, "during the fill"),
                              (report.prepared, "after the swap"))) + " (see the report)")
    report.smoke.append(smoke_run(dsn, plan, "full_migration"))
    say(f"rehearse: smoke writes after full_migration: {_smoke_summary(report.smoke[-1])}")
    report.verify, timing = verify_timed(dsn, options, plan, report.rows)
    report.final.steps.append(timing)
    say(f"rehearse: final migration {report.final.seconds:.2f} s, verify: "
        f"{len(failures(report.verify))} failure(s)")
    production, source = _production(options, report.rows, plan)
    if production is not None:
        _project(scratch, options, report, plan, production, source, say)


def try_batch_sizes(scratch: Scratch, prepared: str, options: RehearsalOptions, report: Report,
                    orphans: str, say: Say) -> int | None:
    """The batched steps timed ``REPEATS`` times per batch size smaller than the largest
    table, each on a clone of ``prepared``; the size kept (None: every trial failed)."""
    sizes, report.skipped_sizes = sizes_to_try(options.batch_sizes, report.rows)
    for skipped in report.skipped_sizes:
        say(f"rehearse: skipped batch size {skipped}")
    for size in sizes:
        for repeat in range(1, REPEATS + 1):
            clone = scratch.create(f"batch_{size}_{repeat}", template=prepared)
            try:
                trial = migrate(scratch.dsn(clone), TRIAL_STEPS, options, report.rows,
                                batch_size=size, orphans=orphans, say=say,
                                where=f"batch size {size:,}, timing {repeat} of {REPEATS}")
            finally:
                scratch.drop(clone)
            report.trials.append(trial)
            say(f"rehearse: batch size {size:,}, timing {repeat} of {REPEATS}: "
                + (trial.error or f"batched steps {trial.batched_seconds:.2f} s"))
            if trial.error:
                break
    failed = {t.batch_size for t in report.trials if t.error}
    times: dict[int, list[float]] = {}
    for trial in report.trials:
        if trial.batch_size not in failed:
            times.setdefault(trial.batch_size, []).append(trial.batched_seconds)
    if not times:
        return None
    report.batch_choice = choose(times)
    say(f"rehearse: batch size {report.batch_choice.reason}")
    return report.batch_choice.batch_size


def _production(options: RehearsalOptions, measured: Mapping[str, int],
                plan: Plan) -> tuple[dict[str, int] | None, str]:
    """The rows to project for, and where they come from."""
    if options.production is not None:
        return (production_rows(options.production, measured, plan.parent.table.name),
                "--production-rows")
    if options.sizes_from is not None:
        return (table_sizes(options.sizes_from, plan),
                f"the tables of {describe_dsn(options.sizes_from)} (planner estimates)")
    return None, ""


def _project(scratch: Scratch, options: RehearsalOptions, report: Report, plan: Plan,
             production: Mapping[str, int], source: str, say: Say) -> None:
    """The final migration again on clean datasets of smaller sizes (``SIZES``), then each
    step's time fit over every size and projected for ``production``."""
    assert report.final is not None
    for users in sorted({options.users // divisor for divisor in SIZES[1:]} - {options.users},
                        reverse=True):
        if users < 10:
            continue
        sized_options = replace(options, users=users)
        name, _ = (load_dataset(scratch, sized_options, suffix=f"size_{users}", clean=True)
                   if options.schema_from is None else
                   load_application_schema(scratch, sized_options, report, _silent,
                                           suffix=f"size_{users}", clean=True))
        try:
            dsn = scratch.dsn(name)
            rows = _counts(dsn, plan)
            sized = migrate(dsn, ("full_migration",), options, rows,
                            batch_size=report.final.batch_size, orphans=options.orphans,
                            say=say, where=f"final migration at {users:,} users, for the fit")
            if not sized.error:
                sized.steps.append(verify_timed(dsn, options, plan, rows)[1])
        finally:
            scratch.drop(name)
        report.sized[users] = sized
        say(f"rehearse: {users:,} users, for the fit: "
            + (sized.error or f"final migration {sized.seconds:.2f} s"))
    runs = {options.users: report.final} | {
        users: run for users, run in report.sized.items() if not run.error}
    if len(runs) < 2:
        report.projection_note = (f"not projected: a fit needs two sizes, and {options.users:,} "
                                  "users leave no smaller size of 10 users or more")
        return
    report.projection = project(
        [timing for run in runs.values() for timing in run.steps], production,
        users=runs, source=source,
        stalls=[run.stall for run in runs.values() if run.stall is not None])


def _counts(dsn: str, plan: Plan) -> dict[str, int]:
    """Rows of each table of the plan, counted."""
    with connected(dsn, autocommit=True) as conn, conn.cursor() as cur:
        counts = {}
        for table in plan.tables:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident))
            counts[table.name] = int((cur.fetchone() or [0])[0])
    return counts


# --- the command ---------------------------------------------------------------------------------

def _option(options: Mapping[str, Any], name: str, parse: Callable[[str], Any]) -> Any:
    """A string option parsed, or a usage error naming the option (exit code 2)."""
    try:
        return parse(options[name])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'--{name.replace('_', '-')}'") from None


def schema_database(schema_from: str | None) -> str | None:
    """``--schema-from`` when it names a database (not a SQL file): the tables whose sizes
    the projection is for when ``--production-rows`` is not given."""
    if schema_from is None or schema_from.endswith(".sql") or Path(schema_from).is_file():
        return None
    return schema_from


def live_load_wanted(*, given: bool | None) -> bool:
    """``--live-load`` / ``--no-live-load`` as given; not given, on where this host has a
    pgbench to drive the load, with ``--schema-from`` too (its load made for the schema's
    tables, each table generated its share of the load's rows: ``SchemaLoad``).  Asked
    for where there is none, the report says so and fails."""
    if given is not None:
        return given
    return available()


def rehearse_command(database_url: str | None, options: Mapping[str, Any],
                     log_file: Path) -> int:
    """``data-migration --operation=rehearse``: run, print the report, return the exit code.

    Its log goes to ``log_file``, never to the operator's migration log.
    """
    key = (None if options.get("key") is None
           else _option(options, "key", partial(parse_key, schema=options["schema"])))
    if options["report"] is not None:
        _option(options, "report", lambda given: report_format(Path(given)))
    rehearsal = RehearsalOptions(
        users=options["users"], dirty=not options["clean"],
        batch_sizes=_option(options, "batch_sizes", parse_batch_sizes),
        production=(None if options["production_rows"] is None
                    else _option(options, "production_rows",
                                 partial(parse_production_rows, parent_key=key))),
        sizes_from=schema_database(options.get("schema_from")),
        schema=options["schema"], orphans=options["orphans"],
        lock_timeout_ms=options["lock_timeout_ms"], jobs=options["jobs"],
        schema_from=options.get("schema_from"), key=key, progress=not options["quiet"],
        allow_triggers=options["allow_triggers"],
        refresh_materialized_views=options["refresh_materialized_views"],
        live_load=live_load_wanted(given=options.get("live_load")))
    say: Say = _silent if options["quiet"] else partial(click.echo, err=True)
    try:
        with rehearsal_log(log_file):
            report = rehearse(database_url, rehearsal, say)
    except (throwaway.ServerUnavailable, ConnectError) as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_USAGE
    except schema_source.SchemaSourceError as exc:  # --schema-from could not be loaded
        click.echo(f"error: {exc.message}\nnext: {exc.hint}", err=True)
        return EXIT_FAILED
    except GenerateError as exc:  # --schema-from: no data could be generated for it
        click.echo(f"error: rehearse could not generate data for the schema: {exc}", err=True)
        return EXIT_FAILED
    except MigrationError as exc:  # --database-url: a role without CREATEDB
        click.echo(f"error: {exc.message}\nnext: {exc.hint}", err=True)
        return EXIT_USAGE
    except psycopg2.Error as exc:  # outside the steps, which report their own errors
        click.echo(f"error: rehearse failed: {redact_dsn(str(exc)).strip()}", err=True)
        return EXIT_FAILED
    verbose = bool(options["verbose"])
    if options["report"] is not None:
        write_report(Path(options["report"]), report, verbose=verbose)
    click.echo(as_json(report) if options["fmt"] == "json"
               else render_text(report, verbose=verbose))
    return EXIT_OK if report.passed else EXIT_FAILED
