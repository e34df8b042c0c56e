"""Registers every command group on the app (imported once by ``qtool.cli.app.main``)."""

from qtool.cli import eval_cmd, inspect_cmd, quantize_cmd, regress_cmd
from qtool.cli.app import app

quantize_cmd.register(app)
eval_cmd.register(app)
regress_cmd.register(app)
inspect_cmd.register(app)
