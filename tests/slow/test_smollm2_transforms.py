"""SmolLM2-135M in float64: QuaRot R1–R4 (Kronecker Hadamards 576 = 36·16, 1536 = 12·128) and SmoothQuant leave
the logits unchanged within 1e-9. `make test-slow`."""

from __future__ import annotations

import pytest
import torch

from qtool.arch import decoder_layers, spec_for
from tests.conftest import SMOLLM2, require

pytestmark = pytest.mark.slow
TOL = 1e-9


def _fresh():
    require(SMOLLM2)
    from qtool.loading import load_model, resolve_source

    return load_model(resolve_source(str(SMOLLM2)), "float64")[0]


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def test_hadamard_r1_to_r4_keep_logits(exact_norms):
    from qtool.algorithms.rotation import build_rotations
    from qtool.methods.transform import apply_rotations

    model = _fresh()
    ref = _logits(model)
    tensors, kinds = build_rotations(model.config, ("r1", "r2", "r3", "r4"), seed=0)
    assert {k: v["kind"] for k, v in kinds.items()} == {k: "hadamard" for k in ("r1", "r2", "r3", "r4")}
    apply_rotations(model, spec_for(model.config), tensors, kinds)
    diff = (_logits(model) - ref).abs().max().item()
    assert diff < TOL, diff  # measured 5.3e-13


def test_smoothquant_keeps_logits(exact_norms):
    from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, reader_weights, smoothing_scales
    from qtool.arch import LayerView, Shapes

    model = _fresh()
    spec = spec_for(model.config)
    ref = _logits(model)
    gen = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model, spec):
        view = LayerView(layer, spec, Shapes.of(model.config))
        for edge in (spec.edge(m) for m in MAPPINGS):
            w = reader_weights(view, edge)
            act = torch.rand(w[0].shape[1], generator=gen, dtype=torch.float64) * 50 + 0.01
            apply_smoothing(view, edge, smoothing_scales(act, w, 0.5))
    diff = (_logits(model) - ref).abs().max().item()
    assert diff < TOL, diff
