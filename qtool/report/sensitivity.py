"""Calibration-set sensitivity: one recipe run with several calibration sets and seeds, side by side.

The study of "Outliers and Calibration Sets have Diminishing Effect on Quantization of Modern LLMs" (Paglieri et
al., arXiv 2405.20835) on a user's own model: for every (set, seed) the recipe runs as an ordinary qtool run in
``<out>/runs/<set>-seed<N>`` (so a rerun resumes, and every run shares the FP-perplexity cache); what changes is
``calibration.dataset`` / ``calibration.seed`` only. The report gives per set the perplexity (per seed), the
quantize stage's per-linear relative layer error, the outlier statistics of the activations that set produces
(``outliers: stats`` on its windows), and two spreads as fractions of the quantization gap ``ppl - FP ppl``:

- **set spread**: max - min over sets of the per-set mean perplexity;
- **seed spread**: the mean over sets of max - min over that set's seeds (what resampling windows alone moves).

A set spread near the seed spread means the choice of calibration text does not matter beyond sampling noise.
Weight-only RTN reads no calibration data, so both are exactly 0 (a test).

Built-in sets (files under the data directory, ``qtool.eval.tasks.default_data_dir``): ``wikitext2`` (WikiText-2
raw *validation*), ``c4`` (the C4 validation sample), ``tinystories``, ``piqa-arc`` (PIQA validation goals with
their correct solution, ARC-Easy/Challenge questions with their correct answer; generated) and ``punctuation``
(seeded random punctuation; generated). Anything else is a path to a text file.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import statistics
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.artifacts import write_json
from qtool.errors import QtoolError

log = logging.getLogger(__name__)

REPORT = "sensitivity.json"
PLOT = "sensitivity.png"
METHODS_REPORT = "methods.json"  # several recipes side by side (``compare``)
METHODS_PLOT = "methods.png"
FILES = {
    "wikitext2": "wikitext-2-raw-v1/wiki.valid.raw",
    "c4": "c4/c4_en_validation_sample2000.jsonl.gz",
    "tinystories": "tinystories/tinystories_validation_first4301.txt",
}
GENERATED = ("piqa-arc", "punctuation")
BUILTIN = (*FILES, *GENERATED)


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    path: Path


def resolve_sets(names: list[str], data_dir: Path | None, work: Path, chars: int) -> list[CalibrationSet]:
    """Each name as a file: a built-in set (generated ones written under ``work/data``, ``chars`` characters of
    punctuation) or a path. Every file is checked before anything runs."""
    if not names:
        raise QtoolError("--sets: name at least one calibration set (" + ", ".join(BUILTIN) + ", or a file)")
    if len(set(names)) != len(names):
        raise QtoolError(f"--sets: a set is named twice ({', '.join(names)})")
    out = []
    for name in names:
        if name in BUILTIN:
            if data_dir is None:
                raise QtoolError(f"--sets: {name} is a built-in set; pass --data-dir (or set QTOOL_DATA_DIR)")
            if name in FILES:
                path = data_dir / FILES[name]
            else:
                path = work / "data" / f"{name}.txt"
                if not path.is_file():
                    text = _piqa_arc(data_dir) if name == "piqa-arc" else _punctuation(chars)
                    _write_text(path, text)
        else:
            path = Path(name).expanduser()
        if not path.is_file():
            known = ", ".join(BUILTIN)
            raise QtoolError(f"--sets: {name}: {path} does not exist; name a built-in set ({known}) or a file")
        out.append(CalibrationSet(Path(name).stem if name not in BUILTIN else name, path))
    return out


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _piqa_arc(data_dir: Path) -> str:
    """PIQA validation (goal + correct solution) and ARC-Easy/Challenge (question + correct answer) as plain text."""
    docs: list[str] = []
    piqa, labels = data_dir / "piqa" / "valid.jsonl", data_dir / "piqa" / "valid-labels.lst"
    arcs = [data_dir / "arc_easy" / "test.jsonl", data_dir / "arc_challenge" / "test.jsonl"]
    missing = [p for p in (piqa, labels, *arcs) if not p.is_file()]
    if missing:
        raise QtoolError(f"--sets: piqa-arc needs {missing[0]}, which does not exist; check --data-dir")
    answers = [int(x) for x in labels.read_text().split()]
    for row, label in zip(_jsonl(piqa), answers, strict=False):
        docs.append(f"{row['goal']} {row['sol1'] if label == 0 else row['sol2']}")
    for path in arcs:
        for row in _jsonl(path):
            choices = dict(zip(row["choices"]["label"], row["choices"]["text"], strict=True))
            docs.append(f"{row['question']} {choices.get(row['answerKey'], '')}".strip())
    return "\n\n".join(docs) + "\n"


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _punctuation(chars: int, seed: int = 0) -> str:
    """Random runs of 1-4 punctuation characters separated by spaces and newlines (seeded): text that carries no
    language, the study's worst case."""
    rng = random.Random(seed)
    parts, n = [], 0
    while n < chars:
        word = "".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 4)))
        sep = "\n" if rng.random() < 0.05 else " "
        parts.append(word + sep)
        n += len(word) + 1
    return "".join(parts)


def pipeline_runner(
    recipe: Path, overrides: list[str], model: str | None, progress: Any = None
) -> Callable[[CalibrationSet, int, Path], dict[str, Any]]:
    """``run`` for ``run_study``: the recipe (with ``overrides``, ``--model``) as a qtool run per (set, seed), with
    ``calibration.dataset``/``seed`` replaced and ``outliers: stats`` on. A set that is the recipe's own calibration
    file keeps the recipe's ``span`` (and format); any other file is read whole."""
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe

    base = load_recipe(recipe, overrides, model)
    own = Path(base.calibration.dataset).resolve()

    def run(s: CalibrationSet, seed: int, run_dir: Path) -> dict[str, Any]:
        extra = [f"calibration.dataset={s.path}", f"calibration.seed={seed}", "outliers.method=stats"]
        if s.path.resolve() != own:
            extra += ["calibration.format=auto", "calibration.text_field=text", "calibration.span=[0.0, 1.0]"]
        rec = load_recipe(recipe, [*overrides, *extra], model)
        kwargs = {"progress": progress} if progress is not None else {}
        result = Pipeline(rec, run_dir, **kwargs).run()
        log.info("sensitivity: %s seed %d: ppl %.4f", s.name, seed, result.manifest("evaluate")["summary"]["ppl"])
        return {stage: result.manifest(stage) for stage in ("outliers", "quantize", "evaluate")}

    return run


def run_study(
    sets: list[CalibrationSet],
    seeds: list[int],
    out: Path,
    run: Callable[[CalibrationSet, int, Path], dict[str, Any]],
) -> dict[str, Any]:
    """Run every (set, seed) with ``run(set, seed, run_dir) -> stage manifests by stage name`` and write the
    report (``REPORT``, ``PLOT``) under ``out``; returns the report."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise QtoolError("--seeds: give one or more distinct calibration seeds, e.g. 0,1,2")
    rows = []
    for s in sets:
        for seed in seeds:
            manifests = run(s, seed, out / "runs" / f"{s.name}-seed{seed}")
            rows.append(_row(s, seed, manifests))
    report = summarize(rows)
    write_json(out / REPORT, report)
    try:
        plot(report, out / PLOT)
    except ImportError:  # matplotlib is optional for the report itself
        log.warning("sensitivity: matplotlib is not installed; no plot written")
    return report


def _row(s: CalibrationSet, seed: int, manifests: dict[str, Any]) -> dict[str, Any]:
    ev = manifests["evaluate"]["summary"]
    q = manifests["quantize"]["summary"]
    worst = (manifests.get("outliers") or {}).get("summary", {}).get("worst", [])
    errors = q.get("layer_error") or {}
    by_linear: dict[str, list[float]] = {}
    for key, value in errors.items():
        by_linear.setdefault(key.split(".", 1)[1], []).append(value)
    return {
        "set": s.name,
        "file": str(s.path),
        "seed": seed,
        "ppl": ev["ppl"],
        "fp_ppl": ev.get("fp_ppl"),
        "layer_error_mean": statistics.fmean(errors.values()) if errors else None,
        "layer_error_by_linear": {k: statistics.fmean(v) for k, v in sorted(by_linear.items())},
        "max_kurtosis": max((r["kurtosis"] for r in worst), default=None),
        "max_mmr": max((r["mmr"] for r in worst), default=None),
        "worst_input": f"layer {worst[0]['layer']} {worst[0]['input']}" if worst else None,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-set statistics and the two spreads (module docstring) from one row per (set, seed)."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        sets.setdefault(r["set"], []).append(r)
    fp = rows[0]["fp_ppl"]
    per_set = []
    for name, rs in sets.items():
        ppls = [r["ppl"] for r in rs]
        errs = [r["layer_error_mean"] for r in rs if r["layer_error_mean"] is not None]
        kurt = [r["max_kurtosis"] for r in rs if r["max_kurtosis"] is not None]
        per_set.append(
            {
                "set": name,
                "ppl_mean": statistics.fmean(ppls),
                "ppl_min": min(ppls),
                "ppl_max": max(ppls),
                "seed_range": max(ppls) - min(ppls),
                "layer_error_mean": statistics.fmean(errs) if errs else None,
                "max_kurtosis": statistics.fmean(kurt) if kurt else None,
            }
        )
    gap = statistics.fmean(r["ppl"] for r in rows) - fp if fp is not None else None
    means = [s["ppl_mean"] for s in per_set]
    set_range = max(means) - min(means)
    seed_range = statistics.fmean(s["seed_range"] for s in per_set)
    ok = gap is not None and gap > 0
    return {
        "fp_ppl": fp,
        "gap": gap,
        "set_range": set_range,
        "seed_range": seed_range,
        "set_spread": set_range / gap if ok else None,
        "seed_spread": seed_range / gap if ok else None,
        "sets": per_set,
        "runs": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Perplexity per calibration set (one dot per seed, the mean as a bar), the FP perplexity as a line."""
    from qtool.report.plots import _new_figure, _save

    fig = _new_figure(max(6.0, 1.4 * len(report["sets"])), 4.5)
    _draw(fig.add_subplot(1, 1, 1), report, "calibration-set sensitivity")
    _save(fig, path)


def _draw(ax: Any, report: dict[str, Any], title: str) -> None:
    names = [s["set"] for s in report["sets"]]
    ax.bar(range(len(names)), [s["ppl_mean"] for s in report["sets"]], color="#9ecae1", width=0.6, label="mean")
    for i, name in enumerate(names):
        ppls = [r["ppl"] for r in report["runs"] if r["set"] == name]
        ax.scatter([i] * len(ppls), ppls, color="#08519c", s=18, zorder=3)
    if report["fp_ppl"] is not None:
        ax.axhline(report["fp_ppl"], color="#444", linestyle="--", linewidth=1, label="FP")
    lo = min(min(r["ppl"] for r in report["runs"]), report["fp_ppl"] or float("inf"))
    hi = max(r["ppl"] for r in report["runs"])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("perplexity")
    spread = report["set_spread"]
    if spread is not None:
        title += f"\nset spread {spread:.1%} of the quantization gap, seed spread {report['seed_spread']:.1%}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best")


def compare(reports: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Several recipes' reports (by recipe name, each from ``run_study``) side by side: per recipe the FP
    perplexity, the gap, both spreads and the mean perplexity per set; written to ``METHODS_REPORT`` and plotted
    (``METHODS_PLOT``) under ``out``."""
    rows = []
    for name, r in reports.items():
        rows.append(
            {
                "recipe": name,
                "fp_ppl": r["fp_ppl"],
                "gap": r["gap"],
                "set_range": r["set_range"],
                "seed_range": r["seed_range"],
                "set_spread": r["set_spread"],
                "seed_spread": r["seed_spread"],
                "ppl_by_set": {s["set"]: s["ppl_mean"] for s in r["sets"]},
            }
        )
    comparison = {"methods": rows}
    write_json(out / METHODS_REPORT, comparison)
    try:
        plot_methods(reports, out / METHODS_PLOT)
    except ImportError:
        log.warning("sensitivity: matplotlib is not installed; no plot written")
    return comparison


def plot_methods(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per recipe as in ``plot``, the panels side by side (each with its own perplexity axis)."""
    from qtool.report.plots import _new_figure, _save

    n = len(reports)
    width = max(5.0, 1.2 * max(len(r["sets"]) for r in reports.values()))
    fig = _new_figure(width * n, 4.8)
    for i, (name, report) in enumerate(reports.items()):
        _draw(fig.add_subplot(1, n, i + 1), report, name)
    _save(fig, path)
