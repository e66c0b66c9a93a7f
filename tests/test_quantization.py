"""Weight-only int8 quantization: error bounds (per channel and per group), kernels against the
dequantized matmul, module swap, agreement with fp32 on demo-small, the engine serving int8."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_qwen2
from torch import nn

from engine.models.demo import resolve_model
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
    # aten's packed kernel itself: the same bf16 inputs through an fp32 matmul of the dequantized
    # weight differ only by the bf16 rounding of the scales and of the output (< 2^-8 relative).
    xb = x.bfloat16()
    kernel = torch._weight_int8pack_mm(xb, qlin.qweight, qlin.scale.bfloat16()).float()
    exact = xb.float() @ (qlin.qweight.float() * qlin.scale.bfloat16().float()[:, None]).T
    assert torch.allclose(kernel, exact, rtol=2**-7, atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_quantize_weight_groups_round_trip(group_size):
    w = torch.randn(24, 256, generator=gen(20)) * 0.05
    w[5, 32:48] = 0.0  # an all-zero group (for g <= 16) keeps scale 1 and quantizes to zeros
    w[7, 3] = 1.5  # one outlier: with groups it widens its own group's step only
    q, scale = quantize_weight(w, group_size)
    groups = 256 // group_size
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == (24, groups) and scale.dtype == torch.float32
    s = scale.repeat_interleave(group_size, dim=1)  # [24, 256]: each weight's own step
    err = (q.float() * s - w).abs()
    assert (err <= s / 2 + 1e-7).all()  # round trip: at most half a step per weight
    # Each non-zero group's largest weight maps to +-127 exactly.
    gmax = q.abs().reshape(24, groups, group_size).amax(-1)
    nonzero = w.abs().reshape(24, groups, group_size).amax(-1) > 0
    assert (gmax[nonzero] == 127).all() and (gmax[~nonzero] == 0).all()
    if group_size == 16:
        assert scale[5, 2] == 1.0
    # The outlier's row: grouping shrinks the error of every other group of the row (the
    # outlier is ~10x the other weights, so their step, and error, is ~10x smaller).
    qc, sc = quantize_weight(w)
    others = torch.arange(256) // group_size != 3 // group_size
    err_c = (qc.float() * sc[:, None] - w)[7, others].pow(2).mean()
    assert err[7, others].pow(2).mean() < err_c / 20
    # group_size = in_features is per-channel by another name.
    q1, s1 = quantize_weight(w, 256)
    assert torch.equal(q1, qc) and torch.equal(s1[:, 0], sc)


@pytest.mark.parametrize("bad", [0, -32, 48, 2.0, True, "32"])
def test_bad_group_size_names_the_field(bad):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(8, 256), bad)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int8(nn.Sequential(nn.Linear(256, 8)), group_size=bad)


@pytest.mark.parametrize("batch_shape", [(1,), (5,), (2, 3), (3, 40)])  # 120 rows: dequantize
def test_grouped_linear_fp32_matches_dequantized_and_bound(batch_shape):
    lin = nn.Linear(192, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 192, generator=gen(21)) * 0.1)
        lin.bias.copy_(torch.randn(40, generator=gen(22)))
    qlin = Int8Linear.from_linear(lin, group_size=64)
    assert qlin.group_size == 64 and qlin.scale.shape == (40, 3)
    x = torch.randn(*batch_shape, 192, generator=gen(23))
    with torch.no_grad():
        out, ref = qlin(x), lin(x)
    assert out.shape == ref.shape == (*batch_shape, 40)
    # The grouped bmm kernel computes the dequantized weight's product (up to summation order).
    exact = x @ qlin.dequantized_weight().T + lin.bias
    assert torch.allclose(out, exact, atol=1e-5)
    # |y - y_ref|_n <= sum_k |x_k| * s_{n, k // g} / 2.
    s = qlin.scale.repeat_interleave(64, dim=1)  # [40, 192]
    bound = x.abs() @ s.T / 2
    assert ((out - ref).abs() <= bound + 1e-5).all()
    assert (out - ref).abs().max() > 0
    # Other dtypes dequantize first; the result is the same product in that dtype.
    for dtype in (torch.bfloat16, torch.float16):
        got = qlin(x.to(dtype))
        assert got.dtype == dtype
        rel = (got.float() - exact).norm() / exact.norm()
        assert rel < 0.01, (dtype, rel)


def test_grouped_is_more_accurate_than_per_channel():
    # Weights with per-row outliers (as trained LLMs have): groups cut the output error.
    w = torch.randn(64, 512, generator=gen(24)) * 0.02
    w[torch.arange(64), torch.randint(0, 512, (64,), generator=gen(25))] = 0.5
    lin = nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(16, 512, generator=gen(26))
    with torch.no_grad():
        ref = lin(x)
        e_c = (Int8Linear.from_linear(lin)(x) - ref).norm()
        e_g = (Int8Linear.from_linear(lin, group_size=32)(x) - ref).norm()
    assert e_g < e_c / 3, (e_g, e_c)


def test_w8a8_needs_per_channel_scales():
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear.from_linear(nn.Linear(64, 8), dynamic_activations=True, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int8(nn.Sequential(nn.Linear(64, 8)), dynamic_activations=True, group_size=32)
    with pytest.raises(ValueError, match="scale"):
        Int8Linear(torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 5), None)


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


def test_grouped_model_swap_memory_and_exact_decode(small_model):
    fp = small_model
    q = quantize_int8(copy.deepcopy(fp), group_size=32)
    swapped = {n: m for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    assert len(swapped) == 2 * 7 and all(m.group_size == 32 for m in swapped.values())
    # int8 bytes plus one fp32 scale per 32 weights.
    proj = sum(fp.get_submodule(n).weight.numel() for n in swapped)
    assert weight_bytes(fp) - weight_bytes(q) == proj * 4 - proj - proj // 32 * 4
    # Greedy decode through the KV cache equals the fp32 model holding the dequantized weights.
    ref = copy.deepcopy(fp)
    with torch.no_grad():
        for name, mod in swapped.items():
            ref.get_submodule(name).weight.copy_(mod.dequantized_weight())
    x = torch.randint(6, 4096, (3, 24), generator=gen(27))
    with torch.no_grad():
        ga = ref.generate(x, max_new_tokens=12, do_sample=False)
        gb = q.generate(x, max_new_tokens=12, do_sample=False)
        a, b, c = fp(x).logits, q(x).logits, quantize_int8(copy.deepcopy(fp))(x).logits
    assert torch.equal(ga, gb)
    # Closer to fp32 than per-channel scales on the same inputs.
    assert (a - b).norm() < (a - c).norm()
    # A group size that does not divide some layer (intermediate 352 = 11 * 32) names the layer
    # and leaves the model untouched.
    m = copy.deepcopy(fp)
    with pytest.raises(ValueError, match="group_size 64 .*down_proj"):
        quantize_int8(m, group_size=64)
    assert not any(isinstance(mod, Int8Linear) for mod in m.modules())


@pytest.mark.parametrize("impl", ["fleetlm", "transformers"])
@pytest.mark.parametrize("quant", ["int8", "int8-w8a8"])
def test_engine_serves_quantized_model(tmp_path, quant, impl):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    path = resolve_model("demo-small", progress=False)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [torch.randint(6, 4096, (n,), generator=gen(28 + n)).tolist() for n in (5, 19)]
    eq = LLMEngine(EngineConfig(model=path, quantization=quant, num_kv_blocks=16, model_impl=impl))
    layers = [m for m in eq.runner.model.modules() if isinstance(m, Int8Linear)]
    # Per layer: our code merges q/k/v and gate/up (4 linears); transformers' modules have 7.
    assert len(layers) == 2 * (4 if impl == "fleetlm" else 7)
    assert all(m.dynamic_activations == (quant == "int8-w8a8") for m in layers)
    out = eq.generate(prompts, sp)
    assert [len(r.token_ids) for r in out] == [8, 8]
    if quant == "int8":
        # The fp32 engine holding the dequantized weights serves the same greedy tokens.
        ef = LLMEngine(EngineConfig(model=path, num_kv_blocks=16, model_impl=impl))
        with torch.no_grad():
            for name, mod in eq.runner.model.named_modules():
                if isinstance(mod, Int8Linear):
                    ef.runner.model.get_submodule(name).weight.copy_(mod.dequantized_weight())
        assert [r.token_ids for r in ef.generate(prompts, sp)] == [r.token_ids for r in out]


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
