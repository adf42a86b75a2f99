"""Data flows one way: no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lpcvlab"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    {"errors", "types", "hashing", "console", "io", "seeding", "secrets", "config"},
    {"metrics", "data", "models"},
    {"training"},
    {"export", "rewrites", "precision"},
    {"hubs"},
    {"cache"},
    {"tracks"},
    {"tracking", "objective", "runstore"},
    {"pipeline"},
    {"app", "sweep", "compare", "reproduce", "registry", "cli", "cli_hub", "cli_qevd", "cli_runs"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lpcvlab" and len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    missing = sorted((modules | packages) - set(RANK))
    assert not missing, f"put these modules in a layer: {missing}"


def test_no_module_imports_from_a_layer_above_it():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own not in RANK:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                top = _top(target)
                if top is not None and top in RANK and RANK[top] > RANK[own]:
                    problems.append(f"{rel}:{node.lineno} imports {target} (layer of {top})")
    assert not problems, "\n".join(problems)
