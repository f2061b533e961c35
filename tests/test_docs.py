"""The docs say what the code does: every option, operation, link and file they name exists.

The README and ``docs/*.md`` are read as an operator reads them.  Each ``--option`` must be
one that ``data-migration --help`` or ``verify --help`` lists (the one its command line
names, when it is shown on one), or one of the few in ``OTHER_TOOLS``; each value given to
an option with a fixed set of values (``--operation=NAME``, ``--orphans=...``) must be one
of them; each relative link and each project file named in backticks must exist.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import migration
import migration.engine
from migration import verify
from migration.checks import CHECK_NAMES
from migration.cli import HELP_SECTIONS, OPTION_OPERATIONS, main

PROJECT = Path(__file__).resolve().parents[1]
# docs/benchmark.md documents bench/run.py, whose options are its own (tests/test_bench.py).
DOCS = [PROJECT / "README.md",
        *sorted(p for p in (PROJECT / "docs").glob("*.md") if p.name != "benchmark.md")]
COMMANDS: dict[str, click.Command] = {"data-migration": main, "verify": verify.main}

# Options the docs name that belong to other tools: each with the file that defines it
# (None: a tool outside the project) and why the docs name it.
OTHER_TOOLS: dict[str, tuple[str | None, str]] = {
    "--pg": ("conftest.py", "pytest: the test server's kind"),
    "--pg-dsn": ("conftest.py", "pytest: an existing server for the tests"),
    "--pg-image": ("conftest.py", "pytest: the Docker image for the tests"),
    "--pg-bin": ("conftest.py", "pytest: local PostgreSQL binaries for the tests"),
    "--live-load": ("bench/run.py", "the benchmark under an application's load"),
    "--schema-only": ("migration/rehearsal/schema_source.py",
                      "pg_dump, as rehearse --schema-from runs it"),
    "--no-owner": ("migration/rehearsal/schema_source.py", "pg_dump, as the CI recipe runs it"),
    "--no-privileges": ("migration/rehearsal/schema_source.py",
                        "pg_dump, as the CI recipe runs it"),
    "--sql": (None, "alembic upgrade head --sql, a way the CI recipe's schema can be made"),
    **dict.fromkeys(("--health-cmd", "--health-interval", "--health-timeout",
                     "--health-retries"),
                    (None, "docker run, the CI recipe's service container's health check")),
}

OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:=([^\s`'\"),;]+))?")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
PROJECT_FILE = re.compile(r"(?:docs|migration|tests|bench|fixtures|scripts|\.ci)/[\w./*-]+")


def help_options(command: click.Command) -> set[str]:
    """The long options ``command --help`` lists."""
    result = CliRunner().invoke(command, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return {opt for line in result.output.splitlines() if line.lstrip().startswith("-")
            for opt in re.findall(r"--[a-z][a-z0-9-]*", line.strip().split("  ", 1)[0])}


def choices(command: click.Command) -> dict[str, list[str]]:
    """The values each option with a fixed set of them accepts."""
    return {opt: list(param.type.choices) for param in command.params
            if isinstance(param, click.Option) and isinstance(param.type, click.Choice)
            for opt in param.opts if opt.startswith("--")}


def code(text: str) -> list[str]:
    """Every line of the fenced blocks and every inline code span, as written."""
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return lines + SPAN.findall(FENCE.sub("", text))


def command_lines(text: str) -> list[tuple[str, str]]:
    """(command, its options' text) for each command line of a tool the project ships."""
    found = []
    for line in code(text):
        match = re.search(r"(?:^|[\s(])(data-migration|verify)((?:\s+-[^#]*)?)", line)
        if match and match.group(2):
            found.append((match.group(1), match.group(2)))
    return found


def doc_id(path: Path) -> str:
    return str(path.relative_to(PROJECT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_option_named_exists(doc: Path) -> None:
    known = set().union(*map(help_options, COMMANDS.values())) | set(OTHER_TOOLS)
    unknown = sorted({opt for opt, _ in OPTION.findall(doc.read_text())} - known)
    assert unknown == [], f"{doc_id(doc)} names options no command has"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_line_shown_runs_with_its_commands_options(doc: Path) -> None:
    wrong = [(command, opt) for command, options in command_lines(doc.read_text())
             for opt, _ in OPTION.findall(options)
             if opt not in help_options(COMMANDS[command])]
    assert wrong == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_value_named_for_a_choice_is_one(doc: Path) -> None:
    """``--operation=NAME``, ``--orphans=quarantine``, ``--format=json``: values the option
    accepts, for the command the line shows (any of them in prose); placeholders in capitals
    and ``<...>`` are not values."""
    text = doc.read_text()
    attributed = {(c, opt, value) for c, options in command_lines(text)
                  for opt, value in OPTION.findall(options)}
    anywhere = {(None, opt, value) for opt, value in OPTION.findall(text)}
    wrong = []
    for command, opt, value in attributed | anywhere:
        if not re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
            continue
        tools = [COMMANDS[command]] if command else list(COMMANDS.values())
        accepted = [choices(tool)[opt] for tool in tools if opt in choices(tool)]
        if accepted and not any(set(value.split("|")) <= set(a) for a in accepted):
            wrong.append((command, f"{opt}={value}"))
    assert wrong == []


def test_the_docs_name_the_operations_the_command_has() -> None:
    """Every operation appears in the option reference, and only those exist."""
    [operation] = [p for p in main.params if p.name == "operation"]
    assert isinstance(operation.type, click.Choice)
    reference = (PROJECT / "docs" / "options.md").read_text()
    missing = [name for name in operation.type.choices if f"`{name}`" not in reference]
    assert missing == []


@pytest.mark.parametrize("doc", [*DOCS, PROJECT / "docs" / "benchmark.md"], ids=doc_id)
def test_every_relative_link_and_project_file_named_exists(doc: Path) -> None:
    text = doc.read_text()
    links = [target.split("#", 1)[0] for target in LINK.findall(text)
             if not re.match(r"[a-z]+:|#", target)]
    broken = [target for target in links if not (doc.parent / target).exists()]
    named = {m.group(0).rstrip(".") for span in SPAN.findall(text)
             for m in [PROJECT_FILE.fullmatch(span.split()[0])] if m}
    absent = sorted(path for path in named if not list(PROJECT.glob(path)))
    assert (broken, absent) == ([], [])


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_function_named_by_its_module_exists(doc: Path) -> None:
    """``catalog.walk_key``, ``operations.run()``: the module has it."""
    modules = {info.name: f"{package.__name__}.{info.name}"
               for package in (migration, migration.engine)
               for info in pkgutil.iter_modules(package.__path__)}
    named = {(module, name) for span in SPAN.findall(doc.read_text())
             for module, name in re.findall(r"^([a-z_]+)\.([A-Za-z_]\w*)(?:\(\))?$", span)
             if module in modules and name != "py"}  # `report.py` is a file
    absent = sorted(f"{module}.{name}" for module, name in named
                    if not hasattr(importlib.import_module(modules[module]), name))
    assert absent == []


def test_the_other_tools_options_are_theirs() -> None:
    """Each option the docs may name for another tool is in the file that defines it."""
    absent = [opt for opt, (source, _) in OTHER_TOOLS.items()
              if source is not None and f'"{opt}' not in (PROJECT / source).read_text()]
    assert absent == []


def reference_sections() -> dict[str, str]:
    """docs/options.md's sections by heading, backticks left out."""
    text = (PROJECT / "docs" / "options.md").read_text()
    return {part.split("\n", 1)[0].replace("`", ""): part
            for part in text.split("\n## ")[1:]}


def test_the_option_reference_is_sectioned_as_the_help() -> None:
    """Each section of ``data-migration --help`` is a section of docs/options.md that names
    its options, and every option is in one (none falls to "Other options")."""
    sections = reference_sections()
    misplaced = [(title, opt) for title, options in HELP_SECTIONS for opt in options
                 if f"`{opt}" not in sections.get(title, "")]
    assert misplaced == []
    help_text = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert [line for line in help_text.splitlines() if line.endswith(":")
            and not line.startswith(" ")] == [f"{title}:" for title, _ in HELP_SECTIONS]


def test_the_runbook_lists_every_check_verify_runs() -> None:
    """Step 5 names each check ``verify --list-checks`` names, and no other."""
    runbook = (PROJECT / "docs" / "runbook.md").read_text()
    step = runbook.split("## Step 5", 1)[1].split("\n## ", 1)[0]
    listed = step.split(":\n\n", 1)[1].split("The runbook's", 1)[0]
    assert [name for name in SPAN.findall(listed) if re.fullmatch(r"[a-z_]+", name)] == list(
        CHECK_NAMES)


def test_the_reference_names_the_options_refused_with_other_operations() -> None:
    """docs/options.md's first paragraph lists the options that are a usage error with an
    operation they do not belong to: those cli.OPTION_OPERATIONS names, --orphans=quarantine."""
    intro = (PROJECT / "docs" / "options.md").read_text().split("\n## ", 1)[0]
    refused = intro.split("belongs to some operations only", 1)[1].split(" is a usage error", 1)[0]
    named = {opt for opt, _ in OPTION.findall(refused)}
    rehearse_only = {f"--{name.replace('_', '-')}" for name, owners in OPTION_OPERATIONS.items()
                     if owners == ("rehearse",)}
    assert "those of `rehearse`" in refused
    assert named | rehearse_only == {f"--{name.replace('_', '-')}"
                                     for name in OPTION_OPERATIONS} | {"--orphans"}
