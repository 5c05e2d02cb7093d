"""``margingate.generate``: greedy decoding under a policy, in margingate's own decode loop.

One decode step of a left-padded batch, top to bottom (``_decode_batch``):

1. prefill: ``margin``, ``always`` and ``invariant`` run the prompt once with the canonical forward
   (``canonical.py``), so the prompt K/V and the first token's logits are canonical; ``off`` runs
   the model's own kernels;
2. gate: ``MarginGateProcessor`` (``processor.py``) computes every row's top-1/top-2 margin with
   the fused kernel and sends the rows below the threshold to the ``Verifier`` (``verifier.py``),
   which replays them canonically and repairs their K/V columns in place;
3. the token is the argmax of the (partly verified) scores; finished rows get the pad id;
4. the next forward runs the new tokens on the fast path (under ``invariant``: canonically).

The loop calls ``model(...)`` directly (``hf_compat.forward``), so no transformers release can
skip the canonical prefill by renaming a ``generate`` argument, and nothing is hooked.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import hf_compat
from .batching import encode_prompts, left_pad, position_ids
from .canonical import canonical_forward
from .policies import POLICIES, check_policy, check_threshold
from .processor import MarginGateProcessor, summarize

_WHERE = "margingate.generate"

# Arguments of transformers' generate that this greedy loop refuses, with the reason.
_REFUSED = {
    "do_sample": "sampling is not supported yet: margingate makes greedy (temperature 0) decoding deterministic",
    "temperature": "sampling is not supported yet: margingate makes greedy (temperature 0) decoding deterministic",
    "top_k": "sampling is not supported yet: margingate makes greedy (temperature 0) decoding deterministic",
    "top_p": "sampling is not supported yet: margingate makes greedy (temperature 0) decoding deterministic",
    "num_beams": "beam search is not supported; margingate decodes greedily",
    "num_return_sequences": "one sequence per prompt: pass a prompt several times instead",
}


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` returns.

    ``sequences[i]``: the generated token ids of prompt ``i`` (no prompt, no padding; up to and
    including the first EOS when stopping at EOS). ``stats``: ``policy``, ``threshold``,
    ``prefill`` (``"canonical"`` or ``"fast"``), ``steps`` (decode steps of unfinished rows),
    ``verified``, ``repairs`` (verified steps whose token changed), ``trigger_rate``
    (= verified / steps), ``replayed_positions`` (positions the verifier recomputed: a verification
    replays the row from its canonical frontier), ``repair_margins`` (fast-path margin at each
    repair), ``per_row`` (the same per prompt, in prompt order, plus ``repair_steps``), ``seconds``
    (wall time of the decode loops). ``margins[i]``: prompt ``i``'s fast-path margin at every step,
    with ``record_margins=True``.
    """

    sequences: list[list[int]]
    stats: dict[str, Any]
    margins: list[list[float]] | None = None


def _check_count(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_WHERE}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{_WHERE}: {name} must be >= 1, got {value}")


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Any],
    *,
    policy: str = "margin",
    threshold: float | None = None,
    max_new_tokens: int = 64,
    tokenizer: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
    record_margins: bool = False,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    **unsupported: Any,
) -> GenerationResult:
    """Greedy decoding of ``prompts`` under ``policy`` (one of ``margingate.POLICIES``).

    ``prompts``: token-id lists (or strings, with ``tokenizer``), decoded in order in left-padded
    batches of ``batch_size`` (``None``: one batch), each with its own ``DynamicCache()``.
    ``threshold`` (``margin`` only): verify steps whose fast-path margin is below it; ``None`` takes
    the model's shipped calibration. Every argument is checked before anything runs; a bad one
    raises ``ValueError`` or ``TypeError`` and leaves the model as it was.
    """
    for key in unsupported:
        if key in _REFUSED:
            raise ValueError(f"{_WHERE}: {key}: {_REFUSED[key]}")
    if unsupported:
        raise TypeError(f"{_WHERE}: unexpected keyword argument(s) {', '.join(sorted(unsupported))}")
    check_policy(policy, _WHERE)
    check_threshold(threshold, _WHERE)
    hf_compat.check_supported(model, _WHERE)
    _check_count(max_new_tokens, "max_new_tokens")
    _check_count(batch_size, "batch_size", allow_none=True)
    encoded = encode_prompts(prompts, tokenizer, hf_compat.vocab_size(model), _WHERE)
    eos = hf_compat.as_token_ids(eos_token_id) if eos_token_id is not None else hf_compat.eos_ids(model, tokenizer)
    if not stop_at_eos:
        eos = []
    if pad_token_id is None:
        pad_token_id = hf_compat.pad_id(model, tokenizer, eos)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise TypeError(f"{_WHERE}: pad_token_id must be an int >= 0, got {pad_token_id!r}")

    size = batch_size or len(encoded)
    chunks = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * max_new_tokens, desc=f"generate[{policy}]", unit="step", leave=False)

    sequences: list[list[int]] = [[] for _ in encoded]
    per_row: list[dict[str, Any]] = [{} for _ in encoded]
    margins: list[list[float]] | None = [[] for _ in encoded] if record_margins else None
    seconds, threshold_used = 0.0, 0.0
    try:
        for chunk in chunks:
            t0 = time.perf_counter()
            tokens, proc = _decode_batch(
                model,
                [encoded[i] for i in chunk],
                policy=policy,
                threshold=threshold,
                max_new_tokens=max_new_tokens,
                eos=eos,
                pad_id=int(pad_token_id),
                record_margins=record_margins,
                bar=bar,
            )
            seconds += time.perf_counter() - t0
            threshold_used = proc.threshold
            stats = proc.stats()
            for r, i in enumerate(chunk):
                sequences[i] = tokens[r]
                per_row[i] = stats["per_row"][r]
                if margins is not None:
                    margins[i] = [float(m[r]) for m in proc.margins][: len(tokens[r])]
    finally:
        if bar is not None:
            bar.close()
    totals = summarize(per_row, policy=policy, threshold=threshold_used, seconds=seconds)
    totals["prefill"] = "fast" if policy == "off" else "canonical"
    return GenerationResult(sequences=sequences, stats=totals, margins=margins)


def _decode_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    policy: str,
    threshold: float | None,
    max_new_tokens: int,
    eos: list[int],
    pad_id: int,
    record_margins: bool,
    bar: Any,
) -> tuple[list[list[int]], MarginGateProcessor]:
    """Decodes one left-padded batch; returns each row's tokens (up to its first EOS) and the
    processor that gated it (its statistics)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, prompt_length = ids.shape
    cache = hf_compat.new_cache()
    canonical_prefill = policy != "off"
    everything_canonical = policy == "invariant"
    proc = MarginGateProcessor(
        model,
        cache,
        policy="off" if everything_canonical else policy,
        threshold=threshold,
        attention_mask=mask,
        canonical_upto=prompt_length if canonical_prefill else 0,
        eos_token_id=eos,
        record_margins=record_margins,
    )
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    with torch.inference_mode():
        logits = _forward(model, ids, mask, cache, canonical=canonical_prefill)
        for step in range(max_new_tokens):
            scores = proc(ids, logits)
            token = scores.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            finished |= torch.isin(token, eos_ids)
            if bar is not None:
                bar.update()
            if step == max_new_tokens - 1 or bool(finished.all()):
                if bar is not None:
                    bar.update(max_new_tokens - 1 - step)
                break
            logits = _forward(model, token[:, None], mask, cache, canonical=everything_canonical)
    generated = ids[:, prompt_length:].cpu().tolist()
    eos_set = set(eos)
    tokens = []
    for row in generated:
        end = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
        tokens.append(row[:end])
    return tokens, proc


def _forward(model, input_ids, mask, cache, *, canonical: bool) -> torch.Tensor:
    """Logits [B, V] of the last position after appending ``input_ids`` to ``cache``."""
    if canonical:
        return canonical_forward(model, input_ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    n = input_ids.shape[1]
    return hf_compat.forward(model, input_ids, mask, position_ids(mask, n), cache, logits_to_keep=1)[:, -1]


__all__ = ["POLICIES", "GenerationResult", "generate"]
