"""Weight-only int8 quantization by module swap (as gpt-fast does): model code is never touched.

`quantize_int8(model)` replaces every `nn.Linear` (except the names in `skip`) with `Int8Linear`:
symmetric int8 weights, q = round(W / s), so every weight is off by at most s / 2 and each output
by at most sum_k |x_k| * s_{n,k} / 2. The scale s is either
- per output channel (`group_size=None`, the default): s_n = max_k |W[n, k]| / 127; or
- per group of `group_size` consecutive inputs (`group_size=g`, as gpt-fast's and torchao's
  grouped int8): s_{n,j} = max |W[n, j*g:(j+1)*g]| / 127. A row's outliers then widen the step of
  their own group only: on Gaussian weights the error RMS falls by about 1.4x at g=32 for K=512,
  at the price of one float32 scale per g weights (g=32: +12.5% over the int8 bytes).

Kernels (one linear of a 2-core AVX-512 CPU, torch 2.13, one thread, x [M, 512] @ W^T [512, 1408],
median of 200 calls; bench/quantization.py --parts kernels measures them again):
  path                                                           M=1        M=32
  fp32 matmul (unquantized)                                      0.062 ms   0.57 ms
  per-channel, fp32: int8 -> fp32 cast, matmul, scale output     0.105 ms   0.59 ms
  per-channel, bf16: torch._weight_int8pack_mm (aten CPU kernel) 0.039 ms   0.64 ms
  torch._weight_int8pack_mm, fp32 activations (unvectorized)     0.58 ms    40 ms
  per-group g=64, fp32: dequantize, then matmul                  0.177 ms   0.72 ms
  per-group g=64, fp32: one bmm over the groups, scale, sum      0.103 ms   0.72 ms (used)
So fp32 activations use cast-matmul-scale (per channel) or, per group, the bmm while there are
fewer rows than group_size (decode; its [groups, M, N] partials outgrow the weight past that) and
dequantize-then-matmul beyond (prefill: W1 at batch 32, g=32, 18.4 s -> 2.75 s), bf16
activations on CPU with per-channel scales use the packed int8 kernel (the one fast path here),
and everything else dequantizes the weight before the matmul (scaling the output of an unscaled
int8 matmul, or summing unscaled group partials, could overflow fp16). torchao 0.18 installs and
runs here, but its eager int8 weight-only linear is the same cast-matmul-scale (per row) and
dequantize-matmul (per group), left to torch.compile to fuse; it brings nothing over these paths.

Optional dynamic activations (W8A8, `dynamic_activations=True`, fp32 on CPU, per-channel scales
only): each input row is quantized to int8 with its own scale and multiplied by `torch._int_mm`
(int32 accumulation, VNNI on CPU): 0.18 ms for the shape above at M=32, 3x faster than fp32, at
~1.0% relative output error instead of weight-only's ~0.8%. Other devices/dtypes keep the
weight-only path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric range [-127, 127]: -128 is never produced, so negation is exact


def _check_group_size(group_size: int | None, in_features: int) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} must divide the input dimension {in_features}")


def quantize_weight(
    w: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q [out, in] int8, scale float32): scale [out] per output channel when
    `group_size` is None, else [out, in // group_size], one per group of `group_size` inputs."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    _check_group_size(group_size, w.shape[1])
    n, k = w.shape
    g = group_size or k
    w32 = w.detach().float().reshape(n, k // g, g)
    # An all-zero row/group keeps scale 1 rather than 0 so dequantization never divides by zero.
    amax = w32.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w32 / scale).clamp_(-QMAX, QMAX).to(torch.int8).reshape(n, k)
    scale = scale.reshape(n) if group_size is None else scale.reshape(n, k // g)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ dequant(q, scale)^T + bias, q int8 [out, in]; scale float32 [out] (per channel) or
    [out, in // group_size] (per group, dequant(q)[n, k] = q[n, k] * scale[n, k // group_size])."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        dynamic_activations: bool = False,
    ):
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2
        self.out_features, self.in_features = qweight.shape
        if scale.shape == (self.out_features,):
            self.group_size = None
        elif (
            scale.dim() == 2
            and scale.shape[0] == self.out_features
            and scale.shape[1] > 0
            and self.in_features % scale.shape[1] == 0
        ):
            self.group_size = self.in_features // scale.shape[1]
        else:
            raise ValueError(
                f"scale must be [out] or [out, in // group_size] for a weight of shape "
                f"{tuple(qweight.shape)}, got {tuple(scale.shape)}"
            )
        if dynamic_activations and self.group_size is not None:
            raise ValueError(
                "dynamic_activations (W8A8) needs per-channel scales: use group_size=None"
            )
        self.dynamic_activations = dynamic_activations
        if self.group_size is not None:
            # Grouped weights are kept input-major ([in, out] memory, seen as [out, in]): the
            # fp32 path casts q^T and views it as [groups, group_size, out] for one bmm.
            qweight = qweight.t().contiguous().t()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, dynamic_activations: bool = False, group_size: int | None = None
    ) -> Int8Linear:
        q, scale = quantize_weight(linear.weight, group_size)
        dev = linear.weight.device
        return cls(q.to(dev), scale.to(dev), linear.bias, dynamic_activations)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group_size is None:
            return (self.qweight.float() * self.scale[:, None]).to(dtype)
        # Computed input-major, the layout q is kept in: [G, g, N] * scale^T [G, 1, N], then
        # returned as an [out, in] view (F.linear takes it as it is).
        n, k, g = self.out_features, self.in_features, self.group_size
        wt = self.qweight.t().to(dtype).view(k // g, g, n) * self.scale.t()[:, None, :].to(dtype)
        return wt.view(k, n).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_activations and x.dtype == torch.float32 and x.device.type == "cpu":
            y = self._forward_w8a8(x)
        elif x.dtype == torch.float32 and self.group_size is None:
            # Exact per-channel factorisation: (x @ q^T) * s == x @ (q * s)^T.
            y = F.linear(x, self.qweight.float()) * self.scale
        elif x.dtype == torch.float32 and x.numel() < self.in_features * self.group_size:
            # Fewer rows than group_size (decode): the bmm's [G, M, N] partials are smaller than
            # a dequantized [N, K] weight. Past that (prefill) dequantizing once is cheaper.
            y = self._forward_grouped_fp32(x)
        elif x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.group_size is None:
            x2 = x.reshape(-1, self.in_features)  # kernel wants [M, K]
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_grouped_fp32(self, x: torch.Tensor) -> torch.Tensor:
        # y[m, n] = sum_j s[n, j] * (x[m, group j] @ q[n, group j]): partial products of all
        # groups in one bmm [G, M, g] @ [G, g, N], scaled per (group, output) and summed.
        g, n = self.group_size, self.out_features
        groups = self.in_features // g
        x2 = x.reshape(-1, groups, g).transpose(0, 1)  # [G, M, g]
        qt = self.qweight.t().float().view(groups, g, n)  # [G, g, N], contiguous
        y = (torch.bmm(x2, qt) * self.scale.t()[:, None, :]).sum(0)
        return y.reshape(*x.shape[:-1], n)

    def _forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        # Per-row symmetric scale; an all-zero row quantizes to zeros whatever its (tiny) scale.
        xs = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / QMAX  # [M, 1]
        xq = torch.round(x2 / xs).clamp_(-QMAX, QMAX).to(torch.int8)
        # int32 accumulation is exact: |sum| <= K * 127^2 < 2^31 for K < 133,000.
        acc = torch._int_mm(xq, self.qweight.t())  # [M, N] int32
        y = acc.float() * xs * self.scale
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        if self.dynamic_activations:
            mode = "w8a8-dynamic"
        elif self.group_size is None:
            mode = "int8 weight-only, per-channel"
        else:
            mode = f"int8 weight-only, group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # A skip entry names a module by its full dotted name or by its last component ("lm_head").
    last = name.rsplit(".", 1)[-1]
    return any(s == name or s == last for s in skip)


def quantize_int8(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    dynamic_activations: bool = False,
    group_size: int | None = None,
) -> nn.Module:
    """Swap every nn.Linear not named in `skip` for an Int8Linear, in place; returns `model`.
    `dynamic_activations`: also quantize inputs per row at run time (W8A8, faster on CPU).
    `group_size`: one scale per `group_size` inputs instead of one per output channel (must
    divide every quantized layer's input dimension; not with `dynamic_activations`)."""
    if isinstance(skip, str):
        raise ValueError("skip must be a collection of module names, not a single string")
    if dynamic_activations and group_size is not None:
        raise ValueError("dynamic_activations (W8A8) needs per-channel scales: use group_size=None")
    skip = tuple(skip)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not _skipped(name, skip)
    ]
    for name, linear in targets:  # validate all before swapping any: no half-quantized model
        try:
            _check_group_size(group_size, linear.in_features)
        except ValueError as e:
            raise ValueError(f"{e} (layer {name})") from None
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear, dynamic_activations, group_size))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers (what a checkpoint of the model holds)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for mod in model.modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for name, buf in mod.named_buffers(recurse=False):
            if name not in skip:
                total += buf.numel() * buf.element_size()
    return total
