"""Data flows one way: no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lpcvlab"

# Lowest first, one entry per package (a top-level module is a package of its own). A package may
# import from its own layer and the layers before it, and never from one that imports it back:
# the layers are the packages, with no per-module exceptions.
LAYERS = [
    {"errors", "types", "util", "config"},
    {"metrics", "data", "models"},
    {"training"},
    {"deploy"},
    {"hubs"},
    {"tracks"},
    {"tracking", "objective"},
    {"pipeline"},
    {"app"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _package(dotted: str) -> str:
    """The package of ``lpcvlab.<dotted>``: its first part."""
    return dotted.split(".")[0]


def _rank(dotted: str) -> int | None:
    return RANK.get(_package(dotted))


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_every_module_is_in_a_layer():
    missing = sorted(m for p in SRC.rglob("*.py") if (m := _module(p)) and _rank(m) is None)
    assert not missing, f"put these modules in a layer: {missing}"


def test_the_top_holds_only_the_entry_points_and_the_pipeline():
    """The tree reads as the pipeline: everything else lives in a package."""
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
    assert top == ["app", "errors", "metrics", "objective", "pipeline", "types"], top


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module below lpcvlab)`` of each absolute lpcvlab import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "lpcvlab":
                names = [f"lpcvlab.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [
            (node.lineno, n.removeprefix("lpcvlab.")) for n in names if n.startswith("lpcvlab.")
        ]
    return found


def _package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> where, for every import between two packages,
    those inside functions included."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = _module(path)
        if not module:
            continue
        for lineno, target in _imports(path):
            pair = (_package(module), _package(target))
            if pair[0] != pair[1]:
                edges.setdefault(pair, []).append(f"{path.relative_to(SRC)}:{lineno}")
    return edges


def test_no_two_packages_import_each_other():
    edges = _package_imports()
    both = sorted((a, b) for a, b in edges if a < b and (b, a) in edges)
    assert not both, "\n".join(
        f"{a} <-> {b}: {edges[a, b][0]} and {edges[b, a][0]}" for a, b in both
    )


def test_no_module_imports_from_a_layer_above_it():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = _rank(_module(path))
        if own is None:
            continue
        for lineno, target in _imports(path):
            rank = _rank(target)
            if rank is not None and rank > own:
                problems.append(f"{rel}:{lineno} imports lpcvlab.{target} (layer {rank} > {own})")
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    """A cycle (such as the one ``data.coco`` and ``data.track1`` once formed) makes import order
    matter and hides which module owns a record."""
    modules = {_module(p): p for p in SRC.rglob("*.py") if _module(p)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target in _imports(path):
            if target in modules and target != module:
                graph[module].add(target)
    # A package and its own modules (an __init__ re-exporting them) are one unit here.
    for module in graph:
        graph[module] = {
            t
            for t in graph[module]
            if not (module.startswith(f"{t}.") or t.startswith(f"{module}."))
        }
    seen: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in stack:
            return [*stack[stack.index(module) :], module]
        if module in seen:
            return None
        seen.add(module)
        stack.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        stack.pop()
        return None

    for module in sorted(graph):
        cycle = visit(module)
        assert cycle is None, " -> ".join(cycle)
