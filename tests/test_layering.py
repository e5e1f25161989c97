"""The package's layering, read from its source: a module imports from its own layer or the ones below it (the
layers of docs/concepts.md, `LAYERS`), no import cycles among its modules (imports at the top of a file and
inside functions both count), and `lightning_sd/losses/` imports nothing else from the package.

An import of `lightning_sd.a.b` runs `lightning_sd/a/__init__.py` first, so it counts as an import of the
package `lightning_sd.a` too, unless the importer is inside that package (the root package `lightning_sd`
always runs first and is not counted; importing a name from it, `from lightning_sd import X`, is)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lightning_sd"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# docs/concepts.md, "Where each part lives": a module or package (and everything inside it) -> its layer
LAYERS = {
    "losses": 1, "data": 1, "sampling": 1, "contexts": 1, "models": 1, "distributed": 1, "lora": 1, "files": 1,
    "logging_utils": 1, "token_heatmap": 1, "cpu_linear": 1, "lean_decode": 1, "heap": 1, "batch": 1,
    "step_in_backward": 1, "optim": 1, "step_normalizer": 1, "step_metrics": 1, "cpu_precision": 1,
    "rollout": 2, "forward": 2, "teachers": 2,
    "methods": 3, "objectives": 3, "scoring": 3, "evaluation": 3, "rollout_backends": 3,
    "module": 4,
    "callbacks": 5, "config": 5, "build": 5, "console": 5,
    "export": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """`(imported module, line)` for every import of a package module in `path`, wherever it stands."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def add(target: str, line: int) -> None:
        # the module itself, or the nearest enclosing module that exists (`from pkg import function`)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if not target:
            return
        found.append((target, line))
        # importing `a.b.c` runs the `__init__` of `a.b` (and `a`) first, unless the importer sits inside
        # that package (its `__init__` has then already started)
        parent = target.rpartition(".")[0]
        while parent and parent != PACKAGE:
            if not (name == parent or name.startswith(parent + ".")):
                found.append((parent, line))
            parent = parent.rpartition(".")[0]

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module, node.lineno)
    return [(t, line) for t, line in found if t != name]


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    modules = _modules()
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        path = modules[a].relative_to(ROOT.parent)
        steps.append(f"{path}:{graph[a][b]} imports {b}")
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle for each strongly connected component that has one (Tarjan, then a path inside it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first from `start` back to itself, inside the component
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w in members and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = previous[start]
        while v != start:
            path.append(v)
            v = previous[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def test_the_import_reader_sees_function_level_imports():
    graph = _graph()
    assert f"{PACKAGE}.losses" in graph[f"{PACKAGE}.scoring"]
    assert f"{PACKAGE}.sampling" in graph[f"{PACKAGE}.evaluation"]
    assert f"{PACKAGE}.token_heatmap" in graph[f"{PACKAGE}.module"]  # imported inside a function


def test_a_cycle_is_reported_with_its_imports():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def _layer(name: str) -> int:
    if name == PACKAGE:
        return max(LAYERS.values()) + 1  # the public API re-exports everything
    top = name.split(".")[1]
    assert top in LAYERS, f"{name} has no layer: add {top!r} to LAYERS here and to the list in docs/concepts.md"
    return LAYERS[top]


def test_imports_point_down_the_layers():
    graph = _graph()
    for name in graph:
        _layer(name)  # every module has a layer
    offending = [f"{_modules()[name].relative_to(ROOT.parent)}:{line} imports {target} "
                 f"(layer {_layer(target)}, above its own layer {_layer(name)})"
                 for name, edges in sorted(graph.items()) for target, line in sorted(edges.items(), key=lambda e: e[1])
                 if _layer(target) > _layer(name)]
    assert not offending, "imports from a layer above (see docs/concepts.md):\n" + "\n".join(offending)


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in the package:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_losses_import_nothing_else_from_the_package():
    graph = _graph()
    offending = [f"{_modules()[name].relative_to(ROOT.parent)}:{line} imports {target}"
                 for name, edges in sorted(graph.items()) if name.startswith(f"{PACKAGE}.losses")
                 for target, line in sorted(edges.items(), key=lambda e: e[1])
                 if not target.startswith(f"{PACKAGE}.losses")]
    assert not offending, "lightning_sd/losses/ must import nothing else from the package:\n" + "\n".join(offending)
