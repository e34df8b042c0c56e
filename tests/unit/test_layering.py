"""The architecture's rules, checked on the source: lower layers never import a stage, a stage never imports
another stage, and method facts live in the method tables (no ``method ==`` branching anywhere)."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from qtool.methods import quantize, transform
from tests.conftest import ROOT

QTOOL = ROOT / "qtool"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (``import x`` and ``from x import y``, at any depth: lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("package", ["models", "algorithms", "formats"])
def test_lower_layers_import_no_stage(package):
    offenders = [str(p.relative_to(ROOT)) for p in (QTOOL / package).rglob("*.py")
                 if any(m.startswith("qtool.stages") for m in _imports(p))]  # fmt: skip
    assert not offenders, offenders


# what each layer may import from qtool (itself included); imports point down
ALLOWED = {
    "algorithms": ("qtool.algorithms", "qtool.arch", "qtool.schemes", "qtool.errors"),
    "models": ("qtool.models", "qtool.algorithms", "qtool.arch", "qtool.schemes", "qtool.errors", "qtool.targets"),
    "formats": ("qtool.formats", "qtool.models", "qtool.algorithms", "qtool.arch", "qtool.schemes", "qtool.errors",
                "qtool.artifacts"),
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    offenders = {
        f"{p.relative_to(ROOT)} -> {m}"
        for p in (QTOOL / package).rglob("*.py")
        for m in _imports(p)
        if m.startswith("qtool.") and not m.startswith(ALLOWED[package])
    }
    assert not offenders, sorted(offenders)


def test_a_stage_imports_no_other_stage():
    stages = {p.stem for p in (QTOOL / "stages").glob("*.py")} - {"__init__", "base"}
    for p in (QTOOL / "stages").glob("*.py"):
        others = {m for m in _imports(p) if m.split(".")[:2] == ["qtool", "stages"] and len(m.split(".")) > 2}
        others = {m.split(".")[2] for m in others} & (stages - {p.stem})
        assert not others, f"{p.name} imports stage(s) {others}"


def test_no_branching_on_method_names():
    pattern = re.compile(r"method\s*[!=]=|\.method\s+(not\s+)?in\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in QTOOL.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not hits, hits


@pytest.mark.parametrize("table", [transform.METHODS, quantize.METHODS], ids=["transform", "quantize"])
def test_method_tables_are_the_recipe_unions(table):
    from qtool.recipe import Recipe

    for config, handler in table.items():
        assert handler.config is config
    section = "transform" if table is transform.METHODS else "quantize"
    assert typing.get_args(Recipe.model_fields[section].annotation) == tuple(table)
    tags = [typing.get_args(c.model_fields["method"].annotation)[0] for c in table]
    assert len(set(tags)) == len(tags)
