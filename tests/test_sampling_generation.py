"""Seeded sampling at temperature > 0 under every policy, on tiny random models in bf16.

The sampler itself (frequencies match softmax(logits / T), truncation, streams) is tested on the
op in tests/test_sampling_op.py. Here: ``off`` changes sampled tokens between batch configurations
(the control), ``margin``, ``always``, ``window`` and ``invariant`` do not, bit for bit; a request's
tokens depend on its seed alone (any batch, any thread count); different seeds give different
streams; ``MarginGateProcessor`` works inside ``model.generate(do_sample=True)``.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import margingate
from margingate.batching import left_pad
from margingate.hf_compat import cache_keyword
from margingate.processor import MarginGateProcessor
from margingate.sampling import Sampling, prompt_seed
from tests.models import build_model

NUM_PROMPTS, NEW_TOKENS = 8, 24
CONFIGS = {
    "alone": (list(range(NUM_PROMPTS)), 1),
    "b3_shuffled": (random.Random(0).sample(range(NUM_PROMPTS), NUM_PROMPTS), 3),
    "b8_reversed": (list(reversed(range(NUM_PROMPTS))), 8),
}
_models: dict = {}
_runs: dict = {}


def model_of(family="llama"):
    if family not in _models:
        _models[family] = build_model(family, torch.bfloat16)
    return _models[family]


def prompts_of(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in torch.randint(2, 40, (NUM_PROMPTS,), generator=g)]


def decode(policy, temperature, threshold=None, family="llama", **sampling):
    key = (policy, temperature, threshold, family, tuple(sorted(sampling.items())))
    if key not in _runs:
        model, prompts = model_of(family), prompts_of()
        out = {}
        for name, (order, batch_size) in CONFIGS.items():
            r = margingate.generate(
                model, [prompts[i] for i in order], policy=policy, threshold=threshold, window=4,
                max_new_tokens=NEW_TOKENS, batch_size=batch_size, stop_at_eos=False, record_margins=True,
                temperature=temperature, seed=[prompt_seed(7, i) for i in order], **sampling,
            )
            back = {i: j for j, i in enumerate(order)}
            out[name] = ([r.sequences[back[i]] for i in range(NUM_PROMPTS)], [r.margins[back[i]] for i in range(NUM_PROMPTS)], r.stats)
        _runs[key] = out
    return _runs[key]


def flips(results):
    base = results["alone"][0]
    found = []
    for seqs, margins, _ in results.values():
        for i in range(NUM_PROMPTS):
            step = next((s for s in range(NEW_TOKENS) if seqs[i][s] != base[i][s]), None)
            if step is not None:
                found.append(max(results["alone"][1][i][step], margins[i][step]))
    return found


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_exact_policies_sample_identically_in_every_batch(temperature):
    for policy in ("always", "window", "invariant"):
        results = decode(policy, temperature)
        base = results["alone"][0]
        for name, (seqs, _, _) in results.items():
            assert seqs == base, f"{policy} at T={temperature}: {name} differs from alone"
    # always and window verify every token with the same canonical sampler: the same tokens
    assert decode("window", temperature)["alone"][0] == decode("always", temperature)["alone"][0]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_margin_samples_identically_while_off_does_not(temperature):
    off = decode("off", temperature)
    flipped = flips(off)
    assert flipped, f"off did not change a sampled token at T={temperature}: the test would prove nothing"
    margins = torch.tensor([m for _, (_, ms, _) in off.items() for row in ms for m in row])
    threshold = float(max(2 * max(flipped), margins.nan_to_num(0).quantile(0.10)))
    results = decode("margin", temperature, threshold)
    base = results["alone"][0]
    for name, (seqs, _, stats) in results.items():
        assert seqs == base, f"margin at T={temperature}, threshold {threshold}: {name} differs from alone"
        assert stats["sampling"]["temperature"] == temperature


def test_truncation_is_gated_too():
    results = decode("margin", 0.8, 1.0, top_k=20, min_p=0.05)
    base = results["alone"][0]
    assert all(seqs == base for seqs, _, _ in results.values())
    exact = decode("always", 0.8, top_k=20, min_p=0.05)
    assert all(seqs == exact["alone"][0] for seqs, _, _ in exact.values())


def test_seed_alone_decides_and_threads_do_not_matter():
    model, prompts = model_of(), prompts_of()[:3]
    a = margingate.generate(model, prompts, policy="always", temperature=1.0, seed=5, max_new_tokens=10, stop_at_eos=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = margingate.generate(model, prompts[::-1], policy="always", temperature=1.0, seed=[prompt_seed(5, i) for i in (2, 1, 0)],
                                max_new_tokens=10, stop_at_eos=False, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert b.sequences[::-1] == a.sequences
    c = margingate.generate(model, prompts, policy="always", temperature=1.0, seed=6, max_new_tokens=10, stop_at_eos=False)
    assert c.sequences != a.sequences, "another seed gave the same streams"
    greedy = margingate.generate(model, prompts, policy="always", max_new_tokens=10, stop_at_eos=False)
    assert greedy.sequences != a.sequences


def test_processor_inside_model_generate_with_do_sample():
    model, prompts = model_of(), prompts_of()[:3]
    ids, mask = left_pad(prompts, 0)
    cache = DynamicCache()
    upto = margingate.canonical_prefill(model, ids, mask, cache)
    seeds = [prompt_seed(3, i) for i in range(3)]
    proc = MarginGateProcessor(model, cache, policy="always", attention_mask=mask, canonical_upto=upto,
                               sampling=Sampling(temperature=0.9), seeds=seeds)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, logits_processor=[proc], do_sample=True, max_new_tokens=6,
                             pad_token_id=0, eos_token_id=384, **{cache_keyword(model): cache})
    own = margingate.generate(model, prompts, policy="always", temperature=0.9, seed=seeds, max_new_tokens=6,
                              stop_at_eos=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == own.sequences


def test_sampling_arguments_are_checked():
    model = model_of()
    for kwargs, match in (
        ({"temperature": -1.0}, "temperature must be finite and >= 0"),
        ({"temperature": 0.7, "top_p": 0.9}, "top_p is not supported"),
        ({"top_k": 5}, "need temperature > 0"),
        ({"temperature": 0.7, "min_p": 2.0}, "min_p must be"),
        ({"temperature": 0.7, "seed": [1, 2]}, "one per prompt"),
        ({"do_sample": True}, "pass temperature > 0"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            margingate.generate(model, [[3, 4, 5]], **kwargs)
