"""oneDNN-packed linears (engine/models/layers.py PackedLinear, pack_linears) on CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def _model(dtype, k=64):
    """Two linears: [k -> 96] with a bias, then [48 -> k] (reads half of a 96-wide row)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k, 96, bias=True), nn.ReLU(), nn.Linear(48, k, bias=False))
    return m.to(dtype)


@torch.inference_mode()
def test_bfloat16_packed_equals_f_linear_bit_for_bit():
    m = _model(torch.bfloat16)
    ref = [(lin.weight.clone(), lin.bias) for lin in (m[0], m[2])]
    assert pack_linears(m, 32) == 2
    assert isinstance(m[0], PackedLinear) and isinstance(m[2], PackedLinear)
    g = torch.Generator().manual_seed(1)
    for rows in (1, 5, 32, 300):
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        wide = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
        assert torch.equal(m[0](x), F.linear(x, *ref[0]))
        strided = wide[:, :48]  # the down projection reads the gate half of gate-up in place
        assert torch.equal(m[2](strided), F.linear(strided, ref[1][0]))


@torch.inference_mode()
def test_float32_packs_only_on_request():
    m = _model(torch.float32, k=512)
    # F.linear runs MKL's sgemm in float32: over the demo model's K = 512 the packed oneDNN result
    # is not bit-equal, so the exact-only default leaves the model as it is.
    assert pack_linears(m, 32) == 0
    assert type(m[0]) is nn.Linear
    w = m[0].weight.clone()
    assert pack_linears(m, 32, exact_only=False) == 2
    x = torch.randn(32, 512)
    torch.testing.assert_close(m[0](x), F.linear(x, w, m[0].bias), rtol=1e-5, atol=1e-5)


def test_swapped_linears_stay():
    class Other(nn.Linear):  # e.g. engine/quantization.py's Int8Linear is its own class
        pass

    m = nn.Sequential(Other(8, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(m, 4) == 1
    assert type(m[0]) is Other and isinstance(m[1], PackedLinear)
