"""A corpus of bad models, data files and run directories: ``qtool validate`` and ``qtool quantize`` both refuse each
with exit code 2 and one line naming the file or field, and nothing is written (issue 20: ``validate`` passed 26 of
61 such recipes that ``quantize`` then failed on, 13 of them with tracebacks)."""

from __future__ import annotations

import gzip
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMOLLM2, STORIES, TINYSTORIES, require, write_recipe

pytestmark = pytest.mark.usefixtures("_assets")


@pytest.fixture
def _assets():
    require(STORIES, TINYSTORIES)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``qtool ARGS`` in this process (the console script's own entry point): exit code and stderr."""
    from qtool.cli.commands import main

    argv, sys.argv = sys.argv, ["qtool", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def _model_copy(tmp: Path, damage: Callable[[Path], None]) -> str:
    model = tmp / "model"
    shutil.copytree(STORIES, model, ignore=shutil.ignore_patterns("llama2c-original", "verification*"))
    damage(model)
    return str(model)


def _nan(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})


def _truncate(model: Path) -> None:
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(600_000)


def _text(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def _gz(tmp: Path) -> str:
    (tmp / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a story"}\n' * 50)[:40])
    return str(tmp / "c.jsonl.gz")


def _gguf(tmp: Path) -> str:
    require(SMOLLM2)
    src = next(SMOLLM2.glob("*.gguf"))
    with open(src, "rb") as f:
        (tmp / "cut.gguf").write_bytes(f.read(5_000_000))
    return str(tmp / "cut.gguf")


# name -> (recipe changes given the tmp dir, the words the error line must hold)
CASES: dict[str, tuple[Callable[[Path], dict], tuple[str, ...]]] = {
    "truncated-safetensors": (lambda t: {"model": _model_copy(t, _truncate)}, ("model.safetensors", "truncated")),
    "garbage-safetensors": (
        lambda t: {"model": _model_copy(t, lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64))},
        ("model.safetensors", "not a readable safetensors"),
    ),
    "inf-weights": (lambda t: {"model": _model_copy(t, _nan)}, ("model.layers.2.mlp.up_proj", "NaN/Inf")),
    "no-weights": (
        lambda t: {"model": _model_copy(t, lambda m: (m / "model.safetensors").unlink())},
        ("model", "no weight files"),
    ),
    "truncated-gguf": (lambda t: {"model": _gguf(t)}, ("cut.gguf", "not a readable GGUF")),
    "missing-tokenizer": (
        lambda t: {"model": {"source": str(STORIES), "tokenizer": "/nope/tok"}},
        ("model.tokenizer", "/nope/tok"),
    ),  # fmt: skip
    "foreign-tokenizer": (
        lambda t: {"model": {"source": str(STORIES), "tokenizer": str(SMOLLM2 / "hf_tokenizer")}},
        ("model.tokenizer", "49152 tokens", "512"),
    ),
    "binary-calibration": (
        lambda t: {"calibration": {"dataset": _text(t, "b.txt", bytes(range(256)) * 8), "seqlen": 64}},
        ("calibration.dataset", "b.txt"),
    ),
    "nul-calibration": (
        lambda t: {"calibration": {"dataset": _text(t, "n.txt", b"Once\x00upon a time " * 300), "seqlen": 64}},
        ("calibration.dataset", "binary"),
    ),
    "empty-evaluation": (
        lambda t: {"evaluate": {"dataset": _text(t, "e.txt", b"\n \n"), "seqlen": 64}},
        ("evaluate.dataset", "no text"),
    ),
    "short-calibration": (
        lambda t: {"calibration": {"dataset": _text(t, "s.txt", b"Once upon a time."), "seqlen": 64}},
        ("calibration.seqlen", "64"),
    ),
    "evaluation-budget": (
        lambda t: {"evaluate": {"dataset": str(TINYSTORIES), "span": [0, 0.5], "seqlen": 512, "max_tokens": 100}},
        ("evaluate", "no full window"),
    ),
    "jsonl-not-objects": (
        lambda t: {"calibration": {"dataset": _text(t, "l.jsonl", b"[1, 2]\n"), "seqlen": 64}},
        ("calibration.dataset", "line 1"),
    ),
    "corrupt-gzip": (lambda t: {"calibration": {"dataset": _gz(t), "seqlen": 64}}, ("calibration.dataset", "jsonl")),
    "run-dir-under-a-file": (
        lambda t: {"output": {"run_dir": _text(t, "f", b"x") + "/run"}},
        ("--run-dir", "is a file"),
    ),
}


def _recipe(tmp: Path, changes: dict) -> Path:
    path = write_recipe(tmp / "r.yaml")
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    raw.setdefault("output", {}).setdefault("run_dir", str(tmp / "run"))
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_validate_and_quantize_writing_nothing(case, tmp_path, capsys):
    make, needles = CASES[case]
    recipe = _recipe(tmp_path, make(tmp_path))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for command in (["validate", str(recipe)], ["quantize", "--recipe", str(recipe)]):
        code, err = run_cli(capsys, *command)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (command[0], err)
        for needle in needles:
            assert needle in lines[0], (command[0], lines[0])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
