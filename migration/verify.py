"""verify: the read-only check of a migrated database, for production.

\b
Exit codes:
  0  every check passed
  1  at least one check failed (or, with --strict, was skipped)
  2  the checks could not run: usage, connection, permissions

It runs the checks of validate_migration in one read-only REPEATABLE READ
transaction (one snapshot), rolled back at the end, its heavy reads side by side on
--jobs connections reading that snapshot (read only too), and needs no more than
SELECT on the tables and USAGE on their schemas.  While migration_backup
exists, comparing with it needs the migrating role itself: the backup is
private to it (the backup_private check fails on any other grant), as is
migration_log.  Another role gets every other check, and those comparisons
skipped with the reason.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import click
import psycopg2
import psycopg2.errors
from psycopg2.extensions import ISOLATION_LEVEL_REPEATABLE_READ

from migration import checks
from migration.connection import ConnectError, connect, connected, describe_dsn, redact_dsn
from migration.errors import MigrationError
from migration.model import KeyColumn
from migration.plan import build_plan, parse_key
from migration.report import Finding, Status
from migration.session import AmbiguousKey, recorded_key

EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
APPLICATION_NAME = "uuid-migration verify"


@dataclass(frozen=True)
class Result:
    """One check's outcome: the worst of its findings."""

    name: str
    status: Status  # PASS, FAIL or SKIP
    findings: list[Finding]

    @property
    def detail(self) -> str:
        shown = self.findings if self.status is Status.PASS else [
            f for f in self.findings if f.status is not Status.PASS]
        return "; ".join(f"{f.subject}: {f.message}" if f.subject else f.message for f in shown)


def results(findings: list[Finding], names: list[str], *, strict: bool) -> list[Result]:
    """A result per check asked for.

    A check that reported nothing fails: a check that silently did not run
    must never look like one that passed.
    """
    out = []
    for name in names:
        own = [f for f in findings if f.check == name] or [
            Finding(name, Status.FAIL, "the check reported nothing")]
        statuses = {f.status for f in own}
        if Status.FAIL in statuses:
            status = Status.FAIL
        elif Status.SKIP in statuses:
            status = Status.FAIL if strict else Status.SKIP
        else:
            status = Status.PASS
        out.append(Result(name, status, own))
    return out


def run(dsn: str, schema: str, only: set[str] | None,
        key: KeyColumn | None = None, jobs: int = 1) -> list[Finding]:
    """The checks' findings, read from one snapshot in a read-only transaction, the heavy
    reads on up to ``jobs`` read-only connections that import it.

    ``key`` None: the key the backup records (AmbiguousKey when there are
    backups of several), or the runbook's ``users.id`` in ``schema``.
    """
    conn = connect(dsn, readonly=True, application_name=APPLICATION_NAME)
    try:
        conn.set_session(isolation_level=ISOLATION_LEVEL_REPEATABLE_READ, readonly=True)
        with conn.cursor() as cur:
            # The catalog functions expect the deparser's fully qualified output.
            cur.execute("SET LOCAL search_path = pg_catalog, pg_temp")
            key = key or recorded_key(conn, schema, strict=True)
            findings = checks.run_checks(
                cur, build_plan(conn, key, schema), only=only, jobs=jobs,
                opener=partial(connected, dsn, readonly=True, application_name=APPLICATION_NAME))
        conn.rollback()
        return findings
    finally:
        conn.close()


def render_table(target: str, checked: list[Result]) -> str:
    """The readable report: one row per check, then the details of each failure."""
    width = max(len("check"), *(len(r.name) for r in checked))
    lines = [f"verify {target}", "", f"{'check':{width}}  result  detail",
             f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:{width}}  {r.status:6}  {r.detail}" for r in checked]
    for r in checked:
        if r.status is Status.FAIL:
            lines += ["", *(f.render() for f in r.findings if f.status is not Status.PASS)]
    lines += ["", summary_line(checked)]
    return "\n".join(lines)


def summary_line(checked: list[Result]) -> str:
    counts = {status: sum(r.status is status for r in checked)
              for status in (Status.PASS, Status.FAIL, Status.SKIP)}
    verdict = "FAILED" if counts[Status.FAIL] else "passed"
    return (f"{len(checked)} checks: {counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, "
            f"{counts[Status.SKIP]} skipped: {verdict}")


def as_json(database: str, schema: str, checked: list[Result], exit_code: int) -> dict[str, Any]:
    return {
        "database": database,
        "schema": schema,
        "passed": exit_code == EXIT_PASSED,
        "exit_code": exit_code,
        "summary": summary_line(checked),
        "checks": [{"name": r.name, "description": checks.CHECK_NAMES[r.name],
                    "result": str(r.status), "detail": r.detail,
                    "findings": [f.as_dict() for f in r.findings]} for r in checked],
    }


def junit_xml(checked: list[Result], error: str | None = None) -> bytes:
    """One test case per check; a run that could not start is one errored case."""
    suite = ET.Element("testsuite", name="verify", tests=str(len(checked) or 1),
                       failures=str(sum(r.status is Status.FAIL for r in checked)),
                       errors="1" if error else "0",
                       skipped=str(sum(r.status is Status.SKIP for r in checked)))
    if error is not None:
        case = ET.SubElement(suite, "testcase", classname="verify", name="verify")
        ET.SubElement(case, "error", message=error).text = error
    for r in checked:
        case = ET.SubElement(suite, "testcase", classname="verify", name=r.name)
        if r.status is Status.FAIL:
            ET.SubElement(case, "failure", message=r.detail).text = "\n".join(
                f.render() for f in r.findings if f.status is not Status.PASS)
        elif r.status is Status.SKIP:
            ET.SubElement(case, "skipped", message=r.detail)
    root = ET.Element("testsuites")
    root.append(suite)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document


def check_listing(fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"name": name, "description": text}
                           for name, text in checks.CHECK_NAMES.items()], indent=2)
    width = max(len(name) for name in checks.CHECK_NAMES)
    return "\n".join(f"{name:{width}}  {text}" for name, text in checks.CHECK_NAMES.items())


def fail_to_run(message: str, hint: str, fmt: str, junit: Path | None) -> NoReturn:
    """Report why the checks could not run, and exit 2."""
    message = redact_dsn(message).strip()
    if junit is not None:
        junit.write_bytes(junit_xml([], error=message))
    if fmt == "json":
        click.echo(json.dumps({"passed": False, "exit_code": EXIT_ERROR, "error": message,
                               "next": hint}, indent=2))
    else:
        click.echo(f"error: {message}", err=True)
        click.echo(f"next: {hint}", err=True)
    sys.exit(EXIT_ERROR)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=__doc__)
@click.option("--database-url", envvar="DATABASE_URL", show_envvar=True,
              help="PostgreSQL URL of the migrated database (read only).")
@click.option("--schema", default="public", show_default=True,
              help="Schema holding users and the runbook's tables.")
@click.option("--key", metavar="SCHEMA.TABLE.COLUMN",
              help="The migrated parent key (default: the key the backup records, else the "
                   "runbook's users.id).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Report format on standard output.")
@click.option("--junit-xml", "junit", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a JUnit XML file, one test case per check.")
@click.option("--check", "selected", multiple=True, metavar="NAME",
              type=click.Choice(list(checks.CHECK_NAMES)),
              help="Run only this check (repeatable); --list-checks names them.")
@click.option("--list-checks", is_flag=True, help="List the checks and what each one proves.")
@click.option("--strict", is_flag=True, help="Count a skipped check as a failure.")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Connections reading the tables side by side, all in the one snapshot "
                   "(1: every check on one connection).")
def main(*, database_url: str | None, schema: str, key: str | None, fmt: str,
         junit: Path | None, selected: tuple[str, ...], list_checks: bool,
         strict: bool, jobs: int) -> None:
    """Check, without changing anything, that a database is completely and
    correctly migrated to uuid keys."""
    if list_checks:
        click.echo(check_listing(fmt))
        return
    if not database_url:
        raise click.UsageError("no database: pass --database-url or set DATABASE_URL")
    try:
        parsed = None if key is None else parse_key(key, schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from None
    database = describe_dsn(database_url)
    target = f"{database} (schema {schema})"
    try:
        findings = run(database_url, schema, set(selected) or None, parsed, jobs)
    except AmbiguousKey as exc:
        raise click.UsageError(str(exc)) from None
    except MigrationError as exc:
        fail_to_run(exc.message, exc.hint, fmt, junit)
    except ConnectError as exc:
        fail_to_run(str(exc), "check the URL, the server and the credentials", fmt, junit)
    except psycopg2.errors.InsufficientPrivilege as exc:
        fail_to_run(f"verify could not read {target}: {exc}",
                    "grant the role SELECT on the tables and USAGE on their schemas; while "
                    "the backup schema exists, run verify as the migrating role (the backup is "
                    "private to it)", fmt, junit)
    except psycopg2.Error as exc:
        fail_to_run(f"verify could not run on {target}: {exc}",
                    "check the server and the connection, then run verify again", fmt, junit)
    checked = results(findings, [n for n in checks.CHECK_NAMES if not selected or n in selected],
                      strict=strict)
    exit_code = EXIT_FAILED if any(r.status is Status.FAIL for r in checked) else EXIT_PASSED
    if junit is not None:
        junit.write_bytes(junit_xml(checked))
    if fmt == "json":
        click.echo(json.dumps(as_json(database, schema, checked, exit_code), default=str, indent=2))
    else:
        click.echo(render_table(target, checked))
    sys.exit(exit_code)


if __name__ == "__main__":  # python -m migration.verify
    main()
