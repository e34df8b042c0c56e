"""``qtool quantize``, ``validate``, ``status``, ``schema``, ``stages``: the pipeline commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import ProgressBars, console, err_console, setup_logging
from qtool.cli.inspect_cmd import print_before_after, print_worst

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="recipe YAML (see recipes/)")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="local HF dir, .gguf file, or hub id")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: --set quantize.damp=0.02")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log what each stage does")]


def register(app: typer.Typer) -> None:
    app.command()(quantize)
    app.command()(validate)
    app.command()(status)
    app.command()(schema)
    app.command()(stages)


def quantize(
    recipe: RecipeOpt,
    model: ModelOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="run directory (default: runs/<recipe name>)")] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="discard the run directory's stages and start over")] = False,
    from_stage: Annotated[str | None, typer.Option(help="rerun this stage and every later one")] = None,
    until_stage: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout instead of tables")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a recipe through calibrate → outliers → transform → quantize → pack → evaluate, resuming where a
    previous run of the same command stopped."""
    setup_logging(verbose)
    from qtool.pipeline import Pipeline
    from qtool.recipe import load_recipe

    rec = load_recipe(recipe, set_ or [], model)
    out = err_console if json_out else console
    with ProgressBars(out) as bar:
        pipe = Pipeline(
            rec,
            run_dir,
            progress=bar.report,
            notify=lambda st: _notify(out, st),
            force=force,
            from_stage=from_stage,
            until_stage=until_stage,
        )
        result = pipe.run()
    summary = _summary(result)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    model: ModelOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Check a recipe against the model and data without running anything or writing: shapes and group sizes, the
    files, the tokenizer and the texts' token counts, and every weight (read one tensor at a time: finite)."""
    setup_logging(verbose)
    from qtool.recipe import load_recipe
    from qtool.validation import validate_deep, validate_fit

    rec = load_recipe(recipe, set_ or [], model)
    report = validate_fit(rec)
    validate_deep(rec)
    console.print(f"[green]ok[/]: {escape(str(recipe))} — {escape(report)}", highlight=False)


def status(run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/w4a16-gptq")]) -> None:
    """Each stage's state, time and fingerprint in a run directory."""
    setup_logging(False)
    from qtool.pipeline import run_status

    table = Table(title=str(run_dir))
    for col in ("stage", "status", "seconds", "fingerprint"):
        table.add_column(col)
    for row in run_status(run_dir):
        secs = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        color = "green" if row["status"] == "done" else "yellow"
        table.add_row(row["stage"], f"[{color}]{row['status']}[/]", secs, row["fingerprint"] or "-")
    console.print(table)


def schema(out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None) -> None:
    """Print the recipe JSON schema."""
    from qtool.recipe import recipe_schema

    text = json.dumps(recipe_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        print(text)


def stages() -> None:
    """List the pipeline stages and the methods each one offers, with what each method needs and writes."""
    from qtool.pipeline import STAGE_DIRS
    from qtool.recipe import Recipe

    table = Table()
    table.add_column("stage")
    table.add_column("directory")
    table.add_column("methods")
    sections = {"calibrate": "calibration"}
    facts = _method_facts()
    for name, dirname in STAGE_DIRS.items():
        field = Recipe.model_fields[sections.get(name, name)]
        methods = [m + (f" ({facts[name, m]})" if facts.get((name, m)) else "") for m in _methods(field.annotation)]
        table.add_row(name, dirname, ", ".join(methods) or "-")
    console.print(table)


def _method_facts() -> dict[tuple[str, str], str]:
    """``(stage, method) -> "needs …; writes …"`` from the method tables' handler facts."""
    import typing

    from qtool.methods import quantize, transform

    out = {}
    for config, handler in quantize.METHODS.items():
        needs = [
            word for word, on in (("calibration data", handler.needs_data), ("Hessians", handler.needs_hessian)) if on
        ]
        out["quantize", typing.get_args(config.model_fields["method"].annotation)[0]] = "needs " + (
            ", ".join(needs) or "no data"
        )
    for config, handler in transform.METHODS.items():
        words = [f"writes {', '.join(handler.artifacts)}"] if handler.artifacts else []
        words += [f"reruns when {s} changes" for s in handler.fingerprint_sections]
        out["transform", typing.get_args(config.model_fields["method"].annotation)[0]] = "; ".join(words)
    return out


def _methods(annotation: Any) -> list[str]:
    """The ``method`` literals of a section's config class, or of each member of a union of them."""
    import typing

    classes = typing.get_args(annotation) or (annotation,)
    out = []
    for cls in classes:
        field = getattr(cls, "model_fields", {}).get("method")
        if field is not None:
            out += list(typing.get_args(field.annotation))
    return out


def _notify(out, st) -> None:
    if st.status == "running":
        out.print(f"[bold]▶ {st.name}[/] running…")
    elif st.status == "done" and st.ran:
        out.print(f"[green]✓ {st.name}[/] done in {st.manifest['seconds']:.1f}s")
        summary = st.manifest.get("summary", {})
        if st.name == "outliers":
            print_worst(out, summary)
        elif st.name == "transform" and "before_after" in summary:
            print_before_after(out, summary)
    elif st.status == "done":
        out.print(f"[dim]✓ {st.name} already done (fingerprint {st.fingerprint}), applied[/]")


def _summary(result) -> dict[str, Any]:
    stages = {
        s.name: {
            "status": s.status,
            "ran": s.ran,
            "seconds": (s.manifest or {}).get("seconds"),
            "fingerprint": s.fingerprint,
            "summary": (s.manifest or {}).get("summary"),
        }
        for s in result.stages
    }
    return {"run_dir": str(result.run_dir), "stages": stages}


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"qtool run {summary['run_dir']}")
    for col in ("stage", "status", "seconds", "result"):
        table.add_column(col)
    for name, s in summary["stages"].items():
        secs = f"{s['seconds']:.1f}" if s["seconds"] is not None else "-"
        table.add_row(name, s["status"] + (" (ran)" if s["ran"] else ""), secs, _describe(name, s["summary"] or {}))
    console.print(table)


def _describe(stage: str, summary: dict[str, Any]) -> str:
    if stage == "evaluate" and "ppl" in summary:
        fp = f"FP {summary['fp_ppl']:.3f} → " if "fp_ppl" in summary else ""
        return f"ppl {fp}quantized {summary['ppl']:.3f} (seqlen {summary['seqlen']}, {summary['tokens']} tokens)"
    if stage == "pack" and "bytes" in summary:
        ratio = summary["bytes"] / summary["bf16_bytes"]
        lin = summary["quantized_linear_bytes"] / summary["quantized_linear_bf16_bytes"]
        return (
            f"{summary['bytes'] / 1e6:.1f} MB ({ratio:.2f}× of bf16 {summary['bf16_bytes'] / 1e6:.1f} MB; "
            f"quantized linears {lin:.3f}× of bf16)"
        )
    if stage == "quantize" and "linears" in summary:
        return f"{summary['method']}: {summary['linears']} linears"
    if stage == "transform" and "headline" in summary:
        return summary["headline"]
    if stage == "calibrate" and "tokens" in summary:
        return f"{summary['tokens']} tokens"
    return summary.get("method", "")
