"""vLLM on CPU with the margingate plugin vs without: decode and prefill throughput, one run.

Two vLLM engines on the same model, each in its own process (the plugin is process-wide, so
``MARGINGATE_VLLM=invariant`` is set in one child and unset in the other), both loaded before any
timing; the parent then alternates them request batch by request batch (the order rotating every
repeat), so the load of this shared machine hits both alike, and reports medians:

- decode tokens/s at each batch size: B fresh 32-token prompts, ``max_tokens = 1 + N`` minus the
  same with ``max_tokens = 1`` (the prefill and first token), divided into ``B * N`` tokens;
- prefill tokens/s: 8 fresh 256-token prompts, ``max_tokens = 1``.

Prefix caching is off (every prompt is fresh anyway), greedy sampling, ``enforce_eager``, bf16.
The header names torch, the threads and the SIMD level margingate's kernels run at.

Without vLLM importable it prints that it is skipped and exits 0 (``margingate bench`` runs every
script). Usage (the vLLM venv, see the README; the default model is Gemma 3 270M, converted once):
    OMP_WAIT_POLICY=PASSIVE python bench/python/bench_vllm.py --batch-sizes 1,8,32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.python.harness import run_header  # noqa: E402


def _engine(conn, plugin: bool, model: str, budget: int) -> None:
    os.environ.pop("MARGINGATE_VLLM", None)
    if plugin:
        os.environ["MARGINGATE_VLLM"] = "invariant"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=64,
              max_num_batched_tokens=budget, enable_prefix_caching=False, seed=0)  # fmt: skip
    vocab = min(llm.llm_engine.model_config.get_vocab_size(), 32000)
    rng = random.Random(int(plugin))

    def prompts(count: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(count)]

    def timed(requests: list[dict], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - t

    timed(prompts(4, 64), 8)  # warm-up
    conn.send("ready")
    while (message := conn.recv()) is not None:
        kind, batch, new_tokens = message
        if kind == "decode":
            first = timed(prompts(batch, 32), 1)
            full = timed(prompts(batch, 32), 1 + new_tokens)
            conn.send(batch * new_tokens / max(full - first, 1e-9))
        else:
            conn.send(batch * 256 / timed(prompts(batch, 256), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint directory (default: margingate's default model)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, 16 new tokens, one repeat")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:  # `margingate bench` runs every script: not a failure
        print('bench_vllm: skipped: vLLM is not installed here (its own venv: README, "Deterministic vLLM on CPU")')
        return
    if args.quick:
        args.batch_sizes, args.new_tokens, args.repeats = "1,8", 16, 1
    if args.model is None:
        from margingate.models import default_model_dir

        args.model = str(default_model_dir())
    import vllm

    print(run_header())
    print(f"vllm {vllm.__version__}, model {args.model}")
    context = multiprocessing.get_context("spawn")
    engines = {}
    for name, plugin in (("vllm", False), ("margingate", True)):
        parent, child = context.Pipe()
        process = context.Process(target=_engine, args=(child, plugin, args.model, args.budget), daemon=True)
        process.start()
        engines[name] = (parent, process)
    for name, (conn, _) in engines.items():
        if conn.recv() != "ready":
            raise SystemExit(f"bench_vllm: the {name} engine did not start")

    cases = [("decode", int(b)) for b in args.batch_sizes.split(",")] + [("prefill", 8)]
    samples: dict[tuple[str, int, str], list[float]] = {}
    order = list(engines)
    for repeat in range(args.repeats):
        for kind, batch in cases:
            for name in order[repeat % 2 :] + order[: repeat % 2]:
                conn = engines[name][0]
                conn.send((kind, batch, args.new_tokens))
                samples.setdefault((kind, batch, name), []).append(conn.recv())
    for conn, process in engines.values():
        conn.send(None)
        process.join(timeout=60)

    rows = []
    print(f"\n{'case':<16}{'vLLM tok/s':>12}{'plugin tok/s':>14}{'ratio':>8}")
    for kind, batch in cases:
        base = statistics.median(samples[(kind, batch, "vllm")])
        ours = statistics.median(samples[(kind, batch, "margingate")])
        label = f"{kind} b={batch}"
        print(f"{label:<16}{base:>12.1f}{ours:>14.1f}{ours / base:>8.2f}")
        rows.append({"case": kind, "batch": batch, "vllm_tok_s": base, "plugin_tok_s": ours, "ratio": ours / base})
    if args.json:
        Path(args.json).write_text(json.dumps({"header": run_header(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
