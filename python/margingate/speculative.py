"""Speculative decoding on the canonical verifier, exact or margin-aware (MARS).

``margingate.generate(..., policy="always", speculative=k)`` decodes a left-padded batch like this
(``decode_speculative``):

1. canonical prefill of the prompts; the first token of each row is the canonical argmax;
2. each round, a *drafter* proposes up to ``k`` tokens per unfinished row from the row's tokens so
   far (``PromptLookupDrafter``: n-gram matches against the prompt and the generated tokens, no
   second model; ``ModelDrafter``: greedy tokens of a small causal LM sharing the tokenizer);
3. one canonical forward over every row's unverified positions, drafts included, appended to the
   shared cache: the logits at a draft's position are the canonical logits given the row's tokens
   before it;
4. per row, the longest prefix of drafts that equals the canonical argmax is accepted, followed by
   the verifier's own token (the correction at the first mismatch, or the next token when every
   draft matched);
5. the cache is cropped back to the shortest accepted row; rows that accepted more re-feed their
   accepted tokens (already final) at the head of the next round's pass.

The pass is at most ``k + 2`` positions wide (``pass_width``): a row whose re-fed head plus its
drafts would not fit sits the round out. It re-feeds its head (the cache stays aligned), asks no
drafts, commits nothing, and takes its postponed round, the same one, in a later pass. Without
the cap a row that keeps accepting runs ever further ahead of the slowest one and every pass
widens with its re-fed tokens for all rows (19 positions on ShareGPT at batch 8, k = 4, where the
rounds need 5). Postponing, not shortening, keeps each row's sequence of rounds (contexts,
drafts, decisions) its own, which MARS needs.

Every position of the shared cache is written by the canonical forward, so nothing is repaired:
a rejected position is simply cropped. The canonical forward is row-, padding- and
query-invariant (a pass over several tokens gives the bits of as many single-token steps), so in
exact mode the tokens equal ``always``'s bit for bit, whatever ``k``, the drafter and the batch.
The drafter only decides the speed.

MARS (margin-aware speculative verification, arXiv 2601.15498; ``mars_threshold=tau``): at a draft
position whose canonical top-1/top-2 margin is below ``tau``, a draft that is the canonical
runner-up is accepted too. This is **not** greedy decoding: the output differs from ``always``'s
at every such position (counted per row in ``mars_changed``, their steps in ``mars_steps``) and
everywhere after it. It is still reproducible across batch configurations, because the decision
is taken on canonical logits and the drafts of a row depend on that row's tokens alone (both
drafters here see one row at a time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from . import hf_compat
from .canonical import canonical_forward
from .decoding import Batch, BatchJob, Outcome
from .ops import margin

_WHERE = "margingate.generate"


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens. ``propose(contexts, k)``: for each row's token ids so far (prompt and
    final generated tokens), up to ``k`` next tokens (fewer, or none, when it has no guess). It must
    depend on each row's context alone (not on the other rows) for MARS to stay batch-invariant."""

    def propose(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[int]]: ...


class PromptLookupDrafter:
    """Prompt lookup (as ``transformers``' ``prompt_lookup_num_tokens``): find the row's last
    ``n`` tokens earlier in its context, for ``n`` from ``max_ngram`` down to ``min_ngram``, and
    propose the tokens that followed that occurrence. The most recent occurrence with a
    continuation wins (transformers takes the first), which follows repetition loops better."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"margingate.PromptLookupDrafter: {name} must be an int >= 1, got {value!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"margingate.PromptLookupDrafter: min_ngram {min_ngram} > max_ngram {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        return [self._one(list(c), k) for c in contexts]

    def _one(self, context: list[int], k: int) -> list[int]:
        length = len(context)
        if k < 1:
            return []
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = context[length - n :]
            # occurrences ending before the last token, latest first
            for start in range(length - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    return context[start + n : start + n + k]
        return []


class ModelDrafter:
    """A user's draft model (a Hugging Face causal LM sharing the target's tokenizer) as drafter:
    ``k`` greedy tokens per row on the model's own kernels. Each row runs alone (batch of one) with
    its own cache, kept between rounds and cropped to the part of the context that did not
    change, so a row's drafts depend on its tokens alone. A context continues the kept cache whose
    tokens share its longest prefix (each cache serves one context per call)."""

    def __init__(self, model: torch.nn.Module, vocab_limit: int | None = None) -> None:
        if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "forward", None)):
            raise TypeError(f"margingate.ModelDrafter: model must be a transformers causal LM, got {type(model).__name__}")
        self.model = model
        self.vocab_limit = vocab_limit  # drafts at or past it (not in the target's vocabulary) are cut
        self._kept: list[tuple[list[int], Any]] = []  # (tokens in the cache, cache), one per row

    def reset(self) -> None:
        """Forgets the per-row caches (``generate`` calls it before each batch)."""
        self._kept = []

    def propose(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        available, kept, out = list(self._kept), [], []
        for c in contexts:
            context = list(c)
            shared = [_common_prefix(held, context) for held, _ in available]
            best = max(range(len(shared)), key=shared.__getitem__, default=None)
            held, cache = available.pop(best) if best is not None and shared[best] else ([], None)
            drafts, entry = self._one(context, k, held, cache)
            out.append(drafts)
            kept.append(entry)
        # rows that asked nothing this call keep their caches: a row sitting a round out
        # (decode_speculative) continues where it left off, so its drafts do not depend on that
        self._kept = kept + available
        return out

    def _one(self, context: list[int], k: int, held: list[int], cache: Any) -> tuple[list[int], tuple[list[int], Any]]:
        if k < 1 or not context:
            return [], (held, cache)
        device = next(self.model.parameters()).device
        same = _common_prefix(held, context)
        keep = min(same, len(context) - 1)  # the last context token is always fed, for its logits
        if cache is None or keep == 0:
            cache, keep = hf_compat.new_cache(), 0
        else:
            hf_compat.crop(cache, keep)
        tokens = list(context[:keep])
        feed = context[keep:]
        drafts: list[int] = []
        with torch.inference_mode():
            while True:
                ids = torch.tensor([feed], dtype=torch.long, device=device)
                total = len(tokens) + len(feed)
                mask = torch.ones((1, total), dtype=torch.long, device=device)
                positions = torch.arange(len(tokens), total, device=device)[None]
                logits = hf_compat.forward(self.model, ids, mask, positions, cache, logits_to_keep=1)[:, -1]
                tokens += feed
                nxt = int(logits.argmax(dim=-1))
                if self.vocab_limit is not None and nxt >= self.vocab_limit:
                    break
                drafts.append(nxt)
                if len(drafts) == k:
                    break
                feed = [nxt]
        return drafts, (tokens, cache)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def as_drafter(drafter: Any, target: torch.nn.Module) -> Any:
    """``drafter`` as an object with ``propose``: ``None`` -> ``PromptLookupDrafter()``, a causal
    LM -> ``ModelDrafter``; raises ``TypeError`` naming the argument otherwise."""
    if drafter is None:
        return PromptLookupDrafter()
    if isinstance(drafter, torch.nn.Module):
        if drafter is target:
            raise ValueError(f"{_WHERE}: drafter is the target model itself; pass a smaller draft model or None")
        draft_vocab, target_vocab = hf_compat.vocab_size(drafter), hf_compat.vocab_size(target)
        if draft_vocab < target_vocab:
            raise ValueError(
                f"{_WHERE}: the drafter's vocabulary ({draft_vocab}) is smaller than the model's ({target_vocab}): "
                "it cannot read every token the model writes; pass a draft model with the model's tokenizer"
            )
        return ModelDrafter(drafter, vocab_limit=target_vocab)
    if callable(getattr(drafter, "propose", None)):
        return drafter
    raise TypeError(
        f"{_WHERE}: drafter must be None (prompt lookup), a draft causal LM, or an object with "
        f"propose(contexts, k); got {type(drafter).__name__}"
    )


def check_speculative(speculative: Any, mars_threshold: Any, policy: str) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument for a bad ``speculative`` (k),
    ``mars_threshold`` or a policy speculative decoding does not apply to."""
    if speculative is None:
        if mars_threshold is not None:
            raise ValueError(f"{_WHERE}: mars_threshold needs speculative=k (MARS relaxes speculative acceptance)")
        return
    if isinstance(speculative, bool) or not isinstance(speculative, int):
        raise TypeError(f"{_WHERE}: speculative must be an int (draft tokens per round), got {type(speculative).__name__}")
    if speculative < 1:
        raise ValueError(f"{_WHERE}: speculative must be >= 1 (draft tokens per round), got {speculative}")
    if policy != "always":
        raise ValueError(
            f"{_WHERE}: speculative decoding verifies every token canonically, so its tokens are "
            f"policy='always''s; pass policy='always' with speculative=k (got policy={policy!r})"
        )
    if mars_threshold is not None:
        if isinstance(mars_threshold, bool) or not isinstance(mars_threshold, (int, float)):
            raise TypeError(f"{_WHERE}: mars_threshold must be a float, got {type(mars_threshold).__name__}")
        if not mars_threshold >= 0:  # also NaN
            raise ValueError(f"{_WHERE}: mars_threshold must be >= 0 (a logit margin), got {mars_threshold}")


def pass_width(k: int) -> int:
    """The widest canonical pass ``decode_speculative`` runs for ``k`` drafts: the slowest row's one
    re-fed token and ``k`` drafts, plus one position of slack so that a row one token ahead still
    drafts fully. Chosen by replaying the default model's recorded per-row rounds (k = 4, batch
    4/8/16) against a cost model fitted to its timed passes: k + 1 cost 8 % more at batch 4
    (stalled rows ahead) and 3 % less at batch 16; k + 3 and wider cost more everywhere (re-fed
    tokens at every row). bench/README.md, "speculative decoding", has the timed result."""
    return k + 2


def decode_speculative(
    model: torch.nn.Module, job: BatchJob, *, k: int = 4, mars_threshold: float | None = None, drafter: Any = None
) -> Outcome:
    """One left-padded batch by speculative decoding on the canonical forward (module docstring).

    Invariant at the top of a round: the cache holds ``cached`` canonical positions, all of them
    final tokens of every unfinished row; row ``b``'s final tokens reach ``prompt_length +
    len(committed[b]) > cached`` (the tokens between are fed again at the head of the pass).
    A row takes part in a pass only when its head and drafts fit ``pass_width(k)``; the slowest row
    (head of one token) always does, so every pass commits. Per-row statistics: ``drafted``,
    ``accepted`` (drafts kept), ``passes`` (canonical passes the row took a round in, the prefill
    included; passes it sat out re-feeding are not counted), ``mars_changed``/``mars_steps`` (tokens MARS took
    from the runner-up), and those of the other loops. ``margins`` (``record_margins``): the
    canonical margin of the logits that decided each token."""
    # Speculative decoding verifies every token (no gate, no window) and is greedy only here:
    # job.policy is "always", job.threshold and job.window do not apply, job.sampling is greedy.
    drafter = as_drafter(drafter, model)
    if hasattr(drafter, "reset"):
        drafter.reset()
    batch = Batch(model, job)
    for record in batch.stats:
        record.drafted, record.accepted, record.passes, record.mars_changed, record.mars_steps = 0, 0, 1, 0, []
    passes = 1
    with torch.inference_mode():
        logits = batch.forward_last(batch.ids, canonical=True)
        top1, _, gap = margin(logits)
        now = time.perf_counter()
        for b in range(batch.size):
            batch.commit(b, [int(top1[b])], [now])
            batch.margins[b].append(float(gap[b]))
            batch.stats[b].replayed_positions += batch.prompt_length
        cached = batch.prompt_length
        while not batch.all_done():
            _speculative_round(batch, cached, k, mars_threshold, drafter)
            passes += 1
            # crop to what every unfinished row has fed and kept (its last token is not fed yet)
            unfinished = [b for b in range(batch.size) if not batch.done(b)]
            keep = min((batch.prompt_length + len(batch.committed[b]) - 1 for b in unfinished), default=cached)
            hf_compat.crop(batch.cache, keep)
            batch.mask = batch.mask[:, :keep]
            cached = keep
    for b, record in enumerate(batch.stats):
        record.steps = record.verified = len(batch.committed[b])
    return batch.finish(0.0, {"verify_passes": passes})


def _speculative_round(batch: Batch, cached: int, k: int, mars_threshold: float | None, drafter: Any) -> None:
    """One round: drafts for the rows whose round fits the pass, one canonical pass over every
    unfinished row's head and drafts, and each taking row's accepted tokens committed."""
    job = batch.job
    active = [b for b in range(batch.size) if not batch.done(b)]
    # final tokens not yet in the cache, then drafts within the row's token budget
    heads = {b: batch.committed[b][cached - batch.prompt_length :] for b in active}
    budget = {b: min(k, job.max_new_tokens - len(batch.committed[b]) - 1) for b in active}
    # rows whose round does not fit the pass re-feed their head only (module docstring)
    rounds = [b for b in active if len(heads[b]) + budget[b] <= pass_width(k)]
    asked = [b for b in rounds if budget[b] > 0]
    proposed = drafter.propose([job.prompts[b] + batch.committed[b] for b in asked], k) if asked else []
    if len(proposed) != len(asked):
        raise RuntimeError(f"{_WHERE}: the drafter returned {len(proposed)} rows for {len(asked)}")
    drafts = {b: [int(t) for t in p][: budget[b]] for b, p in zip(asked, proposed, strict=True)}
    width = max(len(heads[b]) + len(drafts.get(b, [])) for b in active)
    block = torch.full((batch.size, width), job.pad_id, dtype=torch.long)
    for b in active:
        row = heads[b] + drafts.get(b, [])
        block[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, width))], dim=1)
    logits = canonical_forward(batch.model, block.to(batch.device), attention_mask=batch.mask, cache=batch.cache)
    now = time.perf_counter()
    for b in active:
        record, h, d = batch.stats[b], len(heads[b]), drafts.get(b, [])
        if b not in rounds:  # sat out: its head was re-fed, nothing is decided
            record.replayed_positions += h
            continue
        # logits[b, h - 1 + i] decide the token after head and i drafts
        top1, top2, gap = (t.cpu() for t in margin(logits[b, h - 1 : h + len(d)]))
        tokens: list[int] = []
        for i in range(len(d) + 1):
            want = int(top1[i])
            runner_up = i < len(d) and d[i] != want and d[i] == int(top2[i])
            if runner_up and mars_threshold is not None and bool(gap[i] < mars_threshold):
                record.mars_changed += 1
                record.mars_steps.append(len(batch.committed[b]) + len(tokens))
                want = d[i]
            tokens.append(want)
            batch.margins[b].append(float(gap[i]))
            if want in batch.eos or i == len(d) or want != d[i]:
                break
        record.drafted += len(d)
        record.accepted += sum(1 for i, t in enumerate(tokens[: len(d)]) if t == d[i])
        record.passes += 1
        record.replayed_positions += h + len(d)
        batch.commit(b, tokens, [now] * len(tokens))


__all__ = ["Drafter", "ModelDrafter", "PromptLookupDrafter", "as_drafter", "check_speculative", "pass_width"]
