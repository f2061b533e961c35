"""The test suite's own shape: helpers live in helper modules, not in test modules."""

from __future__ import annotations

import ast
from pathlib import Path

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
