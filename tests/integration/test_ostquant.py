"""OSTQuant end to end on stories260K (W4A4KV4, RTN weights): learned transforms beat the Hadamard start they
train from, stay orthogonal, and replay exactly from their artifact (resume and packed reload)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.pipeline import Pipeline
from qtool.recipe import load_recipe
from tests.conftest import ROOT, STORIES, TINYSTORIES, require, write_recipe

pytestmark = pytest.mark.numeric

OSTQUANT = ROOT / "configs" / "tests" / "stories260k-w4a4-ostquant.yaml"


def _run(recipe: Path, run_dir: Path, **kw):
    return Pipeline(load_recipe(recipe), run_dir, **kw).run()


@pytest.fixture(scope="module")
def ost(tmp_path_factory):
    require(STORIES, TINYSTORIES)
    tmp = tmp_path_factory.mktemp("ost")
    recipe = write_recipe(tmp / "ost.yaml", base=OSTQUANT)
    return recipe, tmp / "run", _run(recipe, tmp / "run")


def test_ostquant_beats_its_hadamard_start(ost, tmp_path):
    _, _, result = ost
    summary = result.manifest("transform")["summary"]
    assert summary["orthogonality_error"] <= 1e-6
    assert len(summary["loss_curve"]) == 60  # one training window per iteration: the curve is noisy, not asserted
    recipe = write_recipe(tmp_path / "had.yaml", base=OSTQUANT, name="had", transform={"method": "hadamard"})
    hadamard = _run(recipe, tmp_path / "run").manifest("evaluate")["summary"]
    ostq = result.manifest("evaluate")["summary"]
    # measured (10,220 tokens, 60 iterations): FP 4.002, hadamard + RTN 10.00-10.02, OSTQuant + RTN 8.59-8.84 over
    # five CPU settings (AVX-512, ATen AVX2, MKL+oneDNN AVX2, all AVX2, ATen scalar): float rounding changes which
    # values round where, so the trajectory moves; the ratio stayed 0.86-0.88
    assert ostq["ppl"] < 0.95 * hadamard["ppl"]
    # a student with full-precision weights (SpinQuant's setting when GPTQ follows) still beats the start:
    # 8.99-9.29 over the same five settings
    recipe = write_recipe(
        tmp_path / "nowq.yaml",
        base=OSTQUANT,
        name="nowq",
        transform={"method": "ostquant", "iterations": 60, "top_k": 100, "train_weight_quant": False},
    )
    assert _run(recipe, tmp_path / "nowq").manifest("evaluate")["summary"]["ppl"] < hadamard["ppl"]


def test_ostquant_replays_from_its_artifact(ost):
    from qtool.loading import load_model, resolve_source
    from tests.integration.test_pipeline import _ppl

    recipe, run_dir, result = ost
    ppl = result.manifest("evaluate")["summary"]["ppl"]
    again = _run(recipe, run_dir, from_stage="evaluate")
    assert again.manifest("evaluate")["summary"]["ppl"] == ppl
    assert not (run_dir / "03-transform" / "training-checkpoint.pt").exists()
    reloaded = _ppl(*load_model(resolve_source(str(run_dir))), recipe)
    assert abs(reloaded - ppl) / ppl < 1e-6
    # the learned clipping ratios travel in the checkpoint, one per quantizer of the 5 layers (from 1.0; measured
    # 0.86-0.93, and 0.987-0.992 for the KV cache, after 60 iterations)
    online = json.loads((run_dir / "05-pack" / "model" / "config.json").read_text())["qtool"]["online"]
    clips = [e["quant"]["clip_ratio"] for e in [*online["inputs"].values(), *online["attention"].values()]]
    assert len(clips) == 5 * 7 + 5 and max(clips) < 1.0 and len(set(clips)) > 8
    summary = result.manifest("transform")["summary"]
    assert summary["clip_act"]["min"] == pytest.approx(min(clips[: 5 * 7]), abs=1e-4)


def test_gptq_aware_student_beats_hadamard_under_gptq(tmp_path):
    """W4A16 (int4 g32) + GPTQ: a student whose weight error is GPTQ's residual share (`weight_error: gptq`) beats
    the Hadamard it starts from. Measured (10,220 tokens, FP 4.002), seeds 0-4: hadamard 4.355 / 4.431 / 4.307 /
    4.365 / 4.408, OSTQuant 4.310 / 4.335 / 4.248 / 4.288 / 4.263; with the plain RTN student (seeds 0-2) 4.307 /
    4.355 / 4.367, which loses seed 2 to its start. Seed 0 over five CPU settings (AVX-512, ATen AVX2, MKL+oneDNN
    AVX2, all AVX2, ATen scalar): hadamard 4.3545 in all, OSTQuant 4.304-4.313 (the margin is 8x that spread)."""
    require(STORIES, TINYSTORIES)
    w4a16 = {"preset": "W4A16", "weights": {"group_size": 32}, "group_fallback": "channel"}
    common = {"scheme": w4a16, "quantize": {"method": "gptq"}, "outliers": {"method": "none"}}
    had = write_recipe(
        tmp_path / "had.yaml",
        base=OSTQUANT,
        name="had",
        transform={"method": "hadamard", "rotations": ["r1", "r2"], "random": True, "seed": 0},
        **common,
    )
    ost = write_recipe(
        tmp_path / "ost.yaml",
        base=OSTQUANT,
        name="ost",
        transform={
            "method": "ostquant",
            "iterations": 60,
            "top_k": 100,
            "online_rotations": [],
            "weight_error": "gptq",
        },
        **common,
    )
    ppl = {k: _run(r, tmp_path / k).manifest("evaluate")["summary"]["ppl"] for k, r in (("had", had), ("ost", ost))}
    assert ppl["ost"] < ppl["had"]
