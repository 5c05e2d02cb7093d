"""``canonical_forward``: the model's forward in batch-invariant mode, the verifier of every policy.

The canonical logits of a sequence are those of ``model(...)`` run under ``batch_invariant()`` with
the ``"margingate"`` attention: by construction they do not depend on the batch the sequence sits
in, on its left padding, nor on how many tokens one call processes (full prefill, token-by-token
decode and a window of several tokens agree bit for bit).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import hf_attention
from .invariant_mode import batch_invariant

# The HF model types whose every layer this module reproduces exactly, proven by
# tests/test_batch_invariant.py on tiny random models of each family.
# "gemma3" is the multimodal Gemma 3 with text-only inputs (image tokens attend bidirectionally,
# which the "margingate" mask function refuses).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")


def check_supported(model: torch.nn.Module) -> None:
    """Raises a clear error unless ``model`` is a causal LM of a family the tests prove."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"margingate.canonical_forward: model type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); its logits would not be proven batch-invariant"
        )


def _check_cache(cache, where: str) -> None:
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"margingate.canonical_forward: {where} must be a transformers DynamicCache built without a "
            f"config (DynamicCache()), got {type(cache).__name__}"
        )
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"margingate.canonical_forward: {where} layer {i} is a {type(layer).__name__}; sliding-window "
                "cache layers drop keys, so the canonical cache must be DynamicCache() without a config "
                "(every layer a full DynamicLayer)"
            )


def position_ids_from_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face's convention: position = cumsum(mask) - 1 (padding positions clamped to 0),
    for the last ``n`` columns."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)[:, -n:]


def canonical_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    past_key_values: DynamicCache | None = None,
    rows: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Canonical (batch-invariant) logits ``[B or R, n, V]`` for ``input_ids`` ``[B or R, n]``.

    Without ``rows``: a plain forward of the left-padded batch (``attention_mask`` [B, past + n],
    1 = real token) under ``batch_invariant()``; ``past_key_values`` (``DynamicCache()`` or None)
    is appended to as usual.

    With ``rows`` (LongTensor [R], distinct): ``past_key_values`` is the SHARED batch cache holding
    positions ``[0, P + n)`` of all B rows, ``input_ids`` [R, n] the tokens at positions
    ``[P, P + n)`` of those rows and ``attention_mask`` the full batch mask [B, P + n]. In every
    layer the K/V columns (rows R, positions P..P+n-1) are first overwritten in place with
    ``margingate.kv_patch_`` (the MarginGate repair), then attended over the shared cache without
    copying it. Returns the logits of those rows, bitwise equal to their canonical logits alone.

    ``logits_to_keep`` (optional, Hugging Face's meaning): only the logits of the last
    ``logits_to_keep`` positions are computed and returned (0 = all). A canonical prefill that
    only needs the last position's logits saves a [B, n, vocab] tensor (vocab 262144 for Gemma 3).
    """
    check_supported(model)
    if input_ids.dim() != 2:
        raise ValueError(
            f"margingate.canonical_forward: input_ids must be [batch, n], got {tuple(input_ids.shape)}"
        )
    if attention_mask is None or attention_mask.dim() != 2:
        raise ValueError("margingate.canonical_forward: attention_mask [batch, past + n] is required")
    n = input_ids.shape[1]
    total = attention_mask.shape[1]
    if total < n:
        raise ValueError(
            f"margingate.canonical_forward: attention_mask has {total} columns, fewer than the {n} new tokens"
        )

    with torch.no_grad(), batch_invariant(model):
        if rows is None:
            if input_ids.shape[0] != attention_mask.shape[0]:
                raise ValueError(
                    "margingate.canonical_forward: input_ids and attention_mask batch sizes differ"
                )
            if past_key_values is not None:
                _check_cache(past_key_values, "past_key_values")
                if past_key_values.get_seq_length() != total - n:
                    raise ValueError(
                        f"margingate.canonical_forward: the cache holds {past_key_values.get_seq_length()} positions "
                        f"but attention_mask implies {total - n} before the new tokens"
                    )
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask, n),
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
                logits_to_keep=logits_to_keep,
            )
            return out.logits

        batch = attention_mask.shape[0]
        if past_key_values is None:
            raise ValueError(
                "margingate.canonical_forward: rows= needs the shared batch cache in past_key_values"
            )
        _check_cache(past_key_values, "past_key_values")
        if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise ValueError("margingate.canonical_forward: rows must be a 1-D integer tensor")
        rows = rows.to(device=attention_mask.device, dtype=torch.int64)
        if rows.numel() != input_ids.shape[0]:
            raise ValueError(
                f"margingate.canonical_forward: {rows.numel()} rows but input_ids has {input_ids.shape[0]}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
            raise ValueError(
                f"margingate.canonical_forward: rows must lie in [0, {batch}), got {rows.tolist()}"
            )
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"margingate.canonical_forward: rows must be distinct, got {rows.tolist()}")
        held = past_key_values.get_seq_length()
        if held < total or past_key_values.layers[0].keys.shape[0] != batch:
            raise ValueError(
                f"margingate.canonical_forward: the shared cache holds {held} positions of "
                f"{past_key_values.layers[0].keys.shape[0] if past_key_values.layers else 0} rows; "
                f"rows= needs all {batch} rows up to position {total}"
            )
        row_mask = attention_mask.index_select(0, rows)
        spec = hf_attention.VerifySpec(
            cache=past_key_values,
            rows=rows,
            positions=torch.arange(total - n, total, device=attention_mask.device),
        )
        out = model(
            input_ids=input_ids,
            attention_mask=row_mask,
            position_ids=position_ids_from_mask(row_mask, n),
            past_key_values=None,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            margingate_verify=spec,
        )
        return out.logits
