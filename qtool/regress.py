"""Regression gate: compare a results document with a baseline, metric by metric.

Rules (``RULES``, by metric name):
- perplexity-like (lower is better): regressed when ``result > baseline * (1 + ppl)`` — a relative tolerance;
- accuracy-like (higher is better): regressed when ``result < baseline - acc`` (absolute, fraction of 1), or, with
  ``acc_stderr = k``, when ``result < baseline - k * sqrt(se_baseline² + se_result²)`` (both estimates' noise).
A metric that moved the other way by more than the tolerance is marked ``improved`` (not an error).

Baseline document (``schema: qtool.baseline/1``): the results' ``metrics`` plus ``provenance`` (recipe, model
identity, qtool and library versions, limits and token budgets, the results file it came from) and optional
default ``tolerance``. It is only ever written deliberately (``qtool regress --update``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qtool.errors import QtoolError
from qtool.eval.results import read_results, write_results

BASELINE_SCHEMA = "qtool.baseline/1"
LOWER, HIGHER = "lower", "higher"
# metric name → which direction is better; ppl-like metrics compare relatively, accuracies absolutely.
RULES: dict[str, str] = {
    "token_ppl": LOWER,
    "perplexity": LOWER,
    "word_perplexity": LOWER,
    "byte_perplexity": LOWER,
    "bits_per_byte": LOWER,
    "acc": HIGHER,
    "acc_norm": HIGHER,
}


@dataclass(frozen=True)
class Tolerance:
    """``ppl``: relative (0.01 = 1 %); ``acc``: absolute, fraction of 1 (0.01 = 1 point); ``acc_stderr``: if set,
    accuracies use ``acc_stderr × combined stderr`` instead of ``acc``."""

    ppl: float = 0.01
    acc: float = 0.01
    acc_stderr: float | None = None

    def __post_init__(self):
        for name in ("ppl", "acc", "acc_stderr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise QtoolError(f"tolerance: {name}={v} must be a non-negative number")


@dataclass(frozen=True)
class Comparison:
    task: str
    metric: str
    baseline: float
    result: float
    threshold: float  # the worst value that still passes
    rule: str  # human-readable, e.g. "≤ +1.0 % rel" or "≥ −2.0 × stderr"
    status: str  # "ok" | "regressed" | "improved"

    @property
    def delta(self) -> float:
        return self.result - self.baseline


def parse_tolerance(items: list[str], base: Tolerance | None = None) -> Tolerance:
    """``["ppl=2%", "acc=0.01", "acc=2se"]`` → ``Tolerance``; later items win. ``2%`` is 0.02; ``Kse`` sets stderr
    units for accuracies."""
    tol = base or Tolerance()
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip().lower()
        if not sep or key not in ("ppl", "acc"):
            raise QtoolError(
                f"--tolerance: '{item}' is not KEY=VALUE with KEY ppl or acc; e.g. ppl=2% acc=0.01 acc=2se"
            )
        try:
            if key == "acc" and raw.endswith("se"):
                tol = replace(tol, acc_stderr=float(raw[:-2]))
                continue
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError as e:
            raise QtoolError(f"--tolerance: '{item}' has no number; e.g. ppl=2% acc=0.01 acc=2se") from e
        tol = replace(tol, **{key: value}) if key == "ppl" else replace(tol, acc=value, acc_stderr=None)
    return tol


def compare(baseline: dict, results: dict, tol: Tolerance) -> list[Comparison]:
    """Compare every baseline metric with the results. A baseline metric missing from the results, or measured on a
    different number of documents/tokens, is a ``QtoolError`` (the numbers would not be comparable)."""
    out = []
    for task, row in baseline["metrics"].items():
        for metric, base in row.items():
            res = results["metrics"].get(task, {}).get(metric)
            if res is None:
                raise QtoolError(
                    f"results: no {task}/{metric}, which the baseline has; evaluate with --tasks {task} "
                    "(or --update the baseline)"
                )
            if base.get("n") is not None and res.get("n") is not None and base["n"] != res["n"]:
                raise QtoolError(
                    f"results: {task}/{metric} was measured on n={res['n']} but the baseline on n={base['n']}; "
                    "use the baseline's --limit/--max-tokens/--seqlen (or --update the baseline)"
                )
            out.append(compare_metric(task, metric, base, res, tol))
    return out


def compare_metric(task: str, metric: str, base: dict, res: dict, tol: Tolerance) -> Comparison:
    """One metric against its baseline; ``base``/``res`` are ``{value, stderr, n}`` entries."""
    if metric not in RULES:
        raise QtoolError(f"baseline: no comparison rule for metric '{metric}' of {task}; known: {', '.join(RULES)}")
    b, r = float(base["value"]), float(res["value"])
    if RULES[metric] == LOWER:
        margin = abs(b) * tol.ppl
        rule = f"≤ +{tol.ppl:.1%} rel"
        worst, better = b + margin, r < b - margin
        worse = r > worst
    else:
        if tol.acc_stderr is not None:
            se_b, se_r = base.get("stderr"), res.get("stderr")
            if se_b is None or se_r is None:
                raise QtoolError(
                    f"{task}/{metric} has no stderr in the baseline or results; use an absolute --tolerance acc=…"
                )
            margin = tol.acc_stderr * math.hypot(se_b, se_r)
            rule = f"≥ −{tol.acc_stderr:g}×stderr"
        else:
            margin = tol.acc
            rule = f"≥ −{tol.acc:g} abs"
        worst, better = b - margin, r > b + margin
        worse = r < worst
    status = "regressed" if worse else "improved" if better else "ok"
    return Comparison(task, metric, b, r, worst, rule, status)


def regressions(comparisons: list[Comparison]) -> list[Comparison]:
    return [c for c in comparisons if c.status == "regressed"]


def read_baseline(path: str | Path) -> tuple[dict, Tolerance | None]:
    """The baseline document and its stored default tolerance (``None`` if it has none)."""
    doc = read_results(path, field="baseline")
    stored = doc.get("tolerance")
    if stored is None:
        return doc, None
    if not isinstance(stored, dict) or set(stored) - {"ppl", "acc", "acc_stderr"}:
        raise QtoolError(f"baseline: {path} 'tolerance' must be an object with keys ppl, acc, acc_stderr")
    return doc, Tolerance(**stored)


def make_baseline(
    results: dict, results_path: str | Path | None = None, recipe: str | None = None, tolerance: Tolerance | None = None
) -> dict:
    """A baseline from a results document, recording how its numbers were produced."""
    provenance = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results_file": str(results_path) if results_path else None,
        "recipe": recipe or results.get("recipe"),
        "model": results.get("model", {}),
        "qtool_version": results.get("versions", {}).get("qtool"),
        "versions": results.get("versions", {}),
        "settings": results.get("settings", {}),  # limit, batch size, seqlen and token budget
        "tasks": results.get("tasks", {}),  # dataset hashes and per-task budgets
    }
    doc = {"schema": BASELINE_SCHEMA, "provenance": provenance, "metrics": results["metrics"]}
    if tolerance is not None:
        doc["tolerance"] = asdict(tolerance)
    return doc


def write_baseline(doc: dict, path: str | Path) -> Path:
    return write_results(doc, path)
