"""The policies on the real model: determinism, trigger and rollback rates, latency, streaming.

Decodes a prompt set greedily with Gemma 3 270M (bf16, CPU) in several batch sizes under each
policy (``off``, ``margin``, ``window``, ``always``, ``invariant``) and reports:

- sequence-level determinism: prompts whose tokens are identical in every batch size;
- trigger rate (gate triggers / steps), repairs, ``window``'s verify passes and rollback rate;
- latency: each policy's time and its increment over ``off`` for the same requests, per batch
  size, and the figures of merit increment(window) / increment(margin) (LLM-42, the paper's
  baseline: 2.23x) and increment(always) / increment(margin);
- streaming: the delay from the fast path producing a token to the token being final (p50, p99)
  and the time to the first final token.

Timing is interleaved at the finest grain that keeps the batches intact: every batch of prompts is
decoded by each policy back to back, the policy order rotating from batch to batch, so the load of
this shared machine hits every policy alike. Wall and process CPU time are both reported.

Usage (from the repository root, after building; set OMP_WAIT_POLICY=PASSIVE):
    PYTHONPATH=python python bench/python/bench_generation.py --prompts 32 --new-tokens 64 \\
        --batch-sizes 16,8,1 --prompt-set all --json /tmp/generation.json
    PYTHONPATH=python python bench/python/bench_generation.py --prompt-set sharegpt --prompts 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table, run_header  # noqa: E402

import margingate  # noqa: E402
from margingate.measure import increment_ratio  # noqa: E402
from margingate.policies import default_threshold  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-set", default="all", help="a built-in set: all, math, code, chat, sharegpt, humaneval")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,8,1", help="comma-separated, run in this order")
    parser.add_argument("--policies", default="off,margin,window,always,invariant", help="must include off")
    parser.add_argument("--window", type=int, default=64, help="the window policy's W (LLM-42: 64)")
    parser.add_argument("--threshold", type=float, default=None, help="margin threshold (default: shipped)")
    parser.add_argument("--json", default=None, help="write every sequence, statistic and time here")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    if "off" not in policies:
        raise SystemExit("bench_generation: --policies must include off (the baseline of the increments)")

    t_load = time.perf_counter()
    model, tokenizer = margingate.load_default_model(torch.bfloat16, progress=False)
    threshold = default_threshold(model)[0] if args.threshold is None else args.threshold
    prompts = margingate.prompt_sets.load(args.prompt_set)[: args.prompts]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    n = len(encoded)
    print(f"# {run_header()}")
    print(
        f"# Gemma 3 270M bf16, {torch.get_num_threads()} threads, {n} prompts of {args.prompt_set} "
        f"({min(map(len, encoded))}-{max(map(len, encoded))} tokens), {args.new_tokens} new tokens, batch sizes "
        f"{batch_sizes}, policies {policies}, threshold {threshold}, window {args.window}; loaded in "
        f"{time.perf_counter() - t_load:.1f} s",
        flush=True,
    )
    runs = {p: {b: {"sequences": [None] * n, "rows": [None] * n, "wall": 0.0, "cpu": 0.0, "extra": {}} for b in batch_sizes} for p in policies}
    for policy in policies:  # untimed warm-up: one-time costs must not land on the first policy
        margingate.generate(model, encoded[:2], policy=policy, max_new_tokens=2, stop_at_eos=False)
    started, turn = time.perf_counter(), 0
    for bs in batch_sizes:
        chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        for c, chunk in enumerate(chunks):
            order = policies[turn % len(policies) :] + policies[: turn % len(policies)]
            turn += 1
            for policy in order:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                r = margingate.generate(
                    model, [encoded[i] for i in chunk], policy=policy, threshold=threshold, window=args.window,
                    max_new_tokens=args.new_tokens, batch_size=bs, stop_at_eos=False,
                )
                run = runs[policy][bs]
                run["wall"] += time.perf_counter() - wall0
                run["cpu"] += time.process_time() - cpu0
                for key in ("verify_passes", "rolled_back", "redecoded_steps"):
                    run["extra"][key] = run["extra"].get(key, 0) + r.stats.get(key, 0)
                for j, i in enumerate(chunk):
                    run["sequences"][i] = r.sequences[j]
                    run["rows"][i] = r.stats["per_row"][j]
            print(f"  batch {bs}: {c + 1}/{len(chunks)} batches, {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "build": margingate.build_info()}))
    report(runs, policies, batch_sizes, n)


def report(runs: dict, policies: list[str], batch_sizes: list[int], n: int) -> None:
    from margingate.processor import summarize

    ref = batch_sizes[-1] if 1 in batch_sizes else batch_sizes[0]
    table, by_batch = [], {bs: {} for bs in batch_sizes}
    for policy in policies:
        seqs = {bs: runs[policy][bs]["sequences"] for bs in batch_sizes}
        identical = sum(all(seqs[bs][i] == seqs[ref][i] for bs in batch_sizes) for i in range(n))
        rows = [r for bs in batch_sizes for r in runs[policy][bs]["rows"]]
        s = summarize([dict(r) for r in rows], policy=policy, threshold=0.0)
        extra = {k: sum(runs[policy][bs]["extra"].get(k, 0) for bs in batch_sizes) for k in ("verify_passes", "rolled_back")}
        for bs in batch_sizes:
            by_batch[bs][policy] = {"latency_increment_s": runs[policy][bs]["wall"] - runs["off"][bs]["wall"]}
        table.append(
            {
                "policy": policy,
                "identical": f"{identical}/{n}",
                "trigger": f"{100 * s['trigger_rate']:.1f}%",
                "repairs": s["repairs"],
                "rollback": f"{100 * extra['rolled_back'] / max(1, extra['rolled_back'] + s['steps']):.1f}%" if policy == "window" else "-",
                "passes": extra["verify_passes"] if policy == "window" else "-",
                "final after p50/p99 ms": f"{1e3 * s['stream']['delay_p50_s']:.0f}/{1e3 * s['stream']['delay_p99_s']:.0f}",
                "ttft p50 ms": f"{1e3 * s['stream']['ttft_p50_s']:.0f}",
                **{f"b{bs} s": round(runs[policy][bs]["wall"], 1) for bs in batch_sizes},
                "wall s": round(sum(runs[policy][bs]["wall"] for bs in batch_sizes), 1),
                "cpu s": round(sum(runs[policy][bs]["cpu"] for bs in batch_sizes), 1),
            }
        )
    print("\n## determinism, verification, streaming and time per policy")
    print_table(table)
    total = {p: {"latency_increment_s": sum(by_batch[bs][p]["latency_increment_s"] for bs in batch_sizes)} for p in policies}
    ratios = []
    for label, per in [*((f"batch {bs}", by_batch[bs]) for bs in batch_sizes), ("all", total)]:
        row = {"batch": label}
        for policy in policies:
            if policy != "off":
                row[f"incr {policy} s"] = round(per[policy]["latency_increment_s"], 1)
        for baseline in ("window", "always"):
            ratio = increment_ratio(per, baseline, "margin")
            row[f"{baseline}/margin"] = f"{ratio:.2f}x" if ratio is not None else "n/a"
        ratios.append(row)
    print("\n## latency increment over off (same requests, interleaved) and the figures of merit")
    print_table(ratios)


if __name__ == "__main__":
    main()
