"""engine/csrc/fused_ops.cpp against the torch path it replaces, bit for bit."""

import pytest
import torch

from engine.cpu_kernels import fused_ops_kernel
from engine.models.layers import apply_rotary

fused = fused_ops_kernel()
pytestmark = pytest.mark.skipif(fused is None, reason="no C++ compiler for the CPU kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (8, 8)])
def test_rotary_store_kv_equals_torch_path(dtype, H, Hkv):
    g = torch.Generator().manual_seed(H * 10 + Hkv)
    T, D, P, S = 37, 32, 300, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    cos = torch.randn(P, D // 2, generator=g).to(dtype)
    sin = torch.randn(P, D // 2, generator=g).to(dtype)
    positions = torch.randint(0, P, (T,), generator=g)
    slots = torch.randperm(S, generator=g)[:T]
    slots[[3, 10]] = -1  # padding rows write nowhere
    k_cache = torch.zeros(S, Hkv, D, dtype=dtype)
    v_cache = torch.zeros(S, Hkv, D, dtype=dtype)

    # The torch path: lookup, one rotary pass over q and k heads, then store k and v.
    qk = qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D)
    ref = apply_rotary(qk, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    v_ref = qkv[:, (H + Hkv) * D :].view(T, Hkv, D).clone()
    k_ref_cache, v_ref_cache = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ok = slots >= 0
    k_ref_cache[slots[ok]] = ref[ok, H:]
    v_ref_cache[slots[ok]] = v_ref[ok]

    fused.rotary_store_kv(qkv, cos, sin, positions, k_cache, v_cache, slots, H, Hkv, D)
    assert torch.equal(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), ref)
    assert torch.equal(qkv[:, (H + Hkv) * D :].view(T, Hkv, D), v_ref)  # v untouched
    assert torch.equal(k_cache, k_ref_cache)
    assert torch.equal(v_cache, v_ref_cache)


def test_rotary_store_kv_on_a_strided_qkv_and_bad_input():
    T, H, Hkv, D = 5, 2, 1, 8
    wide = torch.randn(T, (H + 2 * Hkv) * D + 8)
    qkv = wide[:, : (H + 2 * Hkv) * D]  # rows not adjacent: the op follows the row stride
    ref = apply_rotary(
        qkv[:, : (H + Hkv) * D].reshape(T, H + Hkv, D), torch.ones(T, 1, D // 2),
        torch.zeros(T, 1, D // 2),
    )  # fmt: skip
    kc, vc = torch.zeros(8, Hkv, D), torch.zeros(8, Hkv, D)
    cos, sin = torch.ones(16, D // 2), torch.zeros(16, D // 2)
    pos = torch.arange(T)
    fused.rotary_store_kv(qkv, cos, sin, pos, kc, vc, torch.arange(T), H, Hkv, D)
    assert torch.equal(qkv[:, : (H + Hkv) * D].reshape(T, H + Hkv, D), ref)
    with pytest.raises(RuntimeError, match="rotary table"):
        fused.rotary_store_kv(qkv, cos, sin, pos + 14, kc, vc, torch.arange(T), H, Hkv, D)
    with pytest.raises(RuntimeError, match="slot out of range"):
        fused.rotary_store_kv(qkv, cos, sin, pos, kc, vc, torch.arange(T) + 6, H, Hkv, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [37, 128, 512, 896, 4096])
def test_add_rms_norm_equals_torch_path(dtype, n):
    """The residual add + RMSNorm in one pass: the residual stream and the norm bit for bit those
    of ``residual.add_(x)`` and F.rms_norm, over widths with and without vector tails and over
    magnitudes far from 1."""
    from engine.models.layers import fused_norm_width

    width = fused_norm_width(fused)
    assert width in (8, 16)  # this torch build's sum kernel is reproduced
    g = torch.Generator().manual_seed(n)
    for scale in (1e-3, 1.0, 40.0):
        x = (torch.randn(33, n, generator=g) * scale).to(dtype)
        res = (torch.randn(33, n, generator=g) * scale).to(dtype)
        w = torch.randn(n, generator=g).to(dtype)
        ref_res = res.clone().add_(x)
        ref = torch.nn.functional.rms_norm(ref_res, (n,), w, 1e-5)
        y = fused.add_rms_norm(x, res, w, 1e-5, width)
        assert torch.equal(res, ref_res)  # summed in place
        assert torch.equal(y, ref)
        assert torch.equal(fused.add_rms_norm(ref_res, None, w, 1e-5, width), ref)
    with pytest.raises(RuntimeError, match="residual"):
        fused.add_rms_norm(x, res[:, :-1].contiguous(), w, 1e-5, width)
