"""The quantize stage's layer checkpoints: ``layers/NNN.safetensors``, one per finished decoder layer.

Per quantized linear (``name`` relative to the layer, e.g. ``mlp.down_proj``): tensors ``<name>.q`` int8
``[out, in]``, ``<name>.scale`` and, for asymmetric grids, ``<name>.zero_point`` (shapes of
``qtool.algorithms.quantizer.QuantizedWeight``); a linear with weights kept in 16 bits adds
``<name>.outlier_rows`` / ``.outlier_cols`` (int32 ``[k]``) and ``.outlier_values`` (float16/bfloat16 ``[k]``).
Parameters of the layer that the method changed besides its quantized weights (AWQ's scales folded into a norm gain
or a bias) are stored whole as ``param:<name>`` (e.g. ``param:input_layernorm.weight``) and set back on resume.
Static input quantizers calibrated on the layer store ``input:<name>.scale`` (float32) and, asymmetric,
``input:<name>.zero_point`` (int8), their ``QuantArgs`` in the metadata's ``inputs``.
Metadata: ``format`` (``LAYER_FORMAT``), ``args`` (each linear's
``QuantArgs`` as JSON) and ``facts`` (each linear's ``LinearFacts``: which method made it and how its columns were
ordered), so that pack reads everything it writes from here and never re-derives it from the recipe.

Written atomically (``save_tensors``); a file is either whole or absent. Its sha256 goes to ``NNN.sha256.json``
right after it, so a layer file edited or damaged while the stage is still uncommitted (no manifest covers it yet)
is recomputed on resume instead of reused. A file without ``facts`` (or without its checksum) predates them and is
refused by ``read_layer`` (``ArtifactError``): the quantize stage then recomputes that layer, pack names
``--from-stage quantize``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qtool.algorithms.actquant import StaticScale
from qtool.algorithms.quantizer import QuantizedWeight, SparseOutliers
from qtool.artifacts import load_tensors, save_tensors, sha256_file, write_json
from qtool.errors import ArtifactError
from qtool.schemes import QuantArgs

LAYERS = "layers"
LAYER_FORMAT = "qtool.layer/2"
PARAM = "param:"
INPUT = "input:"


@dataclass(frozen=True)
class LinearFacts:
    """What the weight method tells the packer about one linear beyond its integers and ``QuantArgs``.

    ``actorder``: compressed-tensors' activation-order tag (``"weight"``: columns were visited in ``diag(H)`` order
    with static groups, which changes nothing in the stored layout), or ``None``."""

    method: str
    actorder: str | None = None


@dataclass
class LayerCheckpoint:
    """One decoder layer's quantized linears and their facts, keyed by linear name, the other parameters the
    method changed (``params``: full name in the layer -> value) and the static input quantizers calibrated on it
    (``inputs``: linear name -> its arguments and parameters)."""

    weights: dict[str, QuantizedWeight]
    facts: dict[str, LinearFacts]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, tuple[QuantArgs, StaticScale]] = field(default_factory=dict)


def layer_file(layers_dir: Path, index: int) -> Path:
    return layers_dir / f"{index:03d}.safetensors"


def _checksum_file(layers_dir: Path, index: int) -> Path:
    return layers_dir / f"{index:03d}.sha256.json"


def write_layer(layers_dir: Path, index: int, checkpoint: LayerCheckpoint) -> None:
    tensors = {}
    for name, qw in checkpoint.weights.items():
        tensors[f"{name}.q"] = qw.q
        tensors[f"{name}.scale"] = qw.scale
        if qw.zero_point is not None:
            tensors[f"{name}.zero_point"] = qw.zero_point
        if qw.outliers is not None:
            tensors[f"{name}.outlier_rows"] = qw.outliers.rows.to(torch.int32)
            tensors[f"{name}.outlier_cols"] = qw.outliers.cols.to(torch.int32)
            tensors[f"{name}.outlier_values"] = qw.outliers.values.contiguous()
    for name, value in checkpoint.params.items():
        tensors[f"{PARAM}{name}"] = value.detach().contiguous()
    for name, (_, p) in checkpoint.inputs.items():
        # linears that read one input share one StaticScale; safetensors wants one copy per key
        tensors[f"{INPUT}{name}.scale"] = p.scale.clone()
        if p.zero_point is not None:
            tensors[f"{INPUT}{name}.zero_point"] = p.zero_point.clone()
    metadata = {
        "format": LAYER_FORMAT,
        "args": json.dumps(
            {n: qw.args.model_dump(mode="json") for n, qw in checkpoint.weights.items()}, sort_keys=True
        ),
        "facts": json.dumps({n: asdict(f) for n, f in checkpoint.facts.items()}, sort_keys=True),
    }
    if checkpoint.inputs:
        metadata["inputs"] = json.dumps(
            {n: a.model_dump(mode="json") for n, (a, _) in checkpoint.inputs.items()}, sort_keys=True
        )
    save_tensors(layer_file(layers_dir, index), tensors, metadata=metadata)
    write_json(_checksum_file(layers_dir, index), {"sha256": sha256_file(layer_file(layers_dir, index))})


def read_layer(layers_dir: Path, index: int) -> LayerCheckpoint:
    """Raises ``ArtifactError`` naming the file when it is unreadable or predates ``LAYER_FORMAT``."""
    from safetensors import safe_open

    path = layer_file(layers_dir, index)
    try:
        expected = json.loads(_checksum_file(layers_dir, index).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(
            f"{path} has no readable checksum ({type(e).__name__}); rerun with --from-stage quantize"
        ) from None
    if sha256_file(path) != expected:
        raise ArtifactError(f"{path} does not match its checksum (edited or damaged); rerun with --from-stage quantize")
    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != LAYER_FORMAT or "facts" not in meta:
        raise ArtifactError(
            f"{path} was written by an older qtool (no {LAYER_FORMAT} facts); rerun with --from-stage quantize"
        )
    args, facts = json.loads(meta["args"]), json.loads(meta["facts"])
    weights = {
        name: QuantizedWeight(
            q=tensors[f"{name}.q"],
            scale=tensors[f"{name}.scale"],
            zero_point=tensors.get(f"{name}.zero_point"),
            args=QuantArgs.model_validate(a),
            outliers=_outliers(tensors, name),
        )
        for name, a in args.items()
    }
    params = {k[len(PARAM) :]: v for k, v in tensors.items() if k.startswith(PARAM)}
    inputs = {
        name: (
            QuantArgs.model_validate(a),
            StaticScale(tensors[f"{INPUT}{name}.scale"], tensors.get(f"{INPUT}{name}.zero_point")),
        )
        for name, a in json.loads(meta.get("inputs", "{}")).items()
    }
    return LayerCheckpoint(weights, {name: LinearFacts(**f) for name, f in facts.items()}, params, inputs)


def _outliers(tensors: dict, name: str) -> SparseOutliers | None:
    if f"{name}.outlier_values" not in tensors:
        return None
    rows, cols = (tensors[f"{name}.outlier_{k}"].to(torch.int64) for k in ("rows", "cols"))
    return SparseOutliers(rows, cols, tensors[f"{name}.outlier_values"])


def finished_layers(layers_dir: Path) -> int:
    """How many layer files an interrupted quantize stage left (for ``qtool status``)."""
    return len(list(layers_dir.glob("*.safetensors"))) if layers_dir.is_dir() else 0
