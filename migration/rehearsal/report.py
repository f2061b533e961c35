"""The rehearsal's report: what it is made of, and how it reads as text, Markdown and JSON."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from migration.rehearsal.batching import Choice
from migration.rehearsal.inventory import Dependent
from migration.rehearsal.load import PhaseStats
from migration.rehearsal.prepared import ADVICE as PREPARED_ADVICE
from migration.rehearsal.projection import Projection
from migration.rehearsal.smoke import BINDING_ADVICE, SmokeResult
from migration.rehearsal.under_load import LoadRun
from migration.rehearsal.waits import describe as describe_waits
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


@dataclass(frozen=True)
class SmokeWrite:
    table: str
    operation: str  # insert, update, delete
    binding: str  # unknown (untyped parameter) or varchar (JDBC's setString)
    ok: bool
    error: str = ""
    binding_only: bool = False
    """Refused only for the varchar parameter's type (``smoke.binding_failures``)."""


@dataclass
class SmokeRun:
    """The smoke writes on every table of the plan at one point of the rehearsal."""

    after: str  # "full_migration", "rollback after migrate_users", ...
    writes: list[SmokeWrite] = field(default_factory=list)

    @classmethod
    def of(cls, after: str, results: Sequence[SmokeResult],
           binding_only: Sequence[SmokeResult]) -> SmokeRun:
        return cls(after, [SmokeWrite(r.table, r.operation, r.binding, r.ok, r.error or "",
                                      binding_only=r in binding_only) for r in results])

    def broken(self, write: SmokeWrite) -> bool:
        """A failure the rehearsal fails on; a varchar binding refused for its type is the
        application-compatibility note instead."""
        return not write.ok and not write.binding_only

    def compatibility(self, write: SmokeWrite) -> bool:
        return not write.ok and write.binding_only


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
    # --schema-from: where the schema came from, the key, what was left out of it,
    # what depends on the key columns, and the smoke writes.
    schema_source: str = ""
    key: str = ""
    schema_skipped: list[str] = field(default_factory=list)
    dependents: list[Dependent] = field(default_factory=list)
    smoke: list[SmokeRun] = field(default_factory=list)
    prepared: list[Finding] = field(default_factory=list)
    """Statements prepared before the final migration, executed after it (``prepared``)."""
    prepared_during: list[Finding] = field(default_factory=list)
    """The same statements executed during its fill, before the swap."""
    live_load: LoadRun | None = None
    """--live-load: the migration and the rollback under an application's load."""

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
        problems += [f"smoke write after {run.after}: {w.operation} {w.table} "
                     f"(key bound {w.binding}): {w.error}"
                     for run in self.smoke for w in run.writes if run.broken(w)]
        if self.live_load is not None:
            problems += [f"under live load: {p}" for p in self.live_load.failed()]
        return problems

    def compatibility_notes(self) -> list[str]:
        """What the application must change for the swap: the statements prepared before it
        that fail after it, and the tables whose smoke writes failed only with the varchar
        binding."""
        tables = sorted({w.table for run in self.smoke for w in run.writes
                         if run.compatibility(w)})
        notes = []
        for findings, moment in ((self.prepared_during, "during the fill"),
                                 (self.prepared, "after the swap")):
            broken = [f.subject.split(" ", 1)[0] for f in findings if f.status is Status.WARN]
            if broken:
                notes.append(f"{len(broken)} statement(s) prepared before the migration fail "
                             f"{moment} ({', '.join(broken)}): {PREPARED_ADVICE}")
        if not tables:
            return notes
        return [*notes, f"after the swap the key is uuid: a client binding it as a varchar/text "
                f"parameter gets 'operator does not exist: uuid = character varying' "
                f"({', '.join(tables)}); string literals and untyped parameters keep working. "
                f"{BINDING_ADVICE[0].upper()}{BINDING_ADVICE[1:]}"]

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
    if report.live_load is not None:
        parts.append(_load_section(report.live_load))
    parts.append(_projection_section(report.projection, report.projection_note))
    return parts + schema_from_sections(report, verbose=verbose)


def _load_section(load: LoadRun) -> Section:
    """What the application saw in each phase, and what went wrong."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f} ms"

    lines = load.failed() or ["no application transaction failed, every committed write is "
                              "there, no orphan was accepted"]
    lines += load.notes
    if load.replica_lag is not None:
        lines += load.replica_lag.lines()
    return Section(f"Under live load ({load.clients} pgbench clients at {load.rate:g} "
                   "transactions/s, on a clone): full_migration, then rollback", lines,
                   header=("phase", "time", "transactions", "failed", "p50", "p99", "max",
                           "longest stall", "with a transaction due", "waits in that stall"),
                   rows=[(p.name, duration(p.seconds), f"{p.transactions:,}", str(p.failures),
                          ms(p.latency_p50_ms), ms(p.latency_p99_ms), ms(p.latency_max_ms),
                          _stall(p), duration(p.longest_due_stall_s),
                          describe_waits(p.due_stall_waits, top=2)) for p in load.phases])


def _stall(stats: PhaseStats) -> str:
    """A phase's longest stall, when in the phase it began and during which step."""
    step = f" ({stats.longest_stall_step})" if stats.longest_stall_step else ""
    return f"{duration(stats.longest_stall_s)} at {duration(stats.longest_stall_at)}{step}"


# --- --schema-from: the objects on the key columns, and the smoke writes -------------------------

def schema_from_sections(report: Report, *, verbose: bool = False) -> list[Section]:
    parts = []
    if report.schema_source:
        parts.append(Section(f"Schema from {report.schema_source}, key {report.key}",
                             [f"left out: {line}" for line in report.schema_skipped]
                             or ["every statement applied"]))
    if report.dependents:
        parts.append(Section(
            "Objects depending on the key columns: carried or refused",
            header=("column", "object", "migration", "how / why"),
            rows=[(d.column, d.what, "carried" if d.carried else "REFUSED", d.how)
                  for d in report.dependents]))
    if report.smoke:
        parts.append(Section(
            "Smoke writes (INSERT, UPDATE, DELETE of a generated row in each table of the plan, "
            "rolled back; the key bound untyped and as varchar)",
            header=("after", "passed", "varchar only (compatibility)", "failed"),
            rows=[(run.after, str(sum(w.ok for w in run.writes)),
                   str(sum(run.compatibility(w) for w in run.writes)),
                   str(sum(run.broken(w) for w in run.writes))) for run in report.smoke]))
    for run in report.smoke:
        shown = [w for w in run.writes if verbose or not w.ok]
        if shown:
            parts.append(Section(
                f"Smoke writes after {run.after}" + ("" if verbose else ", those refused"),
                header=("table", "write", "key bound as", "result"),
                rows=[(w.table, w.operation, w.binding,
                       "ok" if w.ok else ("compatibility note: " if run.compatibility(w)
                                          else "FAILED: ") + w.error) for w in shown]))
    if report.prepared_during:
        parts.append(Section("Statements prepared before the final migration (as an "
                             "application's pool keeps them), executed during the fill, "
                             "before the swap",
                             _finding_lines(report.prepared_during, verbose=verbose),
                             preformatted=True))
    if report.prepared:
        parts.append(Section("Statements prepared before the final migration (as an "
                             "application's pool keeps them), executed after the swap",
                             _finding_lines(report.prepared, verbose=verbose),
                             preformatted=True))
    notes = report.compatibility_notes()
    if notes:
        parts.append(Section("Application compatibility", notes))
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
    if report.schema_source:
        lines[-1] = (f"dataset: the schema of {report.schema_source}, {report.users:,} generated "
                     f"rows of {report.key.rsplit('.', 1)[0]}, {data}")
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
    data = {"passed": report.passed, "problems": report.problems(),
            "compatibility": report.compatibility_notes(), **asdict(report)}
    if report.projection is not None:
        data["projection"].update(low=report.projection.low, high=report.projection.high)
    return json.dumps(data, default=str, indent=2)




# --- the report as JUnit XML, and the report file by its suffix ----------------------------------

def _case(suite: ET.Element, classname: str, name: str, *, seconds: float = 0.0,
          failure: str | None = None, skipped: str | None = None,
          output: Sequence[str] = ()) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name,
                         time=f"{seconds:.3f}")
    if failure is not None:
        ET.SubElement(case, "failure", message=failure.splitlines()[0] if failure else "failed",
                      type="RehearsalFailure").text = failure
    if skipped is not None:
        ET.SubElement(case, "skipped", message=skipped)
    if output:
        ET.SubElement(case, "system-out").text = "\n".join(output)


def _junit_cases(report: Report, suite: ET.Element) -> None:
    """One test case per proof the rehearsal makes."""
    for p in report.planted:
        _case(suite, "rehearsal.planted", f"validate_schema names {p.check} {p.subject} "
              f"{p.value!r}", failure=None if p.found else "planted but not reported")
    left = [f.render() for f in [*report.unremedied, *failures(report.ready)]]
    _case(suite, "rehearsal.validate", "validate_schema after the remedies",
          failure="\n".join(left) if left else None,
          output=[*report.remedies, report.ready_message])
    for d in report.dependents:
        _case(suite, "rehearsal.objects", f"{d.column}: {d.what}",
              failure=None if d.carried else f"refused: {d.what}\nnext: {d.how}",
              output=[d.how] if d.carried else ())
    for t in report.trials:
        _case(suite, "rehearsal.batch_size", f"batch size {t.batch_size}",
              seconds=t.batched_seconds, failure=t.error or None)
    for r in report.rollbacks:
        _case(suite, "rehearsal.rollback", f"rollback after {r.stage}", seconds=r.seconds,
              failure=None if r.passed else "\n".join([r.message, *r.differences]),
              output=[r.message] if r.passed else ())
    if report.final is None:
        _case(suite, "rehearsal.final", "full_migration", failure="the final migration did "
              "not run (see the failures above)")
    else:
        for step in report.final.steps:
            _case(suite, "rehearsal.final", step.step, seconds=step.seconds)
        if report.final.error:
            _case(suite, "rehearsal.final", "full_migration", failure=report.final.error)
    for f in report.verify:
        _case(suite, "rehearsal.verify", f"verify {f.check} {f.subject}".strip(),
              failure=f.render() if f.status is Status.FAIL else None,
              skipped=f.message if f.status is Status.SKIP else None)
    if report.live_load is not None:
        failed = report.live_load.failed()
        _case(suite, "rehearsal.live_load", "full_migration and rollback under load",
              failure="\n".join(failed) if failed else None)
    for classname, findings in (("rehearsal.prepared.during_expansion", report.prepared_during),
                                ("rehearsal.prepared", report.prepared)):
        for f in findings:
            _case(suite, classname, f.subject,
                  skipped=(f"application compatibility: {f.message}" if f.status is Status.WARN
                           else f.message if f.status is Status.SKIP else None))
    for run in report.smoke:
        for w in run.writes:
            _case(suite, f"rehearsal.smoke.{run.after.replace(' ', '_')}",
                  f"{w.operation} {w.table} (key bound {w.binding})",
                  failure=w.error if run.broken(w) else None,
                  skipped=("application compatibility: " + w.error
                           if run.compatibility(w) else None))


def render_junit(report: Report) -> str:
    """JUnit XML for CI: one test case per proof (planted problem, object, batch size, rollback
    stage, step, verify check, smoke write); the failures carry the messages."""
    root = ET.Element("testsuites", name="uuid-migration rehearsal")
    suite = ET.SubElement(root, "testsuite", name="rehearse", hostname=report.server,
                          time=f"{report.seconds:.3f}")
    _junit_cases(report, suite)
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    suite.set("errors", "0")
    ET.SubElement(suite, "system-out").text = render_text(report)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


REPORT_FORMATS = {".md": "Markdown", ".json": "JSON", ".xml": "JUnit XML"}


def report_format(path: Path) -> str:
    """The format a report file's suffix names; ValueError for any other suffix."""
    if path.suffix.lower() not in REPORT_FORMATS:
        raise ValueError(f"{path.name}: the report's format follows its suffix: "
                         + ", ".join(f"{s} ({n})" for s, n in REPORT_FORMATS.items()))
    return path.suffix.lower()


def write_report(path: Path, report: Report, *, verbose: bool = False) -> None:
    suffix = report_format(path)
    text = (render_markdown(report, verbose=verbose) if suffix == ".md"
            else as_json(report) + "\n" if suffix == ".json" else render_junit(report))
    path.write_text(text, encoding="utf-8")
