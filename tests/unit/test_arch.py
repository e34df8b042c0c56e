"""Architecture as data: logical projections, edges, and a family that is not Llama-shaped (Phi-3: fused
``qkv_proj`` and ``gate_up_proj``). Every equivalent transform keeps a float64 Phi-3's logits through the same
edge records that serve Llama, and OSTQuant's student computes exactly what its fused weights compute."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.hadamard import random_orthogonal
from qtool.algorithms.ostquant import fuse
from qtool.algorithms.rotation import build_rotations
from qtool.arch import LLAMA, PHI3, LayerView, Shapes, decoder_layers, spec_for
from qtool.methods.ostquant_train import Student
from qtool.methods.transform import apply_rotations
from qtool.models.online import OnlineRotation, attention_state, input_hook
from tests.conftest import random_transforms, smooth_randomly, tiny_phi3

pytestmark = pytest.mark.numeric

TOL = 1e-9


@pytest.fixture
def phi64(exact_norms):
    return tiny_phi3(torch.float64)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_phi3_layout_is_one_table_entry():
    model = tiny_phi3()
    spec = spec_for(model.config)
    assert spec is PHI3
    assert spec.layer_linears == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert [e.name for e in spec.edges] == [e.name for e in LLAMA.edges] == ["qkv", "o_proj", "gate_up", "down_proj"]
    assert spec.linears(spec.edge("qkv")) == ("self_attn.qkv_proj",)
    assert LLAMA.linears(LLAMA.edge("qkv")) == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_layer_view_reads_writes_and_joins_row_blocks():
    model = tiny_phi3(torch.float64)
    spec, shapes = PHI3, Shapes.of(model.config)
    layer = decoder_layers(model, spec)[0]
    view = LayerView(layer, spec, shapes)
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert torch.equal(view.get("q.weight"), qkv[:64]) and torch.equal(view.get("k.weight"), qkv[64:96])
    assert torch.equal(view.get("v.weight"), qkv[96:]) and torch.equal(view.get("up.weight"), gate_up[96:])
    joined = spec.join({key: view.get(key) for key in view.keys()})
    params = dict(layer.named_parameters())
    assert set(joined) == set(params)
    assert all(torch.equal(joined[k], params[k]) for k in params)
    before = qkv.clone()
    view.set("k.weight", torch.zeros(32, 64, dtype=torch.float64))
    assert torch.equal(qkv[64:96], torch.zeros(32, 64, dtype=torch.float64))
    assert torch.equal(qkv[:64], before[:64]) and torch.equal(qkv[96:], before[96:])


@pytest.mark.parametrize("rotations", [("r1", "r2", "r3", "r4"), ("r1",), ("r2",), ("r4",)], ids="+".join)
def test_phi3_rotations_keep_logits(phi64, rotations):
    ref = _logits(phi64)
    tensors, kinds = build_rotations(phi64.config, rotations, seed=0)
    apply_rotations(phi64, PHI3, tensors, kinds)
    diff = (_logits(phi64) - ref).abs().max().item()
    assert diff < TOL, diff  # measured 6.9e-15 (r4) to 2.2e-14 (all four)
    if "r1" in rotations:
        assert (phi64.model.layers[0].self_attn.qkv_proj.weight - tiny_phi3(torch.float64).model.layers[0]
                .self_attn.qkv_proj.weight).abs().max() > 1e-2  # fmt: skip


def test_phi3_smoothing_keeps_logits(phi64):
    ref = _logits(phi64)
    smooth_randomly(phi64, torch.Generator().manual_seed(0))
    diff = (_logits(phi64) - ref).abs().max().item()
    assert diff < TOL, diff  # measured 1.0e-14


def test_phi3_ostquant_fuse_keeps_logits_and_student_computes_the_fused_model(phi64):
    """Every OSTQuant transform (R_res, R_ov, S_attn/S_ffn, S_ov, S_u|d, S_qk) on fused row blocks, with online
    R3/R4: logits unchanged. The student (transforms applied through ``functional_call`` on the joined module
    parameters) gives the fused model's logits."""
    ref = _logits(phi64)
    t = random_transforms(phi64)
    r4 = OnlineRotation("matrix", 96, random_orthogonal(96, torch.Generator().manual_seed(5)))
    r3 = OnlineRotation("hadamard", 16)
    for layer in decoder_layers(phi64, PHI3):
        input_hook(layer.mlp.down_proj).rotation = r4
        attention_state(phi64, layer.self_attn).qk_rotation = r3
    with Student(phi64, PHI3, t, [{} for _ in range(2)], r4.dense()) as student:
        ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            student_logits = student.logits(ids)
    fuse(phi64, PHI3, t, r4.dense())
    fused = _logits(phi64)
    assert (fused - ref).abs().max().item() < TOL  # measured 3.7e-14
    assert (student_logits - fused).abs().max().item() < TOL  # measured 4.4e-15
