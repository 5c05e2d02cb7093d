"""Plain-torch reference of the sampling noise and of ``sample_margin`` (materialises [B, V]).

Written independently of ``margingate.noise`` from the definition in
``cpp/include/margingate/sampling.h``: the hash in int64 arithmetic (wrapping multiplication, an
arithmetic shift masked to a logical one), the logarithm's range reduction through ``torch.frexp``
instead of bit fields. Tests compare the op, ``margingate.noise`` and this module bit for bit; the
benchmarks time the torch way of sampling from here too.
"""

from __future__ import annotations

import math

import torch

U64 = 1 << 64


def signed(c: int) -> int:
    c %= U64
    return c - U64 if c >= 1 << 63 else c


GOLDEN = signed(0x9E3779B97F4A7C15)


def lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    z = z ^ lsr(z, 30)
    z = z * signed(0xBF58476D1CE4E5B9)
    z = z ^ lsr(z, 27)
    z = z * signed(0x94D049BB133111EB)
    return z ^ lsr(z, 31)


def mix64_python(z: int) -> int:
    """The finaliser on Python ints modulo 2^64 (pins the torch version to the spec)."""
    z %= U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    return z ^ (z >> 31)


def hash_bits(seed: int, position: int, indices: torch.Tensor) -> torch.Tensor:
    key = mix64(torch.tensor(signed(seed), dtype=torch.int64) + GOLDEN)
    key = mix64(key ^ signed(position))
    return mix64(key + (indices.to(torch.int64) + 1) * GOLDEN)


def log_reference(x: torch.Tensor) -> torch.Tensor:
    """fdlibm's log in float64 with the reduction y in [~sqrt(2)/2, ~sqrt(2)) found by frexp."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    # fdlibm's test on the top 20 mantissa bits, 1.m >= 1 + 0x6A09E / 2^20, in frexp's terms:
    keep_half = mantissa >= (1 + 0x6A09E / 2**20) / 2
    y = torch.where(keep_half, mantissa, mantissa * 2)
    k = torch.where(keep_half, exponent, exponent - 1).to(torch.float64)
    f = y - 1
    hfsq = 0.5 * f * f  # (0.5 * f) * f: Python evaluates left to right
    s = f / (2 + f)
    z = s * s
    w = z * z
    t1 = w * (0.3999999999940941908 + w * (0.2222219843214978396 + w * 0.1531383769920937332))
    t2 = z * (
        0.6666666666666735130
        + w * (0.2857142874366239149 + w * (0.1818357216161805012 + w * 0.1479819860511658591))
    )
    r = t2 + t1
    return k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + r) + k * 1.90821492927058770002e-10)) - f)


def gumbel_reference(seed: int, position: int, indices: torch.Tensor) -> torch.Tensor:
    bits = hash_bits(seed, position, indices)
    u = (lsr(bits, 12).to(torch.float64) + 0.5) / 2**52
    return (-log_reference(-log_reference(u))).to(torch.float32)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _gap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p == q, torch.zeros_like(p), p - q)


def greedy_reference(row: torch.Tensor) -> tuple[int, int, float]:
    """margingate.margin's answer for one fp32 row (NaN rule included)."""
    nan = torch.isnan(row)
    if nan.any():
        nan_idx = nan.nonzero()[:, 0].tolist()
        if len(nan_idx) > 1:
            return nan_idx[0], nan_idx[1], math.nan
        others = torch.cat([torch.arange(nan_idx[0]), torch.arange(nan_idx[0] + 1, row.shape[0])])
        return nan_idx[0], int(others[torch.argmax(row[others])]), math.nan
    order = torch.sort(row, descending=True, stable=True).indices
    t, r = int(order[0]), int(order[1])
    return t, r, float(_gap(row[t], row[r]))


def sample_row_reference(
    row: torch.Tensor, seed: int, position: int, temperature: float, top_k: int = 0, min_p: float = 0.0
) -> tuple[int, int, float, float]:
    """(token, runner_up, margin, cutoff_margin) of one row by the definition in sampling.h."""
    x = row.float()
    vocab = x.shape[0]
    if temperature == 0 or torch.isnan(x).any():
        t, r, m = greedy_reference(x)
        return t, r, m, (math.nan if torch.isnan(x).any() else math.inf)
    temp = _f32(temperature)
    s = x / temp + gumbel_reference(seed, position, torch.arange(vocab))
    inside = torch.ones(vocab, dtype=torch.bool)
    use_k = 0 < top_k < vocab
    if use_k:
        order = torch.sort(x, descending=True, stable=True).indices  # value desc, index asc
        rank = torch.empty(vocab, dtype=torch.long)
        rank[order] = torch.arange(vocab)
        inside_k = rank < top_k
        kth, nxt = x[order[top_k - 1]], x[order[top_k]]
        inside &= inside_k
    use_p = min_p > 0
    if use_p:
        log_bound = (torch.tensor(float(temp), dtype=torch.float64) * log_reference(
            torch.tensor(float(_f32(min_p)), dtype=torch.float64))).to(torch.float32)
        diff = torch.where(x == x.max(), torch.zeros_like(x), x - x.max())
        inside_p = diff >= log_bound
        inside &= inside_p
    cand = inside.nonzero()[:, 0]
    sc = s[cand]
    best = int(torch.argmax(sc))  # first index on ties
    token = int(cand[best])
    if len(cand) == 1:
        runner, margin = -1, math.inf
    else:
        others = torch.cat([cand[:best], cand[best + 1 :]])
        runner = int(others[torch.argmax(s[others])])
        margin = float(temp * _gap(sc[best], s[runner]))
    if not (use_k or use_p):
        return token, runner, margin, math.inf
    inf = torch.full_like(x, math.inf)
    # D_i inside: the smaller distance; outside: the larger over the rules it fails.
    d_in, d_out = inf.clone(), torch.zeros_like(x)
    if use_k:
        d_in = torch.minimum(d_in, _gap(x, nxt.expand_as(x)))
        d_out = torch.where(~inside_k, torch.maximum(d_out, _gap(kth.expand_as(x), x)), d_out)
    if use_p:
        d_in = torch.minimum(d_in, _gap(diff, log_bound.expand_as(x)))
        d_out = torch.where(~inside_p, torch.maximum(d_out, _gap(log_bound.expand_as(x), diff)), d_out)
    s_token = s[token]
    excess = torch.where(s >= s_token, torch.zeros_like(s), temp * (s_token - s))
    outside = torch.maximum(d_out, excess)[~inside]
    cutoff = d_in[token]
    if outside.numel():
        cutoff = torch.minimum(cutoff, outside.min())
    return token, runner, margin, float(cutoff)


def sample_margin_reference(logits, seed, position, temperature, top_k=None, min_p=None):
    """The op's four outputs for a batch, row by row."""
    out = [
        sample_row_reference(
            logits[r],
            int(seed[r]),
            int(position[r]),
            float(temperature[r]),
            int(top_k[r]) if top_k is not None else 0,
            float(min_p[r]) if min_p is not None else 0.0,
        )
        for r in range(logits.shape[0])
    ]
    return (
        torch.tensor([o[0] for o in out], dtype=torch.int64),
        torch.tensor([o[1] for o in out], dtype=torch.int64),
        torch.tensor([o[2] for o in out], dtype=torch.float32),
        torch.tensor([o[3] for o in out], dtype=torch.float32),
    )


def torch_sample(logits: torch.Tensor, temperature: float, top_k: int = 0, min_p: float = 0.0, generator=None):
    """The usual torch way to sample (the benchmark's baseline): top_k / min_p masks on the
    logits, softmax, then Gumbel-max with torch's own exponential noise (argmax(p / Exp(1)))."""
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q).argmax(-1)
