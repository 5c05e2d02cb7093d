"""Plain-torch references of the native ops, one per op, shared by the CPU tests (test_margin.py,
test_linear.py, test_attention.py) and the CUDA tests (test_cuda_*.py). Each runs on the device
of its inputs and follows the op's contract, not its algorithm. The sampling op's reference is in
``reference_sampling.py``; the audit's Token-DiFR score is here (``token_scores_reference``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from margingate.noise import log_mg, noised_scores
from margingate.ops import margin


def margin_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``margingate.margin``'s contract: top1 = torch.argmax (first index on ties, NaN outranks
    every number); top2 = argmax with top1 masked out; margin = v1 - v2 in fp32, 0 on a tie, NaN
    when the row holds a NaN."""
    x = logits.float()
    rows = torch.arange(x.shape[0], device=x.device)
    top1 = torch.argmax(logits, dim=-1)
    rest = x.clone()
    rest[rows, top1] = float("-inf")
    # A NaN outranks every number: the second NaN (if any) is the runner-up.
    nan_rest = torch.isnan(rest)
    top2 = torch.where(nan_rest.any(-1), nan_rest.int().argmax(-1), rest.nan_to_num(nan=float("-inf")).argmax(-1))
    # argmax of a row that is all -inf after masking: first index other than top1.
    all_neg_inf = torch.isneginf(rest).all(-1) & ~nan_rest.any(-1)
    first_other = (top1 == 0).long()
    top2 = torch.where(all_neg_inf, first_other, top2)
    v1 = x.gather(1, top1[:, None])[:, 0]
    v2 = x.gather(1, top2[:, None])[:, 0]
    margin = torch.where(v1 == v2, torch.zeros_like(v1), v1 - v2)
    margin = torch.where(torch.isnan(x).any(-1), torch.full_like(v1, math.nan), margin)
    return top1, top2, margin


def linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + b`` in float64."""
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def visible_mask(Tq: int, Tk: int, kv_start=None, causal=True, window=None, device=None) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool (B = 1 without ``kv_start``): which key each query sees; the queries sit
    at the last Tq of the Tk positions, row b's keys start at ``kv_start[b]`` (left padding)."""
    device = kv_start.device if kv_start is not None and device is None else device
    p = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    t = torch.arange(Tk, device=device)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= t <= p
    if window is not None:
        mask &= t > p - window
    mask = mask[None, None]
    if kv_start is not None:
        mask = mask & (t[None, None] >= kv_start.long()[:, None, None, None])
    return mask


def attention_reference(
    q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None, compute=torch.float64
):
    """``margingate.attention``'s contract in plain torch (fp64 by default), explicit masking;
    queries that see no key give zeros. ``kv_rows`` picks each query row's K/V row."""
    B, Hq, Tq, D = q.shape
    if kv_rows is not None:
        k, v = k[kv_rows.long()], v[kv_rows.long()]
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.to(compute).repeat_interleave(Hq // Hkv, dim=1)
    v = v.to(compute).repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q.to(compute) @ k.transpose(-1, -2)) * scale
    mask = visible_mask(Tq, Tk, kv_start, causal, window, device=q.device)
    scores = scores.masked_fill(~mask, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def softmax_attention_reference(q, k, v):
    """torch's attention semantics in float64, causal (softmax of the masked scores, then @ v):
    NaN for a query with a NaN or +inf score or with only -inf scores. Masked scores are replaced
    with masked_fill, so a NaN in a masked key stays out, as our contract has it (the math SDPA
    backend adds a -inf bias instead, and NaN + -inf is NaN)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    Tq, Tk = q.shape[2], k.shape[2]
    visible = torch.arange(Tk, device=q.device)[None, :] <= Tk - Tq + torch.arange(Tq, device=q.device)[:, None]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) / math.sqrt(q.shape[3])
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vv)


# ----------------------------------------------------------------------------- audit scores
def candidate_mask(x: torch.Tensor, temperature: float, top_k: int, min_p: float) -> torch.Tensor | None:
    """[n, V] bool mask of the indices the sampler keeps (None: all), as ``sample_margin`` decides
    (cpp/include/margingate/sampling.h): top_k keeps exactly k, ties at the k-th value to the
    lowest indices; min_p keeps ``float32(x - max) >= float32(T * log_mg(min_p))``."""
    keep = None
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        above = x > kth
        tied = x == kth
        room = top_k - above.sum(-1, keepdim=True)
        keep = above | (tied & (tied.cumsum(-1) <= room))
    if min_p > 0:
        # The op takes T and min_p as float32; the cut-off is computed in float64, rounded once.
        t64 = torch.tensor(temperature, dtype=torch.float32).double()
        q64 = torch.tensor([min_p], dtype=torch.float32).double()
        cut32 = (t64 * log_mg(q64)).float()
        d = x - x.max(-1, keepdim=True).values
        inside = d >= cut32
        keep = inside if keep is None else keep & inside
    return keep


def token_scores_reference(
    logits: torch.Tensor,
    output_ids: Sequence[int],
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    positions: torch.Tensor | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> dict[str, list]:
    """``margingate.difr.token_scores`` by the plain-torch definition: the noised scores of the
    whole vocabulary materialised (``noise.noised_scores``), the candidates as a mask. Slow
    (float64 noise for every index); test_audit.py holds the native path to it bit for bit."""
    x = logits.float()
    gold = torch.tensor(list(output_ids), dtype=torch.long, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    if temperature == 0:
        top1, _top2, ref_margin = margin(x)
        scores = x[rows, top1] - x[rows, gold]
        choice = top1
    else:
        s = noised_scores(x, seed, positions, temperature)
        keep = candidate_mask(x, temperature, top_k, min_p)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        best2 = torch.topk(s, 2, dim=-1)
        choice = s.argmax(-1)  # the first index on ties, as the sampler
        t32 = torch.tensor(float(temperature), dtype=torch.float32)
        s_top = s[rows, choice]
        s_gold = s[rows, gold]
        scores = torch.where(s_gold == s_top, torch.zeros_like(s_top), t32 * (s_top - s_gold))
        second = best2.values[:, 1]
        ref_margin = torch.where(
            torch.isinf(second), torch.full_like(s_top, math.inf), t32 * (s_top - second)
        )
    return {
        "reference_ids": choice.tolist(),
        "scores": scores.tolist(),
        "reference_margins": ref_margin.tolist(),
    }
