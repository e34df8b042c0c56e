"""Equivalent transforms leave the float64 model's logits unchanged (R1–R4 rotations, SmoothQuant), on the real
stories260K Llama (hidden 64, head_dim 8, MLP 172: R4 has no Hadamard and uses a random orthogonal matrix)."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.rotation import FusedRotations, build_rotations, make_rotation, rotate_model
from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, reader_weights, smoothing_scales
from qtool.arch import LayerView, Shapes, decoder_layers, spec_for
from qtool.methods.transform import apply_rotations
from tests.conftest import STORIES, require

pytestmark = pytest.mark.numeric

TOL = 1e-9


@pytest.fixture
def model64(exact_norms):
    require(STORIES)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval().requires_grad_(False)


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize(
    "rotations", [("r1", "r2", "r3", "r4"), ("r1",), ("r2",), ("r3",), ("r4",)], ids=lambda r: "+".join(r)
)
def test_rotations_keep_logits(model64, rotations):
    ref = _logits(model64)
    tensors, kinds = build_rotations(model64.config, rotations, seed=0)
    apply_rotations(model64, spec_for(model64.config), tensors, kinds)
    diff = (_logits(model64) - ref).abs().max().item()
    assert diff < TOL, f"{rotations}: max |Δlogit| = {diff:.3e}"
    if "r4" in rotations:
        assert kinds["r4"] == {"kind": "matrix", "size": 172}  # no Hadamard of order 172
    if "r1" in rotations:  # stories260K's final norm gain is not all ones: lm_head had to be untied
        assert model64.lm_head.weight is not model64.model.embed_tokens.weight
        assert not model64.config.tie_word_embeddings


def test_rotation_changes_weights_and_is_deterministic(model64):
    spec = spec_for(model64.config)
    q0 = model64.model.layers[0].self_attn.q_proj.weight.clone()
    every = ("r1", "r2", "r3", "r4")
    a, ka = build_rotations(model64.config, every, seed=3)
    b, _ = build_rotations(model64.config, every, seed=3)
    c, _ = build_rotations(model64.config, every, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["r1"], c["r1"])
    for r in a.values():
        assert (r.T @ r - torch.eye(r.shape[0], dtype=torch.float64)).abs().max() < 1e-12
    apply_rotations(model64, spec, a, ka)
    assert (model64.model.layers[0].self_attn.q_proj.weight - q0).abs().max() > 1e-3


def test_tied_embedding_kept_when_final_gain_is_one(model64):
    model64.model.norm.weight.fill_(1.0)
    ref = _logits(model64)
    r1, kind = make_rotation(64, torch.Generator().manual_seed(0))
    assert kind == "hadamard"
    rotate_model(model64, spec_for(model64.config), FusedRotations(r1=r1))
    assert model64.lm_head.weight is model64.model.embed_tokens.weight
    assert (_logits(model64) - ref).abs().max() < TOL


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_keeps_logits_and_flattens_activations(model64, alpha):
    spec = spec_for(model64.config)
    ref = _logits(model64)
    layer = decoder_layers(model64, spec)[0]
    seen: dict[str, torch.Tensor] = {}
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].abs()))
    _logits(model64)
    before = seen["x"].amax(dim=(0, 1))
    view = LayerView(layer, spec, Shapes.of(model64.config))
    for edge in (spec.edge(m) for m in MAPPINGS):
        w = reader_weights(view, edge)
        act = torch.rand(w[0].shape[1], dtype=torch.float64) * 10 + 0.1 if edge.name != "down_proj" else before
        apply_smoothing(view, edge, smoothing_scales(act, w, alpha))
    out = _logits(model64)
    handle.remove()
    after = seen["x"].amax(dim=(0, 1))
    assert (out - ref).abs().max() < TOL
    ratio = lambda v: (v.max() / v.median()).item()  # noqa: E731
    assert ratio(after) < ratio(before)


@pytest.mark.parametrize("symmetrize", [True, False])
def test_outliertune_fold_keeps_logits_and_centres_channels(model64, symmetrize):
    """OutlierTune's scales (into the norms and readers), shifts (online, before q/k/v and gate/up) and the biases
    that compensate them keep the float64 logits; the readers then see every channel within [-1, 1] (centred when
    symmetrized) on the calibration batch."""
    from qtool.algorithms.outliertune import channel_params
    from qtool.methods.transform import _fold, enable_biases
    from qtool.models.observers import RangeObserver
    from qtool.models.walker import LayerWalker

    spec = spec_for(model64.config)
    ref = _logits(model64)
    edges = [spec.edge("qkv"), spec.edge("gate_up")]
    if symmetrize:
        assert enable_biases(model64, spec, edges) == ["attention_bias", "mlp_bias"]
        assert model64.model.layers[0].self_attn.o_proj.bias is not None  # what attention_bias adds, zeros
    shapes = Shapes.of(model64.config)
    for step in LayerWalker(model64, spec, _ids()):
        ranges = RangeObserver(spec, ["self_attn.q_proj", "mlp.gate_proj"])
        step.run(ranges, keep=True)
        for edge in edges:
            s, c = channel_params(*ranges.range(spec.linears(edge)[0]), symmetrize)
            _fold(step.layer, LayerView(step.layer, spec, shapes), spec, edge, s, c)
    assert (_logits(model64) - ref).abs().max() < TOL  # measured 5.3e-14 (symmetrized), 2.8e-14
    seen = RangeObserver(spec, ["mlp.gate_proj"])
    handles = seen.attach(model64.model.layers[1])
    _logits(model64)
    for h in handles:
        h.remove()
    lo, hi = seen.range("mlp.gate_proj")  # float32 statistics
    assert lo.min() >= -1 - 1e-6 and hi.max() <= 1 + 1e-6
    if symmetrize:
        assert torch.allclose(hi, -lo, atol=1e-6) and hi.min() > 1 - 1e-6  # every channel exactly [-1, 1]
