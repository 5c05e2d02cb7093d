"""How often sample_margin's two margins fall below a gate threshold on the default model.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python -m bench.python.bench_sampling_gate [--prompts 16] [--steps 48]

Decodes each prompt alone with the fast path (bf16), sampling with ``sample_margin`` at T = 0.7 and
top_k = 50 (seed = prompt index, position = sequence position), and at every step evaluates on the
same logits: the greedy margin, the noised margin without truncation, with top_k = 50 and with
min_p = 0.05, their cut-off margins, and for comparison the bare cut-off distances (x_(50) - x_(51);
min |x_i - x_max - T ln 0.05|). Prints the percentage of steps below the threshold (default 0.5,
the default model's greedy threshold): a preview of the trigger rates a sampling gate would see.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import margingate
from margingate import prompt_sets


def run(prompts: int, steps: int, threshold: float, temperature: float = 0.7) -> dict[str, float]:
    from transformers import DynamicCache

    model, tokenizer = margingate.load_default_model()
    model = model.to(torch.bfloat16).eval()
    below: dict[str, list[bool]] = {}

    def record(name: str, value: float) -> None:
        below.setdefault(name, []).append(value < threshold)

    log_bound = temperature * math.log(0.05)
    with torch.no_grad():
        for i, prompt in enumerate(prompt_sets.load("all")[:prompts]):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for step in range(steps):
                logits = out.logits[:, -1].float()
                args = (logits, torch.tensor([i]), torch.tensor([ids.shape[1] + step]), torch.tensor([temperature]))
                plain = margingate.sample_margin(*args)
                top_k = margingate.sample_margin(*args, torch.tensor([50]))
                min_p = margingate.sample_margin(*args, None, torch.tensor([0.05]))
                top = logits.topk(51).values[0]
                record("greedy margin", margingate.margin(logits)[2].item())
                record("noised margin, no truncation", plain[2].item())
                record("top_k=50: margin", top_k[2].item())
                record("top_k=50: cutoff_margin", top_k[3].item())
                record("top_k=50: either (the gate)", min(top_k[2].item(), top_k[3].item()))
                record("top_k=50: bare x_(50) - x_(51)", (top[49] - top[50]).item())
                record("min_p=0.05: margin", min_p[2].item())
                record("min_p=0.05: cutoff_margin", min_p[3].item())
                record("min_p=0.05: either (the gate)", min(min_p[2].item(), min_p[3].item()))
                record("min_p=0.05: bare distance", ((logits[0] - logits.max()) - log_bound).abs().min().item())
                out = model(input_ids=top_k[0].view(1, 1), past_key_values=cache, use_cache=True)
    return {name: 100.0 * sum(v) / len(v) for name, v in below.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    start = time.time()
    rates = run(args.prompts, args.steps, args.threshold)
    print(f"default model, {args.prompts} prompts x {args.steps} steps, T=0.7, threshold {args.threshold}, "
          f"simd={margingate.build_info()['simd']}, {time.time() - start:.0f} s")
    for name, rate in rates.items():
        print(f"{name:34s} {rate:5.1f} % of steps below the threshold")


if __name__ == "__main__":
    main()
