"""``MarginGateProcessor``: the MarginGate step, as a Hugging Face logits processor.

One call is one decode step of a left-padded batch: compute every row's fast-path top-1/top-2
margin with the fused ``margingate.margin`` kernel; rows below the threshold (all rows under
``always``; NaN margins always) go to the ``Verifier``, which replays them canonically and repairs
their K/V in place; their scores are replaced by the canonical logits. ``decide`` is the step
(every row's token and the scores); ``margingate.generate``'s decode loop calls it, and the
logits-processor ``__call__`` wraps it for a plain ``model.generate`` (see the class docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicCache

from . import hf_compat
from .batching import check_left_padded
from .policies import check_policy, check_threshold, default_threshold
from .sampling import Sampling, choose
from .stats import RowStats, summarize
from .verifier import Verifier

_NAME = "margingate.MarginGateProcessor"
PROCESSOR_POLICIES = ("off", "margin", "always")


class MarginGateProcessor(LogitsProcessor):
    """Margin-gated verification of greedy decoding.

    In a plain ``model.generate`` (left-padded batches, greedy)::

        cache = DynamicCache()
        upto = margingate.canonical_prefill(model, ids, mask, cache)   # optional, see below
        proc = MarginGateProcessor(model, cache, attention_mask=mask, canonical_upto=upto)
        kw = margingate.hf_compat.cache_keyword(model)   # "cache" (transformers >= 5.24) or "past_key_values"
        model.generate(ids, attention_mask=mask, logits_processor=[proc], do_sample=False, **{kw: cache})

    Greedy decoding only (``do_sample=False``; a processor cannot see how ``generate`` picks the
    token, so sampling is the caller's responsibility). It must be the first logits processor
    applied: its margin has to be that of the model's raw
    logits, and the verified logits it returns must still pass through every later processor.
    (``transformers`` runs the processors it derives from the generation config, e.g. repetition
    penalty, before the user's list: configure those through the list instead.)
    Without ``canonical_prefill`` the prompt K/V are the fast path's; the first verification of a
    row then replays its whole prompt, so the result is the same, the first verified step costs more.

    One processor serves one generation: it checks that each call extends the previous one.

    Args:
        model: a causal LM whose ``model_type`` is in ``margingate.SUPPORTED_MODEL_TYPES``.
        cache: the ``DynamicCache()`` of the generation (repaired in place).
        policy: ``off`` (measure only), ``margin`` or ``always``.
        threshold: verify rows whose fast-path margin is below this (logit units, >= 0); ``None``
            takes the model's shipped calibration (``margingate.policies.default_threshold``).
        attention_mask: the prompt's left-padded mask [B, P] (None: no padding).
        canonical_upto: cache positions already canonical when generation starts (what
            ``canonical_prefill`` returns; the prompt length after ``margingate.generate``'s prefill).
        eos_token_id: rows that generated one of these are finished: not counted, not verified.
        record_margins: keep every step's fast-path margin per row (``margins``).
        piggyback: when rows are flagged, also replay the unflagged rows whose canonical frontier
            is not behind theirs (same window, one forward); ``False`` replays the flagged rows only.
        sampling, seeds: temperature > 0: seeded Gumbel-max sampling (``margingate.sampling``) with
            one seed per row; the gate then reads the noised margin and the truncation cut-off's
            margin, and the returned scores force the sampled token (0 there, -inf elsewhere), so
            ``generate(do_sample=True)`` or greedy selection after it picks exactly that token.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: DynamicCache,
        policy: str = "margin",
        threshold: float | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        canonical_upto: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        record_margins: bool = False,
        piggyback: bool = True,
        sampling: Sampling | None = None,
        seeds: Sequence[int] | None = None,
    ) -> None:
        check_policy(policy, _NAME, PROCESSOR_POLICIES)
        check_threshold(threshold, _NAME)
        hf_compat.check_supported(model, _NAME)
        hf_compat.check_cache(cache, _NAME)
        if attention_mask is not None:
            check_left_padded(attention_mask, _NAME)
            attention_mask = attention_mask.to(torch.long)
        if isinstance(canonical_upto, bool) or not isinstance(canonical_upto, int) or canonical_upto < 0:
            raise ValueError(f"{_NAME}: canonical_upto must be an int >= 0, got {canonical_upto!r}")
        self.model = model
        self.cache = cache
        self.policy = policy
        if policy == "always":
            self.threshold = math.inf
        elif policy == "margin":
            self.threshold = float(default_threshold(model)[0] if threshold is None else threshold)
        else:
            self.threshold = 0.0
        self.prompt_mask = attention_mask
        self.canonical_upto = canonical_upto
        self.eos_token_id = torch.tensor(hf_compat.as_token_ids(eos_token_id), dtype=torch.long)
        self.record_margins = record_margins
        self.piggyback = piggyback
        self.sampling = sampling or Sampling()
        if not self.sampling.greedy and seeds is None:
            raise ValueError(f"{_NAME}: sampling at temperature > 0 needs seeds= (one int per row)")
        self.seeds = None if seeds is None else torch.tensor(list(seeds), dtype=torch.long)
        # Per-generation state, set at the first call.
        self.verifier: Verifier | None = None
        self.prompt_length: int | None = None
        self.batch_size: int | None = None
        self._last_ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None  # [B] int64: decode steps per active row
        self.verified: torch.Tensor | None = None  # [B]: steps replayed canonically (flagged or along)
        self.triggered: torch.Tensor | None = None  # [B]: steps the gate flagged
        self.repairs: torch.Tensor | None = None
        self.repair_events: list[tuple[int, int, float]] = []  # (row, step, fast margin)
        self.verified_rows: list[list[int]] = []  # per step: the rows the verifier replayed
        self.verify_starts: list[int | None] = []  # per step: first position of that replay
        self.margins: list[torch.Tensor] = []  # per step [B] fp32, NaN for finished rows

    # ------------------------------------------------------------------ the step
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The step for ``model.generate``: the (partly verified) scores, or under sampling scores
        that force the sampled token."""
        token, scores = self.decide(input_ids, scores)
        return self._out(scores, token)

    def decide(self, input_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One gated step: every row's token [B] and the scores with the verified rows' replaced by
        their canonical logits (out of place: the caller may keep the raw logits tensor)."""
        self._follow(input_ids)
        batch, length = input_ids.shape
        step = length - self.prompt_length
        active = torch.ones(batch, dtype=torch.bool)
        if step > 0 and self.eos_token_id.numel():
            active = ~torch.isin(input_ids[:, self.prompt_length :].cpu(), self.eos_token_id).any(dim=1)
        self.steps += active.long()
        self.verified_rows.append([])
        self.verify_starts.append(None)
        # The position of the token being chosen: real tokens before it in its own row (no padding).
        positions = self._mask.sum(dim=1)
        token, fast_margin = choose(scores, self.sampling, self.seeds, positions)
        fast_margin = fast_margin.cpu()
        if self.record_margins:
            self.margins.append(torch.where(active, fast_margin, torch.nan))
        if self.policy == "off":
            return token, scores

        # Rows whose frontier covers this position were computed canonically (a canonical prefill
        # at step 0): nothing to verify. NaN margins fail `>=` and are verified.
        stale = self.verifier.canonical_upto < length
        flagged = active & stale & ~(fast_margin >= self.threshold)
        if not bool(flagged.any()):
            return token, scores
        # Rows whose canonical frontier is not behind the flagged rows' join the replay: it does not
        # get longer, one forward reads the weights for all of them, and their frontiers catch up,
        # so later windows stay short. (Without this, at batch 16 some row was flagged at most steps
        # and its window kept growing: margin cost more than always.)
        start = int(self.verifier.canonical_upto[flagged].min())
        along = active & stale & (self.verifier.canonical_upto >= start) if self.piggyback else flagged
        rows = (flagged | along).nonzero().flatten()
        hf_compat.check_cache(self.cache, _NAME)
        verified = self.verifier.verify_(input_ids, self._mask, rows)
        verified = verified.to(dtype=scores.dtype, device=scores.device)
        rows_dev = rows.to(scores.device)
        seeds = None if self.seeds is None else self.seeds[rows]
        verified_token, _ = choose(verified, self.sampling, seeds, positions.index_select(0, rows_dev))
        changed = (verified_token != token.index_select(0, rows_dev)).cpu()
        token = token.index_copy(0, rows_dev, verified_token)
        self.verified[rows] += 1
        self.triggered += flagged.long()
        self.verified_rows[-1] = rows.tolist()
        self.verify_starts[-1] = self.verifier.last_start
        self.repairs[rows[changed]] += 1
        for row in rows[changed].tolist():
            self.repair_events.append((row, step, float(fast_margin[row])))
        return token, scores.index_copy(0, rows_dev, verified)

    def _out(self, scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """Greedy: the (partly verified) scores. Sampling: scores that force the sampled token."""
        if self.sampling.greedy:
            return scores
        forced = torch.full_like(scores, -math.inf)
        return forced.scatter_(1, token[:, None], 0.0)

    def _follow(self, input_ids: torch.Tensor) -> None:
        """Starts the generation at the first call; afterwards checks the call extends the last one
        by one token and keeps the mask in step (one column of ones per step, as ``generate``)."""
        batch, length = input_ids.shape
        if self.prompt_length is None:
            if self.prompt_mask is None:
                self.prompt_mask = torch.ones((batch, length), dtype=torch.long)
            if tuple(self.prompt_mask.shape) != (batch, length):
                raise ValueError(
                    f"{_NAME}: attention_mask has shape {tuple(self.prompt_mask.shape)} but the first step "
                    f"sees input_ids of shape {(batch, length)}; pass the prompt mask given to generate"
                )
            if self.canonical_upto > length:
                raise ValueError(f"{_NAME}: canonical_upto={self.canonical_upto} exceeds the prompt length {length}")
            self.prompt_length, self.batch_size = length, batch
            self._mask = self.prompt_mask.to(input_ids.device)
            self.verifier = Verifier(self.model, self.cache, batch, self.canonical_upto)
            self.steps = torch.zeros(batch, dtype=torch.long)
            self.verified = torch.zeros(batch, dtype=torch.long)
            self.triggered = torch.zeros(batch, dtype=torch.long)
            self.repairs = torch.zeros(batch, dtype=torch.long)
        else:
            last = self._last_ids
            if batch != last.shape[0] or length != last.shape[1] + 1 or not torch.equal(input_ids[:, :-1], last):
                raise RuntimeError(
                    f"{_NAME}: this call does not continue the previous one (expected the previous "
                    f"{tuple(last.shape)} ids plus one token, got {tuple(input_ids.shape)}); a processor "
                    "serves exactly one generation: make a new one per call"
                )
            self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        self._last_ids = input_ids.clone()

    # ------------------------------------------------------------------ statistics
    def row_stats(self) -> list[RowStats]:
        """Each row's statistics so far (the stream figures are the decode loop's)."""
        return [
            RowStats(
                steps=int(self.steps[r]),
                verified=int(self.verified[r]),
                triggered=int(self.triggered[r]),
                repairs=int(self.repairs[r]),
                replayed_positions=int(self.verifier.replayed[r]),
                repair_steps=[s for (row, s, _) in self.repair_events if row == r],
                repair_margins=[m for (row, _, m) in self.repair_events if row == r],
            )
            for r in range(self.batch_size or 0)
        ]

    def stats(self) -> dict[str, Any]:
        """Totals and per-row figures of the generation so far (see ``GenerationResult``)."""
        return summarize(self.row_stats(), policy=self.policy, threshold=self.threshold)
