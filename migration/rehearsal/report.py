"""The rehearsal's report: what it is made of, and how it reads as text, Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from migration.rehearsal.batching import Choice
from migration.rehearsal.projection import Projection
from migration.report import Finding, Status, failures

BATCHED_STEPS = ("migrate_users", "migrate_foreign_keys")

# --- what the report is made of ------------------------------------------------------------------

@dataclass(frozen=True)
class StepTiming:
    step: str
    seconds: float
    rows: int
    """Rows of the tables the step works through (``tables``), the basis of its rate."""
    tables: tuple[str, ...]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Run:
    """Runbook steps run with one batch size: a trial on a clone, or the final migration."""

    batch_size: int
    steps: list[StepTiming] = field(default_factory=list)
    error: str = ""
    stall: float | None = None
    """Seconds the swap held the lock that blocks the application's writes (migration_log)."""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def batched_seconds(self) -> float:
        """Time of the steps the batch size changes: what choosing a batch size compares."""
        return sum(s.seconds for s in self.steps if s.step in BATCHED_STEPS)


@dataclass(frozen=True)
class RollbackCheck:
    stage: str
    passed: bool
    message: str
    seconds: float = 0.0
    differences: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlantedCheck:
    """One planted problem and whether validate_schema named it."""

    check: str
    subject: str
    value: str
    found: bool


@dataclass
class Report:
    server: str
    users: int
    dirty: bool
    rows: dict[str, int] = field(default_factory=dict)
    found: list[Finding] = field(default_factory=list)
    planted: list[PlantedCheck] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    unremedied: list[Finding] = field(default_factory=list)
    ready: list[Finding] = field(default_factory=list)
    ready_message: str = ""
    trials: list[Run] = field(default_factory=list)
    """Each batch size's timings, repeated (``batching.REPEATS``)."""
    skipped_sizes: list[str] = field(default_factory=list)
    batch_choice: Choice | None = None
    rollbacks: list[RollbackCheck] = field(default_factory=list)
    final: Run | None = None
    verify: list[Finding] = field(default_factory=list)
    sized: dict[int, Run] = field(default_factory=dict)
    """The final migration at smaller sizes (users), for the projection's fit."""
    projection: Projection | None = None
    projection_note: str = ""
    """Why rows to project for were given but nothing was projected."""
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """Everything that makes the rehearsal fail; none means exit code 0."""
        problems = [f"no remedy for: {f.render().splitlines()[0]}" for f in self.unremedied]
        problems += [f"still failing after the remedies: {f.render().splitlines()[0]}"
                     for f in failures(self.ready)]
        problems += [f"planted but not reported by validate_schema: {p.check} {p.subject} "
                     f"{p.value!r}" for p in self.planted if not p.found]
        problems += [f"full_migration with batch size {t.batch_size:,}: {t.error}"
                     for t in self.trials if t.error]
        problems += [f"final migration at {users:,} users: {run.error}"
                     for users, run in self.sized.items() if run.error]
        problems += [f"rollback after {r.stage}: {r.message}" for r in self.rollbacks
                     if not r.passed]
        if self.final is None:
            problems.append("the final migration did not run")
        elif self.final.error:
            problems.append(f"final migration: {self.final.error}")
        problems += [f"verify: {f.render().splitlines()[0]}" for f in failures(self.verify)]
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems()


# --- the report as text, Markdown and JSON -------------------------------------------------------

@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    header: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] = field(default_factory=list)
    preformatted: bool = False
    """Lines shown as they are (findings): a code block in Markdown, not a list."""


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02} min" if hours else f"{minutes} min {secs:02} s"


def step_message(step: str, message: str, joiner: str = ": ") -> str:
    """``step: message``, unless the message names the step itself
    (``validate_schema refused, ...``): then it reads once."""
    return message if message.startswith(step) else f"{step}{joiner}{message}"


def _finding_lines(findings: Sequence[Finding], *, verbose: bool) -> list[str]:
    shown = [f for f in findings if verbose or f.status in (Status.FAIL, Status.WARN)]
    if verbose:
        return [line for f in shown for line in f.render().splitlines()]
    return [f.render().splitlines()[0] for f in shown] or ["nothing to report"]


def _steps_rows(steps: Sequence[StepTiming]) -> list[tuple[str, ...]]:
    rows = [(s.step, duration(s.seconds), f"{s.rows:,}", f"{s.rate:,.0f}") for s in steps]
    return [*rows, ("total", duration(sum(s.seconds for s in steps)), "", "")]


def sections(report: Report, *, verbose: bool = False) -> list[Section]:
    """The report's parts, in the order an operator reads them."""
    parts = [Section(f"validate_schema on the generated data ({len(failures(report.found))} "
                     "failure(s))", _finding_lines(report.found, verbose=verbose),
                     preformatted=True)]
    if report.dirty:
        parts.append(Section("Planted problems, named by validate_schema",
                             header=("check", "column", "value", "named"),
                             rows=[(p.check, p.subject, repr(p.value), "yes" if p.found else "NO")
                                   for p in report.planted]))
    parts.append(Section("Remedies applied to the rehearsal's copy",
                         [*(report.remedies or ["none needed"]),
                          "afterwards, " + step_message("validate_schema",
                                                        report.ready_message)]))
    if report.trials or report.skipped_sizes:
        parts.append(_batch_section(report))
    if report.rollbacks:
        parts.append(Section(
            "Rollback from every stage, fingerprint compared with the database before the "
            "migration", [f"{r.stage}: {d}" for r in report.rollbacks for d in r.differences],
            header=("after", "rollback", "time", "result"),
            rows=[(r.stage, "passed" if r.passed else "FAILED", duration(r.seconds), r.message)
                  for r in report.rollbacks]))
    if report.final is not None:
        lines = [report.final.error] if report.final.error else []
        if report.verify:
            lines.append(f"verify: {sum(f.status is Status.PASS for f in report.verify)} "
                         f"check(s) passed, {len(failures(report.verify))} failed")
            lines += [f.render().splitlines()[0] for f in failures(report.verify)]
        parts.append(Section(f"Final migration, batch size {report.final.batch_size:,}", lines,
                             header=("step", "time", "rows", "rows/s"),
                             rows=_steps_rows(report.final.steps)))
    parts.append(_projection_section(report.projection, report.projection_note))
    return parts


def _batch_section(report: Report) -> Section:
    """Each size's repeated times, the one kept and why: never a "fastest" within noise."""
    times: dict[int, list[str]] = {}
    for trial in report.trials:
        times.setdefault(trial.batch_size, []).append(trial.error or
                                                      duration(trial.batched_seconds))
    choice = report.batch_choice
    rows: list[tuple[str, ...]] = [(f"{size:,}", ", ".join(shown),
             "kept" if choice is not None and size == choice.batch_size else "")
            for size, shown in times.items()]
    lines = [*(f"skipped {why}" for why in report.skipped_sizes),
             *([f"kept {choice.reason}"] if choice is not None else [])]
    return Section("Batch sizes tried (time of migrate_users + migrate_foreign_keys, repeated)",
                   lines, header=("batch size", "times", ""), rows=rows)


def _range(low: float, high: float) -> str:
    return duration(low) if duration(low) == duration(high) else \
        f"{duration(low)} to {duration(high)}"


def _projection_section(projection: Projection | None, note: str) -> Section:
    title = "Projected time for production"
    if projection is None:
        return Section(title, [note or "not requested: pass --production-rows N (users, other "
                               "tables in the same proportions) or users=N,journal_entries=M,..."])
    sizes = ", ".join(f"{users:,}" for users in projection.sizes)
    stall = ("no swap was timed" if projection.stall is None
             else f"{projection.stall[0] * 1000:,.0f} to {projection.stall[1] * 1000:,.0f} ms "
                  "measured (the swap's lock; it does not grow with rows)")
    return Section(title, [
        f"write stall, the time the application's writes wait: {stall}",
        f"total, the whole run while the application keeps working: "
        f"{_range(projection.low, projection.high)}",
        f"rows from {projection.source}: " + ", ".join(
            f"{table} {rows:,}" for table, rows in projection.rows.items()),
        f"each step fit as overhead + cost per row over the final migration at {sizes} "
        "users; the range is the cost per row less and more its standard error (the fit's "
        "residuals)", *(["the range is wide: the timings stray from a line more than their "
                         "rows explain (noise, or a cost per row that grows with size); "
                         "rehearse with more --users to narrow it"]
                   if projection.high > 2 * projection.low else [])],
        header=("step", "rows", "overhead", "per 1M rows", "projected"),
        rows=[(step.step, f"{step.rows:,}", duration(step.line.overhead),
               duration(step.line.per_row * 1_000_000), _range(step.low, step.high))
              for step in projection.steps])


def _headline(report: Report) -> list[str]:
    verdict = "PASSED" if report.passed else "FAILED"
    data = "clean" if not report.dirty else "with planted problems"
    lines = [f"UUID migration rehearsal: {verdict} in {duration(report.seconds)}",
             f"server: {report.server}",
             f"dataset: {report.users:,} generated users, {data}"]
    if report.rows:
        lines.append("rows after remedies: " + ", ".join(f"{t} {n:,}"
                                                         for t, n in report.rows.items()))
    lines += [f"problem: {p}" for p in report.problems()]
    return lines


def _text_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def render_text(report: Report, *, verbose: bool = False) -> str:
    out = _headline(report)
    for part in sections(report, verbose=verbose):
        out += ["", part.title + ":"]
        if part.header:
            out += ["  " + line for line in _text_table(part.header, part.rows)]
        out += ["  " + line for line in part.lines]
    return "\n".join(out)


def render_markdown(report: Report, *, verbose: bool = False) -> str:
    """For a change ticket: the same content, tables as Markdown tables."""
    head = _headline(report)
    out = [f"# {head[0]}", "", *(f"- {line}" for line in head[1:])]
    for part in sections(report, verbose=verbose):
        out += ["", f"## {part.title}", ""]
        if part.header:
            cells = [part.header, tuple("---" for _ in part.header), *part.rows]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                    for row in cells] + [""]
        if part.preformatted:
            out += ["```", *part.lines, "```"]
        else:
            out += [f"- {line}" for line in part.lines]
    return "\n".join(out) + "\n"


def as_json(report: Report) -> str:
    data = {"passed": report.passed, "problems": report.problems(), **asdict(report)}
    if report.projection is not None:
        data["projection"].update(low=report.projection.low, high=report.projection.high)
    return json.dumps(data, default=str, indent=2)


