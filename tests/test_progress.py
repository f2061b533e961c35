"""The console progress line of batched steps."""

from __future__ import annotations

import pytest

from migration.operations import OPERATIONS, run
from migration.progress import Progress
from migration.session import Session, Settings
from tests.operate import Terminal, execute, run_ok, seeded

# The rows the children's fill writes, and counts: a row without a key has its copy, NULL.
CHILDREN_WITH_A_KEY = ("SELECT (SELECT count(user_id) FROM journal_entries) + "
                       "(SELECT count(user_id) FROM tags) + (SELECT count(user_id) FROM reminders)")


def test_the_line_shows_rows_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("migration.progress.time.monotonic", lambda: next(clock))
    progress = Progress("public.users.id", 3000, enabled=False)
    progress.done = 1000
    assert progress.line() == "public.users.id: 1,000 rows, 100 rows/s, ETA 20 s"


def test_the_line_shows_a_pause_and_the_lag_until_the_work_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("migration.progress.time.monotonic", lambda: 110.0)
    progress = Progress("public.users.id", 3000, enabled=False)
    progress.started, progress.done = 100.0, 1000
    progress.pause("paused, standby 'replica1' (pid 7) is 42.0 s behind")
    assert progress.line() == ("public.users.id: 1,000 rows, 100 rows/s, ETA 20 s, paused, "
                               "standby 'replica1' (pid 7) is 42.0 s behind")
    progress.pause(None)
    assert progress.line() == "public.users.id: 1,000 rows, 100 rows/s, ETA 20 s"


def test_nothing_is_drawn_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress("x", 10, enabled=True)  # stderr is captured: not a terminal
    progress.advance(5)
    progress.close()
    assert capsys.readouterr().err == ""


def test_rows_resumed_from_an_earlier_run_count_as_done_but_not_in_the_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("migration.progress.time.monotonic", lambda: next(clock))
    progress = Progress("x", 3000, resumed=1000, enabled=False)
    progress.done = 1000
    assert progress.line() == "x: 2,000 rows, 100 rows/s, ETA 10 s"


def test_the_connections_of_a_fill_share_one_line(legacy_db: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs filling three tables draw one line with every row of the three, not a line
    per slice overwriting each other."""
    seeded(legacy_db, users=60)
    for step in ("backup_data", "migrate_users"):
        run_ok(legacy_db, step)
    terminal = Terminal()
    monkeypatch.setattr("migration.progress.sys.stderr", terminal)
    with Session.open(legacy_db, Settings(batch_size=7, jobs=2)) as session:
        run(session, "migrate_foreign_keys", OPERATIONS["migrate_foreign_keys"])
    [(children,)] = execute(legacy_db, CHILDREN_WITH_A_KEY)
    drawn = [part for part in terminal.progress().split("\r") if part]
    label = "fill public.journal_entries.user_id, public.tags.user_id, public.reminders.user_id"
    assert drawn
    assert all(part.startswith(label + ": ") for part in drawn), drawn
    assert terminal.progress().count("\n") == 1
    assert drawn[-1].startswith(f"{label}: {children:,} rows, ")


def test_rollback_after_the_swap_shows_its_fills(legacy_db: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The way back fills string copies as the migration fills uuid ones: the parent's, then
    its children's, each with its line, as migrate_users and migrate_foreign_keys show them."""
    seeded(legacy_db, users=60)
    for step in ("backup_data", "migrate_users", "migrate_foreign_keys"):
        run_ok(legacy_db, step)
    terminal = Terminal()
    monkeypatch.setattr("migration.progress.sys.stderr", terminal)
    with Session.open(legacy_db, Settings(batch_size=7, jobs=2)) as session:
        run(session, "rollback", OPERATIONS["rollback"])
    [(users,)] = execute(legacy_db, "SELECT count(*) FROM users")
    [(children,)] = execute(legacy_db, CHILDREN_WITH_A_KEY)
    finals = terminal.progress().split("\n")[:-1]  # each fill's line ends with its close
    assert [line.rsplit("\r", 1)[-1].split(": ")[0] for line in finals] == [
        "fill public.users.id",
        "fill public.journal_entries.user_id, public.tags.user_id, public.reminders.user_id"]
    assert [line.rsplit("\r", 1)[-1].split(": ")[1].split(", ")[0] for line in finals] == [
        f"{users:,} rows", f"{children:,} rows"]
