"""The test suite's own shape: helpers live in helper modules, not in test modules, and the
server-less tests run without a server."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
HELPERS = "tests/operate.py, tests/scenario.py, tests/shapes.py or another module not named test_*"


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, by its full dotted name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    return found


def is_fixture(function: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(decorator) for decorator in function.decorator_list)


def test_no_test_module_imports_from_another() -> None:
    """A test module's helpers and fixtures are moved to a helper module (or conftest.py)
    when a second module needs them: importing a test module runs its collection-time
    code twice and ties the modules' edits together."""
    offenders = {
        f"{path.name}: {module}" for path in sorted(TESTS.glob("*.py"))
        for module in imported_modules(path)
        if module.startswith("tests.test_") or module.startswith("test_")}
    assert offenders == set(), f"import these from {HELPERS} instead"


def test_one_seeded_helper() -> None:
    """Seeding a legacy database is ``tests.operate.seeded``, the one signature every
    module calls."""
    defined = {
        path.name for path in sorted(TESTS.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "seeded" and not is_fixture(node)}
    assert defined == {"operate.py"}


@pytest.mark.once
def test_the_statement_builders_tests_start_no_server() -> None:
    """The statement builders' modules alone, against a server that is not there: they
    pass, where a test that needed the server would stop the run with exit code 3."""
    environment = {**os.environ, "TEST_PG_BACKEND": "dsn",
                   "TEST_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(TESTS / "test_sqlexpr.py"), str(TESTS / "test_swap_statements.py")],
        capture_output=True, text=True, cwd=TESTS.parent, env=environment, timeout=300,
        check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "postgresql: not started" in result.stdout
