"""What the CUDA tests (test_cuda_*.py) share: the one GPU marker, the device, seeded inputs drawn
on it, and the raw op calls (``torch.ops.margingate.<op>.default``, no Python wrapper between).

Tests marked ``cuda`` need a GPU and a CUDA build of margingate and are skipped without one
(``conftest.py``). The invariance properties are the same as on the CPU and are checked with
``torch.equal``: a row / query computed alone, at another position of a batch, with other strides,
with more left padding, or as part of a prefill instead of a decode step gives the very same bits.
CUDA results need not equal the CPU's bit for bit (different reduction trees), only be close.
``bench/gpu_check.sh`` runs these files on a GPU machine, one test function per process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import margingate  # noqa: F401  (loads the native library: torch.ops.margingate)

cuda = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float32, seed=0, device=None):
    """Seeded random normal values drawn on the target device (fast for the large shapes)."""
    device = device or DEVICE
    return torch.randn(*shape, generator=seeded(seed, device), device=device).to(dtype)


def mg_margin(x):
    return torch.ops.margingate.margin.default(x)


def mg_linear(x, w, b=None):
    return torch.ops.margingate.linear.default(x, w, b)


def mg_attention(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    return torch.ops.margingate.attention.default(
        q, k, v, kv_start, kv_rows, causal=causal, scale=scale, window=window
    )
