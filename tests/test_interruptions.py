"""A step that fails or is interrupted after something was committed says exactly where the
migration stands (each column's stage) and the command that goes on from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.operate import connected, execute, operate, run_ok, seeded

# The engine interrupted: on the oldest and the newest server.
pytestmark = pytest.mark.edges

STATE = ("state: expanding (public.users.id: indexed, public.journal_entries.user_id: string, "
         "public.tags.user_id: string, public.reminders.user_id: string)")


def test_a_refusal_after_the_expansion_says_where_the_migration_stands(legacy_db: str) -> None:
    seeded(legacy_db, users=60)
    run_ok(legacy_db, "backup_data")
    run_ok(legacy_db, "migrate_users")
    execute(legacy_db, "CREATE MATERIALIZED VIEW tag_owners AS SELECT user_id FROM tags")
    result = operate(legacy_db, "migrate_foreign_keys")
    assert result.exit_code == 1
    assert STATE in result.output
    assert "materialized view public.tag_owners" in result.output


def test_ctrl_c_stops_with_the_state_and_the_command_that_resumes(legacy_db: str) -> None:
    """SIGINT in the middle of the users' fill: exit 130, the stage, the next command; the
    same command then finishes the step.  The command starts with SIGINT's default
    disposition, as from an operator's terminal: in the whole suite's run (tox, py and
    pg16) the run went on after the signal, as a process that inherits an ignored SIGINT
    does, where alone the test passed.

    Once the fill is under way the application holds the last user's row, so the fill is
    still retrying that batch when the signal comes, however fast the machine.  The signal
    is sent again each second until the run ends, as an operator presses Ctrl-C again:
    twice in CI (PostgreSQL 16, a loaded machine) the run went on to its end after one."""
    seeded(legacy_db, users=3000)
    run_ok(legacy_db, "backup_data")
    command = [sys.executable, "-m", "migration.cli", "--operation=migrate_users",
               "--database-url", legacy_db, "--batch-size=1", "--jobs=1", "--quiet",
               "--log-file", os.devnull]
    inherited = signal.getsignal(signal.SIGINT)  # said when it fails: see the docstring
    with (connected(legacy_db, autocommit=False) as application,
          subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                           preexec_fn=_as_from_a_terminal) as process):
        while not execute(legacy_db, "SELECT 1 FROM migration_backup.backfill_progress "
                                     "WHERE rows_done > 0"):
            assert process.poll() is None, "migrate_users ended before it could be interrupted"
            time.sleep(0.05)
        with application.cursor() as cur:  # a row lock: the column is there already
            cur.execute("SELECT 1 FROM users WHERE id = (SELECT max(id) FROM users) FOR UPDATE")
        stderr = ""
        for _ in range(20):
            process.send_signal(signal.SIGINT)
            try:
                _, stderr = process.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
        application.rollback()
    assert process.returncode == 130, f"SIGINT in the test's process: {inherited}; {stderr}"
    assert "error: migrate_users interrupted" in stderr
    assert "state: expanding (public.users.id: filling" in stderr
    assert "next: run --operation=migrate_users again" in stderr
    run_ok(legacy_db, "migrate_users")
    assert "public.users.id: indexed" in run_ok(legacy_db, "status").output


def _as_from_a_terminal() -> None:
    """In the child, before it runs: SIGINT with its default disposition, so that Python
    installs its handler (it leaves an inherited ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

