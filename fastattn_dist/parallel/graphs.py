"""Replaying the tiled block as one CUDA graph when shapes repeat.

Per tile the pipeline issues a handful of kernels (attention, GEMM, all-reduce, event waits) on
several streams; Python and launch overhead per tile is what makes small tiles expensive. A CUDA
graph records the whole block once and replays it with one launch. ``CapturedCall`` owns every
buffer its graph touches: static inputs (copied in per call), the static output, and whatever the
captured code allocates (the graph's private memory pool), so no later call can free or replace
memory a graph still writes. The capture function is injectable so the buffer logic runs on CPU too.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def capture_cuda(fn: Callable[[], None], warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn`` (which writes into preallocated buffers) as a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: autotuning, NCCL setup, allocator
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return lambda: graph.replay()  # the closure keeps the graph (and its memory pool) alive


def run_eagerly(fn: Callable[[], None]) -> Callable[[], None]:
    """The CPU stand-in for ``capture_cuda``: 'replay' runs ``fn`` again on the same buffers."""
    fn()
    return fn


class CapturedCall:
    """``fn(*static_inputs, out=static_out)`` captured once, replayed per call with fresh inputs copied in.

    ``example_inputs`` may hold None (an absent optional input, e.g. no key lengths); it stays None.
    """

    def __init__(self, fn: Callable, example_inputs: Sequence[Optional[torch.Tensor]], out_shape: Tuple[int, ...],
                 capture: Callable = capture_cuda) -> None:
        self.static_in = [None if t is None else t.detach().clone() for t in example_inputs]
        ref = next(t for t in example_inputs if t is not None)
        self.static_out = torch.empty(out_shape, dtype=ref.dtype, device=ref.device)
        self._replay = capture(lambda: fn(*self.static_in, out=self.static_out))

    def __call__(self, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
        for s, t in zip(self.static_in, inputs):
            if s is not None:
                s.copy_(t)
        self._replay()
        return self.static_out
