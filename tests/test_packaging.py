"""The installed commands: documented options, and a clean install that runs."""

from __future__ import annotations

import subprocess
import tomllib
import venv
from pathlib import Path

import click
import pytest

from migration import cli, verify

PROJECT = Path(__file__).resolve().parents[1]
COMMANDS = {"data-migration": cli.main, "verify": verify.main}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help_text(name: str) -> None:
    command = COMMANDS[name]
    assert isinstance(command, click.Command)
    assert command.help
    undocumented = [p.name for p in command.params
                    if isinstance(p, click.Option) and not p.help]
    assert undocumented == []


def test_the_exit_codes_are_documented() -> None:
    for command in COMMANDS.values():
        text = " ".join(filter(None, (command.help, command.epilog)))
        for code in ("0", "1", "2"):
            assert f"{code} " in text or f"**{code}**" in text


@pytest.mark.once
def test_console_scripts_work_in_a_clean_virtualenv(tmp_path: Path) -> None:
    """Catches a runtime dependency missing from pyproject.toml."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", str(PROJECT)],
                   check=True, capture_output=True, timeout=600)
    for script in ("data-migration", "verify"):
        shown = subprocess.run([str(bin_dir / script), "--help"], capture_output=True,
                               text=True, timeout=60, check=False)
        assert shown.returncode == 0, shown.stderr
        assert "--database-url" in shown.stdout
        assert "DATABASE_URL" in shown.stdout
    version = subprocess.run([str(bin_dir / "data-migration"), "--version"],
                             capture_output=True, text=True, timeout=60, check=False)
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    assert version.stdout == f"data-migration {project['version']}\n", version.stderr
    module = subprocess.run([str(bin_dir / "python"), "-m", "migration.verify", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert module.returncode == 0, module.stderr
