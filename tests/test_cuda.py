"""GPU tests of the CUDA kernels: exactness, invariance (bitwise) and closeness to plain torch.

Every test here is marked ``cuda`` and skipped without a GPU and a CUDA build of margingate. The
invariance properties are the same as on the CPU and are checked with ``torch.equal``:
a row / query computed alone, at another position of a batch, with other strides, with more left
padding, or as part of a prefill instead of a decode step gives the very same bits. CUDA results
need not equal the CPU's bit for bit (different reduction trees), only be close.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import margingate  # noqa: F401  (loads the native library)

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Closeness tolerances (absolute, on O(1) values) against a float64 reference, per dtype: the
# output rounding of the dtype plus fp32 accumulation differences.
ATTENTION_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float32, seed=0, device=None):
    """Seeded random normal values drawn on the target device (fast for the large shapes)."""
    device = device or DEVICE
    return torch.randn(*shape, generator=_gen(seed, device), device=device).to(dtype)


def mg_margin(x):
    return torch.ops.margingate.margin.default(x)


def mg_linear(x, w, b=None):
    return torch.ops.margingate.linear.default(x, w, b)


def mg_attention(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    return torch.ops.margingate.attention.default(
        q, k, v, kv_start, kv_rows, causal=causal, scale=scale, window=window
    )


def cpu_op_available(name: str, *args) -> bool:
    """Whether the CPU build registers `name` (the CPU kernels are written in parallel with these)."""
    try:
        getattr(torch.ops.margingate, name).default(*args)
        return True
    except NotImplementedError:
        return False
    except RuntimeError as e:  # "could not run ... with arguments from the 'CPU' backend"
        if "CPU" in str(e) and "backend" in str(e):
            return False
        raise


# =============================================================================== margin
def margin_reference(x: torch.Tensor):
    """top1 = argmax (first index on ties); top2 = argmax with top1 removed; computed in fp32."""
    v = x.float()
    top1 = v.argmax(dim=1)
    masked = v.clone()
    masked[torch.arange(v.shape[0], device=v.device), top1] = -math.inf
    # argmax of the rest, first index on ties; the removed slot must not win an all--inf row
    is_top1 = torch.zeros_like(masked, dtype=torch.bool)
    is_top1[torch.arange(v.shape[0], device=v.device), top1] = True
    best = masked.max(dim=1).values
    candidates = (masked == best[:, None]) & ~is_top1
    top2 = candidates.float().argmax(dim=1)
    rows = torch.arange(v.shape[0], device=v.device)
    gap = v[rows, top1] - v[rows, top2]
    gap = torch.where(v[rows, top1] == v[rows, top2], torch.zeros_like(gap), gap)
    return top1, top2, gap


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


def test_margin_empty_batch():
    top1, top2, gap = mg_margin(torch.empty(0, 10, device=DEVICE))
    assert top1.shape == top2.shape == gap.shape == (0,)


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


def test_margin_rows_are_independent():
    x = randn(200, 32000, dtype=torch.bfloat16, seed=4)
    full = mg_margin(x)
    for i in (0, 1, 77, 199):
        alone = mg_margin(x[i : i + 1])
        for a, b in zip(alone, full, strict=True):
            assert torch.equal(a, b[i : i + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_cuda_equals_cpu(dtype):
    # margin involves no rounding, so CUDA and CPU agree exactly.
    x = randn(17, 50000, dtype=dtype, seed=5)
    x[3, 100] = math.nan
    for a, b in zip(mg_margin(x), mg_margin(x.cpu()), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


def test_margin_opcheck():
    torch.library.opcheck(torch.ops.margingate.margin.default, (randn(4, 1000, dtype=torch.bfloat16),))


# =============================================================================== kv_patch_
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


# =============================================================================== linear
# Llama-3.1-8B / Qwen2.5-7B projections (K, N), trimmed where a test only needs the shape class.
LINEAR_SHAPES = [(4096, 6144), (3584, 4608), (14336, 512), (100, 72), (8, 3), (1000, 1001)]
# M values that hit every tile configuration (<= 16, <= 32, <= 256, > 256) and their edges.
M_VALUES = [1, 2, 15, 16, 17, 32, 33, 100, 256, 257, 300]


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
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    vendor = F.linear(x, w, bias)  # cuBLAS at the same precision: the yardstick for rounding error
    err = (got.double() - ref).abs().max().item()
    vendor_err = (vendor.double() - ref).abs().max().item()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert err <= 2 * vendor_err + atol, (err, vendor_err)


def test_linear_k_zero_and_empty():
    w = randn(5, 0)
    b = randn(5, seed=1)
    assert torch.equal(mg_linear(randn(3, 0), w, b), b.expand(3, 5))
    assert mg_linear(randn(0, 8), randn(5, 8)).shape == (0, 5)


def test_linear_cuda_close_to_cpu():
    x = randn(9, 1000, dtype=torch.bfloat16, seed=22)
    w = randn(300, 1000, dtype=torch.bfloat16, seed=23) / 30
    if not cpu_op_available("linear", x[:1].cpu(), w[:1].cpu(), None):
        pytest.skip("this build has no CPU linear kernel yet")
    got = mg_linear(x, w).float().cpu()
    cpu = mg_linear(x.cpu(), w.cpu()).float()
    torch.testing.assert_close(got, cpu, atol=2e-2, rtol=1e-2)


def test_linear_errors():
    with pytest.raises(RuntimeError, match="margingate.linear: weight has 7 input features"):
        mg_linear(randn(2, 8), randn(3, 7))
    with pytest.raises(RuntimeError, match="all arguments must be on one device"):
        mg_linear(randn(2, 8), randn(3, 8, device="cpu"))


def test_linear_opcheck():
    x = randn(3, 64, dtype=torch.bfloat16)
    w = randn(16, 64, dtype=torch.bfloat16, seed=1)
    torch.library.opcheck(
        torch.ops.margingate.linear.default, (x, w, randn(16, dtype=torch.bfloat16, seed=2))
    )


# =============================================================================== attention
def attention_reference(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    """Plain torch, float64, explicit mask; queries with no visible key give zeros."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if kv_rows is not None:
        k, v = k[kv_rows.long()], v[kv_rows.long()]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    t = torch.arange(Tk, device=q.device)
    pos = Tk - Tq + torch.arange(Tq, device=q.device)
    start = torch.zeros(B, dtype=torch.long, device=q.device) if kv_start is None else kv_start.long()
    visible = t[None, None, :] >= start[:, None, None]  # [B, 1, Tk]
    visible = visible & torch.ones(B, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (t[None, None, :] <= pos[None, :, None])
    if window is not None and window > 0:
        visible = visible & (t[None, None, :] > pos[None, :, None] - window)
    visible = visible[:, None]  # [B, 1, Tq, Tk]
    scores = scores.masked_fill(~visible, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vv)


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


def test_attention_fully_masked_queries_are_zero():
    q = randn(2, 4, 3, 64)
    k = randn(2, 2, 10, 64, seed=1)
    v = randn(2, 2, 10, 64, seed=2)
    out = mg_attention(q, k, v, torch.tensor([10, 9], device=DEVICE))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1, :, :2].abs().sum() == 0 and out[1, :, 2].abs().sum() > 0


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


def test_attention_cuda_close_to_cpu():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16, seed=60)
    k = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=61)
    v = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=62)
    if not cpu_op_available("attention", q.cpu(), k.cpu(), v.cpu()):
        pytest.skip("this build has no CPU attention kernel yet")
    start = torch.tensor([0, 5])
    got = mg_attention(q, k, v, start.to(DEVICE)).float().cpu()
    cpu = mg_attention(q.cpu(), k.cpu(), v.cpu(), start).float()
    torch.testing.assert_close(got, cpu, atol=3e-2, rtol=2e-2)


def test_attention_errors():
    q = randn(1, 3, 1, 64)
    k = randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        mg_attention(q, k, k)
    with pytest.raises(RuntimeError, match="head_dim must be in"):
        mg_attention(randn(1, 2, 1, 512), randn(1, 2, 8, 512), randn(1, 2, 8, 512))


def test_attention_opcheck():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16)
    k = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=1)
    v = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=2)
    torch.library.opcheck(
        torch.ops.margingate.attention.default, (q, k, v, torch.tensor([0, 3], device=DEVICE))
    )


# =============================================================================== HF models on CUDA
def tiny_llama(dtype=torch.bfloat16):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


def test_batch_invariant_mode_on_cuda_model():
    if not hasattr(margingate, "batch_invariant"):
        pytest.skip("margingate.batch_invariant() is not in this build yet")
    model = tiny_llama()
    ids = torch.randint(0, 256, (4, 20), generator=_gen(70)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[3, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), margingate.batch_invariant():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i in range(4):
            keep = mask[i].bool()
            alone = model(
                input_ids=ids[i : i + 1, keep],
                attention_mask=mask[i : i + 1, keep],
                position_ids=positions[i : i + 1, keep],
            ).logits
            assert torch.equal(alone[0, -1], batched[i, -1]), i


def test_generate_on_cuda_model():
    generate = getattr(margingate, "generate", None)
    if generate is None:
        pytest.skip("margingate.generate is not in this build yet")
    params = inspect.signature(generate).parameters
    if not {"input_ids", "max_new_tokens"} <= set(params):
        pytest.skip(f"margingate.generate has an unexpected signature {inspect.signature(generate)}")
    model = tiny_llama()
    ids = torch.randint(0, 256, (3, 12), generator=_gen(71)).to(DEVICE)
    kwargs = {"attention_mask": torch.ones_like(ids)} if "attention_mask" in params else {}
    batched = generate(model, input_ids=ids, max_new_tokens=8, **kwargs)
    sequences = batched.sequences if hasattr(batched, "sequences") else batched
    for i in range(3):
        kw = {"attention_mask": torch.ones_like(ids[i : i + 1])} if kwargs else {}
        alone = generate(model, input_ids=ids[i : i + 1], max_new_tokens=8, **kw)
        alone_seq = alone.sequences if hasattr(alone, "sequences") else alone
        assert torch.equal(alone_seq[0], sequences[i]), i


# =============================================================================== streams
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
