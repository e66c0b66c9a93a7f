"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed over static buffers.

A decode-only step has one new token per request, so its device work depends only on the batch
size and on values in device tensors (token ids, positions, slots, block tables, sequence lengths)
at fixed addresses. The step is padded up to the next bucket (1, 2, 4, 8, then every 8 up to 64
and every 16 beyond, the last bucket being ``max_num_seqs``); padding rows write nowhere (slot -1)
and attend to nothing (sequence length 0), so the real rows' results do not depend on them.

The model runner owns the buffers and supplies two callables:
- ``fill(num_real, num_padded)``: rows ``[0, num_real)`` already hold the step; make rows
  ``[num_real, num_padded)`` padding and copy rows ``[0, num_padded)`` to the device;
- ``forward(num_padded) -> Tensor[num_padded, ...]``: the model over those rows, reading only the
  static buffers and never synchronising with the host (no ``.item()``, ``.tolist()``, boolean
  indexing or shapes taken from data; engine/kernels' decode path reads every length from device
  memory), so it can be captured.

Bucketing and padding are separate from capture, so CPU tests exercise them: off CUDA, or with
``enforce_eager``, "replay" is an eager ``forward(bucket)`` over the same padded buffers.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, capped by (and ending at)
    ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4, *range(8, 65, 8), *range(80, max_num_seqs + 16, 16)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` rows; None when ``n`` exceeds the largest."""
    if n < 1:
        raise ValueError(f"a decode batch has at least one row, got {n}")
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class DecodeGraphRunner:
    """Pads a decode-only step to its bucket and replays that bucket's graph (CUDA), or calls
    ``forward(bucket)`` eagerly (elsewhere, or ``use_graphs=False``).

    ``buffers_key()``, when given, names the buffers' identity (e.g. their data pointers); when it
    changes (the runner reallocated them) every graph is dropped and recaptured on its next use,
    since a graph keeps reading the addresses it was captured with.

    The tensor a call returns is the graph's output buffer (its first rows are the real ones):
    consume it before the next call.
    """

    def __init__(
        self,
        forward: Callable[[int], torch.Tensor],
        fill: Callable[[int, int], None],
        max_num_seqs: int,
        device: torch.device,
        use_graphs: bool,
        buffers_key: Callable[[], object] | None = None,
    ) -> None:
        self.forward = forward
        self.fill = fill
        self.buckets = batch_buckets(max_num_seqs)
        self.device = device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.buffers_key = buffers_key
        self._key = buffers_key() if buffers_key else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.num_replays = 0
        self.num_eager = 0
        self.num_captures = 0
        self.capture_error: str | None = None  # set by a caller that fell back to eager

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        """Capture ``forward(size)`` over the rows ``fill`` prepared. The two warm-up runs before
        it (Triton compiles, cuBLAS picks algorithms, the allocator fills its pool) execute for
        real: with padding rows they write nothing; with a real step they write the same K/V the
        replay writes again."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            out = self.forward(size)
        self.graphs[size] = (graph, out)
        self.num_captures += 1

    def capture(self) -> float:
        """Capture every bucket, largest first (a smaller graph reuses the pool's memory), over
        padding rows only; call before serving. Returns the seconds taken (0 without graphs)."""
        if not self.use_graphs:
            return 0.0
        t = time.perf_counter()
        self._key = self.buffers_key() if self.buffers_key else None
        for size in sorted(self.buckets, reverse=True):
            self.fill(0, size)
            self._capture(size)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t
        logger.info(
            "captured %d decode graphs %s in %.1f s", len(self.graphs), self.buckets, seconds
        )
        return seconds

    def _check_buffers(self) -> None:
        if self.buffers_key is None:
            return
        key = self.buffers_key()
        if key != self._key:
            if self.graphs:
                logger.info("decode buffers reallocated: %d graphs dropped", len(self.graphs))
            self.graphs.clear()
            self._key = key

    def __call__(self, num_real: int) -> torch.Tensor:
        """Run a decode step whose ``num_real`` rows are in the buffers; returns
        ``[bucket, ...]`` (a step larger than every bucket runs eagerly, unpadded)."""
        size = bucket_for(num_real, self.buckets) or num_real
        self.fill(num_real, size)
        if not self.use_graphs or size not in self.buckets:
            self.num_eager += 1
            return self.forward(size)
        self._check_buffers()
        if size not in self.graphs:
            self._capture(size)
        graph, out = self.graphs[size]
        graph.replay()
        self.num_replays += 1
        return out
