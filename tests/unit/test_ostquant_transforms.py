"""OSTQuant's orthogonal + scaling transforms are exact equivalences: with arbitrary orthogonal R_res/R_ov and
arbitrary positive scales (S_attn, S_ffn, S_ov, S_u|d, S_qk), the fused float64 stories260K model (GQA: 8 heads,
4 KV heads) gives the same logits."""

from __future__ import annotations

import copy

import pytest
import torch

from qtool.algorithms.hadamard import random_orthogonal
from qtool.algorithms.ostquant import OstShapes, OstTransforms, fuse, layer_parameters, layer_weights
from qtool.arch import LayerView, decoder_layers, spec_for
from qtool.models.online import OnlineRotation, attention_state, input_hook
from tests.conftest import STORIES, random_transforms, require

pytestmark = pytest.mark.numeric


@pytest.fixture
def model64(exact_norms):
    require(STORIES)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval().requires_grad_(False)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_fused_transforms_keep_logits(model64):
    spec = spec_for(model64.config)
    ref = _logits(model64)
    t = random_transforms(model64)
    r4 = OnlineRotation("matrix", 172, random_orthogonal(172, torch.Generator().manual_seed(5)))
    r3 = OnlineRotation("hadamard", 8)
    fuse(model64, spec, t, r4.dense())
    for layer in decoder_layers(model64, spec):
        input_hook(layer.mlp.down_proj).rotation = r4
        attention_state(model64, layer.self_attn).qk_rotation = r3
    diff = (_logits(model64) - ref).abs().max().item()
    assert diff < 1e-9, diff
    assert not torch.allclose(model64.model.layers[0].input_layernorm.weight, torch.ones(64, dtype=torch.float64))


def test_fused_transforms_keep_logits_with_qkv_biases(model64):
    """Qwen2's layout: q/k/v projections with biases (the value bias turns with R_ov and S_ov, the query/key
    biases scale with S_qk per RoPE pair). Random biases, random transforms: logits unchanged."""
    spec = spec_for(model64.config)
    g = torch.Generator().manual_seed(3)
    for layer in decoder_layers(model64, spec):
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(layer.self_attn, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=torch.float64)
            new.weight.data.copy_(old.weight)
            new.bias.data.copy_(torch.randn(old.out_features, generator=g, dtype=torch.float64) * 0.5)
            setattr(layer.self_attn, name, new.requires_grad_(False))
    ref = _logits(model64)
    fuse(model64, spec, random_transforms(model64, seed=1), None)
    diff = (_logits(model64) - ref).abs().max().item()
    assert diff < 1e-9, diff


def test_layer_weights_are_differentiable_and_identity_at_init(model64):
    spec = spec_for(model64.config)
    layer = decoder_layers(model64, spec)[0]
    sh = OstShapes.of(model64.config, spec)
    base = layer_parameters(LayerView(layer, spec, sh))
    t = OstTransforms(sh, torch.eye(sh.hidden, dtype=torch.float64), dtype=torch.float64)
    gain = base["attn_norm.weight"]
    same = layer_weights(base, t, 0, spec, None, torch.float64)
    assert torch.allclose(same["q.weight"], base["q.weight"] * gain)
    assert torch.equal(same["attn_norm.weight"], torch.ones_like(gain))
    t32 = OstTransforms(sh, torch.eye(sh.hidden), dtype=torch.float32)
    out = layer_weights(base, t32, 0, spec, None, torch.float32)
    sum(v.square().sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in [t32.r_res, t32.r_ov, *t32.scales()])


def test_womi_init_spreads_weight_energy_evenly_and_keeps_logits(model64):
    """WOMI (eigenvectors of the weight covariance, then a randomized Hadamard): every rotated column of the
    residual readers/writers and of the value/output heads carries tr(C)/n of the energy, where the randomized
    Hadamard alone leaves it uneven; fused, the model's logits are unchanged."""
    from qtool.algorithms.ostquant import weight_covariances, womi_rotation
    from qtool.algorithms.rotation import make_rotation

    spec = spec_for(model64.config)
    sh = OstShapes.of(model64.config, spec)
    c_res, c_ov = weight_covariances(model64, spec)
    assert c_res.shape == (sh.hidden, sh.hidden) and c_ov.shape == (sh.layers, sh.head_dim, sh.head_dim)
    g = torch.Generator().manual_seed(0)
    h_res = make_rotation(sh.hidden, g)[0]
    h_ov = torch.stack([make_rotation(sh.head_dim, g)[0] for _ in range(sh.layers)])
    r_res, r_ov = womi_rotation(c_res, h_res), womi_rotation(c_ov, h_ov)
    for c, r, h in ((c_res, r_res, h_res), *zip(c_ov, r_ov, h_ov, strict=True)):
        n = c.shape[0]
        assert (r.T @ r - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
        even = torch.diagonal(r.T @ c @ r)
        assert (even / (torch.trace(c) / n) - 1).abs().max() < 1e-9
        plain = torch.diagonal(h.T @ c @ h)
        assert (plain / (torch.trace(c) / n) - 1).abs().max() > 1e-3  # measured 0.05-0.64 on stories260K
    # the stage's init: `init: womi` composes exactly these (same seed, same Hadamards); `hadamard` leaves them out
    from qtool.methods.ostquant import OstQuantConfig, _init
    from qtool.schemes import Scheme

    scheme = Scheme.model_validate({"weights": {"group_size": 16}})
    for init, want in (("womi", r_res), ("hadamard", h_res)):
        t = _init(model64, spec, OstQuantConfig(method="ostquant", init=init, seed=0), scheme)
        assert torch.allclose(t.r_res.double(), want, atol=1e-6), init
    ref = _logits(model64)
    fuse(model64, spec, OstTransforms(sh, r_res, r_ov, dtype=torch.float64), None)
    assert (_logits(model64) - ref).abs().max().item() < 1e-9


def test_transforms_file_from_before_s_qk_applies_with_identity_s_qk(model64, tmp_path):
    """``ostquant.safetensors`` written before S_qk existed lacks ``log_s_qk``: applying it fuses everything else
    with S_qk = 1 (the model it described); a file missing any other transform is refused, naming the fix."""
    from types import SimpleNamespace

    from qtool.artifacts import save_tensors
    from qtool.errors import QtoolError
    from qtool.methods.ostquant import apply_ostquant

    spec = spec_for(model64.config)
    t = random_transforms(model64).float()
    with torch.no_grad():
        t.log_s_qk.zero_()
    old = {k: v.contiguous() for k, v in t.state_dict().items() if k != "log_s_qk"}
    save_tensors(tmp_path / "old.safetensors", old, metadata={"kinds": "{}", "losses": "[]"})
    ref = _logits(model64)
    applied = copy.deepcopy(model64)
    apply_ostquant(SimpleNamespace(model=applied, spec=spec), tmp_path / "old.safetensors")
    fuse(model64, spec, t, None)
    assert (_logits(applied) - _logits(model64)).abs().max().item() < 1e-12, "applied file differs from fuse"
    assert (_logits(applied) - ref).abs().max().item() < 1e-4  # float32 transforms fused into the float64 model
    del old["r_ov"]
    save_tensors(tmp_path / "bad.safetensors", old, metadata={"kinds": "{}", "losses": "[]"})
    with pytest.raises(QtoolError, match=r"missing transform tensors \['r_ov'\]; rerun with --from-stage transform"):
        apply_ostquant(SimpleNamespace(model=applied, spec=spec), tmp_path / "bad.safetensors")
