"""AdaDim's pieces: the per-input-channel grid (block (g, 1)), GPTQ on it, and the axis selection."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.adadim import axis_of, choose, output_axis_args
from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.objective import output_error
from qtool.algorithms.quantizer import column_qparams, rtn_quantize
from qtool.methods.quantize import AdaDimConfig
from qtool.schemes import QuantArgs, Scheme

G32 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32)
IC32 = QuantArgs(bits=3, symmetric=False, granularity="block", block_structure=(32, 1))


def _layer(seed: int = 0, out: int = 128, inp: int = 96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(4096, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    return w, (x.T @ x).double() * (2 / x.shape[0])


def test_output_axis_args_follow_the_scheme_and_its_fallback():
    assert output_axis_args(G32, 128) == IC32
    per_channel = QuantArgs(bits=4, granularity="channel")
    assert output_axis_args(per_channel, 172).block_structure == (172, 1)  # one scale per input column
    assert output_axis_args(G32, 172, "channel").block_structure == (172, 1)
    assert output_axis_args(G32, 172, "ignore") is None
    with pytest.raises(ValueError, match="does not divide out_features=172"):
        output_axis_args(G32, 172, "error")
    with pytest.raises(ValueError, match="no output axis"):
        output_axis_args(QuantArgs(bits=4, granularity="tensor"), 128)
    assert axis_of(IC32) == "output" and axis_of(G32) == "input"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_per_input_channel_grid_is_the_transposed_group_grid(symmetric, observer):
    w, _ = _layer()
    ic = IC32.model_copy(update={"symmetric": symmetric, "observer": observer})
    oc = G32.model_copy(update={"symmetric": symmetric, "observer": observer})
    a, b = rtn_quantize(w, ic), rtn_quantize(w.T.contiguous(), oc)
    assert a.scale.shape == (4, 96)
    assert torch.equal(a.q, b.q.T) and torch.equal(a.scale, b.scale.T) and torch.equal(a.dequantize(), b.dequantize().T)
    scale, zp = column_qparams(w[:, 7], ic, torch.float32)  # GPTQ's per-column qparams: the same numbers
    assert torch.equal(scale, a.scale[:, 7]) and (zp is None or torch.equal(zp, a.zero_point[:, 7]))


def test_gptq_on_the_per_input_channel_grid():
    w, H = _layer()
    rtn = rtn_quantize(w, IC32)
    # a diagonal Hessian propagates no error: GPTQ is then exactly RTN, scales included
    diag = torch.diag(torch.linspace(0.5, 2.0, 96, dtype=torch.float64))
    same = gptq_quantize(w, diag, IC32, damp=0.0, act_order=True)
    assert (
        torch.equal(same.q, rtn.q)
        and torch.equal(same.scale, rtn.scale)
        and torch.equal(same.zero_point, rtn.zero_point)
    )
    base = output_error(w, rtn.dequantize(), H)
    for act_order in (False, True):
        q = gptq_quantize(w, H, IC32, act_order=act_order)
        assert q.scale.shape == (4, 96) and q.zero_point.shape == (4, 96)
        # measured: 0.52 (natural order), 0.49 (act order) of RTN's output error on this correlated layer
        assert output_error(w, q.dequantize(), H) < 0.6 * base
    with pytest.raises(ValueError, match="one column"):
        gptq_quantize(w, H, IC32.model_copy(update={"block_structure": (32, 2)}))


def _errors(w, H, quantize) -> dict[str, float]:
    return {
        axis: output_error(w, quantize(w, args).dequantize(), H) for axis, args in (("input", G32), ("output", IC32))
    }


@pytest.mark.parametrize("base", ["rtn", "gptq"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_selector_follows_the_output_error(base, seed):
    w, H = _layer(seed)

    def quantize(weight, args, hessian=H):
        return rtn_quantize(weight, args) if base == "rtn" else gptq_quantize(weight, hessian, args)

    def errors(weight, hessian=H):
        return {a: output_error(weight, quantize(weight, args, hessian).dequantize(), hessian)
                for a, args in (("input", G32), ("output", IC32))}  # fmt: skip

    # a weight input channel x10 stretches every row group that holds it: the other axis isolates it
    big_column = w.clone()
    big_column[:, 5] *= 10
    errs = errors(big_column)
    assert choose(errs) == "output" and errs["output"] < 0.85 * errs["input"]  # measured 0.53-0.76
    # one output row x10 stretches every column group that holds it: today's axis is kept
    big_row = w.clone()
    big_row[9] *= 10
    errs = errors(big_row)
    assert choose(errs) == "input" and errs["input"] < 0.85 * errs["output"]  # measured 0.59-0.77
    # x100 the line's own rounding error (which grows with its scale squared) outweighs what it does to its
    # neighbours, and the choice flips: the selector follows the error, not a rule of thumb
    big_row[9] *= 10
    assert choose(errors(big_row)) == "output"  # measured: input's error 3.1-10.5x output's
    # AdaDim's case: activation outlier channels (x100) whose weights are small (/100, the layer's function
    # unchanged): the shared row groups round those weights to 0 and their huge inputs amplify it
    s = torch.ones(96, dtype=torch.float64)
    s[[5, 40, 61, 90]] = 100.0
    hs = H * s[:, None] * s[None, :]
    errs = errors(w / s.float(), hs)
    assert choose(errs) == "output" and errs["output"] < 0.6 * errs["input"]  # measured 0.41-0.48


def test_choose_prefers_the_first_on_ties_and_never_a_non_finite_error():
    assert choose({"input": 1.0, "output": 1.0}) == "input"
    assert choose({"output": 1.0, "input": 1.0}) == "output"
    assert choose({"input": float("nan"), "output": 2.0}) == "output"
    with pytest.raises(ValueError, match="finite"):
        choose({"input": float("inf")})


def test_block_grids_stay_out_of_recipes_and_out_of_other_grids_dumps():
    assert "block_structure" not in G32.model_dump()  # recipe fingerprints and layer checkpoints read as before
    assert IC32.model_dump(mode="json")["block_structure"] == [32, 1]
    assert QuantArgs.model_validate(IC32.model_dump(mode="json")) == IC32
    assert IC32.grid == "output g32" and G32.grid == "input g32"
    with pytest.raises(ValueError, match="method: adadim"):
        Scheme(weights=IC32)
    with pytest.raises(ValueError, match="block_structure"):
        QuantArgs(bits=4, granularity="block")


def test_adadim_config_refuses_repeated_or_empty_candidates():
    cfg = AdaDimConfig.model_validate({"method": "adadim", "base": "rtn"})
    assert cfg.candidates == ("input", "output") and cfg.criterion == "linear"
    for bad in (["input", "input"], [], ["rows"]):
        with pytest.raises(ValueError, match="candidates"):
            AdaDimConfig.model_validate({"method": "adadim", "candidates": bad})
