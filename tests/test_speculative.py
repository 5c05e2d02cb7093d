"""Speculative decoding on the canonical verifier (``generate(..., policy="always", speculative=k)``).

Exact mode: the tokens equal ``always``'s bit for bit for k in {1, 3, 8}, with the prompt-lookup
drafter, a drafter that is right only part of the time, and a user's draft model, in every batch
configuration. MARS mode: identical across batch configurations, and every token that differs
from the greedy choice (given the sequence's own prefix, recomputed here by one teacher-forced
canonical forward) sits at a canonical margin below tau and is the canonical runner-up.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import margingate
from margingate.canonical import canonical_forward
from margingate.speculative import ModelDrafter, PromptLookupDrafter
from tests.models import build_model

FAMILY = "llama"
NEW_TOKENS = 20
NUM_PROMPTS = 8
CONFIGS = {
    "alone": (list(range(NUM_PROMPTS)), 1),
    "b3_shuffled": (random.Random(0).sample(range(NUM_PROMPTS), NUM_PROMPTS), 3),
    "b8_reversed": (list(reversed(range(NUM_PROMPTS))), 8),
}

_cache: dict = {}


def model() -> torch.nn.Module:
    if "model" not in _cache:
        _cache["model"] = build_model(FAMILY, torch.bfloat16)
    return _cache["model"]


def prompts() -> list[list[int]]:
    # Half random, half a random phrase repeated (so prompt lookup finds matches in the prompt).
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(NUM_PROMPTS):
        n = int(torch.randint(2, 40, (1,), generator=g))
        ids = torch.randint(3, 384, (n,), generator=g).tolist()
        out.append(ids if i % 2 == 0 else (ids[:6] * 5)[: max(n, 8)])
    return out


def run(**kwargs) -> dict[str, margingate.GenerationResult]:
    """Every configuration's result, in prompt order."""
    results = {}
    for name, (order, batch_size) in CONFIGS.items():
        r = margingate.generate(
            model(), [prompts()[i] for i in order], max_new_tokens=NEW_TOKENS, batch_size=batch_size,
            stop_at_eos=False, **kwargs,
        )
        back = {i: j for j, i in enumerate(order)}
        results[name] = margingate.GenerationResult(
            sequences=[r.sequences[back[i]] for i in range(NUM_PROMPTS)],
            stats={**r.stats, "per_row": [r.stats["per_row"][back[i]] for i in range(NUM_PROMPTS)]},
            margins=None if r.margins is None else [r.margins[back[i]] for i in range(NUM_PROMPTS)],
        )
    return results


def always() -> list[list[int]]:
    if "always" not in _cache:
        results = run(policy="always")
        assert all(r.sequences == results["alone"].sequences for r in results.values())
        _cache["always"] = results["alone"].sequences
    return _cache["always"]


def canonical_logits(prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Canonical logits [len(generated), V] deciding each generated token (teacher forcing)."""
    ids = torch.tensor([prompt + generated[:-1]])
    logits = canonical_forward(model(), ids, attention_mask=torch.ones_like(ids))[0]
    return logits[len(prompt) - 1 :]


class Sometimes:
    """Proposes the greedy continuation, corrupted at positions chosen from the context (so the
    drafts are a function of each row alone): accepted in part, rejected in part."""

    def __init__(self, target: list[list[int]], prompt_list: list[list[int]]):
        self.full = [p + t for p, t in zip(prompt_list, target, strict=True)]

    def propose(self, contexts, k):
        out = []
        for c in contexts:
            c = list(c)
            i = next(i for i, f in enumerate(self.full) if f[: len(c)] == c)
            out.append(self.corrupt(i, c, self.full[i][len(c) : len(c) + k], k))
        return out

    def corrupt(self, prompt: int, context: list[int], drafts: list[int], k: int) -> list[int]:
        bad = sum(context) % (k + 2)  # position to corrupt (none when past the drafts)
        if bad < len(drafts):
            drafts[bad] = 3 + (drafts[bad] + 1) % 300
        return drafts


class RunnerUp:
    """Proposes the canonical runner-up where the canonical margin is below ``twice``, else the
    top-1: MARS accepts the runner-ups below tau and rejects those in [tau, twice)."""

    def __init__(self, twice: float):
        self.twice = twice

    def propose(self, contexts, k):
        out = []
        for c in contexts:
            c, d = list(c), []
            for _ in range(k):
                ids = torch.tensor([c + d])
                logits = canonical_forward(model(), ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)[:, -1]
                top1, top2, gap = margingate.margin(logits)
                d.append(int(top2[0]) if float(gap[0]) < self.twice else int(top1[0]))
            out.append(d)
        return out


# --------------------------------------------------------------------------- exact mode
@pytest.mark.parametrize("k", [1, 3, 8])
def test_exact_equals_always_in_every_configuration(k):
    results = run(policy="always", speculative=k)
    for name, r in results.items():
        assert r.sequences == always(), f"k={k}: {name} differs from always"
        assert r.stats["exact"] and r.stats["mars_changed"] == 0
    accepted = sum(r.stats["accepted"] for r in results.values())
    drafted = sum(r.stats["drafted"] for r in results.values())
    print(f"\nk={k}: prompt lookup accepted {accepted}/{drafted}")
    assert 0 < accepted < drafted  # the check ran on both outcomes


@pytest.mark.parametrize("k", [1, 3, 8])
def test_exact_with_partly_wrong_drafts(k):
    drafter = Sometimes(always(), prompts())
    results = run(policy="always", speculative=k, drafter=drafter)
    for name, r in results.items():
        assert r.sequences == always(), f"k={k}: {name} differs from always"
        assert 0 < r.stats["accepted"] < r.stats["drafted"]


def test_user_draft_model():
    target = model()
    close = copy.deepcopy(target)  # same weights on the fast path: mostly right
    other = build_model(FAMILY, torch.bfloat16, seed=7)  # unrelated: mostly wrong
    for draft, name in ((close, "close"), (other, "other")):
        results = run(policy="always", speculative=4, drafter=draft)
        for config, r in results.items():
            assert r.sequences == always(), f"{name} draft model, {config}"
        rate = results["b8_reversed"].stats["acceptance_rate"]
        print(f"\n{name} draft model: acceptance {rate:.2f}")
        if name == "close":
            assert rate > 0.8
    # MARS with a draft model: its drafts are per row, so MARS stays batch-invariant
    mars = run(policy="always", speculative=4, drafter=close, mars_threshold=1.0)
    assert all(r.sequences == mars["alone"].sequences for r in mars.values())


def test_statistics_add_up():
    r = run(policy="always", speculative=3, record_margins=True)["b3_shuffled"]
    s = r.stats
    assert s["speculative"] == 3 and s["policy"] == "always"
    assert s["steps"] == s["verified"] == NUM_PROMPTS * NEW_TOKENS
    for row, seq, m in zip(s["per_row"], r.sequences, r.margins, strict=True):
        # each pass yields its accepted drafts plus the verifier's token; the prefill one token
        assert row["steps"] == len(seq) == row["passes"] + row["accepted"]
        assert row["accepted"] <= row["drafted"] <= 3 * (row["passes"] - 1)
        assert len(m) == len(seq) and all(x >= 0 for x in m)
    assert s["drafted"] == sum(row["drafted"] for row in s["per_row"])
    assert s["accepted"] == sum(row["accepted"] for row in s["per_row"])
    assert s["acceptance_rate"] == s["accepted"] / s["drafted"]
    assert s["tokens_per_pass"] == s["steps"] / sum(row["passes"] for row in s["per_row"])
    # batches of 3, 3, 2: every batch's passes are at least its slowest row's
    assert s["verify_passes"] >= max(row["passes"] for row in s["per_row"])
    assert s["verify_passes"] <= sum(row["passes"] for row in s["per_row"])


def test_margins_are_canonical():
    r = run(policy="always", speculative=3, record_margins=True)["alone"]
    for i in (0, 1):
        logits = canonical_logits(prompts()[i], r.sequences[i])
        assert r.margins[i] == margingate.margin(logits)[2].tolist()


def test_eos_stops_rows():
    seqs = always()
    eos = seqs[1][5]  # a token prompt 1 produces at step 5
    r = margingate.generate(model(), prompts(), policy="always", max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    s = margingate.generate(model(), prompts(), policy="always", speculative=4, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert s.sequences == r.sequences
    assert len(s.sequences[1]) <= 6 and s.sequences[1][-1] == eos
    assert s.stats["steps"] == sum(len(x) for x in s.sequences)


class Split(Sometimes):
    """Right every time for odd prompts, wrong every time for even ones: the odd rows accept every
    draft and run ahead of the even ones, which take one token per pass."""

    def corrupt(self, prompt: int, context: list[int], drafts: list[int], k: int) -> list[int]:
        return drafts if prompt % 2 else [3 + (t + 1) % 300 for t in drafts]


@pytest.mark.parametrize("capped", [True, False])
def test_rows_ahead_sit_rounds_out(monkeypatch, capped):
    """Rows that accept everything would run ahead of rows that accept nothing, and every pass
    would re-feed their lead for all rows. With the cap, no pass is wider than ``k + 2``, and a
    row ahead sits rounds out rather than shortening them: each row's rounds (passes, drafts,
    acceptances) are the same in every batch configuration, and the tokens are always's. The
    control (cap lifted) shows the widening the cap prevents."""
    from margingate import speculative

    k = 3
    if not capped:
        monkeypatch.setattr(speculative, "pass_width", lambda k: 10**9)
    widths = []
    forward = speculative.canonical_forward

    def recording(model, ids, **kwargs):
        if kwargs.get("logits_to_keep", 0) == 0:  # the decode passes (the prefill keeps 1)
            widths.append(ids.shape[1])
        return forward(model, ids, **kwargs)

    monkeypatch.setattr(speculative, "canonical_forward", recording)
    results = run(policy="always", speculative=k, drafter=Split(always(), prompts()))
    rounds = {name: [(row["passes"], row["drafted"], row["accepted"]) for row in r.stats["per_row"]] for name, r in results.items()}
    for name, r in results.items():
        assert r.sequences == always(), name
        assert rounds[name] == rounds["alone"], name
    if capped:
        assert max(widths) <= k + 2
    else:
        assert max(widths) > 2 * (k + 2)  # the lead of the rows ahead, re-fed


# --------------------------------------------------------------------------- MARS
def test_mars_deterministic_and_differs_only_below_tau():
    margins = torch.tensor(
        [m for r in run(policy="always", record_margins=True)["alone"].margins for m in r], dtype=torch.float32
    )
    tau = float(margins.quantile(0.25))
    results = run(policy="always", speculative=3, mars_threshold=tau, drafter=RunnerUp(2 * tau))
    base = results["alone"]
    for name, r in results.items():
        assert r.sequences == base.sequences, f"MARS: {name} differs from alone"
        assert [row["mars_steps"] for row in r.stats["per_row"]] == [row["mars_steps"] for row in base.stats["per_row"]]
    assert not base.stats["exact"]
    changed = 0
    for i, seq in enumerate(base.sequences):
        top1, top2, gap = margingate.margin(canonical_logits(prompts()[i], seq))
        differs = [s for s in range(len(seq)) if seq[s] != int(top1[s])]
        for s in differs:  # each difference: below tau, and the runner-up
            assert float(gap[s]) < tau and seq[s] == int(top2[s]), (i, s)
        assert differs == base.stats["per_row"][i]["mars_steps"]
        changed += len(differs)
    assert changed == base.stats["mars_changed"] > 0
    assert base.sequences != always()
    # a runner-up at a margin in [tau, 2 tau) was drafted and rejected somewhere
    assert base.stats["accepted"] < base.stats["drafted"]


# --------------------------------------------------------------------------- the drafters
def test_prompt_lookup():
    d = PromptLookupDrafter(max_ngram=3)
    assert d.propose([[1, 2, 3, 4, 1, 2]], 2) == [[3, 4]]  # 2-gram [1, 2] seen at 0
    assert d.propose([[5, 6, 7, 5, 6, 8, 5, 6]], 2) == [[8, 5]]  # the latest occurrence wins
    assert d.propose([[9, 1, 2, 3, 7, 1, 2, 3]], 3) == [[7, 1, 2]]  # longest n-gram first
    assert d.propose([[1, 2, 3]], 4) == [[]]  # no match
    assert d.propose([[4, 4]], 3) == [[4]]  # the continuation stops at the context's end
    assert d.propose([[7]], 3) == [[]]
    assert d.propose([[1, 2, 1]], 0) == [[]]
    assert d.propose([[1, 2, 1], [3, 3]], 1) == [[2], [3]]
    assert PromptLookupDrafter(max_ngram=2, min_ngram=2).propose([[1, 2, 3, 2]], 2) == [[]]
    for bad in ({"max_ngram": 0}, {"min_ngram": True}, {"max_ngram": 1, "min_ngram": 2}):
        with pytest.raises(ValueError, match="PromptLookupDrafter"):
            PromptLookupDrafter(**bad)


def test_model_drafter_reuses_its_cache():
    draft = ModelDrafter(copy.deepcopy(model()))
    fresh = ModelDrafter(copy.deepcopy(model()))
    context = prompts()[0]
    first = draft.propose([context], 3)[0]
    # the context grows by an accepted draft and a correction: the cached prefix is kept
    longer = context + first[:1] + [5]
    assert draft.propose([longer], 3) == fresh.propose([longer], 3)
    assert len(first) == 3


def test_clear_errors():
    m, p = model(), prompts()[:2]
    cases = [
        (dict(policy="margin", speculative=2), ValueError, "policy='always'"),
        (dict(policy="always", speculative=0), ValueError, "speculative must be >= 1"),
        (dict(policy="always", speculative=True), TypeError, "speculative must be an int"),
        (dict(policy="always", mars_threshold=0.5), ValueError, "mars_threshold needs speculative"),
        (dict(policy="always", speculative=2, mars_threshold=-1.0), ValueError, "mars_threshold must be >= 0"),
        (dict(policy="always", speculative=2, mars_threshold="x"), TypeError, "mars_threshold must be a float"),
        (dict(policy="always", speculative=2, drafter="x"), TypeError, "drafter must be"),
        (dict(policy="always", speculative=2, drafter=m), ValueError, "drafter is the target"),
        (dict(policy="always", drafter=PromptLookupDrafter()), ValueError, "drafter needs speculative"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text):
            margingate.generate(m, p, max_new_tokens=4, **kwargs)

    class Short:
        def propose(self, contexts, k):
            return []

    with pytest.raises(RuntimeError, match="drafter returned 0 rows"):
        margingate.generate(m, p, policy="always", speculative=2, drafter=Short(), max_new_tokens=4)


def test_check_reports_speculative(tmp_path, capsys):
    """``margingate check --speculative K``: an exact entry next to the policies, equal to always."""
    import json

    from margingate import cli

    model().save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts()[:4]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main([
            "check", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--max-new-tokens", "8", "--batch-sizes", "1,3", "--policies", "off,always", "--speculative", "3",
            "--quiet", "--json", str(tmp_path / "check.json"),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "speculative (k=3, prompt lookup): acceptance" in out
    entry = json.loads((tmp_path / "check.json").read_text())["policies"]["speculative"]
    assert entry["deterministic"] and entry["matches_always"] == 4
    assert entry["drafted"] >= entry["accepted"] >= 0 and entry["tokens_per_pass"] >= 1.0
