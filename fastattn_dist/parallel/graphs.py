"""Replaying the tiled block as one CUDA graph when shapes repeat.

Per tile the pipeline issues a handful of kernels (attention, GEMM, all-reduce, event waits);
Python and launch overhead per tile is what makes small tiles expensive. A CUDA graph records the
whole block once and replays it with one launch. ``CapturedCall`` holds static input and output
buffers: inputs are copied in, the graph replays, the static output is returned (overwritten by the
next replay). The capture function is injectable so the buffer logic is tested on CPU too.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

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
    return graph.replay


def run_eagerly(fn: Callable[[], None]) -> Callable[[], None]:
    """The CPU stand-in for ``capture_cuda``: 'replay' runs ``fn`` again on the same buffers."""
    fn()
    return fn


class CapturedCall:
    """``fn(*inputs, out=...)`` on fixed-shape static buffers, captured once, replayed per call."""

    def __init__(self, fn: Callable, example_inputs: Sequence[torch.Tensor], out_shape: Tuple[int, ...],
                 capture: Callable = capture_cuda) -> None:
        self.static_in = [t.detach().clone() for t in example_inputs]
        ref = example_inputs[0]
        self.static_out = torch.empty(out_shape, dtype=ref.dtype, device=ref.device)
        self._replay = capture(lambda: fn(*self.static_in, out=self.static_out))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for s, t in zip(self.static_in, inputs):
            s.copy_(t)
        self._replay()
        return self.static_out
