"""Shared fixtures: where the real test assets are, and recipes pointed at them.

Assets live in ``../shared/assets`` next to the project (override with ``QTOOL_ASSETS``). Tests never touch the
network; every test that needs an asset skips with the path it looked for when the asset is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QTOOL_ASSETS", ROOT.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct-q4_1-gguf"
TINYSTORIES = ASSETS / "data" / "tinystories" / "tinystories_validation_first4301.txt"
WIKI_VALID = ASSETS / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
WIKI_TEST = ASSETS / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
STORIES_RECIPE = ROOT / "configs" / "tests" / "stories260k-w4a16-gptq.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"test asset {p} is absent (set QTOOL_ASSETS to the shared/assets directory)")


def pytest_sessionstart(session) -> None:
    """Without the assets nearly every test would skip and the run would still pass: refuse instead, unless
    QTOOL_ALLOW_MISSING_ASSETS=1 says that skipping is intended."""
    if not (STORIES / "config.json").is_file() and os.environ.get("QTOOL_ALLOW_MISSING_ASSETS") != "1":
        raise pytest.UsageError(
            f"test assets not found at {ASSETS}: put shared/assets beside the checkout or set QTOOL_ASSETS "
            "(QTOOL_ALLOW_MISSING_ASSETS=1 runs the asset-free tests only)"
        )


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """FP-perplexity cache per test session, never the user's."""
    os.environ["QTOOL_CACHE_DIR"] = str(tmp_path_factory.mktemp("qtool-cache"))


def localize(raw: dict) -> dict:
    """Point a shipped recipe's ``../shared/assets`` paths at ``ASSETS`` (so tests run from any directory)."""
    text = yaml.safe_dump(raw).replace("../shared/assets", str(ASSETS))
    return yaml.safe_load(text)


def run_methods(tmp: Path, scheme: dict, runs: dict[str, dict], until: dict[str, str] | None = None) -> dict:
    """One stories260K pipeline per ``runs`` entry (name -> quantize section) with ``scheme``, in ``tmp/<name>``
    (``until``: name -> last stage); returns name -> (recipe path, run dir, ``RunResult``)."""
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe

    require(STORIES, TINYSTORIES)
    out = {}
    for name, quantize in runs.items():
        recipe = write_recipe(tmp / f"{name}.yaml", name=f"w3-{name}", scheme=scheme, quantize=quantize)
        stop = (until or {}).get(name)
        out[name] = (recipe, tmp / name, Pipeline(load_recipe(recipe), tmp / name, until_stage=stop).run())
    return out


def write_recipe(path: Path, base: Path = STORIES_RECIPE, **sections) -> Path:
    """A copy of ``base`` with ``sections`` replaced (``quantize={"method": "rtn"}``), written to ``path``."""
    raw = localize(yaml.safe_load(base.read_text()))
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def stories_recipe(tmp_path):
    require(STORIES, TINYSTORIES)

    def make(name: str = "recipe.yaml", **sections) -> Path:
        return write_recipe(tmp_path / name, **sections)

    return make


@pytest.fixture
def exact_norms(monkeypatch):
    """RMSNorm in the input's own dtype.

    transformers' LlamaRMSNorm casts its input to float32 even for a float64 model, which limits any float64
    comparison of two equivalent models to ~1e-6. Equivalence tests (rotations, smoothing) patch the norm to the same
    formula computed in float64 so that they can assert 1e-9.
    """
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_phi3.Phi3RMSNorm, "forward", forward)


def tiny_phi3(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Phi-3 causal LM (fused ``qkv_proj`` and ``gate_up_proj``) with seeded random weights and random norm gains:
    hidden 64, 4 query heads over 2 KV heads of 16, MLP 96 (a Kronecker Hadamard 12·8 exists), 2 layers, the
    stories260K vocabulary (512), so the stories tokenizer and data drive it."""
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # gains away from 1, so fusing them is tested
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(dtype))
            elif p.ndim == 2:  # larger than the 0.02 init: logits that differ between tokens
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.15)
    return model.eval().requires_grad_(False)


@pytest.fixture
def phi3_dir(tmp_path):
    """``tiny_phi3`` saved as a local HF model directory with the stories260K tokenizer."""
    require(STORIES)
    import shutil

    path = tmp_path / "tiny-phi3"
    tiny_phi3().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / name, path / name)
    return path


def random_transforms(model, seed: int = 0):
    """OSTQuant transforms in float64 far from identity: random orthogonal R_res / R_ov, log-scales ~ N(0, 0.5²)."""
    from qtool.algorithms.hadamard import random_orthogonal
    from qtool.algorithms.ostquant import OstShapes, OstTransforms
    from qtool.arch import spec_for

    g = torch.Generator().manual_seed(seed)
    sh = OstShapes.of(model.config, spec_for(model.config))
    r_ov = torch.stack([random_orthogonal(sh.head_dim, g) for _ in range(sh.layers)])
    t = OstTransforms(sh, random_orthogonal(sh.hidden, g), r_ov, dtype=torch.float64)
    with torch.no_grad():
        for p in t.scales():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return t


def smooth_randomly(model, generator: torch.Generator, scale: float = 50.0) -> None:
    """SmoothQuant on every default edge of every layer with random activation ranges in (0.01, scale + 0.01)."""
    from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, reader_weights, smoothing_scales
    from qtool.arch import LayerView, Shapes, decoder_layers, spec_for

    spec = spec_for(model.config)
    for layer in decoder_layers(model, spec):
        view = LayerView(layer, spec, Shapes.of(model.config))
        for edge in (spec.edge(m) for m in MAPPINGS):
            w = reader_weights(view, edge)
            act = torch.rand(w[0].shape[1], generator=generator, dtype=torch.float64) * scale + 0.01
            apply_smoothing(view, edge, smoothing_scales(act, w, 0.5))


def refused_before_writing(recipe: Path, run_dir: Path, message: str) -> None:
    """``qtool validate`` and ``qtool quantize`` both refuse ``recipe``: exit 2, ``message`` in the output, no
    traceback, and nothing written at ``run_dir``."""
    import subprocess
    import sys

    for command in (["validate", str(recipe)], ["quantize", "--recipe", str(recipe), "--run-dir", str(run_dir)]):
        proc = subprocess.run([sys.executable, "-m", "qtool", *command], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, (recipe.name, proc.stderr)
        assert message in proc.stderr + proc.stdout, (recipe.name, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def kill_after_first_layer_and_resume(recipe: Path, run_dir: Path) -> dict:
    """Start ``qtool quantize`` as a process, SIGKILL it once the quantize stage has checkpointed its first layer,
    check the kill landed inside that stage, then rerun to completion; returns the resumed quantize manifest."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "qtool", "quantize", "--recipe", str(recipe), "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_layer = run_dir / "04-quantize.tmp" / "layers" / "000.sha256.json"  # a layer is done with its checksum
    deadline = time.time() + 300
    while not first_layer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "04-quantize").exists(), "the kill landed after quantize finished; test proves nothing"
    from qtool.pipeline import run_status

    status = {row["stage"]: row["status"] for row in run_status(run_dir)}
    assert status["quantize"].startswith("partial"), status
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return json.loads((run_dir / "04-quantize" / "manifest.json").read_text())


def killed_run_packs_the_same(recipe: Path, reference: Path, run_dir: Path, names=("model.safetensors",)) -> None:
    """``kill_after_first_layer_and_resume`` into ``run_dir``: at least one layer is resumed from its checkpoint and
    the packed files ``names`` equal those of the uninterrupted run at ``reference``, byte for byte."""
    import hashlib

    manifest = kill_after_first_layer_and_resume(recipe, run_dir)
    assert manifest["summary"]["resumed_layers"] >= 1
    for name in names:
        digest = [hashlib.sha256((d / "05-pack" / "model" / name).read_bytes()).hexdigest() for d in (run_dir,
                  reference)]  # fmt: skip
        assert digest[0] == digest[1], name
