"""``qtool inspect``: outlier statistics of a model (and, with a recipe that transforms, before/after), plus the
Rich tables ``qtool quantize`` prints when its outliers and transform stages finish."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qtool.cli.app import ProgressBars, console, setup_logging

INSPECT_SAMPLES = 16


def register(app: typer.Typer) -> None:
    app.command()(inspect)


def inspect(
    model: Annotated[str | None, typer.Option("--model", "-m", help="local HF dir, .gguf file, or hub id")] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="use this recipe's calibration/transform")
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help="calibration text when no recipe is given")] = None,
    n_samples: Annotated[int, typer.Option(help="windows measured")] = INSPECT_SAMPLES,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    run_dir: Annotated[Path | None, typer.Option(help="run directory (default: runs/inspect-<name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe key")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Outlier statistics (kurtosis, max/median channel ratio, QSUR, absmax) per layer: runs calibrate and the
    outliers stage only; with a --recipe whose transform is not 'none', the transform too, showing before/after."""
    setup_logging(verbose)
    from qtool.errors import QtoolError
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe, validate_recipe

    overrides = ["outliers.method=stats", f"outliers.max_samples={n_samples}", *(set_ or [])]
    if recipe is not None:
        rec = load_recipe(recipe, overrides, model)
    elif model is None or dataset is None:
        raise QtoolError("inspect: pass --model and --dataset (calibration text), or --recipe")
    else:
        from qtool.recipe import apply_overrides

        name = "inspect-" + Path(model.rstrip("/")).name.removesuffix(".gguf").replace("/", "-")
        raw = {
            "name": name,
            "model": model,
            "calibration": {"dataset": str(dataset), "n_samples": n_samples, "seqlen": seqlen},
            "scheme": "W8A16",  # not run; any scheme that fits every model
            "quantize": {"method": "rtn"},
        }
        rec = validate_recipe(apply_overrides(raw, overrides), "inspect")
    from qtool.methods.transform import method_for

    until = "transform" if method_for(rec.transform).changes_model else "outliers"
    with ProgressBars(console) as bar:
        result = Pipeline(rec, run_dir, progress=bar.report, until_stage=until).run()
    outliers = result.manifest("outliers") or {}
    print_worst(console, outliers.get("summary", {}))
    transform = (result.manifest("transform") or {}).get("summary", {})
    if "before_after" in transform:
        print_before_after(console, transform)
    console.print(
        f"stats and plots: {result.run_dir}/02-outliers"
        + (f", {result.run_dir}/03-transform" if until == "transform" else ""),
        highlight=False,
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"


def print_worst(out: Console, summary: dict[str, Any]) -> None:
    """The worst (layer, input) rows by kurtosis, and the channels that are outliers in many layers."""
    if not summary.get("worst"):
        return
    table = Table(title=f"worst linear inputs by kurtosis ({summary['tokens']} tokens)")
    for col in ("layer", "input", "kurtosis", "max/median", "absmax", "QSUR"):
        table.add_column(col, justify="right" if col != "input" else "left", no_wrap=True)
    for r in summary["worst"]:
        table.add_row(
            str(r["layer"]), r["input"], _fmt(r["kurtosis"]), _fmt(r["mmr"]), _fmt(r["absmax"]), _fmt(r["qsur"])
        )
    out.print(table)
    for kind, channels in summary.get("outlier_channels", {}).items():
        if channels:
            text = ", ".join(f"{c['channel']} ({c['layers']} layers)" for c in channels[:8])
            out.print(f"  recurring outlier channels at {kind} inputs: {text}", highlight=False)


def print_before_after(out: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"outliers before → after {summary['method']}")
    for col in ("layer", "input", "kurtosis", "max/median", "absmax", "QSUR"):
        table.add_column(col, justify="right" if col != "input" else "left", no_wrap=True)
    for r in summary["before_after"]:
        cells = [f"{_fmt(r[m][0])} → {_fmt(r[m][1])}" for m in ("kurtosis", "mmr", "absmax", "qsur")]
        table.add_row(str(r["layer"]), r["input"], *cells)
    out.print(table)
