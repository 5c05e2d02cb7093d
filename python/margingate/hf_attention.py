"""The Hugging Face attention implementation ``"margingate"``: attention through ``margingate.attention``.

Load a model with ``attn_implementation="margingate"`` (or let ``canonical_forward`` switch it for
one call) and every attention layer runs the batch- and query-invariant kernel:

* left padding comes from the 2-D attention mask: our mask function (registered under the same
  name in ``ALL_MASK_ATTENTION_FUNCTIONS``) hands the attention function the padding mask itself
  instead of a 4-D bias, and ``kv_start[b]`` is the number of leading zeros of row ``b``;
* causality and the sliding window come from the layer (``sliding_window`` kwarg that every
  supported family passes, i.e. the config's window for that layer type), GQA from the head
  counts, the scale from the module's ``scaling``;
* anything the kernel cannot honour raises: a mask that is not left padding, a prepared 4-D mask,
  non-causal / chunked / packed / custom mask patterns, logit soft-capping, attention sinks,
  dropout in training.

A verifier call (``canonical_forward(rows=...)``) passes ``margingate_verify`` through the model's
``**kwargs``: the attention function then patches the new K/V columns of those rows into the
shared batch cache with ``margingate.kv_patch_`` and attends over that cache via ``kv_rows``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "margingate"

# The leaf mask functions whose combination is plain causal or sliding-window causal attention.
_ALLOWED_MASK_PARTS = {
    "causal_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "and_masks.<locals>.and_mask",
}


@dataclass
class VerifySpec:
    """What a verifier forward needs in each attention layer (built by ``canonical_forward``).

    ``cache`` is the shared batch ``DynamicCache`` holding positions ``[0, P + n)`` of all rows;
    ``rows`` [R] the rows recomputed, ``positions`` [n] the cache positions ``P..P+n-1``."""

    cache: object
    rows: torch.Tensor
    positions: torch.Tensor


def _mask_parts(fn, seen=None) -> set[str]:
    """Qualified names of a mask function and every mask function it closes over."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return set()
    seen.add(id(fn))
    names = {getattr(fn, "__qualname__", repr(fn))}
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:
            continue
        items = content if isinstance(content, (tuple, list)) else (content,)
        for item in items:
            if callable(item) and hasattr(item, "__code__"):
                names |= _mask_parts(item, seen)
    return names


def margingate_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask interface: returns the 2-D boolean padding mask of the ``kv_length`` keys (or None).

    The kernel applies causality and the window itself, so only left padding has to reach it; the
    mask pattern is checked to be one the kernel reproduces exactly."""
    parts = _mask_parts(mask_function)
    if not parts <= _ALLOWED_MASK_PARTS:
        raise ValueError(
            "margingate attention: only causal and sliding-window causal masks are supported, got a "
            f"mask built from {sorted(parts - _ALLOWED_MASK_PARTS)} (bidirectional, chunked, packed "
            "sequences or a custom overlay); use another attn_implementation for this model"
        )
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def kv_start_from_mask(mask: torch.Tensor, kv_length: int) -> torch.Tensor:
    """``kv_start[b]`` = leading zeros of the (left-padded) 2-D mask row ``b``, over the last
    ``kv_length`` columns. Raises if a row is not of the form 0...0 1...1."""
    if mask.dim() != 2:
        raise ValueError(
            f"margingate attention: expected the 2-D padding mask from the 'margingate' mask function, got a "
            f"{mask.dim()}-D mask; pass the plain [batch, past + new] attention_mask, not a prepared 4-D one"
        )
    if mask.shape[1] < kv_length:
        raise ValueError(
            f"margingate attention: attention_mask covers {mask.shape[1]} positions but there are {kv_length} keys"
        )
    mask = mask[:, -kv_length:].to(torch.bool)
    if kv_length > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "margingate attention: the attention_mask is not left-padded (a 1 is followed by a 0); "
            "margingate needs every row as 0...0 1...1 (tokenizer padding_side='left')"
        )
    return (kv_length - mask.sum(-1)).to(torch.int64)


def margingate_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    margingate_verify: VerifySpec | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention interface: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
    if dropout and module.training:
        raise ValueError("margingate attention: attention dropout in training mode is not supported")
    if softcap is not None:
        raise ValueError("margingate attention: attention logit soft-capping is not supported")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("margingate attention: attention sinks are not supported")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError("margingate attention: only causal (decoder) attention is supported")
    if kwargs.get("position_bias") is not None:
        raise ValueError("margingate attention: an additive position bias is not supported")

    kv_rows = None
    if margingate_verify is not None:
        key, value, kv_rows = _patch_shared_cache(module, key, value, margingate_verify)

    kv_start = None
    if attention_mask is not None:
        kv_start = kv_start_from_mask(attention_mask, key.shape[2]).to(query.device)
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else None
    scale = float(scaling) if scaling is not None else None
    out = torch.ops.margingate.attention.default(
        query, key, value, kv_start, kv_rows, causal=True, scale=scale, window=window
    )
    return out.transpose(1, 2).contiguous(), None


def _patch_shared_cache(module, key: torch.Tensor, value: torch.Tensor, spec: VerifySpec):
    """Writes the verifier's new K/V columns (rows R, positions P..P+n-1) into the shared cache in
    place (the MarginGate repair) and returns the whole shared cache layer to attend over."""
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(
            "margingate attention: the attention module has no layer_idx; cannot find its cache layer"
        )
    layer = spec.cache.layers[layer_idx]
    k_cache, v_cache = layer.keys, layer.values
    rows, positions = spec.rows, spec.positions
    n_rows, n_new = rows.shape[0], positions.shape[0]
    if key.shape[0] != n_rows or key.shape[2] != n_new:
        raise ValueError(
            f"margingate attention: verifier K/V are {tuple(key.shape)}, expected [{n_rows}, H, {n_new}, D]"
        )
    # kv_patch_ takes one (row, position) pair per column: flatten rows x positions.
    flat_rows = rows.repeat_interleave(n_new)
    flat_pos = positions.repeat(n_rows)
    k_new = key.transpose(1, 2).reshape(n_rows * n_new, key.shape[1], key.shape[3])
    v_new = value.transpose(1, 2).reshape(n_rows * n_new, value.shape[1], value.shape[3])
    torch.ops.margingate.kv_patch_.default(k_cache, v_cache, flat_rows, flat_pos, k_new, v_new)
    # Attend over [0, P + n): the cache may hold more columns than this verify step reads.
    end = int(positions[-1]) + 1
    return k_cache[:, :, :end], v_cache[:, :, :end], rows


# --------------------------------------------------------------------------- switching a model
_switch_lock = threading.Lock()
_switch_depth: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_configs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _configs_of(model: torch.nn.Module) -> list:
    configs = _model_configs.get(model)
    if configs is None:
        seen: dict[int, object] = {}
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation_internal"):
                seen[id(config)] = config
        configs = list(seen.values())
        _model_configs[model] = configs
    return configs


@contextlib.contextmanager
def use_margingate_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switches every attention layer of ``model`` to the ``"margingate"`` implementation for the
    duration (re-entrant, also across threads calling it on the same model; restored when the last
    caller leaves). A model loaded with ``attn_implementation="margingate"`` is left as it is."""
    configs = _configs_of(model)
    with _switch_lock:
        depth, saved = _switch_depth.get(model, (0, None))
        if depth == 0:
            saved = [c._attn_implementation_internal for c in configs]
            for c in configs:
                c._attn_implementation_internal = NAME
        _switch_depth[model] = (depth + 1, saved)
    try:
        yield
    finally:
        with _switch_lock:
            depth, saved = _switch_depth[model]
            if depth == 1:
                for c, value in zip(configs, saved, strict=True):
                    c._attn_implementation_internal = value
                del _switch_depth[model]
            else:
                _switch_depth[model] = (depth - 1, saved)


# --------------------------------------------------------------------------- the guard
# Attention implementations that are not batch-invariant and that a model can be switched away
# from. While batch_invariant() is registered they raise in the threads inside the mode instead
# of silently giving batch-dependent logits. ("eager" is each model's own function, not in the
# global mapping, so it cannot be guarded here.)
_GUARDED = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_unguarded: dict[str, object] = {}


def _guarded(name: str, function):
    def guarded(module, *args, **kwargs):
        from .invariant_mode import is_enabled

        if is_enabled():
            raise RuntimeError(
                f"margingate.batch_invariant: this model runs attn_implementation={name!r}, which is not "
                "batch-invariant; use `with margingate.batch_invariant(model):` (switches the model to the "
                "'margingate' attention), margingate.canonical_forward, or load it with "
                "attn_implementation='margingate'"
            )
        return function(module, *args, **kwargs)

    return guarded


def install_guard() -> None:
    """Called by batch_invariant() when it registers its kernels."""
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    for name in _GUARDED:
        if name in mapping and name not in _unguarded:
            _unguarded[name] = mapping[name]
            mapping[name] = _guarded(name, mapping[name])


def remove_guard() -> None:
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    for name, function in _unguarded.items():
        mapping[name] = function
    _unguarded.clear()


def register() -> None:
    """Registers ``"margingate"`` as a Hugging Face attention implementation and mask function."""
    ALL_ATTENTION_FUNCTIONS.register(NAME, margingate_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, margingate_mask)


register()
