"""Auditing transcripts against the canonical reference: Token-DiFR and Activation-DiFR, exactly.

(``margingate.audit`` is this module's ``audit``; the transcript format is ``margingate.transcripts``.)

A *transcript* is what a provider claims to have produced: a prompt (``prompt_ids``, or ``prompt``
text with a tokenizer), the ``output_ids`` it returned and the sampling parameters it claims
(greedy, or ``temperature`` > 0 with ``seed`` and optionally ``top_k`` / ``min_p``, as
``margingate.ops.sample_margin`` defines them). ``audit`` teacher-forces every transcript through
``canonical_forward`` (the whole sequence in one prefill pass; transcripts are batched, which the
batch invariance makes safe: each row gets its canonical logits bit for bit) and scores each
output token the way Token-DiFR does (Rinberg et al., PyPI ``token-difr``,
``token_difr.common._compute_margin_batch``):

    score_t = max_{i in C} (x_i + T g_i) - (x_gold + T g_gold)

the reference's noised top-1 score minus the noised score of the token the provider emitted, in
logit units, over the candidates ``C`` the sampling parameters keep (``+inf`` when the provider's
token is not a candidate); ``g`` is the sampling noise at that position and ``T`` the
temperature. We evaluate it as margingate's sampler does, ``T * (s_top - s_gold)`` with
``s_i = float32(x_i / T) + g_i`` (``margingate.noise``: counter-based Gumbel noise of
``(seed, position, index)``, ``position`` = the index of the token in the whole sequence, i.e. the
number of tokens before it); greedy (``T = 0``) is ``x_top - x_gold``. The score is 0 exactly when
the reference makes the provider's choice. Token-DiFR draws its noise from vLLM's torch generator;
the score is the same function of the noise (``tests/test_audit.py`` checks it against
``token_difr`` on shared noise).

What margingate adds: a transcript produced under ``always``, ``window`` or ``invariant`` was
produced *by* this reference (``margin`` too, wherever its calibrated threshold holds), so it
audits to exactly 0 on every token, in any batch. Any nonzero score is a real divergence, not numerical noise: the default ``threshold`` is
0. The fast path (``off``) can differ from the reference at near-ties without anything being
wrong; each mismatch is reported with the reference's top-1/top-2 margin there
(``reference_margin``), so a reader can tell a near-tie (margin of an ulp or two) from tampering.

Activation-DiFR fingerprints: ``fingerprints`` projects a hidden state at every output token
(the final hidden state, the input of the output embedding, or a named module's output) with a
seeded random orthonormal ``[k, hidden]`` matrix, through ``margingate.linear`` (row-invariant,
float32). A transcript may carry them (``fingerprint``: ``{"k", "seed", "layer", "values"}``);
the audit recomputes them canonically and reports the Euclidean distance per token: exactly 0 for
a provider that ran the canonical forward, > 0 as soon as its weights or kernels differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import hf_compat
from .batching import left_pad
from .canonical import canonical_forward
from .noise import gumbel_noise, log_mg
from .ops import canonical_bits_on, linear, margin
from .transcripts import DEFAULT_AUDIT_BATCH_SIZE, FINAL_HIDDEN, Transcript, check_token_ids, parse_transcript

__all__ = ["audit", "fingerprint_matrix", "fingerprints", "token_scores"]

_WHERE = "margingate.audit"


def _as_transcripts(transcripts: Sequence[Any], tokenizer: Any, vocab: int) -> list[Transcript]:
    if isinstance(transcripts, str | dict) or not isinstance(transcripts, Sequence) or not transcripts:
        raise TypeError(f"{_WHERE}: transcripts must be a non-empty list of Transcript or dicts")
    out = []
    for i, t in enumerate(transcripts):
        if not isinstance(t, Transcript):
            t = parse_transcript(t, f"{_WHERE}: transcript {i}", vocab)
        else:  # re-validate: a hand-built Transcript may hold ids outside this model's vocabulary
            source = t.source
            t = parse_transcript(t.to_json(), source or f"{_WHERE}: transcript {i}", vocab)
            t.source = source
        if t.prompt_ids is None:
            if tokenizer is None:
                raise ValueError(f"{_WHERE}: transcript {i} has a text prompt; pass tokenizer= to encode it")
            t.prompt_ids = check_token_ids(
                list(tokenizer(t.prompt)["input_ids"]), "prompt", f"{_WHERE}: transcript {i}", vocab
            )
        out.append(t)
    return out


def _prepare(model, transcripts: Sequence[Any], tokenizer: Any, pad_token_id: int | None) -> tuple[list[Transcript], int]:
    """The validated transcripts (prompts encoded) and the pad id to batch them with."""
    items = _as_transcripts(transcripts, tokenizer, hf_compat.vocab_size(model))
    if pad_token_id is None:
        pad_token_id = hf_compat.pad_id(model, tokenizer, hf_compat.eos_ids(model, tokenizer))
    return items, pad_token_id


# ----------------------------------------------------------------------------- scoring
def token_scores(
    logits: torch.Tensor,
    output_ids: Sequence[int],
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    positions: torch.Tensor | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> dict[str, list]:
    """Token-DiFR of one transcript from the reference's logits ``[n, V]`` (row t predicts
    ``output_ids[t]``): per token the reference's choice, the score (module docstring) and the
    reference's top-1/top-2 margin over the candidates (logit units). ``positions`` [n]: the noise
    positions (needed when ``temperature > 0``).

    The reference's choice and margin come from the native ops (``margin``; ``sample_margin``,
    which never materialises the noise); only the provided token's noised score is computed here,
    with the same float32 arithmetic, so the result equals the plain-torch definition the tests hold
    it to (``tests/references.py``, ``token_scores_reference``)."""
    x = logits.float()
    gold = torch.tensor(list(output_ids), dtype=torch.long, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    if temperature == 0:
        top1, _top2, ref_margin = margin(x)
        scores = x[rows, top1] - x[rows, gold]
        choice = top1
    else:
        from .ops import sample_margin

        seed64 = int(seed) - (1 << 64) if int(seed) >= 1 << 63 else int(seed)
        positions = positions.to(device=x.device, dtype=torch.int64)
        choice, _runner, ref_margin, _cut = sample_margin(x, seed64, positions, temperature, top_k, min_p)
        t32 = torch.tensor(float(temperature), dtype=torch.float32, device=x.device)

        def noised(index: torch.Tensor) -> torch.Tensor:
            return x[rows, index] / t32 + gumbel_noise(seed64, positions, index)

        s_top, s_gold = noised(choice), noised(gold)
        x_gold = x[rows, gold]
        inside = torch.ones_like(gold, dtype=torch.bool)
        if 0 < top_k < x.shape[-1]:  # rank of the gold token under (value descending, index ascending)
            index = torch.arange(x.shape[-1], device=x.device)
            rank = (x > x_gold[:, None]).sum(-1) + ((x == x_gold[:, None]) & (index < gold[:, None])).sum(-1)
            inside &= rank < top_k
        if min_p > 0:
            t64 = torch.tensor(temperature, dtype=torch.float32).double()
            cut = (t64 * log_mg(torch.tensor([min_p], dtype=torch.float32).double())).float().to(x.device)
            inside &= (x_gold - x.max(-1).values) >= cut
        scores = torch.where(
            gold == choice,
            torch.zeros_like(s_top),
            torch.where(inside, t32 * (s_top - s_gold), torch.full_like(s_top, math.inf)),
        )
    return {
        "reference_ids": choice.tolist(),
        "scores": scores.tolist(),
        "reference_margins": ref_margin.tolist(),
    }


# ----------------------------------------------------------------------------- fingerprints
def fingerprint_matrix(hidden: int, k: int, seed: int) -> torch.Tensor:
    """The seeded ``[k, hidden]`` float32 matrix with orthonormal rows: ``k`` float64 Gaussian
    vectors from a CPU ``torch.Generator``, orthonormalised by modified Gram-Schmidt in Python
    floats with ``math.fsum`` (correctly rounded sums), so the bits do not depend on a BLAS/LAPACK
    build, thread count or ISA: provider and auditor get the same matrix everywhere."""
    if not 1 <= k <= hidden:
        raise ValueError(f"{_WHERE}: fingerprint k must be in [1, {hidden}] (the hidden size), got {k}")
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    rows = torch.randn(k, hidden, generator=g, dtype=torch.float64).tolist()
    basis: list[list[float]] = []
    for v in rows:
        for b in basis:
            dot = math.fsum(x * y for x, y in zip(v, b, strict=True))
            v = [x - dot * y for x, y in zip(v, b, strict=True)]
        norm = math.sqrt(math.fsum(x * x for x in v))
        basis.append([x / norm for x in v])
    return torch.tensor(basis, dtype=torch.float64).float()


def _capture(model: torch.nn.Module, layer: str, store: list):
    """Registers a hook that appends the chosen hidden state [B, n, H] to ``store``."""
    if layer == FINAL_HIDDEN:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{_WHERE}: the model has no output embedding; name a fingerprint layer")
        return head.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(
            f"{_WHERE}: fingerprint layer {layer!r} is not a module of the model (or {FINAL_HIDDEN!r})"
        )

    def keep(_m, _args, out):
        store.append(out[0] if isinstance(out, tuple) else out)

    return modules[layer].register_forward_hook(keep)


def _teacher_forced(model, batch: list[Transcript], pad: int, layer: str | None):
    """One canonical forward of a batch: per transcript, logits [n, V] predicting its outputs and
    (with ``layer``) the hidden states [n, H] at the same positions."""
    device = next(model.parameters()).device
    sequences = [t.prompt_ids + t.output_ids[:-1] for t in batch]
    ids, mask = left_pad(sequences, pad, device)
    keep = max(len(t.output_ids) for t in batch)
    store: list[torch.Tensor] = []
    handle = _capture(model, layer, store) if layer is not None else None
    try:
        logits = canonical_forward(model, ids, attention_mask=mask, logits_to_keep=keep)
    finally:
        if handle is not None:
            handle.remove()
    hidden = store[-1] if store else None
    out = []
    for r, t in enumerate(batch):
        n = len(t.output_ids)
        h = hidden[r, hidden.shape[1] - n :] if hidden is not None else None
        out.append((logits[r, logits.shape[1] - n :], h))
    return out


def _project(h: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    # margingate.linear is row-invariant: a token's fingerprint does not depend on the batch.
    return linear(h.float().contiguous(), matrix.to(h.device))


def fingerprints(
    model: torch.nn.Module,
    transcripts: Sequence[Any],
    *,
    k: int = 16,
    seed: int = 0,
    layer: str = FINAL_HIDDEN,
    tokenizer: Any = None,
    batch_size: int = DEFAULT_AUDIT_BATCH_SIZE,
    pad_token_id: int | None = None,
) -> list[Transcript]:
    """The transcripts with their canonical Activation-DiFR fingerprints attached: per output
    token, the ``k``-dimensional projection (``fingerprint_matrix(hidden, k, seed)``) of ``layer``'s
    hidden state at the position that produced it. This is what an honest margingate provider
    ships; ``audit`` recomputes it and finds distance 0."""
    items, pad = _prepare(model, transcripts, tokenizer, pad_token_id)
    out = []
    matrix = None
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        for t, (_logits, h) in zip(batch, _teacher_forced(model, batch, pad, layer), strict=True):
            if matrix is None:
                matrix = fingerprint_matrix(h.shape[-1], k, seed)
            t.fingerprint = {"k": k, "seed": seed, "layer": layer, "values": _project(h, matrix).tolist()}
            out.append(t)
    return out


# ----------------------------------------------------------------------------- the audit
def audit(
    model: torch.nn.Module,
    transcripts: Sequence[Any],
    *,
    tokenizer: Any = None,
    threshold: float = 0.0,
    fingerprint_tolerance: float = 0.0,
    batch_size: int = DEFAULT_AUDIT_BATCH_SIZE,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """Audits ``transcripts`` (``Transcript`` objects or their JSON dicts) against the canonical
    reference of ``model``; one teacher-forced canonical forward per batch of ``batch_size``.

    Returns ``{"transcripts": [...], "summary": {...}}``. Per transcript: ``id``, ``provider``,
    ``tokens``, ``scores`` (one Token-DiFR score per output token), ``reference_ids``,
    ``reference_margins``, ``match_rate`` (fraction of tokens where the reference makes the same
    choice), ``mean_score``, ``max_score``, ``mismatches`` (``step``, ``provided``, ``reference``,
    ``score``, ``reference_margin`` of every token where the reference chooses differently),
    ``verdict`` (``"exact"``: the reference makes every choice of the provider and every
    fingerprint distance is 0; ``"pass"``: every score <= ``threshold`` and every fingerprint
    distance <= ``fingerprint_tolerance``; ``"fail"``), and with a fingerprint
    ``fingerprint_distances`` (Euclidean, per token) and ``fingerprint_max``.
    ``summary``: counts per verdict, overall match rate, mean and max score, the threshold.
    ``canonical_bits`` (the reference's bit class, ``build_info()``) is in the summary; a
    transcript that recorded another class gets ``other_bit_class: True``: its tokens were chosen
    by a canonical forward with other bits, so exact zero is not promised for it (near-ties may
    differ) and its verdict says what was measured, nothing more.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
        raise ValueError(f"{_WHERE}: threshold must be a number >= 0, got {threshold!r}")
    if (
        isinstance(fingerprint_tolerance, bool)
        or not isinstance(fingerprint_tolerance, int | float)
        or not fingerprint_tolerance >= 0
    ):
        raise ValueError(
            f"{_WHERE}: fingerprint_tolerance must be a number >= 0, got {fingerprint_tolerance!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{_WHERE}: batch_size must be an int >= 1, got {batch_size!r}")
    hf_compat.check_supported(model, _WHERE)
    items, pad = _prepare(model, transcripts, tokenizer, pad_token_id)
    layers = {t.fingerprint["layer"] for t in items if t.fingerprint is not None}
    for layer in layers:  # check the layer names before running anything
        if layer != FINAL_HIDDEN and layer not in dict(model.named_modules()):
            raise ValueError(f"{_WHERE}: fingerprint layer {layer!r} is not a module of the model")

    # Transcripts with fingerprints of different layers are run in separate groups (one hook each).
    groups: dict[str | None, list[int]] = {}
    for i, t in enumerate(items):
        groups.setdefault(t.fingerprint["layer"] if t.fingerprint else None, []).append(i)
    by_index: dict[int, dict[str, Any]] = {}
    for layer, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = [items[i] for i in chunk]
            for i, t, (logits, h) in zip(chunk, batch, _teacher_forced(model, batch, pad, layer), strict=True):
                by_index[i] = _audit_one(i, t, logits, h, threshold, fingerprint_tolerance)
    results = [by_index[i] for i in range(len(items))]
    reference_bits = canonical_bits_on(next(model.parameters()).device)
    for t, entry in zip(items, results, strict=True):
        entry["canonical_bits"] = t.canonical_bits
        entry["other_bit_class"] = t.canonical_bits is not None and t.canonical_bits != reference_bits
    return {"transcripts": results, "summary": {**_summary(results, threshold), "canonical_bits": reference_bits}}


def _audit_one(i: int, t: Transcript, logits: torch.Tensor, h, threshold: float, tolerance: float) -> dict[str, Any]:
    """One transcript's entry: its Token-DiFR scores from the canonical ``logits`` of its output
    positions, and with a fingerprint the distance of each token's projected hidden state ``h``."""
    positions = torch.arange(len(t.prompt_ids), len(t.prompt_ids) + len(t.output_ids))
    s = token_scores(
        logits, t.output_ids, temperature=t.temperature, seed=t.seed, positions=positions, top_k=t.top_k,
        min_p=t.min_p,
    )  # fmt: skip
    entry = _summarize_transcript(i, t, s, threshold)
    if t.fingerprint is not None:
        fp = t.fingerprint
        mine = _project(h, fingerprint_matrix(h.shape[-1], fp["k"], fp["seed"])).double()
        theirs = torch.tensor(fp["values"], dtype=torch.float32).double()
        dist = (mine - theirs).norm(dim=-1)
        entry["fingerprint_distances"] = dist.tolist()
        entry["fingerprint_max"] = float(dist.max())
        if entry["fingerprint_max"] > tolerance:
            entry["verdict"] = "fail"
        elif entry["fingerprint_max"] > 0 and entry["verdict"] == "exact":
            entry["verdict"] = "pass"
    return entry


def _summarize_transcript(i: int, t: Transcript, s: dict[str, list], threshold: float) -> dict[str, Any]:
    scores = s["scores"]
    mismatches = [
        {
            "step": step,
            "provided": t.output_ids[step],
            "reference": s["reference_ids"][step],
            "score": scores[step],
            "reference_margin": s["reference_margins"][step],
        }
        for step in range(len(scores))
        if s["reference_ids"][step] != t.output_ids[step]
    ]
    worst = max(scores)
    # A tie makes the score 0 although the first-index rule picks another token: not exact.
    verdict = "exact" if not mismatches else "pass" if worst <= threshold else "fail"
    return {
        "id": t.id if t.id is not None else i,
        "provider": t.provider,
        "sampling": "greedy"
        if t.temperature == 0
        else f"T={t.temperature:g} seed={t.seed} top_k={t.top_k} min_p={t.min_p:g}",
        "tokens": len(scores),
        "scores": scores,
        "reference_ids": s["reference_ids"],
        "reference_margins": s["reference_margins"],
        "match_rate": 1 - len(mismatches) / len(scores),
        "mean_score": sum(scores) / len(scores),
        "max_score": worst,
        "mismatches": mismatches,
        "verdict": verdict,
    }


def _summary(results: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    all_scores = [x for r in results for x in r["scores"]]
    return {
        "transcripts": len(results),
        "tokens": tokens,
        "threshold": threshold,
        "exact": sum(r["verdict"] == "exact" for r in results),
        "passed": sum(r["verdict"] == "pass" for r in results),
        "failed": sum(r["verdict"] == "fail" for r in results),
        "match_rate": sum(r["match_rate"] * r["tokens"] for r in results) / tokens,
        "mean_score": sum(all_scores) / tokens,
        "max_score": max(all_scores),
        "mismatch_margins": sorted(m["reference_margin"] for r in results for m in r["mismatches"]),
    }
