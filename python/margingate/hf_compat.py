"""The one adapter between margingate and Hugging Face ``transformers``.

Everything margingate needs from transformers goes through this module, so a release that renames
or moves something breaks here, in one place, with a test per supported version
(``tests/test_hf_compat.py``; ``.ci/run`` runs it against the oldest and the newest release of the
range declared in ``pyproject.toml``):

* the model call: the keyword that carries the cache was ``past_key_values`` and is ``cache`` from
  transformers 5.24 on (``past_key_values`` is deprecated there and leaves the signature in 5.40).
  We read the model's own ``forward`` signature and pass the name it declares, so no release
  prints a deprecation warning and none silently drops the cache;
* the cache: a ``DynamicCache()`` built without a config (every layer a plain ``DynamicLayer``
  that keeps every column; sliding-window layers would drop the columns the verifier reads and
  repairs), read through ``cache.layers[i].keys`` / ``.values``, grown with ``cache.update`` and
  cut with ``cache.crop`` (with a negative count: the positive form changed meaning), all public
  methods of the cache classes;
* the model's facts: family (``config.model_type``), vocabulary size, EOS and padding ids.

Nothing here guesses from call frames or hooks ``generate``: margingate runs its own decode loop
(``margingate.generation``) and calls ``model(...)`` directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

# The HF model types whose every layer the canonical forward reproduces exactly, proven by
# tests/test_batch_invariant.py on tiny random models of each family. "gemma3" is the multimodal
# Gemma 3 with text-only inputs (image tokens attend bidirectionally, which the "margingate" mask
# function refuses).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")

_cache_keyword: dict[type, str] = {}


def check_supported(model: Any, where: str) -> None:
    """Raises a clear ``ValueError`` unless ``model`` is a causal LM of a family the tests prove."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model type {model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); its logits would not be proven batch-invariant"
        )


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword of ``model.forward`` that takes the KV cache (``cache`` or ``past_key_values``)."""
    cls = type(model)
    name = _cache_keyword.get(cls)
    if name is None:
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            name = "cache"
        elif "past_key_values" in params:
            name = "past_key_values"
        else:
            raise TypeError(
                f"margingate: {cls.__name__}.forward takes neither `cache` nor `past_key_values`; this "
                "transformers release is outside the range margingate supports"
            )
        _cache_keyword[cls] = name
    return name


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """``model(...)`` for ``input_ids`` [B, n] appended to ``cache`` (None: no cache); returns the
    logits of the last ``logits_to_keep`` positions (0: all), [B, n or logits_to_keep, V]."""
    kwargs = {cache_keyword(model): cache, "use_cache": cache is not None}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )
    return out.logits


# --------------------------------------------------------------------------- the KV cache
def new_cache() -> DynamicCache:
    """An empty cache whose every layer keeps every column (no config, so no sliding layers)."""
    return DynamicCache()


def check_cache(cache: Any, where: str) -> None:
    """Raises unless ``cache`` is a ``DynamicCache`` whose layers are all plain ``DynamicLayer``."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"{where}: cache must be a transformers DynamicCache() (built without a config), got "
            f"{type(cache).__name__}; the verifier rewrites K/V columns of a plain full cache in place"
        )
    bad = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate not in (None, DynamicLayer):
        bad.append(replicate.__name__)
    if bad:
        raise TypeError(
            f"{where}: cache must be a DynamicCache() built WITHOUT a config so every layer is a plain "
            f"DynamicLayer; got layers {bad} (sliding-window layers drop the columns the verifier "
            "attends to and repairs)"
        )


def cache_length(cache: DynamicCache) -> int:
    """Positions held (every layer holds the same number)."""
    return int(cache.get_seq_length())


def cache_batch_size(cache: DynamicCache) -> int:
    return int(cache.layers[0].keys.shape[0]) if cache.layers and cache_length(cache) else 0


def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the key and value tensors [B, H_kv, T, D] the cache holds (not copies)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_rows(cache: DynamicCache, rows: torch.Tensor, upto: int) -> DynamicCache:
    """A new cache holding positions ``[0, upto)`` of ``rows`` of ``cache`` (a copy)."""
    new = new_cache()
    if upto == 0:
        return new
    for i, (k, v) in enumerate(layer_kv(cache)):
        new.update(k.index_select(0, rows)[:, :, :upto], v.index_select(0, rows)[:, :, :upto], i)
    return new


def extend(cache: DynamicCache, n: int) -> None:
    """Appends ``n`` zero K/V columns to every layer (room that a replay then overwrites)."""
    for i, (k, v) in enumerate(layer_kv(cache)):
        shape = (k.shape[0], k.shape[1], n, k.shape[3])
        cache.update(k.new_zeros(shape), v.new_zeros(shape), i)


def crop(cache: DynamicCache, length: int) -> None:
    """Drops every position from ``length`` on, in every row.

    ``DynamicCache.crop(n)`` took the length to keep for n > 0 until transformers 5.17 (deprecated)
    and refuses it from 5.18 on; a negative n (remove |n| positions) means the same in every release
    we support."""
    remove = cache_length(cache) - int(length)
    if remove < 0:
        raise ValueError(f"margingate: cannot crop a cache of {cache_length(cache)} positions to {length}")
    if remove:
        cache.crop(-remove)


# --------------------------------------------------------------------------- model facts
def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_size(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    return int(text_config(model).vocab_size)


def as_token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        return [int(t) for t in value.flatten().tolist()]
    return [int(t) for t in value]


def eos_ids(model: torch.nn.Module, tokenizer: Any = None) -> list[int]:
    """The end-of-sequence ids of the model's generation config, else of the tokenizer."""
    eos = as_token_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not eos and tokenizer is not None:
        eos = as_token_ids(getattr(tokenizer, "eos_token_id", None))
    return eos


def pad_id(model: torch.nn.Module, tokenizer: Any = None, eos: Sequence[int] = ()) -> int:
    """The id written into left padding and after EOS: the tokenizer's, the model's, EOS, or 0.
    (Its value never changes a result: padding is masked out.)"""
    for value in (
        getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        ids = as_token_ids(value)
        if ids:
            return ids[0]
    return int(eos[0]) if eos else 0
