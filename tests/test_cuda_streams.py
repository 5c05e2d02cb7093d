"""The CUDA ops launch on torch's current stream and can be captured in a CUDA graph."""

from __future__ import annotations

import torch

from .cuda_support import DEVICE, cuda, mg_attention, mg_linear, mg_margin, randn


@cuda
def test_ops_run_on_the_current_stream_and_capture_in_cuda_graphs():
    """Capturing into a CUDA graph fails if a kernel goes to the legacy default stream or the op
    synchronises, so this checks that margin / linear / attention launch on torch's current stream
    (and that they can be replayed from a graph in a decode loop)."""
    logits = randn(8, 50000, dtype=torch.bfloat16, seed=80)  # 8 rows: split rows + merge kernel
    x = randn(4, 512, dtype=torch.bfloat16, seed=81)
    w = randn(256, 512, dtype=torch.bfloat16, seed=82)
    q = randn(1, 8, 1, 128, dtype=torch.bfloat16, seed=83)
    k = randn(1, 2, 1000, 128, dtype=torch.bfloat16, seed=84)  # few blocks: split keys + combine
    v = randn(1, 2, 1000, 128, dtype=torch.bfloat16, seed=85)
    start = torch.tensor([3], device=DEVICE)

    def step():
        return mg_margin(logits), mg_linear(x, w), mg_attention(q, k, v, start)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm-up (and lazy attribute setup) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured[0], eager[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(captured[1], eager[1])
    assert torch.equal(captured[2], eager[2])
