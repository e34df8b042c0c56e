"""Target planning against real module shapes (meta device: no weights)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from qtool.arch import LLAMA, decoder_layers
from qtool.errors import QtoolError
from qtool.schemes import PRESETS, QuantArgs, Scheme
from qtool.targets import matches, plan_targets, suggest_group_size
from qtool.validation import meta_model

CONFIG = LlamaConfig(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=128,
)


def _plan(scheme: Scheme):
    return plan_targets(decoder_layers(meta_model(CONFIG), LLAMA), LLAMA, scheme)


def test_matching_rules():
    assert matches("model.layers.0.mlp.down_proj", ("down_proj",))
    assert not matches("model.layers.0.mlp.down_proj", ("own_proj",))
    assert matches("model.layers.1.self_attn.q_proj", (r"re:.*layers\.1\..*",))


def test_fallbacks():
    g32 = QuantArgs(bits=4, granularity="group", group_size=32)
    with pytest.raises(QtoolError, match=r"in_features=172 of model.layers.0.mlp.down_proj; use 4"):
        _plan(Scheme(weights=g32))
    plan = _plan(Scheme(weights=g32, group_fallback="channel"))
    down = [t for t in plan[0] if t.name == "mlp.down_proj"][0]
    assert down.args.granularity == "channel" and len(plan[0]) == 7
    plan = _plan(Scheme(weights=g32, group_fallback="ignore"))
    assert [t.name for t in plan[0]] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    ]


def test_ignore_and_no_match():
    plan = _plan(Scheme(weights=PRESETS["W8A16"].weights, ignore=("re:model.layers.0.*",)))
    assert plan[0] == [] and len(plan[1]) == 7
    with pytest.raises(QtoolError, match="matches no linear"):
        _plan(Scheme(weights=PRESETS["W8A16"].weights, targets=("qkv",)))


@pytest.mark.parametrize(("n", "wanted", "expected"), [(172, 64, 4), (576, 128, 64), (1536, 128, 128), (43, 32, 1)])
def test_suggest_group_size(n, wanted, expected):
    assert suggest_group_size(n, wanted) == expected


def test_input_overrides_per_linear_and_shared_inputs_agree():
    w8, token = PRESETS["W8A8"].weights, PRESETS["W8A8"].input_activations
    static = QuantArgs(bits=8, granularity="tensor", dynamic=False)
    plan = _plan(Scheme(weights=w8, input_activations=static, input_overrides={"re:.*(o_proj|down_proj)": token}))
    by_name = {t.name: t.input_args for t in plan[1]}
    assert by_name["self_attn.o_proj"] == token and by_name["mlp.down_proj"] == token
    assert by_name["self_attn.q_proj"] == static and by_name["mlp.up_proj"] == static
    with pytest.raises(QtoolError, match="q_proj and self_attn.k_proj read the same input"):
        _plan(Scheme(weights=w8, input_activations=static, input_overrides={"k_proj": token}))
    with pytest.raises(QtoolError, match="scheme.input_overrides: 'kproj' matches no linear"):
        _plan(Scheme(weights=w8, input_activations=static, input_overrides={"kproj": token}))
