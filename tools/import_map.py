"""The import map of the hf_snp package: modules, arrows, circles, floors and arrows that run back up.

Every import of an ``hf_snp`` module counts as an arrow, wherever it is written: at the top of a
file, inside a function (deferred) or under ``TYPE_CHECKING``. A package's ``__init__`` is a
module like the others. Floors: a module that imports nothing of hf_snp is on floor 1, any
other is one floor above the highest module it imports (longest import chain). An arrow runs
back up when it goes from a phase package to a package of an earlier phase (``PHASES`` order).

    python tools/import_map.py            # summary
    python tools/import_map.py --arrows   # every arrow, floor by floor
    python tools/import_map.py some/pkg   # another package folder (tests/test_layout.py checks the checker)
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hf_snp"
# the layers, bottom first: the model type and the options; units (sites, statistics, linear algebra, allocation);
# methods and adapters on them; then the phases of a run, setup, passes, deliver, and evaluation; the entry points
# (api, cli, demo, the package itself) on top
LAYERS = (("models",), ("config", "version", "parallel"), ("units",), ("methods",), ("adapters",), ("setup",),
          ("passes",), ("deliver",), ("evaluation",), ("", "api", "cli", "demo", "eval_command", "__main__"))


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of the module at ``path`` in the package folder ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package folder ``root`` (its ``data`` folders left out), by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py")) if "data" not in p.relative_to(root).parts}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if prefix.split(".")[0] != importer.split(".")[0]:  # another package
        return set()
    found = set()
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        if sub in known:
            found.add(sub)
        elif prefix in known:
            found.add(prefix)
    return found


def arrows(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports (itself excluded)."""
    mods = modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= _resolve(name, path.name == "__init__.py", node, known)
        graph[name] = targets - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest import chain below each module (1 = imports nothing of hf_snp); needs no circle."""
    memo: dict[str, int] = {}

    def floor(v: str) -> int:
        if v not in memo:
            memo[v] = 0  # guards a circle from recursing forever
            memo[v] = 1 + max((floor(w) for w in graph[v]), default=0)
        return memo[v]

    return {v: floor(v) for v in graph}


def layer(module: str) -> int | None:
    """The layer of a module: that of its package below hf_snp, or of its own name when it sits in hf_snp/
    (None when ``LAYERS`` does not name it)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return next((i for i, names in enumerate(LAYERS) if name in names), None)


def back_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows from a module to a module of a higher layer (modules without a layer left out)."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if None not in (layer(a), layer(b)) and layer(b) > layer(a))


@dataclass
class ImportMap:
    modules: int
    arrows: int
    circles: list[list[str]]
    floors: int
    back: list[tuple[str, str]]
    unplaced: list[str]  # modules whose package LAYERS does not name


def import_map(root: Path = ROOT) -> ImportMap:
    """The summary of the package folder ``root``: modules, arrows, circles, floors, arrows back up."""
    graph = arrows(root)
    return ImportMap(len(graph), sum(map(len, graph.values())), circles(graph),
                     max(floors(graph).values(), default=0), back_arrows(graph),
                     sorted(m for m in graph if layer(m) is None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=ROOT, help="the package folder (default: hf_snp)")
    parser.add_argument("--arrows", action="store_true", help="print every module with its floor and arrows")
    args = parser.parse_args()
    if not (args.root / "__init__.py").is_file():
        parser.error(f"{args.root} is not a package folder (no __init__.py); give the folder of a Python package")
    graph = arrows(args.root)
    result = import_map(args.root)
    if args.arrows:
        levels = floors(graph)
        for name in sorted(graph, key=lambda m: (levels[m], m)):
            print(f"{levels[name]:2d} {name}: {', '.join(sorted(graph[name]))}")
    print(f"{result.modules} modules, {result.arrows} arrows, {result.floors} floors, "
          f"{len(result.circles)} circles, {len(result.back)} arrows back up")
    for c in result.circles:
        print("circle:", " <-> ".join(c))
    for a, b in result.back:
        print("back up:", a, "->", b)
    if args.root == ROOT:
        for module in result.unplaced:
            print("no layer (add its package to LAYERS):", module)


if __name__ == "__main__":
    main()
