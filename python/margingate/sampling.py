"""Sampling parameters of a generation and the one token-choice rule every policy uses.

At temperature 0 the token is the argmax (first index on ties). At temperature T > 0 it is the
seeded Gumbel-max sample of ``margingate.sample_margin``: ``argmax_i(logits_i / T + g_i)`` over the
``top_k`` / ``min_p`` candidates, where ``g_i`` is counter-based noise keyed by (the prompt's seed,
the token's position, i) (``margingate.noise``). The position is the number of real tokens before
the token in its own sequence (prompt plus generated, no padding), so a request's tokens depend on
its seed alone, never on its row, its padding or its neighbours.

The gate reads two margins, both in logit units: the noised top-1/top-2 margin and the distance of
the truncation cut-off from changing the token; a step is safe when both exceed the threshold.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

from .ops import margin, sample_margin

_GOLDEN = 0x9E3779B97F4A7C15


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a call given one int ``seed``: its own stream, as an int64
    (``seed + (index + 1) * 0x9E3779B97F4A7C15`` modulo 2^64, the SplitMix64 step)."""
    value = (int(seed) + (index + 1) * _GOLDEN) & ((1 << 64) - 1)
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. ``temperature`` 0 = greedy (the other fields are then unused)."""

    temperature: float = 0.0
    top_k: int | None = None
    min_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @staticmethod
    def checked(temperature: Any, top_k: Any, min_p: Any, top_p: Any, where: str) -> Sampling:
        if top_p is not None and top_p != 1:
            raise ValueError(
                f"{where}: top_p is not supported: its cut-off is a cumulative sum of softmax probabilities, so "
                "whether a token is kept depends on the rounding of every probability in the sum and no margin "
                "can gate it; use top_k or min_p"
            )
        if temperature is None:
            temperature = 0.0
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"{where}: temperature must be a float, got {type(temperature).__name__}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"{where}: temperature must be finite and >= 0, got {temperature}")
        check_float32_temperature(temperature, where)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"{where}: top_k must be an int >= 0 (0 or None: off), got {top_k!r}")
        if min_p is not None and (
            isinstance(min_p, bool) or not isinstance(min_p, int | float) or not 0 <= min_p <= 1
        ):
            raise ValueError(f"{where}: min_p must be a float in [0, 1] (0 or None: off), got {min_p!r}")
        if temperature == 0 and (top_k or min_p):
            raise ValueError(f"{where}: top_k / min_p need temperature > 0 (temperature 0 is greedy)")
        return Sampling(float(temperature), top_k or None, float(min_p) if min_p else None)


def check_float32_temperature(temperature: float, where: str) -> None:
    """The sampler divides float32 logits by float32(T): a T that is finite in float64 but
    overflows float32 (1e39), or rounds to 0 there (1e-46), would fail or divide by zero mid-run."""
    try:
        as_float32 = struct.unpack("f", struct.pack("f", temperature))[0]
    except OverflowError:
        as_float32 = math.inf
    if temperature > 0 and not (0 < as_float32 < math.inf):
        raise ValueError(
            f"{where}: temperature {temperature!r} is outside float32's range (the sampler computes in float32)"
        )


def check_seeds(seed: Any, count: int, where: str) -> list[int]:
    """Per-prompt seeds from an int (prompt i gets ``prompt_seed(seed, i)``) or one int per prompt."""
    if isinstance(seed, bool):
        raise TypeError(f"{where}: seed must be an int or a list of ints, got a bool")
    if isinstance(seed, int):
        return [prompt_seed(seed, i) for i in range(count)]
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != count or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ValueError(f"{where}: seed must be an int or {count} ints (one per prompt), got {seed!r}")
        if any(not -(1 << 63) <= s < 1 << 63 for s in seeds):
            raise ValueError(f"{where}: seeds must fit in int64")
        return seeds
    raise TypeError(f"{where}: seed must be an int or a list of ints, got {type(seed).__name__}")


def choose(
    logits: torch.Tensor, sampling: Sampling, seeds: torch.Tensor | None, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, gate_margin)`` per row of ``logits`` [B, V]: the token every policy takes and the
    margin the gate compares with its threshold (NaN for a NaN row: verify)."""
    if sampling.greedy:
        top1, _, m = margin(logits)
        return top1, m
    device = logits.device
    rows = logits.shape[0]
    token, _, m, cutoff = sample_margin(
        logits,
        seeds.to(device),
        positions.to(device),
        torch.full((rows,), sampling.temperature, dtype=torch.float32, device=device),
        None if sampling.top_k is None else torch.full((rows,), sampling.top_k, dtype=torch.int64, device=device),
        None if sampling.min_p is None else torch.full((rows,), sampling.min_p, dtype=torch.float32, device=device),
    )
    return token, torch.minimum(m, cutoff)
