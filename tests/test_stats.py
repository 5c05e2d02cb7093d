"""``GenerationResult.stats`` pinned per policy on a tiny bf16 model: the key sets (top level,
``stream``, ``per_row``) and every value that does not depend on the clock, recorded before the
statistics became typed records (``margingate.stats``). The JSON users read must not change.

Timing values (``seconds``, ``stream``, ``final_delays``, ``ttft``) are checked for their type and
length only. Regenerate ``EXPECTED`` with ``python -m tests.test_stats`` only for a deliberate
change of the statistics.
"""

from __future__ import annotations

import math

import pytest
import torch

import margingate
from tests.models import build_model

NEW_TOKENS = 16
BATCH_SIZE = 3  # three batches: the per-batch statistics are merged
# The model's EOS (2) ends two of the eight rows early (at steps 3 and 11 of the greedy policies).

CASES = {
    "off": dict(policy="off"),
    "margin": dict(policy="margin", threshold=0.5),
    "always": dict(policy="always"),
    "invariant": dict(policy="invariant"),
    "window": dict(policy="window", window=4),
    "speculative": dict(policy="always", speculative=3),
    "speculative_mars": dict(policy="always", speculative=3, mars_threshold=1.0),
    "margin_sampled": dict(policy="margin", threshold=0.5, temperature=0.8, top_k=20, seed=5),
}

inf = math.inf  # the threshold of "always" in EXPECTED

TIMING = {"seconds", "stream", "final_delays", "ttft"}

_model: list[torch.nn.Module] = []


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 60, (8,), generator=g)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in lengths]


def run(case: str) -> margingate.GenerationResult:
    if not _model:
        _model.append(build_model("llama", torch.bfloat16))
    return margingate.generate(
        _model[0], prompts(), max_new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, record_margins=True, **CASES[case],
    )


def fingerprint(result: margingate.GenerationResult) -> dict:
    """Keys in order and the clock-free values of ``stats`` (NaN as the string "nan")."""

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    s = result.stats
    return {
        "keys": sorted(s),
        "stream_keys": sorted(s["stream"]),
        "row_keys": sorted({tuple(sorted(r)) for r in s["per_row"]}),
        "values": {k: clean(v) for k, v in s.items() if k not in TIMING and k != "per_row"},
        "per_row": [{k: clean(v) for k, v in r.items() if k not in TIMING} for r in s["per_row"]],
        "lengths": [len(t) for t in result.sequences],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_stats_keys_and_values_are_pinned(case):
    result = run(case)
    got = fingerprint(result)
    assert got == EXPECTED[case]
    s = result.stats
    assert isinstance(s["seconds"], float) and s["seconds"] > 0
    assert all(isinstance(v, float) for v in s["stream"].values())
    for r, tokens in zip(s["per_row"], result.sequences, strict=True):
        assert len(r["final_delays"]) == len(tokens)
        assert all(isinstance(d, float) and d >= 0 for d in r["final_delays"])
        assert isinstance(r["ttft"], float) and r["ttft"] > 0


def test_processor_stats_keys_in_a_plain_generate():
    """``MarginGateProcessor.stats()`` inside ``model.generate`` (no decode loop, so no clock): the
    totals without ``prefill``/``sampling``, the rows without ``final_delays``/``ttft``."""
    from transformers import DynamicCache

    from margingate.batching import left_pad
    from margingate.hf_compat import cache_keyword
    from margingate.processor import MarginGateProcessor

    if not _model:
        _model.append(build_model("llama", torch.bfloat16))
    model = _model[0]
    ids, mask = left_pad(prompts()[:3], 0)
    cache = DynamicCache()
    proc = MarginGateProcessor(model, cache, policy="margin", threshold=0.5, attention_mask=mask)
    model.generate(
        ids, attention_mask=mask, logits_processor=[proc], do_sample=False, max_new_tokens=4, pad_token_id=0,
        **{cache_keyword(model): cache},
    )
    s = proc.stats()
    assert sorted(s) == ["per_row", "policy", "repair_margins", "repairs", "replayed_positions", "seconds", "steps",
                         "stream", "threshold", "trigger_rate", "triggered", "verified"]  # fmt: skip
    assert sorted(s["stream"]) == EXPECTED["off"]["stream_keys"]
    for row in s["per_row"]:
        assert list(row) == ["steps", "verified", "triggered", "repairs", "replayed_positions", "repair_steps",
                             "repair_margins", "trigger_rate"]  # fmt: skip
    assert s["steps"] == sum(r["steps"] for r in s["per_row"]) == 12 and s["policy"] == "margin"
    assert s["seconds"] == 0.0 and all(math.isnan(v) for v in s["stream"].values())


EXPECTED: dict = {
    'off': {
        'keys': ['per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'triggered', 'ttft', 'verified')],
        'values': {'policy': 'off', 'threshold': 0.0, 'steps': 110, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'trigger_rate': 0.0, 'repair_margins': [], 'prefill': 'fast', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}},
        "per_row": [
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 11, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 3, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'margin': {
        'keys': ['per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'triggered', 'ttft', 'verified')],
        'values': {'policy': 'margin', 'threshold': 0.5, 'steps': 110, 'verified': 87, 'triggered': 52, 'repairs': 1, 'replayed_positions': 102, 'trigger_rate': 0.4727272727272727, 'repair_margins': [0.03125], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}},
        "per_row": [
            {'steps': 16, 'verified': 12, 'triggered': 7, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.4375},
            {'steps': 11, 'verified': 8, 'triggered': 4, 'repairs': 0, 'replayed_positions': 10, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.36363636363636365},
            {'steps': 16, 'verified': 12, 'triggered': 4, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.25},
            {'steps': 16, 'verified': 14, 'triggered': 7, 'repairs': 1, 'replayed_positions': 15, 'repair_steps': [9], 'repair_margins': [0.03125], 'trigger_rate': 0.4375},
            {'steps': 16, 'verified': 14, 'triggered': 10, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.625},
            {'steps': 16, 'verified': 14, 'triggered': 7, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.4375},
            {'steps': 3, 'verified': 2, 'triggered': 2, 'repairs': 0, 'replayed_positions': 2, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.6666666666666666},
            {'steps': 16, 'verified': 11, 'triggered': 11, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.6875},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'always': {
        'keys': ['per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'triggered', 'ttft', 'verified')],
        'values': {'policy': 'always', 'threshold': inf, 'steps': 110, 'verified': 102, 'triggered': 102, 'repairs': 1, 'replayed_positions': 102, 'trigger_rate': 0.9272727272727272, 'repair_margins': [0.03125], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}},
        "per_row": [
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9375},
            {'steps': 11, 'verified': 10, 'triggered': 10, 'repairs': 0, 'replayed_positions': 10, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9090909090909091},
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9375},
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 1, 'replayed_positions': 15, 'repair_steps': [9], 'repair_margins': [0.03125], 'trigger_rate': 0.9375},
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9375},
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9375},
            {'steps': 3, 'verified': 2, 'triggered': 2, 'repairs': 0, 'replayed_positions': 2, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.6666666666666666},
            {'steps': 16, 'verified': 15, 'triggered': 15, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.9375},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'invariant': {
        'keys': ['per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'triggered', 'ttft', 'verified')],
        'values': {'policy': 'invariant', 'threshold': 0.0, 'steps': 110, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'trigger_rate': 0.0, 'repair_margins': [], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}},
        "per_row": [
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 11, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 3, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'window': {
        'keys': ['per_row', 'policy', 'prefill', 'redecoded_steps', 'repair_margins', 'repairs', 'replayed_positions', 'rollback_rate', 'rolled_back', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified', 'verify_passes', 'window'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'rolled_back', 'steps', 'trigger_rate', 'ttft', 'verified')],
        'values': {'policy': 'window', 'threshold': 0.0, 'steps': 110, 'verified': 110, 'triggered': 110, 'repairs': 1, 'replayed_positions': 111, 'trigger_rate': 1.0, 'repair_margins': [0.0], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}, 'window': 4, 'rolled_back': 1, 'rollback_rate': 0.009009009009009009, 'verify_passes': 10, 'redecoded_steps': 1},
        "per_row": [
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 15, 'trigger_rate': 1.0},
            {'steps': 11, 'verified': 11, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 10, 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 15, 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 1, 'repair_steps': [9], 'repair_margins': [0.0], 'rolled_back': 1, 'replayed_positions': 17, 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 17, 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 17, 'trigger_rate': 1.0},
            {'steps': 3, 'verified': 3, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 5, 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'rolled_back': 0, 'replayed_positions': 15, 'trigger_rate': 1.0},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'speculative': {
        'keys': ['acceptance_rate', 'accepted', 'drafted', 'exact', 'mars_changed', 'mars_threshold', 'per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'speculative', 'steps', 'stream', 'threshold', 'tokens_per_pass', 'trigger_rate', 'triggered', 'verified', 'verify_passes'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('accepted', 'drafted', 'final_delays', 'mars_changed', 'mars_steps', 'passes', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'ttft', 'verified')],
        'values': {'policy': 'always', 'threshold': 0.0, 'steps': 110, 'verified': 110, 'triggered': 110, 'repairs': 0, 'replayed_positions': 453, 'trigger_rate': 1.0, 'repair_margins': [], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}, 'speculative': 3, 'mars_threshold': None, 'exact': True, 'drafted': 26, 'accepted': 1, 'acceptance_rate': 0.038461538461538464, 'verify_passes': 48, 'tokens_per_pass': 1.0091743119266054, 'mars_changed': 0},
        "per_row": [
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 78, 'drafted': 12, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 11, 'verified': 11, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 61, 'drafted': 0, 'accepted': 0, 'passes': 11, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 72, 'drafted': 2, 'accepted': 1, 'passes': 15, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 62, 'drafted': 9, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 53, 'drafted': 0, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 56, 'drafted': 3, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 3, 'verified': 3, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 29, 'drafted': 0, 'accepted': 0, 'passes': 3, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 42, 'drafted': 0, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'speculative_mars': {
        'keys': ['acceptance_rate', 'accepted', 'drafted', 'exact', 'mars_changed', 'mars_threshold', 'per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'speculative', 'steps', 'stream', 'threshold', 'tokens_per_pass', 'trigger_rate', 'triggered', 'verified', 'verify_passes'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('accepted', 'drafted', 'final_delays', 'mars_changed', 'mars_steps', 'passes', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'ttft', 'verified')],
        'values': {'policy': 'always', 'threshold': 0.0, 'steps': 110, 'verified': 110, 'triggered': 110, 'repairs': 0, 'replayed_positions': 453, 'trigger_rate': 1.0, 'repair_margins': [], 'prefill': 'canonical', 'sampling': {'temperature': 0.0, 'top_k': None, 'min_p': None}, 'speculative': 3, 'mars_threshold': 1.0, 'exact': False, 'drafted': 26, 'accepted': 1, 'acceptance_rate': 0.038461538461538464, 'verify_passes': 48, 'tokens_per_pass': 1.0091743119266054, 'mars_changed': 0},
        "per_row": [
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 78, 'drafted': 12, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 11, 'verified': 11, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 61, 'drafted': 0, 'accepted': 0, 'passes': 11, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 72, 'drafted': 2, 'accepted': 1, 'passes': 15, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 62, 'drafted': 9, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 53, 'drafted': 0, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 56, 'drafted': 3, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 3, 'verified': 3, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 29, 'drafted': 0, 'accepted': 0, 'passes': 3, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
            {'steps': 16, 'verified': 16, 'repairs': 0, 'repair_steps': [], 'repair_margins': [], 'replayed_positions': 42, 'drafted': 0, 'accepted': 0, 'passes': 16, 'mars_changed': 0, 'mars_steps': [], 'trigger_rate': 1.0},
        ],
        'lengths': [16, 11, 16, 16, 16, 16, 3, 16],
    },
    'margin_sampled': {
        'keys': ['per_row', 'policy', 'prefill', 'repair_margins', 'repairs', 'replayed_positions', 'sampling', 'seconds', 'steps', 'stream', 'threshold', 'trigger_rate', 'triggered', 'verified'],
        'stream_keys': ['delay_p50_s', 'delay_p99_s', 'ttft_p50_s', 'ttft_p99_s'],
        'row_keys': [('final_delays', 'repair_margins', 'repair_steps', 'repairs', 'replayed_positions', 'steps', 'trigger_rate', 'triggered', 'ttft', 'verified')],
        'values': {'policy': 'margin', 'threshold': 0.5, 'steps': 113, 'verified': 99, 'triggered': 71, 'repairs': 0, 'replayed_positions': 103, 'trigger_rate': 0.6283185840707964, 'repair_margins': [], 'prefill': 'canonical', 'sampling': {'temperature': 0.8, 'top_k': 20, 'min_p': None}},
        "per_row": [
            {'steps': 16, 'verified': 14, 'triggered': 10, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.625},
            {'steps': 1, 'verified': 0, 'triggered': 0, 'repairs': 0, 'replayed_positions': 0, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.0},
            {'steps': 16, 'verified': 14, 'triggered': 8, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.5},
            {'steps': 16, 'verified': 15, 'triggered': 12, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.75},
            {'steps': 16, 'verified': 15, 'triggered': 12, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.75},
            {'steps': 16, 'verified': 15, 'triggered': 9, 'repairs': 0, 'replayed_positions': 15, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.5625},
            {'steps': 16, 'verified': 13, 'triggered': 11, 'repairs': 0, 'replayed_positions': 14, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.6875},
            {'steps': 16, 'verified': 13, 'triggered': 9, 'repairs': 0, 'replayed_positions': 14, 'repair_steps': [], 'repair_margins': [], 'trigger_rate': 0.5625},
        ],
        'lengths': [16, 1, 16, 16, 16, 16, 16, 16],
    },
}

if __name__ == "__main__":
    print("EXPECTED = {")
    for case in CASES:
        f = fingerprint(run(case))
        print(f"    {case!r}: {{")
        for key, value in f.items():
            if key == "per_row":
                print('        "per_row": [')
                for row in value:
                    print(f"            {row!r},")
                print("        ],")
            else:
                print(f"        {key!r}: {value!r},")
        print("    },")
    print("}")
