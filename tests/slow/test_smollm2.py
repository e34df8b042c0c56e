"""SmolLM2-135M (GGUF, 30 layers, hidden 576): the shipped W4A16 recipes at a reduced budget. `make test-slow`."""

from __future__ import annotations

import pytest

from qtool.pipeline import Pipeline
from qtool.recipe import load_recipe
from tests.conftest import ROOT, SMOLLM2, WIKI_TEST, WIKI_VALID, localize, require

pytestmark = pytest.mark.slow
BUDGET = ["calibration.n_samples=16", "evaluate.max_tokens=8192"]


def _run(name: str, tmp_path):
    import yaml

    raw = localize(yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text()))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Pipeline(load_recipe(path, BUDGET), tmp_path / name).run().manifest("evaluate")["summary"]


def test_gptq_beats_rtn_on_smollm2(tmp_path):
    require(SMOLLM2, WIKI_VALID, WIKI_TEST)
    rtn = _run("w4a16-rtn", tmp_path)
    gptq = _run("w4a16-gptq", tmp_path)
    assert gptq["fp_ppl"] == rtn["fp_ppl"]
    assert gptq["fp_ppl"] < gptq["ppl"] < rtn["ppl"]
