"""``qtool generate`` and the integer-kernel loader on a packed stories260K (W4A16 g32 GPTQ): the attention linears
run on the int4 kernel (the 172-wide MLP rows have no kernel layout and stay dense), the logits stay as close to
the float32 reference as the dense bf16 model's, and the CLI streams text."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli.commands import app
from qtool.generate import greedy
from qtool.loading import load_model, resolve_source
from qtool.models.kernels import Int4Linear
from tests.conftest import STORIES_RECIPE, require, write_recipe

pytestmark = pytest.mark.numeric

TEXT = "Once upon a time there was a little dog who liked to run in the park with his friends."


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe
    from tests.conftest import STORIES, TINYSTORIES

    require(STORIES, TINYSTORIES)
    tmp = tmp_path_factory.mktemp("generate")
    recipe = write_recipe(tmp / "r.yaml", base=STORIES_RECIPE, calibration={
        "dataset": str(TINYSTORIES), "span": [0.5, 1.0], "n_samples": 16, "seqlen": 256})  # fmt: skip
    Pipeline(load_recipe(recipe), tmp / "run", until_stage="pack").run()
    return tmp / "run"


def test_kernel_logits_are_as_close_to_float32_as_dense_bf16(packed):
    src = resolve_source(str(packed))
    kernel, tok = load_model(src, "bfloat16", kernels=True)
    dense, _ = load_model(src, "bfloat16")
    reference, _ = load_model(src, "float32")
    # q/k/v/o of 5 layers; gate/up (172 rows) and down (172 columns, per channel) stay dense
    assert sum(isinstance(m, Int4Linear) for m in kernel.modules()) == 20
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reference(ids).logits
        errors = {name: float((m(ids).logits.float() - ref).norm() / ref.norm())
                  for name, m in (("kernel", kernel), ("dense", dense))}  # fmt: skip
    # measured on an AMD EPYC: kernel / dense bf16 0.0061 / 0.0062 (AVX2), 0.0068 / 0.0075 (ATEN_CPU_CAPABILITY=
    # default), 0.0063 / 0.0061 (AVX-512); the kernel accumulates in float32 and rounds only the scales to bf16
    assert errors["kernel"] < 0.01 and errors["kernel"] < 1.25 * errors["dense"], errors


def test_generate_streams_greedy_text(packed):
    src = resolve_source(str(packed))
    model, tok = load_model(src, "bfloat16", kernels=True)
    pieces: list[str] = []
    out = greedy(model, tok, "Once upon a time", 24, on_text=pieces.append)
    assert len(out.tokens) == 24 and "".join(pieces) == out.text and len(pieces) > 1
    again = greedy(model, tok, "Once upon a time", 24)
    assert again.tokens == out.tokens  # greedy: deterministic
    res = CliRunner().invoke(app, ["generate", str(packed), "Once upon a time", "-n", "24"])
    assert res.exit_code == 0, res.output
    assert out.text.strip()[:20] in res.output


def test_generate_refuses_a_missing_model_and_a_bad_dtype(tmp_path):
    """One-line user errors (``QtoolError``: exit 2 through the console entry point, tests/e2e)."""
    from qtool.errors import QtoolError

    res = CliRunner().invoke(app, ["generate", str(tmp_path / "nope"), "hi"])
    assert isinstance(res.exception, QtoolError) and "does not exist" in str(res.exception)
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "hi", "--dtype", "float64"])
    assert isinstance(res.exception, QtoolError) and "--dtype" in str(res.exception)


def test_bench_measures_each_runtime_in_its_own_process(packed, tmp_path):
    """``qtool bench`` on the packed run: the baseline (the recipe's stories260K through transformers) and three
    runtimes, each with load time, speeds, peak RSS and a WikiText-2 perplexity from its own logits."""
    import json

    from qtool.errors import QtoolError

    out = tmp_path / "bench.json"
    args = ["bench", str(packed), "--runtime", "transformers,qtool,qtool-dense", "--prompt-tokens", "64",
            "--new-tokens", "8", "--ppl-tokens", "2048", "--repeats", "1", "--json", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["baseline", "transformers", "qtool", "qtool-dense"]
    assert all("error" not in r and r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows.values()), rows
    assert rows["qtool"]["kernel_linears"] == 20 and rows["qtool-dense"]["kernel_linears"] == 0
    # the same weights through three loaders, bf16 each: perplexities within 1% (measured 142.66 / 142.81 / 142.84
    # at 4,096 tokens); the FP baseline is better
    ppl = [rows[k]["ppl"] for k in ("transformers", "qtool", "qtool-dense")]
    assert max(ppl) / min(ppl) < 1.01 and rows["baseline"]["ppl"] < min(ppl)
    res = CliRunner().invoke(app, ["bench", str(packed), "--runtime", "tensorrt"])
    assert isinstance(res.exception, QtoolError) and "--runtime" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", str(packed), "--dtype", "float8"])
    assert isinstance(res.exception, QtoolError) and "--dtype" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", str(packed), "--json", str(tmp_path / "no" / "b.json")])
    assert isinstance(res.exception, QtoolError) and "--json" in str(res.exception)


def test_bench_says_how_to_install_a_missing_runtime(packed, tmp_path, monkeypatch):
    """A runtime that is not installed is one row naming the fix (vLLM and llama.cpp live in their own virtualenv and
    build); the others still run."""
    import json

    monkeypatch.setenv("QTOOL_VLLM_PYTHON", str(tmp_path / "no-vllm" / "bin" / "python"))
    monkeypatch.setenv("QTOOL_LLAMACPP_DIR", str(tmp_path / "no-llamacpp"))
    out = tmp_path / "bench.json"
    args = ["bench", str(packed), "--runtime", "vllm,llamacpp,qtool", "--no-baseline", "--prompt-tokens", "32",
            "--new-tokens", "4", "--ppl-tokens", "512", "--repeats", "1", "--json", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert "make runtime-vllm" in rows["vllm"]["error"] and "no-vllm" in rows["vllm"]["error"]
    assert "make runtime-llamacpp" in rows["llamacpp"]["error"] and "no-llamacpp" in rows["llamacpp"]["error"]
    assert "error" not in rows["qtool"]


@pytest.mark.parametrize(
    ("scheme", "transform", "bound"),
    [
        # measured on an AMD EPYC (AVX-512 VNNI): integer products 1.6e-7 from float64, float32 simulation 4.4e-3
        ("W8A8", {"method": "none"}, 1e-5),
        # QuaRot: R1/R2 fused, R3 (queries/keys) and R4 (down_proj input) online; int4 KV cache. The float32 and
        # integer runs share the float32 Hadamards and KV quantization, whose rounding flips codes against float64:
        # measured 6.6238e-3 (integer) and 6.6238e-3 (float32 simulation)
        ("W4A4KV4", {"method": "hadamard", "rotations": ["r1", "r2", "r3", "r4"], "random": True, "seed": 0}, 0.02),
    ],
    ids=["w8a8", "w4a4kv4-quarot"],
)
def test_integer_activations_run_as_integer_products_at_least_as_exact_as_float32(scheme, transform, bound, tmp_path):
    """A W8A8 or W4A4 checkpoint (per-channel int weights, dynamic per-token int inputs) on the kernels runs integer
    products (``torch._int_mm`` on codes held in int8) instead of fake-quantizing the inputs; online rotations stay
    in front. In float32 its logits are as close to the float64 simulation as the float32 simulation's, or closer
    (exact integer sums; the simulation's float32 rounding flips activation codes)."""
    from qtool.models.kernels import Int8Linear, int_mm_is_exact
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe
    from tests.conftest import STORIES, TINYSTORIES

    require(STORIES, TINYSTORIES)
    recipe = write_recipe(tmp_path / "r.yaml", base=STORIES_RECIPE, calibration={
        "dataset": str(TINYSTORIES), "span": [0.5, 1.0], "n_samples": 8, "seqlen": 256},
        scheme={"preset": scheme}, transform=transform, quantize={"method": "rtn"})  # fmt: skip
    Pipeline(load_recipe(recipe), tmp_path / "run", until_stage="pack").run()
    src = resolve_source(str(tmp_path / "run"))
    kernel, tok = load_model(src, "float32", kernels=True)
    int8 = [m for m in kernel.modules() if isinstance(m, Int8Linear)]
    if not int_mm_is_exact():  # oneDNN without VNNI saturates: no integer-activation path
        assert all(m.act is None for m in int8)
        pytest.skip("torch._int_mm is not exact on this CPU (no VNNI)")
    assert len(int8) == 35 and all(m.act is not None and m.qtool_input.quant is None for m in int8)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        exact = load_model(src, "float64")[0](ids).logits
        sim32 = load_model(src, "float32")[0](ids).logits.double()
        got = kernel(ids).logits.double()
    err = {name: float((x - exact).norm() / exact.norm()) for name, x in (("int", got), ("sim32", sim32))}
    assert err["int"] < bound and err["int"] <= err["sim32"] + 1e-6, err
