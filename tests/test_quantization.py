"""Weight-only int8 quantization: error bounds, module swap, agreement with fp32 on demo-small."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_qwen2
from torch import nn

from engine.demo_model import resolve_model
from engine.quantization import Int8Linear, quantize_int8, quantize_weight, weight_bytes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_quantize_weight_range_and_error():
    w = torch.randn(48, 80, generator=gen(0)) * 0.05
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (48,)
    assert q.abs().max() <= 127 and q[3].abs().sum() == 0 and scale[3] == 1.0
    # Each row's largest weight maps to +-127 exactly; rounding error is at most half a step.
    assert (q.abs().amax(dim=1)[torch.arange(48) != 3] == 127).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="weight"):
        quantize_weight(torch.zeros(3, 4, 5))


def test_int8_linear_fp32_within_bound():
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=gen(1)) * 0.1)
        lin.bias.copy_(torch.randn(40, generator=gen(2)))
    qlin = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 96, generator=gen(3))
    with torch.no_grad():
        ref, out = lin(x), qlin(x)
    assert out.shape == ref.shape == (3, 5, 40)
    # |y - y_ref|_n <= sum_k |x_k| * s_n / 2 (each weight is off by at most half a step).
    bound = x.abs().sum(-1, keepdim=True) * qlin.scale / 2
    assert ((out - ref).abs() <= bound + 1e-5).all()
    assert (out - ref).abs().max() > 0  # it really is quantized
    # Exactly the dequantized weight's product (up to fp32 summation order).
    exact = x @ qlin.dequantized_weight().T + lin.bias
    assert torch.allclose(out, exact, atol=1e-5)


def test_int8_linear_bf16_kernel_matches_dequantized():
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=gen(4)) * 0.1)
    qlin = Int8Linear.from_linear(lin)
    x = torch.randn(7, 128, generator=gen(5))
    out = qlin(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (7, 64)
    ref = x @ qlin.dequantized_weight().T
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.02, rel


def test_int8_linear_w8a8_matches_quantized_reference():
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=gen(9)) * 0.1)
        lin.bias.copy_(torch.randn(40, generator=gen(10)))
    qlin = Int8Linear.from_linear(lin, dynamic_activations=True)
    x = torch.randn(7, 1, 96, generator=gen(11))
    x[2] = 0.0  # a zero row stays exactly the bias
    with torch.no_grad():
        out = qlin(x)
        ref = lin(x)
    assert out.shape == (7, 1, 40)
    # The same math in fp32: per-row quantized activations times dequantized weights.
    xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(x / xs).clamp(-127, 127) * xs
    exact = xq @ qlin.dequantized_weight().T + lin.bias
    assert torch.allclose(out, exact, atol=1e-4)
    assert torch.equal(out[2], lin.bias.detach().expand(1, 40))
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.03, rel
    # Off the CPU-fp32 path (bf16 here) it falls back to the weight-only kernels.
    assert qlin(x.bfloat16()).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def small_model():
    from transformers import AutoModelForCausalLM

    path = resolve_model("demo-small", progress=False)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_module_swap_and_memory(small_model):
    fp = small_model
    q = quantize_int8(copy.deepcopy(fp))
    linears = [n for n, m in fp.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears and len(linears) == 2 * 7 + 1  # 7 projections per layer
    swapped = [n for n, m in q.named_modules() if isinstance(m, Int8Linear)]
    assert sorted(swapped) == sorted(n for n in linears if n != "lm_head")
    assert type(q.lm_head) is nn.Linear
    # Quantized projections take a quarter of their fp32 bytes (+ one fp32 scale per row).
    proj_bytes = sum(fp.get_submodule(n).weight.numel() * 4 for n in swapped)
    saved = weight_bytes(fp) - weight_bytes(q)
    scales = sum(q.get_submodule(n).scale.numel() * 4 for n in swapped)
    assert saved == proj_bytes - proj_bytes // 4 - scales
    # Skip by last name component or full dotted name; a bare string is an error.
    skip = ("lm_head", "down_proj", "model.layers.0.self_attn.q_proj")
    q2 = quantize_int8(copy.deepcopy(fp), skip=skip)
    assert type(q2.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(q2.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(q2.model.layers[1].self_attn.q_proj) is Int8Linear
    with pytest.raises(ValueError, match="skip"):
        quantize_int8(copy.deepcopy(fp), skip="lm_head")
    q3 = quantize_int8(copy.deepcopy(fp), dynamic_activations=True)
    assert all(m.dynamic_activations for m in q3.modules() if isinstance(m, Int8Linear))


def test_logits_close_and_greedy_agreement(small_model):
    fp = small_model
    q = quantize_int8(copy.deepcopy(fp))
    x = torch.randint(6, 4096, (4, 64), generator=gen(6))
    with torch.no_grad():
        a, b = fp(x).logits, q(x).logits
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 0.05, rel
    # Teacher-forced: same prefix, same next-token choice. Random-weight models are far more
    # sensitive than trained ones (see bench/quantization.py), hence 90% rather than 99%.
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agree >= 0.9, agree
    w8a8 = quantize_int8(copy.deepcopy(fp), dynamic_activations=True)
    with torch.no_grad():
        c = w8a8(x).logits
    assert (a - c).norm() / a.norm() < 0.06
    assert (a.argmax(-1) == c.argmax(-1)).float().mean() >= 0.85


def test_greedy_decode_matches_dequantized_reference(small_model):
    # The int8 model must compute exactly the fp32 model whose weights are the dequantized ones:
    # free-running greedy decode (through the KV cache) gives the same tokens.
    q = quantize_int8(copy.deepcopy(small_model))
    ref = copy.deepcopy(small_model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, Int8Linear):
                ref.get_submodule(name).weight.copy_(mod.dequantized_weight())
    x = torch.randint(6, 4096, (3, 24), generator=gen(8))
    with torch.no_grad():
        ga = ref.generate(x, max_new_tokens=12, do_sample=False)
        gb = q.generate(x, max_new_tokens=12, do_sample=False)
    assert torch.equal(ga, gb)


def test_qwen2_biases_survive_quantization(tmp_path):
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(tiny_qwen2(tmp_path / "q")).eval()
    q = quantize_int8(copy.deepcopy(fp))
    attn = q.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Int8Linear) and attn.q_proj.bias is not None
    assert torch.equal(attn.q_proj.bias, fp.model.layers[0].self_attn.q_proj.bias)
    x = torch.randint(6, 4096, (2, 24), generator=gen(7))
    with torch.no_grad():
        a, b = fp(x).logits, q(x).logits
    assert (a - b).norm() / a.norm() < 0.05
