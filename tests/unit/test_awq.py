"""AWQ's pure pieces: the candidate grid (identity first), the search (ties and non-finite losses), the
grouped-query v -> o fold (float64 logits unchanged; a wrong head mapping caught), the clipping search (the Hessian
block score equals AutoAWQ's per-token score, never worse than no clipping), and one layer through the method: the
parent's calibration error never above plain RTN's, and uniform channels give plain RTN bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.algorithms.awq import (
    candidate_scales,
    clip_ratios,
    expand_heads,
    reduce_heads,
    scaled_fake_quant,
    search,
    weight_means,
)
from qtool.algorithms.quantizer import rtn_quantize
from qtool.algorithms.smoothing import apply_smoothing
from qtool.arch import LayerView, Shapes, decoder_layers, spec_for
from qtool.schemes import QuantArgs
from tests.conftest import STORIES, require

pytestmark = pytest.mark.numeric

ASYM3 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=16)


def test_identity_is_the_first_candidate_and_grids_are_normalised():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, generator=g, dtype=torch.float64) * 10
    w = torch.rand(64, generator=g, dtype=torch.float64)
    for duo, n in (("true", 21), ("false", 21), ("both", 41)):
        cands = candidate_scales(x, w, 20, duo)
        assert len(cands) == n
        assert torch.equal(cands[0], torch.ones(64, dtype=torch.float64))
        for s in cands[1:]:
            assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-12)
    # duo scaling at alpha = 0 is 1 / w (normalised), not the identity: why the identity is added
    assert not torch.allclose(candidate_scales(x, w, 20, "true")[1], torch.ones(64, dtype=torch.float64))


def test_search_keeps_the_identity_on_ties_and_skips_non_finite_losses():
    cands = [torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 3.0)]
    s, _ = search(cands, lambda s: 1.0)
    assert s is cands[0]
    s, losses = search(cands, lambda s: {1.0: math.nan, 2.0: 5.0, 3.0: math.inf}[float(s[0])])
    assert s is cands[1] and math.isnan(losses[0])
    with pytest.raises(ValueError, match="no finite loss"):
        search(cands, lambda s: math.nan)


def test_head_expansion_matches_grouped_query_attention():
    # 4 query heads over 2 KV heads of dim 3: query heads 0, 1 read KV head 0
    s = torch.arange(6, dtype=torch.float64)
    cols = expand_heads(s, 4, 2, 3)
    assert cols.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert torch.equal(reduce_heads(cols, 4, 2, 3), s)


@pytest.fixture
def stories64(exact_norms):
    from transformers import AutoModelForCausalLM

    require(STORIES)
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _fold_v_o(model, wrong: bool = False) -> None:
    spec, shapes = spec_for(model.config), Shapes.of(model.config)
    g = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model, spec):
        view = LayerView(layer, spec, shapes)
        s = torch.rand(shapes.kv_heads * shapes.head_dim, generator=g, dtype=torch.float64) * 10 + 0.1
        cols = expand_heads(s, shapes.heads, shapes.kv_heads, shapes.head_dim)
        if wrong:  # each value row repeated in place (repeat_interleave): the wrong query heads get it
            cols = s.repeat_interleave(shapes.heads // shapes.kv_heads)
        apply_smoothing(view, spec.edge("o_proj"), s, cols)


def test_grouped_query_v_to_o_scaling_keeps_float64_logits(stories64):
    assert stories64.config.num_attention_heads == 8 and stories64.config.num_key_value_heads == 4
    ref = _logits(stories64)
    _fold_v_o(stories64)
    diff = (_logits(stories64) - ref).abs().max().item()
    assert diff < 1e-9, diff  # measured 2.3e-14


def test_a_wrong_head_mapping_changes_the_logits(stories64):
    ref = _logits(stories64)
    _fold_v_o(stories64, wrong=True)
    assert (_logits(stories64) - ref).abs().max().item() > 0.1  # measured 16.3


def test_clip_score_is_autoawqs_per_token_error_and_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g) * torch.linspace(0.1, 4, 64)
    w = torch.randn(24, 64, generator=g)
    w[:, 5] *= 8  # a column of large weights: clipping pays there
    h = x.double().T @ x.double()
    ratios, err = clip_ratios(w, h, ASYM3, torch.float32)
    assert ratios.shape == (24, 4) and (ratios < 1).any()
    # AutoAWQ's score: sum over tokens of (x_g . dw_g)^2 per group, here over every token
    qw = rtn_quantize(w, ASYM3, clip=ratios).dequantize(torch.float64)
    d = (w.double() - qw).reshape(24, 4, 16)
    per_token = torch.einsum("tgk,ogk->otg", x.double().reshape(2000, 4, 16), d).square().sum(dim=1)
    assert float(per_token.sum()) == pytest.approx(float(err), rel=1e-9)
    plain = (w.double() - rtn_quantize(w, ASYM3).dequantize(torch.float64)).reshape(24, 4, 16)
    plain_err = torch.einsum("tgk,ogk->otg", x.double().reshape(2000, 4, 16), plain).square().sum(dim=1)
    assert (per_token <= plain_err * (1 + 1e-12)).all()  # per group: never worse than the full range
    assert float(err) < 0.95 * float(plain_err.sum())  # measured 0.893


def test_clip_ratio_one_is_plain_rtn_bit_for_bit():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    a = rtn_quantize(w, ASYM3, clip=torch.ones(8, 4))
    b = rtn_quantize(w, ASYM3)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_uniform_channels_choose_the_identity_and_give_rtn_bit_for_bit():
    """Inputs whose channels have equal mean magnitudes and ±c weights: every candidate of both grids is the
    identity, so the kept scale is exactly 1 and the weights are RTN's."""
    x = torch.ones(64, dtype=torch.float64) * 0.7
    w = torch.where(torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) > 0.5, 0.3, -0.3)
    cands = candidate_scales(x, weight_means([w], 16), 20, "both")
    assert all(torch.equal(s, torch.ones(64, dtype=torch.float64)) for s in cands)
    s, _ = search(cands, lambda s: float(s.sum()))
    q = scaled_fake_quant(w, s, ASYM3, torch.float32)
    assert torch.equal(q, rtn_quantize(w, ASYM3).dequantize(torch.float64))


def test_one_layer_never_raises_its_parents_calibration_error(tmp_path):
    """Layer 0 of stories260K through the method (clipping off): with the scales folded, the attention output on
    the scored windows is closer to full precision than with plain RTN of the same weights."""
    from transformers import AutoModelForCausalLM

    from qtool.methods.quantize import Awq, AwqConfig
    from qtool.models.observers import ModuleCallsObserver
    from qtool.models.walker import LayerWalker
    from qtool.schemes import Scheme
    from qtool.targets import plan_targets

    require(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    spec, shapes = spec_for(model.config), Shapes.of(model.config)
    scheme = Scheme(weights=QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32),
                    group_fallback="channel")  # fmt: skip
    plan = plan_targets(decoder_layers(model, spec), spec, scheme)
    ids = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = AwqConfig(method="awq", clip=False, loss_tokens=0)
    step = next(iter(LayerWalker(model, spec, ids)))
    layer = step.layer
    calls = ModuleCallsObserver(["self_attn", "mlp"])
    step.run(calls)
    ref = {p: calls.outputs(layer, p) for p in calls.calls}
    saved = {n: p.detach().clone() for n, p in layer.named_parameters()}

    def error(parent: str) -> float:
        outs = calls.outputs(layer, parent)
        return float(sum((o.double() - r.double()).square().sum() for o, r in zip(outs, ref[parent], strict=True)))

    def rescaled_error(parent: str, norm: str) -> float:
        # the recorded inputs are the FP norm outputs; the folded gain divides them by s
        gain = layer.get_parameter(f"{norm}.weight").detach() / saved[f"{norm}.weight"]
        outs = []
        with torch.no_grad():
            for args, kwargs in calls.calls[parent]:
                a = (args[0] * gain,) + tuple(args[1:]) if args else args
                kw = dict(kwargs)
                if "hidden_states" in kw:
                    kw["hidden_states"] = kw["hidden_states"] * gain
                out = layer.get_submodule(parent)(*a, **kw)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return float(sum((o.double() - r.double()).square().sum() for o, r in zip(outs, ref[parent], strict=True)))

    # plain RTN of the same weights
    with torch.no_grad():
        for t in plan[0]:
            layer.get_submodule(t.name).weight.copy_(rtn_quantize(saved[f"{t.name}.weight"], t.args).dequantize())
    plain = {"self_attn": error("self_attn"), "mlp": error("mlp")}
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(saved[n])
    result = Awq().quantize_layer(cfg, step, plan[0], spec, shapes)
    assert set(result.params) >= {"input_layernorm.weight"}  # the qkv scale was folded into the gain
    with torch.no_grad():
        for name, value in result.params.items():
            layer.get_parameter(name).copy_(value)
        for name, qw in result.weights.items():
            layer.get_submodule(name).weight.copy_(qw.dequantize())
    awq_attn = rescaled_error("self_attn", "input_layernorm")
    # measured: 0.722 of plain RTN's attention output error (q/k/v and o quantized in both)
    assert awq_attn <= plain["self_attn"] * (1 + 1e-6)
    assert awq_attn < 0.9 * plain["self_attn"]


def test_a_parent_output_that_overflows_float32_is_scored_in_float64():
    """An MLP whose float32 output overflows (inputs ~1e18 through weights ~1e3, squared by the gate): the loss is
    recomputed with the module and its inputs in float64 instead of coming back inf, and the module is restored."""
    from types import SimpleNamespace

    import torch.nn as nn

    from qtool.methods.quantize import _parent_loss
    from qtool.models.observers import ModuleCallsObserver
    from qtool.targets import Target

    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        nn.Linear(16, 32, False),
        nn.Linear(16, 32, False),
        nn.Linear(32, 16, False),
    )
    mlp.forward = lambda x: mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x))
    layer = nn.Module()
    layer.mlp = mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.mul_(1e3)
    x = torch.randn(1, 8, 16) * 1e18
    calls = ModuleCallsObserver(["mlp"])
    calls.calls["mlp"] = [((x,), {})]
    reference = calls.outputs(layer, "mlp")
    assert not torch.isfinite(reference[0]).all()  # float32 overflows
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
    names = ("mlp.gate_proj", "mlp.up_proj")
    by_name = {n: Target(0, n, 16, args) for n in names}
    readers = {n: (layer.get_submodule(n).weight.detach().clone(), args) for n in names}
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    step = SimpleNamespace(layer=layer)
    loss = _parent_loss(layer, readers, torch.ones(16, dtype=torch.float64), calls, "mlp", reference, step, by_name)
    assert math.isfinite(loss) and loss > 0
    for n, p in layer.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n])
