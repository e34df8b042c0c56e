"""The whole pipeline on a family that is not Llama-shaped: a seeded random Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``) with the stories260K tokenizer. Outlier statistics, rotations, GPTQ, packing and evaluation run
through the same edge records as Llama; the packed checkpoint reloads to the pipeline's own perplexity."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from qtool.formats.layers import read_layer
from qtool.loading import load_model, resolve_source
from qtool.pipeline import Pipeline
from qtool.recipe import load_recipe
from tests.conftest import TINYSTORIES, require

pytestmark = pytest.mark.numeric


def _recipe(path, model_dir, **sections) -> dict:
    raw = {
        "name": "phi3",
        "model": str(model_dir),
        "calibration": {"dataset": str(TINYSTORIES), "span": [0.5, 1.0], "n_samples": 16, "seqlen": 128},
        "scheme": {"preset": "W4A16", "weights": {"group_size": 16}},
        "quantize": {"method": "gptq"},
        "evaluate": {"dataset": str(TINYSTORIES), "name": "tinystories", "span": [0.0, 0.5], "seqlen": 128,
                     "max_tokens": 2048, "compare_fp": False},
    }  # fmt: skip
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return path


def _ppl(model, tokenizer) -> float:
    from qtool.data import load_text, tokenize
    from qtool.eval.perplexity import token_perplexity

    ids = tokenize(tokenizer, load_text(TINYSTORIES, span=(0.0, 0.5)))
    return token_perplexity(model.eval(), ids, 128, 2048).ppl


def test_phi3_stats_rotation_gptq_pack_reload(phi3_dir, tmp_path):
    require(TINYSTORIES)
    recipe = _recipe(
        tmp_path / "r.yaml",
        phi3_dir,
        outliers={"method": "stats", "max_samples": 4},
        transform={"method": "hadamard", "rotations": ["r1", "r2"]},
    )
    run_dir = tmp_path / "run"
    result = Pipeline(load_recipe(recipe), run_dir).run()
    stats = json.loads((run_dir / "02-outliers" / "stats.json").read_text())
    row = stats["layers"][0]
    assert set(row["inputs"]) == {"qkv", "o_proj", "gate_up", "down_proj"}
    assert set(row["weights"]) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    assert result.manifest("quantize")["summary"]["linears"] == 8
    errors = result.manifest("quantize")["summary"]["layer_error"]
    assert set(errors) == {f"{i}.{n}" for i in range(2) for n in row["weights"]}
    qc = json.loads((run_dir / "05-pack" / "model" / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and weights["actorder"] == "weight"
    assert qc["ignore"] == ["lm_head"]
    summary = result.manifest("evaluate")["summary"]
    model, tokenizer = load_model(resolve_source(str(run_dir)))  # qtool's loader on the run directory
    assert _ppl(model, tokenizer) == pytest.approx(summary["ppl"], rel=1e-6)
    fused = read_layer(run_dir / "04-quantize" / "layers", 1).weights["self_attn.qkv_proj"]
    assert fused.q.shape == (128, 64)
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, fused.dequantize(torch.float32))


def test_phi3_w4a4kv4_online_rotations_reload(phi3_dir, tmp_path):
    """R3 in the qtool attention function of Phi-3's attention, R4 before down_proj, dynamic int4 inputs of the
    fused linears and int4 KV: the reloaded checkpoint computes what the pipeline evaluated."""
    require(TINYSTORIES)
    recipe = _recipe(
        tmp_path / "r.yaml",
        phi3_dir,
        scheme="W4A4KV4",
        transform={"method": "hadamard"},
        quantize={"method": "gptq", "act_order": False},
    )
    run_dir = tmp_path / "run"
    result = Pipeline(load_recipe(recipe), run_dir).run()
    config = json.loads((run_dir / "05-pack" / "model" / "config.json").read_text())
    online = config["qtool"]["online"]
    assert online["inputs"]["model.layers.0.mlp.down_proj"]["rotation"] == {"kind": "hadamard", "size": 96}
    assert online["inputs"]["model.layers.0.self_attn.qkv_proj"]["quant"]["bits"] == 4
    assert "actorder" not in config["quantization_config"]["config_groups"]["group_0"]["weights"]
    summary = result.manifest("evaluate")["summary"]
    model, tokenizer = load_model(resolve_source(str(run_dir)))
    assert _ppl(model, tokenizer) == pytest.approx(summary["ppl"], rel=1e-6)


def test_phi3_ostquant_gptq_aware_student_runs_and_replays(phi3_dir, tmp_path):
    """OSTQuant on the fused layout: the GPTQ-aware student refreshes its Hessians by walking its own layers,
    fuses into row blocks, and the packed model reloads to the pipeline's perplexity."""
    require(TINYSTORIES)
    recipe = _recipe(
        tmp_path / "r.yaml",
        phi3_dir,
        transform={"method": "ostquant", "n_samples": 8, "seqlen": 64, "iterations": 4, "checkpoint_every": 2,
                   "top_k": 50, "online_rotations": [], "weight_error": "gptq"},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    result = Pipeline(load_recipe(recipe), run_dir).run()
    transform = result.manifest("transform")["summary"]
    assert transform["orthogonality_error"] <= 1e-6 and len(transform["loss_curve"]) == 4
    summary = result.manifest("evaluate")["summary"]
    model, tokenizer = load_model(resolve_source(str(run_dir)))
    assert _ppl(model, tokenizer) == pytest.approx(summary["ppl"], rel=1e-6)
