"""The package's import graph, read from the source: imports run one way, no cycles.

Every import counts, those under ``if TYPE_CHECKING:`` included: a cycle that only type
checking sees is still a design that bounces between layers (see docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "mlxd"


def module_name(path: Path) -> str:
    parts = ("mlxd", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}
        # a package's own __init__ is not an edge back from its modules
        graph[name] = {
            m for m in found if m in files and m != name and not name.startswith(m + ".")
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it closed)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _has_blueprint(module: str) -> bool:
    path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
    return path.exists() and "Blueprint(" in path.read_text()


def test_the_checker_finds_a_cycle() -> None:
    """The walk itself works: a two-module loop and a three-module loop are reported."""
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycle() -> None:
    """No module of mlxd imports, directly or through others, a module that imports it."""
    graph = import_graph()
    assert graph.get("mlxd.api.app")  # the graph was really read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_only_app_wires_the_route_modules() -> None:
    """Routes are leaves of the API package: only ``mlxd.api.app`` imports them, and the
    request context (with the body reader) imports no route, pipeline or app module."""
    graph = import_graph()
    routes = {m for m in graph if m.startswith("mlxd.api.") and _has_blueprint(m)}
    assert {"mlxd.api.chat", "mlxd.api.responses", "mlxd.api.messages"} <= routes
    for module, imports in graph.items():
        if module != "mlxd.api.app":
            assert not imports & routes, f"{module} imports {sorted(imports & routes)}"
    upper = {"mlxd.api.app", "mlxd.api.pipeline", *routes}
    assert not graph["mlxd.api.context"] & upper
