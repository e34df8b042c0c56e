"""SmolLM2-135M in float64: QuaRot R1–R4 (Kronecker Hadamards 576 = 36·16, 1536 = 12·128) and SmoothQuant leave
the logits unchanged within 1e-9. `make test-slow`."""

from __future__ import annotations

import pytest
import torch

from qtool.arch import spec_for
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
    from tests.conftest import smooth_randomly

    model = _fresh()
    ref = _logits(model)
    smooth_randomly(model, torch.Generator().manual_seed(0))
    diff = (_logits(model) - ref).abs().max().item()
    assert diff < TOL, diff
