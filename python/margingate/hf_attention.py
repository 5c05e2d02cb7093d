"""The Hugging Face attention implementation ``"margingate"``: attention through ``margingate.attention``.

Load a model with ``attn_implementation="margingate"``, or switch one for the duration of a block
with ``use_margingate_attention(model)`` (what ``batch_invariant(model)`` does), and every
attention layer runs the batch- and query-invariant kernel:

* left padding comes from the 2-D attention mask: our mask function (registered under the same
  name in ``ALL_MASK_ATTENTION_FUNCTIONS``) hands the attention function the padding mask itself
  instead of a 4-D bias, and ``kv_start[b]`` is the number of leading zeros of row ``b``;
* causality and the sliding window come from the layer (``sliding_window`` kwarg that every
  supported family passes, i.e. the config's window for that layer type), GQA from the head
  counts, the scale from the module's ``scaling``;
* anything the kernel cannot honour raises: a mask that is not left padding, a prepared 4-D mask,
  non-causal / chunked / packed / custom mask patterns, logit soft-capping, attention sinks,
  dropout in training.

It is a plain attention: the verifier (``verifier.py``) replays flagged rows over a copy of their
cache prefix and repairs the batch cache with ``kv_patch_`` itself.

**Threads.** A model's attention implementation is a config attribute, shared by every thread
that uses the model. ``use_margingate_attention`` sets it to ``"margingate"`` while any thread is
inside; the registered attention and mask functions then look at the *calling* thread: inside
``batch_invariant()`` (which enters ``canonical_attention()``) they run our kernel and 2-D padding
mask; in any other thread they delegate to the implementation the model had before the switch,
looked up through transformers' ``ALL_ATTENTION_FUNCTIONS`` / ``ALL_MASK_ATTENTION_FUNCTIONS``.
A forward that another thread's switch (or restore) catches half-way stays consistent: its mask
and every layer's attention are chosen by the same per-thread rule and the same saved name. An
"eager" model delegates to its own modeling file's ``eager_attention_forward``. A model loaded
with ``"margingate"`` runs our kernel in every thread.

This module never imports the batch-invariant mode (the mode imports it): the thread's state is
``canonical_attention()``, which the mode enters and leaves with itself.
"""

from __future__ import annotations

import sys
import threading
import weakref
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


# --------------------------------------------------------------------------- the calling thread
_thread_state = threading.local()


class _CanonicalAttention:
    def __enter__(self) -> None:
        _thread_state.depth = getattr(_thread_state, "depth", 0) + 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        _thread_state.depth -= 1


def canonical_attention() -> _CanonicalAttention:
    """Context manager: the calling thread runs the ``"margingate"`` kernel wherever a model's
    attention is ``"margingate"`` (re-entrant). ``batch_invariant()`` enters it."""
    return _CanonicalAttention()


def canonical_attention_active() -> bool:
    """Whether the calling thread is inside ``canonical_attention()``."""
    return getattr(_thread_state, "depth", 0) > 0


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


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Our mask: the 2-D boolean padding mask of the ``kv_length`` keys (or None).

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


def margingate_mask(*args, **kwargs):
    """Mask interface registered as ``"margingate"``: our padding mask in a thread inside the mode
    (or for a model loaded with ``"margingate"``), otherwise the mask of the implementation the
    model was switched from."""
    if not canonical_attention_active():
        saved = _switched_from(kwargs.get("config"))
        if saved is not None:
            mask_function = ALL_MASK_ATTENTION_FUNCTIONS.get(saved.name)
            # An implementation without a mask function gets none (transformers' own rule).
            return mask_function(*args, **kwargs) if mask_function is not None else None
    return padding_mask(*args, **kwargs)


def margingate_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention interface registered as ``"margingate"``: our kernel in a thread inside the mode
    (or for a model loaded with ``"margingate"``), otherwise the attention the model was switched
    from, called with exactly the same arguments."""
    if not canonical_attention_active():
        saved = _switched_from(getattr(module, "config", None))
        if saved is not None:
            delegate = _attention_function(saved.name, module)
            return delegate(module, query, key, value, attention_mask, *args, **kwargs)
    return attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Our kernel: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
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

    kv_start = None
    if attention_mask is not None:
        kv_start = kv_start_from_mask(attention_mask, key.shape[2]).to(query.device)
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else None
    scale = float(scaling) if scaling is not None else None
    out = torch.ops.margingate.attention.default(
        query, key, value, kv_start, None, causal=True, scale=scale, window=window
    )
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------- switching a model
@dataclass
class _Saved:
    """A config's attention implementation before the switch. Kept after the restore, so that a
    forward that looked up "margingate" just before it still finds where to delegate."""

    config: weakref.ref
    name: str | None
    active: bool


_switch_lock = threading.Lock()
_switch_depth: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_configs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# id(config) -> _Saved (configs define __eq__ without __hash__: keyed by identity, checked by ref).
_saved: dict[int, _Saved] = {}


def _switched_from(config) -> _Saved | None:
    """The saved implementation to delegate to, or None: run our kernel."""
    if config is None:
        return None
    saved = _saved.get(id(config))
    if saved is None or saved.config() is not config:
        return None
    # After the restore, only a forward caught half-way still reaches us through the saved name;
    # a config set to "margingate" since then (by its owner) is a margingate model.
    if not saved.active and _attn_implementation(config) == NAME:
        return None
    return saved


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


class _UseMargingateAttention:
    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def __enter__(self) -> None:
        model = self._model
        configs = _configs_of(model)
        with _switch_lock:
            depth = _switch_depth.get(model, 0)
            if depth == 0:
                for config in configs:
                    name = _attn_implementation(config)
                    if name == NAME:
                        _saved.pop(id(config), None)  # loaded with "margingate": nothing to restore
                        continue
                    # Saved before the name changes: a thread that sees "margingate" finds it.
                    _saved[id(config)] = _Saved(weakref.ref(config), name, True)
                    _set_attn_implementation(config, NAME)
            _switch_depth[model] = depth + 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        model = self._model
        with _switch_lock:
            depth = _switch_depth[model] - 1
            if depth:
                _switch_depth[model] = depth
                return
            del _switch_depth[model]
            for config in _configs_of(model):
                saved = _saved.get(id(config))
                if saved is not None and saved.config() is config and saved.active:
                    _set_attn_implementation(config, saved.name)
                    saved.active = False


def use_margingate_attention(model: torch.nn.Module) -> _UseMargingateAttention:
    """Context manager: every attention layer of ``model`` names the ``"margingate"``
    implementation for the duration (re-entrant, also across threads calling it on the same model;
    restored when the last caller leaves, on every exit path). Threads outside
    ``batch_invariant()`` keep running the model's previous implementation (module docstring).
    A model loaded with ``attn_implementation="margingate"`` is left as it is."""
    return _UseMargingateAttention(model)


# --------------------------------------------------------------------------- transformers internals
# The one place that reaches past transformers' public API:
# * a config's attention implementation is the attribute ``_attn_implementation_internal``
#   (``model.set_attn_implementation`` validates, logs and recurses into sub-models on every call,
#   and a switch must be a plain attribute write to be cheap and undone exactly);
# * "eager" is not in ``ALL_ATTENTION_FUNCTIONS``: each modeling file defines its own
#   ``eager_attention_forward`` and passes it as ``get_interface``'s default. We take that function
#   from the attention module's file, and fall back to sdpa only for a file without one.
def _attn_implementation(config) -> str | None:
    return config._attn_implementation_internal


def _set_attn_implementation(config, name: str | None) -> None:
    config._attn_implementation_internal = name


def _attention_function(name: str | None, module: torch.nn.Module):
    if name in (None, "eager"):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return eager if eager is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, ALL_ATTENTION_FUNCTIONS["sdpa"])


def register() -> None:
    """Registers ``"margingate"`` as a Hugging Face attention implementation and mask function
    (once, at import: the registered functions choose per thread, nothing is patched later)."""
    ALL_ATTENTION_FUNCTIONS.register(NAME, margingate_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, margingate_mask)


register()
