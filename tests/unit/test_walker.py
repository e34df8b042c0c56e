"""The layer walker and its observers on stories260K: the walk computes what the model's own forward computes,
``keep`` saves a forward without changing anything, hooks see each layer once in order, and observers over shards
of the windows merge into the observers of all windows."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.gptq import HessianAccumulator
from qtool.arch import decoder_layers, spec_for
from qtool.models.observers import AbsmaxObserver, HessianObserver, InputStatsObserver
from qtool.models.walker import LayerHooks, LayerWalker
from tests.conftest import STORIES, require

pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def model():
    require(STORIES)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval().requires_grad_(False)


WINDOWS = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0))


def test_walk_reproduces_the_models_hidden_states(model):
    """Layer by layer (captured kwargs, one window at a time) equals the full forward, bit for bit."""
    spec = spec_for(model.config)
    seen = []
    for step in LayerWalker(model, spec, WINDOWS):
        seen.append(torch.cat(step.inputs.hidden))
    with torch.no_grad():
        full = [model(w[None], output_hidden_states=True).hidden_states for w in WINDOWS]
    for i, inputs in enumerate(seen):
        assert torch.equal(inputs, torch.cat([h[i] for h in full])), i


def test_keep_saves_a_forward_and_changes_nothing(model):
    spec = spec_for(model.config)
    calls = {"kept": 0, "plain": 0}

    def counting(key):
        return lambda _m, _a: calls.__setitem__(key, calls[key] + 1)

    outputs = {}
    for keep in (False, True):
        handles = [layer.register_forward_pre_hook(counting("kept" if keep else "plain"))
                   for layer in decoder_layers(model, spec)]  # fmt: skip
        try:
            for step in LayerWalker(model, spec, WINDOWS):
                step.run(keep=keep)
                outputs[keep, step.index] = torch.cat(step.inputs.hidden)
        finally:
            for h in handles:
                h.remove()
    n, layers = len(WINDOWS), len(decoder_layers(model, spec))
    # capture calls layer 0 once per window (stopped by the capture hook); then without keep one observed run per
    # layer plus one more for the next inputs (none after the last layer), with keep the observed run only
    assert calls["plain"] == n + n * (2 * layers - 1) and calls["kept"] == n + n * layers
    assert all(torch.equal(outputs[False, i], outputs[True, i]) for i in range(layers))


def test_hooks_see_each_layer_once_in_order_and_no_data_runs_nothing(model):
    spec = spec_for(model.config)
    events = []

    class Record(LayerHooks):
        def load(self, index, layer):
            events.append(("load", index))

        def free(self, index, layer):
            events.append(("free", index))

    progress = []
    steps = list(LayerWalker(model, spec, None, hooks=Record(), progress=lambda *a: progress.append(a)))
    assert [s.inputs for s in steps] == [None] * 5
    assert events == [(kind, i) for i in range(5) for kind in ("load", "free")]
    assert progress[-1] == ("layers", 5, 5)
    with pytest.raises(ValueError, match="no calibration windows"):
        steps[0].run()


def _observe(model, windows, make):
    """Observers of every layer over ``windows`` (the walk keeps the outputs: observing changes nothing)."""
    spec = spec_for(model.config)
    out = []
    for step in LayerWalker(model, spec, windows):
        obs = make(spec)
        step.run(obs, keep=True)
        out.append(obs)
    return out


def test_observers_of_shards_merge_into_the_observers_of_all_windows(model):
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")
    kinds = {
        "hessian": lambda spec: HessianObserver(spec, linears),
        "absmax": lambda spec: AbsmaxObserver(spec, spec.edges),
        "stats": lambda spec: InputStatsObserver(spec, covariance_tokens=10**6),
    }
    for kind, make in kinds.items():
        full = _observe(model, WINDOWS, make)
        merged = _observe(model, WINDOWS[:2], make)
        for mine, other in zip(merged, _observe(model, WINDOWS[2:], make), strict=True):
            mine.merge(other)
        for a, b in zip(full, merged, strict=True):
            if kind == "hessian":
                assert set(a.acc) == {"qkv", "o_proj", "down_proj"}  # q and k share one accumulator
                assert a.accumulator("self_attn.k_proj") is a.accumulator("self_attn.q_proj")
                for edge in a.acc:
                    assert a.acc[edge].count == b.acc[edge].count == 6 * 32
                    torch.testing.assert_close(a.acc[edge].sum, b.acc[edge].sum, rtol=1e-12, atol=0)
            elif kind == "absmax":
                assert all(torch.equal(a.absmax(e), b.absmax(e)) for e in a.acc)
            else:
                for edge in a.acc:
                    fa, fb = a.finalize(edge), b.finalize(edge)
                    assert fa["tokens"] == fb["tokens"] == 6 * 32 and fa["absmax"] == fb["absmax"]
                    for metric in ("kurtosis", "mmr", "qsur"):
                        assert fb[metric] == pytest.approx(fa[metric], rel=1e-9), (edge, metric)


def test_hessian_observer_sees_the_quantized_input(model):
    """Observers hook after qtool's input hook: with a dynamic int4 quantizer on q_proj's input, the Hessian is
    that of the quantized rows."""
    from qtool.algorithms.actquant import fake_quantize_dynamic
    from qtool.models.online import input_hook
    from qtool.schemes import PRESETS

    spec = spec_for(model.config)
    layer = decoder_layers(model, spec)[0]
    args = PRESETS["W4A4"].input_activations
    captured = []
    probe = layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]), prepend=True)
    input_hook(layer.self_attn.q_proj).quant = args
    try:
        step = next(iter(LayerWalker(model, spec, WINDOWS[:2])))
        obs = HessianObserver(spec, ["self_attn.q_proj"])
        step.run(obs)
    finally:
        probe.remove()
        input_hook(layer.self_attn.q_proj).quant = None
    want = HessianAccumulator.zeros(64)
    for x in captured:  # the raw inputs (the probe runs before the quantizer), quantized as the hook does
        want.add(fake_quantize_dynamic(x, args))
    assert torch.equal(obs.hessian("self_attn.q_proj"), want.hessian())
