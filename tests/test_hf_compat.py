"""The transformers adapter (``margingate.hf_compat``), checked against the installed release.

``.ci/run`` runs this file (with every test that touches transformers) against the oldest and the
newest transformers release of the range ``pyproject.toml`` declares: a release that renames or
moves what we use turns CI red here, in one place.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from margingate import hf_compat
from margingate.batching import left_pad, position_ids
from tests.models import build_model


def declared_range() -> tuple[Version, Version]:
    """The transformers range of the installed margingate (or of pyproject.toml in a checkout)."""
    import re
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():  # a checkout: its declaration is the one under test
        text = pyproject.read_text()
    else:
        text = " ".join(r for r in metadata.requires("margingate") or [] if r.startswith("transformers"))
    spec = re.search(r"transformers\s*((?:[<>]=?\s*[0-9.]+\s*,?\s*)+)", text).group(1)  # ">=5.17,<6" / "<6,>=5.17"
    low = re.search(r">=\s*([0-9.]+)", spec).group(1)
    high = re.search(r"<\s*([0-9.]+)", spec).group(1)
    return Version(low), Version(high)


def test_installed_transformers_is_in_the_declared_range():
    low, high = declared_range()
    assert low <= Version(transformers.__version__) < high, (transformers.__version__, low, high)


@pytest.fixture(scope="module")
def model():
    return build_model("llama", torch.float32)


def test_cache_keyword_is_the_one_the_forward_declares(model):
    name = hf_compat.cache_keyword(model)
    params = inspect.signature(model.forward).parameters
    assert name in params
    if "cache" in params:  # transformers >= 5.24: the new name, never the deprecated one
        assert name == "cache"


def test_forward_fills_the_cache_without_deprecation_warnings(model, caplog):
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    cache = hf_compat.new_cache()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        logits = hf_compat.forward(model, ids, mask, position_ids(mask, 4), cache)
        step = hf_compat.forward(model, ids[:, -1:], torch.cat([mask, mask[:, -1:]], 1), position_ids(mask, 1) + 1, cache, 1)
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert logits.shape == (2, 4, 384) and step.shape == (2, 1, 384)
    assert hf_compat.cache_length(cache) == 5 and hf_compat.cache_batch_size(cache) == 2
    for k, v in hf_compat.layer_kv(cache):
        assert k.shape == v.shape == (2, 2, 5, 16)


def test_cache_from_rows_and_crop(model):
    ids, mask = left_pad([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13], [3, 4, 5, 6, 7]], 0)
    cache = hf_compat.new_cache()
    hf_compat.forward(model, ids, mask, position_ids(mask, 5), cache)
    rows = torch.tensor([2, 0])
    part = hf_compat.cache_from_rows(cache, rows, 3)
    assert hf_compat.cache_length(part) == 3
    for (k, v), (pk, pv) in zip(hf_compat.layer_kv(cache), hf_compat.layer_kv(part), strict=True):
        assert torch.equal(pk, k[rows, :, :3]) and torch.equal(pv, v[rows, :, :3])
    assert hf_compat.cache_length(hf_compat.cache_from_rows(cache, rows, 0)) == 0
    kept = [(k[:, :, :2].clone(), v[:, :, :2].clone()) for k, v in hf_compat.layer_kv(cache)]
    hf_compat.crop(cache, 5)  # nothing to drop
    assert hf_compat.cache_length(cache) == 5
    hf_compat.crop(cache, 2)
    assert hf_compat.cache_length(cache) == 2
    for (k, v), (k0, v0) in zip(hf_compat.layer_kv(cache), kept, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(ValueError, match="cannot crop"):
        hf_compat.crop(cache, 3)


def test_check_cache_and_model(model):
    hf_compat.check_cache(DynamicCache(), "here")
    with pytest.raises(TypeError, match="DynamicCache"):
        hf_compat.check_cache(object(), "here")
    gemma = build_model("gemma3_text", torch.float32)
    with pytest.raises(TypeError, match="DynamicLayer"):
        hf_compat.check_cache(DynamicCache(config=gemma.config), "here")
    hf_compat.check_supported(model, "here")
    with pytest.raises(TypeError, match="model must be"):
        hf_compat.check_supported("llama", "here")


def test_model_facts(model):
    assert hf_compat.vocab_size(model) == 384
    assert hf_compat.eos_ids(model) == [2]
    assert hf_compat.pad_id(model, None, [2]) == 0
    assert hf_compat.as_token_ids(torch.tensor([4, 5])) == [4, 5] and hf_compat.as_token_ids(None) == []
