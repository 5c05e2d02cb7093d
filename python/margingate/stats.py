"""Per-row statistics of a generation: one typed record per row (``RowStats``), one ``summarize``
that turns the records into the ``stats`` dictionary of ``GenerationResult``, and one quantile rule.

Every decode loop fills a ``RowStats`` per row (``processor.py`` for the per-step policies,
``decode_window``, ``decode_speculative``); the fields of one policy only (``triggered``: a gate;
``rolled_back``: ``window``; ``drafted`` ... ``mars_steps``: speculative decoding) stay ``None``
elsewhere and are left out of the dictionaries, so the JSON users read keeps its keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


@dataclasses.dataclass
class RowStats:
    """One row (prompt) of one generation. ``steps``: tokens decoded while the row was unfinished;
    ``verified``: steps whose logits the canonical forward recomputed; ``repairs``: verified steps
    whose token changed, each with its step and fast-path margin; ``replayed_positions``: positions
    the canonical forward recomputed for the row; ``final_delays``: per token, fast path producing
    it to it being final; ``ttft``: batch start to the row's first final token. Every field that
    applies to a policy's loop is set (``RowStats`` of ``generate`` always has the clock's two)."""

    steps: int = 0
    verified: int = 0
    triggered: int | None = None  # steps the gate flagged; None where nothing gates (= verified)
    repairs: int = 0
    replayed_positions: int = 0
    repair_steps: list[int] = dataclasses.field(default_factory=list)
    repair_margins: list[float] = dataclasses.field(default_factory=list)
    rolled_back: int | None = None  # window: tentative tokens discarded
    drafted: int | None = None  # speculative: draft tokens proposed,
    accepted: int | None = None  # ... kept,
    passes: int | None = None  # ... canonical passes the row took a round in (prefill included),
    mars_changed: int | None = None  # ... tokens MARS took from the canonical runner-up,
    mars_steps: list[int] | None = None  # ... and their steps
    final_delays: list[float] | None = None  # the decode loop's clock (None: no clock, as in a
    ttft: float | None = None  # plain model.generate with MarginGateProcessor)

    def repair(self, step: int, margin: float) -> None:
        self.repairs += 1
        self.repair_steps.append(step)
        self.repair_margins.append(margin)

    @property
    def flagged(self) -> int:
        return self.verified if self.triggered is None else self.triggered

    def as_dict(self) -> dict[str, Any]:
        """The record as ``stats["per_row"]`` shows it: the fields that are ``None`` left out, plus
        ``trigger_rate`` (flagged steps / steps)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        out["trigger_rate"] = self.flagged / self.steps if self.steps else 0.0
        return out

    def __getitem__(self, key: str) -> Any:
        """``record["steps"]``: a record reads like the dictionary it becomes (``as_dict``)."""
        return self.as_dict()[key]

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RowStats:
        """A record back from ``as_dict``'s dictionary (``stats["per_row"]`` read from JSON)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (any order), NaN ignored, by linear interpolation between
    the closest ranks (``torch.quantile``, numpy's default); NaN when no value is left."""
    finite = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    return float(torch.quantile(finite, q)) if finite.numel() else float("nan")


def speculative_totals(rows: Sequence[RowStats]) -> dict[str, Any]:
    """Acceptance over the rows of speculative decoding: ``drafted``, ``accepted``,
    ``acceptance_rate`` (accepted / drafted), ``tokens_per_pass`` (steps / passes the rows took a
    round in), ``mars_changed``."""
    drafted = sum(r.drafted or 0 for r in rows)
    accepted = sum(r.accepted or 0 for r in rows)
    passes = sum(r.passes or 0 for r in rows)
    return {
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_pass": sum(r.steps for r in rows) / passes if passes else 0.0,
        "mars_changed": sum(r.mars_changed or 0 for r in rows),
    }


def summarize(
    rows: Sequence[RowStats | Mapping[str, Any]],
    *,
    policy: str,
    threshold: float,
    seconds: float = 0.0,
    run: Mapping[str, Any] | None = None,
    counters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Totals over per-row statistics, the rows themselves under ``per_row`` (also merges the
    batches of one ``generate`` call). ``trigger_rate`` = steps the gate flagged / steps;
    ``verified`` also counts the rows that joined a replay without being flagged (``piggyback``).

    ``run``: what ``generate`` adds about the call (``prefill``, ``sampling``, ``window``,
    ``speculative``, ``mars_threshold``); ``counters``: the loops' batch counters
    (``verify_passes``, ``redecoded_steps``). A ``window`` run adds ``window``, ``rolled_back``,
    ``rollback_rate`` (rolled back / (rolled back + steps)) and the counters; a ``speculative`` run
    adds ``speculative``, ``mars_threshold``, ``exact``, ``verify_passes`` and
    ``speculative_totals``."""
    run, counters = dict(run or {}), dict(counters or {})
    records = [r if isinstance(r, RowStats) else RowStats.from_dict(r) for r in rows]
    steps = sum(r.steps for r in records)
    triggered = sum(r.flagged for r in records)
    delays = [d for r in records for d in r.final_delays or ()]
    ttft = [r.ttft for r in records if r.ttft is not None]
    totals: dict[str, Any] = {
        "policy": policy,
        "threshold": threshold,
        "steps": steps,
        "verified": sum(r.verified for r in records),
        "triggered": triggered,
        "repairs": sum(r.repairs for r in records),
        "replayed_positions": sum(r.replayed_positions for r in records),
        "trigger_rate": triggered / steps if steps else 0.0,
        "stream": {
            "delay_p50_s": quantile(delays, 0.5),
            "delay_p99_s": quantile(delays, 0.99),
            "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p99_s": quantile(ttft, 0.99),
        },
        "repair_margins": [m for r in records for m in r.repair_margins],
        "per_row": [r.as_dict() for r in records],
        "seconds": seconds,
        **{k: v for k, v in run.items() if k not in ("window", "speculative", "mars_threshold")},
    }
    if run.get("window") is not None:
        rolled = sum(r.rolled_back or 0 for r in records)
        totals.update(window=run["window"], rolled_back=rolled, rollback_rate=rolled / (rolled + steps or 1))
        totals.update(counters)
    if run.get("speculative") is not None:
        spec = speculative_totals(records)
        mars = spec.pop("mars_changed")
        totals.update(speculative=run["speculative"], mars_threshold=run.get("mars_threshold"))
        totals.update(exact=run.get("mars_threshold") is None, **{k: spec[k] for k in ("drafted", "accepted", "acceptance_rate")})
        totals.update(verify_passes=counters["verify_passes"], tokens_per_pass=spec["tokens_per_pass"], mars_changed=mars)
    return totals
