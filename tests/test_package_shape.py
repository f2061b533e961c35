"""The package's own shape: its modules import each other without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "migration"


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere in it (inside functions too),
    except under ``if TYPE_CHECKING:``, which only the type checker runs."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("migration"):
            if node.module in ("migration", "migration.engine", "migration.rehearsal"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("migration")}
        pending.extend(ast.iter_child_nodes(node))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle found by a depth-first walk, as the modules along it."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                found.append([*path[path.index(other):], other])
            elif other not in state:
                walk(other)
        state[module] = "done"
        path.pop()

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return found


def test_the_package_imports_form_no_circle() -> None:
    """A module that needs another only in some function, imported there to break a circle
    (the backup's record read the views, which read the backup), hides which module
    depends on which: each module's imports go one way."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imports(path) & modules.keys() for name, path in modules.items()}
    assert graph["migration.take_backup"] >= {"migration.recorded", "migration.backup"}
    assert circles(graph) == []


def test_a_circle_is_seen() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
