"""The description of what runs online in a packed model, next to its weights: the ``qtool`` section of
``config.json`` and the ``qtool_online.safetensors`` file of stored rotation matrices.

``{"version": 1, "online": {"inputs": {module: entry}, "attention": {module: entry}}}`` with
``entry = {"rotation": {"kind": "hadamard" | "matrix", "size": n} | null, "quant": QuantArgs JSON | null}``:
per linear, the input rotation and dynamic quantizer of its ``InputHook``; per attention module, the query/key
rotation (R3) and the KV-cache quantizer of its ``AttentionState`` (``qtool.models.online``). A ``matrix`` rotation
is stored in the tensors file under ``<module>.rotation``; a static per-channel input quantizer's parameters under
``<module>.input_scale`` (and ``<module>.input_zero_point``). Static per-tensor ones are compressed-tensors
parameters of the linear in the weight shards (``input_scale``), which the checkpoint reader sets on the hook. An
input shift (OutlierTune's symmetrization) is ``"shift": true`` in the entry and ``<module>.input_shift`` in the
tensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch import Tensor

from qtool.algorithms.actquant import StaticScale
from qtool.artifacts import save_tensors
from qtool.models.online import AttentionState, InputHook, OnlineRotation, attention_state, input_hook
from qtool.schemes import QuantArgs

QTOOL_SECTION = "qtool"
ONLINE_TENSORS = "qtool_online.safetensors"
VERSION = 1


def describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Everything attached to ``model``: ``({"inputs": {module: {...}}, "attention": {module: {...}}}, matrices)``.

    Stored rotation matrices are returned separately (``<module>.rotation`` keys) for a safetensors file."""
    inputs, attention, matrices = {}, {}, {}
    for name, module in model.named_modules():
        hook: InputHook | None = getattr(module, "qtool_input", None)
        if hook is not None and (hook.rotation or hook.quant or hook.shift is not None):
            inputs[name] = _entry(name, hook.rotation, hook.quant, matrices)
            if hook.shift is not None:
                inputs[name]["shift"] = True
                matrices[f"{name}.input_shift"] = hook.shift.detach().clone()
            if hook.quant is not None and hook.quant.static and hook.quant.granularity == "channel":
                if hook.static is None:
                    raise ValueError(f"{name}: static input quantizer without calibrated scales")
                matrices[f"{name}.input_scale"] = hook.static.scale.detach().clone()
                if hook.static.zero_point is not None:
                    matrices[f"{name}.input_zero_point"] = hook.static.zero_point.detach().clone()
        state: AttentionState | None = getattr(module, "qtool_attention", None)
        if state is not None and (state.qk_rotation or state.kv_quant):
            attention[name] = _entry(name, state.qk_rotation, state.kv_quant, matrices)
    return {"inputs": inputs, "attention": attention}, matrices


def _entry(name: str, rotation: OnlineRotation | None, quant: QuantArgs | None, matrices: dict) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "rotation": rotation.describe() if rotation else None,
        "quant": quant.model_dump(mode="json") if quant else None,
    }
    if rotation is not None and rotation.kind == "matrix":
        # one copy per module: modules share one rotation object, and safetensors refuses tensors that share memory
        matrices[f"{name}.rotation"] = rotation.matrix.detach().clone(memory_format=torch.contiguous_format)
    return entry


def attach(model: nn.Module, description: dict[str, Any], matrices: dict[str, Tensor]) -> None:
    """Re-create ``describe``'s hooks and attention states on ``model``."""
    for name, entry in description.get("inputs", {}).items():
        hook = input_hook(model.get_submodule(name))
        hook.rotation = _rotation(name, entry["rotation"], matrices)
        hook.quant = QuantArgs.model_validate(entry["quant"]) if entry["quant"] else None
        if entry.get("shift"):
            hook.shift = matrices[f"{name}.input_shift"]
        if f"{name}.input_scale" in matrices:
            hook.static = StaticScale(matrices[f"{name}.input_scale"], matrices.get(f"{name}.input_zero_point"))
    for name, entry in description.get("attention", {}).items():
        state = attention_state(model, model.get_submodule(name))
        state.qk_rotation = _rotation(name, entry["rotation"], matrices)
        state.kv_quant = QuantArgs.model_validate(entry["quant"]) if entry["quant"] else None


def _rotation(name: str, entry: dict[str, Any] | None, matrices: dict[str, Tensor]) -> OnlineRotation | None:
    if entry is None:
        return None
    matrix = matrices[f"{name}.rotation"] if entry["kind"] == "matrix" else None
    return OnlineRotation(entry["kind"], int(entry["size"]), matrix)


def write_online(out: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Add the ``qtool`` section to ``config`` (the dict about to become ``config.json``) and write the tensors
    file, when anything runs online in ``model``."""
    online, matrices = describe(model)
    if online["inputs"] or online["attention"]:
        config[QTOOL_SECTION] = {"version": VERSION, "online": online}
        if matrices:
            save_tensors(out / ONLINE_TENSORS, matrices, metadata={"format": "pt"})


def read_online(model: nn.Module, path: Path, section: dict[str, Any] | None) -> bool:
    """Attach the online pieces that ``section`` (config.json's ``qtool`` section) describes; False without one."""
    if not section:
        return False
    if section.get("online"):  # a section may carry only other qtool facts (sparse outliers)
        matrices = load_file(str(path / ONLINE_TENSORS)) if (path / ONLINE_TENSORS).is_file() else {}
        attach(model, section["online"], matrices)
    return True
