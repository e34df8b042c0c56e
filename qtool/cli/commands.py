"""The console-script entry point: registers every command group on the app and runs it."""

import sys

from qtool.cli import bench_cmd, eval_cmd, generate_cmd, inspect_cmd, quantize_cmd, regress_cmd, sensitivity_cmd
from qtool.cli.app import app, err_console, one_line
from qtool.errors import QtoolError

quantize_cmd.register(app)
eval_cmd.register(app)
regress_cmd.register(app)
inspect_cmd.register(app)
sensitivity_cmd.register(app)
generate_cmd.register(app)
bench_cmd.register(app)


def main() -> None:
    """User errors become one line and exit code 2, never a traceback."""
    try:
        app()
    except QtoolError as e:
        err_console.print(f"[bold red]error:[/] {one_line(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; re-run the same command to resume")
        sys.exit(130)
