"""An older compressed-tensors decompresses what qtool writes, bit for bit: the evidence behind the ``version``
qtool records in ``quantization_config`` (``layout.reader_version``). Runs only under ``make compat-ct``, which
installs the old release (``QTOOL_CT_VERSION``, default 0.17.0: vLLM 0.32's pin) into a cache directory put first
on ``PYTHONPATH``; the regular suite never touches the network."""

from __future__ import annotations

import os

import pytest
import torch

from qtool.algorithms.quantizer import rtn_quantize
from qtool.formats.compressed_tensors.layout import (
    FORMATS,
    PACK_QUANTIZED,
    compress_linear,
    quantization_config,
    reader_version,
)
from qtool.schemes import QuantArgs

WANTED = os.environ.get("QTOOL_CT_VERSION")
pytestmark = pytest.mark.skipif(not WANTED, reason="run with make compat-ct")

CASES = {
    "w4_g64_sym": QuantArgs(bits=4, granularity="group", group_size=64),
    "w4_g64_asym": QuantArgs(bits=4, symmetric=False, granularity="group", group_size=64),
    "w8_ch_sym": QuantArgs(bits=8, granularity="channel"),
    "w8_ch_asym": QuantArgs(bits=8, symmetric=False, granularity="channel"),
    "w2_g64_sym": QuantArgs(bits=2, granularity="group", group_size=64),
    "w3_g64_sym": QuantArgs(bits=3, granularity="group", group_size=64),
    "w5_g64_asym": QuantArgs(bits=5, symmetric=False, granularity="group", group_size=64),
    "w6_ch_sym": QuantArgs(bits=6, granularity="channel"),
    "w4_ic64_sym": QuantArgs(bits=4, granularity="block", block_structure=(64, 1)),
    "w4_ic64_asym": QuantArgs(bits=4, symmetric=False, granularity="block", block_structure=(64, 1)),
}


def test_the_old_release_is_the_one_under_test():
    import compressed_tensors

    assert compressed_tensors.__version__.startswith(WANTED)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_old_release_decompresses_exactly_what_the_recorded_version_promises(name, fmt, dtype):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    args = CASES[name]
    w = (torch.randn(128, 192, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    qw = rtn_quantize(w, args)
    config = QuantizationConfig.model_validate(quantization_config(args, ["layer"], [], fmt))
    compressor = BaseCompressor.get_value_from_registry(fmt)
    try:
        state = compressor.decompress(compress_linear(qw, fmt), config.config_groups["group_0"])
        exact = torch.equal(state["weight"], qw.dequantize(dtype))
    except RuntimeError:  # 0.17.0 on dense 5-bit zero points: shapes that do not match
        exact = False
    promised = reader_version([args.bits], fmt) <= WANTED  # versions compared as x.y.z strings of one width
    assert exact == promised, (name, fmt, reader_version([args.bits], fmt))
    if fmt == PACK_QUANTIZED and args.bits in (3, 5, 6):
        assert not exact  # measured with 0.17.0: dense 3/5/6-bit packing is newer (other numbers or an error)
