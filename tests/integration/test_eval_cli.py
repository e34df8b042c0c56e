"""`qtool eval` / `qtool regress` end to end on the tiny stories260K model and the shared local data.

Measured on CPU (torch 2.13, transformers 5.23, lm-eval 0.4.13), seqlen 512, first 4,096 tokens (8 windows):
stories260K FP tinystories token_ppl 3.7683, wikitext2 token_ppl 130.37, piqa (first 50) acc 0.40 / acc_norm 0.42;
2-bit per-channel RTN of every linear: tinystories token_ppl 724; compressed-tensors W4 per-channel packed: 4.3629.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from qtool.cli import eval_cmd, regress_cmd
from qtool.data import file_sha256
from qtool.eval import tasks as task_registry
from qtool.eval.tasks import TASKS, TASKS_DIR, find_assets_dir, load_docs

ASSETS = find_assets_dir()
DATA = ASSETS / "data" if ASSETS else None
MODEL = ASSETS / "models" / "stories260K" if ASSETS else None
needs_assets = pytest.mark.skipif(
    MODEL is None or not (MODEL / "config.json").is_file(),
    reason="shared assets (shared/assets/models/stories260K, shared/assets/data) not found above cwd or the package",
)
BUDGET = ["--seqlen", "512", "--max-tokens", "4096"]
WIKI_SHA = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"  # MANIFEST.md, wiki.test.raw


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    eval_cmd.register(app)
    regress_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Record (and refuse) every TCP connection and DNS lookup; the test asserts the list stays empty."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def _eval(app, runner, model: Path, out: Path, tasks: str = "tinystories,wikitext2,piqa"):
    args = ["eval", "--model", str(model), "--data-dir", str(DATA), "--json", str(out), *BUDGET]
    return runner.invoke(app, [*args, "--tasks", tasks, "--limit", "50"])


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---- bad inputs: exit 2 and one line, before any model is loaded ----


def test_unknown_task_exits_2(app, runner) -> None:
    line = _one_line_error(runner.invoke(app, ["eval", "--model", "x", "--tasks", "piqa,mmlu_pro"]))
    assert "unknown task 'mmlu_pro'" in line and "piqa" in line


@needs_assets
def test_missing_data_file_exits_2(app, runner, tmp_path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("")
    result = runner.invoke(app, ["eval", "--model", str(MODEL), "--tasks", "piqa", "--data-dir", str(tmp_path)])
    line = _one_line_error(result)
    assert "valid-labels.lst" in line and "--data-dir" in line


def test_no_data_dir_exits_2(app, runner, monkeypatch) -> None:
    monkeypatch.setattr(task_registry, "default_data_dir", lambda: None)
    line = _one_line_error(runner.invoke(app, ["eval", "--model", "x", "--tasks", "wikitext2"]))
    assert "--data-dir" in line


@needs_assets
def test_run_dir_without_packed_model_exits_2(app, runner, tmp_path) -> None:
    (tmp_path / "run.json").write_text("{}")
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--tasks", "wikitext2", "--data-dir", str(DATA)])
    assert "05-pack/model" in _one_line_error(result)


# ---- the registry's adapters and YAMLs ----


@needs_assets
def test_adapters_read_every_local_file() -> None:
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "hellaswag": 1000}
    counts |= {"lambada": 5153, "boolq": 3270}
    for name, n in counts.items():
        docs = load_docs(name, DATA)
        assert len(docs) == n, name
    piqa = load_docs("piqa", DATA)
    assert {d["label"] for d in piqa} == {0, 1}
    boolq = load_docs("boolq", DATA)[0]
    assert boolq["passage"].startswith("Ethanol fuel -- All biomass") and boolq["label"] == 0


def test_yaml_prompts_match_lm_eval() -> None:
    """Our YAMLs score exactly what lm-eval's own task definitions score; only the data source differs."""
    loader = pytest.importorskip("lm_eval.tasks._yaml_loader")
    lm_tasks = Path(loader.__file__).parent
    theirs = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
              "hellaswag": "hellaswag/hellaswag.yaml", "lambada": "lambada/lambada_openai.yaml",
              "boolq": "super_glue/boolq/default.yaml"}  # fmt: skip
    for name, path in theirs.items():
        ours = loader.load_yaml(TASKS_DIR / TASKS[name].yaml, resolve_func=False)
        ref = loader.load_yaml(lm_tasks / path, resolve_func=False)
        assert ours["task"] == TASKS[name].lm_eval_task
        for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice"):
            assert ours.get(key) == ref.get(key), (name, key)
        assert {m["metric"] for m in ours["metric_list"]} == set(TASKS[name].metrics)


@needs_assets
def test_winogrande_functions_match_lm_eval() -> None:
    ref = pytest.importorskip("lm_eval.tasks._yaml_loader").load_yaml(
        Path(pytest.importorskip("lm_eval").__file__).parent / "tasks" / "winogrande" / "default.yaml"
    )
    ours = pytest.importorskip("lm_eval.tasks._yaml_loader").load_yaml(TASKS_DIR / "winogrande.yaml")
    for doc in load_docs("winogrande", DATA)[:50]:
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert ours[key](doc) == ref[key](doc)


# ---- evaluation on the tiny model ----


@pytest.fixture(scope="module")
def fp_results(app, runner, tmp_path_factory) -> Path:
    if MODEL is None or not (MODEL / "config.json").is_file():
        pytest.skip("shared assets not found")
    pytest.importorskip("lm_eval")
    out = tmp_path_factory.mktemp("eval") / "fp.json"
    result = _eval(app, runner, MODEL, out)
    assert result.exit_code == 0, result.output
    assert "token_ppl" in result.stdout and "acc_norm" in result.stdout
    return out


@needs_assets
def test_eval_numbers_and_provenance(fp_results) -> None:
    doc = json.loads(fp_results.read_text())
    m = doc["metrics"]
    assert m["tinystories"]["token_ppl"]["value"] == pytest.approx(3.7683, rel=2e-3)  # measured 3.768325
    assert m["tinystories"]["token_ppl"]["n"] == 8 * 511
    assert m["wikitext2"]["token_ppl"]["value"] == pytest.approx(130.37, rel=5e-3)  # measured 130.3665
    assert 0.30 <= m["piqa"]["acc"]["value"] <= 0.50  # measured 0.40 (chance 0.5; a 260K-param story model)
    assert m["piqa"]["acc"]["n"] == 50 and 0.06 < m["piqa"]["acc"]["stderr"] < 0.08  # measured 0.0700
    assert doc["tasks"]["wikitext2"]["files"] == {"wikitext-2-raw-v1/wiki.test.raw": WIKI_SHA}
    assert doc["tasks"]["piqa"]["limit"] == 50 and doc["tasks"]["wikitext2"]["windows"] == 8
    assert set(doc["versions"]) >= {"qtool", "torch", "transformers", "lm_eval"}
    assert doc["model"]["identity"] and doc["model"]["kind"] == "dir"


@needs_assets
def test_text_file_scores_like_the_registry_task(app, runner, fp_results, tmp_path, monkeypatch) -> None:
    """``--text FILE`` scores a user's own file with the same token perplexity: the TinyStories file given as a
    path, and the same text as the one record of a jsonl file (``--text-field``), reproduce the registry task's
    number exactly; with only ``--text`` no data directory is needed."""
    monkeypatch.setattr(task_registry, "default_data_dir", lambda: None)
    story = DATA / TASKS["tinystories"].files[0]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"body": story.read_text(encoding="utf-8")}) + "\n", encoding="utf-8")
    out = tmp_path / "text.json"
    args = ["eval", "--model", str(MODEL), "--text", str(story), "--text", str(jsonl), "--text-field", "body"]
    result = runner.invoke(app, [*args, "--json", str(out), *BUDGET])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert list(doc["metrics"]) == [f"text:{story}", f"text:{jsonl}"]  # no default wikitext2 beside --text
    want = json.loads(fp_results.read_text())["metrics"]["tinystories"]["token_ppl"]
    for name in doc["metrics"]:
        assert doc["metrics"][name]["token_ppl"] == want, name  # value and n identical (measured 3.768325)
    assert doc["tasks"][f"text:{story}"]["format"] == "raw" and doc["tasks"][f"text:{jsonl}"]["text_field"] == "body"
    assert doc["tasks"][f"text:{story}"]["files"] == {str(story): file_sha256(story)}


def test_missing_text_file_exits_2(app, runner, tmp_path) -> None:
    result = runner.invoke(app, ["eval", "--model", "x", "--text", str(tmp_path / "nope.txt")])
    line = _one_line_error(result)
    assert line.count("--text") == 1 and "nope.txt does not exist" in line


@needs_assets
def test_every_lm_eval_task_runs_offline(no_network) -> None:
    pytest.importorskip("lm_eval")
    from qtool.eval.results import evaluate
    from qtool.loading import load_model, resolve_source

    model, tok = load_model(resolve_source(str(MODEL)))
    names = [n for n, spec in TASKS.items() if spec.kind == "lm_eval"]
    doc = evaluate(model, tok, names, DATA, limit=4, batch_size=8)
    for name in names:
        assert set(doc["metrics"][name]) == set(TASKS[name].metrics), name
        assert all(e["n"] == 4 for e in doc["metrics"][name].values()), name
    assert no_network == []


@needs_assets
def test_regress_unchanged_exits_0_planted_2bit_exits_1(app, runner, fp_results, tmp_path) -> None:
    first = tmp_path / "first.json"
    assert _eval(app, runner, MODEL, first, tasks="tinystories,piqa").exit_code == 0
    baseline = tmp_path / "baselines" / "stories260k.json"
    args = ["regress", "--baseline", str(baseline), "--results", str(first), "--update", "--recipe", "none (FP)"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    prov = json.loads(baseline.read_text())["provenance"]
    assert prov["recipe"] == "none (FP)" and prov["qtool_version"] and prov["settings"]["max_tokens"] == 4096
    assert prov["model"]["identity"] and prov["tasks"]["piqa"]["files"]

    # an unchanged model, evaluated again (fp_results: same model, budget and limit; its extra wikitext2 is ignored)
    result = runner.invoke(app, ["regress", "--baseline", str(baseline), "--results", str(fp_results)])
    assert result.exit_code == 0, result.output
    assert "no regression in 3 metrics" in result.stdout

    planted = tmp_path / "w2"
    _save_2bit_copy(MODEL, planted)
    bad = tmp_path / "w2.json"
    assert _eval(app, runner, planted, bad, tasks="tinystories,piqa").exit_code == 0
    assert json.loads(bad.read_text())["metrics"]["tinystories"]["token_ppl"]["value"] > 100  # measured 724
    result = runner.invoke(app, ["regress", "--baseline", str(baseline), "--results", str(bad)])
    assert result.exit_code == 1, result.output
    assert "REGRESSED" in result.stdout and "tinystories/token_ppl" in result.stderr


def _save_2bit_copy(src: Path, dst: Path) -> None:
    """stories260K with every decoder linear RTN-quantized to 2 bits per output channel (levels −2..1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                scale = mod.weight.abs().amax(dim=1, keepdim=True) / 1.5
                mod.weight.copy_((mod.weight / scale).round().clamp(-2, 1) * scale)
    model.save_pretrained(dst)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


# ---- regress: bad inputs ----


def _write(path: Path, metrics: dict) -> Path:
    path.write_text(json.dumps({"schema": "qtool.results/1", "metrics": metrics}))
    return path


def test_regress_missing_metric_exits_2(app, runner, tmp_path) -> None:
    base = _write(tmp_path / "b.json", {"piqa": {"acc": {"value": 0.6, "stderr": 0.03, "n": 50}}})
    res = _write(tmp_path / "r.json", {"wikitext2": {"token_ppl": {"value": 20.0, "stderr": None, "n": 4088}}})
    line = _one_line_error(runner.invoke(app, ["regress", "--baseline", str(base), "--results", str(res)]))
    assert "piqa/acc" in line


def test_regress_bad_tolerance_and_missing_file_exit_2(app, runner, tmp_path) -> None:
    base = _write(tmp_path / "b.json", {"piqa": {"acc": {"value": 0.6, "stderr": 0.03, "n": 50}}})
    args = ["regress", "--baseline", str(base), "--results", str(base)]
    assert "tolerance" in _one_line_error(runner.invoke(app, [*args, "--tolerance", "acc"]))
    args = ["regress", "--baseline", str(base), "--results", str(tmp_path / "missing.json")]
    assert "missing.json does not exist" in _one_line_error(runner.invoke(app, args))


def test_regress_stderr_units(app, runner, tmp_path) -> None:
    base = _write(tmp_path / "b.json", {"piqa": {"acc": {"value": 0.60, "stderr": 0.03, "n": 50}}})
    res = _write(tmp_path / "r.json", {"piqa": {"acc": {"value": 0.55, "stderr": 0.03, "n": 50}}})
    args = ["regress", "--baseline", str(base), "--results", str(res), "--tolerance"]
    assert runner.invoke(app, [*args, "acc=2se"]).exit_code == 0  # 0.05 drop < 2 × 0.042
    assert runner.invoke(app, [*args, "acc=1se"]).exit_code == 1
    assert runner.invoke(app, [*args, "acc=0.01"]).exit_code == 1


# ---- a run directory's packed (compressed-tensors) model ----


@needs_assets
def test_eval_run_dir_loads_packed_model(app, runner, tmp_path) -> None:
    run = tmp_path / "run"
    try:
        _pack_w4(MODEL, run / "05-pack" / "model")
    except Exception as e:  # noqa: BLE001 - building the fixture uses compressed-tensors internals
        pytest.skip(f"could not build a compressed-tensors checkpoint with this version: {e}")
    (run / "run.json").write_text("{}")
    out = tmp_path / "packed.json"
    args = ["eval", "--model", str(run), "--tasks", "tinystories", "--data-dir", str(DATA), "--json", str(out)]
    result = runner.invoke(app, [*args, *BUDGET])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["model"]["run_dir"] == str(run)
    assert doc["model"]["quantization"] == {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    assert 3.80 < doc["metrics"]["tinystories"]["token_ppl"]["value"] < 4.6  # measured 4.3629 (FP 3.7683)


def _pack_w4(src: Path, dst: Path) -> None:
    """A pack-quantized W4 (symmetric, per output channel) checkpoint written by compressed-tensors itself."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data
            lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
            scale, zero = calculate_qparams(lo, hi, args)
            mod.weight_scale.data.copy_(scale)
            mod.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
