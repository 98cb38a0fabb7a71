"""The layer's import graph (issue 10, item 7): no circle, and the runtime
does not need the agent builder.

Read from the source with ``ast``, function-level (lazy) imports included: a
circle hidden in a function is still a circle a refactoring can trip over.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYER = Path(__file__).resolve().parents[1] / "shared" / "rejoin"


def _module(path: Path) -> str:
    parts = path.relative_to(LAYER).with_suffix("").parts
    name = ".".join(("rejoin", *parts))
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the rejoin modules it imports anywhere in its text."""
    modules = {_module(p): p for p in LAYER.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                targets = [source, *(f"{source}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_routes_runtime_turns_form_no_circle() -> None:
    """GIVEN the layer's modules and every import they make, lazy ones included
    WHEN the graph is walked from each of routes, runtime and turns
    THEN none of them leads back to itself, and the runtime reaches neither the
    turn worker (the agent builder) nor the models.
    """
    graph = import_graph()
    for name in ("rejoin.routes", "rejoin.runtime", "rejoin.turns"):
        assert name not in reachable(graph, name), name
    from_runtime = reachable(graph, "rejoin.runtime")
    assert "rejoin.turns" not in from_runtime
    assert "rejoin.models" not in from_runtime


def test_the_walker_sees_a_circle() -> None:
    """GIVEN a graph with a circle a -> b -> a WHEN walked THEN a reaches itself
    (the test above would catch one)."""
    assert "a" in reachable({"a": {"b"}, "b": {"a"}}, "a")
