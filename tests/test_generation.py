"""MarginGate generation on tiny random Llama and Gemma3 models in bf16.

The contract: with ``always`` and ``invariant`` (canonical prefill) every prompt's tokens are
bitwise identical in every batch configuration; ``margin`` with a threshold calibrated here is
identical too while ``off`` differs on at least one configuration; the canonical prefill really
ran (the first step's logits are identical across configurations where ``off``'s are not); the
statistics add up; the cache after generation equals the cache of a run that applied the same
repairs by hand; ``MarginGateProcessor`` works inside a plain ``model.generate``.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    SuppressTokensLogitsProcessor,
)

import margingate
from margingate.batching import left_pad
from margingate.hf_compat import cache_keyword
from margingate.processor import MarginGateProcessor
from tests.models import build_model

FAMILIES = ("llama", "gemma3_text")
NEW_TOKENS = 24
NUM_PROMPTS = 8
# Batch configurations: (prompt order, batch size). Batches are left-padded to their longest
# prompt, so each configuration also gives most prompts a different amount of padding.
CONFIGS = {
    "alone": (list(range(NUM_PROMPTS)), 1),
    "b3_shuffled": (random.Random(0).sample(range(NUM_PROMPTS), NUM_PROMPTS), 3),
    "b8_reversed": (list(reversed(range(NUM_PROMPTS))), 8),
}

_models: dict[str, torch.nn.Module] = {}
_runs: dict[tuple, dict[str, margingate.GenerationResult]] = {}


def model_of(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = build_model(family, torch.bfloat16)
    return _models[family]


def prompts_of(seed: int = 1) -> list[list[int]]:
    # Lengths up to 60 so that batches mix very different paddings; ids >= 3 avoid pad/bos/eos.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (NUM_PROMPTS,), generator=g)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in lengths]


def decode(
    family: str, policy: str, threshold: float | None = None
) -> dict[str, margingate.GenerationResult]:
    """Every configuration's result, re-ordered into prompt order (cached per family/policy)."""
    key = (family, policy, threshold)
    if key not in _runs:
        model, prompts = model_of(family), prompts_of()
        results = {}
        for name, (order, batch_size) in CONFIGS.items():
            r = margingate.generate(
                model,
                [prompts[i] for i in order],
                policy=policy,
                threshold=threshold,
                max_new_tokens=NEW_TOKENS,
                batch_size=batch_size,
                stop_at_eos=False,
                record_margins=True,
            )
            back = {i: j for j, i in enumerate(order)}
            results[name] = margingate.GenerationResult(
                sequences=[r.sequences[back[i]] for i in range(NUM_PROMPTS)],
                stats={**r.stats, "per_row": [r.stats["per_row"][back[i]] for i in range(NUM_PROMPTS)]},
                margins=[r.margins[back[i]] for i in range(NUM_PROMPTS)],
            )
        _runs[key] = results
    return _runs[key]


def divergences(results: dict[str, margingate.GenerationResult]) -> list[tuple[str, int, int, float, float]]:
    """(config, prompt, first differing step, fast margin alone, fast margin in the config)."""
    base = results["alone"]
    found = []
    for name, r in results.items():
        for i in range(NUM_PROMPTS):
            a, b = base.sequences[i], r.sequences[i]
            step = next((s for s in range(len(a)) if a[s] != b[s]), None)
            if step is not None:
                found.append((name, i, step, base.margins[i][step], r.margins[i][step]))
    return found


def calibrated_threshold(family: str) -> float:
    """Twice the largest fast-path margin at which ``off`` flipped (both sides of every flip),
    and at least the 10th percentile of all margins: a flip can only happen below it."""
    off = decode(family, "off")
    flips = divergences(off)
    flip_margin = max((max(m1, m2) for *_, m1, m2 in flips), default=0.0)
    margins = torch.tensor([m for r in off.values() for row in r.margins for m in row])
    return float(max(2 * flip_margin, margins.quantile(0.10)))


# --------------------------------------------------------------------------- invariance contract
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["always", "invariant"])
def test_always_and_invariant_identical_across_batch_configurations(family, policy):
    results = decode(family, policy)
    base = results["alone"].sequences
    assert all(len(s) == NEW_TOKENS for s in base)
    for name, r in results.items():
        assert r.sequences == base, f"{policy} on {family}: {name} differs from alone"


@pytest.mark.parametrize("family", FAMILIES)
def test_margin_identical_while_off_flips(family):
    off = decode(family, "off")
    flips = divergences(off)
    print(f"\n{family}: off flips (config, prompt, step, margin alone, margin batched): {flips}")
    threshold = calibrated_threshold(family)
    results = decode(family, "margin", threshold)
    base = results["alone"].sequences
    stats = {name: (r.stats["trigger_rate"], r.stats["repairs"]) for name, r in results.items()}
    print(f"{family}: margin threshold {threshold:.4f}, (trigger rate, repairs) per config {stats}")
    for name, r in results.items():
        assert r.sequences == base, f"margin on {family}: {name} differs from alone"
    # The gate must be doing something on these models: a flip proves `off` is not already invariant.
    if family == "llama":
        assert flips, "off did not flip on llama: the margin test would prove nothing"
    assert any(r.stats["repairs"] for r in results.values()) or not flips


def test_off_flips_somewhere():
    """At least one family must show a real fast-path flip, or the margin test proves nothing."""
    assert any(divergences(decode(f, "off")) for f in FAMILIES)


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_add_up(family):
    threshold = calibrated_threshold(family)
    for policy, thr in (("margin", threshold), ("always", None), ("off", None), ("invariant", None)):
        for name, r in decode(family, policy, thr).items():
            s = r.stats
            rows = s["per_row"]
            assert s["steps"] == sum(p["steps"] for p in rows) == NUM_PROMPTS * NEW_TOKENS
            assert s["verified"] == sum(p["verified"] for p in rows)
            assert s["repairs"] == sum(p["repairs"] for p in rows)
            assert s["triggered"] == sum(p["triggered"] for p in rows)
            assert 0 <= s["repairs"] <= s["verified"] <= s["steps"] and s["triggered"] <= s["verified"]
            assert s["trigger_rate"] == s["triggered"] / s["steps"]
            assert len(s["repair_margins"]) == s["repairs"]
            assert s["verified"] <= s["replayed_positions"]
            for p in rows:
                assert p["repairs"] <= p["verified"] <= p["steps"]
                assert len(p["repair_margins"]) == len(p["repair_steps"]) == p["repairs"]
            if policy == "margin":
                # every repair happened below the gate (NaN margins also count as below): a row that
                # joined a replay unflagged (piggyback) and changed its token would be a flip the
                # threshold let through
                assert all(not (m >= threshold) for m in s["repair_margins"]), name
            elif policy == "always":
                # canonical prefill makes the first token canonical; every later step is verified
                assert s["verified"] == s["triggered"] == NUM_PROMPTS * (NEW_TOKENS - 1), name
            else:
                assert s["verified"] == s["triggered"] == 0 and s["repairs"] == 0
            stream = s["stream"]
            assert 0 <= stream["delay_p50_s"] <= stream["delay_p99_s"] and 0 < stream["ttft_p50_s"] <= stream["ttft_p99_s"]


def test_eos_stops_rows_and_their_statistics():
    model = model_of("llama")
    prompts = prompts_of()[:3]
    plain = margingate.generate(model, prompts, policy="always", max_new_tokens=8, stop_at_eos=False)
    eos = plain.sequences[0][2]  # make the third token of prompt 0 an EOS
    r = margingate.generate(model, prompts, policy="always", max_new_tokens=8, eos_token_id=eos)
    for i in range(3):
        seq = plain.sequences[i]
        cut = seq.index(eos) + 1 if eos in seq else len(seq)
        assert r.sequences[i] == seq[:cut]
        assert r.stats["per_row"][i]["steps"] == cut
    assert r.stats["per_row"][0]["steps"] == 3


# --------------------------------------------------------------------------- cache integrity
def _left_pad(prompts):
    return left_pad(prompts, 0)


class ReplayProcessor(LogitsProcessor):
    """Replays a recorded run: applies the recorded verifications by hand, one row at a time, and
    forces the recorded tokens.

    "By hand": each row's window of K/V columns (from the recorded window start to the current
    position) is recomputed by a canonical forward of that row ALONE over a batch-1 copy of its
    cached prefix (no ``rows=``), then written with ``kv_patch_``; the batched verifier must
    produce exactly this and touch nothing else.
    """

    def __init__(self, model, cache, mask, verified_rows, starts, tokens):
        self.model, self.cache, self.mask = model, cache, mask
        self.verified_rows, self.starts, self.tokens = verified_rows, starts, tokens
        self.step = 0
        self.verified_logits: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], length - self.mask.shape[1])], 1)
        start = self.starts[self.step]
        for row in reversed(self.verified_rows[self.step]):
            alone = DynamicCache()
            for i, layer in enumerate(self.cache.layers):
                alone.update(
                    layer.keys[row : row + 1, :, :start].clone(),
                    layer.values[row : row + 1, :, :start].clone(),
                    i,
                )
            logits = margingate.canonical_forward(
                self.model,
                input_ids[row : row + 1, start:],
                attention_mask=mask[row : row + 1],
                cache=alone,
            )
            self.verified_logits[(self.step, row)] = logits[0, -1].float()
            n = length - start
            for shared, own in zip(self.cache.layers, alone.layers, strict=True):
                for j in range(n):
                    margingate.kv_patch_(
                        shared.keys,
                        shared.values,
                        torch.tensor([row]),
                        torch.tensor([start + j]),
                        own.keys[:, :, start + j],
                        own.values[:, :, start + j],
                    )
        forced = torch.full_like(scores, -torch.inf)
        forced[torch.arange(scores.shape[0]), self.tokens[:, self.step]] = 0.0
        self.step += 1
        return forced


class Recorder(LogitsProcessor):
    """Keeps the scores it receives (placed after the MarginGateProcessor)."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


def _generate_with(model, ids, mask, processors, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=mask,
            **{cache_keyword(model): cache},  # the keyword this transformers release takes
            logits_processor=LogitsProcessorList(processors),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=model.config.vocab_size,  # never generated: every row runs new_tokens steps
        )


@pytest.mark.parametrize(
    "family,policy,canonical_prefill",
    [("llama", "margin", True), ("gemma3_text", "margin", True), ("llama", "always", False)],
)
def test_cache_equals_hand_applied_repairs(family, policy, canonical_prefill):
    model = model_of(family)
    prompts = prompts_of(seed=2)[:5]
    ids, mask = _left_pad(prompts)
    new_tokens = 12
    cache = DynamicCache()
    upto = margingate.canonical_prefill(model, ids, mask, cache) if canonical_prefill else 0
    proc = MarginGateProcessor(
        model,
        cache,
        policy=policy,
        threshold=calibrated_threshold(family) if policy == "margin" else None,
        attention_mask=mask,
        canonical_upto=upto,
    )
    recorder = Recorder()
    out = _generate_with(model, ids, mask, [proc, recorder], cache, new_tokens)
    tokens = out[:, ids.shape[1] :]
    assert sum(len(r) for r in proc.verified_rows) == proc.stats()["verified"] > 0
    if not canonical_prefill:
        # nothing is canonical yet: the first verification replays every prompt from position 0
        assert proc.verified_rows[0] == list(range(len(prompts))), "the first token must be verified too"
        assert proc.verify_starts[0] == 0
    if policy == "margin" and family == "llama":  # (gemma3_text's gate fires on adjacent steps only)
        assert any(
            start is not None and start < ids.shape[1] + s - 1 for s, start in enumerate(proc.verify_starts)
        ), "no window longer than one position was replayed: the test would not cover windows"

    # Replay: same fast forwards (same batch), the verifications applied by hand.
    replay_cache = DynamicCache()
    if canonical_prefill:
        margingate.canonical_prefill(model, ids, mask, replay_cache)
    replay = ReplayProcessor(model, replay_cache, mask, proc.verified_rows, proc.verify_starts, tokens)
    replayed = _generate_with(model, ids, mask, [replay], replay_cache, new_tokens)
    assert torch.equal(replayed, out)
    assert len(cache.layers) == len(replay_cache.layers)
    for i, (a, b) in enumerate(zip(cache.layers, replay_cache.layers, strict=True)):
        assert a.keys.shape == b.keys.shape
        assert torch.equal(a.keys, b.keys), f"layer {i} keys differ from the hand-applied repairs"
        assert torch.equal(a.values, b.values), f"layer {i} values differ from the hand-applied repairs"
    # The logits the processor handed on are the hand-computed canonical logits of each verified row.
    for (step, row), logits in replay.verified_logits.items():
        assert torch.equal(recorder.seen[step][row], logits)


def test_verify_step_writes_only_flagged_rows_at_the_current_position():
    model = model_of("llama")
    ids, mask = _left_pad(prompts_of(seed=3)[:4])
    cache = DynamicCache()
    upto = margingate.canonical_prefill(model, ids, mask, cache)  # all but the last prompt position
    proc = MarginGateProcessor(
        model, cache, policy="margin", threshold=100.0, attention_mask=mask, canonical_upto=upto, piggyback=False
    )
    with torch.inference_mode():
        out = model(  # the fast path's forward of the last prompt token
            input_ids=ids[:, upto:],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, upto:],
            **{cache_keyword(model): cache},
        )
        scores = out.logits[:, -1].float()
        scores[1] = scores[1] + 1000 * (torch.arange(scores.shape[1]) == 5)  # row 1: huge margin, not flagged
        scores[3, 7] = torch.nan  # NaN: verified, never a crash
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        new = proc(ids, scores)
    assert proc.verified_rows == [[0, 2, 3]]
    assert torch.isfinite(new[3]).all()
    assert torch.equal(new[1], scores[1])
    last = ids.shape[1] - 1
    for (k0, v0), layer in zip(before, cache.layers, strict=True):
        for t0, t1 in ((k0, layer.keys), (v0, layer.values)):
            changed = (t0 != t1).any(dim=(1, 3))  # [B, T]
            assert not changed[:, :last].any() and not changed[1].any()


# --------------------------------------------------------------------------- other processors
def test_other_processors_follow_and_see_verified_logits():
    model = model_of("llama")
    prompts = prompts_of()[:4]
    seen = {}
    for name, order, batch_size in (("alone", [0, 1, 2, 3], 1), ("b4_shuffled", [2, 0, 3, 1], 4)):
        rows = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk])
            cache = DynamicCache()
            upto = margingate.canonical_prefill(model, ids, mask, cache)
            proc = MarginGateProcessor(model, cache, policy="always", attention_mask=mask, canonical_upto=upto)
            recorder = Recorder()
            # (a processor that reads input_ids, like a repetition penalty, would see the left
            # padding and differ between batch configurations by itself)
            suppress = SuppressTokensLogitsProcessor(suppress_tokens=list(range(100, 200)))
            out = _generate_with(model, ids, mask, [proc, suppress, recorder], cache, 10)
            for r, i in enumerate(chunk):
                rows[i] = (out[r, ids.shape[1] :].tolist(), [s[r] for s in recorder.seen])
        seen[name] = rows
    for i in range(4):
        assert not any(100 <= t < 200 for t in seen["alone"][i][0]), "the later processor was bypassed"
        assert seen["alone"][i][0] == seen["b4_shuffled"][i][0]
        for a, b in zip(seen["alone"][i][1], seen["b4_shuffled"][i][1], strict=True):
            assert torch.equal(a, b), "a later processor saw batch-dependent scores"



# --------------------------------------------------------------------------- errors
def test_clear_errors():
    model = model_of("gemma3_text")
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        MarginGateProcessor(model, DynamicCache(), threshold=-0.1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        margingate.generate(model, [[3, 4]], threshold=float("nan"))
    with pytest.raises(ValueError, match="policy must be one of"):
        margingate.generate(model, [[3, 4]], policy="sometimes")
    with pytest.raises(TypeError, match="DynamicLayer"):
        MarginGateProcessor(model, DynamicCache(config=model.config))  # sliding-window layers
    with pytest.raises(TypeError, match="DynamicCache"):
        MarginGateProcessor(model, StaticCache(config=model.config, max_cache_len=32))
    with pytest.raises(ValueError, match="pass temperature > 0"):
        margingate.generate(model, [[3, 4]], do_sample=True)
    with pytest.raises(ValueError, match="prompt 0 is text; pass tokenizer"):
        margingate.generate(model, ["hello"])


def test_unsupported_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        MarginGateProcessor(gpt2, DynamicCache())
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        margingate.generate(gpt2, [[1, 2]])


def test_invariant_policy_runs_in_canonical_mode():
    """``invariant`` is the whole generate in canonical mode: the first token's logits equal
    ``canonical_forward`` of the prompt alone."""
    model = model_of("gemma3_text")
    prompt = prompts_of()[0]
    r = margingate.generate(model, [prompt], policy="invariant", max_new_tokens=1)
    logits = margingate.canonical_forward(
        model, torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)
    )
    assert r.sequences[0] == [int(logits[0, -1].argmax())]


# --------------------------------------------------------------------------- the canonical prefill
@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_prefill_ran(family):
    """The first step's logits come from the prefill. Under ``margin`` and ``always`` the prefill is
    canonical, so the recorded first-step margin of every prompt is the same bits in every batch
    configuration; under ``off`` (the control) the batch changes some of them. This fails whenever
    a policy that asks for the canonical prefill does not get it (as happened when a transformers
    release renamed the cache keyword and a hook looking for the old name stopped firing)."""

    def first_margins(results):
        return {name: [r.margins[i][0] for i in range(NUM_PROMPTS)] for name, r in results.items()}

    off = first_margins(decode(family, "off"))
    assert any(m != off["alone"] for m in off.values()), f"off's prefill did not change with the batch on {family}"
    for policy, threshold in (("margin", calibrated_threshold(family)), ("always", None)):
        results = decode(family, policy, threshold)
        margins = first_margins(results)
        for name, m in margins.items():
            assert m == margins["alone"], f"{policy}: the first step's logits of {name} are not canonical"
        assert all(r.stats["prefill"] == "canonical" for r in results.values())


def test_processor_canonical_prefill_matches_generate():
    """In a plain ``model.generate`` with ``canonical_prefill``, ``always`` gives the tokens of
    ``margingate.generate``'s own loop, and the cache's prompt columns are the canonical ones."""
    model = model_of("gemma3_text")
    prompts = prompts_of(seed=4)[:3]
    ids, mask = _left_pad(prompts)
    cache = DynamicCache()
    upto = margingate.canonical_prefill(model, ids, mask, cache)
    assert upto == ids.shape[1] - 1
    reference = DynamicCache()
    margingate.canonical_forward(model, ids[:, :upto], attention_mask=mask[:, :upto], cache=reference)
    for a, b in zip(cache.layers, reference.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    proc = MarginGateProcessor(model, cache, policy="always", attention_mask=mask, canonical_upto=upto)
    out = _generate_with(model, ids, mask, [proc], cache, 6)
    own = margingate.generate(model, prompts, policy="always", max_new_tokens=6, stop_at_eos=False, pad_token_id=0)
    assert out[:, ids.shape[1] :].tolist() == own.sequences


# --------------------------------------------------------------------------- misuse
def test_processor_serves_one_generation():
    model = model_of("llama")
    ids, mask = _left_pad(prompts_of()[:2])
    cache = DynamicCache()
    proc = MarginGateProcessor(model, cache, policy="off", attention_mask=mask)
    _generate_with(model, ids, mask, [proc], cache, 3)
    longer = torch.cat([ids, ids[:, -1:]], dim=1)  # a second call whose length happens to fit
    with pytest.raises(RuntimeError, match="serves exactly one generation"):
        proc(longer, torch.zeros(2, 384))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"prompts": []}, ValueError, "no prompts given"),
        ({"prompts": "abc"}, TypeError, "prompts must be a list"),
        ({"prompts": [[3, 4], []]}, ValueError, "prompt 1 is empty"),
        ({"prompts": [[3, 4], [5, 384]]}, ValueError, "prompt 1 holds token id 384, outside"),
        ({"prompts": [[3, -1]]}, ValueError, "prompt 0 holds token id -1"),
        ({"prompts": [[3, 4.0]]}, TypeError, "token ids must be ints"),
        ({"num_beams": 2}, ValueError, "beam search is not supported"),
        ({"do_sample": True}, ValueError, "pass temperature > 0"),
        ({"temperature": 0.5, "top_p": 0.9}, ValueError, "top_p is not supported"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": "3"}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"threshold": "1"}, TypeError, "threshold must be a float"),
        ({"attention_mask": None}, TypeError, "unexpected keyword argument"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, error, match):
    model = model_of("llama")
    call = {"prompts": [[3, 4, 5]], **kwargs}
    prompts = call.pop("prompts")
    with pytest.raises(error, match=match):
        margingate.generate(model, prompts, **call)


def test_no_deprecation_warning(recwarn, caplog):
    """A run prints no deprecation warning on the installed transformers (the cache keyword is the
    one the model's forward declares)."""
    import logging

    model = model_of("llama")
    with caplog.at_level(logging.WARNING):
        margingate.generate(model, prompts_of()[:2], policy="margin", max_new_tokens=3)
        margingate.generate(model, prompts_of()[:2], policy="off", max_new_tokens=3)
    deprecations = [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]


# --------------------------------------------------------------------------- the window policy
@pytest.mark.parametrize("family", FAMILIES)
def test_window_equals_always_for_every_window_and_batch(family):
    """LLM-42's scheme on our query-invariant verifier: the tokens do not depend on the window size
    (LLM-42's own do) and equal always's, in every batch configuration; the rollback statistics add up."""
    always = decode(family, "always")["alone"].sequences
    model, prompts = model_of(family), prompts_of()
    for window in (1, 4, 16, 64) if family == "llama" else (1, 64):
        for name, (order, batch_size) in CONFIGS.items():
            r = margingate.generate(
                model, [prompts[i] for i in order], policy="window", window=window, max_new_tokens=NEW_TOKENS,
                batch_size=batch_size, stop_at_eos=False,
            )
            back = {i: j for j, i in enumerate(order)}
            assert [r.sequences[back[i]] for i in range(NUM_PROMPTS)] == always, (window, name)
            s = r.stats
            assert s["window"] == window and s["steps"] == s["verified"] == NUM_PROMPTS * NEW_TOKENS
            assert s["rolled_back"] == sum(p["rolled_back"] for p in s["per_row"]) >= s["repairs"]
            assert s["rollback_rate"] == s["rolled_back"] / (s["rolled_back"] + s["steps"])
            # a pass checks up to `window` tentative tokens and adds the verifier's next token
            chunks = -(-NUM_PROMPTS // batch_size)
            assert s["verify_passes"] >= chunks * -(-(NEW_TOKENS - 1) // (window + 1))
            if s["repairs"]:
                assert s["redecoded_steps"] > 0


def test_window_cache_after_rollback_is_the_canonical_cache():
    """After a run with rollbacks, the cache holds exactly what a canonical forward of the final
    sequences writes: the rolled-back tokens left nothing behind."""
    from margingate.decoding import BatchJob
    from margingate.generation import decode_window
    from margingate.sampling import Sampling

    model, prompts = model_of("llama"), prompts_of(seed=2)[:6]
    caches = []
    real_new_cache = margingate.hf_compat.new_cache

    def recording_cache():
        caches.append(real_new_cache())
        return caches[-1]

    margingate.hf_compat.new_cache = recording_cache
    try:
        job = BatchJob(
            prompts=prompts, policy="window", threshold=None, window=5, max_new_tokens=14, eos=[], pad_id=0,
            sampling=Sampling(), seeds=[0] * len(prompts),
        )
        out = decode_window(model, job)
    finally:
        margingate.hf_compat.new_cache = real_new_cache
    assert sum(r["rolled_back"] for r in out.rows) > 0, "no rollback happened: the test would prove nothing"
    ids, mask = _left_pad([p + t for p, t in zip(prompts, out.tokens, strict=True)])
    # (the last token of each row was chosen but never forwarded)
    reference = DynamicCache()
    margingate.canonical_forward(model, ids[:, :-1], attention_mask=mask[:, :-1], cache=reference)
    for a, b in zip(caches[0].layers, reference.layers, strict=True):
        assert torch.equal(a.keys[:, :, : b.keys.shape[2]], b.keys) and torch.equal(a.values[:, :, : b.values.shape[2]], b.values)


def test_streaming_delivers_final_tokens_in_order():
    model, prompts = model_of("llama"), prompts_of()[:4]
    for policy, kwargs in (("margin", {}), ("window", {"window": 4}), ("off", {})):
        received: dict[int, list[int]] = {}
        r = margingate.generate(
            model, prompts, policy=policy, max_new_tokens=9, batch_size=2, stop_at_eos=False,
            streamer=lambda i, tokens, received=received: received.setdefault(i, []).extend(tokens), **kwargs,
        )
        assert [received[i] for i in range(4)] == r.sequences, policy
