"""Training OSTQuant transforms on stories260K (W4A4KV4 student): orthogonality is kept, the KL-Top loss on
held-out windows drops, and a run interrupted after a checkpoint resumes to bit-identical transforms.

The training-outcome tests train on 8 TinyStories windows of 128 tokens for 60 iterations and score 8 held-out
windows: with 4 windows of 64 random tokens and 16-24 iterations (until this release) the held-out KL went up on
some CPUs (AMD AVX-512: 1.254 vs 1.213 for the bf16 student; Intel AVX-512: 1.260 vs 1.211 for learned clipping),
because at W4A4KV4 which values round where follows the last bits of every matmul and the short trajectory was
decided by them. Measured ratios after/before below are over six CPU settings of one AMD EPYC (AVX-512 default,
ATen AVX2, MKL+oneDNN AVX2, all three AVX2, oneDNN AVX512_CORE, ATen scalar)."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.actquant import weight_fake_quant
from qtool.algorithms.losses import kl_top
from qtool.algorithms.ostquant import CLIP_MIN, OstShapes, OstTransforms
from qtool.algorithms.rotation import make_rotation
from qtool.algorithms.stiefel import orthogonality_error
from qtool.arch import decoder_layers, spec_for
from qtool.methods.ostquant_train import Student, TrainSettings, train
from qtool.models.online import OnlineRotation, attention_state, input_hook
from qtool.schemes import PRESETS
from tests.conftest import STORIES, TINYSTORIES, require

pytestmark = pytest.mark.numeric

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
        sh = OstShapes.of(model.config, spec)
        g = torch.Generator().manual_seed(0)
        r_ov = torch.stack([make_rotation(sh.head_dim, g)[0] for _ in range(sh.layers)])
        t = OstTransforms(sh, make_rotation(sh.hidden, g)[0], r_ov)
        targets = [{n: SCHEME.weights for n in spec.layer_linears} for _ in range(sh.layers)]
        return Student(model, spec, t, targets, r4)

    return make, (lambda ids: teacher(ids, use_cache=False).logits), windows


@pytest.fixture(scope="module")
def text():
    """16 TinyStories windows of 128 tokens (calibration half of the file): train on the first 8, score the rest."""
    require(STORIES, TINYSTORIES)
    from transformers import AutoTokenizer

    from qtool.data import load_text, sample_windows, tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(STORIES), load_text(TINYSTORIES, span=(0.5, 1.0)))
    windows = sample_windows(ids, 16, 128, torch.Generator().manual_seed(0))
    return windows[:8], windows[8:]


TRAIN = dict(iterations=60, lr_rotation=5e-3, lr_scale=2e-2, top_k=100)


def _heldout_kl(student: Student, teacher, windows) -> float:
    """Mean KL-Top (k = 100) over ``windows``, one window at a time."""
    with torch.no_grad():
        return float(sum(kl_top(teacher(w[None]), student.logits(w[None]), 100) for w in windows)) / len(windows)


def test_training_lowers_kl_and_keeps_orthogonality(setup, text):
    make, teacher, _ = setup
    train_windows, heldout = text
    student = make()
    before = _heldout_kl(student, teacher, heldout)
    train(student, teacher, train_windows, TrainSettings(**TRAIN))
    after = _heldout_kl(student, teacher, heldout)
    student.close()
    assert after < before, (after, before)  # measured after/before 0.83-0.91
    assert orthogonality_error(student.t.r_res.detach()) <= 1e-6
    assert max(orthogonality_error(r) for r in student.t.r_ov.detach()) <= 1e-6


def test_s_qk_trains_only_when_asked(setup):
    """S_qk reaches the loss through the KV-cache quantizer (the student quantizes keys): with
    ``learn_qk_scaling`` it moves; by default it stays exactly 1 while the other scales train."""
    make, teacher, windows = setup
    for flag in (False, True):
        with make() as student:
            train(student, teacher, windows[:2], TrainSettings(iterations=2, top_k=100, learn_qk_scaling=flag))
        moved = student.t.log_s_qk.detach().abs().max().item()
        assert (moved > 1e-4) if flag else (moved == 0.0), (flag, moved)  # measured 0.015: two Adam steps at lr 1e-2
        assert student.t.log_s_ud.detach().abs().max().item() > 1e-4


def test_checkpoint_from_before_s_qk_restarts_training(setup, tmp_path):
    """A training checkpoint written before S_qk existed (no ``log_s_qk``, four scale tensors in the optimizer
    state) cannot resume this run's optimizer: training restarts from iteration 0 and ends where a fresh run does."""
    make, teacher, windows = setup
    settings = TrainSettings(iterations=3, checkpoint_every=3, top_k=100)
    with make() as full:
        train(full, teacher, windows, settings, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["transforms"]["log_s_qk"]
    state["opt_s"]["param_groups"][0]["params"] = state["opt_s"]["param_groups"][0]["params"][:4]
    state["opt_s"]["state"].pop(4, None)
    torch.save(state, tmp_path / "old.pt")
    with make() as restarted:
        losses = train(restarted, teacher, windows, settings, tmp_path / "old.pt")
    assert len(losses) == 3 and losses[0] == state["losses"][0]
    for a, b in zip(full.t.state_dict().values(), restarted.t.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_error", ["rtn", "gptq"])
def test_resume_from_checkpoint_is_bit_identical(setup, tmp_path, weight_error):
    """Also with ``weight_error: gptq``, whose per-column error shares are refreshed at checkpoint iterations."""
    make, teacher, windows = setup
    settings = TrainSettings(
        iterations=6, checkpoint_every=3, top_k=100, learn_clipping=True, weight_error=weight_error, hessian_windows=2
    )
    full = make()
    train(full, teacher, windows, settings)
    full.close()

    def stop_at_4(i, n, loss):
        if i == 4:
            raise _Stop

    with pytest.raises(_Stop), make() as killed:  # the with block puts the original decoder layers back
        train(killed, teacher, windows, settings, tmp_path / "ckpt.pt", progress=stop_at_4)
    assert all(layer is orig for layer, orig in zip(killed._container, killed.layers, strict=True))
    resumed = make()  # fresh transforms: everything comes from the iteration-3 checkpoint
    losses = train(resumed, teacher, windows, settings, tmp_path / "ckpt.pt")
    resumed.close()
    assert len(losses) == 6
    for a, b in zip(full.t.state_dict().values(), resumed.t.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    shares = [share for layer in resumed.error_share for share in layer.values()]
    if weight_error == "gptq":  # every quantized linear, each input column's share in (0, 1]
        assert len(shares) == 7 * len(resumed.layers)
        assert all(0 < s.min() and s.max() <= 1 for s in shares)
        assert min(s.min() for s in shares) < 0.9  # measured 0.22: correlated inputs leave little of the error
    else:
        assert not shares


def test_learned_clipping_lowers_kl_within_bounds(setup, text):
    """Clipping ratios alone (rotations and scales frozen) train down from 1, stay in ``[CLIP_MIN, 1]`` and lower
    the held-out KL; closing the student takes the learned clips off the quantizers."""
    make, teacher, _ = setup
    train_windows, heldout = text
    student = make()
    before = _heldout_kl(student, teacher, heldout)
    settings = TrainSettings(
        iterations=60, learn_rotation=False, learn_scaling=False, learn_clipping=True, lr_clip=2e-2, top_k=100
    )
    train(student, teacher, train_windows, settings)
    after = _heldout_kl(student, teacher, heldout)
    student.close()
    clips = torch.cat([student.t.clip_act.detach().flatten(), student.t.clip_kv.detach()])
    assert after < before, (after, before)  # measured after/before 0.84-0.87
    assert clips.min() >= CLIP_MIN and clips.max() <= 1.0
    assert clips.min() < 0.95  # they moved
    hooks = [m.qtool_input for m in student.model.modules() if hasattr(m, "qtool_input")]
    assert hooks and all(h.learned_clip is None for h in hooks)


@pytest.mark.parametrize(
    "args",
    [
        SCHEME.weights,  # int4 per channel
        PRESETS["W4A16"].weights.model_copy(update={"group_size": 16}),  # int4 g16
        SCHEME.weights.model_copy(update={"bits": 8, "clip_ratio": 0.9}),  # clipped: some values leave the grid
    ],
    ids=["channel", "group16", "int8-clip0.9"],
)
def test_fused_weight_ste_matches_autograd(args):
    """The fused straight-through weight quantizer has the forward and the gradient (through the rounding and
    through the absmax scale) of the unfused ``fake_quantize_dynamic`` expression."""
    from qtool.algorithms.actquant import fake_quantize_dynamic

    w = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[3, 7] = 9.0  # a row with one outlier
    g = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fused = w.clone().requires_grad_(True)
    out = weight_fake_quant(fused, args)
    (out * g).sum().backward()
    plain = w.clone().requires_grad_(True)
    gran = {"channel": "token"}.get(args.granularity, args.granularity)
    ref = fake_quantize_dynamic(plain, args.model_copy(update={"granularity": gran, "dynamic": True}))
    (ref * g).sum().backward()
    assert torch.equal(out.detach(), ref.detach())
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-12, atol=1e-12)
    assert (fused.grad - g).abs().max() > 1e-3  # the scale path is really there


def test_checkpointing_student_is_exact(setup):
    """Activation checkpointing recomputes each layer with the same transforms: same loss and gradients."""
    make, teacher, windows = setup
    ids = windows[:1]
    target = teacher(ids).detach()
    grads = []
    for checkpointing in (False, True):
        student = make()
        student.checkpointing = checkpointing
        loss = kl_top(target, student.logits(ids), 100)
        loss.backward()
        student.close()
        grads.append((loss.item(), student.t.r_res.grad.clone(), student.t.log_s_ud.grad.clone()))
    (loss_a, r_a, s_a), (loss_b, r_b, s_b) = grads
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    torch.testing.assert_close(r_b, r_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s_b, s_a, rtol=1e-4, atol=1e-7)


def test_bf16_student_trains(setup, text):
    """bf16 autocast (vocabulary projection kept in float32): the mean held-out loss is within 10% of float32's
    (measured bf16/fp32 0.94-0.96; on one window it varied 0.87-1.04 by CPU), and training in bf16 lowers the
    held-out KL measured in float32."""
    make, teacher, _ = setup
    train_windows, heldout = text
    student = make()
    fp32 = _heldout_kl(student, teacher, heldout)
    student.dtype = torch.bfloat16
    bf16 = _heldout_kl(student, teacher, heldout)
    assert bf16 == pytest.approx(fp32, rel=0.1)
    train(student, teacher, train_windows, TrainSettings(**TRAIN))
    student.dtype = torch.float32
    after = _heldout_kl(student, teacher, heldout)
    student.close()
    assert after < fp32, (after, fp32)  # measured after/before 0.83-0.88
