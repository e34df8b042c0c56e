"""OSTQuant's orthogonal + scaling transforms are exact equivalences: with arbitrary orthogonal R_res/R_ov and
arbitrary positive scales, the fused float64 stories260K model (GQA: 8 heads, 4 KV heads) gives the same logits."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.hadamard import random_orthogonal
from qtool.algorithms.ostquant import OstShapes, OstTransforms, fuse, layer_parameters, layer_weights
from qtool.models.arch import decoder_layers, spec_for
from qtool.models.online import OnlineRotation, attention_state, input_hook
from tests.conftest import STORIES, require


@pytest.fixture
def model64(exact_norms):
    require(STORIES)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval().requires_grad_(False)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _random_transforms(model, seed: int = 0) -> OstTransforms:
    g = torch.Generator().manual_seed(seed)
    sh = OstShapes.of(model.config)
    r_ov = torch.stack([random_orthogonal(sh.head_dim, g) for _ in range(sh.layers)])
    t = OstTransforms(sh, random_orthogonal(sh.hidden, g), r_ov, dtype=torch.float64)
    with torch.no_grad():
        for p in t.scales():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return t


def test_fused_transforms_keep_logits(model64):
    spec = spec_for(model64.config)
    ref = _logits(model64)
    t = _random_transforms(model64)
    r4 = OnlineRotation("matrix", 172, random_orthogonal(172, torch.Generator().manual_seed(5)))
    r3 = OnlineRotation("hadamard", 8)
    fuse(model64, spec, t, r4.dense())
    for layer in decoder_layers(model64, spec):
        input_hook(layer.mlp.down_proj).rotation = r4
        attention_state(model64, layer.self_attn).qk_rotation = r3
    diff = (_logits(model64) - ref).abs().max().item()
    assert diff < 1e-9, diff
    assert not torch.allclose(model64.model.layers[0].input_layernorm.weight, torch.ones(64, dtype=torch.float64))


def test_layer_weights_are_differentiable_and_identity_at_init(model64):
    spec = spec_for(model64.config)
    layer = decoder_layers(model64, spec)[0]
    base = layer_parameters(layer, spec)
    sh = OstShapes.of(model64.config)
    t = OstTransforms(sh, torch.eye(sh.hidden, dtype=torch.float64), dtype=torch.float64)
    gain = base["input_layernorm.weight"]
    same = layer_weights(base, t, 0, spec, None, torch.float64)
    assert torch.allclose(same["self_attn.q_proj.weight"], base["self_attn.q_proj.weight"] * gain)
    assert torch.equal(same["input_layernorm.weight"], torch.ones_like(gain))
    t32 = OstTransforms(sh, torch.eye(sh.hidden), dtype=torch.float32)
    out = layer_weights(base, t32, 0, spec, None, torch.float32)
    sum(v.square().sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in (t32.r_res, t32.r_ov, t32.log_s_attn, t32.log_s_ov, t32.log_s_ud))
