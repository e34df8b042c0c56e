"""What a method is for the stages that offer several: a config class (its ``method:`` literal tags the recipe
section) and a handler that states the method's facts and does its work.

Facts are class attributes, read by the stage, the pipeline, validation, ``qtool stages`` and the benchmarks
instead of comparing method names. A ``recipe`` argument is a ``qtool.recipe.Recipe`` (typed ``Any``: the recipe
module is built from these tables, so importing it here would close a loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qtool.algorithms.quantizer import QuantizedWeight
from qtool.formats.layers import LinearFacts

if TYPE_CHECKING:
    from qtool.arch import ArchSpec
    from qtool.context import StageConfig, StageContext
    from qtool.models.walker import LayerStep
    from qtool.targets import Target


@dataclass
class LayerResult:
    """One decoder layer quantized: ``weights`` and ``facts`` per linear name, ``errors``
    (``"<layer>.<linear>"``: the method's relative output error, for the stage summary), ``params`` (other
    parameters of the layer the method changed, by name in the layer: AWQ's folded norm gains; checkpointed and set
    back on resume) and ``details`` (per-layer facts for the stage summary, e.g. AWQ's chosen α)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    facts: dict[str, LinearFacts] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class WeightMethod:
    """A method of the quantize stage: turns one decoder layer's targeted linears into integers.

    - ``needs_data``: the stage walks the calibration windows through the layers and hands ``quantize_layer`` a
      ``LayerStep`` whose ``run`` feeds them (``False``: the step has no inputs, nothing is run);
    - ``needs_hessian``: the method reads input Hessians (``qtool.models.observers.HessianObserver``);
    - ``prepare``: whole-model work before the layer walk (GWQ's gradient pass), kept in the stage directory so a
      resumed run does not redo it; what it returns reaches every ``quantize_layer`` call as ``prep``;
    - what it writes: ``LayerResult`` -> one layer checkpoint (``qtool.formats.layers``).
    """

    config: ClassVar[type[StageConfig]]
    needs_data: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def prepare(self, cfg: Any, ctx: StageContext, plan: list[list[Target]]) -> Any:
        """Run before the walk on the full-precision (transformed) model, with ``ctx.out`` the stage's uncommitted
        directory; ``plan[i]``: layer ``i``'s targets. Nothing by default."""
        return None

    def quantize_layer(
        self, cfg: Any, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        raise NotImplementedError

    def check_plan(self, cfg: Any, scheme: Any, spec: ArchSpec, layers: Any, plan: list[list[Target]]) -> None:
        """Raise ``QtoolError`` (naming the field, the linear and a fix) when the method cannot quantize the planned
        targets of this model; ``layers``: the decoder layers (shapes only, on ``meta`` in ``qtool validate``).
        Called before anything is written. Nothing by default."""
        return None

    def error_feedback(self, cfg: Any) -> dict[str, Any] | None:
        """For methods that spread each column's rounding error over later columns through the Hessian (GPTQ):
        their damping and column order, which OSTQuant's ``weight_error: gptq`` student mirrors. ``None``: the
        method leaves each weight's rounding error where it is."""
        return None


class TransformMethod:
    """A method of the transform stage: an equivalent transform of the model, stored and replayed.

    - ``changes_model``: ``False`` for ``none`` (the stage then has nothing to show before/after);
    - ``artifacts``: the files ``run`` writes in the stage directory;
    - ``fingerprint_sections``: recipe sections besides ``transform`` its result depends on (OSTQuant trains against
      the scheme's quantizers: a scheme change retrains);
    - ``draws_from_seed(cfg)``: the result depends on a seed (benchmarks repeat such rows over seeds).
    """

    config: ClassVar[type[StageConfig]]
    changes_model: ClassVar[bool] = True
    artifacts: ClassVar[tuple[str, ...]] = ()
    fingerprint_sections: ClassVar[tuple[str, ...]] = ()

    def run(self, ctx: StageContext, cfg: Any) -> dict[str, Any]:
        """Compute the transform, write ``artifacts`` under ``ctx.out``, leave ``ctx.model`` transformed; returns
        the summary (with ``method`` and, optionally, a one-line ``headline``)."""
        raise NotImplementedError

    def apply(self, ctx: StageContext, cfg: Any) -> None:
        """Replay the committed artifacts onto a freshly loaded ``ctx.model``."""
        return None

    def draws_from_seed(self, cfg: Any) -> bool:
        return False

    def check_recipe(self, recipe: Any) -> None:
        """Raise ``ValueError`` (message starting with the field's dotted path) on a combination of recipe sections
        this method cannot run; called while the recipe validates."""
        return None

    def check_fit(self, recipe: Any, spec: ArchSpec, config: Any = None) -> None:
        """Raise ``QtoolError`` when this machine or model (``config``: its transformers config) cannot run the
        method (``qtool validate``)."""
        return None
