"""kv_patch_ on CUDA: exactly the named columns written, bad indices write nothing."""

from __future__ import annotations

import pytest
import torch

import margingate

from .conftest import DTYPES
from .cuda_support import DEVICE, cuda, randn


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_device", ["cpu", "cuda"])
def test_kv_patch_exact(dtype, index_device):
    k = randn(4, 3, 50, 64, dtype=dtype, seed=6)
    v = randn(4, 3, 50, 64, dtype=dtype, seed=7)
    rows = torch.tensor([2, 0, 2], device=index_device)
    positions = torch.tensor([49, 0, 10], dtype=torch.int32, device=index_device)
    kn = randn(3, 3, 64, dtype=dtype, seed=8)
    vn = randn(3, 3, 64, dtype=dtype, seed=9)
    k_ref, v_ref = k.clone(), v.clone()
    for i in range(3):
        k_ref[rows[i], :, positions[i]] = kn[i]
        v_ref[rows[i], :, positions[i]] = vn[i]
    margingate.kv_patch_(k, v, rows, positions, kn, vn)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@cuda
def test_kv_patch_strided_cache():
    # HF-style cache view: storage [B, T, H, D], seen as [B, H, T, D].
    k = randn(2, 40, 4, 32, seed=10).transpose(1, 2)
    v = randn(2, 40, 4, 32, seed=11).transpose(1, 2)
    kn = randn(2, 32, 4, seed=12).transpose(1, 2)  # [2, 4, 32], strided
    vn = randn(2, 4, 32, seed=13)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[1, :, 39] = kn[0]
    k_ref[0, :, 5] = kn[1]
    v_ref[1, :, 39] = vn[0]
    v_ref[0, :, 5] = vn[1]
    margingate.kv_patch_(k, v, torch.tensor([1, 0]), torch.tensor([39, 5]), kn, vn)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@cuda
@pytest.mark.parametrize(
    ("rows", "positions", "message"),
    [
        ([0, 4], [1, 2], "rows\\[1\\] = 4"),
        ([0, 1], [1, -1], "positions\\[1\\]"),
        ([1, 1], [3, 3], "more than once"),
    ],
)
def test_kv_patch_bad_index_writes_nothing(rows, positions, message):
    k = randn(4, 2, 8, 16, seed=14)
    v = randn(4, 2, 8, 16, seed=15)
    k0, v0 = k.clone(), v.clone()
    with pytest.raises(RuntimeError, match=message):
        margingate.kv_patch_(
            k,
            v,
            torch.tensor(rows, device=DEVICE),
            torch.tensor(positions, device=DEVICE),
            randn(2, 2, 16, seed=16),
            randn(2, 2, 16, seed=17),
        )
    torch.cuda.synchronize()
    assert torch.equal(k, k0) and torch.equal(v, v0)


@cuda
def test_kv_patch_opcheck():
    k = randn(2, 2, 8, 16, seed=18)
    v = randn(2, 2, 8, 16, seed=19)
    args = (
        k,
        v,
        torch.tensor([1], device=DEVICE),
        torch.tensor([3], device=DEVICE),
        randn(1, 2, 16, seed=20),
        randn(1, 2, 16, seed=21),
    )
    torch.library.opcheck(torch.ops.margingate.kv_patch_.default, args)
