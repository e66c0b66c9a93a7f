"""Megatron-style tensor parallelism by module swap (as gpt-fast's ``apply_tp``): model code is
never touched; after loading the full HF model each shard keeps its own slice of every
decoder layer.

Per decoder layer, shard r of N keeps
- attention: query heads [r*H/N, (r+1)*H/N) in ``q_proj`` (column-parallel: rows of W, and bias),
  the KV heads those query heads read in ``k_proj``/``v_proj``, and the matching input columns of
  ``o_proj`` (row-parallel: ``y = all_reduce(x_r @ W_r^T) + b``);
- MLP: columns [r*I/N, (r+1)*I/N) of ``gate_proj``/``up_proj`` and the same input columns of
  ``down_proj`` (row-parallel);
- embeddings, norms and the LM head whole (replicated; the LM head runs on shard 0 only).

HF attention reshapes projections with ``-1`` heads, and our paged attention derives the GQA group
from the tensor shapes, so sliced projections need no other change; each shard's KV cache holds
only its local KV heads. GQA with fewer KV heads than shards replicates KV heads: when N is a
multiple of Hkv, shard r keeps KV head r // (N / Hkv) (its query heads all read that one).

Collectives live in :class:`TPGroup`: two process groups built straight from a TCPStore (no
torch.distributed global state, so several engines can share a process): a gloo "control" group for
the per-step SchedulerOutput broadcast (waits as long as the engine idles) and a "tensor" group
(gloo on CPU, NCCL on CUDA) for all-reduce with a short timeout, so a dead or hung peer raises
instead of hanging the replica.
"""

from __future__ import annotations

import datetime
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
IDLE_TIMEOUT = datetime.timedelta(days=30)  # the control group waits while the engine idles


@dataclass(frozen=True)
class HeadSplit:
    """Which heads shard ``rank`` of ``size`` keeps."""

    rank: int
    size: int
    num_heads: int  # query heads in the whole model
    num_kv_heads: int  # KV heads in the whole model
    intermediate_size: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        if self.num_kv_heads >= self.size:
            return self.rank * self.local_kv_heads
        return self.rank // (self.size // self.num_kv_heads)  # replicated KV head


def plan_heads(hf_config, tp_size: int, rank: int = 0) -> HeadSplit:
    """Validate that a model splits over ``tp_size`` shards; ValueError naming the field if not."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    inter = getattr(cfg, "intermediate_size", None)
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"tensor_parallel_size must be >= 1 (rank {rank}), got {tp_size}")
    if h % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's num_attention_heads={h}"
        )
    if hkv % tp_size and tp_size % hkv:
        raise ValueError(
            f"tensor_parallel_size={tp_size} and num_key_value_heads={hkv}: one must divide the "
            "other (fewer KV heads than shards are replicated, which needs a whole multiple)"
        )
    if inter is None or inter % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's intermediate_size={inter}"
        )
    return HeadSplit(rank, tp_size, h, hkv, inter)


class TPGroup:
    """Collectives of one tensor-parallel group; time spent in them is summed in ``comm_s``."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        device: torch.device,
        timeout_s: float = 60.0,
    ) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, size, IDLE_TIMEOUT)
        timeout = datetime.timedelta(seconds=timeout_s)
        tstore = dist.PrefixStore("tensor", store)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.tensor = dist.ProcessGroupNCCL(tstore, rank, size, opts)
        else:
            self.tensor = dist.ProcessGroupGloo(tstore, rank, size, timeout)
        self.allreduce_s = (
            0.0  # time in tensor all-reduces (includes waiting for the slowest shard)
        )
        self.broadcast_s = 0.0  # time in per-step control broadcasts

    @property
    def comm_s(self) -> float:
        return self.allreduce_s + self.broadcast_s

    @classmethod
    def join(
        cls,
        master_addr: str,
        port: int,
        rank: int,
        size: int,
        device: torch.device,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 300.0,
    ) -> TPGroup:
        """Worker side: connect to shard 0's store (rank 0 creates it with :func:`open_store`)."""
        store = dist.TCPStore(
            master_addr,
            port,
            size,
            is_master=False,
            timeout=datetime.timedelta(seconds=connect_timeout_s),
        )
        return cls(store, rank, size, device, timeout_s)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.tensor.allreduce([t]).wait()
        self.allreduce_s += time.perf_counter() - t0
        return t

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0 sends ``obj`` (pickled: ids and counts, no tensors); the others return it."""
        t0 = time.perf_counter()
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.ctrl.broadcast([size], dist.BroadcastOptions()).wait()
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.ctrl.broadcast([data], dist.BroadcastOptions()).wait()
        self.broadcast_s += time.perf_counter() - t0
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def all_gather_int(self, value: int) -> list[int]:
        """Every rank's ``value`` (a handshake on the control group)."""
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self.ctrl.allgather([out], [torch.tensor([value], dtype=torch.int64)]).wait()
        return [int(t.item()) for t in out]


def open_store(size: int, connect_timeout_s: float = 300.0) -> tuple[dist.TCPStore, int]:
    """Rank 0: a TCPStore on a port the OS picks (free by construction: two replicas on one node
    never collide). Returns the store and its port for the workers."""
    store = dist.TCPStore(
        "0.0.0.0",
        0,
        size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=connect_timeout_s),
    )
    return store, store.port


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b: the input dim is split; the bias is added once, after."""

    def __init__(self, inner: nn.Linear, bias: torch.Tensor | None, group: TPGroup) -> None:
        super().__init__()
        self.inner = inner  # an nn.Linear without bias (int8 quantization may swap it)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x))
        return y + self.bias if self.bias is not None else y


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def _rows(lin: nn.Linear, start: int, n: int) -> nn.Linear:
    """Column-parallel slice: output features [start, start + n)."""
    b = lin.bias[start : start + n].detach() if lin.bias is not None else None
    return _linear(lin.weight[start : start + n].detach(), b)


def shard_model(model: nn.Module, split: HeadSplit, group: TPGroup) -> None:
    """Keep shard ``split.rank``'s slice of every decoder layer, in place (see module docstring)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    text_cfg = model.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or (
        text_cfg.hidden_size // text_cfg.num_attention_heads
    )
    r = split.rank
    hq, hkv, kv0 = split.local_heads, split.local_kv_heads, split.kv_head_start
    inter = split.intermediate_size // split.size
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in COLUMN_PARALLEL + ROW_PARALLEL:
            owner = attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
            if not isinstance(getattr(owner, name, None), nn.Linear):
                raise ValueError(
                    f"tensor parallelism needs Llama/Qwen2/Mistral-style layers; "
                    f"{type(owner).__name__} has no nn.Linear {name!r}"
                )
        attn.q_proj = _rows(attn.q_proj, r * hq * head_dim, hq * head_dim)
        attn.k_proj = _rows(attn.k_proj, kv0 * head_dim, hkv * head_dim)
        attn.v_proj = _rows(attn.v_proj, kv0 * head_dim, hkv * head_dim)
        o = attn.o_proj
        cols = slice(r * hq * head_dim, (r + 1) * hq * head_dim)
        attn.o_proj = RowParallelLinear(
            _linear(o.weight[:, cols].detach(), None),
            o.bias.detach() if o.bias is not None else None,
            group,
        )
        # Attributes some attention code reads; ours derives heads from the tensor shapes.
        for attr, val in (("num_heads", hq), ("num_key_value_heads", hkv)):
            if hasattr(attn, attr):
                setattr(attn, attr, val)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = hq // hkv
        mlp.gate_proj = _rows(mlp.gate_proj, r * inter, inter)
        mlp.up_proj = _rows(mlp.up_proj, r * inter, inter)
        d = mlp.down_proj
        mlp.down_proj = RowParallelLinear(
            _linear(d.weight[:, r * inter : (r + 1) * inter].detach(), None),
            d.bias.detach() if d.bias is not None else None,
            group,
        )


def check_model_layout(model: str, tp_size: int) -> None:
    """Config-time check (no weights loaded): ValueError when ``model`` cannot split over
    ``tp_size`` shards. A folder that is not on this machine is checked when a replica loads it."""
    import os
    from types import SimpleNamespace

    from engine.models.demo import DEMO_SPECS

    if tp_size == 1:
        return
    if model in DEMO_SPECS:
        s = DEMO_SPECS[model]
        cfg = SimpleNamespace(
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads,
            intermediate_size=s.intermediate_size,
        )
    elif os.path.isfile(os.path.join(model, "config.json")):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    else:
        return
    plan_heads(cfg, tp_size)
