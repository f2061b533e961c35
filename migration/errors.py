"""The engine's typed errors; the command line turns them into exit codes."""

from __future__ import annotations

from typing import Any


class MigrationError(Exception):
    """Refused or failed because of the data or the database state (exit code 1).

    ``hint`` says what to do next; ``findings`` carry the offending rows or
    objects so the report can name them.
    """

    def __init__(self, message: str, *, hint: str = "", findings: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.findings = findings or []

    def __str__(self) -> str:
        return f"{self.message}\n  next: {self.hint}" if self.hint else self.message
