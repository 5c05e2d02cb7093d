"""margingate.attention: accuracy against an fp64 reference, and the invariances bit for bit."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import margingate

from .conftest import DTYPES
from .references import attention_reference, visible_mask

# The flash-attention rule: our error may be at most twice that of plain torch computing the same
# attention in fp32 and rounding to the dtype, plus a small absolute slack for the exp2
# polynomial (~2e-7 relative) that torch's exp does not share.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def chain_error_bound(q, k, v, kv_rows=None, scale=None):
    """Rounding-error bound of our fp32 arithmetic beyond torch's: each score q.k is one sequential
    fp32 chain over D (torch's matmul is blocked), whose error is at most D * eps * sum|q_i k_i| *
    scale; softmax turns a score error into the same relative error of the weights, so the output
    moves by at most that times max|v|. It matters for fp32 with large scores (scale=1, D=256)."""
    if kv_rows is not None:
        k, v = k[kv_rows.long()], v[kv_rows.long()]
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    kk = k.double().abs().repeat_interleave(groups, dim=1)
    dot = (q.double().abs() @ kk.transpose(-1, -2)).max().item() if q.numel() and kk.numel() else 0.0
    return D * 2.0**-24 * dot * abs(scale) * (v.double().abs().max().item() if v.numel() else 0.0)


def assert_close_to_reference(out, args, kwargs, factor=2.0):
    """`out` vs the fp64 reference, judged against plain torch in fp32 rounded to out's dtype."""
    if out.numel() == 0:
        return
    ref = attention_reference(*args, **kwargs)
    torch_fp32 = attention_reference(*args, **kwargs, compute=torch.float32).to(out.dtype)
    baseline = (torch_fp32.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    kv_rows = args[4] if len(args) > 4 else kwargs.get("kv_rows")
    chain = chain_error_bound(*args[:3], kv_rows=kv_rows, scale=kwargs.get("scale"))
    if out.dtype != torch.float32:
        chain = 0.0  # below the output's own rounding
    assert err <= factor * baseline + chain + ATOL[out.dtype], f"max error {err} vs torch fp32 {baseline}"


def same_bits(a, b):
    """Bitwise equality (distinguishes -0 from +0 and compares NaN payloads)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- accuracy
@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([1, 3, 16, 33, 64, 80, 128, 256]))
    Tk = draw(st.integers(0, 200))
    Tq = draw(st.integers(0, Tk + 2))
    window = draw(st.one_of(st.none(), st.integers(1, Tk + 3)))
    causal = True if window is not None else draw(st.booleans())
    padded = draw(st.booleans())
    kv_start = (
        torch.tensor(draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B)), dtype=torch.int64)
        if padded
        else None
    )
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    layout = draw(st.sampled_from(["contiguous", "bthd", "capacity"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, B, Hkv, G, D, Tk, Tq, window, causal, kv_start, scale, layout, seed


@settings(max_examples=60, deadline=None)
@given(problems())
def test_matches_fp64_reference(problem):
    dtype, B, Hkv, G, D, Tk, Tq, window, causal, kv_start, scale, layout, seed = problem
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    if layout == "bthd":  # transformers' [B, T, H, D] storage seen through a transpose
        q = randn(B, Tq, Hq, D, dtype=dtype, gen=gen).transpose(1, 2)
        k = randn(B, Tk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2)
        v = randn(B, Tk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2)
    elif layout == "capacity":  # a view into a larger cache
        q = randn(B, Hq, Tq, D, dtype=dtype, gen=gen)
        k = randn(B, Hkv, Tk + 7, D, dtype=dtype, gen=gen)[:, :, :Tk]
        v = randn(B, Hkv, Tk + 7, D, dtype=dtype, gen=gen)[:, :, :Tk]
    else:
        q = randn(B, Hq, Tq, D, dtype=dtype, gen=gen)
        k = randn(B, Hkv, Tk, D, dtype=dtype, gen=gen)
        v = randn(B, Hkv, Tk, D, dtype=dtype, gen=gen)
    out = margingate.attention(q, k, v, kv_start, causal=causal, scale=scale, window=window)
    assert out.shape == (B, Hq, Tq, D) and out.dtype == dtype and out.is_contiguous()
    kwargs = {"causal": causal, "scale": scale, "window": window}
    assert_close_to_reference(out, (q, k, v, kv_start), kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_scores_do_not_overflow(dtype):
    # Scores up to ~200: the online softmax must subtract maxima, never exponentiate raw scores.
    gen = torch.Generator().manual_seed(0)
    q = randn(2, 4, 3, 64, dtype=dtype, gen=gen) * 8
    k = randn(2, 2, 150, 64, dtype=dtype, gen=gen) * 8
    v = randn(2, 2, 150, 64, dtype=dtype, gen=gen)
    out = margingate.attention(q, k, v)
    assert torch.isfinite(out).all()
    # Scores of ~100 magnify fp32 rounding of the dot products; ours is one fma chain over D (the
    # contract's order) where torch's matmul sums in blocks, so allow 4x torch's error here.
    assert_close_to_reference(out, (q, k, v), {}, factor=4.0)


# ----------------------------------------------------------------------------- invariances
def _inputs(dtype, B, Hq, Hkv, Tq, Tk, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        randn(B, Hq, Tq, D, dtype=dtype, gen=gen),
        randn(B, Hkv, Tk, D, dtype=dtype, gen=gen),
        randn(B, Hkv, Tk, D, dtype=dtype, gen=gen),
    )


invariance_cases = st.tuples(
    st.sampled_from(DTYPES),
    st.sampled_from([(4, 1), (4, 2), (6, 3), (8, 8)]),  # (Hq, Hkv)
    st.sampled_from([7, 64, 128, 200]),  # D
    st.integers(1, 300),  # valid keys L
    st.one_of(st.none(), st.integers(1, 100)),  # window
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=20, deadline=None)
@given(invariance_cases, st.integers(2, 9), st.data())
def test_batch_invariance(case, B, data):
    dtype, (Hq, Hkv), D, L, window, seed = case
    Tq = data.draw(st.integers(1, min(L, 70)))
    q, k, v = _inputs(dtype, B, Hq, Hkv, Tq, L + 40, D, seed)
    kv_start = torch.tensor(data.draw(st.lists(st.integers(0, 40), min_size=B, max_size=B)))
    batched = margingate.attention(q, k, v, kv_start, window=window)
    b = data.draw(st.integers(0, B - 1))
    alone = margingate.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], kv_start[b : b + 1], window=window)
    assert same_bits(batched[b : b + 1], alone)


@settings(max_examples=20, deadline=None)
@given(invariance_cases, st.integers(0, 150), st.integers(0, 150))
def test_padding_and_capacity_invariance(case, pad_a, pad_b):
    # The same L valid keys left-padded by pad_a (contiguous) or by pad_b inside a bigger cache
    # (a strided view of its first pad_b + L columns): identical outputs.
    dtype, (Hq, Hkv), D, L, window, seed = case
    Tq = min(L, 5)
    q, k, v = _inputs(dtype, 1, Hq, Hkv, Tq, L, D, seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def padded(x, pad, extra):
        junk = randn(1, Hkv, pad + L + extra, D, dtype=dtype, gen=gen) * 100
        junk[:, :, pad : pad + L] = x
        return junk[:, :, : pad + L]

    out_a = margingate.attention(
        q, padded(k, pad_a, 0), padded(v, pad_a, 0), torch.tensor([pad_a]), window=window
    )
    out_b = margingate.attention(
        q, padded(k, pad_b, 33), padded(v, pad_b, 33), torch.tensor([pad_b], dtype=torch.int32), window=window
    )
    assert same_bits(out_a, out_b)


@settings(max_examples=15, deadline=None)
@given(invariance_cases, st.data())
def test_query_count_invariance(case, data):
    # A prefill of Tq queries, a replay of a window of them and single decode steps agree.
    dtype, (Hq, Hkv), D, L, window, seed = case
    B = 2
    Tq = data.draw(st.integers(1, min(L, 140)))
    q, k, v = _inputs(dtype, B, Hq, Hkv, Tq, L, D, seed)
    kv_start = torch.tensor([0, data.draw(st.integers(0, L))])
    prefill = margingate.attention(q, k, v, kv_start, window=window)
    j0 = data.draw(st.integers(0, Tq - 1))
    j1 = data.draw(st.integers(j0 + 1, Tq))
    end = L - Tq + j1  # keys that exist when query j1 - 1 is the newest
    # (a row whose kv_start lies beyond the keys that exist yet has no visible key either way)
    replay = margingate.attention(
        q[:, :, j0:j1], k[:, :, :end], v[:, :, :end], kv_start.clamp(max=end), window=window
    )
    assert same_bits(replay, prefill[:, :, j0:j1])
    for j in {j0, j1 - 1}:
        end = L - Tq + j + 1
        step = margingate.attention(
            q[:, :, j : j + 1], k[:, :, :end], v[:, :, :end], kv_start.clamp(max=end), window=window
        )
        assert same_bits(step, prefill[:, :, j : j + 1])


@settings(max_examples=15, deadline=None)
@given(invariance_cases, st.data())
def test_kv_rows_gather_invariance(case, data):
    dtype, (Hq, Hkv), D, L, window, seed = case
    Bkv = 5
    B = data.draw(st.integers(1, 4))
    Tq = data.draw(st.integers(1, min(L, 8)))
    _, k, v = _inputs(dtype, Bkv, Hq, Hkv, Tq, L, D, seed)
    q = _inputs(dtype, B, Hq, Hkv, Tq, 1, D, seed + 1)[0]
    rows = torch.tensor(data.draw(st.lists(st.integers(0, Bkv - 1), min_size=B, max_size=B)))
    kv_start = torch.tensor(data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B)))
    gathered = margingate.attention(q, k, v, kv_start, rows, window=window)
    direct = margingate.attention(q, k[rows], v[rows], kv_start, window=window)
    assert same_bits(gathered, direct)
    assert_close_to_reference(gathered, (q, k, v, kv_start, rows), {"window": window})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 1500, 64), (2, 4, 1, 37, 300, 40)])  # B, Hq, Hkv, Tq, Tk, D
def test_thread_count_invariance(dtype, shape):
    # 1 thread (no chunk split), 2 and 3 threads (a one-row decode spreads its chunks over the
    # threads; a prefill spreads its query groups differently).
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v = _inputs(dtype, B, Hq, Hkv, Tq, Tk, D, 3)
    kv_start = torch.tensor([3] * B)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(margingate.attention(q, k, v, kv_start))
    finally:
        torch.set_num_threads(threads)
    assert all(same_bits(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_invariance(dtype):
    # k/v with a non-unit stride along D take the scalar kernel; q/k/v in any layout must give the
    # same bits as contiguous copies.
    q, k, v = _inputs(dtype, 2, 6, 3, 9, 140, 24, 5)
    kv_start = torch.tensor([0, 17])
    expected = margingate.attention(q, k, v, kv_start, window=100)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_s = torch.zeros(*k.shape[:3], 2 * k.shape[3], dtype=dtype)
    k_s[..., ::2] = k
    v_s = torch.zeros(*v.shape[:3], 2 * v.shape[3], dtype=dtype)
    v_s[..., 1::2] = v
    got = margingate.attention(q_t, k_s[..., ::2], v_s[..., 1::2], kv_start, window=100)
    assert same_bits(got, expected)


_SIMD_SCRIPT = """
import sys, torch, margingate
torch.manual_seed(0)
outs = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    q = torch.randn(2, 6, 70, 43).to(dtype)
    k = torch.randn(2, 3, 150, 43).to(dtype)
    v = torch.randn(2, 3, 150, 43).to(dtype)
    outs.append(margingate.attention(q, k, v, torch.tensor([0, 37])))
    outs.append(margingate.attention(q, k, v, torch.tensor([5, 0]), window=50))
torch.save(outs, sys.argv[1])
"""


def test_simd_levels_agree(tmp_path):
    # The scalar path performs the AVX2 and AVX-512 paths' operations lane by lane: same bits.
    supported = margingate.build_info()["simd_supported"]
    levels = ["scalar", "avx2", "avx512"]
    levels = levels[: levels.index(supported) + 1] if supported in levels else ["scalar"]
    if len(levels) < 2:
        pytest.skip("no SIMD level to compare with")
    results = []
    for level in levels:
        path = tmp_path / f"{level}.pt"
        env = dict(os.environ, MARGINGATE_SIMD=level)
        subprocess.run([sys.executable, "-c", _SIMD_SCRIPT, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for other in results[1:]:
        assert all(same_bits(x, y) for x, y in zip(results[0], other, strict=True))


def _pinned_inputs(dtype):
    # Exact rational values from integer arithmetic: the same bits on every machine and torch.
    def grid(*shape, salt):
        n = torch.arange(torch.Size(shape).numel(), dtype=torch.int64)
        return (((n * 7919 + salt) % 997).to(torch.float32) / 499.0 - 1.0).reshape(shape).to(dtype)

    return grid(2, 4, 5, 40, salt=1), grid(2, 2, 150, 40, salt=2), grid(2, 2, 150, 40, salt=3)


@pytest.mark.parametrize(
    "dtype, digest", [(torch.float32, "d34eec71aa830bf0"), (torch.bfloat16, "c90f8dc51b3d6e3a")]
)
def test_canonical_bits_are_pinned(dtype, digest):
    # The reduction order is part of the contract (kChunk, the fma chains, the lane tree, exp2):
    # any change shows up here, on every machine and SIMD level alike. Update the digests only
    # on purpose, and say so in the commit (cached verifier results would change bits).
    q, k, v = _pinned_inputs(dtype)
    out = margingate.attention(q, k, v, torch.tensor([0, 9]), window=100)
    ints = out.view({4: torch.int32, 2: torch.int16}[out.element_size()])
    assert hashlib.sha256(ints.numpy().tobytes()).hexdigest()[:16] == digest


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_queries_are_zero(dtype):
    q, k, v = _inputs(dtype, 3, 4, 2, 4, 10, 16, 0)
    out = margingate.attention(q, k, v, torch.tensor([10, 0, 8]))
    assert same_bits(out[0], torch.zeros_like(out[0]))  # kv_start == Tk: no valid key
    assert not torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))
    assert same_bits(out[2, :, :1], torch.zeros_like(out[2, :, :1]))  # query at p=6 < kv_start=8
    # More queries than keys: the first ones sit before position 0.
    q2 = _inputs(dtype, 1, 4, 2, 6, 1, 16, 1)[0]
    out2 = margingate.attention(q2, k[:1, :, :3], v[:1, :, :3])
    assert same_bits(out2[:, :, :3], torch.zeros_like(out2[:, :, :3]))
    assert_close_to_reference(out2, (q2, k[:1, :, :3], v[:1, :, :3]), {})
    # No keys at all.
    empty_kv = margingate.attention(q, k[:, :, :0], v[:, :, :0])
    assert same_bits(empty_kv, torch.zeros_like(empty_kv))


def test_empty_batch_and_empty_queries():
    q, k, v = _inputs(torch.bfloat16, 0, 4, 2, 3, 10, 16, 0)
    assert margingate.attention(q, k, v).shape == (0, 4, 3, 16)
    q, k, v = _inputs(torch.bfloat16, 2, 4, 2, 0, 10, 16, 0)
    assert margingate.attention(q, k, v).shape == (2, 4, 0, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    q, k, v = _inputs(dtype, 2, 4, 2, 3, 20, 16, 0)
    samples = [
        ((q, k, v), {}),
        ((q, k, v, torch.tensor([0, 5])), {"window": 4}),
        ((q, k, v, None, torch.tensor([1, 1], dtype=torch.int32)), {"causal": False, "scale": 0.5}),
    ]
    for args, kwargs in samples:
        torch.library.opcheck(torch.ops.margingate.attention.default, args, kwargs)


def _bad_inputs():
    q, k, v = _inputs(torch.float32, 2, 4, 2, 3, 10, 16, 0)
    return [
        ((q[0], k, v), {}, "q must be 4-D"),
        ((q, k, v[:, :, :5]), {}, "same shape"),
        ((q[:, :3], k, v), {}, "multiple of the number of kv heads"),
        ((q, k.to(torch.bfloat16), v), {}, "one dtype"),
        ((q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)), {}, "must be float32"),
        ((q[..., :8], k, v), {}, "head_dim"),
        ((q, k[:1], v[:1]), {}, "pass kv_rows"),
        ((q, k, v, torch.tensor([0, 11])), {}, "out of range"),
        ((q, k, v, torch.tensor([-1, 0])), {}, "out of range"),
        ((q, k, v, torch.tensor([0.0, 1.0])), {}, "int32 or int64"),
        ((q, k, v, torch.tensor([0, 1, 2])), {}, "kv_start must have shape"),
        ((q, k, v, None, torch.tensor([0, 2])), {}, "out of range"),
        ((q, k, v), {"window": 0}, "window must be >= 1"),
        ((q, k, v), {"window": 3, "causal": False}, "requires causal=True"),
    ]


@pytest.mark.parametrize("args, kwargs, message", _bad_inputs())
def test_bad_input_raises(args, kwargs, message):
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError), match=message):
        margingate.attention(*args, **kwargs)


def test_head_dim_limit():
    q = torch.randn(1, 1, 1, 257)
    with pytest.raises(RuntimeError, match="head_dim must be in"):
        margingate.attention(q, q, q)


# ----------------------------------------------------------------------------- non-finite inputs
def _sdpa(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    )


def _poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# Where a non-finite number goes (all keys visible, so torch's SDPA is the plain reference), and
# what each makes of the output: a NaN anywhere in a query's scores (NaN in q or in a key it sees,
# or +inf reaching a score) turns that query's whole output into NaN; a NaN in a value turns its
# head_dim column into NaN for every query that sees it.
NON_FINITE = [
    ("nan in q", "q", (1, 3, 2, 5), math.nan),
    ("nan in a key", "k", (0, 1, 70, 9), math.nan),
    ("+inf in a key", "k", (1, 0, 3, 0), math.inf),
    ("nan in a value", "v", (0, 0, 130, 4), math.nan),
    ("+inf in a value", "v", (1, 1, 0, 7), math.inf),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where, tensor, index, value", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_propagate_like_torch(dtype, where, tensor, index, value):
    q, k, v = _inputs(dtype, 2, 4, 2, 5, 150, 16, 3)  # 150 keys: three chunks
    q = q.abs()  # q . k with a +inf key element is then +inf, not NaN or -inf
    args = {"q": q, "k": k, "v": v}
    args[tensor] = _poison(args[tensor], index, value)
    out = margingate.attention(args["q"], args["k"], args["v"], causal=False)
    expected = _sdpa(*(args[name].float() for name in ("q", "k", "v")))
    assert not out.isfinite().all(), "the non-finite number must reach the output"
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    clean = margingate.attention(q, k, v, causal=False)
    untouched = expected.isfinite()
    if tensor == "v":  # the other head_dim columns did not see the bad value: unchanged
        assert torch.equal(out[untouched], clean[untouched])
    else:  # only the queries that read the bad number change
        rows = untouched.all(-1)
        assert torch.equal(out[rows], clean[rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq, Tk", [(6, 40), (1, 1500)])  # one chunk; decode with chunks split over threads
def test_nan_reaches_exactly_the_queries_that_see_it(dtype, Tq, Tk):
    """With padding, causality and a window, a NaN key reaches the queries that attend to it and
    no other (their outputs keep their bits); a NaN in the padding or outside every window changes
    nothing; a query with no visible key still gets zeros."""
    B, Hq, Hkv, D = 3, 4, 2, 16
    q, k, v = _inputs(dtype, B, Hq, Hkv, Tq, Tk, D, 7)
    kv_start = torch.tensor([0, 5, Tk])  # row 2 sees no key at all
    window = Tk - 3
    clean = margingate.attention(q, k, v, kv_start, window=window)
    seen = visible_mask(Tq, Tk, kv_start, True, window)  # [B, 1, Tq, Tk]
    threads = torch.get_num_threads()
    try:
        for n_threads in {1, max(2, threads)}:
            torch.set_num_threads(n_threads)
            for b, t in [(0, Tk - 2), (1, 2), (1, 5), (0, 0), (2, Tk - 1)]:
                out = margingate.attention(q, _poison(k, (b, 1, t, 3), math.nan), v, kv_start, window=window)
                hit = torch.zeros(B, Hq, Tq, dtype=torch.bool)
                hit[b, Hq // Hkv :] = seen[b, 0, :, t]  # kv head 1 serves query heads 2 and 3
                assert torch.equal(out.isnan().any(-1), hit), (b, t)
                assert out[hit].isnan().all()
                assert same_bits(out[~hit], clean[~hit]), (b, t)
                assert same_bits(out[2], torch.zeros_like(out[2]))
    finally:
        torch.set_num_threads(threads)


_NAN_SIMD_SCRIPT = """
import sys, torch, margingate
torch.manual_seed(0)
outs = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    q = torch.randn(2, 6, 9, 43).to(dtype)
    k = torch.randn(2, 3, 150, 43).to(dtype)
    v = torch.randn(2, 3, 150, 43).to(dtype)
    q[0, 1, 3, 7] = float("nan")
    k[1, 2, 100, 0] = float("inf")
    k[0, 0, 20, 5] = float("nan")
    v[1, 0, 149, 11] = float("nan")
    outs.append(margingate.attention(q, k, v, torch.tensor([0, 37])))
    outs.append(margingate.attention(q, k, v, torch.tensor([5, 0]), window=50))
torch.save(outs, sys.argv[1])
"""


def test_simd_levels_agree_on_non_finite_inputs(tmp_path):
    # Which outputs are NaN is the same on every level, and every other output keeps its bits
    # (NaN payloads are not part of the contract).
    supported = margingate.build_info()["simd_supported"]
    levels = ["scalar", "avx2", "avx512"]
    levels = levels[: levels.index(supported) + 1] if supported in levels else ["scalar"]
    if len(levels) < 2:
        pytest.skip("no SIMD level to compare with")
    results = []
    for level in levels:
        path = tmp_path / f"{level}.pt"
        env = dict(os.environ, MARGINGATE_SIMD=level)
        subprocess.run([sys.executable, "-c", _NAN_SIMD_SCRIPT, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            assert x.isnan().any()
            assert torch.equal(x.isnan(), y.isnan())
            assert same_bits(x.nan_to_num(0.0), y.nan_to_num(0.0))


# ----------------------------------------------------------------------------- devices, autograd
def _meta(t):
    return None if t is None else t.to("meta")


@pytest.mark.parametrize("arg", ["q", "k", "v", "kv_start", "kv_rows"])
def test_an_argument_on_meta_is_a_device_mix(arg):
    # One argument on meta used to send the call to the fake kernel, which returned an
    # uninitialised CPU tensor.
    q, k, v = _inputs(torch.float32, 2, 4, 2, 3, 10, 16, 0)
    args = {"q": q, "k": k, "v": v, "kv_start": torch.tensor([0, 2]), "kv_rows": torch.tensor([1, 0])}
    args[arg] = _meta(args[arg])
    message = "k is on cpu but q is on meta" if arg == "q" else f"{arg} is on meta but q is on cpu"
    with pytest.raises(RuntimeError, match=f"margingate.attention: {message}"):
        margingate.attention(**args)


def test_all_arguments_on_meta_give_the_shape():
    q, k, v = _inputs(torch.bfloat16, 2, 4, 2, 3, 10, 16, 0)
    out = margingate.attention(_meta(q), _meta(k), _meta(v), _meta(torch.tensor([0, 2])))
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype


def test_autograd_has_no_silent_backward():
    # No backward: an output of inputs that require grad carries a grad_fn that raises, never a
    # gradient computed as if the op were not there.
    q, k, v = _inputs(torch.float32, 1, 2, 1, 2, 5, 8, 0)
    q.requires_grad_(True)
    out = margingate.attention(q, k, v)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="derivative for margingate::attention is not implemented"):
        out.sum().backward()
    with torch.no_grad():
        assert not margingate.attention(q, k, v).requires_grad


def test_aliased_inputs_are_only_read():
    # q, k and v may be one tensor (self-attention over a shared buffer): the op only reads them.
    q = _inputs(torch.float32, 2, 2, 2, 6, 6, 8, 0)[0]
    got = margingate.attention(q, q, q)
    assert same_bits(got, margingate.attention(q.clone(), q.clone(), q.clone()))
