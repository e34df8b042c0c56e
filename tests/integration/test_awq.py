"""AWQ end to end on stories260K at W3 asymmetric g32 (8 query heads, 4 KV heads: v -> o is a grouped-query
mapping): better than RTN, not worse than GPTQ under GPTQ, each part's effect visible, packed with zero points and
read back exactly, resume after a kill, and impossible settings refused before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qtool.pipeline import Pipeline
from qtool.recipe import load_recipe
from tests.conftest import (
    ROOT,
    STORIES,
    TINYSTORIES,
    killed_run_packs_the_same,
    refused_before_writing,
    require,
    run_methods,
    write_recipe,
)

pytestmark = pytest.mark.numeric

W3_ASYM_G32 = {"preset": "W4A16", "weights": {"bits": 3, "symmetric": False, "group_size": 32},
               "group_fallback": "channel"}  # fmt: skip
RUNS = {
    "rtn": {"method": "rtn"},
    "awq": {"method": "awq"},
    "awq-noclip": {"method": "awq", "clip": False},
    "gptq": {"method": "gptq"},
    "awq-gptq": {"method": "awq", "base": "gptq"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_methods(tmp_path_factory.mktemp("awq"), W3_ASYM_G32, RUNS)


def _ppl_of(result) -> float:
    return result.manifest("evaluate")["summary"]["ppl"]


def test_awq_beats_rtn_and_matches_gptq(runs):
    ppl = {name: _ppl_of(r[2]) for name, r in runs.items()}
    # measured (AMD EPYC): RTN 8.333, AWQ without clipping 7.653, AWQ 6.351; GPTQ 6.111, AWQ + GPTQ 6.015
    assert ppl["awq"] < ppl["awq-noclip"] < 0.95 * ppl["rtn"]
    assert ppl["awq"] < 0.8 * ppl["rtn"]
    # AWQ + GPTQ is 1.6% below GPTQ here; with loss_tokens 8192 it was equal to 5e-7 (layer errors move both ways):
    # bounded by GPTQ's, not claimed better
    assert ppl["awq-gptq"] <= ppl["gptq"] * 1.002


def test_every_mapping_is_searched_and_the_identity_never_loses(runs):
    layers = runs["awq"][2].manifest("quantize")["summary"]["layers"]
    assert len(layers) == 5
    for per_layer in layers.values():
        assert set(per_layer) == {"qkv", "o_proj", "gate_up", "down_proj"}  # v -> o not skipped under GQA
        for edge in per_layer.values():
            assert edge["loss_vs_identity"] <= 1.0
    chosen = sum(edge["candidate"] > 0 for per_layer in layers.values() for edge in per_layer.values())
    assert chosen >= 12  # measured: a scale kept on 18 of 20 mappings (identity: layer 0 o_proj, gate_up)


def test_folded_norms_are_packed_and_the_checkpoint_reloads_exactly(runs):
    from qtool.formats.compressed_tensors.reader import load_packed
    from tests.integration.test_quantease import _ppl

    recipe, run_dir, result = runs["awq"]
    packed = load_packed(run_dir / "05-pack" / "model", torch.float32)
    assert _ppl(packed, recipe) == pytest.approx(_ppl_of(result), rel=1e-6)
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    gains = [
        not torch.equal(packed.model.layers[i].input_layernorm.weight, source.model.layers[i].input_layernorm.weight)
        for i in range(5)
    ]
    assert any(gains)  # the folded scales travel in the packed norms


def test_killed_awq_run_resumes_bit_identical(runs, tmp_path):
    recipe, reference_dir, _ = runs["awq"]
    killed_run_packs_the_same(recipe, reference_dir, tmp_path / "killed")


def test_impossible_settings_exit_2_before_anything_is_written(tmp_path):
    require(STORIES, TINYSTORIES)
    cases = {
        "mapping": (W3_ASYM_G32, {"method": "awq", "mappings": ["qkv", "v_to_o"]}, "quantize.mappings"),
        "clip-gptq": (W3_ASYM_G32, {"method": "awq", "base": "gptq", "clip": True}, "clip"),
        "mse": ({**W3_ASYM_G32, "weights": {**W3_ASYM_G32["weights"], "observer": "mse"}}, {"method": "awq"},
                "quantize.clip"),
    }  # fmt: skip
    for name, (scheme, quantize, message) in cases.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", name=name, scheme=scheme, quantize=quantize)
        refused_before_writing(recipe, tmp_path / f"run-{name}", message)


def test_awq_recipes_validate():
    for name in ("w4a16-awq.yaml", "w4a16-awq-gptq.yaml"):
        proc = subprocess.run([sys.executable, "-m", "qtool", "validate", str(ROOT / "recipes" / name)], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr + proc.stdout


def test_pipeline_still_runs_after_awq_apply(runs, tmp_path):
    """A rerun with every stage current applies the layer checkpoints (norms included) instead of recomputing."""
    recipe, run_dir, result = runs["awq"]
    again = Pipeline(load_recipe(recipe), run_dir, from_stage="evaluate").run()
    assert _ppl_of(again) == pytest.approx(_ppl_of(result), rel=1e-9)
