"""Observers: statistics of a decoder layer's inputs gathered through hooks during a ``LayerWalker`` step.

Each observer hooks the first linear that reads an edge's input (``ArchSpec.edges``; linears reading one edge see
one tensor, so one hook and one accumulator serve them all), sees the input as the linear does (after any online
rotation or quantizer attached to it: the hooks run after ``qtool.models.online.InputHook``), and can ``merge``
another observer of the same layer, so shards of the calibration windows (processes, machines) add up exactly.

- ``HessianObserver``: ``XᵀX`` per edge (GPTQ, OSTQuant's error shares), as ``gptq.HessianAccumulator``s;
- ``AbsmaxObserver``: per-channel ``max |x|`` per edge (SmoothQuant);
- ``MeanAbsObserver``: per-channel mean ``|x|`` per edge (AWQ);
- ``RangeObserver``: per-channel min and max per edge and a strided token sample (static activation scales);
- ``InputStatsObserver``: kurtosis, channel absmax, max/median ratio and QSUR per edge (outlier statistics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from qtool.algorithms.gptq import HessianAccumulator
from qtool.algorithms.outlier_metrics import ActivationStats
from qtool.arch import ArchSpec, Edge
from qtool.models.walker import StopLayer


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
        self.acc: dict[str, Any] = {}  # edge name -> the subclass's accumulator

    def _new(self, linear: nn.Module):
        raise NotImplementedError

    def _add(self, acc, x: Tensor) -> None:
        raise NotImplementedError

    def edge_of(self, linear: str) -> str:
        """The observed edge whose input ``linear`` reads."""
        return next(e for e, members in self.members.items() if linear in members)

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
        return self.acc[self.edge_of(linear)]

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

    def _new(self, linear: nn.Module) -> _Absmax:
        return _Absmax()

    def _add(self, acc: _Absmax, x: Tensor) -> None:
        acc.update(x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double())

    def absmax(self, edge: str) -> Tensor:
        return self.acc[edge].value

    def merge(self, other: AbsmaxObserver) -> None:
        for edge, acc in other.acc.items():
            self.acc.setdefault(edge, _Absmax()).update(acc.value)


class MeanAbsObserver(_EdgeObserver):
    """Per-channel mean ``|x|`` (float64 ``[in]``, over every token) at the input of each of ``edges``."""

    def __init__(self, spec: ArchSpec, edges: Iterable[Edge]):
        super().__init__(spec, edges)

    def _new(self, linear: nn.Module) -> list:
        return [torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device), 0]

    def _add(self, acc: list, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        acc[0] += x.abs().double().sum(dim=0)
        acc[1] += x.shape[0]

    def mean_abs(self, edge: str) -> Tensor:
        total, count = self.acc[edge]
        return total / max(count, 1)

    def merge(self, other: MeanAbsObserver) -> None:
        for edge, (total, count) in other.acc.items():
            mine = self.acc.setdefault(edge, [torch.zeros_like(total), 0])
            mine[0] += total.to(mine[0].device)
            mine[1] += count


class RangeObserver(_EdgeObserver):
    """Per-channel minimum and maximum (float32 ``[in]``, over every token) at the input of each of ``linears``,
    and with ``stride`` every ``stride``-th token of each call (``sample``) for the observers that need values.
    With ``stop`` (one observed edge) each window's forward ends at that edge's input."""

    def __init__(self, spec: ArchSpec, linears: Iterable[str], stride: int | None = None, stop: bool = False):
        super().__init__(spec, spec.edges, linears)
        self.stride = stride
        self.stop = stop  # end each window's forward once observed (``StopLayer``): nothing after it is needed

    def _new(self, linear: nn.Module) -> dict:
        return {"lo": None, "hi": None, "sample": []}

    def _add(self, acc: dict, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        acc["lo"] = lo if acc["lo"] is None else torch.minimum(acc["lo"], lo)
        acc["hi"] = hi if acc["hi"] is None else torch.maximum(acc["hi"], hi)
        if self.stride is not None:
            acc["sample"].append(x[:: self.stride].clone())
        if self.stop:
            raise StopLayer

    def range(self, linear: str) -> tuple[Tensor, Tensor]:
        acc = self.acc[self.edge_of(linear)]
        return acc["lo"], acc["hi"]

    def sample(self, linear: str) -> Tensor | None:
        parts = self.acc[self.edge_of(linear)]["sample"]
        return torch.cat(parts) if parts else None

    def merge(self, other: RangeObserver) -> None:
        for edge, acc in other.acc.items():
            mine = self.acc.setdefault(edge, {"lo": None, "hi": None, "sample": []})
            for key, pick in (("lo", torch.minimum), ("hi", torch.maximum)):
                mine[key] = acc[key] if mine[key] is None else pick(mine[key], acc[key].to(mine[key].device))
            mine["sample"].extend(acc["sample"])


@dataclass
class _Absmax:
    value: Tensor | None = None

    def update(self, m: Tensor) -> None:
        self.value = m if self.value is None else torch.maximum(self.value, m.to(self.value.device))


class InputStatsObserver(_EdgeObserver):
    """Outlier statistics (``ActivationStats``) of every edge's input; the covariance behind QSUR uses the first
    ``covariance_tokens`` rows only (a d×d product per row is the expensive part; 0: no activation QSUR)."""

    def __init__(self, spec: ArchSpec, covariance_tokens: int = 4096):
        super().__init__(spec, spec.edges)
        self.covariance_tokens = covariance_tokens

    def _new(self, linear: nn.Module) -> _Tap:
        return _Tap.empty(linear.in_features, self.covariance_tokens)

    def _add(self, tap: _Tap, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        tap.stats.add(x)
        if tap.cov is not None and tap.budget > 0:
            tap.cov.add(x[: tap.budget])
            tap.budget -= min(tap.budget, x.shape[0])

    def finalize(self, edge: str) -> dict:
        tap = self.acc[edge]
        out = tap.stats.finalize()
        out["qsur"] = tap.cov.finalize()["qsur"] if tap.cov is not None else None
        return out

    def channel_absmax(self, edge: str) -> Tensor:
        return self.acc[edge].stats.channel_absmax

    def merge(self, other: InputStatsObserver) -> None:
        """Each shard's covariance comes from its own first ``covariance_tokens`` rows."""
        for edge, tap in other.acc.items():
            mine = self.acc.setdefault(edge, _Tap.empty(tap.stats.d, self.covariance_tokens))
            mine.stats.merge(tap.stats)
            if mine.cov is not None and tap.cov is not None:
                mine.cov.merge(tap.cov)


@dataclass
class _Tap:
    """One edge's statistics: all rows (``stats``) and the first rows up to the covariance budget (``cov``)."""

    stats: ActivationStats
    cov: ActivationStats | None
    budget: int

    @classmethod
    def empty(cls, d: int, covariance_tokens: int) -> _Tap:
        cov = ActivationStats(d, covariance=True) if covariance_tokens else None
        return cls(ActivationStats(d, covariance=False), cov, covariance_tokens)


class ModuleCallsObserver:
    """The calls (positional and keyword arguments, one per calibration window) that named submodules of a layer
    receive, so their outputs can be recomputed with other weights (AdaDim's sub-block criterion). Holds the
    inputs of every window: memory is windows x tokens x features per module."""

    def __init__(self, modules: Iterable[str], limit: int | None = None):
        self.calls: dict[str, list[tuple[tuple, dict]]] = {m: [] for m in modules}
        self.limit = limit  # keep the first ``limit`` calls of each module (None: all)

    def attach(self, layer: nn.Module) -> list[RemovableHandle]:
        handles = []
        for name, calls in self.calls.items():

            def hook(_m, args, kwargs, calls=calls):
                if self.limit is None or len(calls) < self.limit:
                    calls.append((args, dict(kwargs)))

            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    @torch.no_grad()
    def outputs(self, layer: nn.Module, name: str, dtype: torch.dtype | None = None) -> list[Tensor]:
        """The module's output for every recorded call, with its current weights; with ``dtype``, the module and
        the calls' floating-point tensors are cast to it for the computation (each parameter and buffer gets its
        own dtype back after)."""
        module = layer.get_submodule(name)
        calls = self.calls[name]
        tensors = [*module.parameters(), *module.buffers()]
        dtypes = [t.dtype for t in tensors]
        if dtype is not None:
            for t in tensors:
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
            calls = [(_cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}) for args, kwargs in calls]
        try:
            outs = []
            for args, kwargs in calls:
                out = module(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
            return outs
        finally:
            for t, d in zip(tensors, dtypes, strict=True):
                if t.dtype != d:
                    t.data = t.data.to(d)

    def merge(self, other: ModuleCallsObserver) -> None:
        for name, calls in other.calls.items():
            self.calls.setdefault(name, []).extend(calls)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in ``x`` (nested tuples and lists included) cast to ``dtype``; anything else as is."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    return x
