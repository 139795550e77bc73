"""The layout holds: no import cycle among the service's modules, and the service never imports training."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def module_imports() -> dict[str, set[str]]:
    """Each service module (generated code aside) and the service modules it imports when it is imported:
    its top-level imports (imports inside functions, or only for type checking, run later or never)."""
    found: dict[str, set[str]] = {}
    for path in SERVICE.rglob("*.py"):
        if "generated" in path.parts:
            continue
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        found[name] = imported
    return {name: {m for m in imported if m in found and m != name} for name, imported in found.items()}


def test_no_import_cycle_inside_the_service():
    graph = module_imports()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 30 and not cycles, cycles


def test_the_service_never_imports_training():
    """The image holds service/ and artifacts/ only: an import of training/ would fail there."""
    offenders = [
        str(p.relative_to(SERVICE.parent))
        for p in SERVICE.rglob("*.py")
        if "import training" in p.read_text() or "from training" in p.read_text()
    ]
    assert not offenders, offenders
