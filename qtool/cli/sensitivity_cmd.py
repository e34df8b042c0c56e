"""``qtool sensitivity``: run one recipe with several calibration sets and seeds, and report how much the choice
of calibration text moves the result (``qtool.report.sensitivity``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qtool.cli.app import ProgressBars, console, setup_logging


def register(app: typer.Typer) -> None:
    app.command()(sensitivity)


def _ints(text: str) -> list[int]:
    from qtool.errors import QtoolError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QtoolError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def sensitivity(
    recipe: Annotated[
        list[Path],
        typer.Option(
            "--recipe", "-r", help="the recipe to repeat; several (-r a.yaml -r b.yaml): each studied, then compared"
        ),
    ],
    sets: Annotated[
        str,
        typer.Option(
            help="comma-separated calibration sets: wikitext2, c4, tinystories, piqa-arc, punctuation, or files"
        ),
    ] = "wikitext2,c4,tinystories,piqa-arc,punctuation",
    seeds: Annotated[str, typer.Option(help="comma-separated calibration seeds (windows resampled)")] = "0,1,2",
    out: Annotated[
        Path | None,
        typer.Option(
            help="output directory (default: runs/sensitivity-<recipe name>; several recipes: runs/sensitivity, one "
            "study per recipe in OUT/<recipe name>)"
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="replace the recipe's model")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the built-in sets live (default: $QTOOL_DATA_DIR or shared assets)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe key (every run)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a recipe once per calibration set and seed (resumable runs under OUT/runs/) and report per set the
    perplexity, the layer error and the activation outlier statistics, and the spread across sets as a fraction
    of the quantization gap next to the spread across seeds alone; writes sensitivity.json and sensitivity.png.
    With several recipes (the seed study's GPTQ, AWQ and SmoothQuant, say) each is studied in OUT/<recipe name>
    and the spreads are compared in OUT/methods.json and OUT/methods.png."""
    setup_logging(verbose)
    from qtool.errors import QtoolError
    from qtool.eval.tasks import default_data_dir
    from qtool.recipe import load_recipe
    from qtool.report import sensitivity as study

    overrides = list(set_ or [])
    bases = [load_recipe(r, overrides, model) for r in recipe]  # a bad recipe fails here, before anything is written
    names_seen = [b.name for b in bases]
    if len(set(names_seen)) != len(names_seen):
        raise QtoolError(
            f"--recipe: two recipes are named the same ({', '.join(names_seen)}); give each recipe its own name: key"
        )
    several = len(bases) > 1
    out = out or Path("runs") / ("sensitivity" if several else f"sensitivity-{bases[0].name}")
    outs = [out / b.name for b in bases] if several else [out]
    for o in outs:
        if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / "runs").is_dir())):
            raise QtoolError(f"--out: {o} exists and is not a sensitivity study; choose a new or empty directory")
    seed_list = _ints(seeds)
    names = [x.strip() for x in sets.split(",") if x.strip()]
    studies = []
    for path, base, o in zip(recipe, bases, outs, strict=True):
        chars = 6 * base.calibration.n_samples * base.calibration.seqlen
        studies.append((path, base, o, study.resolve_sets(names, data_dir or default_data_dir(), o, chars)))
    reports = {}
    with ProgressBars(console) as bar:
        for path, base, o, resolved in studies:
            run = study.pipeline_runner(path, overrides, model, progress=bar.report)
            reports[base.name] = study.run_study(resolved, seed_list, o, run)
    comparison = study.compare(reports, out) if several else None
    if json_out:
        console.print_json(json.dumps(comparison if several else reports[bases[0].name]))
        return
    for (_, base, o, _), report in zip(studies, reports.values(), strict=True):
        console.print(report_table(report, base.name if several else None))
        console.print(f"report: {o / study.REPORT}, plot: {o / study.PLOT}", highlight=False)
    if comparison is not None:
        console.print(methods_table(comparison))
        console.print(f"comparison: {out / study.METHODS_REPORT}, plot: {out / study.METHODS_PLOT}", highlight=False)


def report_table(report: dict[str, Any], name: str | None = None) -> Table:
    title = "calibration-set sensitivity" + (f": {name}" if name else "")
    table = Table(title=title, caption=_caption(report))
    for col in ("set", "ppl (mean)", "min – max over seeds", "layer error", "max kurtosis"):
        table.add_column(col, justify="left" if col == "set" else "right", no_wrap=True)
    for s in report["sets"]:
        err = "-" if s["layer_error_mean"] is None else f"{s['layer_error_mean']:.4g}"
        kurt = "-" if s["max_kurtosis"] is None else f"{s['max_kurtosis']:,.0f}"
        table.add_row(s["set"], f"{s['ppl_mean']:.4f}", f"{s['ppl_min']:.4f} – {s['ppl_max']:.4f}", err, kurt)
    return table


def _caption(report: dict[str, Any]) -> str:
    if report["set_spread"] is None:
        return f"FP ppl {report['fp_ppl']}"
    return (
        f"FP ppl {report['fp_ppl']:.4f}, gap {report['gap']:.4f}: set spread {report['set_spread']:.1%} of the gap "
        f"({report['set_range']:.4f}), seed spread {report['seed_spread']:.1%} ({report['seed_range']:.4f})"
    )


def methods_table(comparison: dict[str, Any]) -> Table:
    table = Table(title="calibration-set sensitivity by recipe")
    for col in ("recipe", "FP ppl", "gap", "set spread", "seed spread"):
        table.add_column(col, justify="left" if col == "recipe" else "right", no_wrap=True)
    for m in comparison["methods"]:
        spreads = [
            "-" if m[k] is None else f"{m[k]:.1%} ({m[k.replace('spread', 'range')]:.4f})"
            for k in ("set_spread", "seed_spread")
        ]
        fp = "-" if m["fp_ppl"] is None else f"{m['fp_ppl']:.4f}"
        gap = "-" if m["gap"] is None else f"{m['gap']:.4f}"
        table.add_row(m["recipe"], fp, gap, *spreads)
    return table
