"""The compressed-tensors checkpoint reader: load a checkpoint (``pack-quantized``, ``int-quantized``,
``naive-quantized``) that qtool (or llm-compressor) wrote, decompressed, with what runs online re-attached.

transformers + compressed-tensors load symmetric checkpoints, but (transformers 5.23, compressed-tensors 0.20) reject
asymmetric group/channel ones in both the compressed and the ``dequantize=True`` path (packed zero points,
llm-compressor issue #1618). qtool therefore decompresses with its own unpacking, which tests prove bit-identical
to compressed-tensors' decompressor: build the model skeleton without weight init, turn every quantized linear's
``weight_packed`` (or int8 ``weight``)/``weight_scale``/``weight_zero_point`` back into a dense weight, and load the
state dict. The ``qtool`` section of config.json (online rotations, dynamic activation and KV-cache quantizers,
``qtool.models.online``) is attached again, so the loaded model computes what the pipeline's fake-quant model did.
Checkpoints from other tools that quantize input activations get their quantizers from their config groups
(dynamic, or static per tensor with the linears' ``input_scale``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qtool.algorithms.actquant import StaticScale
from qtool.errors import QtoolError
from qtool.formats.compressed_tensors.layout import decompress_linears, input_quant_of
from qtool.formats.hf_checkpoint import read_state
from qtool.formats.online import read_online
from qtool.models.online import input_hook

log = logging.getLogger(__name__)


def detect(config) -> bool:
    """Whether a transformers config describes a compressed-tensors checkpoint."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method) in ("compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS")


def load_packed(
    path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False, kernels: bool = False
) -> torch.nn.Module:
    """A model from a compressed-tensors checkpoint directory; eval mode, no gradients. Dense (every linear
    decompressed), or with ``kernels`` every linear an integer kernel can hold stays packed and runs on it
    (``qtool.models.kernels``; the others are decompressed)."""
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
    state = read_state(path)
    linear_types = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    static = {
        k.removesuffix(".input_scale"): StaticScale(
            state.pop(k).float().reshape(1), _zero_point(state.pop(k.replace("input_scale", "input_zero_point"), None))
        )
        for k in [k for k in state if k.endswith(".input_scale")]
    }
    on_kernels: dict[str, torch.nn.Module] = {}

    def take(name: str, qw) -> bool:  # converted as it is read: one linear's unpacked integers in memory at a time
        from qtool.models.kernels import kernel_for

        cls, _ = kernel_for(qw, input_quant_of(name, linear_types, qc))
        if cls is not None:
            on_kernels[name] = cls.from_quantized(qw)
        return cls is not None

    decompress_linears(state, qc, linear_types, dtype, take if kernels else None)
    # assign: the loaded tensors become the parameters (the dense linears the kernels replace are never touched).
    # Each is copied once, one at a time, into torch's own 64-byte-aligned memory: safetensors' buffers are only
    # 8-byte aligned, and some CPU kernels assume more (aten's int8 weight kernel segfaults on them)
    for k in list(state):
        state[k] = state[k].to(dtype, copy=True) if state[k].is_floating_point() else state[k].clone()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    missing = [k for k in missing if not _tied(model, k) and k.removesuffix(".weight") not in on_kernels]
    if missing or unexpected:
        raise QtoolError(
            f"model: {path} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-pack it with qtool quantize --from-stage pack"
        )
    model.tie_weights()
    for name, module in on_kernels.items():  # before the online pieces, which hook whichever module holds the name
        _swap(model, name, module)
    if on_kernels:
        log.info("model: %d quantized linears run on integer kernels", len(on_kernels))
    model.eval().requires_grad_(False)
    if not read_online(model, path, online):
        for name in linear_types:  # a foreign checkpoint: simulate its input quantization
            quant = input_quant_of(name, linear_types, qc)
            if quant is not None:
                input_hook(model.get_submodule(name)).quant = quant
    _set_static(model, static, path)
    for module in on_kernels.values():  # W8A8: int8 x int8 products instead of fake-quantized inputs
        hook = getattr(module, "qtool_input", None)
        if hook is not None and hook.quant is not None and hasattr(module, "take_input_quant"):
            if hook.learned_clip is None and module.take_input_quant(hook.quant):
                hook.quant = None
    return model


def _zero_point(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int8).reshape(1)


def _set_static(model: torch.nn.Module, static: dict[str, StaticScale], path: Path) -> None:
    """Give every static input quantizer its stored parameters; one without them is a damaged checkpoint."""
    for name, module in model.named_modules():
        hook = getattr(module, "qtool_input", None)
        if hook is None or hook.quant is None or hook.quant.dynamic:
            continue
        if name in static:
            hook.static = static.pop(name)
        elif hook.static is None:
            raise QtoolError(
                f"model: {path}: {name} quantizes its input statically but has no input_scale; the checkpoint is "
                "damaged, re-pack it with qtool quantize --from-stage pack"
            )
    if static:
        log.warning("model: input_scale of %d linears without a static input quantizer ignored", len(static))


def _tied(model: torch.nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _swap(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put kernel ``module`` in place of linear ``name``, with the bias the checkpoint loaded into the linear."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    if old.bias is not None:
        module.bias = torch.nn.Parameter(old.bias.detach(), requires_grad=False)
    setattr(owner, child, module)
