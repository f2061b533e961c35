"""Findings: what a check saw, in a shape both people and machines can read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

SAMPLE_LIMIT = 20


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"  # blocks the migration, or a post-migration check that failed
    WARN = "warn"
    INFO = "info"
    SKIP = "skip"


@dataclass
class Finding:
    check: str
    status: Status
    message: str
    subject: str = ""  # table or table.column the finding is about
    count: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    expected: str = ""
    found: str = ""
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data

    def render(self) -> str:
        head = f"[{self.status.upper():4}] {self.check}"
        if self.subject:
            head += f" {self.subject}"
        lines = [f"{head}: {self.message}"]
        if self.expected or self.found:
            lines.append(f"       expected: {self.expected}")
            lines.append(f"       found:    {self.found}")
        for sample in self.samples:
            lines.append("       - " + ", ".join(f"{k}={v!r}" for k, v in sample.items()))
        if self.count > len(self.samples) and self.samples:
            lines.append(f"       ... {self.count - len(self.samples)} more")
        if self.hint:
            lines.append(f"       next: {self.hint}")
        return "\n".join(lines)


def failures(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status is Status.FAIL]


def render(findings: list[Finding]) -> str:
    return "\n".join(f.render() for f in findings)
