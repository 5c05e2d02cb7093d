"""linear on CUDA: rows batch-invariant bit for bit, close to the fp64 reference (tests/references.py)
judged against cuBLAS at the same precision.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from .conftest import DTYPES
from .cuda_support import DEVICE, cuda, mg_linear, randn
from .references import linear_reference

# Llama-3.1-8B / Qwen2.5-7B projections (K, N), trimmed where a test only needs the shape class.
# K = 1000 and 4000 are not multiples of 128 or 64: the decode (BK = 128) and prefill (BK = 64)
# tilings reach past K by different amounts, and must still run the same chain of MMAs.
LINEAR_SHAPES = [(4096, 6144), (3584, 4608), (14336, 512), (100, 72), (8, 3), (1000, 1001), (4000, 136)]
# M values that hit every tile configuration (<= 16, <= 32, <= 256, > 256) and their edges.
M_VALUES = [1, 2, 15, 16, 17, 32, 33, 100, 256, 257, 300]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("K", "N"), LINEAR_SHAPES)
def test_linear_rows_are_batch_invariant(dtype, K, N):
    x = randn(300, K, dtype=dtype, seed=K)
    w = randn(N, K, dtype=dtype, seed=N) / math.sqrt(K)
    bias = randn(N, dtype=dtype, seed=1)
    full = mg_linear(x, w, bias)
    for m in M_VALUES:
        for start in {0, 300 - m, (300 - m) // 2}:
            part = mg_linear(x[start : start + m], w, bias)
            assert torch.equal(part, full[start : start + m]), (m, start)
    # strided views of x and w (element loads instead of cp.async) give the same bits
    x_wide = torch.zeros(300, K + 3, dtype=dtype, device=DEVICE)
    x_wide[:, 1 : K + 1] = x
    assert torch.equal(mg_linear(x_wide[:, 1 : K + 1], w, bias), full)
    w_t = w.t().contiguous().t()  # column-major weight
    assert torch.equal(mg_linear(x, w_t, bias), full)
    assert torch.equal(mg_linear(x[::2], w, bias), full[::2])
    # leading dims are flattened: [a, b, K] rows are rows
    assert torch.equal(mg_linear(x.view(3, 100, K), w, bias).view(300, N), full)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("M", "K", "N"),
    [
        (1, 4096, 4096),
        (8, 4096, 14336),
        (32, 3584, 3584),
        (128, 1000, 200),
        (4096, 512, 256),
        (5, 8, 3),
        (3, 7, 5),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_close_to_torch(dtype, M, K, N, with_bias):
    x = randn(M, K, dtype=dtype, seed=M)
    w = randn(N, K, dtype=dtype, seed=K) / math.sqrt(K)
    bias = randn(N, dtype=dtype, seed=N) if with_bias else None
    got = mg_linear(x, w, bias)
    ref = linear_reference(x, w, bias)
    vendor = F.linear(x, w, bias)  # cuBLAS at the same precision: the yardstick for rounding error
    err = (got.double() - ref).abs().max().item()
    vendor_err = (vendor.double() - ref).abs().max().item()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert err <= 2 * vendor_err + atol, (err, vendor_err)


@cuda
def test_linear_k_zero_and_empty():
    w = randn(5, 0)
    b = randn(5, seed=1)
    assert torch.equal(mg_linear(randn(3, 0), w, b), b.expand(3, 5))
    assert mg_linear(randn(0, 8), randn(5, 8)).shape == (0, 5)


@cuda
def test_linear_cuda_close_to_cpu():
    x = randn(9, 1000, dtype=torch.bfloat16, seed=22)
    w = randn(300, 1000, dtype=torch.bfloat16, seed=23) / 30
    got = mg_linear(x, w).float().cpu()
    cpu = mg_linear(x.cpu(), w.cpu()).float()
    torch.testing.assert_close(got, cpu, atol=2e-2, rtol=1e-2)


@cuda
def test_linear_device_mix():
    with pytest.raises(RuntimeError, match="margingate.linear: x and weight must be on the same device"):
        mg_linear(randn(2, 8), randn(3, 8, device="cpu"))
    with pytest.raises(RuntimeError, match="margingate.linear: bias must be on x's device"):
        mg_linear(randn(2, 8), randn(3, 8), randn(3, device="cpu"))


@cuda
def test_linear_opcheck():
    x = randn(3, 64, dtype=torch.bfloat16)
    w = randn(16, 64, dtype=torch.bfloat16, seed=1)
    torch.library.opcheck(
        torch.ops.margingate.linear.default, (x, w, randn(16, dtype=torch.bfloat16, seed=2))
    )
