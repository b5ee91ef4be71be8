"""The import graph of the project's own packages: floors, and no circles.

Reads every module's ``import`` statements (top level and inside functions: a lazy
import is still a dependency) with :mod:`ast`, so nothing is imported or executed.
Floors, from the ground up:

0. ``clipline_core``: wire constants, settings, error codes, metric definitions, the
   job model and job store; imports nothing else of the project.
1. ``gpu_service`` (the daemon and the shared-memory transport) and
   ``clipline_operator``: only the ground floor below them.
2. ``workers``: the ground floor and the daemon's client side.
3. ``clipline``: the CLI, local stack, HTTP API and client, on top of the services.
4. ``clipline_bench``: benchmarks, above everything, never imported by the runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "clipline_core": ROOT / "clipline_core",
    "gpu_service": ROOT / "gpu_service",
    "clipline_operator": ROOT / "operator" / "clipline_operator",
    "workers": ROOT / "workers",
    "clipline": ROOT / "clipline",
    "clipline_bench": ROOT / "bench" / "clipline_bench",
}
FLOOR = {
    "clipline_core": 0,
    "gpu_service": 1,
    "clipline_operator": 1,
    "workers": 2,
    "clipline": 3,
    "clipline_bench": 4,
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source
                    for a in node.names
                ]
            for t in targets:
                # `import a.b.c` depends on the deepest module of ours that it names.
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circle_between_modules() -> None:
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def test_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_arrow_points_down_a_floor() -> None:
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if FLOOR[b.split(".")[0]] > FLOOR[a.split(".")[0]]
        or (FLOOR[b.split(".")[0]] == FLOOR[a.split(".")[0]] and a.split(".")[0] != b.split(".")[0])
    )
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_ground_floor_imports_nothing_of_the_project() -> None:
    graph = import_graph()
    leaks = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.startswith("clipline_core")
        for b in targets
        if not b.startswith("clipline_core")
    )
    assert not leaks, leaks


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        name
        for name, path in modules().items()
        if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert not missing, f"modules without a docstring: {missing}"
