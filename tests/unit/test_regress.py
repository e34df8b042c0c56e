"""Regression gate rules: ppl by relative tolerance, accuracy by absolute or stderr units, bad inputs are errors."""

from __future__ import annotations

import json
import math

import pytest

from qtool.errors import QtoolError
from qtool.eval.results import read_results, write_results
from qtool.regress import (
    Tolerance,
    compare,
    compare_metric,
    make_baseline,
    parse_tolerance,
    read_baseline,
    regressions,
    write_baseline,
)


def _entry(value: float, stderr: float | None = None, n: int = 100) -> dict:
    return {"value": value, "stderr": stderr, "n": n}


def _doc(**metrics: dict) -> dict:
    return {"schema": "qtool.results/1", "metrics": metrics}


@pytest.mark.parametrize(
    ("result", "status"),
    [(20.0, "ok"), (20.19, "ok"), (20.21, "regressed"), (25.0, "regressed"), (19.81, "ok"), (19.5, "improved")],
)
def test_ppl_relative_tolerance(result: float, status: str) -> None:
    c = compare_metric("wikitext2", "token_ppl", _entry(20.0), _entry(result), Tolerance(ppl=0.01))
    assert c.status == status
    assert c.threshold == pytest.approx(20.2)


@pytest.mark.parametrize(("result", "status"), [(0.60, "ok"), (0.591, "ok"), (0.589, "regressed"), (0.62, "improved")])
def test_accuracy_absolute_tolerance(result: float, status: str) -> None:
    assert compare_metric("piqa", "acc", _entry(0.60), _entry(result), Tolerance(acc=0.01)).status == status


def test_accuracy_in_stderr_units() -> None:
    base, res = _entry(0.60, 0.03), _entry(0.55, 0.03)  # combined stderr 0.0424
    assert compare_metric("piqa", "acc", base, res, Tolerance(acc_stderr=2)).status == "ok"  # margin 0.085
    c = compare_metric("piqa", "acc", base, res, Tolerance(acc_stderr=1))  # margin 0.042
    assert c.status == "regressed"
    assert c.threshold == pytest.approx(0.60 - math.hypot(0.03, 0.03))


def test_stderr_units_need_stderr() -> None:
    with pytest.raises(QtoolError, match="no stderr"):
        compare_metric("piqa", "acc", _entry(0.6), _entry(0.6), Tolerance(acc_stderr=2))


def test_compare_names_regressed_metrics() -> None:
    base = _doc(wikitext2={"token_ppl": _entry(20.0)}, piqa={"acc": _entry(0.6), "acc_norm": _entry(0.6)})
    res = _doc(wikitext2={"token_ppl": _entry(31.0)}, piqa={"acc": _entry(0.6), "acc_norm": _entry(0.5)}, extra={})
    bad = regressions(compare(base, res, Tolerance()))
    assert [(c.task, c.metric) for c in bad] == [("wikitext2", "token_ppl"), ("piqa", "acc_norm")]


def test_unchanged_results_pass() -> None:
    doc = _doc(wikitext2={"token_ppl": _entry(20.0)}, piqa={"acc": _entry(0.6, 0.03)})
    assert regressions(compare(doc, doc, Tolerance(ppl=0, acc=0))) == []


def test_missing_metric_is_an_error() -> None:
    base = _doc(piqa={"acc": _entry(0.6), "acc_norm": _entry(0.6)})
    with pytest.raises(QtoolError, match="no piqa/acc_norm"):
        compare(base, _doc(piqa={"acc": _entry(0.6)}), Tolerance())
    with pytest.raises(QtoolError, match="--tasks boolq"):
        compare(_doc(boolq={"acc": _entry(0.6)}), _doc(piqa={"acc": _entry(0.6)}), Tolerance())


def test_different_n_is_an_error() -> None:
    with pytest.raises(QtoolError, match="n=50 but the baseline on n=200"):
        compare(_doc(piqa={"acc": _entry(0.6, n=200)}), _doc(piqa={"acc": _entry(0.6, n=50)}), Tolerance())


def test_unknown_metric_is_an_error() -> None:
    with pytest.raises(QtoolError, match="no comparison rule for metric 'f1'"):
        compare_metric("x", "f1", _entry(0.5), _entry(0.5), Tolerance())


def test_parse_tolerance() -> None:
    assert parse_tolerance([]) == Tolerance()
    assert parse_tolerance(["ppl=2%"]).ppl == pytest.approx(0.02)
    assert parse_tolerance(["ppl=0.05", "acc=0.02"]) == Tolerance(ppl=0.05, acc=0.02)
    assert parse_tolerance(["acc=2se"]).acc_stderr == 2.0
    assert parse_tolerance(["acc=2se", "acc=0.03"]) == Tolerance(acc=0.03)  # later wins, back to absolute
    assert parse_tolerance(["acc=0.05"], base=Tolerance(ppl=0.1)) == Tolerance(ppl=0.1, acc=0.05)


@pytest.mark.parametrize("item", ["ppl", "f1=0.1", "ppl=abc", "acc=xse", "ppl=-1"])
def test_parse_tolerance_rejects(item: str) -> None:
    with pytest.raises(QtoolError, match="tolerance"):
        parse_tolerance([item])


def test_baseline_round_trip_keeps_provenance(tmp_path) -> None:
    results = {
        **_doc(wikitext2={"token_ppl": _entry(20.0, n=4088)}),
        "versions": {"qtool": "0.1.0", "torch": "2.13.0"},
        "model": {"path": "m", "identity": "abc123"},
        "settings": {"limit": 50, "max_tokens": 4096, "seqlen": 512},
        "tasks": {"wikitext2": {"files": {"wikitext-2-raw-v1/wiki.test.raw": "173c87a5"}}},
    }
    doc = make_baseline(results, results_path="r.json", recipe="recipes/w4a16-rtn.yaml", tolerance=Tolerance(ppl=0.02))
    write_baseline(doc, tmp_path / "b.json")
    base, tol = read_baseline(tmp_path / "b.json")
    assert tol == Tolerance(ppl=0.02)
    prov = base["provenance"]
    assert prov["recipe"] == "recipes/w4a16-rtn.yaml"
    assert prov["model"]["identity"] == "abc123"
    assert prov["qtool_version"] == "0.1.0"
    assert prov["settings"]["max_tokens"] == 4096
    assert base["metrics"] == results["metrics"]


def test_read_results_rejects_bad_files(tmp_path) -> None:
    with pytest.raises(QtoolError, match="does not exist"):
        read_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QtoolError, match="is not JSON"):
        read_results(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(QtoolError, match="no 'metrics'"):
        read_results(tmp_path / "empty.json")
    write_results(_doc(piqa={"acc": {"value": "high"}}), tmp_path / "str.json")
    with pytest.raises(QtoolError, match="metrics.piqa.acc needs a numeric 'value'"):
        read_results(tmp_path / "str.json")
