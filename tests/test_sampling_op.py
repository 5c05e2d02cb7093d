"""margingate.sample_margin and its noise: bit-exact against the plain-torch references, and a
correct sampler (chi-square over many seeds)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import margingate
from margingate import noise

from .conftest import DTYPES
from .reference_sampling import (
    gumbel_reference,
    hash_bits,
    log_reference,
    mix64_python,
    sample_margin_reference,
    signed,
)

U64 = 1 << 64


def run(logits, seed, position, temperature, top_k=None, min_p=None):
    b = logits.shape[0]
    as_row = lambda v, dt: v if isinstance(v, torch.Tensor) or v is None else torch.full((b,), v, dtype=dt)  # noqa: E731
    args = (
        logits,
        as_row(seed, torch.int64),
        as_row(position, torch.int64),
        as_row(temperature, torch.float32),
        as_row(top_k, torch.int64),
        as_row(min_p, torch.float32),
    )
    return torch.ops.margingate.sample_margin.default(*args), args


def assert_same(got, want):
    names = ("token", "runner_up", "margin", "cutoff_margin")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, name
        if g.dtype == torch.float32:
            assert torch.equal(g.isnan(), w.isnan()), (name, g, w)
            g, w = g.nan_to_num(nan=-7.0), w.nan_to_num(nan=-7.0)
        assert torch.equal(g, w), (name, g, w)


def check(logits, seed, position, temperature, top_k=None, min_p=None):
    got, args = run(logits, seed, position, temperature, top_k, min_p)
    assert_same(got, sample_margin_reference(*args))
    return got


# ----------------------------------------------------------------------------- the noise
def test_hash_matches_python_integers():
    """The int64 torch hash is the uint64 definition of sampling.h (checked on Python ints)."""
    cases = [(0, 0), (1, 0), (2**64 - 1, -1), (-5, 2**40), (0x123456789ABCDEF0, 17)]
    idx = [0, 1, 2, 1000, 262143, 2**31 - 2]
    for seed, position in cases:
        key = mix64_python(mix64_python(seed + 0x9E3779B97F4A7C15) ^ (position % U64))
        want = [signed(mix64_python(key + (i + 1) * 0x9E3779B97F4A7C15)) for i in idx]
        assert hash_bits(seed, position, torch.tensor(idx)).tolist() == want
        assert noise.noise_bits(seed, position, torch.tensor(idx)).tolist() == want


def test_log_is_accurate():
    """log_mg is fdlibm's log: within 1 ulp of the exact value (math.log is within 1 ulp too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(20000, generator=g, dtype=torch.float64),
            torch.rand(20000, generator=g, dtype=torch.float64) * 40,
            torch.tensor([2.0**-53, 1 - 2.0**-53, 1.0, 0.5, 2.0, math.sqrt(2), 1e-300, 36.7]),
        ]
    )
    x = x[x > 0]
    ours = noise.log_mg(x)
    assert torch.equal(ours, log_reference(x))  # two formulations, the same bits
    exact = torch.tensor([math.log(v) for v in x.tolist()], dtype=torch.float64)
    ulp = torch.tensor([math.ulp(v) for v in exact.tolist()], dtype=torch.float64)
    assert ((ours - exact).abs() <= 2 * ulp).all()


def test_noise_module_matches_reference_bit_for_bit():
    indices = torch.arange(262144)
    for seed, position in [(0, 0), (7, 123), (2**63 + 5, -3), (-1, 2**50)]:
        assert torch.equal(noise.gumbel_noise(seed, position, indices), gumbel_reference(seed, position, indices))
    # Broadcasting: a [B, V] batch of streams in one call.
    seeds = torch.tensor([[3], [4]])
    batch = noise.gumbel_noise(seeds, torch.tensor([[9], [9]]), torch.arange(100))
    assert torch.equal(batch[1], gumbel_reference(4, 9, torch.arange(100)))


def test_noise_extremes_are_finite():
    # The smallest and largest uniforms (hash >> 12 = 0 and 2^52 - 1).
    u = torch.tensor([0, -1], dtype=torch.int64)
    g = noise._gumbel_from_bits(u)
    assert torch.isfinite(g).all()
    # -log(-log(2^-53)) = -3.6037 and -log(-log(1 - 2^-53)) = 36.737: the bounds of the noise.
    assert -3.61 < float(g[0]) < -3.60 and 36.73 < float(g[1]) < 36.74


def test_noise_is_gumbel_and_streams_differ():
    v = torch.arange(200000)
    g = noise.gumbel_noise(11, 5, v).double()
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (standard errors ~0.003 and ~0.01).
    assert abs(g.mean().item() - 0.5772156649) < 0.015
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05
    # Different seeds, positions and neighbouring indices give unrelated streams.
    for other in (noise.gumbel_noise(12, 5, v), noise.gumbel_noise(11, 6, v), noise.gumbel_noise(11, 5, v + 1)):
        assert not torch.equal(other.double(), g)
        assert abs(torch.corrcoef(torch.stack([g, other.double()]))[0, 1].item()) < 0.01
    # The same key is the same stream.
    assert torch.equal(noise.gumbel_noise(11, 5, v).double(), g)


def test_op_uses_the_noise_bit_for_bit():
    """Rows with two finite logits (0, 0) and -inf elsewhere: margin = |g_a - g_b| exactly. Every
    index of an 8192 vocabulary (one pair per row), then 256 pairs spread over 262144."""
    for vocab, pairs_wanted in ((8192, 4096), (262144, 256)):
        seed, position = 99 + vocab, 41
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(vocab))
        pairs = perm.reshape(-1, 2)[:pairs_wanted]
        logits = torch.full((pairs.shape[0], vocab), -math.inf, dtype=torch.bfloat16)
        logits[torch.arange(pairs.shape[0])[:, None], pairs] = 0.0
        (token, runner_up, margin, cutoff), _ = run(logits, seed, position, 1.0)
        g = noise.gumbel_noise(seed, position, torch.arange(vocab))
        ga, gb = g[pairs[:, 0]], g[pairs[:, 1]]
        a_wins = (ga > gb) | ((ga == gb) & (pairs[:, 0] < pairs[:, 1]))
        assert torch.equal(token, torch.where(a_wins, pairs[:, 0], pairs[:, 1]))
        assert torch.equal(runner_up, torch.where(a_wins, pairs[:, 1], pairs[:, 0]))
        assert torch.equal(margin, torch.where(ga == gb, torch.zeros_like(ga), (ga - gb).abs()))
        assert torch.isinf(cutoff).all()


def test_noised_scores_give_the_token():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g) * 3
    seeds, positions = torch.arange(6) * 1000, torch.arange(6) + 7
    temps = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 0.05])
    token, runner_up, margin, _ = margingate.sample_margin(logits, seeds, positions, temps)
    s = noise.noised_scores(logits, seeds, positions, temps)
    top = s.topk(2, dim=-1)
    assert torch.equal(token, top.indices[:, 0]) and torch.equal(runner_up, top.indices[:, 1])
    assert torch.equal(margin, temps * (top.values[:, 0] - top.values[:, 1]))


# ----------------------------------------------------------------------------- the op
@st.composite
def sampling_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(0, 6))
    vocab = draw(st.sampled_from([2, 3, 17, 33, 100, 1000, 4099]))
    levels = draw(st.sampled_from([2, 6, 0]))  # few levels: ties at the top-k / min-p cut-offs
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(0, levels, (rows, vocab), generator=g).float() if levels else torch.randn(rows, vocab, generator=g) * 4
    specials = draw(st.lists(st.sampled_from(["inf", "-inf", "nan", "-0", "-inf-row"]), max_size=3))
    for s in specials:
        if rows == 0:
            break
        r = int(torch.randint(0, rows, (1,), generator=g))
        c = int(torch.randint(0, vocab, (1,), generator=g))
        if s == "-inf-row":
            x[r, : vocab - 1] = -math.inf
        else:
            x[r, c] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-0": -0.0}[s]
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "column_slice", "transposed", "row_step"]))
    if layout == "column_slice":
        wide = torch.zeros(rows, vocab + 5, dtype=dtype)
        wide[:, 2 : 2 + vocab] = x
        x = wide[:, 2 : 2 + vocab]
    elif layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "row_step":
        tall = torch.zeros(2 * rows, vocab, dtype=dtype)
        tall[::2] = x
        x = tall[::2]
    seed = torch.tensor(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows, max_size=rows)), dtype=torch.int64)
    position = torch.tensor(draw(st.lists(st.integers(0, 2**20), min_size=rows, max_size=rows)), dtype=torch.int64)
    temperature = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 0.05, 0.7, 1.0, 1.3, 4.0]), min_size=rows, max_size=rows)),
        dtype=torch.float32,
    )
    top_k = min_p = None
    if draw(st.booleans()):
        top_k = torch.tensor(draw(st.lists(st.integers(0, vocab + 2), min_size=rows, max_size=rows)), dtype=torch.int64)
    if draw(st.booleans()):
        min_p = torch.tensor(
            draw(st.lists(st.sampled_from([0.0, 1e-4, 0.05, 0.3, 1.0]), min_size=rows, max_size=rows)),
            dtype=torch.float32,
        )
    return x, seed, position, temperature, top_k, min_p


@settings(max_examples=200, deadline=None)
@given(sampling_cases())
def test_sample_margin_matches_reference(case):
    check(*case)


@pytest.mark.parametrize("dtype, vocab", [(torch.bfloat16, 262144), (torch.float16, 128256), (torch.float32, 262144)])
def test_large_vocabularies(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, vocab, generator=g) * 5).to(dtype)
    logits[1] = torch.linspace(-30, 30, vocab).to(dtype)  # ascending: the heap takes every index
    seed, position, temps = torch.tensor([1, 2]), torch.tensor([10, 11]), torch.tensor([0.7, 1.0])
    check(logits, seed, position, temps, top_k=torch.tensor([50, 5000]))  # heap / nth_element
    check(logits, seed, position, temps, top_k=torch.tensor([8000, 0]), min_p=torch.tensor([0.01, 0.05]))


def test_greedy_rows_are_margin():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(5, 3000, generator=g) * 2).to(torch.bfloat16)
    logits[2, 7] = math.nan
    token, runner_up, margin, cutoff = margingate.sample_margin(logits, 3, 4, 0.0, top_k=5, min_p=0.5)
    t1, t2, m = margingate.margin(logits)
    assert torch.equal(token, t1) and torch.equal(runner_up, t2)
    assert torch.equal(margin.nan_to_num(-1.0), m.nan_to_num(-1.0))
    assert torch.isnan(cutoff[2]) and torch.isinf(cutoff[[0, 1, 3, 4]]).all()


def test_special_rows():
    inf, nan = math.inf, math.nan
    logits = torch.tensor(
        [
            [-inf, -inf, -inf, -inf],  # all -inf: scores tie at -inf, first index, margin 0
            [inf, 1.0, inf, 2.0],  # two +inf: they tie, margin 0 (never inf - inf)
            [1.0, nan, 3.0, nan],  # NaN: margin's answer, NaN margins
            [5.0, 0.0, 0.0, 0.0],
        ]
    )
    token, runner_up, margin, cutoff = check(logits, 0, 0, 1.0)
    assert token[0] == 0 and runner_up[0] == 1 and margin[0] == 0
    assert token[1] == 0 and runner_up[1] == 2 and margin[1] == 0
    assert token[2] == 1 and runner_up[2] == 3 and math.isnan(margin[2]) and math.isnan(cutoff[2])
    # top_k = 1: one candidate, so no runner-up and an infinite margin; the cut-off decides alone.
    token, runner_up, margin, cutoff = check(logits[3:], 0, 0, 1.0, top_k=1)
    assert token.item() == 0 and runner_up.item() == -1 and margin.item() == inf and cutoff.item() == 5.0
    # min_p = 1 keeps only the maximum (ties included); the token sits on the cut-off itself, so
    # any change can drop it: cutoff_margin 0.
    token, runner_up, _, cutoff = check(torch.tensor([[2.0, 1.0, 2.0, 1.5]]), 5, 6, 0.8, min_p=1.0)
    assert sorted([token.item(), runner_up.item()]) == [0, 2] and cutoff.item() == 0.0
    # min_p = 0.5 at T = 1: L = ln 0.5 = -0.693; 1.5 - 2 = -0.5 is in, 1 - 2 = -1 is out.
    token, _, _, cutoff = check(torch.tensor([[2.0, 1.0, 1.5]]), 5, 6, 1.0, min_p=0.5)
    assert token.item() in (0, 2) and 0 < cutoff.item() <= 0.5 - math.log(2) + 1e-6 + 0.5


def test_top_k_ties_keep_lowest_indices():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    seen = set()
    for seed in range(200):
        token, _, _, cutoff = check(logits, seed, 0, 50.0, top_k=2)
        seen.add(token.item())
        assert cutoff.item() == 0.0  # index 3 is out by its index alone: the gate must verify
    assert seen == {1, 2}


def test_batch_and_thread_invariance():
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(16, 40000, generator=g) * 4).to(torch.bfloat16)
    seed, position = torch.arange(16) * 77, torch.arange(16) + 100
    temps, top_k, min_p = torch.full((16,), 0.7), torch.full((16,), 50), torch.full((16,), 0.02)
    batched = margingate.sample_margin(logits, seed, position, temps, top_k, min_p)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = margingate.sample_margin(logits, seed, position, temps, top_k, min_p)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 5, 15):
        alone = margingate.sample_margin(logits[r : r + 1], seed[r : r + 1], position[r : r + 1], temps[r : r + 1],
                                         top_k[r : r + 1], min_p[r : r + 1])
        for a, b in zip(alone, batched, strict=True):
            assert torch.equal(a, b[r : r + 1])
    for a, b in zip(single, batched, strict=True):
        assert torch.equal(a, b)


def test_gate_is_sound():
    """If margin and cutoff_margin exceed 2h (plus rounding), logits moved by less than h keep the
    token; and small cutoff margins do occur, so the property is not vacuous."""
    g = torch.Generator().manual_seed(21)
    vocab, rows, h = 2000, 600, 0.05
    logits = (torch.randn(rows, vocab, generator=g) * 3).round(decimals=1)
    seed, position = torch.arange(rows), torch.full((rows,), 3)
    temps = torch.full((rows,), 0.7)
    top_k, min_p = torch.full((rows,), 20), torch.full((rows,), 0.05)
    token, _, margin, cutoff = margingate.sample_margin(logits, seed, position, temps, top_k, min_p)
    safe = (margin > 2 * h + 1e-3) & (cutoff > 2 * h + 1e-3)
    assert 0 < int(safe.sum()) < rows
    for _ in range(3):
        moved = logits + (torch.rand(logits.shape, generator=g) * 2 - 1) * h * 0.999
        token2 = margingate.sample_margin(moved, seed, position, temps, top_k, min_p)[0]
        assert torch.equal(token2[safe], token[safe])
    # Some rows are flagged by the cut-off alone.
    unsafe_cut = (margin > 2 * h + 1e-3) & ~(cutoff > 2 * h + 1e-3)
    assert int(unsafe_cut.sum()) > 0


SIMD_CASE = """
import torch, margingate
g = torch.Generator().manual_seed(1)
x = (torch.randn(6, 70001, generator=g) * 3).to(torch.bfloat16)
x[2, 5] = float("nan"); x[3] = float("-inf"); x[3, 9] = 1
r = margingate.sample_margin(x, torch.arange(6), torch.arange(6), torch.full((6,), 0.8),
                             torch.tensor([0, 50, 3, 0, 70001, 2]), torch.tensor([0.0, 0.0, 0.1, 0.01, 0.0, 0.5]))
"""


def test_scalar_level_agrees():
    """The scalar path (MARGINGATE_SIMD=scalar, in a subprocess) gives this process's bits."""
    code = SIMD_CASE + "print(margingate.build_info()['simd'], repr([t.tolist() for t in r]))"
    env = dict(os.environ, MARGINGATE_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    level, result = out.split(" ", 1)
    assert level == "scalar"
    scope: dict = {}
    exec(SIMD_CASE, scope)  # the same computation at this process's level
    assert result.strip() == repr([t.tolist() for t in scope["r"]])


def test_empty_batch_and_opcheck():
    for dtype in DTYPES:
        x = torch.randn(3, 300).to(dtype)
        args = (x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), torch.tensor([0.7, 0.0, 1.0]))
        torch.library.opcheck(torch.ops.margingate.sample_margin.default, args)
        torch.library.opcheck(
            torch.ops.margingate.sample_margin.default, (*args, torch.tensor([5, 0, 2]), torch.tensor([0.1, 0.0, 0.0]))
        )
    empty = torch.empty(0, 10)
    e64, ef = torch.empty(0, dtype=torch.int64), torch.empty(0)
    torch.library.opcheck(torch.ops.margingate.sample_margin.default, (empty, e64, e64, ef))
    out = margingate.sample_margin(empty, e64, e64, ef)
    assert [t.shape for t in out] == [torch.Size([0])] * 4


def test_compiles():
    f = torch.compile(lambda x, s, p, t: margingate.sample_margin(x, s, p, t)[2] * 2, fullgraph=True, backend="eager")
    x, s, p, t = torch.randn(3, 100), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.full((3,), 0.7)
    assert torch.equal(f(x, s, p, t), margingate.sample_margin(x, s, p, t)[2] * 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-0.5), RuntimeError, "temperature must be finite and >= 0"),
        (dict(temperature=math.nan), RuntimeError, "temperature must be finite"),
        (dict(temperature=math.inf), RuntimeError, "temperature must be finite"),
        (dict(top_k=-1), RuntimeError, "top_k must be >= 0"),
        (dict(min_p=1.5), RuntimeError, r"min_p must be in \[0, 1\]"),
        (dict(min_p=math.nan), RuntimeError, r"min_p must be in \[0, 1\]"),
        (dict(seed=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed must be int64"),
        (dict(seed=torch.tensor([1, 2, 3])), RuntimeError, "seed must be 1-D with one entry per row"),
        (dict(temperature=torch.tensor([0.7, 0.7], dtype=torch.float64)), TypeError, "temperature must be float32"),
        (dict(position=torch.tensor([1.0, 2.0])), TypeError, "position must be int32 or int64"),
        (dict(min_p=torch.tensor([0.1, 0.1], dtype=torch.float16)), TypeError, "min_p must be float32"),
        (dict(logits=torch.randn(2, 3, 4)), RuntimeError, "2-D"),
        (dict(logits=torch.randn(2, 1)), RuntimeError, "at least 2 columns"),
        (dict(logits=torch.randint(0, 3, (2, 5))), TypeError, "logits must be float32, float16 or bfloat16"),
        (dict(top_p=0.9), ValueError, "top_p is not supported: its cut-off is a cumulative sum"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(2, 50), seed=7, position=3, temperature=0.7)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        margingate.sample_margin(**args)


# ----------------------------------------------------------------------------- a correct sampler
def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x), exact for integer df (the series of the regularised upper gamma)."""
    if df % 2 == 0:
        term = total = math.exp(-x / 2)
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return total
    total = math.erfc(math.sqrt(x / 2))
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    for i in range(1, (df + 1) // 2):
        total += term
        term *= x / (2 * i + 1)
    return total


SIGNIFICANCE = 1e-4  # each chi-square test fails a correct sampler with probability 1e-4


@pytest.mark.parametrize(
    "temperature, top_k, min_p", [(1.0, 0, 0.0), (0.7, 0, 0.0), (1.3, 4, 0.0), (0.7, 0, 0.05), (1.0, 5, 0.02)]
)
def test_frequencies_match_softmax(temperature, top_k, min_p):
    """40000 seeds (and positions) on a fixed 8-token distribution: the token frequencies match
    softmax(logits / T) restricted to the truncated set, by a chi-square test at 1e-4."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draws = 40000
    x = logits.expand(draws, -1)
    seed = torch.arange(draws, dtype=torch.int64) * 7919 + 13
    position = torch.arange(draws, dtype=torch.int64) % 97
    token = margingate.sample_margin(
        x, seed, position, temperature, top_k=top_k or None, min_p=min_p or None
    )[0]
    p = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if min_p:
        keep &= p >= min_p * p.max()
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    counts = torch.bincount(token, minlength=8).double()
    assert (counts[~keep] == 0).all()
    expected = p[keep] * draws
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    assert chi2_sf(stat, df) > SIGNIFICANCE, (stat, df, counts, expected)


def test_seeds_give_different_streams():
    logits = torch.zeros(1, 1000)
    tokens = {}
    for seed in range(50):
        stream = [margingate.sample_margin(logits, seed, pos, 1.0)[0].item() for pos in range(20)]
        tokens[seed] = stream
        assert stream == [margingate.sample_margin(logits, seed, pos, 1.0)[0].item() for pos in range(20)]
    assert len({tuple(s) for s in tokens.values()}) == 50


# ----------------------------------------------------------------------------- CUDA
def test_cuda_kernel_is_registered():
    """CUDA builds register the kernel; CPU-only builds register the clear "no CUDA kernels" error."""
    handle = torch.ops.margingate.sample_margin.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_bit_for_bit(dtype):
    """The op is exact (fixed IEEE sequence, selections), so the GPU gives the CPU's bits."""
    g = torch.Generator().manual_seed(4)
    rows, vocab = 12, 131072 + 3
    logits = (torch.randn(rows, vocab, generator=g) * 4).round(decimals=1).to(dtype)
    logits[1, 77] = math.nan
    logits[2] = -math.inf
    logits[2, 5] = 0.0
    seed = torch.randint(-(2**62), 2**62, (rows,), generator=g)
    position = torch.arange(rows) * 13
    temps = torch.tensor([0.7, 1.0, 0.7, 0.0, 1.3, 0.05, 0.7, 1.0, 2.0, 0.7, 0.7, 1.0])
    top_k = torch.tensor([50, 0, 3, 5, 0, 1, 4097, 20, 200, 0, 2, vocab])
    min_p = torch.tensor([0.0, 0.05, 0.0, 0.1, 0.02, 0.0, 0.01, 0.3, 0.0, 1.0, 0.0, 0.0])
    for layout in ("contiguous", "transposed"):
        x = logits if layout == "contiguous" else logits.t().contiguous().t()
        cpu = margingate.sample_margin(x, seed, position, temps, top_k, min_p)
        gpu = margingate.sample_margin(
            x.cuda(), seed.cuda(), position.cuda(), temps.cuda(), top_k.cuda(), min_p.cuda()
        )
        assert_same([t.cpu() for t in gpu], cpu)
    assert torch.equal(
        noise.gumbel_noise(5, 6, torch.arange(1000, device="cuda")).cpu(), noise.gumbel_noise(5, 6, torch.arange(1000))
    )
