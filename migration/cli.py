"""data-migration: the runbook's command line.

\b
Exit codes:
  0  the operation finished (or there was nothing to do)
  1  refused or failed because of the data or the database state; the report
     names the rows or objects and says what to do next
  2  usage error, or the database could not be reached (or the connection was lost)
  130  interrupted (Ctrl-C); like a failure, it prints where the migration stands
     and the command that resumes it
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import psycopg2
import psycopg2.errors
from click.core import ParameterSource

from migration.connection import ConnectError, connected, redact_dsn
from migration.discover import discover_command
from migration.errors import MigrationError
from migration.lag import DEFAULT_MAX_REPLICA_LAG_S
from migration.log import DEFAULT_LOG_FILE, logger, setup_file_log
from migration.model import KeyColumn
from migration.operations import OPERATIONS, Outcome, run, stage_of, status
from migration.plan import BadKey, parse_key, runbook_key
from migration.report import Finding, render
from migration.session import AmbiguousKey, Session, Settings, recorded_key

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OPERATION_NAMES = [*OPERATIONS, "status", "rehearse"]
# Options only some operations use: given with another one they would be
# silently ignored, so they are a usage error there.
OPTION_OPERATIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("users", "clean", "batch_sizes", "production_rows", "report",
                     "schema_from", "live_load"), ("rehearse",)),
    "force": ("cleanup_backup",),
    "discover": ("validate_schema",),
    "allow_publications": ("validate_schema", "migrate_users", "migrate_foreign_keys",
                           "full_migration", "rollback"),
    **dict.fromkeys(("postpone_swap", "recycle_sessions"),
                    ("migrate_foreign_keys", "full_migration", "rollback")),
    "max_rows_per_second": ("backup_data", "migrate_users", "migrate_foreign_keys",
                            "full_migration", "rollback"),
}
# Without --key, these work on the key the backup records (the runbook's key when there
# is no backup); with backups of several keys, --key must say which.
RECORDED_OPERATIONS = ("status", "rollback", "cleanup_backup", "validate_migration")
# --orphans=quarantine: the operations that quarantine, and those that judge
# orphans by it (validate_schema reports them as to be quarantined).
QUARANTINE_OPERATIONS = ("migrate_foreign_keys", "full_migration", "validate_schema", "rehearse")

# --help lists the options by the operations that use them, in the sections of
# docs/options.md (tests/test_docs.py holds the two to each other).
HELP_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Every operation", ("--operation", "--database-url", "--schema", "--key",
                         "--lock-timeout", "--statement-timeout", "--log-file", "--format",
                         "--quiet", "--verbose", "--version", "--help")),
    ("Filling the copies: migrate_users, migrate_foreign_keys, full_migration, rollback, "
     "rehearse", ("--batch-size", "--jobs")),
    ("What a run accepts instead of refusing", ("--orphans", "--allow-triggers",
                                                "--refresh-materialized-views",
                                                "--allow-publications")),
    ("Choosing the moment of the swap: migrate_foreign_keys, full_migration, rollback",
     ("--postpone-swap", "--recycle-sessions")),
    ("Standbys and subscribers: backup_data, migrate_users, migrate_foreign_keys, "
     "full_migration, rollback", ("--max-replica-lag", "--wal-compression")),
    ("Bounding the write rate: backup_data, migrate_users, migrate_foreign_keys, "
     "full_migration, rollback", ("--max-rows-per-second",)),
    ("validate_schema", ("--discover",)),
    ("cleanup_backup", ("--force",)),
    ("rehearse", ("--users", "--clean", "--batch-sizes", "--production-rows", "--report",
                  "--schema-from", "--live-load")),
)


class SectionedHelp(click.Command):
    """A command whose --help lists its options in ``HELP_SECTIONS``; one that no section
    names comes under "Other options", so none is ever left out of the help."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records: dict[str, tuple[str, str]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            long = [opt for opt in param.opts if opt.startswith("--")]
            if record is not None and long:
                records[long[0]] = record
        placed: set[str] = set()
        for title, options in HELP_SECTIONS:
            rows = [records[opt] for opt in options if opt in records]
            placed.update(options)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        others = [record for opt, record in records.items() if opt not in placed]
        if others:
            with formatter.section("Other options"):
                formatter.write_dl(others)


CRASH_VARIABLE = "UUID_MIGRATION_CRASH_AT"


class ConsoleWarnings(logging.Handler):
    """The engine's warnings on stderr as they happen, not only in the log file.

    An operator at the console must see a lock being retried, sessions still
    connected at a swap, rows the fill missed.  Errors are not repeated here:
    the command reports its failure itself.  The stream is looked up at each
    record, so the handler follows whatever stderr is current.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            start = "\r\x1b[K" if sys.stderr.isatty() else ""  # over a progress line
            click.echo(f"{start}warning: {record.getMessage()}", err=True)


def setup_console_warnings() -> None:
    if not any(isinstance(handler, ConsoleWarnings) for handler in logger.handlers):
        logger.addHandler(ConsoleWarnings())


def _crash_at(point: str | None) -> Callable[[str, int], None] | None:
    """Testing aid: SIGKILL this process on reaching ``point`` (``batch public.users.id#2``).

    The crash tests use it to prove that a run killed anywhere resumes or
    rolls back cleanly; unset, it does nothing.
    """
    if not point:
        return None

    def crash(reached: str, pid: int) -> None:
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or from the environment)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _belongs_to(flag: str, owners: tuple[str, ...], operation: str) -> click.UsageError:
    names = " or ".join(f"--operation={owner}" for owner in owners)
    return click.UsageError(f"{flag} belongs to {names}, not --operation={operation}")


def check_options(ctx: click.Context, operation: str, options: dict[str, Any]) -> None:
    """Refuse (exit 2) an option given for an operation that would ignore it."""
    for name, owners in OPTION_OPERATIONS.items():
        if operation not in owners and _given(ctx, name):
            raise _belongs_to(f"--{name.replace('_', '-')}", owners, operation)
    if (options["orphans"] == "quarantine" and operation not in QUARANTINE_OPERATIONS
            and _given(ctx, "orphans")):
        raise _belongs_to("--orphans=quarantine", QUARANTINE_OPERATIONS, operation)


def _print_outcome(outcome: Outcome, fmt: str, *, verbose: bool) -> None:
    if fmt == "json":
        click.echo(json.dumps({"ok": True, "message": outcome.message, "rows": outcome.rows,
                               "findings": [f.as_dict() for f in outcome.findings],
                               "details": outcome.details}, default=str, indent=2))
        return
    shown = [f for f in outcome.findings if verbose or f.status != "pass"]
    if shown:
        click.echo(render(shown))
    click.echo(outcome.message)


def _print_error(message: str, hint: str, findings: list[Finding], fmt: str,
                 state: str | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps({"ok": False, "error": message, "next": hint, "state": state,
                               "findings": [f.as_dict() for f in findings]},
                              default=str, indent=2))
        return
    if findings:
        click.echo(render([f for f in findings if f.status in ("fail", "warn")]))
    click.echo(f"error: {message}", err=True)
    if state:
        click.echo(f"state: {state}", err=True)
    if hint:
        click.echo(f"next: {hint}", err=True)


def _state_now(database_url: str, schema: str, key: KeyColumn | None) -> str:
    """Where the migration stands, read afresh after a failure: each column's stage."""
    try:
        with Session.open(database_url, Settings(show_progress=False), key=key, schema=schema,
                          lock=False) as session:
            if session.plan.parent == runbook_key(schema):
                return stage_of(session)
            return (f"{stage_of(session)} (key {session.plan.key}: the commands that resume "
                    f"or roll back need --key {session.plan.key})")
    except (psycopg2.Error, ConnectError, MigrationError) as exc:
        return f"unknown: the database could not be read ({redact_dsn(str(exc)).strip()})"


def _rerun(operation: str, key: KeyColumn | None, schema: str,
           accepted: Sequence[str] = ()) -> str:
    """The options that run ``operation`` again as it was given: ``--schema`` other than
    public, ``--key`` for a key other than the runbook's (only the operations after the
    backup read it back), and the options that accept what the run would otherwise refuse
    (``accepted``: triggers, materialized views, orphans to quarantine)."""
    options = [f"--operation={operation}"]
    if schema != "public":
        options.append(f"--schema={shlex.quote(schema)}")
    if key is not None and key != runbook_key(schema):
        options.append(f"--key {shlex.quote(key.spec)}")
    return " ".join([*options, *accepted])


def _parsed_key(text: str | None, schema: str) -> KeyColumn | None:
    if text is None:
        return None
    try:
        return parse_key(text, schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from None


def _roles(text: str | None) -> tuple[str, ...]:
    """``--recycle-sessions``: role names as ``pg_roles`` spells them, comma-separated."""
    if text is None:
        return ()
    roles = tuple(role.strip() for role in text.split(","))
    if not all(roles):
        raise click.BadParameter("an empty role name", param_hint="--recycle-sessions")
    return roles


def _default_key(database_url: str, operation: str, schema: str) -> KeyColumn | None:
    """The key of an operation run without --key: the recorded one (None: Session.open
    finds it) for those that follow the backup, else the runbook's."""
    if operation not in RECORDED_OPERATIONS:
        return runbook_key(schema)
    with connected(database_url) as conn:
        try:
            return recorded_key(conn, schema, strict=True)
        except AmbiguousKey as exc:
            raise click.UsageError(str(exc)) from None


@click.command(cls=SectionedHelp, context_settings={"help_option_names": ["-h", "--help"]},
               epilog=__doc__)
@click.version_option(package_name="uuid-migration", prog_name="data-migration",
                      message="%(prog)s %(version)s")
@click.option("--operation", "operation", required=True, type=click.Choice(OPERATION_NAMES),
              help="The runbook step to run.")
@click.option("--database-url", envvar="DATABASE_URL", show_envvar=True,
              help="PostgreSQL URL of the database to migrate (rehearse: a server and a role "
                   "with CREATEDB to create scratch databases on; omit it for a throwaway "
                   "server).")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Rows per batch (one commit each) when filling the uuid columns.")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(min=1),
              help="migrate_users, migrate_foreign_keys, full_migration, rollback, rehearse: "
                   "connections filling the key columns' copies at once, each on its own "
                   "slice of a table's primary key, and then proving, indexing and "
                   "validating different tables' copies side by side (1: one slice after "
                   "the other on one connection, and so the rest); validate_migration: "
                   "connections reading the tables side by side in one snapshot.")
@click.option("--schema", default="public", show_default=True,
              help="Schema holding users and the runbook's tables.")
@click.option("--key", metavar="SCHEMA.TABLE.COLUMN",
              help="The parent key to convert (TABLE.COLUMN: in --schema; double-quote names "
                   "with dots or capitals). Every column referring to it through a foreign "
                   "key joins the plan. Default: the runbook's users.id; status, rollback, "
                   "cleanup_backup and validate_migration: the key the backup records.")
@click.option("--discover", is_flag=True, help="validate_schema: list every string column "
              "holding only UUIDs, with row counts, keys and the foreign keys between them, "
              "and the --key to pass for each (reads only).")
@click.option("--orphans", type=click.Choice(["abort", "quarantine"]), default="abort",
              show_default=True,
              help="migrate_foreign_keys, full_migration, rehearse: refuse on rows "
                   "referring to no user, or move them to the backup schema (rollback "
                   "restores them); validate_schema: report them as to be quarantined.")
@click.option("--lock-timeout", "lock_timeout_ms", default=100, show_default=True,
              type=click.IntRange(min=1), help="Milliseconds any DDL waits for a lock "
              "before it is retried with backoff (the application's queries queue behind "
              "it that long at most).  The swap and the change log's triggers ask for "
              "their tables without waiting, retried within milliseconds, and wait in the "
              "queue this long per attempt only after 30 times this long of such tries.  "
              "Kept under half the server's deadlock_timeout, so that in a deadlock with "
              "the application the engine's transaction is the one that gives up.")
@click.option("--statement-timeout", "statement_timeout_ms", default=300_000,
              show_default=True, type=click.IntRange(min=0),
              help="Milliseconds an ordinary statement may run (0: no limit); the steps "
                   "that read or rewrite whole tables are not limited.")
@click.option("--force", is_flag=True, help="cleanup_backup: drop the backup without a "
              "passing validate_migration, or with quarantined rows in it (logged).")
@click.option("--allow-triggers", is_flag=True, help="Accept application triggers that "
              "the fill of the uuid columns fires (when the role may not set "
              "session_replication_role) or whose bodies use the key column; they are named "
              "as warnings, and the fill runs with the role's default search_path.")
@click.option("--refresh-materialized-views", is_flag=True, help="Carry the materialized "
              "views over the key columns: the swap creates each again empty and it is "
              "refreshed right after (its readers wait for the refresh; writes do not).")
@click.option("--allow-publications", is_flag=True, help="Go ahead although a publication "
              "that cannot be given a column list (FOR ALL TABLES, TABLES IN SCHEMA, "
              "PostgreSQL before 15, another role's) would send the engine's columns to its "
              "subscribers: they were given those columns first, or are paused.")
@click.option("--postpone-swap", is_flag=True, help="migrate_foreign_keys, full_migration, "
              "rollback: stop ready to swap, every column expanded and proven (the sync "
              "triggers keep the copies in step meanwhile); run it again without the flag "
              "to swap.")
@click.option("--recycle-sessions", metavar="ROLE[,ROLE...]",
              help="migrate_foreign_keys, full_migration, rollback: right after the swap, end "
                   "the idle sessions of these roles that connected before it (their prepared "
                   "statements would fail), so their pools open new ones; busy sessions are "
                   "left and named.")
@click.option("--max-replica-lag", "max_replica_lag_s", default=DEFAULT_MAX_REPLICA_LAG_S,
              show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Pause the fill, and every other step that writes a table's worth of WAL, "
                   "between batches while a standby or a logical subscriber of this server "
                   "is further behind than this (0: never; reading the lag needs "
                   "pg_monitor).")
@click.option("--wal-compression/--no-wal-compression", "wal_compression", default=True,
              show_default=True, help="With full-page writes on and wal_compression off on "
              "the server, the engine's sessions set it to lz4 for their own WAL, where the "
              "server has lz4 and the role may set it (a superuser, or GRANT SET ON "
              "PARAMETER): a third of the WAL, measured. --no-wal-compression leaves it as "
              "the server has it (a standby whose build lacks lz4 could not replay it).")
@click.option("--max-rows-per-second", "max_rows_per_second", type=click.IntRange(min=1),
              metavar="N", help="Pace the backup's copy, the fill and the rollback's fill and "
              "respelling: after each batch, wait so that they write at most N rows a second "
              "(all --jobs together). Default: no bound.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_LOG_FILE, show_default=True, help="Detailed log (rehearse: "
              "default logs/migration/rehearse-<timestamp>.log, its own file).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Report format on standard output.")
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="rehearse: users in the generated legacy dataset (journal entries, tags "
                   "and reminders in proportion).")
@click.option("--clean", is_flag=True, help="rehearse: generate the dataset without the "
              "planted problems (invalid, colliding and non-canonical ids, orphans).")
@click.option("--batch-sizes", default="1000,10000,50000", show_default=True,
              help="rehearse: batch sizes to time (comma-separated; those not smaller than the "
                   "largest table are skipped); the one kept runs the final migration: the "
                   "fastest beyond noise, else 1000.")
@click.option("--production-rows", metavar="N|TABLE=N,...",
              help="rehearse: project the write stall and the total time for N users (other "
                   "tables in the rehearsal's proportions), or for users=N,journal_entries=M,...")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="rehearse: also write the report to this file, in the format its suffix "
                   "names: .md Markdown, .json JSON, .xml JUnit XML (one test case per proof, "
                   "for CI).")
@click.option("--schema-from", "schema_from", metavar="DSN|FILE.sql",
              help="rehearse: rehearse on this schema instead of the runbook's fixture: a "
                   "database's (pg_dump --schema-only; the password is passed in the "
                   "environment) or a SQL file's. Every table gets generated rows; --key "
                   "names the key to convert, --users the rows of its table.")
@click.option("--live-load/--no-live-load", "live_load", default=None, help="rehearse: run "
              "full_migration and rollback once more on a clone while pgbench writes to it "
              "(every table of the plan; with --schema-from, scripts made for its tables), "
              "and report what the application saw: failed transactions, lost writes, "
              "latencies, the longest stall. Default: on where pgbench 15 or later is "
              "found.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--verbose", "-v", is_flag=True, help="Show passing checks too.")
@click.pass_context
def main(ctx: click.Context, /, operation: str, database_url: str | None,
         **options: Any) -> None:
    """Migrate string UUID keys (VARCHAR(36)) to PostgreSQL's native uuid type,
    following the operators' runbook step by step."""
    check_options(ctx, operation, options)
    setup_console_warnings()
    fmt, verbose = options["fmt"], options["verbose"]
    if operation == "rehearse":
        from migration.rehearsal.rehearse import rehearsal_log_file, rehearse_command
        log_file = options["log_file"] if _given(ctx, "log_file") else rehearsal_log_file()
        ctx.exit(rehearse_command(database_url, options, log_file))
    setup_file_log(options["log_file"])
    if not database_url:
        raise click.UsageError("no database: pass --database-url or set DATABASE_URL")
    key = _parsed_key(options["key"], options["schema"])
    if options["discover"]:
        if key is not None:
            raise click.UsageError("--discover lists the candidate keys of every schema: it "
                                   "takes no --key")
        ctx.exit(discover_command(database_url, fmt))
    settings = Settings(batch_size=options["batch_size"],
                        lock_timeout_ms=options["lock_timeout_ms"],
                        statement_timeout_ms=options["statement_timeout_ms"],
                        orphans=options["orphans"], force=options["force"],
                        jobs=options["jobs"],
                        allow_triggers=options["allow_triggers"],
                        refresh_materialized_views=options["refresh_materialized_views"],
                        allow_publications=options["allow_publications"],
                        postpone_swap=options["postpone_swap"],
                        recycle_roles=_roles(options["recycle_sessions"]),
                        max_replica_lag_s=options["max_replica_lag_s"],
                        wal_compression=options["wal_compression"],
                        max_rows_per_second=options["max_rows_per_second"] or 0,
                        show_progress=not options["quiet"])
    again = _rerun(operation, key, options["schema"], [
        flag for flag, given in (
            ("--allow-triggers", options["allow_triggers"]),
            ("--refresh-materialized-views", options["refresh_materialized_views"]),
            ("--allow-publications", options["allow_publications"]),
            ("--orphans=quarantine", options["orphans"] == "quarantine")) if given])
    try:
        key = key or _default_key(database_url, operation, options["schema"])
        with Session.open(database_url, settings, key=key, schema=options["schema"],
                          lock=operation != "status") as session:
            session.fault = _crash_at(os.environ.get(CRASH_VARIABLE))
            outcome = (status(session) if operation == "status"
                       else run(session, operation, OPERATIONS[operation]))
    except MigrationError as exc:
        _print_error(exc.message, exc.hint, exc.findings, fmt, None if isinstance(exc, BadKey)
                     else _state_now(database_url, options["schema"], key))
        ctx.exit(EXIT_REFUSED)
    except ConnectError as exc:
        _print_error(str(exc), "check the URL, the server and the credentials", [], fmt)
        ctx.exit(EXIT_USAGE)
    except psycopg2.errors.QueryCanceled as exc:  # an OperationalError, but no connection lost
        _print_error(f"{operation} failed: {redact_dsn(str(exc)).strip()}",
                     f"run {again} again (it resumes), with a longer "
                     "--statement-timeout if a statement ran out of time (0: no limit); "
                     "or --operation=rollback", [], fmt,
                     _state_now(database_url, options["schema"], key))
        ctx.exit(EXIT_REFUSED)
    except psycopg2.OperationalError as exc:
        logger.error("%s: connection lost: %s", operation, redact_dsn(str(exc)))
        _print_error(f"{operation}: the connection was lost: {redact_dsn(str(exc)).strip()}",
                     f"run {again} again: it resumes where it stopped "
                     "(--operation=status shows where that is)", [], fmt)
        ctx.exit(EXIT_USAGE)
    except psycopg2.Error as exc:
        _print_error(f"{operation} failed: {redact_dsn(str(exc)).strip()}",
                     f"the statement that failed was rolled back, earlier steps stay; fix the "
                     f"cause and run {again} again (it resumes), or "
                     "--operation=rollback", [], fmt,
                     _state_now(database_url, options["schema"], key))
        ctx.exit(EXIT_REFUSED)
    except KeyboardInterrupt:
        logger.error("%s: interrupted", operation)
        _print_error(f"{operation} interrupted", f"run {again} again (it "
                     "resumes where it stopped), or --operation=rollback", [], fmt,
                     _state_now(database_url, options["schema"], key))
        ctx.exit(EXIT_INTERRUPTED)
    _print_outcome(outcome, fmt, verbose=verbose)
    if outcome.details.get("ready_to_swap") and fmt == "text":  # --postpone-swap
        click.echo(f"next: data-migration {again} (without --postpone-swap) swaps")


if __name__ == "__main__":  # python -m migration.cli
    sys.exit(main())
