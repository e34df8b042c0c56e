"""Observers: statistics of a decoder layer's inputs gathered through hooks during a ``LayerWalker`` step.

Each observer hooks the first linear that reads an edge's input (``ArchSpec.edges``; linears reading one edge see
one tensor, so one hook and one accumulator serve them all), sees the input as the linear does (after any online
rotation or quantizer attached to it: the hooks run after ``qtool.models.online.InputHook``), and can ``merge``
another observer of the same layer, so shards of the calibration windows (processes, machines) add up exactly.

- ``HessianObserver``: ``XᵀX`` per edge (GPTQ, OSTQuant's error shares), as ``gptq.HessianAccumulator``s;
- ``AbsmaxObserver``: per-channel ``max |x|`` per edge (SmoothQuant);
- ``InputStatsObserver``: kurtosis, channel absmax, max/median ratio and QSUR per edge (outlier statistics).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from qtool.algorithms.gptq import HessianAccumulator
from qtool.algorithms.outlier_metrics import ActivationStats
from qtool.arch import ArchSpec, Edge


class _EdgeObserver:
    """Base: one accumulator per observed edge, fed by a pre-hook on the edge's first observed linear."""

    def __init__(self, spec: ArchSpec, edges: Iterable[Edge], linears: Iterable[str] | None = None):
        wanted = None if linears is None else set(linears)
        self.spec = spec
        self.hooked: dict[str, str] = {}  # edge name -> linear hooked
        self.members: dict[str, tuple[str, ...]] = {}  # edge name -> linears it serves
        for edge in edges:
            members = tuple(n for n in spec.linears(edge) if wanted is None or n in wanted)
            if members:
                self.hooked[edge.name], self.members[edge.name] = members[0], members
        self.acc: dict[str, object] = {}

    def _new(self, linear: nn.Module):
        raise NotImplementedError

    def _add(self, acc, x: Tensor) -> None:
        raise NotImplementedError

    def attach(self, layer: nn.Module) -> list[RemovableHandle]:
        handles = []
        for edge, name in self.hooked.items():
            linear = layer.get_submodule(name)
            acc = self.acc.get(edge)
            if acc is None:
                acc = self.acc[edge] = self._new(linear)
            handles.append(linear.register_forward_pre_hook(lambda _m, args, acc=acc: self._add(acc, args[0])))
        return handles


class HessianObserver(_EdgeObserver):
    """``XᵀX`` (float64 sum + row count) at the input of each of ``linears`` (names in the layer)."""

    def __init__(self, spec: ArchSpec, linears: Iterable[str]):
        super().__init__(spec, spec.edges, linears)

    def _new(self, linear: nn.Module) -> HessianAccumulator:
        return HessianAccumulator.zeros(linear.in_features, linear.weight.device)

    def _add(self, acc: HessianAccumulator, x: Tensor) -> None:
        acc.add(x)

    def accumulator(self, linear: str) -> HessianAccumulator:
        edge = next(e for e, members in self.members.items() if linear in members)
        return self.acc[edge]

    def hessian(self, linear: str) -> Tensor:
        """GPTQ's ``H = 2 XᵀX / rows`` at ``linear``'s input, ``[in, in]`` float64."""
        return self.accumulator(linear).hessian()

    def merge(self, other: HessianObserver) -> None:
        for edge, acc in other.acc.items():
            if edge in self.acc:
                self.acc[edge].merge(acc)
            else:
                self.acc[edge] = HessianAccumulator(acc.sum.clone(), acc.count)


class AbsmaxObserver(_EdgeObserver):
    """Per-channel ``max |x|`` (float64 ``[in]``) at the input of each of ``edges``."""

    def __init__(self, spec: ArchSpec, edges: Iterable[Edge]):
        super().__init__(spec, edges)

    def _new(self, linear: nn.Module) -> list[Tensor | None]:
        return [None]

    def _add(self, acc: list[Tensor | None], x: Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double()
        acc[0] = m if acc[0] is None else torch.maximum(acc[0], m)

    def absmax(self, edge: str) -> Tensor:
        return self.acc[edge][0]

    def merge(self, other: AbsmaxObserver) -> None:
        for edge, acc in other.acc.items():
            mine = self.acc.setdefault(edge, [None])
            mine[0] = acc[0] if mine[0] is None else torch.maximum(mine[0], acc[0].to(mine[0].device))


class InputStatsObserver(_EdgeObserver):
    """Outlier statistics (``ActivationStats``) of every edge's input; the covariance behind QSUR uses the first
    ``covariance_tokens`` rows only (a d×d product per row is the expensive part; 0: no activation QSUR)."""

    def __init__(self, spec: ArchSpec, covariance_tokens: int = 4096):
        super().__init__(spec, spec.edges)
        self.covariance_tokens = covariance_tokens

    def _new(self, linear: nn.Module) -> list:
        d = linear.in_features
        cov = ActivationStats(d, covariance=True) if self.covariance_tokens else None
        return [ActivationStats(d, covariance=False), cov, self.covariance_tokens]

    def _add(self, acc: list, x: Tensor) -> None:
        stats, cov, budget = acc
        x = x.detach().reshape(-1, x.shape[-1])
        stats.add(x)
        if cov is not None and budget > 0:
            cov.add(x[:budget])
            acc[2] = budget - min(budget, x.shape[0])

    def finalize(self, edge: str) -> dict:
        stats, cov, _ = self.acc[edge]
        out = stats.finalize()
        out["qsur"] = cov.finalize()["qsur"] if cov is not None else None
        return out

    def channel_absmax(self, edge: str) -> Tensor:
        return self.acc[edge][0].channel_absmax

    def merge(self, other: InputStatsObserver) -> None:
        """Each shard's covariance comes from its own first ``covariance_tokens`` rows."""
        for edge, (stats, cov, _) in other.acc.items():
            if edge not in self.acc:
                self.acc[edge] = [ActivationStats(stats.d, covariance=False), None, 0]
                if cov is not None:
                    self.acc[edge][1] = ActivationStats(cov.d, covariance=True)
            mine = self.acc[edge]
            mine[0].merge(stats)
            if cov is not None and mine[1] is not None:
                mine[1].merge(cov)
