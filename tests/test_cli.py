"""data-migration as an operator meets it: --version, --help, misplaced options, its logs."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from migration import verify
from migration.cli import main
from migration.rehearsal.sandbox import Sandbox, with_credentials
from tests.operate import operate

PROJECT = Path(__file__).resolve().parents[1]


def test_version_is_the_package_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"data-migration {importlib.metadata.version('uuid-migration')}\n"


def test_help_lists_the_exit_codes_one_per_line() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    start = lines.index("Exit codes:")
    assert [line[:3] for line in lines[start + 1:]
            if line[:1].isdigit()] == ["0  ", "1  ", "2  ", "130"]
    assert lines[start + 1].startswith("0  the operation finished")
    assert any(line.startswith("2  usage error") for line in lines[start + 1:])


MISPLACED = [
    ("status", ["--users=10"], "--users belongs to --operation=rehearse"),
    ("validate_schema", ["--clean"], "--clean belongs to --operation=rehearse"),
    ("full_migration", ["--batch-sizes=1000"], "--batch-sizes belongs to --operation=rehearse"),
    ("migrate_users", ["--production-rows=1000"],
     "--production-rows belongs to --operation=rehearse"),
    ("status", ["--report", "r.md"], "--report belongs to --operation=rehearse"),
    ("full_migration", ["--force"], "--force belongs to --operation=cleanup_backup"),
    ("rollback", ["--force"], "--force belongs to --operation=cleanup_backup"),
    ("backup_data", ["--orphans=quarantine"],
     "--orphans=quarantine belongs to --operation=migrate_foreign_keys or "
     "--operation=full_migration"),
    ("status", ["--orphans=quarantine"], "--orphans=quarantine belongs to"),
    ("backup_data", ["--recycle-sessions=app"], "--recycle-sessions belongs to"),
]


@pytest.mark.parametrize(("operation", "options", "message"), MISPLACED)
def test_an_option_of_another_operation_is_a_usage_error(
        tmp_path: Path, operation: str, options: list[str], message: str) -> None:
    """Refused before any connection: the URL names no server at all."""
    result = CliRunner().invoke(main, [f"--operation={operation}", *options, "--database-url",
                                       "postgresql://nobody@127.0.0.1:1/none",
                                       "--log-file", str(tmp_path / "log")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert f"not --operation={operation}" in result.output


def test_options_where_they_belong_and_defaults_given_are_accepted(legacy_db: str) -> None:
    """Given explicitly at their default value (``--orphans=abort``) or where they belong."""
    assert operate(legacy_db, "status", "--orphans=abort").exit_code == 0
    assert operate(legacy_db, "validate_schema", "--orphans=quarantine").exit_code == 0


def _data_migration(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", "migration.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.once
def test_the_rehearsal_log_file_can_be_named(tmp_path: Path, sandbox: Sandbox) -> None:
    log = tmp_path / "elsewhere" / "rehearsal.log"
    result = _data_migration(tmp_path, "--operation=rehearse", "--users=200", "--clean",
                             "--batch-sizes=1000", "--no-live-load",
                             "--database-url", sandbox.admin_dsn,
                             "--log-file", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rehearsal, database " in log.read_text()
    assert not (tmp_path / "logs").exists()
    # on a server given by URL, the scratch databases' names: uuidmig_rehearse_<...>_*
    # (the default log file, on a throwaway server: test_readme's main job)
    assert any("[rehearsal, database uuidmig_rehearse_" in line and "_prepared]" in line
               for line in log.read_text().splitlines())


@pytest.mark.parametrize("password", [
    "Se cret4Part@Cret4Part", "FirstPart/Second@ThirdPart", "FirstPart@Second?ThirdPart=x",
    "FirstPart:SecondPart@ThirdPart", "FirstPart@Second#ThirdPart"])
def test_a_password_a_url_must_encode_shows_no_piece_of_itself(
        sandbox: Sandbox, password: str) -> None:
    """Unencoded, a password's @ or / makes libpq read pieces of it as the host, the port,
    the database or a parameter, and quote them in its errors: refused before connecting,
    with what to do, and no piece of it in the output."""
    dsn = with_credentials(sandbox.admin_dsn, user="app_owner", password=password,
                           dbname="postgres")
    pieces = [piece for piece in re.split(r"[ @/?#:=]", password) if len(piece) > 1]
    outputs = [operate(dsn, "status"), CliRunner().invoke(verify.main, ["--database-url", dsn])]
    for result in outputs:
        assert result.exit_code == 2, result.output
        assert "percent-encode" in result.output
        assert [piece for piece in pieces if piece in result.output] == []
