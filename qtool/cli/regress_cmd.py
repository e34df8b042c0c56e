"""``qtool regress``: gate a results JSON against a baseline; exit 1 on any regression, 0 otherwise."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from qtool.cli.app import console, err_console, fail, setup_logging
from qtool.errors import QtoolError

_STYLE = {"ok": "green", "improved": "cyan", "regressed": "bold red"}


def register(app: typer.Typer) -> None:
    app.command("regress")(regress_command)


def regress_command(
    baseline: Path = typer.Option(..., "--baseline", "-b", help="Baseline JSON (e.g. configs/baselines/NAME.json)."),
    results: Path = typer.Option(..., "--results", "-r", help="Results JSON from `qtool eval --json`."),
    tolerance: list[str] = typer.Option(
        [],
        "--tolerance",
        help="ppl=REL (e.g. 2% or 0.02), acc=ABS (e.g. 0.01) or acc=Kse (K × stderr); repeatable. "
        "Defaults: the baseline's stored tolerance, else ppl=1% acc=0.01.",
    ),
    update: bool = typer.Option(False, "--update", help="Rewrite the baseline from these results (deliberately)."),
    recipe: str | None = typer.Option(None, "--recipe", help="With --update: the recipe recorded in the provenance."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what qtool does."),
) -> None:
    """Compare every baseline metric with the results: perplexity by relative, accuracy by absolute (or stderr)
    tolerance. Exit 1 when a metric regressed; exit 2 on bad input."""
    from qtool import regress
    from qtool.eval.results import read_results

    setup_logging(verbose)
    try:
        res = read_results(results)
        if update:
            _update(baseline, res, results, tolerance, recipe)
            return
        base, stored = regress.read_baseline(baseline)
        tol = regress.parse_tolerance(tolerance, stored)
        comparisons = regress.compare(base, res, tol)
    except QtoolError as e:
        raise fail(str(e)) from e
    console.print(comparison_table(comparisons, baseline, results))
    bad = regress.regressions(comparisons)
    if bad:
        names = ", ".join(f"{c.task}/{c.metric}" for c in bad)
        err_console.print(f"[bold red]regressed:[/] {names}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"no regression in {len(comparisons)} metrics")


def _update(baseline: Path, res: dict, results: Path, tolerance: list[str], recipe: str | None) -> None:
    from qtool import regress

    tol = None
    if baseline.is_file():  # keep a stored tolerance unless new ones are given
        tol = regress.read_baseline(baseline)[1]
    if tolerance:
        tol = regress.parse_tolerance(tolerance, tol)
    doc = regress.make_baseline(res, results_path=results, recipe=recipe, tolerance=tol)
    regress.write_baseline(doc, baseline)
    n = sum(len(row) for row in doc["metrics"].values())
    console.print(f"baseline {baseline} rewritten from {results} ({n} metrics)")


def comparison_table(comparisons, baseline: Path, results: Path) -> Table:
    table = Table(title="qtool regress", caption=f"{results} vs {baseline}")
    for col in ("task", "metric", "baseline", "result", "delta", "limit", "rule"):
        table.add_column(col, justify="left" if col in ("task", "metric", "rule") else "right")
    table.add_column("status", no_wrap=True, min_width=9)
    for c in comparisons:
        style = _STYLE[c.status]
        table.add_row(
            c.task,
            c.metric,
            f"{c.baseline:.4f}",
            f"{c.result:.4f}",
            f"{c.delta:+.4f}",
            f"{c.threshold:.4f}",
            c.rule,
            f"[{style}]{c.status.upper() if c.status == 'regressed' else c.status}",
        )
    return table
