"""The verifier: canonical replay of flagged rows over a copy of their cache prefix, and the
in-place repair of exactly their K/V columns in the shared batch cache (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import margingate
from margingate.batching import left_pad
from margingate.verifier import Verifier
from tests.models import build_model

_models: dict = {}


def model_of(family: str, dtype=torch.bfloat16):
    if (family, dtype) not in _models:
        _models[family, dtype] = build_model(family, dtype)
    return _models[family, dtype]


def sequences(seed: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (count,), generator=g)]


def snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def canonical(model, ids, mask, cache=None):
    return margingate.canonical_forward(model, ids, attention_mask=mask, cache=cache)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("n", [1, 3])
def test_verify_repairs_exactly_the_flagged_rows(family, n):
    """verify_ from a frontier n positions back: the logits are the rows' canonical logits, the rows'
    columns [L - n, L) are repaired, every other column of the shared cache is untouched."""
    model = model_of(family)
    ids, mask = left_pad([s + [11, 12, 13] for s in sequences(4, count=5)], 0)
    length = ids.shape[1]
    start = length - n
    cache = DynamicCache()
    reference = torch.cat([canonical(model, ids[:, :start], mask[:, :start], cache), canonical(model, ids[:, start:], mask, cache)], 1)
    clean = snapshot(cache)
    # Corrupt the columns of EVERY row from `start` on (as if the fast path had written them).
    for layer in cache.layers:
        layer.keys[:, :, start:] = 1e3
        layer.values[:, :, start:] = -1e3
    corrupted = snapshot(cache)
    verifier = Verifier(model, cache, batch_size=5, canonical_upto=start)
    rows = torch.tensor([3, 0, 4])
    logits = verifier.verify_(ids, mask, rows)
    assert torch.equal(logits, reference[rows, -1])
    assert verifier.last_start == start and verifier.canonical_upto.tolist() == [length, start, start, length, length]
    assert verifier.replayed.tolist() == [n, 0, 0, n, n]
    for layer, (k_clean, v_clean), (k_bad, v_bad) in zip(cache.layers, clean, corrupted, strict=True):
        k_expected, v_expected = k_bad.clone(), v_bad.clone()
        k_expected[rows, :, start:] = k_clean[rows, :, start:]
        v_expected[rows, :, start:] = v_clean[rows, :, start:]
        assert torch.equal(layer.keys, k_expected) and torch.equal(layer.values, v_expected)


def test_verified_logits_equal_the_row_alone():
    model = model_of("gemma3_text")
    seqs = sequences(5, count=4)
    ids, mask = left_pad(seqs, 0)
    cache = DynamicCache()
    with torch.no_grad():  # the fast path wrote every column
        margingate.hf_compat.forward(model, ids, mask, margingate.batching.position_ids(mask, ids.shape[1]), cache)
    verifier = Verifier(model, cache, batch_size=4)  # nothing canonical: replays from position 0
    logits = verifier.verify_(ids, mask, torch.tensor([2]))
    alone = canonical(model, *left_pad([seqs[2]], 0))[:, -1]
    assert torch.equal(logits, alone)
    assert verifier.last_start == 0


def test_replay_returns_every_position_and_rollback_crops():
    model = model_of("llama")
    ids, mask = left_pad(sequences(6, count=3), 0)
    cache = DynamicCache()
    full = canonical(model, ids, mask, cache)
    verifier = Verifier(model, cache, batch_size=3, canonical_upto=ids.shape[1])
    verifier.rollback_(ids.shape[1] - 2)
    assert margingate.hf_compat.cache_length(cache) == ids.shape[1] - 2
    assert verifier.canonical_upto.tolist() == [ids.shape[1] - 2] * 3
    # Re-append the two positions with garbage K/V, then replay them canonically.
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        cache.update(torch.full_like(k[:, :, :2], 7.0), torch.full_like(v[:, :, :2], 7.0), i)
    logits = verifier.replay_(ids, mask, torch.tensor([0, 1, 2]), ids.shape[1] - 2)
    assert torch.equal(logits, full[:, -2:])
    fresh = DynamicCache()
    canonical(model, ids, mask, fresh)
    for a, b in zip(cache.layers, fresh.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_failed_verification_writes_nothing():
    """A verification that raises (here: a mask that is not left-padded) leaves the shared cache
    exactly as it was: the model runs on a copy and the repair is written only after it succeeded."""
    model = model_of("llama")
    ids, mask = left_pad(sequences(7, count=3), 0)
    cache = DynamicCache()
    with torch.no_grad():
        margingate.hf_compat.forward(model, ids, mask, margingate.batching.position_ids(mask, ids.shape[1]), cache)
    before = snapshot(cache)
    bad = mask.clone()
    bad[:, -2] = 0  # a hole: not left padding
    verifier = Verifier(model, cache, batch_size=3)
    with pytest.raises(ValueError, match="not left-padded"):
        verifier.verify_(ids, bad, torch.tensor([0, 2]))
    for (k, v), layer in zip(before, cache.layers, strict=True):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    assert verifier.canonical_upto.tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="holds"):
        verifier.verify_(ids[:, :-1], mask[:, :-1], torch.tensor([0]))
