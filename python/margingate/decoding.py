"""What every decode loop of one batch shares: its job (the arguments ``generate`` checked), its
state (``Batch``: padding, cache, clock, committed tokens, per-row statistics), its outcome, and
the one forward call it makes.

``generate`` (``generation.py``) splits the prompts into batches and hands each to one loop:
``decode_gated`` (per-step policies) and ``decode_window`` (``generation.py``) or
``decode_speculative`` (``speculative.py``). Each loop takes ``(model, job)``, drives one ``Batch``
and returns its ``Batch.finish()``; none of them checks arguments again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from . import hf_compat
from .batching import left_pad, position_ids
from .canonical import canonical_forward
from .sampling import Sampling, choose
from .stats import RowStats


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """One left-padded batch to decode, with everything ``generate`` already checked."""

    prompts: list[list[int]]  # token ids, one list per row
    policy: str
    threshold: float | None  # margin only; None: the model's shipped calibration
    window: int  # window only: tokens between two checks
    max_new_tokens: int
    eos: list[int]  # empty: never stop early
    pad_id: int
    sampling: Sampling
    seeds: list[int]  # one per row
    record_margins: bool = False
    put: Callable[[int, list[int]], None] | None = None  # streamer: (row, final tokens)
    bar: Any = None  # tqdm bar counting steps, or None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


@dataclasses.dataclass
class Outcome:
    """One batch: per row its tokens (up to its first EOS), statistics and fast-path margins."""

    tokens: list[list[int]]
    rows: list[RowStats]
    margins: list[list[float]]
    threshold: float
    extras: dict[str, int]


class Clock:
    """Finality bookkeeping of one batch: when each row's tokens were produced and made final."""

    def __init__(self, batch: int, put) -> None:
        self.start = time.perf_counter()
        self.delays: list[list[float]] = [[] for _ in range(batch)]
        self.ttft: list[float | None] = [None] * batch
        self.put = put

    def final(self, row: int, tokens: list[int], produced: list[float]) -> None:
        now = time.perf_counter()
        if not tokens:
            return
        self.delays[row] += [now - t for t in produced]
        if self.ttft[row] is None:
            self.ttft[row] = now - self.start
        if self.put is not None:
            self.put(row, list(tokens))


class Batch:
    """The state of one left-padded batch that a decode loop drives: ``ids`` and ``mask`` (prompt,
    then every position fed or to be fed), the shared ``cache``, the ``clock``, and per row its
    final tokens (``committed``), its ``stats`` record and its ``margins``. A row is done when its
    final tokens end in an EOS or fill ``max_new_tokens``."""

    def __init__(self, model: torch.nn.Module, job: BatchJob) -> None:
        self.model, self.job = model, job
        self.device = next(model.parameters()).device
        self.ids, self.mask = left_pad(job.prompts, job.pad_id, self.device)
        self.size, self.prompt_length = self.ids.shape
        self.eos = set(job.eos)
        self.cache = hf_compat.new_cache()
        self.clock = Clock(self.size, job.put)
        self.committed: list[list[int]] = [[] for _ in range(self.size)]
        self.stats = [RowStats() for _ in range(self.size)]
        self.margins: list[list[float]] = [[] for _ in range(self.size)]
        self._seeds = torch.tensor(job.seeds, dtype=torch.long)

    def done(self, row: int) -> bool:
        tokens = self.committed[row]
        return len(tokens) >= self.job.max_new_tokens or (bool(tokens) and tokens[-1] in self.eos)

    def all_done(self) -> bool:
        return all(self.done(b) for b in range(self.size))

    def commit(self, row: int, tokens: list[int], produced: list[float]) -> None:
        """``tokens`` are final for ``row``; ``produced``: when the fast path (or the canonical
        forward) produced each. The progress bar counts final tokens, at most ``max_new_tokens`` a
        row (``finish`` adds what a row that stopped early did not use), so it ends exactly at its
        total whatever the policy."""
        room = max(0, self.job.max_new_tokens - len(self.committed[row]))
        self.committed[row] += tokens
        self.clock.final(row, tokens, produced)
        self.job.advance(min(len(tokens), room))

    def append(self, token: torch.Tensor) -> None:
        """One more position: ``token`` [B] at the end of ``ids``, a column of ones in ``mask``."""
        self.ids = torch.cat([self.ids, token[:, None].to(self.device)], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)

    def forward_last(self, input_ids: torch.Tensor, *, canonical: bool) -> torch.Tensor:
        """Logits [B, V] of the last position after appending ``input_ids`` to the cache."""
        return forward_last(self.model, input_ids, self.mask, self.cache, canonical=canonical)

    def pick(self, logits: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and gate margins (on the CPU) of logits [N, V] belonging to ``rows`` [N] at
        ``positions`` [N] (real tokens before each), by the job's sampling."""
        seeds = None if self.job.sampling.greedy else self._seeds[rows]
        token, gate = choose(logits, self.job.sampling, seeds, positions)
        return token.cpu(), gate.cpu()

    def finish(self, threshold: float, extras: dict[str, int] | None = None, *, margins=None) -> Outcome:
        """The batch's ``Outcome``: each row's final tokens up to its first EOS, its statistics with
        the clock's figures, and ``margins`` (default: the rows' own; none unless recorded)."""
        for b, record in enumerate(self.stats):
            record.final_delays, record.ttft = self.clock.delays[b], self.clock.ttft[b]
            self.job.advance(max(0, self.job.max_new_tokens - len(self.committed[b])))
        tokens = [cut_at_eos(c, self.eos) for c in self.committed]
        if margins is None:
            margins = self.margins if self.job.record_margins else [[] for _ in range(self.size)]
        return Outcome(tokens, self.stats, margins, threshold, dict(extras or {}))


def cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
    return row[:end]


def forward_last(model, input_ids, mask, cache, *, canonical: bool) -> torch.Tensor:
    """Logits [B, V] of the last position after appending ``input_ids`` to ``cache``: the
    canonical forward (``canonical.py``) or the model's own kernels (``hf_compat.forward``)."""
    if canonical:
        return canonical_forward(model, input_ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    n = input_ids.shape[1]
    return hf_compat.forward(model, input_ids, mask, position_ids(mask, n), cache, logits_to_keep=1)[:, -1]
