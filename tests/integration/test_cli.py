"""The CLI as a user meets it: bad input gives exit code 2, one line naming the field/file and the fix, no
traceback and no run directory; validate/status/schema work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STORIES, TINYSTORIES, require, write_recipe


def qtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "qtool", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def recipe_file(tmp_path):
    require(STORIES, TINYSTORIES)

    def make(mutate) -> Path:
        path = write_recipe(tmp_path / "r.yaml", output={"run_dir": str(tmp_path / "run")})
        raw = yaml.safe_load(path.read_text())
        mutate(raw)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.mark.parametrize(
    ("mutate", "needles"),
    [
        (lambda r: r["quantize"].update(dmap=0.1), ["quantize.dmap", "unknown key"]),
        (lambda r: r["calibration"].update(n_samples="many"), ["calibration.n_samples", "integer"]),
        (lambda r: r["calibration"].update(dataset="/nope/valid.txt"), ["calibration.dataset", "/nope/valid.txt"]),
        (
            lambda r: r["scheme"].update(group_fallback="error"),
            ["scheme.weights.group_size", "in_features=172", "model.layers.0.mlp.down_proj", "use 4"],
        ),
        (lambda r: r["quantize"].update(method="spqr"), ["quantize", "'spqr'", "awq"]),
        (lambda r: r.update(model="/nope/model"), ["model", "/nope/model"]),
        (
            lambda r: r["scheme"].update(
                kv_cache={"bits": 4, "granularity": "group", "group_size": 3, "dynamic": True}
            ),
            ["scheme.kv_cache.group_size", "head_dim=8"],
        ),
        (
            lambda r: r["scheme"].update(input_activations={"bits": 8, "granularity": "group", "group_size": 16}),
            ["scheme.input_activations", "tensor or channel", "dynamic: true"],
        ),
        (lambda r: r.update(transform={"method": "hadamard", "rotations": ["r5"]}), ["transform.rotations.0", "r5"]),
        (lambda r: r.update(transform={"method": "ostquant", "n_samples": 999}), ["transform.n_samples", "64"]),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "missing-file",
        "group-size",
        "unknown-method",
        "missing-model",
        "kv-group",
        "static-activations",
        "unknown-rotation",
        "ostquant-budget",
    ],
)
def test_bad_input_exit_2_one_line_no_run_dir(recipe_file, tmp_path, mutate, needles):
    path = recipe_file(mutate)
    proc = qtool("quantize", "--recipe", str(path))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()
    assert_one_line_error(qtool("validate", str(path)), *needles)


def test_ostquant_on_cuda_without_cuda_is_refused(recipe_file, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = recipe_file(lambda r: r.update(transform={"method": "ostquant", "device": "cuda"}))
    assert_one_line_error(qtool("validate", str(path)), "transform.device", "no CUDA device", "auto or cpu")


def test_unsupported_architecture_is_refused(recipe_file, tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 100})
    )
    path = recipe_file(lambda r: r.update(model=str(model_dir)))
    proc = qtool("quantize", "--recipe", str(path))
    assert_one_line_error(proc, "architecture 'gpt2' is not supported", "qtool/arch.py")
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_bad_override(tmp_path):
    assert_one_line_error(qtool("quantize", "--recipe", str(tmp_path / "none.yaml")), "recipe", "none.yaml")
    require(STORIES, TINYSTORIES)
    path = write_recipe(tmp_path / "r.yaml")
    assert_one_line_error(qtool("validate", str(path), "--set", "scheme.weights.bits=7"), "scheme.weights.bits")


def test_validate_reports_the_plan(tmp_path):
    require(STORIES, TINYSTORIES)
    proc = qtool("validate", str(write_recipe(tmp_path / "r.yaml")))
    assert proc.returncode == 0, proc.stderr
    assert "35 linears in 5 layers, 5 with per-channel fallback" in proc.stdout


def test_schema_and_stages():
    proc = qtool("schema")
    schema = json.loads(proc.stdout)
    assert "calibration" in schema["properties"] and schema["additionalProperties"] is False
    stages = qtool("stages").stdout
    assert "gptq" in stages and "rtn" in stages and "06-evaluate" in stages


def test_status_of_a_missing_run_dir(tmp_path):
    assert_one_line_error(qtool("status", str(tmp_path)), "RUN_DIR", "run.json")


def test_missing_lm_eval_task_data_fails_before_anything_runs(tmp_path):
    require(STORIES, TINYSTORIES)
    path = write_recipe(tmp_path / "r.yaml", output={"run_dir": str(tmp_path / "run")})
    proc = qtool(
        "quantize",
        "--recipe",
        str(path),
        "--set",
        "evaluate.tasks=[piqa]",
        "--set",
        f"evaluate.data_dir={tmp_path / 'nodata'}",
    )
    assert_one_line_error(proc, "piqa", "nodata")
    assert not (tmp_path / "run").exists()


def test_inspect_prints_the_worst_layers(tmp_path):
    require(STORIES, TINYSTORIES)
    proc = qtool(
        "inspect",
        "--model",
        str(STORIES),
        "--dataset",
        str(TINYSTORIES),
        "--n-samples",
        "4",
        "--seqlen",
        "128",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "worst linear inputs by kurtosis" in proc.stdout and "down_proj" in proc.stdout
    assert (tmp_path / "run" / "02-outliers" / "stats.json").is_file()
    assert not (tmp_path / "run" / "04-quantize").exists()


def test_inspect_needs_data():
    require(STORIES)
    assert_one_line_error(qtool("inspect", "--model", str(STORIES)), "--dataset", "--recipe")


def test_a_directory_that_is_not_a_run_is_never_touched(recipe_file, tmp_path):
    """Issue 20: ``--run-dir`` on an existing directory that is not a qtool run used to delete its stage-named
    subdirectories (user files included) and overwrite its recipe.yaml, with or without --force."""
    recipe = recipe_file(lambda r: None)
    target = tmp_path / "mine"
    (target / "05-pack").mkdir(parents=True)
    (target / "05-pack" / "mine.txt").write_text("x")
    (target / "recipe.yaml").write_text("my own notes\n")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    for extra in ([], ["--force"]):
        proc = qtool("quantize", "-r", str(recipe), "--run-dir", str(target), *extra)
        assert_one_line_error(proc, "--run-dir", str(target), "not a qtool run directory")
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in target.iterdir()) == ["05-pack", "recipe.yaml"]
    assert_one_line_error(qtool("validate", str(recipe_file(lambda r: r["output"].update(run_dir=str(target))))),
                          "not a qtool run directory")  # fmt: skip


@pytest.mark.parametrize("run_dir", ["/", "runs/../../elsewhere"])
def test_run_dir_that_climbs_out_or_is_root_is_refused(recipe_file, run_dir):
    recipe = recipe_file(lambda r: r["output"].update(run_dir=run_dir))
    assert_one_line_error(qtool("validate", str(recipe)), "output.run_dir", "..")


def test_corrupt_run_json_needs_force_and_force_clears_it(recipe_file, tmp_path):
    recipe = recipe_file(lambda r: r.update(evaluate=None))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    assert_one_line_error(qtool("quantize", "-r", str(recipe), "--until-stage", "calibrate"), "run.json", "--force")
    assert (run / "run.json").read_text() == "{not json"
    proc = qtool("quantize", "-r", str(recipe), "--until-stage", "calibrate", "--force")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "run.json").read_text())["stages"]["calibrate"]["status"] == "done"


def test_error_text_with_brackets_is_printed_literally(recipe_file):
    """Rich markup in an error message (a path like ``/nope/[/x]``) used to crash the error printer (MarkupError)
    or vanish from the line (``[down_prj]``)."""
    recipe = recipe_file(lambda r: None)
    proc = qtool("validate", str(recipe), "--model", "/nope/[/x]/[down_prj]")
    assert_one_line_error(proc, "/nope/[/x]/[down_prj]")
