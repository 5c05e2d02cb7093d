"""The canonical forward: the model run with batch-invariant kernels, the reference of every policy.

The canonical logits of a sequence are those of ``model(...)`` run under
``margingate.batch_invariant(model)`` (row-invariant matmuls and reductions, the ``"margingate"``
attention): by construction they do not depend on the batch the sequence sits in, on its left
padding, nor on how many tokens one call processes (a full prefill, token-by-token decoding and a
window of several tokens agree bit for bit). The K/V the canonical forward writes into the cache
are canonical in the same sense.

``canonical_forward`` is one forward; ``canonical_prefill`` fills an empty cache with a prompt's
canonical K/V, for use before a plain ``model.generate`` call with ``MarginGateProcessor``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from . import (
    hf_attention,  # noqa: F401  (registers the "margingate" attention implementation)
    hf_compat,
)
from .batching import check_left_padded, position_ids
from .hf_compat import SUPPORTED_MODEL_TYPES, check_supported
from .invariant_mode import batch_invariant

__all__ = ["SUPPORTED_MODEL_TYPES", "canonical_forward", "canonical_prefill", "check_supported"]


def canonical_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    cache: DynamicCache | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Canonical logits ``[B, n or logits_to_keep, V]`` of ``input_ids`` [B, n].

    ``attention_mask`` [B, past + n] is the left-padded mask of the whole sequence so far
    (1 = real token); ``cache`` (a ``DynamicCache()`` holding ``past`` positions, or None) is
    appended to. ``logits_to_keep`` (Hugging Face's meaning): only the last positions' logits are
    computed (0 = all); the lm head is row-invariant, so the kept logits are the same bits.
    All arguments are checked before the model runs, so a bad call changes nothing.
    """
    where = "margingate.canonical_forward"
    check_supported(model, where)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{where}: input_ids must be a [batch, n] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"{where}: attention_mask [batch, past + n] is required")
    check_left_padded(attention_mask, where)
    n, total = input_ids.shape[1], attention_mask.shape[1]
    if attention_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"{where}: input_ids has {input_ids.shape[0]} rows but attention_mask {attention_mask.shape[0]}"
        )
    if total < n:
        raise ValueError(f"{where}: attention_mask has {total} columns, fewer than the {n} new tokens")
    if cache is not None:
        hf_compat.check_cache(cache, where)
        held = hf_compat.cache_length(cache)
        if held != total - n:
            raise ValueError(
                f"{where}: the cache holds {held} positions but attention_mask implies {total - n} before "
                "the new tokens"
            )
        if held and hf_compat.cache_batch_size(cache) != input_ids.shape[0]:
            raise ValueError(
                f"{where}: the cache holds {hf_compat.cache_batch_size(cache)} rows, input_ids {input_ids.shape[0]}"
            )
    with torch.no_grad(), batch_invariant(model):
        return hf_compat.forward(
            model,
            input_ids,
            attention_mask,
            position_ids(attention_mask, n),
            cache,
            logits_to_keep=logits_to_keep,
        )


def canonical_prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache
) -> int:
    """Fills the empty ``cache`` with the canonical K/V of every prompt position but the last, and
    returns how many positions it holds (``prompt_length - 1``).

    For a plain ``model.generate(input_ids, attention_mask=..., <cache keyword>=cache, ...)`` with
    ``MarginGateProcessor(..., canonical_upto=<this>)``: ``generate`` sees the cache already holds
    the prefix and runs only the last prompt token, whose step the processor then verifies. The
    prompt K/V are then canonical, as after ``margingate.generate``'s own canonical prefill.
    """
    where = "margingate.canonical_prefill"
    hf_compat.check_cache(cache, where)
    if hf_compat.cache_length(cache) != 0:
        raise ValueError(f"{where}: the cache must be empty, it holds {hf_compat.cache_length(cache)} positions")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"{where}: input_ids must be [batch, prompt_length >= 2], got {tuple(input_ids.shape)}")
    prefix = input_ids.shape[1] - 1
    canonical_forward(model, input_ids[:, :prefix], attention_mask=attention_mask[:, :prefix], cache=cache, logits_to_keep=1)
    return prefix
