"""Generated docs stay in sync with the code."""

from pathlib import Path

from qtool.docs_gen import render

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_reference_is_current():
    assert (ROOT / "docs" / "recipes.md").read_text() == render(), "run `make schema-docs` and commit docs/recipes.md"
