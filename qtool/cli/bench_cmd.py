"""``qtool bench``: a model in every runtime that can run it, side by side (``qtool.bench``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from qtool.cli.app import console, err_console, setup_logging


def register(app: typer.Typer) -> None:
    app.command()(bench)


def bench(
    model: str = typer.Argument(..., help="a run directory, packed checkpoint, HF model dir, .gguf file or hub id"),
    runtime: str = typer.Option(
        "transformers,qtool",
        "--runtime",
        help="comma-separated: transformers, qtool, qtool-dense, vllm (W4A16 kept), vllm-w4a8 (vLLM's default CPU "
        "path), llamacpp",
    ),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="the dense source model, measured through transformers (default: a run directory's recipe model)",
    ),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the baseline"),
    threads: int = typer.Option(1, "--threads", min=1, help="threads per runtime"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=16, help="prefill prompt length"),
    new_tokens: int = typer.Option(128, "--new-tokens", min=2, help="batch-1 greedy tokens decoded"),
    ppl_tokens: int = typer.Option(8192, "--ppl-tokens", min=2, help="WikiText-2 test tokens scored (windows of 512)"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="speed measurements per runtime (median)"),
    dtype: str = typer.Option(
        "bfloat16", "--dtype", help="bfloat16 or float32 (float32: fidelity checks; llama.cpp converts to f32)"
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="evaluation data (default $QTOOL_DATA_DIR or the shared assets)"
    ),  # fmt: skip
    json_out: Path | None = typer.Option(None, "--json", help="also write the report here"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Prefill and batch-1 decode tok/s, peak memory, load time and WikiText-2 perplexity from each runtime's own
    logits; each runtime in a process of its own."""
    setup_logging(verbose)
    from qtool.bench import RUNTIMES, run_bench
    from qtool.errors import QtoolError
    from qtool.loading import resolve_source

    if dtype not in ("bfloat16", "float32"):
        raise QtoolError(f"--dtype: {dtype!r} is not bfloat16 or float32")
    names = [r.strip() for r in runtime.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown or not names:
        bad = ", ".join(unknown) or "(none)"
        raise QtoolError(f"--runtime: {bad} is not a runtime; choose from {', '.join(RUNTIMES)}")
    resolve_source(model)  # a missing model is one line, before any child process
    if json_out is not None and not json_out.parent.is_dir():
        raise QtoolError(f"--json: the directory {json_out.parent} does not exist; create it or write elsewhere")
    if baseline is None and not no_baseline:
        baseline = _run_source(Path(model))
    if baseline is not None and not no_baseline:
        resolve_source(baseline)
    settings = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "ppl_tokens": ppl_tokens,
        "repeats": repeats,
        "dtype": dtype,
    }
    report = run_bench(
        model,
        names,
        None if no_baseline else baseline,
        threads,
        str(data_dir) if data_dir else None,
        settings,
        progress=lambda label: err_console.print(f"measuring {label} …", highlight=False),
    )
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(_table(report))


def _run_source(path: Path) -> str | None:
    """A run directory's source model (``run.json``), if it still resolves from here."""
    from qtool.formats.run_dir import RUN_JSON, is_run_dir

    if not path.is_dir() or not is_run_dir(path):
        return None
    source = json.loads((path / RUN_JSON).read_text()).get("model", {}).get("source")
    return source if source and Path(source).exists() else None


def _table(report: dict) -> Table:
    dtype = report["settings"]["dtype"]
    table = Table(title=f"qtool bench: {report['model']} ({report['threads']} thread(s), {dtype})")
    for col in ("runtime", "load s", "prefill tok/s", "decode tok/s", "peak RSS MiB", "WikiText-2 ppl", "notes"):
        table.add_column(col, justify="left" if col == "runtime" else "right", no_wrap=True)
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["label"], f"[red]cannot run: {r['error']}[/]", "", "", "", "", "")
            continue
        table.add_row(r["label"], f"{r['load_s']:.1f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
                      f"{r['peak_rss_mib']:,.0f}", f"{r['ppl']:.4f}", _notes(r))  # fmt: skip
    return table


def _notes(row: dict) -> str:
    if "vllm_cpu_int4_w4a8" in row:
        return f"vLLM {row['version']}, W4A8 {'on' if row['vllm_cpu_int4_w4a8'] == '1' else 'off'}"
    if "gguf_type" in row:
        return f"{row['version']}, GGUF {row['gguf_type']}"
    return f"{row['kernel_linears']} linears on int kernels" if row.get("kernel_linears") else ""
