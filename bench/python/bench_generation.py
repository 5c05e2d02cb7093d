"""MarginGate on the real model: determinism, trigger rate, repairs and latency increment per policy.

Decodes a prompt set (the built-in math, code and chat prompts, interleaved) greedily with
Gemma 3 270M in bf16 on the CPU, in several batch sizes, under each policy, and reports:

- sequence-level determinism: the fraction of prompts whose generated tokens are identical in
  every batch size (DESIGN.md, "How we measure");
- the flip rate of ``off`` (decode steps whose token first differs from the batch-1 run);
- trigger rate (verified / decode steps) and repairs (verified steps whose token changed);
- latency: the time of each policy and its increment over ``off`` for the same requests, and the
  figure of merit increment(always) / increment(margin) (the paper: 2.23x).

Timing is interleaved at the finest grain that keeps the batches intact: every batch of prompts
is decoded by each policy back to back (the policy order rotating from batch to batch), so the
load of this shared machine hits every policy alike. Both wall time and this process's CPU time
are reported; CPU time is less disturbed by other processes competing for the 2 cores.

Usage (from the repository root, after building):
    PYTHONPATH=python python bench/python/bench_generation.py                       # full run
    PYTHONPATH=python python bench/python/bench_generation.py --prompts 32 --new-tokens 64 \
        --batch-sizes 16,8,1 --policies off,margin,always --json /tmp/generation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

import margingate  # noqa: E402
from margingate.generation import default_threshold  # noqa: E402

COUNTERFACTUAL_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def load_prompts(count: int) -> list[str]:
    """``count`` prompts, interleaving the math, code and chat sets (so any prefix mixes all three)."""
    sets = [margingate.prompt_sets.load(name) for name in ("math", "code", "chat")]
    mixed = [p for group in zip(*sets, strict=False) for p in group]
    if count > len(mixed):
        raise SystemExit(f"bench_generation: only {len(mixed)} built-in prompts, asked for {count}")
    return mixed[:count]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((s for s in range(min(len(a), len(b))) if a[s] != b[s]), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,8,1", help="comma-separated; the first is run first")
    parser.add_argument("--policies", default="off,margin,always", help="comma-separated, must include off")
    parser.add_argument(
        "--threshold", type=float, default=None, help="margin threshold (default: calibrated)"
    )
    parser.add_argument("--json", default=None, help="write every sequence, statistic and time here")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    if "off" not in policies:
        raise SystemExit("bench_generation: --policies must include off (the baseline of the increments)")

    t_load = time.perf_counter()
    model, tokenizer = margingate.load_default_model(torch.bfloat16, progress=False)
    threshold = default_threshold(model) if args.threshold is None else args.threshold
    prompts = load_prompts(args.prompts)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    print(
        f"# Gemma 3 270M ({model.config.model_type}, bf16, {torch.get_num_threads()} threads), "
        f"{len(prompts)} prompts ({min(map(len, encoded))}-{max(map(len, encoded))} tokens), "
        f"{args.new_tokens} new tokens, batch sizes {batch_sizes}, policies {policies}, "
        f"margin threshold {threshold}; loaded in {time.perf_counter() - t_load:.1f} s",
        flush=True,
    )

    n = len(prompts)
    runs: dict[str, dict[int, dict]] = {
        p: {
            b: {"sequences": [None] * n, "rows": [None] * n, "margins": [None] * n, "wall": 0.0, "cpu": 0.0}
            for b in batch_sizes
        }
        for p in policies
    }
    t_start = time.perf_counter()
    turn = 0
    for bs in batch_sizes:
        chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        for c, chunk in enumerate(chunks):
            order = policies[turn % len(policies) :] + policies[: turn % len(policies)]
            turn += 1
            for policy in order:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                r = margingate.generate(
                    model,
                    [encoded[i] for i in chunk],
                    policy=policy,
                    threshold=threshold if policy == "margin" else None,
                    max_new_tokens=args.new_tokens,
                    batch_size=bs,
                    stop_at_eos=False,
                    record_margins=policy == "off",
                )
                run = runs[policy][bs]
                run["wall"] += time.perf_counter() - wall0
                run["cpu"] += time.process_time() - cpu0
                for j, i in enumerate(chunk):
                    run["sequences"][i] = r.sequences[j]
                    run["rows"][i] = r.stats["per_row"][j]
                    if r.margins is not None:
                        run["margins"][i] = r.margins[j]
            print(
                f"  batch {bs}: {c + 1}/{len(chunks)} batches done, {time.perf_counter() - t_start:.0f} s elapsed",
                flush=True,
            )

    # ---------------------------------------------------------------- report
    ref_bs = min(batch_sizes)
    rows = []
    summary: dict[str, dict] = {}
    for policy in policies:
        seqs = {bs: runs[policy][bs]["sequences"] for bs in batch_sizes}
        identical = sum(all(seqs[bs][i] == seqs[ref_bs][i] for bs in batch_sizes) for i in range(n))
        all_rows = [row for bs in batch_sizes for row in runs[policy][bs]["rows"]]
        steps = sum(r["steps"] for r in all_rows)
        verified = sum(r["verified"] for r in all_rows)
        repairs = sum(r["repairs"] for r in all_rows)
        repair_margins = [m for r in all_rows for m in r["repair_margins"]]
        row = {
            "policy": policy,
            "determinism": f"{identical}/{n}",
            "trigger_rate": verified / steps if steps else 0.0,
            "verified": verified,
            "repairs": repairs,
        }
        for bs in batch_sizes:
            row[f"wall_b{bs}_s"] = runs[policy][bs]["wall"]
        row["wall_total_s"] = sum(runs[policy][bs]["wall"] for bs in batch_sizes)
        row["cpu_total_s"] = sum(runs[policy][bs]["cpu"] for bs in batch_sizes)
        rows.append(row)
        summary[policy] = {
            **row,
            "identical": identical,
            "steps": steps,
            "repair_margins": repair_margins,
            "per_batch_size": {
                bs: {
                    "wall_s": runs[policy][bs]["wall"],
                    "cpu_s": runs[policy][bs]["cpu"],
                    "steps": sum(r["steps"] for r in runs[policy][bs]["rows"]),
                    "verified": sum(r["verified"] for r in runs[policy][bs]["rows"]),
                    "repairs": sum(r["repairs"] for r in runs[policy][bs]["rows"]),
                }
                for bs in batch_sizes
            },
        }
    print("\n## determinism, verification and time per policy")
    print_table(rows)

    base = summary["off"]
    incr_rows = []
    for policy in policies:
        if policy == "off":
            continue
        r = {"policy": policy}
        for bs in batch_sizes:
            r[f"incr_b{bs}_s"] = runs[policy][bs]["wall"] - runs["off"][bs]["wall"]
        r["incr_wall_s"] = summary[policy]["wall_total_s"] - base["wall_total_s"]
        r["incr_cpu_s"] = summary[policy]["cpu_total_s"] - base["cpu_total_s"]
        r["incr_wall_%"] = 100 * r["incr_wall_s"] / base["wall_total_s"]
        incr_rows.append(r)
        summary[policy]["increment"] = r
    print("\n## latency increment over off (same requests, same run)")
    print_table(incr_rows)
    if "margin" in summary and "always" in summary:
        ratios = {}
        for key in ["incr_wall_s", "incr_cpu_s"] + [f"incr_b{bs}_s" for bs in batch_sizes]:
            im, ia = summary["margin"]["increment"][key], summary["always"]["increment"][key]
            ratios[key] = ia / im if im > 0 else float("inf")
        print(
            "\nincrement(always) / increment(margin): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        )
        summary["ratio_always_over_margin"] = ratios

    # off: flips against the smallest batch size, their margins, and what each threshold would cost.
    flips = []
    for bs in batch_sizes:
        if bs == ref_bs:
            continue
        for i in range(n):
            d = first_divergence(runs["off"][ref_bs]["sequences"][i], runs["off"][bs]["sequences"][i])
            if d is not None:
                flips.append(
                    {
                        "batch": bs,
                        "prompt": i,
                        "step": d,
                        "margin_ref": runs["off"][ref_bs]["margins"][i][d],
                        "margin_batched": runs["off"][bs]["margins"][i][d],
                    }
                )
    decode_steps = sum(r["steps"] for bs in batch_sizes if bs != ref_bs for r in runs["off"][bs]["rows"])
    print(
        f"\noff: {len(flips)} first divergences vs batch {ref_bs} over {decode_steps} batched decode steps "
        f"(flip rate {len(flips) / max(decode_steps, 1):.4f})"
    )
    for f in flips:
        print(
            f"  batch {f['batch']} prompt {f['prompt']} step {f['step']}: fast margin {f['margin_ref']:.4f} "
            f"(batch {ref_bs}) / {f['margin_batched']:.4f} (batch {f['batch']})"
        )
    margins = torch.tensor([m for bs in batch_sizes for row in runs["off"][bs]["margins"] for m in row])
    cf = {t: float((~(margins >= t)).float().mean()) for t in COUNTERFACTUAL_THRESHOLDS}
    print(
        "off: share of decode steps below a threshold (the margin policy's trigger rate it would give): "
        + ", ".join(f"{t}: {v:.3f}" for t, v in cf.items())
    )
    print(f"off: median fast-path margin {float(margins.median()):.3f}")
    if "margin" in summary:
        rm = summary["margin"]["repair_margins"]
        if rm:
            print(
                f"margin: {len(rm)} repairs at fast margins median {statistics.median(rm):.4f}, max {max(rm):.4f}"
            )

    if args.json:
        out = {
            "config": {
                "model": "gemma3-270m",
                "dtype": "bfloat16",
                "threads": torch.get_num_threads(),
                "prompts": n,
                "new_tokens": args.new_tokens,
                "batch_sizes": batch_sizes,
                "policies": policies,
                "threshold": threshold,
                "build": margingate.build_info(),
            },
            "summary": summary,
            "off_flips": flips,
            "counterfactual_trigger_rates": cf,
            "sequences": {p: {bs: runs[p][bs]["sequences"] for bs in batch_sizes} for p in policies},
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
