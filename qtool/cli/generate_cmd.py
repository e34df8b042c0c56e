"""``qtool generate``: greedy text from a model, a packed checkpoint or a run's packed model, streamed; packed
linears run on qtool's integer kernels (``qtool.models.kernels``) unless ``--dense``."""

from __future__ import annotations

import typer

from qtool.cli.app import console, err_console, setup_logging


def register(app: typer.Typer) -> None:
    app.command()(generate)


def generate(
    model: str = typer.Argument(..., help="HF model dir, .gguf file, hub id, or a run directory"),
    prompt: str = typer.Argument(..., help="the prompt (a user turn of the chat template when the model has one)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="tokens to generate at most"),
    dense: bool = typer.Option(
        False,
        "--dense",
        help="decompress every linear (the reference path) instead of running packed ones on integer kernels",
    ),  # fmt: skip
    chat: bool = typer.Option(True, "--chat/--no-chat", help="apply the tokenizer's chat template"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 (the kernels' activations), float32 or float16"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="tokenizer dir/hub id, if not the model's"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Greedy decoding, streamed to stdout; the timing (prompt tokens, prefill and decode tok/s) goes to stderr."""
    setup_logging(verbose)
    from qtool.errors import QtoolError
    from qtool.generate import greedy
    from qtool.loading import DTYPES, load_model, resolve_source

    if dtype not in DTYPES or dtype == "float64":
        raise QtoolError(f"--dtype: {dtype} is not one of bfloat16, float32, float16")
    src = resolve_source(model, tokenizer)
    lm, tok = load_model(src, dtype, kernels=not dense)
    out = greedy(lm, tok, prompt, max_new_tokens, chat,
                 on_text=lambda t: console.print(t, end="", markup=False, highlight=False, soft_wrap=True))  # fmt: skip
    console.print()
    n = len(out.tokens)
    decode = f"{(n - 1) / out.decode_s:.1f} tok/s" if n > 1 and out.decode_s > 0 else "-"
    err_console.print(
        f"{out.prompt_tokens} prompt tokens, prefill {out.prefill_s:.2f} s; {n} new tokens, decode {decode}",
        highlight=False,
    )
