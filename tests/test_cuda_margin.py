"""margin on CUDA: exact against the shared reference (tests/references.py), and equal to the CPU op."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import DTYPES
from .cuda_support import DEVICE, cuda, mg_margin, randn
from .references import margin_reference


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 2), (3, 7), (5, 1000), (64, 128256), (2, 152064), (1, 262147), (300, 515)]
)
def test_margin_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=shape[1])
    top1, top2, gap = mg_margin(x)
    r1, r2, rg = margin_reference(x)
    assert torch.equal(top1, r1)
    assert torch.equal(top2, r2)
    assert torch.equal(gap, rg)
    assert torch.equal(top1, x.argmax(dim=1))


@cuda
def test_margin_empty_batch():
    top1, top2, gap = mg_margin(torch.empty(0, 10, device=DEVICE))
    assert top1.shape == top2.shape == gap.shape == (0,)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_ties_and_infinities(dtype):
    x = torch.zeros(4, 9000, dtype=dtype, device=DEVICE)
    x[0, 17] = 3.0
    x[0, 8000] = 3.0  # tie: first index is top1, the other top2, margin exactly 0
    x[1, :] = -math.inf  # all -inf: top1 = 0, top2 = 1, tie
    x[2, 5] = math.inf
    x[2, 6000] = math.inf
    x[3, 8999] = 1.0
    top1, top2, gap = mg_margin(x)
    assert top1.tolist() == [17, 0, 5, 8999]
    assert top2.tolist() == [8000, 1, 6000, 0]
    assert gap.tolist() == [0.0, 0.0, 0.0, 1.0]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_nan_rows(dtype):
    x = randn(3, 20000, dtype=dtype, seed=1)
    x[0, 12345] = math.nan
    x[1, 7] = math.nan
    x[1, 19000] = math.nan
    top1, top2, gap = mg_margin(x)
    assert top1.tolist()[:2] == [12345, 7]
    assert top1.tolist() == x.cpu().argmax(dim=1).tolist()
    assert top2[1].item() == 19000
    assert top2[0].item() == x[0].float().nan_to_num(-math.inf).argmax().item()
    assert gap[:2].isnan().all() and not gap[2].isnan()


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_strides_and_offsets_are_exact(dtype):
    base = randn(8, 70001, dtype=dtype, seed=2)
    ref = mg_margin(base[:, 1:].contiguous())
    for view in (base[:, 1:], base.t().contiguous().t()[:, 1:], base[:, 1:][::1]):
        got = mg_margin(view)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)
    strided = randn(8, 2 * 70000, dtype=dtype, seed=3)[:, ::2]
    for a, b in zip(mg_margin(strided), mg_margin(strided.contiguous()), strict=True):
        assert torch.equal(a, b)


@cuda
def test_margin_rows_are_independent():
    x = randn(200, 32000, dtype=torch.bfloat16, seed=4)
    full = mg_margin(x)
    for i in (0, 1, 77, 199):
        alone = mg_margin(x[i : i + 1])
        for a, b in zip(alone, full, strict=True):
            assert torch.equal(a, b[i : i + 1])


@cuda
def test_margin_last_columns_of_the_widest_row():
    """V = 2^31 - 1 (the contract's limit; 4 GiB in bf16): one row is split into segments, and the
    last segment must end at the last column (32-bit column arithmetic used to wrap there and skip
    the row's last ~8M columns)."""
    V = 2**31 - 1
    if torch.cuda.get_device_properties(0).total_memory < 3 * V * 2:
        pytest.skip("needs ~13 GiB of GPU memory")
    x = torch.zeros(1, V, dtype=torch.bfloat16, device=DEVICE)
    x[0, V - 1] = 3.0
    x[0, V - 9] = 2.0
    x[0, 5] = 1.0
    top1, top2, gap = mg_margin(x)
    assert (top1.item(), top2.item(), gap.item()) == (V - 1, V - 9, 1.0)
    x[0, V - 1] = math.nan
    top1, top2, gap = mg_margin(x)
    assert (top1.item(), top2.item()) == (V - 1, V - 9) and math.isnan(gap.item())
    strided = x.view(-1)[: V - 1 : 2][None]  # col_stride 2 reaches the far end as well
    assert mg_margin(strided)[0].item() == (V - 9) // 2


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_cuda_equals_cpu(dtype):
    # margin involves no rounding, so CUDA and CPU agree exactly.
    x = randn(17, 50000, dtype=dtype, seed=5)
    x[3, 100] = math.nan
    for a, b in zip(mg_margin(x), mg_margin(x.cpu()), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


@cuda
def test_margin_opcheck():
    torch.library.opcheck(torch.ops.margingate.margin.default, (randn(4, 1000, dtype=torch.bfloat16),))
