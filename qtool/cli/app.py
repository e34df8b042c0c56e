"""The Typer application: wires command groups, logging and error handling. Only qtool/cli prints."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="qtool",
    help="Compress large language models with YAML recipes: calibrate → outliers → transform → quantize → pack → "
    "evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def setup_logging(verbose: bool) -> None:
    """Library loggers go to stderr through Rich; third-party progress bars are silenced."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("qtool").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own tqdm bar
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


class ProgressBars(Progress):
    """Rich progress bars created on first use, keyed by name: pass ``bars.report`` as a ``progress(task, done,
    total)`` callback to library code."""

    def __init__(self, out: Console):
        super().__init__(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        )
        self._ids: dict[str, int] = {}

    def report(self, task: str, done: int, total: int) -> None:
        if task not in self._ids:
            self._ids[task] = self.add_task(task, total=total)
        self.update(self._ids[task], completed=done, total=total)


def one_line(message: object) -> str:
    """A message as one line of literal text: whitespace folded (the CLI's contract: one line per error, whatever
    a library put in the message) and Rich markup escaped (``[down_prj]`` is text, not a style tag)."""
    return escape(" ".join(str(message).split()))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
