"""The package's shape: its import map (tools/import_map.py) has no circle, at most 10 floors and at most 3 arrows
back up, every module sits in a layer; no module outside hf_snp/models/ is over 400 lines and no function over 60;
every family layout is declared once (hf_snp/models/layouts.py). The checker itself is run on tiny packages
written here: a planted circle is found, a chain of three modules has three floors, deferred and TYPE_CHECKING
imports count."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

import hf_snp.adapters  # noqa: F401  (registers every family)
from hf_snp.adapters.base import _REGISTRY
from hf_snp.models import layouts

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_snp"
MAX_FLOORS, MAX_BACK_ARROWS = 10, 3
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LAYOUT_CLASSES = {"MlpLayout", "AttentionLayout", "ExpertsLayout"}


@pytest.fixture(scope="module")
def import_map():
    """tools/import_map.py, loaded from its path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("import_map", REPO / "tools" / "import_map.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package folder ``root`` holding ``files`` (name -> source) and an empty ``__init__.py``."""
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, source in files.items():
        (root / name).write_text(textwrap.dedent(source))
    return root


def python_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "data" not in p.relative_to(PACKAGE).parts] + sorted(
        (REPO / "tools").glob("*.py"))


# --- hf_snp


def test_the_import_map_has_no_circle_and_few_floors_and_back_arrows(import_map):
    result = import_map.import_map()
    assert result.modules > 50  # the whole package was read
    assert result.circles == []
    assert result.floors <= MAX_FLOORS
    assert len(result.back) <= MAX_BACK_ARROWS, result.back
    assert result.unplaced == []  # a new package must be given a layer in LAYERS


def test_no_module_outside_models_over_400_lines():
    assert len(python_files()) > 50 and PACKAGE / "api.py" in python_files()
    long = {str(p.relative_to(REPO)): n for p in python_files()
            if "models" not in p.relative_to(REPO).parts and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_60_lines():
    functions = [(p, node) for p in python_files() for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert len(functions) > 500  # methods and nested functions included
    long = [f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p, node in functions if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_family_layouts_are_declared_once_in_models_layouts():
    """No module but models/layouts.py builds a layout at import time, and every adapter's layouts are its
    constants."""
    built = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        built += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and id(node) not in inside
                  and getattr(node.func, "id", getattr(node.func, "attr", None)) in LAYOUT_CLASSES]
    assert built and all(place.startswith("hf_snp/models/layouts.py") for place in built), built
    constants = [value for name, value in vars(layouts).items() if name.isupper()]
    assert len({id(c) for c in constants}) == len(constants)
    assert len(set(constants)) == len(constants)  # no layout declared twice under two names
    for adapter in _REGISTRY.values():
        used = [adapter.mlp, adapter.attention_layout] + ([adapter.experts_layout]
                                                          if hasattr(adapter, "experts_layout") else [])
        assert all(any(layout is c for c in constants) for layout in used), adapter.family


# --- the checker on tiny packages


def test_the_checker_finds_a_planted_circle(import_map, tmp_path):
    root = write_package(tmp_path / "pkg", {
        "a.py": "from . import b\n",
        "b.py": "def late():\n    from .c import value  # deferred: still an arrow\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nvalue = 1\n",
        "d.py": "from .a import b\n",
    })
    result = import_map.import_map(root)
    assert result.circles == [["pkg.a", "pkg.b", "pkg.c"]]
    assert result.modules == 5 and result.arrows == 4
    assert import_map.arrows(root)["pkg.d"] == {"pkg.a"}


def test_the_checker_counts_the_floors_of_a_chain(import_map, tmp_path):
    root = write_package(tmp_path / "chain", {
        "top.py": "from .middle import f\nimport os\n",
        "middle.py": "from chain.bottom import g\n\ndef f():\n    return g()\n",
        "bottom.py": "def g():\n    return 1\n",
    })
    result = import_map.import_map(root)
    assert result.circles == [] and result.floors == 3
    assert import_map.floors(import_map.arrows(root)) == {"chain": 1, "chain.bottom": 1, "chain.middle": 2,
                                                        "chain.top": 3}


def test_the_checker_finds_arrows_back_up(import_map):
    graph = {"hf_snp.units.sites": {"hf_snp.passes.engine", "hf_snp.models.modeling_hf_snp"},
             "hf_snp.passes.engine": {"hf_snp.units.sites"}, "hf_snp.models.modeling_hf_snp": set(),
             "hf_snp.nowhere.x": {"hf_snp.api"}, "hf_snp.api": set()}
    assert import_map.back_arrows(graph) == [("hf_snp.units.sites", "hf_snp.passes.engine")]
    assert import_map.layer("hf_snp.nowhere.x") is None
