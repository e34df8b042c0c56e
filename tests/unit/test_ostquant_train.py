"""Training OSTQuant transforms on stories260K (W4A4KV4 student): orthogonality is kept, the KL-Top loss on
held-out windows drops, and a run interrupted after a checkpoint resumes to bit-identical transforms."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.losses import kl_top
from qtool.algorithms.ostquant import OstShapes, OstTransforms
from qtool.algorithms.ostquant_train import Student, TrainSettings, train
from qtool.algorithms.rotation import make_rotation
from qtool.algorithms.stiefel import orthogonality_error
from qtool.models.arch import decoder_layers, spec_for
from qtool.models.online import OnlineRotation, attention_state, input_hook
from qtool.schemes import PRESETS
from tests.conftest import STORIES, require

SCHEME = PRESETS["W4A4KV4"]


class _Stop(Exception):
    pass


def _load():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval().requires_grad_(False)


@pytest.fixture
def setup():
    require(STORIES)
    teacher, model = _load(), _load()
    spec = spec_for(model.config)
    r4 = None  # R4 (MLP 172: a stored random orthogonal matrix) is covered by test_ostquant_transforms
    for layer in decoder_layers(model, spec):
        attention_state(model, layer.self_attn).qk_rotation = OnlineRotation("hadamard", 8)
        attention_state(model, layer.self_attn).kv_quant = SCHEME.kv_cache
        for name in spec.layer_linears:
            input_hook(layer.get_submodule(name)).quant = SCHEME.input_activations
    windows = torch.randint(3, 512, (6, 64), generator=torch.Generator().manual_seed(0))

    def make() -> Student:
        sh = OstShapes.of(model.config)
        g = torch.Generator().manual_seed(0)
        r_ov = torch.stack([make_rotation(sh.head_dim, g)[0] for _ in range(sh.layers)])
        t = OstTransforms(sh, make_rotation(sh.hidden, g)[0], r_ov)
        targets = [{n: SCHEME.weights for n in spec.layer_linears} for _ in range(sh.layers)]
        return Student(model, spec, t, targets, r4)

    return make, (lambda ids: teacher(ids, use_cache=False).logits), windows


def _heldout_kl(student: Student, teacher, windows) -> float:
    with torch.no_grad():
        return float(sum(kl_top(teacher(w[None]), student.logits(w[None]), 100) for w in windows[4:]))


def test_training_lowers_kl_and_keeps_orthogonality(setup):
    make, teacher, windows = setup
    student = make()
    before = _heldout_kl(student, teacher, windows)
    train(student, teacher, windows[:4], TrainSettings(iterations=24, lr_rotation=5e-3, lr_scale=2e-2, top_k=100))
    after = _heldout_kl(student, teacher, windows)
    student.close()
    assert after < before
    assert orthogonality_error(student.t.r_res.detach()) <= 1e-6
    assert max(orthogonality_error(r) for r in student.t.r_ov.detach()) <= 1e-6


def test_resume_from_checkpoint_is_bit_identical(setup, tmp_path):
    make, teacher, windows = setup
    settings = TrainSettings(iterations=6, checkpoint_every=3, top_k=100)
    full = make()
    train(full, teacher, windows, settings)
    full.close()

    def stop_at_4(i, n, loss):
        if i == 4:
            raise _Stop

    killed = make()
    with pytest.raises(_Stop):
        train(killed, teacher, windows, settings, tmp_path / "ckpt.pt", progress=stop_at_4)
    killed.close()
    resumed = make()  # fresh transforms: everything comes from the iteration-3 checkpoint
    losses = train(resumed, teacher, windows, settings, tmp_path / "ckpt.pt")
    resumed.close()
    assert len(losses) == 6
    for a, b in zip(full.t.state_dict().values(), resumed.t.state_dict().values(), strict=True):
        assert torch.equal(a, b)
