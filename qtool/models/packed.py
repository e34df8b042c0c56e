"""Load a compressed-tensors checkpoint (``pack-quantized``, ``int-quantized``, ``naive-quantized``) that qtool (or
llm-compressor) wrote, decompressed, with what runs online re-attached.

transformers + compressed-tensors load symmetric checkpoints, but (transformers 5.23, compressed-tensors 0.20) reject
asymmetric group/channel ones in both the compressed and the ``dequantize=True`` path (packed zero points,
llm-compressor issue #1618). qtool therefore decompresses with its own unpacking, which tests prove bit-identical
to compressed-tensors' decompressor: build the model skeleton without weight init, turn every quantized linear's
``weight_packed`` (or int8 ``weight``)/``weight_scale``/``weight_zero_point`` back into a dense weight, and load the
state dict. The ``qtool`` section of config.json (online rotations, dynamic activation and KV-cache quantizers,
``qtool.models.online``) is attached again, so the loaded model computes what the pipeline's fake-quant model did.
Checkpoints from other tools that quantize input activations get dynamic quantizers from their config groups.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from qtool.algorithms.packing import unpack_from_int32
from qtool.algorithms.quantizer import QuantizedWeight
from qtool.errors import QtoolError
from qtool.schemes import QuantArgs

log = logging.getLogger(__name__)


def load_packed_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """A dense model from a compressed-tensors checkpoint directory; eval mode, no gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    online = getattr(config, "qtool", None)
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = _read_state(path)
    linear_types = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for prefix in sorted(k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")):
        args = _group_for(prefix, linear_types, qc)["weights"]
        state[f"{prefix}.weight"] = _decompress(state, prefix, _weight_args(args)).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise QtoolError(
            f"model: {path} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-pack it with qtool quantize --from-stage pack"
        )
    model.tie_weights()
    model.eval().requires_grad_(False)
    _attach_online(model, path, online, qc, linear_types)
    return model


def _attach_online(model, path: Path, online: dict | None, qc: dict, linear_types: dict[str, str]) -> None:
    from qtool.models.online import attach, input_hook
    from qtool.stages.pack import ONLINE_TENSORS

    if online:
        matrices = load_file(str(path / ONLINE_TENSORS)) if (path / ONLINE_TENSORS).is_file() else {}
        attach(model, online["online"], matrices)
        return
    for name in linear_types:  # a foreign checkpoint: simulate its dynamic input quantization
        group = _group_for(name, linear_types, qc, required=False)
        act = (group or {}).get("input_activations")
        if act and act.get("dynamic") is True and act.get("type", "int") == "int":
            input_hook(model.get_submodule(name)).quant = QuantArgs(
                bits=act["num_bits"],
                symmetric=act["symmetric"],
                granularity=act["strategy"],
                group_size=act.get("group_size") if act["strategy"] == "group" else None,
                dynamic=True,
            )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def _group_for(prefix: str, linear_types: dict[str, str], qc: dict, required: bool = True) -> dict | None:
    """The config group whose targets match module ``prefix`` (and that ``ignore`` does not exclude)."""
    ignored = any(_hit(p, prefix, linear_types) for p in qc.get("ignore", []))
    for group in qc["config_groups"].values():
        if not ignored and any(_hit(t, prefix, linear_types) for t in group["targets"]):
            return group
    if required:
        raise QtoolError(f"model: {prefix} is quantized but no config group of quantization_config targets it")
    return None


def _hit(target: str, prefix: str, linear_types: dict[str, str]) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], prefix) is not None
    return target in (prefix, linear_types.get(prefix))


def _weight_args(w: dict) -> QuantArgs:
    return QuantArgs(
        bits=w["num_bits"],
        symmetric=w["symmetric"],
        granularity=w["strategy"],
        group_size=w.get("group_size") if w["strategy"] == "group" else None,
    )


def _decompress(state: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> torch.Tensor:
    if f"{prefix}.weight_packed" in state:
        shape = tuple(int(x) for x in state.pop(f"{prefix}.weight_shape").tolist())
        q = unpack_from_int32(state.pop(f"{prefix}.weight_packed"), args.bits, shape)
    else:  # int-quantized / naive-quantized: one int8 per weight
        q = state.pop(f"{prefix}.weight")
    scale = state.pop(f"{prefix}.weight_scale")
    zp = state.pop(f"{prefix}.weight_zero_point", None)
    if zp is not None and zp.dtype == torch.int32:
        zp = unpack_from_int32(zp, args.bits, tuple(scale.shape), packed_dim=0)
    return QuantizedWeight(q=q, scale=scale, zero_point=zp, args=args).dequantize(scale.dtype)


def _tied(model: torch.nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
