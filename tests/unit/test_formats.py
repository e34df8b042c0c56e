"""On-disk contracts: the layer checkpoint carries what pack needs (and refuses files that predate it), the run
directory layout is one definition, and the pack stage's formats are its table's."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from qtool.algorithms.quantizer import rtn_quantize
from qtool.artifacts import save_tensors
from qtool.errors import ArtifactError, QtoolError
from qtool.formats.layers import LayerCheckpoint, LinearFacts, finished_layers, layer_file, read_layer, write_layer
from qtool.formats.registry import PACKED_FORMATS
from qtool.formats.run_dir import STAGE_DIRS, packed_model_dir
from qtool.schemes import QuantArgs


def _weights():
    g = torch.Generator().manual_seed(0)
    sym = QuantArgs(bits=4, granularity="group", group_size=16)
    asym = QuantArgs(bits=3, symmetric=False, granularity="channel")
    return {
        "self_attn.q_proj": rtn_quantize(torch.randn(32, 64, generator=g), sym),
        "mlp.down_proj": rtn_quantize(torch.randn(64, 96, generator=g), asym),
    }


def test_layer_checkpoint_round_trip_keeps_integers_args_and_facts(tmp_path):
    weights = _weights()
    facts = {"self_attn.q_proj": LinearFacts("gptq", actorder="weight"), "mlp.down_proj": LinearFacts("rtn")}
    write_layer(tmp_path, 7, LayerCheckpoint(weights, facts))
    assert layer_file(tmp_path, 7).name == "007.safetensors" and finished_layers(tmp_path) == 1
    back = read_layer(tmp_path, 7)
    assert back.facts == facts
    for name, qw in weights.items():
        got = back.weights[name]
        assert got.args == qw.args and torch.equal(got.q, qw.q) and torch.equal(got.scale, qw.scale)
        assert (got.zero_point is None) == (qw.zero_point is None)
        if qw.zero_point is not None:
            assert torch.equal(got.zero_point, qw.zero_point)


def test_an_edited_layer_checkpoint_is_refused(tmp_path):
    """Issue 20: an uncommitted layer file edited in place was reused on resume (ppl 5.62 instead of 4.40)."""
    write_layer(tmp_path, 0, LayerCheckpoint(_weights(), {n: LinearFacts("rtn") for n in _weights()}))
    data = bytearray(layer_file(tmp_path, 0).read_bytes())
    data[-3] ^= 0x01  # one bit of one integer
    layer_file(tmp_path, 0).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        read_layer(tmp_path, 0)


def test_layer_checkpoint_without_facts_is_refused_naming_the_fix(tmp_path):
    """A file an older qtool wrote (integers and args only): pack would have to guess the column order."""
    weights = _weights()
    tensors = {f"{n}.{k}": getattr(qw, attr) for n, qw in weights.items()
               for k, attr in (("q", "q"), ("scale", "scale")) }  # fmt: skip
    tensors["mlp.down_proj.zero_point"] = weights["mlp.down_proj"].zero_point
    args = {n: qw.args.model_dump(mode="json") for n, qw in weights.items()}
    save_tensors(layer_file(tmp_path, 0), tensors, metadata={"args": json.dumps(args)})
    with pytest.raises(ArtifactError, match="--from-stage quantize"):
        read_layer(tmp_path, 0)


def test_run_directory_layout(tmp_path):
    assert list(STAGE_DIRS.values()) == [
        "01-calibrate", "02-outliers", "03-transform", "04-quantize", "05-pack", "06-evaluate"
    ]  # fmt: skip
    assert packed_model_dir(tmp_path) == tmp_path / "05-pack" / "model"


def test_pack_formats_are_the_writer_table():
    from qtool.stages.pack import PackConfig

    assert typing.get_args(PackConfig.model_fields["format"].annotation) == tuple(PACKED_FORMATS)


def _with_outliers(qw, k: int, seed: int, dtype=torch.float16):
    """``qw`` plus ``k`` random 16-bit outliers at distinct positions."""
    from qtool.algorithms.quantizer import SparseOutliers

    g = torch.Generator().manual_seed(seed)
    out_features, in_features = qw.shape
    flat = torch.randperm(out_features * in_features, generator=g)[:k].sort().values
    values = (torch.randn(k, generator=g) * 5).to(dtype)
    outliers = SparseOutliers(flat // in_features, flat % in_features, values)
    return type(qw)(qw.q, qw.scale, qw.zero_point, qw.args, outliers)


def test_sparse_outliers_csr_round_trip_and_dequantize():
    from qtool.algorithms.quantizer import SparseOutliers

    qw = _with_outliers(_weights()["mlp.down_proj"], 50, seed=1, dtype=torch.bfloat16)
    o = qw.outliers
    csr = o.to_csr(*qw.shape)
    assert csr["row_ptr"].dtype == torch.int32 and csr["col"].dtype == torch.int16 and csr["row_ptr"][-1] == 50
    back = SparseOutliers.from_csr(csr["row_ptr"], csr["col"], csr["value"], qw.shape)
    assert torch.equal(back.rows, o.rows) and torch.equal(back.cols, o.cols) and torch.equal(back.values, o.values)
    dense = type(qw)(qw.q, qw.scale, qw.zero_point, qw.args).dequantize()
    expected = dense.clone()
    expected[o.rows, o.cols] += o.values.float()
    assert torch.equal(qw.dequantize(), expected)
    assert o.bits(*qw.shape) == 50 * 32 + 32 * 65  # int16 index + 16-bit value each, a 32-bit pointer per row
    with pytest.raises(ValueError, match="sparse matrix"):
        SparseOutliers.from_csr(csr["row_ptr"], csr["col"] + 200, csr["value"], qw.shape)
    with pytest.raises(ValueError, match="outside"):
        type(qw)(qw.q, qw.scale, qw.zero_point, qw.args, SparseOutliers(o.rows + 64, o.cols, o.values))


def test_layer_checkpoint_round_trip_keeps_outliers(tmp_path):
    weights = _weights()
    weights["mlp.down_proj"] = _with_outliers(weights["mlp.down_proj"], 60, seed=2)
    write_layer(tmp_path, 0, LayerCheckpoint(weights, {n: LinearFacts("quantease") for n in weights}))
    back = read_layer(tmp_path, 0).weights
    assert back["self_attn.q_proj"].outliers is None
    assert torch.equal(back["mlp.down_proj"].dequantize(), weights["mlp.down_proj"].dequantize())


def test_packed_outliers_decompress_exactly_and_damage_is_refused():
    from qtool.formats.compressed_tensors.layout import compress_linear, decompress_linears, quantization_config

    qw = _with_outliers(_weights()["self_attn.q_proj"], 40, seed=3)
    stored = compress_linear(qw)
    assert {"weight_outlier_row_ptr", "weight_outlier_col", "weight_outlier_value"} <= set(stored)
    qc = quantization_config(qw.args, ["Linear"], [], "pack-quantized")
    state = {f"m.{k}": v for k, v in stored.items()}
    decompress_linears(state, qc, {"m": "Linear"}, torch.float32)
    assert set(state) == {"m.weight"} and torch.equal(state["m.weight"], qw.dequantize())
    damaged = {f"m.{k}": v for k, v in stored.items() if k != "weight_outlier_col"}
    with pytest.raises(QtoolError, match="m: an outlier array is missing"):
        decompress_linears(damaged, qc, {"m": "Linear"}, torch.float32)


def test_layer_checkpoint_round_trip_keeps_static_input_scales(tmp_path):
    from qtool.algorithms.actquant import StaticScale

    weights = _weights()
    facts = {name: LinearFacts("rtn") for name in weights}
    tensor = QuantArgs(bits=8, granularity="tensor", dynamic=False)
    channel = QuantArgs(bits=6, symmetric=False, granularity="channel", dynamic=False, observer="percentile",
                        percentile=99.9)  # fmt: skip
    shared = StaticScale(torch.tensor([0.02]))  # q/k/v share one object: stored once per linear
    inputs = {
        "self_attn.q_proj": (tensor, shared),
        "self_attn.k_proj": (tensor, shared),
        "mlp.down_proj": (channel, StaticScale(torch.rand(96) + 0.01, torch.randint(-32, 31, (96,), dtype=torch.int8))),
    }
    write_layer(tmp_path, 0, LayerCheckpoint(weights, facts, inputs=inputs))
    back = read_layer(tmp_path, 0).inputs
    assert set(back) == set(inputs)
    for name, (args, p) in inputs.items():
        got_args, got = back[name]
        assert got_args == args and torch.equal(got.scale, p.scale)
        assert (got.zero_point is None) == (p.zero_point is None)
        if p.zero_point is not None:
            assert torch.equal(got.zero_point, p.zero_point)
