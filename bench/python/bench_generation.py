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
from harness import measure, print_table  # noqa: E402

import margingate  # noqa: E402
from margingate.generation import default_threshold  # noqa: E402

COUNTERFACTUAL_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def load_prompts(count: int, offset: int = 0) -> list[str]:
    """``count`` prompts from ``offset`` on, interleaving the math, code and chat sets (so any
    range mixes all three)."""
    sets = [margingate.prompt_sets.load(name) for name in ("math", "code", "chat")]
    mixed = [p for group in zip(*sets, strict=False) for p in group]
    if offset + count > len(mixed):
        raise SystemExit(f"bench_generation: only {len(mixed)} built-in prompts, asked for {offset}+{count}")
    return mixed[offset : offset + count]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((s for s in range(min(len(a), len(b))) if a[s] != b[s]), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,8,1", help="comma-separated, run in this order")
    parser.add_argument("--policies", default="off,margin,always", help="comma-separated, must include off")
    parser.add_argument(
        "--threshold", type=float, default=None, help="margin threshold (default: calibrated)"
    )
    parser.add_argument("--json", default=None, help="checkpoint every sequence, statistic and time here")
    parser.add_argument("--prompt-offset", type=int, default=0, help="skip this many prompts of the mix")
    parser.add_argument(
        "--components",
        action="store_true",
        help="instead: time one fast decode step and the verifier calls (medians, interleaved)",
    )
    parser.add_argument(
        "--report", nargs="+", default=None, help="only report (partial) --json files, concatenated"
    )
    args = parser.parse_args()
    if args.report:
        config, runs = None, None
        for path in args.report:  # runs over disjoint prompt ranges, each timed in its own run
            saved = json.loads(Path(path).read_text())
            part = {p: {int(bs): r for bs, r in by_bs.items()} for p, by_bs in saved["runs"].items()}
            if config is None:
                config, runs = saved["config"], part
                continue
            config["prompts"] += saved["config"]["prompts"]
            for p, by_bs in part.items():
                for bs, r in by_bs.items():
                    mine = runs[p][bs]
                    for key in ("sequences", "rows", "margins"):
                        mine[key] += r[key]
                    mine["wall"] += r["wall"]
                    mine["cpu"] += r["cpu"]
        report(config, runs)
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    if "off" not in policies:
        raise SystemExit("bench_generation: --policies must include off (the baseline of the increments)")

    t_load = time.perf_counter()
    model, tokenizer = margingate.load_default_model(torch.bfloat16, progress=False)
    if args.components:
        prompts = load_prompts(max(batch_sizes), args.prompt_offset)
        components(model, [tokenizer(p)["input_ids"] for p in prompts], batch_sizes)
        return
    threshold = default_threshold(model) if args.threshold is None else args.threshold
    prompts = load_prompts(args.prompts, args.prompt_offset)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    n = len(prompts)
    config = {
        "model": "gemma3-270m",
        "dtype": "bfloat16",
        "threads": torch.get_num_threads(),
        "prompts": n,
        "prompt_offset": args.prompt_offset,
        "prompt_tokens": [len(e) for e in encoded],
        "new_tokens": args.new_tokens,
        "batch_sizes": batch_sizes,
        "policies": policies,
        "threshold": threshold,
        "build": margingate.build_info(),
    }
    print(
        f"# Gemma 3 270M ({model.config.model_type}, bf16, {torch.get_num_threads()} threads), "
        f"{n} prompts ({min(map(len, encoded))}-{max(map(len, encoded))} tokens), "
        f"{args.new_tokens} new tokens, batch sizes {batch_sizes}, policies {policies}, "
        f"margin threshold {threshold}; loaded in {time.perf_counter() - t_load:.1f} s",
        flush=True,
    )

    runs: dict[str, dict[int, dict]] = {
        p: {
            b: {"sequences": [None] * n, "rows": [None] * n, "margins": [None] * n, "wall": 0.0, "cpu": 0.0}
            for b in batch_sizes
        }
        for p in policies
    }
    # Untimed warm-up: the first calls pay one-time costs (kernel selection, allocator growth)
    # that would otherwise land on whichever policy runs first.
    for policy in policies:
        margingate.generate(
            model, encoded[: batch_sizes[0]], policy=policy, max_new_tokens=2, stop_at_eos=False
        )
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
            if args.json:
                Path(args.json).write_text(json.dumps({"config": config, "runs": runs}))
    report(config, runs)


def _component_times(model, batch: list[list[int]]) -> dict[str, float]:
    from transformers import DynamicCache

    bs = len(batch)
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    cache = DynamicCache()
    with torch.inference_mode():
        margingate.canonical_forward(model, ids, attention_mask=mask, past_key_values=cache)
        token = ids[:, -1:]
        seq = torch.cat([ids, token], 1)
        mask1 = torch.cat([mask, torch.ones(bs, 1, dtype=mask.dtype)], 1)
        position = (mask1.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        model(input_ids=token, attention_mask=mask1, position_ids=position, past_key_values=cache)
        mask2 = torch.cat([mask1, torch.ones(bs, 1, dtype=mask.dtype)], 1)

        def fast():
            model(input_ids=token, attention_mask=mask2, position_ids=position + 1, past_key_values=cache)
            cache.crop(-1)  # rewind: every call sees the same cache

        all_rows = torch.arange(bs)
        one = torch.tensor([0])
        fns = {
            "fast_step": fast,
            "verify_all_rows": lambda: margingate.canonical_forward(
                model, seq[:, -1:], attention_mask=mask1, past_key_values=cache, rows=all_rows
            ),
            "verify_1_row": lambda: margingate.canonical_forward(
                model, seq[:1, -1:], attention_mask=mask1, past_key_values=cache, rows=one
            ),
            "verify_1_row_window8": lambda: margingate.canonical_forward(
                model, seq[:1, -8:], attention_mask=mask1, past_key_values=cache, rows=one
            ),
        }
        t = measure(fns, repeats=5, min_time_s=0.05, warmup=1)
    return t


def components(model, encoded: list[list[int]], batch_sizes: list[int]) -> None:
    """Medians of the pieces a decode step is made of, timed interleaved on one cache: the fast
    decode step of the whole batch (what ``off`` pays per step), the verifier of all rows at the
    current position (what ``always`` adds per step), and the verifier of one row for a window of
    1 and 8 positions (what ``margin`` adds per flagged row)."""
    table = []
    for bs in batch_sizes:
        t = _component_times(model, encoded[:bs])
        row = {"batch": bs, **{f"{k}_ms": 1e3 * v for k, v in t.items()}}
        row["all/fast"] = t["verify_all_rows"] / t["fast_step"]
        row["all/1row"] = t["verify_all_rows"] / t["verify_1_row"]
        table.append(row)
        print_table([row])
    print("\n## decode-step components (medians, interleaved, same cache)")
    print_table(table)


def report(config: dict, runs: dict) -> None:
    batch_sizes, policies = config["batch_sizes"], config["policies"]
    # Timed requests: within one batch size every policy decoded the same batches (a checkpoint
    # is written only after all policies finished a batch), so per-batch-size increments compare
    # like with like even in a partial run. Determinism counts prompts done in every batch size.
    done = [
        i
        for i in range(config["prompts"])
        if all(runs[p][bs]["sequences"][i] is not None for p in policies for bs in batch_sizes)
    ]
    ref_bs = min(batch_sizes)
    print(
        f"\n# {config['prompts']} prompts x {config['new_tokens']} new tokens, batch sizes {batch_sizes}; "
        f"determinism over the {len(done)} prompts decoded in every batch size"
    )

    def rows_of(policy, bs):
        return [r for r in runs[policy][bs]["rows"] if r is not None]

    summary: dict[str, dict] = {}
    table = []
    for policy in policies:
        seqs = {bs: runs[policy][bs]["sequences"] for bs in batch_sizes}
        identical = sum(all(seqs[bs][i] == seqs[ref_bs][i] for bs in batch_sizes) for i in done)
        all_rows = [r for bs in batch_sizes for r in rows_of(policy, bs)]
        steps = sum(r["steps"] for r in all_rows)
        verified = sum(r["verified"] for r in all_rows)
        repairs = sum(r["repairs"] for r in all_rows)
        row = {"policy": policy, "identical_all": f"{identical}/{len(done)}"}
        # Pairwise, over the prompts both batch sizes finished (all of them after a full run).
        for a_i, a in enumerate(batch_sizes):
            for b in batch_sizes[a_i + 1 :]:
                both = [
                    i for i in range(config["prompts"]) if seqs[a][i] is not None and seqs[b][i] is not None
                ]
                same = sum(seqs[a][i] == seqs[b][i] for i in both)
                row[f"b{a}=b{b}"] = f"{same}/{len(both)}"
        row |= {
            "trigger_rate": verified / steps if steps else 0.0,
            "verified": verified,
            "repairs": repairs,
        }
        for bs in batch_sizes:
            row[f"b{bs}_wall_s"] = runs[policy][bs]["wall"]
        row["wall_s"] = sum(runs[policy][bs]["wall"] for bs in batch_sizes)
        row["cpu_s"] = sum(runs[policy][bs]["cpu"] for bs in batch_sizes)
        table.append(row)
        summary[policy] = {**row, "repair_margins": [m for r in all_rows for m in r["repair_margins"]]}
    print("\n## sequence-level determinism, verification and time per policy")
    print_table(table)

    increments = {}
    table = []
    for policy in policies:
        if policy == "off":
            continue
        row = {"policy": policy}
        for bs in batch_sizes:
            row[f"b{bs}_incr_s"] = runs[policy][bs]["wall"] - runs["off"][bs]["wall"]
        row["wall_incr_s"] = summary[policy]["wall_s"] - summary["off"]["wall_s"]
        row["wall_incr_%"] = 100 * row["wall_incr_s"] / summary["off"]["wall_s"]
        row["cpu_incr_s"] = summary[policy]["cpu_s"] - summary["off"]["cpu_s"]
        table.append(row)
        increments[policy] = row
    print("\n## latency increment over off (same requests, same run, interleaved)")
    print_table(table)
    if "margin" in increments and "always" in increments:
        parts = []
        for key in ["wall_incr_s", "cpu_incr_s"] + [f"b{bs}_incr_s" for bs in batch_sizes]:
            im, ia = increments["margin"][key], increments["always"][key]
            parts.append(f"{key} {ia / im:.2f}x" if im > 0 else f"{key} n/a (margin increment {im:.1f} s)")
        print("\nincrement(always) / increment(margin): " + ", ".join(parts))

    # off: first divergences from the smallest batch size, with the fast margins where they happened.
    flips = []
    for bs in batch_sizes:
        if bs == ref_bs:
            continue
        for i in done:
            d = first_divergence(runs["off"][ref_bs]["sequences"][i], runs["off"][bs]["sequences"][i])
            if d is not None:
                flips.append(
                    (bs, i, d, runs["off"][ref_bs]["margins"][i][d], runs["off"][bs]["margins"][i][d])
                )
    batched_steps = sum(
        runs["off"][bs]["rows"][i]["steps"] for bs in batch_sizes if bs != ref_bs for i in done
    )
    print(
        f"\noff: {len(flips)} sequences diverge from batch {ref_bs} (flip rate {len(flips) / max(batched_steps, 1):.4f}"
        f" of {batched_steps} batched decode steps)"
    )
    for bs, i, d, m_ref, m_bs in flips:
        print(
            f"  batch {bs}, prompt {i}, step {d}: fast margin {m_ref:.4f} (batch {ref_bs}) / {m_bs:.4f} (batch {bs})"
        )
    margins = torch.tensor(
        [m for bs in batch_sizes for row in runs["off"][bs]["margins"] if row is not None for m in row]
    )
    if margins.numel():
        shares = ", ".join(
            f"<{t}: {float((~(margins >= t)).float().mean()):.3f}" for t in COUNTERFACTUAL_THRESHOLDS
        )
        print(
            f"off: median fast margin {float(margins.median()):.3f}; share of steps below a threshold: {shares}"
        )
    repair_margins = summary.get("margin", {}).get("repair_margins")
    if repair_margins:
        print(
            f"margin: {len(repair_margins)} repairs at fast margins median "
            f"{statistics.median(repair_margins):.4f}, max {max(repair_margins):.4f}"
        )


if __name__ == "__main__":
    main()
