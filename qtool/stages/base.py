"""The stage interface: what every pipeline stage is (it runs in a ``qtool.context.StageContext``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from qtool.context import StageContext


class Stage:
    """A pipeline stage.

    - ``run(ctx)`` does the expensive work, writes its files under ``ctx.out`` and returns a JSON-able summary that
      goes into the manifest. It also leaves ``ctx.model`` in the state ``apply`` would produce.
    - ``apply(ctx, manifest)`` replays the stage's effect onto a freshly loaded model from its committed artifacts
      (cheap); this is what makes resume cheap.
    - ``sections`` are the recipe sections that enter the stage's fingerprint (``sections_for`` may add more for
      some methods).
    - ``partial_progress(dir)`` describes checkpoints an interrupted run left (the pipeline asks; it never reads a
      stage's folder itself).
    """

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]
    resumable: ClassVar[bool] = False  # keeps partial work in its uncommitted directory across a kill

    def sections_for(self, recipe: Any) -> tuple[str, ...]:
        return self.sections

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        return None

    def partial_progress(self, partial_dir: Path) -> str | None:
        """What an interrupted run left in ``partial_dir`` (``NN-name.tmp``) that a rerun reuses, in words
        (``qtool status``); ``None``: nothing reusable to report."""
        return None
