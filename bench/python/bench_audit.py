"""Token-DiFR / Activation-DiFR audits on the default model: honest margingate vs other providers.

Reproduces (reduced) the Token-DiFR experiment with margingate's canonical forward as the trusted
reference. Providers, each decoding the same prompts (the built-in math/code/chat sets, interleaved)
with Gemma 3 270M in bf16 on the CPU:

- ``margin b16`` / ``margin b8``: margingate's ``margin`` policy in batches of ``--batch-size``
  (default 16) and half of it (honest);
- ``off b16``: the fast path (vendor kernels): honest but not bit-exact;
- ``rtn4``: a provider whose linear weights are 4-bit group-wise round-to-nearest quantized
  (groups of 32 along the input dimension, symmetric, scale = max |w| / 7; done in torch; the tied
  embedding / output matrix is kept), decoding on the fast path;
- at T > 0 (``--temperature``, default 0.7): ``sampled`` (honest: seeded Gumbel-max with
  ``sample_margin`` on canonical logits, the seed of transcript i is 1000 + i), ``wrong seed``
  (sampled with seed 2000 + i, claims 1000 + i), ``wrong T`` (sampled at T = 1.0, claims the
  audited T), ``rtn4 sampled`` (the quantized model, same seeds and T).

Every transcript is audited with ``margingate.audit`` (one teacher-forced canonical forward per
batch). Reported: the score distribution per provider, the transcripts that are not token for
token the reference's and those flagged at threshold 0 (a score above 0; an exact tie scores 0), and the AUC of each dishonest provider
against the honest one as a function of the number of tokens audited, with the mean Token-DiFR
score over the first N tokens of a transcript as the statistic (and, for Activation-DiFR, the
mean fingerprint distance over the first N tokens, k = 16).

Usage (from the repository root, after building; takes ~10 min on a busy 2-core CPU):
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/python/bench_audit.py --prompts 16 --new-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

import margingate  # noqa: E402
from margingate import hf_compat  # noqa: E402
from margingate.batching import encode_prompts, left_pad  # noqa: E402
from margingate.canonical import canonical_forward  # noqa: E402
from margingate.difr import fingerprints  # noqa: E402
from margingate.ops import sample_margin  # noqa: E402
from margingate.transcripts import Transcript, transcripts_from_generation  # noqa: E402

TOKENS_AUDITED = (1, 2, 4, 8, 16, 32, 64, 128)
FINGERPRINT_K = 16


def load_prompts(count: int) -> list[str]:
    sets = [margingate.prompt_sets.load(name) for name in ("math", "code", "chat")]
    mixed = [p for group in zip(*sets, strict=False) for p in group]
    return mixed[:count]


def quantize_rtn4(model: torch.nn.Module, group: int = 32) -> torch.nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` weights (not the tied output embedding) are 4-bit
    symmetric round-to-nearest per group of ``group`` input columns."""
    q = copy.deepcopy(model)
    head = q.get_output_embeddings()
    with torch.no_grad():
        for module in q.modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            w = module.weight
            n, k = w.shape
            if k % group:
                continue
            g = w.float().reshape(n, k // group, group)
            scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
            w.copy_(((g / scale).round().clamp(-8, 7) * scale).reshape(n, k).to(w.dtype))
    return q


def sample(model, prompts, n, seeds, temperature, pad):
    """Batched seeded sampling with ``sample_margin`` on canonical logits (K/V cache, no EOS stop)."""
    ids, mask = left_pad(prompts, pad)
    cache = hf_compat.new_cache()
    logits = canonical_forward(model, ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    seeds = torch.tensor(seeds, dtype=torch.int64)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    out = []
    for step in range(n):
        token = sample_margin(logits, seeds, lengths + step, temperature)[0]
        out.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if step + 1 < n:
            logits = canonical_forward(
                model, token[:, None], attention_mask=mask, cache=cache, logits_to_keep=1
            )[:, -1]
    return torch.stack(out, dim=1).tolist()


def auc(bad: list[float], good: list[float]) -> float:
    """P(bad statistic > good statistic) + P(tie) / 2."""
    wins = sum((b > g) + 0.5 * (b == g) for b in bad for g in good)
    return wins / (len(bad) * len(good))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="honest margin and off batch (margin also at half)"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 skips the sampled providers")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = margingate.load_default_model(progress=False)
    eos = hf_compat.eos_ids(model, tokenizer)
    pad = hf_compat.pad_id(model, tokenizer, eos)
    prompts = encode_prompts(
        load_prompts(args.prompts), tokenizer, hf_compat.vocab_size(model), "bench_audit"
    )
    n = args.new_tokens
    quantized = quantize_rtn4(model)

    def greedy(m, policy, batch_size, name):
        r = margingate.generate(
            m,
            prompts,
            policy=policy,
            max_new_tokens=n,
            batch_size=batch_size,
            stop_at_eos=False,
            pad_token_id=pad,
        )
        return transcripts_from_generation(prompts, r.sequences, name)

    providers: dict[str, list[Transcript]] = {}
    big, small = args.batch_size, max(1, args.batch_size // 2)
    honest = f"margin b{big}"
    providers[honest] = greedy(model, "margin", big, honest)
    providers[f"margin b{small}"] = greedy(model, "margin", small, f"margin b{small}")
    providers[f"off b{big}"] = greedy(model, "off", big, f"off b{big}")
    providers["rtn4"] = greedy(quantized, "off", big, "rtn4")
    print(f"greedy transcripts in {time.perf_counter() - started:.0f} s", flush=True)
    if args.temperature > 0:
        t = args.temperature
        seeds = [1000 + i for i in range(len(prompts))]

        def sampled(m, sample_seeds, sample_t, name):
            seqs = sample(m, prompts, n, sample_seeds, sample_t, pad)
            return [
                Transcript(output_ids=s, prompt_ids=p, temperature=t, seed=seed, id=i, provider=name)
                for i, (p, s, seed) in enumerate(zip(prompts, seqs, seeds, strict=True))
            ]

        providers["sampled"] = sampled(model, seeds, t, "sampled")
        providers["wrong seed"] = sampled(model, [2000 + i for i in range(len(prompts))], t, "wrong seed")
        providers["wrong T"] = sampled(model, seeds, 1.0, "wrong T")
        providers["rtn4 sampled"] = sampled(quantized, seeds, t, "rtn4 sampled")
        print(f"sampled transcripts in {time.perf_counter() - started:.0f} s", flush=True)

    reports = {}
    for name, transcripts in providers.items():
        reports[name] = margingate.audit(model, transcripts, batch_size=8, pad_token_id=pad)["transcripts"]
    # Activation-DiFR: honest fingerprints (canonical, reference weights) vs the quantized provider's.
    fp = {
        honest: fingerprints(model, providers[honest], k=FINGERPRINT_K, pad_token_id=pad),
        "rtn4": fingerprints(quantized, providers["rtn4"], k=FINGERPRINT_K, pad_token_id=pad),
    }
    fp_reports = {
        name: margingate.audit(model, ts, pad_token_id=pad)["transcripts"] for name, ts in fp.items()
    }
    seconds = time.perf_counter() - started

    rows = []
    for name, rs in reports.items():
        scores = [s for r in rs for s in r["scores"]]
        mism = [m["reference_margin"] for r in rs for m in r["mismatches"]]
        tokens = sum(r["tokens"] for r in rs)
        rows.append(
            {
                "provider": name,
                "transcripts": len(rs),
                "tokens": len(scores),
                "token match": f"{100 * sum(r['match_rate'] * r['tokens'] for r in rs) / tokens:.1f}%",
                "score p50": statistics.median(scores),
                "score p90": sorted(scores)[int(0.9 * (len(scores) - 1))],
                "score max": max(scores),
                "not exact": f"{sum(r['verdict'] != 'exact' for r in rs)}/{len(rs)}",
                "flagged @0": f"{sum(r['verdict'] == 'fail' for r in rs)}/{len(rs)}",
                "ref margin at mismatches (max)": max(mism) if mism else "-",
            }
        )
    print(
        f"\nscores per provider ({args.prompts} prompts x {n} tokens, isa {margingate.build_info()['simd']})"
    )
    print_table(rows)

    def mean_first(rs, key, k):
        return [sum(r[key][:k]) / len(r[key][:k]) for r in rs]

    comparisons = [(f"off b{big}", honest), ("rtn4", honest)]
    if args.temperature > 0:
        comparisons += [("wrong seed", "sampled"), ("wrong T", "sampled"), ("rtn4 sampled", "sampled")]
    counts = [k for k in TOKENS_AUDITED if k <= n]
    auc_rows = []
    for bad, good in comparisons:
        row = {"audited vs honest": f"{bad} vs {good}"}
        for k in counts:
            row[f"N={k}"] = round(
                auc(mean_first(reports[bad], "scores", k), mean_first(reports[good], "scores", k)), 3
            )
        auc_rows.append(row)
    row = {"audited vs honest": f"rtn4 vs {honest} (activations)"}
    for k in counts:
        row[f"N={k}"] = round(
            auc(
                mean_first(fp_reports["rtn4"], "fingerprint_distances", k),
                mean_first(fp_reports[honest], "fingerprint_distances", k),
            ),
            3,
        )
    auc_rows.append(row)
    print("\nAUC vs tokens audited per transcript (statistic: mean score over the first N tokens)")
    print_table(auc_rows)
    fd = [d for r in fp_reports[honest] for d in r["fingerprint_distances"]]
    fq = [d for r in fp_reports["rtn4"] for d in r["fingerprint_distances"]]
    print(
        f"\nActivation-DiFR (k={FINGERPRINT_K}): honest max distance {max(fd)!r}; rtn4 distance "
        f"min {min(fq):.4g}, median {statistics.median(fq):.4g}"
    )
    print(f"total {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "auc": auc_rows, "reports": reports}, indent=1))


if __name__ == "__main__":
    main()
