"""Building blocks of our model code: flat ``[num_tokens, hidden]`` tensors throughout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (transformers' LlamaRMSNorm; in float32 the same op).

    ``forward(x, residual)`` fuses the residual add of a pre-norm block: it returns
    ``(norm(x + residual), x + residual)``; with ``residual=None`` it returns ``(norm(x), x)``.
    The sum is written into ``residual`` (the stream's own tensor, which nothing else reads):
    one allocation less per norm, and ``residual + x == x + residual`` exactly."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        # (engine/csrc/fused_ops.cpp, vector width of aten's sum kernel) where the C++ add + norm
        # runs (set by the model's bind_kv_cache): the same numbers in one pass.
        self.fused: tuple[object, int] | None = None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; for bfloat16 it accumulates in float32 and rounds once at the end.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None and x.dim() == 2 and x.is_contiguous():
            op, width = self.fused
            y = op.add_rms_norm(x, residual, self.weight, self.eps, width)
            return y, (x if residual is None else residual)
        if residual is not None:
            x = residual.add_(x)
        return self.norm(x), x


_norm_width: dict[int, int | None] = {}


def fused_norm_width(fused) -> int | None:
    """The vector width (8 or 16 lanes) with which ``fused.add_rms_norm`` reproduces F.rms_norm
    bit for bit in this torch build (its sum kernel's Vectorized<float> size), or None: then the
    torch op runs. Checked once per process on rows whose lengths exercise every tail."""
    key = id(fused)
    if key not in _norm_width:
        g = torch.Generator().manual_seed(0)
        found = None
        for width in (8, 16):
            ok = True
            for dtype in (torch.float32, torch.bfloat16):
                for n in (37, 300, 512, 4096):
                    x = torch.randn(5, n, generator=g).to(dtype)
                    w = torch.randn(n, generator=g).to(dtype)
                    ref = F.rms_norm(x, (n,), w, 1e-6)
                    ok = ok and torch.equal(fused.add_rms_norm(x, None, w, 1e-6, width), ref)
            if ok:
                found = width
                break
        _norm_width[key] = found
    return _norm_width[key]


class RotaryTable(nn.Module):
    """cos/sin of every position up to ``max_positions``, computed once by transformers' own rotary
    class for this config (so every static rope type it knows, llama3/linear/yarn scaling included,
    gives its exact numbers), then indexed by position each step.

    Half-split form: for x = [x1, x2] (halves of the head dim),
    rotate(x) = [x1*c - x2*s, x2*c + x1*s] with c, s the first halves of transformers' cos/sin,
    which is q*cos + rotate_half(q)*sin."""

    def __init__(self, hf_config, max_positions: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.hf_config = hf_config
        self.register_buffer("cos", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self.ensure(max_positions)

    def ensure(self, num_positions: int) -> None:
        """Make the table cover positions [0, num_positions) (a draft model may be asked past its
        max_position_embeddings; transformers computes any position on the fly)."""
        if num_positions <= self.cos.shape[0]:
            return
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        n = max(num_positions, 2 * self.cos.shape[0])
        rope = LlamaRotaryEmbedding(self.hf_config)
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.arange(n).unsqueeze(0))
        half = cos.shape[-1] // 2  # [1, n, D] float32 -> first halves
        self.cos = cos[0, :, :half].to(self.cos.device, self.cos.dtype).contiguous()
        self.sin = sin[0, :, :half].to(self.sin.device, self.sin.dtype).contiguous()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D/2] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] -> rotated copy; cos/sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate, up] along the last dim -> silu(gate) * up, computed in place in x's gate half
    (x is the gate-up projection's own output; the result is a strided view [T, I] that a linear
    reads without a copy). The same kernels as ``F.silu(gate) * up``, so the same numbers."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward over a weight packed once into oneDNN's blocked layout
    (``torch.ops.mkldnn``): no per-call weight reorder, and oneDNN's GEMM. For bfloat16 it is the
    kernel F.linear itself runs on CPU, so the numbers are F.linear's bit for bit (``pack_linears``
    checks); for float32 F.linear runs MKL's sgemm instead, whose results differ in the last
    bits."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int, exact_only: bool = True) -> int:
    """Replace every plain ``nn.Linear`` of a CPU model with a ``PackedLinear`` (int8 and other
    swapped linears stay). With ``exact_only`` (the default) only if every packed linear equals
    F.linear bit for bit on a probe input (bfloat16 on this torch build), else nothing changes.
    Returns the number of linears replaced."""
    targets = [
        (parent, name, mod)
        for parent in model.modules()
        for name, mod in parent.named_children()
        if type(mod) is nn.Linear
    ]
    if not targets or not torch.backends.mkldnn.is_available():
        return 0
    packed = []
    g = torch.Generator().manual_seed(0)
    for _, _, lin in targets:
        p = PackedLinear(lin, batch_hint)
        if exact_only:  # stop at the first mismatch (float32: the first linear)
            with torch.inference_mode():
                x = torch.randn(33, 2 * lin.in_features, generator=g).to(lin.weight.dtype)
                x = x[:, : lin.in_features]  # strided rows, as the down projection reads them
                if not torch.equal(p(x), F.linear(x, lin.weight, lin.bias)):
                    return 0
        packed.append(p)
    for (parent, name, _), p in zip(targets, packed, strict=True):
        setattr(parent, name, p)
    return len(targets)
