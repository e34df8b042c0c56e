"""Recipe parsing: presets and overrides, frozen configs, errors that carry the YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from qtool.errors import QtoolError
from qtool.recipe import Recipe, apply_overrides, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "version": 1,
    "name": "t",
    "model": "some/model",
    "calibration": {"dataset": "valid.txt"},
    "scheme": {"preset": "W4A16", "weights": {"group_size": 64}},
    "quantize": {"method": "gptq", "damp": 0.02},
    "evaluate": {"dataset": "test.txt"},
}


def test_preset_with_overrides_and_defaults():
    r = validate_recipe(BASE)
    assert r.scheme.weights.bits == 4 and r.scheme.weights.group_size == 64 and r.scheme.weights.symmetric
    assert r.model.source == "some/model" and r.model.trust_remote_code is False
    assert r.quantize.damp == 0.02 and r.quantize.act_order is True
    assert r.outliers.method == "none" and r.transform.method == "none"
    with pytest.raises(ValidationError):
        r.quantize.damp = 0.5  # frozen


def test_overrides_are_validated_like_the_file():
    raw = apply_overrides(BASE, ["quantize.damp=0.05", "scheme.weights.group_size=32", "quantize={method: rtn}"])
    r = validate_recipe(raw)
    assert r.quantize.method == "rtn" and r.scheme.weights.group_size == 32
    assert BASE["quantize"]["damp"] == 0.02  # the input is not mutated
    with pytest.raises(QtoolError, match="key=value"):
        apply_overrides(BASE, ["quantize.damp"])


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"quantize": {"method": "gptq", "group_szie": 1}}, "quantize.group_szie: unknown key"),
        ({"quantize": {"method": "sparsegpt"}}, "quantize: unknown method 'sparsegpt'"),
        ({"scheme": {"preset": "W5A16"}}, "unknown preset 'W5A16'"),
        ({"scheme": {"weights": {"bits": 4, "granularity": "group"}}}, "scheme.weights: granularity 'group' needs"),
        ({"calibration": {"dataset": "x", "n_samples": 0}}, "calibration.n_samples"),
        ({"evaluate": {"dataset": "valid.txt"}}, "same text"),
        ({"version": 2}, "version"),
        (
            {"transform": {"method": "ostquant", "weight_error": "gptq", "train_weight_quant": False}},
            "transform: weight_error: gptq shapes the student's weight error; set train_weight_quant: true",
        ),
        (
            {"transform": {"method": "ostquant", "learn_qk_scaling": True, "learn_scaling": False}},
            "transform: learn_qk_scaling trains one of the scales; set learn_scaling: true",
        ),
        (
            {"transform": {"method": "ostquant", "weight_error": "gptq"}, "quantize": {"method": "rtn"}},
            "transform.weight_error: gptq trains the transforms for GPTQ's weight error but quantize.method is rtn",
        ),
    ],
)
def test_errors_name_the_yaml_path(patch, message):
    with pytest.raises(QtoolError) as e:
        validate_recipe({**BASE, **patch}, "r.yaml")
    assert message in str(e.value) and str(e.value).startswith("r.yaml: ")
    assert "\n" not in str(e.value)


def test_same_file_with_disjoint_spans_is_allowed():
    raw = {
        **BASE,
        "calibration": {"dataset": "a.txt", "span": [0.5, 1.0]},
        "evaluate": {"dataset": "a.txt", "span": [0.0, 0.5]},
    }
    assert validate_recipe(raw).evaluate.span == (0.0, 0.5)


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "configs" / "tests").glob("*.yaml")):
        r = load_recipe(path)
        assert r.name == yaml.safe_load(path.read_text())["name"]
        assert "valid" in r.calibration.dataset or r.calibration.span != (0.0, 1.0)


def test_schema_rejects_unknown_keys_everywhere():
    schema = Recipe.model_json_schema()
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if d.get("type") == "object")


@pytest.mark.parametrize(("method", "retrains"), [("hadamard", False), ("ostquant", True)])
def test_scheme_change_reruns_the_transform_only_when_it_trains_against_it(method, retrains):
    from qtool.pipeline import fingerprints

    a = validate_recipe({**BASE, "transform": {"method": method}})
    b = validate_recipe({**BASE, "transform": {"method": method}, "scheme": "W4A4KV4"})
    fa, fb = fingerprints(a, "model"), fingerprints(b, "model")
    assert (fa["transform"] != fb["transform"]) == retrains
    assert fa["quantize"] != fb["quantize"]


def test_evaluate_section_is_optional():
    raw = {k: v for k, v in BASE.items() if k != "evaluate"}
    assert validate_recipe(raw).evaluate is None
