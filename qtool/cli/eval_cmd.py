"""``qtool eval``: evaluate an FP model, a GGUF, a packed checkpoint or a run's packed model on local tasks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.table import Table

from qtool.cli.app import ProgressBars, console, err_console, fail, setup_logging
from qtool.errors import QtoolError

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="HF model dir, .gguf file, hub id, or a run directory."),
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        "-t",
        help="Comma-separated: wikitext2,tinystories,piqa,arc_easy,arc_challenge,winogrande,hellaswag,lambada,boolq "
        "(default wikitext2, or none when --text is given).",
    ),
    text: list[Path] | None = typer.Option(
        None,
        "--text",
        help="Also score token perplexity on this text file (.txt, WikiText wiki.*.raw, or .jsonl); repeatable. "
        "Reported as task text:<path>.",
    ),
    text_field: str = typer.Option("text", "--text-field", help="The field a .jsonl --text file holds its text in."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="lm-eval tasks: score only the first N items."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="lm-eval batch size."),
    seqlen: int | None = typer.Option(None, "--seqlen", min=2, help="Perplexity window (default 2048 or context)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=2, help="Perplexity token budget (default all)."),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Evaluation data (default $QTOOL_DATA_DIR, else "
        "shared/assets/data found above the current or package directory).",
    ),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer dir/hub id, if not the model's."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here (qtool regress reads it)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what qtool and lm-eval do."),
) -> None:
    """Evaluate a model: qtool's token perplexity and zero-shot tasks through lm-evaluation-harness, offline."""
    setup_logging(verbose)
    if not verbose:  # lm-eval warns per task about things qtool already handles (custom datasets, passed-in model)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        doc = _run(
            model, tasks, limit, batch_size, seqlen, max_tokens, data_dir, tokenizer, dtype, text or [], text_field
        )
    except QtoolError as e:
        raise fail(str(e)) from e
    console.print(results_table(doc))
    if json_out:
        from qtool.eval.results import write_results

        write_results(doc, json_out)
        console.print(f"results written to {json_out}")


def _run(model, tasks, limit, batch_size, seqlen, max_tokens, data_dir, tokenizer, dtype, texts, text_field) -> dict:
    from qtool.eval.lmeval import offline
    from qtool.eval.results import evaluate, text_files
    from qtool.eval.tasks import default_data_dir, parse_tasks, task_files
    from qtool.loading import DTYPES, load_model, model_identity

    if tasks is None:
        names = [] if texts else ["wikitext2"]
    else:
        names = parse_tasks(tasks)
    if names:
        data_dir = data_dir or default_data_dir()
        if data_dir is None:
            raise QtoolError("data: no evaluation data directory found; pass --data-dir (or set QTOOL_DATA_DIR)")
    for name in names:  # fail on a missing file before loading the model
        task_files(name, data_dir)
    text_files(texts)
    if dtype not in DTYPES:
        raise QtoolError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    with offline():
        src, info = resolve_eval_model(model, tokenizer)
        info["identity"] = model_identity(src)
        with err_console.status(f"loading {src.path}"):
            loaded, tok = load_model(src, dtype=dtype)
        info["dtype"] = dtype
        with ProgressBars(err_console) as bars:
            return evaluate(
                loaded,
                tok,
                names,
                data_dir,
                limit=limit,
                batch_size=batch_size,
                seqlen=seqlen,
                max_tokens=max_tokens,
                progress=bars.report,
                model_info=info,
                texts=texts,
                text_field=text_field,
            )


def resolve_eval_model(model: str, tokenizer: str | None = None):
    """``(ModelSource, info)``. A run directory (one holding ``run.json``) means its packed model,
    ``RUN_DIR/05-pack/model`` (an HF dir whose config.json has ``quantization_config``; transformers loads it
    through compressed-tensors)."""
    from qtool.loading import resolve_source

    info: dict = {"path": model}
    if (Path(model).expanduser() / "run.json").is_file():
        info["run_dir"] = model  # resolve_source turns a run directory into its packed model
    src = resolve_source(model, tokenizer)
    info.update(kind=src.kind, source=src.path, gguf_file=src.gguf_file, tokenizer=src.tokenizer)
    if src.kind == "dir":
        config = json.loads((Path(src.path) / "config.json").read_text(encoding="utf-8"))
        qc = config.get("quantization_config")
        info["quantization"] = {"quant_method": qc.get("quant_method"), "format": qc.get("format")} if qc else None
    return src, info


def results_table(doc: dict, title: str | None = None) -> Table:
    """task, metric, value, stderr, n — accuracies as fractions, perplexities as they are."""
    from qtool.eval.results import metric_rows

    settings = doc.get("settings", {})
    caption = (
        f"{doc.get('model', {}).get('path', '')} · limit {settings.get('limit')} · "
        f"max_tokens {settings.get('max_tokens')}"
    )
    table = Table(title=title or "qtool eval", caption=caption)
    for col in ("task", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metric, e in metric_rows(doc):
        stderr = "—" if e.get("stderr") is None else f"{e['stderr']:.4f}"
        table.add_row(task, metric, f"{e['value']:.4f}", stderr, str(e.get("n", "")))
    return table
