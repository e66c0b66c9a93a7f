"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed over static buffers.

A decode-only step has one new token per request, so its work depends only on the batch size and
on values in device tensors (token ids, positions, slots, block tables, context lengths). The step
is padded up to the next bucket (1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond, the last
bucket being ``max_num_seqs``); padding rows write nowhere (slot -1) and attend to nothing
(context length 0, a block table row of zeros), so the real rows' results do not depend on them.

Three separable parts, so that CPU tests exercise all but the capture itself:
- ``batch_buckets`` / ``bucket_for``: the bucket choice;
- ``DecodeInputs.padded`` and ``StaticDecodeBuffers.fill``: padding and the in-place copy;
- ``DecodeGraphRunner``: on CUDA captures ``forward(bucket)`` once per bucket and replays it; off
  CUDA (or with ``enforce_eager``) "replay" is an eager ``forward(bucket)`` over the same buffers.

``forward(b)`` is the model runner's decode over the first ``b`` rows of the static buffers,
returning a tensor with one row per batch row (logits or hidden states). Under capture it must
not synchronise with the host (no ``.item()``, ``.tolist()``, boolean indexing, shapes from
data): the Triton kernels of engine/kernels read every length from device memory.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAD_SLOT = -1  # store_kv writes nothing for this slot
PAD_CONTEXT_LEN = 0  # paged_decode reads nothing and returns zeros for such a row


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, capped by (and ending at)
    ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4, *range(8, 65, 8)]
    sizes += list(range(80, max_num_seqs + 16, 16))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` rows; None when ``n`` exceeds the largest (run eagerly)."""
    if n < 1:
        raise ValueError(f"a decode batch has at least one row, got {n}")
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


@dataclass
class DecodeInputs:
    """Host-side inputs of a decode-only step, one row per request."""

    input_ids: np.ndarray  # [n] int64: each request's newest token
    positions: np.ndarray  # [n] int64: its position (context length - 1)
    slot_mapping: np.ndarray  # [n] int64: the slot its K/V go to
    context_lens: np.ndarray  # [n] int32: tokens attended to, the new one included
    block_tables: np.ndarray  # [n, max_blocks] int32

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    def padded(self, size: int) -> DecodeInputs:
        """These rows, then ``size - n`` padding rows: token 0 at position 0, slot -1, context
        length 0, a block table row of zeros."""
        n = self.num_rows
        if size < n:
            raise ValueError(f"cannot pad {n} rows down to {size}")
        extra = size - n

        def pad(a: np.ndarray, value: int) -> np.ndarray:
            fill = np.full((extra, *a.shape[1:]), value, dtype=a.dtype)
            return np.concatenate([a, fill])

        return DecodeInputs(
            input_ids=pad(self.input_ids, 0),
            positions=pad(self.positions, 0),
            slot_mapping=pad(self.slot_mapping, PAD_SLOT),
            context_lens=pad(self.context_lens, PAD_CONTEXT_LEN),
            block_tables=pad(self.block_tables, 0),
        )


_FIELDS = ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables")


@dataclass
class StaticDecodeBuffers:
    """Device tensors at fixed addresses (a captured graph reads them), ``max_rows`` rows each.
    ``allocate`` makes them; a runner with persistent buffers of its own may pass views of them."""

    input_ids: torch.Tensor  # [max_rows] int64
    positions: torch.Tensor  # [max_rows] int64
    slot_mapping: torch.Tensor  # [max_rows] int64
    context_lens: torch.Tensor  # [max_rows] int32
    block_tables: torch.Tensor  # [max_rows, max_blocks] int32

    @classmethod
    def allocate(cls, max_rows: int, max_blocks: int, device: torch.device) -> StaticDecodeBuffers:
        def z(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            input_ids=z(max_rows, dtype=torch.long),
            positions=z(max_rows, dtype=torch.long),
            slot_mapping=z(max_rows, dtype=torch.long),
            context_lens=z(max_rows, dtype=torch.int32),
            block_tables=z(max_rows, max_blocks, dtype=torch.int32),
        )

    @property
    def max_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def fill(self, inputs: DecodeInputs) -> None:
        """Copy ``inputs`` (already padded to their bucket) into the first rows, in place. A block
        table narrower than the buffer fills its leading columns; a wider one is an error."""
        n = inputs.num_rows
        if n > self.max_rows:
            raise ValueError(f"{n} rows exceed the static buffers' {self.max_rows}")
        width = inputs.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"block tables {width} wide exceed the buffers' {self.max_blocks}")
        pin = self.input_ids.device.type == "cuda"
        for name in _FIELDS:
            dst = getattr(self, name)[:n]
            if name == "block_tables":
                dst = dst[:, :width]
            src = torch.from_numpy(np.ascontiguousarray(getattr(inputs, name))).to(dst.dtype)
            if pin:
                src = src.pin_memory()
            dst.copy_(src, non_blocking=pin)


class DecodeGraphRunner:
    """Pads a decode-only step to its bucket, fills the static buffers and replays that bucket's
    graph (CUDA) or calls ``forward(bucket)`` eagerly (elsewhere, or ``use_graphs=False``).

    ``forward(b) -> Tensor[b, ...]`` runs the model over the first b rows of ``buffers``. The
    tensor ``run`` returns is a view of the graph's output buffer: consume it before the next run.
    """

    def __init__(
        self,
        forward: Callable[[int], torch.Tensor],
        buffers: StaticDecodeBuffers,
        max_num_seqs: int,
        use_graphs: bool,
    ) -> None:
        self.forward = forward
        self.buffers = buffers
        self.buckets = batch_buckets(min(max_num_seqs, buffers.max_rows))
        self.device = buffers.input_ids.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0
        self.num_eager = 0

    def _fill_padding(self, size: int) -> None:
        w = self.buffers.max_blocks
        empty = DecodeInputs(
            input_ids=np.zeros(0, np.int64),
            positions=np.zeros(0, np.int64),
            slot_mapping=np.zeros(0, np.int64),
            context_lens=np.zeros(0, np.int32),
            block_tables=np.zeros((0, w), np.int32),
        )
        self.buffers.fill(empty.padded(size))

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one graph per bucket, largest first, all in one memory pool (a smaller graph
        reuses the larger one's memory). The buffers hold padding rows while capturing, so the
        warm-up runs write nothing to the KV cache. Returns the seconds taken."""
        if not self.use_graphs:
            return 0.0
        import time

        t = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        for b in sorted(self.buckets, reverse=True):
            self._fill_padding(b)
            # Warm up off the capture (Triton compiles, cuBLAS picks algorithms, the allocator
            # fills its pool), on a side stream as torch.cuda.graph expects.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.forward(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t
        logger.info(
            "captured %d decode graphs (%s) in %.1f s", len(self.graphs), self.buckets, seconds
        )
        return seconds

    def can_run(self, num_rows: int) -> bool:
        return bucket_for(num_rows, self.buckets) is not None

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """The step's output rows ``[n, ...]`` for ``inputs`` (n rows, n <= the largest bucket)."""
        n = inputs.num_rows
        size = bucket_for(n, self.buckets)
        if size is None:
            raise ValueError(f"{n} rows exceed the largest bucket {self.buckets[-1]}")
        self.buffers.fill(inputs.padded(size))
        captured = self.graphs.get(size)
        if captured is not None:
            graph, out = captured
            graph.replay()
            self.num_replays += 1
        else:
            out = self.forward(size)
            self.num_eager += 1
        return out[:n]
