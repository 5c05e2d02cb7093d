"""Speculative decoding on the canonical verifier, exact and MARS, against off / margin / always.

Decodes built-in and ShareGPT prompts greedily with the default model (Gemma 3 270M, bf16, CPU)
in batch sizes 1 and 8 under ``off``, ``margin``, ``always``, speculative decoding with the
prompt-lookup drafter (``always`` + ``speculative=k``, exact) and MARS at two thresholds, and
reports per configuration and batch size: wall and CPU time and their ratio to ``always``,
acceptance rate, tokens per verifier pass, verifier passes, tokens MARS changed, whether the
sequences equal ``always``'s, and whether they are identical in both batch sizes.

Timing is interleaved per batch: every batch of prompts is decoded by each configuration back to
back, the order rotating from batch to batch, so the load of this shared machine hits them alike.

Usage (from the repository root, after building):
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/python/bench_speculative.py \
        --builtin 8 --sharegpt 8 --new-tokens 32 --batch-sizes 8,1 -k 4 --mars 0.5,2.0 --json /tmp/spec.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

import margingate  # noqa: E402


def prompt_texts(builtin: int, sharegpt: int) -> list[str]:
    sets = [margingate.prompt_sets.load(name) for name in ("math", "code", "chat")]
    mixed = [p for group in zip(*sets, strict=False) for p in group][:builtin]
    return mixed + margingate.prompt_sets.load("sharegpt")[:sharegpt]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builtin", type=int, default=8)
    parser.add_argument("--sharegpt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="8,1")
    parser.add_argument("-k", type=int, default=4, help="draft tokens per round")
    parser.add_argument("--mars", default="0.5,2.0", help="comma-separated MARS thresholds")
    parser.add_argument("--json", default=None, help="checkpoint after every batch, final table included")
    parser.add_argument("--report", default=None, help="only report a (partial) --json file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report({c: {int(b): r for b, r in by_bs.items()} for c, by_bs in saved["runs"].items()})
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    taus = [float(t) for t in args.mars.split(",") if t]

    model, tokenizer = margingate.load_default_model(torch.bfloat16, progress=False)
    texts = prompt_texts(args.builtin, args.sharegpt)
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    n = len(encoded)
    configs: dict[str, dict] = {
        "off": {"policy": "off"},
        "margin": {"policy": "margin"},
        "always": {"policy": "always"},
        f"spec k={args.k}": {"policy": "always", "speculative": args.k},
        **{f"mars k={args.k} tau={t}": {"policy": "always", "speculative": args.k, "mars_threshold": t} for t in taus},
    }
    names = list(configs)
    print(
        f"# Gemma 3 270M (bf16, {torch.get_num_threads()} threads, simd {margingate.build_info()['simd']}), "
        f"{n} prompts ({args.builtin} built-in, {args.sharegpt} ShareGPT; {min(map(len, encoded))}-"
        f"{max(map(len, encoded))} tokens), {args.new_tokens} new tokens, batch sizes {batch_sizes}",
        flush=True,
    )
    for kwargs in configs.values():  # untimed warm-up
        margingate.generate(model, encoded[:2], max_new_tokens=3, stop_at_eos=False, **kwargs)
    runs = {c: {b: {"sequences": [None] * n, "rows": [None] * n, "wall": 0.0, "cpu": 0.0, "passes": 0} for b in batch_sizes} for c in names}
    turn = 0
    t_start = time.perf_counter()
    for bs in batch_sizes:
        for start in range(0, n, bs):
            chunk = list(range(start, min(start + bs, n)))
            order = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in order:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                r = margingate.generate(
                    model, [encoded[i] for i in chunk], max_new_tokens=args.new_tokens, batch_size=bs,
                    stop_at_eos=False, **configs[name],
                )
                run = runs[name][bs]
                run["wall"] += time.perf_counter() - wall0
                run["cpu"] += time.process_time() - cpu0
                run["passes"] += r.stats.get("verify_passes", 0)
                for j, i in enumerate(chunk):
                    run["sequences"][i] = r.sequences[j]
                    run["rows"][i] = r.stats["per_row"][j]
            print(f"  batch {bs}: prompts {chunk[0]}-{chunk[-1]} done, {time.perf_counter() - t_start:.0f} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "build": margingate.build_info(), "runs": runs}))
    rows = report(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "build": margingate.build_info(), "rows": rows, "runs": runs}))


def report(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """The table over the prompts decoded in every configuration and batch size (a partial
    checkpoint: those done; the times then cover only the batches done in each batch size)."""
    names = list(runs)
    batch_sizes = list(runs[names[0]])
    n = len(runs[names[0]][batch_sizes[0]]["sequences"])
    done = [i for i in range(n) if all(runs[c][b]["sequences"][i] is not None for c in names for b in batch_sizes)]
    print(f"# {len(done)}/{n} prompts decoded in every configuration and batch size")
    rows = []
    for name in names:
        for bs in batch_sizes:
            run, ref = runs[name][bs], runs["always"][bs]
            per_row = [run["rows"][i] for i in done]
            drafted = sum(r.get("drafted", 0) for r in per_row)
            accepted = sum(r.get("accepted", 0) for r in per_row)
            steps = sum(len(run["sequences"][i]) for i in done)
            row_passes = sum(r.get("passes", 0) for r in per_row)
            rows.append({
                "config": name,
                "batch": bs,
                "wall_s": run["wall"],
                "wall/always": run["wall"] / ref["wall"],
                "cpu/always": run["cpu"] / ref["cpu"],
                "accept": accepted / drafted if drafted else float("nan"),
                "tok/pass": steps / row_passes if row_passes else float("nan"),
                "passes": run["passes"],
                "mars_changed": sum(r.get("mars_changed", 0) for r in per_row),
                "seqs=always": sum(run["sequences"][i] == ref["sequences"][i] for i in done),
                "same_all_bs": sum(all(runs[name][b]["sequences"][i] == run["sequences"][i] for b in batch_sizes) for i in done),
            })
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
