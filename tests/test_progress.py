"""The console progress line of batched steps."""

from __future__ import annotations

import pytest

from migration.progress import Progress


def test_the_line_shows_rows_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("migration.progress.time.monotonic", lambda: next(clock))
    progress = Progress("public.users.id", 3000, enabled=False)
    progress.done = 1000
    assert progress.line() == "public.users.id: 1,000 rows, 100 rows/s, ETA 20 s"


def test_nothing_is_drawn_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress("x", 10, enabled=True)  # stderr is captured: not a terminal
    progress.advance(5)
    progress.close()
    assert capsys.readouterr().err == ""
