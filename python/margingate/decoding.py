"""What every decode loop of one batch shares: its job (the arguments ``generate`` checked), its
clock (when tokens become final), its outcome, and the one forward call it makes.

``generate`` (``generation.py``) splits the prompts into batches and hands each to one loop:
``decode_gated`` (per-step policies) and ``decode_window`` (``generation.py``) or
``decode_speculative`` (``speculative.py``). Each loop takes ``(model, job)`` and returns an
``Outcome``; none of them checks arguments again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from . import hf_compat
from .batching import position_ids
from .canonical import canonical_forward
from .sampling import Sampling


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
    rows: list[dict[str, Any]]
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

    def row_stats(self, row: int) -> dict[str, Any]:
        return {"final_delays": self.delays[row], "ttft": self.ttft[row]}


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
