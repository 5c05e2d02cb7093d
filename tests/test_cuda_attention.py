"""attention on CUDA: query, padding and batch invariance bit for bit, closeness to the fp64
reference (tests/references.py), torch's semantics for non-finite inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import DTYPES
from .cuda_support import DEVICE, cuda, mg_attention, randn
from .references import attention_reference, softmax_attention_reference

# Closeness tolerances (absolute, on O(1) values) against a float64 reference, per dtype: the
# output rounding of the dtype plus fp32 accumulation differences.
ATTENTION_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

def embed(seq: torch.Tensor, pad: int, seed: int = 0) -> torch.Tensor:
    """[H, L, D] -> [1, H, pad + L, D] with large random garbage in the padding (it must be ignored)."""
    H, L, D = seq.shape
    out = randn(1, H, pad + L, D, dtype=seq.dtype, seed=seed) * 100
    out[0, :, pad : pad + L] = seq
    return out


ATTN_CONFIGS = [
    # (Hq, Hkv, D)
    (8, 2, 128),
    (4, 4, 64),
    (20, 2, 64),  # group of 10 > 8 warps per block: two head blocks
    (2, 1, 256),
    (4, 2, 80),
    (2, 2, 40),
]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("Hq", "Hkv", "D"), ATTN_CONFIGS)
@pytest.mark.parametrize("window", [None, 100])
def test_attention_query_invariance(dtype, Hq, Hkv, D, window):
    """One sequence: alone, left-padded inside a batch, as decode steps, as a window replay and as a
    prefill, with the split-KV path (few blocks) and the one-block-per-query path (many blocks)."""
    L = 700  # three chunks of 256 keys: the in-order combine is exercised
    q_seq = randn(Hq, L, D, dtype=dtype, seed=30)
    k_seq = randn(Hkv, L, D, dtype=dtype, seed=31)
    v_seq = randn(Hkv, L, D, dtype=dtype, seed=32)

    def run(pad, n_queries, batch_others=0, end=L):
        """The last n_queries queries ending at `end`, with `pad` padding keys before the sequence."""
        k = embed(k_seq[:, :end], pad, seed=33)
        v = embed(v_seq[:, :end], pad, seed=34)
        q = q_seq[None, :, end - n_queries : end]
        start = torch.tensor([pad], device=DEVICE)
        if batch_others:
            Tk = k.shape[2]
            k = torch.cat([k, randn(batch_others, Hkv, Tk, D, dtype=dtype, seed=35)])
            v = torch.cat([v, randn(batch_others, Hkv, Tk, D, dtype=dtype, seed=36)])
            q = torch.cat([q, randn(batch_others, Hq, n_queries, D, dtype=dtype, seed=37)])
            start = torch.cat([start, torch.arange(batch_others, device=DEVICE) % Tk])
        return mg_attention(q, k, v, start, window=window)[0]

    prefill = run(0, L)
    ref = attention_reference(q_seq[None], k_seq[None], v_seq[None], window=window)[0]
    assert (prefill.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype]
    assert torch.equal(run(37, L), prefill)
    assert torch.equal(run(5, L, batch_others=3), prefill)
    for end in (1, 255, 256, 257, 513, L):
        decode = run(0, 1, end=end)  # few blocks: keys split across blocks
        assert torch.equal(decode, prefill[:, end - 1 : end]), end
        # 601 rows: enough blocks (>= 4 per SM on 132 SMs) that the keys are not split
        assert torch.equal(run(300, 1, end=end, batch_others=600), decode), end
    replay = run(11, 4, end=600)
    assert torch.equal(replay, prefill[:, 596:600])


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_close_to_reference(dtype):
    B, Hq, Hkv, Tq, Tk, D = 3, 8, 2, 5, 300, 128
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=40)
    k = randn(B, Hkv, Tk, D, dtype=dtype, seed=41)
    v = randn(B, Hkv, Tk, D, dtype=dtype, seed=42)
    start = torch.tensor([0, 17, 299], device=DEVICE)
    for causal, window, scale in [
        (True, None, None),
        (False, None, 0.3),
        (True, 64, None),
        (False, 10, None),
    ]:
        got = mg_attention(q, k, v, start, causal=causal, scale=scale, window=window)
        ref = attention_reference(q, k, v, start, causal=causal, scale=scale, window=window)
        assert (got.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype], (causal, window)


@cuda
def test_attention_fully_masked_queries_are_zero():
    q = randn(2, 4, 3, 64)
    k = randn(2, 2, 10, 64, seed=1)
    v = randn(2, 2, 10, 64, seed=2)
    out = mg_attention(q, k, v, torch.tensor([10, 9], device=DEVICE))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1, :, :2].abs().sum() == 0 and out[1, :, 2].abs().sum() > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kv_rows_and_strides(dtype):
    B, Hq, Hkv, Tq, Tk, D = 3, 4, 2, 2, 90, 64
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=50)
    k_bthd = randn(5, Tk, Hkv, D, dtype=dtype, seed=51)
    v_bthd = randn(5, Tk, Hkv, D, dtype=dtype, seed=52)
    k, v = k_bthd.transpose(1, 2), v_bthd.transpose(1, 2)  # [Bkv, Hkv, Tk, D] views, strided
    rows = torch.tensor([4, 0, 4], device=DEVICE)
    start = torch.tensor([3, 0, 50], device=DEVICE)
    got = mg_attention(q, k, v, start, rows)
    gathered = mg_attention(q, k[rows].contiguous(), v[rows].contiguous(), start)
    assert torch.equal(got, gathered)
    # element loads (odd head_dim slice) and vector loads agree
    k_odd = torch.zeros(5, Hkv, Tk, D + 1, dtype=dtype, device=DEVICE)
    k_odd[..., 1:] = k
    assert torch.equal(mg_attention(q, k_odd[..., 1:], v, start, rows), got)
    ref = attention_reference(q, k, v, start, rows)
    assert (got.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype]


@cuda
def test_attention_cuda_close_to_cpu():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16, seed=60)
    k = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=61)
    v = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=62)
    start = torch.tensor([0, 5])
    got = mg_attention(q, k, v, start.to(DEVICE)).float().cpu()
    cpu = mg_attention(q.cpu(), k.cpu(), v.cpu(), start).float()
    torch.testing.assert_close(got, cpu, atol=3e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_attention_cpu_indices_equal_device_indices(index_dtype):
    """kv_start / kv_rows may live on the CPU (checked there, copied asynchronously) or the GPU
    (copied to the host for the check): the same bits either way."""
    q = randn(3, 4, 2, 64, dtype=torch.bfloat16, seed=63)
    k = randn(4, 2, 50, 64, dtype=torch.bfloat16, seed=64)
    v = randn(4, 2, 50, 64, dtype=torch.bfloat16, seed=65)
    start = torch.tensor([0, 7, 49], dtype=index_dtype)
    rows = torch.tensor([3, 0, 3], dtype=index_dtype)
    on_gpu = mg_attention(q, k, v, start.to(DEVICE), rows.to(DEVICE))
    assert torch.equal(mg_attention(q, k, v, start, rows), on_gpu)
    with pytest.raises(IndexError, match="kv_start\\[2\\] = 51 is out of range"):
        mg_attention(q, k, v, torch.tensor([0, 0, 51], device=DEVICE), rows)
    assert torch.equal(mg_attention(q, k, v, start, rows), on_gpu)  # the context is alive


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tk", [40, 700])  # one block per query / keys split across blocks
def test_attention_non_finite_inputs_propagate_like_torch(dtype, Tk):
    """A NaN in q, a NaN or a +inf in a visible key (a NaN or +inf score) makes the query's
    whole output NaN, as torch's attention does; a NaN in a visible value makes that dimension NaN;
    a key that is masked (padding, future) is never read, so its NaN changes nothing."""
    B, Hq, Hkv, Tq, D = 4, 4, 2, 2, 64
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=66)
    k = randn(B, Hkv, Tk, D, dtype=dtype, seed=67)
    v = randn(B, Hkv, Tk, D, dtype=dtype, seed=68)
    clean = mg_attention(q, k, v)
    q[0, 1, 0, 3] = math.nan  # row 0, head 1, first query: NaN scores
    k[1, 0, Tk // 2, 5] = math.nan  # row 1, kv head 0: every query of heads 0, 1 sees that key
    k[2, 1, 3, :] = math.inf  # row 2, kv head 1: +inf scores ...
    q[2, 2:] = q[2, 2:].abs()  # ... for heads 2, 3 (q > 0)
    v[3, 0, 0, 7] = math.nan  # row 3, kv head 0, dimension 7 of a visible value
    k[3, 1, Tk - 1, :] = math.nan  # row 3, kv head 1: the last key, visible only to the last query
    got = mg_attention(q, k, v)
    ref = softmax_attention_reference(q, k, v)
    assert torch.equal(got.isnan(), ref.isnan()), (got.isnan().sum(), ref.isnan().sum())
    assert got[0, 1, 0].isnan().all() and got[1, :2].isnan().all() and got[2, 2:].isnan().all()
    assert got[3, :2, :, 7].isnan().all() and not got[3, :2, :, :7].isnan().any()
    assert got[3, 2:, 1].isnan().all() and not got[3, 2:, 0].isnan().any()
    # Every query without a non-finite input keeps its clean bits.
    finite = ~ref.isnan().any(-1, keepdim=True).expand_as(ref)
    assert torch.equal(got[finite], clean[finite])


@cuda
def test_attention_all_minus_inf_scores_give_nan_and_no_keys_give_zeros():
    q = randn(2, 2, 1, 64, seed=69)
    k = randn(2, 2, 30, 64, seed=70)
    v = randn(2, 2, 30, 64, seed=71)
    k[0] = -math.inf
    q[0] = q[0].abs() + 1  # every score of row 0 is -inf (torch's softmax: NaN)
    got = mg_attention(q, k, v, torch.tensor([0, 30], device=DEVICE))  # row 1: no visible key
    assert got[0].isnan().all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert softmax_attention_reference(q[:1], k[:1], v[:1]).isnan().all()


@cuda
def test_attention_opcheck():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16)
    k = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=1)
    v = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=2)
    torch.library.opcheck(
        torch.ops.margingate.attention.default, (q, k, v, torch.tensor([0, 3], device=DEVICE))
    )
