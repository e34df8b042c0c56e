"""``qtool sensitivity`` on stories260K: RTN reads no calibration data, so its spread is exactly zero; GPTQ's is
not, and the report, plot and resumable runs are there."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.commands import app
from qtool.report import sensitivity as study
from tests.conftest import STORIES, TINYSTORIES, require, write_recipe

pytestmark = pytest.mark.numeric

SMALL = {"dataset": None, "n_samples": 16, "seqlen": 256, "span": [0.5, 1.0]}


@pytest.fixture
def recipe(tmp_path):
    require(STORIES, TINYSTORIES)

    def make(method: str, **sections):
        return write_recipe(
            tmp_path / f"{method}.yaml",
            name=f"sens-{method}",
            calibration={**SMALL, "dataset": str(TINYSTORIES)},
            quantize={"method": method},
            **sections,
        )

    return make


def _run(recipe, out, sets="tinystories,punctuation", seeds="0,1"):
    recipes = [x for r in (recipe if isinstance(recipe, list) else [recipe]) for x in ("-r", str(r))]
    args = ["sensitivity", *recipes, "--sets", sets, "--seeds", seeds, "--out", str(out),
            "--set", "evaluate.max_tokens=8192", "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output) if isinstance(recipe, list) else json.loads((out / study.REPORT).read_text())


def test_rtn_spread_is_exactly_zero(recipe, tmp_path):
    report = _run(recipe("rtn"), tmp_path / "rtn")
    assert report["set_range"] == 0.0 and report["seed_range"] == 0.0
    assert len(report["runs"]) == 4 and report["gap"] > 0
    # the activation statistics do depend on the set: punctuation is not language
    kurt = {s["set"]: s["max_kurtosis"] for s in report["sets"]}
    assert kurt["tinystories"] != kurt["punctuation"]


def test_gptq_spread_report_and_resume(recipe, tmp_path):
    out = tmp_path / "gptq"
    report = _run(recipe("gptq"), out)
    assert report["set_range"] > 0 and report["seed_range"] > 0
    by_set = {s["set"]: s for s in report["sets"]}
    # measured: calibrated on TinyStories 4.313, on random punctuation 4.935 (FP 3.979 at this budget); set spread
    # 96% of the gap, seed spread 6.5%
    assert by_set["tinystories"]["ppl_mean"] < by_set["punctuation"]["ppl_mean"]
    assert all(r["layer_error_mean"] > 0 for r in report["runs"])
    assert (out / study.PLOT).stat().st_size > 10_000
    assert (out / "data" / "punctuation.txt").is_file()
    again = _run(recipe("gptq"), out)  # every run is done: nothing recomputed, the same report
    assert again["runs"] == report["runs"]


def test_the_seed_studys_three_methods_run(recipe, tmp_path):
    """The seed study's methods besides GPTQ, in one command (``-r`` twice): AWQ (weights) and SmoothQuant W8A8
    (its scales come from the calibration set; the weights are RTN here, so any spread is SmoothQuant's); each is
    a study of its own under OUT/<recipe name>, compared in OUT/methods.json and methods.png."""
    out = tmp_path / "both"
    smooth = recipe("rtn", transform={"method": "smoothquant", "alpha": 0.5}, scheme="W8A8")
    comparison = _run([recipe("awq"), smooth], out, seeds="0")
    assert [m["recipe"] for m in comparison["methods"]] == ["sens-awq", "sens-rtn"]
    assert json.loads((out / study.METHODS_REPORT).read_text()) == comparison
    assert (out / study.METHODS_PLOT).stat().st_size > 10_000
    for m in comparison["methods"]:
        report = json.loads((out / m["recipe"] / study.REPORT).read_text())
        assert report["set_spread"] == m["set_spread"] and (out / m["recipe"] / "runs").is_dir()
        assert m["set_range"] > 0 and m["seed_range"] == 0.0  # one seed: no seed spread
        # measured: AWQ W4 g32 4.298 (TinyStories) vs 4.401 (punctuation); SmoothQuant W8A8 3.9846 vs 3.9917
        assert m["ppl_by_set"]["tinystories"] < m["ppl_by_set"]["punctuation"]


def test_bad_sets_and_seeds_are_one_line(recipe, tmp_path):
    r = recipe("rtn")
    for args, expected in [
        (["--sets", "nosuchset"], "--sets: nosuchset"),
        (["--sets", "tinystories,tinystories"], "named twice"),
        (["--seeds", "a,b"], "--seeds"),
        (["-r", str(r)], "named the same"),
    ]:
        res = CliRunner().invoke(app, ["sensitivity", "-r", str(r), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code != 0 and expected in str(res.exception or res.output)
    assert not (tmp_path / "x" / "runs").exists()
