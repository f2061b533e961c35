"""The README's quickstart stays true: its commands are the ones CI and the tests run."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from migration import verify
from migration.cli import main
from migration.log import DEFAULT_LOG_FILE
from migration.rehearsal.rehearse import STAGES
from tests.operate import PLAN_KEYS, execute, seeded

PROJECT = Path(__file__).resolve().parents[1]


def quickstart() -> list[str]:
    """The two commands of the README's quickstart, in order."""
    text = (PROJECT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    return [block.split("```", 1)[0].strip() for block in blocks]


def test_ci_runs_the_readmes_test_command() -> None:
    _, tests = quickstart()
    ci = (PROJECT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


@pytest.mark.once
def test_the_readmes_main_job_runs(tmp_path: Path, legacy_db: str) -> None:
    """The first command after its install step, with the installed console script, as
    written but for ``--report``: the whole rehearsal passes, and it logs to its own file.

    The one rehearsal through the console script: what the quickstart's report holds
    (test_rehearse's small one before), and that the operator's default log gets nothing
    from a rehearsal while its own file says on every line that it is one and which scratch
    database it is about (test_cli's before)."""
    main_job, _ = quickstart()
    install, run = main_job.split(" && ")
    assert install == "python3 -m pip install '.[embedded]'"
    words = shlex.split(run)
    assert words[0] == "data-migration"
    script = str(Path(sys.executable).with_name("data-migration"))
    operator = subprocess.run([script, "--operation=status", "--database-url", legacy_db],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              check=False)
    assert operator.returncode == 0, operator.stderr
    operator_log = tmp_path / DEFAULT_LOG_FILE
    before = operator_log.read_text()

    done = subprocess.run([script, *words[1:], "--report", "ticket.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UUID migration rehearsal: PASSED" in done.stdout
    assert "Projected time for production" in done.stdout
    report = json.loads((tmp_path / "ticket.json").read_text())
    assert report["passed"] is True
    assert report["problems"] == []
    assert {p["check"] for p in report["planted"]} == {
        "invalid_uuid", "collision", "non_canonical", "orphans"}
    assert [r["stage"] for r in report["rollbacks"]] == list(STAGES)
    assert report["projection"]["rows"]["users"] == 1_000_000
    assert 0 < report["projection"]["low"] <= report["projection"]["high"]
    assert report["projection"]["stall"][0] > 0
    # --live-load is on by default where pgbench is found (the suite's hosts have one)
    assert [p["name"] for p in report["live_load"]["phases"]] == [
        "before", "full_migration", "rollback", "after"]
    assert report["live_load"]["problems"] == []

    assert operator_log.read_text() == before
    [own] = operator_log.parent.glob("rehearse-*.log")
    lines = own.read_text().splitlines()
    marked = [line for line in lines if "[rehearsal, database " in line]
    assert len(marked) > 10
    assert all(line.startswith(" ") for line in lines if line not in marked)  # continuations
    # the throwaway server's scratch databases: rehearse_* (on a server given by URL,
    # uuidmig_rehearse_<...>_*)
    assert any("[rehearsal, database rehearse_prepared]" in line for line in marked)
    # the planted refusal reads once, on the console and in the log
    assert "rehearse: validate_schema refused" in done.stderr
    assert "validate_schema: validate_schema" not in done.stderr + own.read_text()


def option_reference() -> str:
    """The option reference the README links to."""
    return (PROJECT / "docs" / "options.md").read_text()


def test_every_option_of_data_migration_is_in_the_option_reference() -> None:
    reference = option_reference()
    missing = [opt for param in main.params if isinstance(param, click.Option)
               for opt in param.opts[:1] if opt.startswith("--") and opt != "--operation"
               and f"`{opt}" not in reference]
    assert missing == []


def test_the_jobs_help_and_the_option_reference_name_the_same_operations() -> None:
    [jobs] = [p for p in main.params if p.name == "jobs"]
    assert isinstance(jobs, click.Option)
    assert jobs.help
    operations = jobs.help.split(":", 1)[0]
    assert operations.startswith("migrate_users")
    assert " ".join(f"{operations}:".split()) in " ".join(option_reference().split())


def test_the_readme_links_the_runbook_and_the_option_reference() -> None:
    readme = (PROJECT / "README.md").read_text()
    assert "(docs/runbook.md)" in readme
    assert "(docs/options.md)" in readme
    assert (PROJECT / "docs" / "runbook.md").read_text().startswith("# The runbook")


def test_the_readme_sends_every_page_of_the_docs_its_reader() -> None:
    """Each page of docs/ is linked from the README, so what moved there can be found."""
    readme = (PROJECT / "README.md").read_text()
    unlinked = [page.name for page in sorted((PROJECT / "docs").glob("*.md"))
                if f"(docs/{page.name})" not in readme]
    assert unlinked == []


def test_the_first_screen_holds_the_quickstart_and_the_commands() -> None:
    """What it does, the two quickstart commands, the commands for one's own database and
    where to read more come before anything else."""
    readme = (PROJECT / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Quickstart", "## Using it on your database", "## Read more"]
    first_screen = readme.split("\n## ", 4)
    assert len("\n## ".join(first_screen[:4]).splitlines()) <= 60


def readme_section(title: str) -> str:
    text = (PROJECT / "README.md").read_text()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_commands_for_ones_own_database_run_as_written(
        legacy_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line of "Using it on your database", in order, from the directory an operator
    would run them in, with DATABASE_URL set to a legacy database: each exits 0, and the
    keys are uuid at the end."""
    seeded(legacy_db, users=20)
    monkeypatch.chdir(tmp_path)
    section = readme_section("Using it on your database")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    export, *commands = [line for line in lines if line]
    assert export.startswith("export DATABASE_URL=")
    tools = {"data-migration": main, "verify": verify.main}
    for command in commands:
        name, *args = shlex.split(command)
        done = CliRunner().invoke(tools[name], args, env={"DATABASE_URL": legacy_db})
        assert done.exit_code == 0, f"{command}:\n{done.output}"
    assert [name for name, *_ in map(shlex.split, commands)] == [
        "data-migration", "data-migration", "data-migration", "verify"]
    types = execute(legacy_db, "SELECT table_name, column_name, data_type FROM "
                               "information_schema.columns WHERE table_schema = 'public'")
    assert {(table, column): kind for table, column, kind in types
            if ("public", table, column) in PLAN_KEYS} == {
        key[1:]: "uuid" for key in PLAN_KEYS}
    assert (tmp_path / "logs" / "migration" / "data_migration.log").exists()

