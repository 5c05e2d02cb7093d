"""One real vLLM engine, one process: runs the requests of a scenario in several batch
configurations and writes what came out (JSON) for the tests to compare.

Run as ``python tests/vllm/engine_run.py MODEL_DIR OUT.json [--seeded] [--default-model]``, with
``MARGINGATE_VLLM`` set or not in the environment (the plugin is loaded once per process, so plugin
on and plugin off are two runs of this script). The engine uses chunked prefill with a 64-token
budget and prefix caching, so every long prompt is split across steps and the second pass over the
prompts hits the prefix cache.

Configurations, greedy (and with ``--seeded`` the same again at T > 0), each recorded per prompt
as (output token ids, the raw logprob of each token): ``cold`` (the first ``--alone`` prompts one
by one, before anything is cached), ``batched`` (all prompts in one ``generate``), ``repeat`` (the
same call again: prefix-cache hits), ``shuffled`` (reversed order, with unrelated filler prompts
between them), ``warm`` (the ``cold`` prompts one by one again, from the prefix cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def prompts_for(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of 10 to 150 tokens; every fourth shares a 70-token prefix with the one
    before it (prefix-cache hits inside a batch)."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for i in range(count):
        if i % 4 == 3:
            prompts.append(prompts[-1][:70] + [rng.randrange(vocab) for _ in range(rng.randrange(5, 40))])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(rng.randrange(10, 150))])
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--alone", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seeded", action="store_true", help="also T = 0.8, top_k = 40, one seed per request")
    parser.add_argument("--margins", action="store_true", help="ask for margins (extra_args tag)")
    parser.add_argument("--budget", type=int, default=64, help="max_num_batched_tokens (chunked prefill)")
    parser.add_argument("--text-prompts", action="store_true", help="the model has a tokenizer: use it")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        args.model, skip_tokenizer_init=not args.text_prompts, dtype="bfloat16", enforce_eager=True,
        max_model_len=512, max_num_batched_tokens=args.budget, max_num_seqs=32, enable_prefix_caching=True, block_size=32, seed=0,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = prompts_for(min(vocab, 32000), args.prompts)

    def params(i: int, seeded: bool, tag: str) -> SamplingParams:
        extra = {"margingate_margins": f"{tag}/p{i}"} if args.margins else None
        if seeded:
            return SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_k=40, seed=1000 + i,
                                  logprobs=0, detokenize=False, ignore_eos=True, extra_args=extra)  # fmt: skip
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0, detokenize=False,
                              ignore_eos=True, extra_args=extra)  # fmt: skip

    def run(indices: list[int], filler: int = 0, *, seeded: bool, tag: str) -> tuple[dict[int, dict], float]:
        requests = [{"prompt_token_ids": prompts[i]} for i in indices]
        sampling = [params(i, seeded, tag) for i in indices]
        rng = random.Random(filler)
        for _ in range(filler):  # unrelated requests sharing the batch
            requests.append({"prompt_token_ids": [rng.randrange(min(vocab, 32000)) for _ in range(rng.randrange(5, 120))]})
            sampling.append(SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False, ignore_eos=True))
        t = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - t
        result = {}
        for i, o in zip(indices, outputs, strict=False):
            completion = o.outputs[0]
            logprobs = [d[tok].logprob for tok, d in zip(completion.token_ids, completion.logprobs, strict=True)]
            result[i] = {"tokens": list(completion.token_ids), "logprobs": logprobs,
                         "prompt": list(o.prompt_token_ids), "request_id": o.request_id}  # fmt: skip
        return result, elapsed

    everything = list(range(len(prompts)))
    out: dict = {"load_s": load_s, "plugin": os.environ.get("MARGINGATE_VLLM", ""), "runs": {}, "seconds": {},
                 "errors": {}}  # fmt: skip
    for mode in ("greedy", "seeded") if args.seeded else ("greedy",):
        try:
            run_mode(mode, everything, args.alone, out, run)
        except Exception as error:  # the plugin-off control's seeded run can kill vLLM's engine
            out["errors"][mode] = f"{type(error).__name__}: {error}"[:2000]
            break
        finally:
            with open(args.out, "w") as f:
                json.dump(out, f)


def run_mode(mode: str, everything: list[int], alone_count: int, out: dict, run) -> None:
    seeded = mode == "seeded"

    def alone(name: str) -> None:
        results: dict[int, dict] = {}
        t = time.perf_counter()
        for i in range(alone_count):
            results.update(run([i], seeded=seeded, tag=f"{mode}/{name}")[0])
        out["runs"][f"{mode}/{name}"], out["seconds"][f"{mode}/{name}"] = results, time.perf_counter() - t

    alone("cold")  # the first time these prompts are seen: no prefix-cache hit
    for name, indices, filler in (
        ("batched", everything, 0),
        ("repeat", everything, 0),  # every prompt's full blocks now come from the prefix cache
        ("shuffled", everything[::-1], 7),
    ):
        key = f"{mode}/{name}"
        out["runs"][key], out["seconds"][key] = run(indices, filler, seeded=seeded, tag=key)
    alone("warm")


if __name__ == "__main__":
    main()
