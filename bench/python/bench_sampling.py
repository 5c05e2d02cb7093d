"""sample_margin vs sampling in plain torch (softmax, Gumbel/exponential noise, topk), one run.

    PYTHONPATH=python python -m bench.python.bench_sampling [--quick] [--dtypes bf16 fp32]

Per (dtype, truncation, B, V): median µs of ``margingate.sample_margin`` (token, noised runner-up,
margin and cut-off margin, noise never materialised) and of ``torch_sample`` from
``tests/reference_sampling.py`` (x / T, top-k mask via ``torch.topk``, softmax, min-p mask,
``exponential_`` noise, argmax: the token alone), timed interleaved; ``speedup`` = torch / ours.
"""

from __future__ import annotations

import argparse

import torch
from tests.reference_sampling import torch_sample

import margingate

from .harness import geomean, measure, print_table

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TRUNCATIONS = {"none": (0, 0.0), "top_k=50": (50, 0.0), "min_p=0.05": (0, 0.05)}


def run(quick: bool = False, dtypes: tuple[str, ...] = ("bf16",)) -> list[dict[str, object]]:
    rows = []
    batches = [1, 64] if quick else [1, 8, 64]
    vocabs = [262144] if quick else [128256, 262144]
    temperature = 0.7
    for name in dtypes:
        dtype = DTYPES[name]
        for truncation, (top_k, min_p) in TRUNCATIONS.items():
            for vocab in vocabs:
                for batch in batches:
                    g = torch.Generator().manual_seed(batch + vocab)
                    # LLM-like logits: a wide body and a few large values on top.
                    logits = (torch.randn(batch, vocab, generator=g) * 3).to(dtype)
                    seed = torch.arange(batch, dtype=torch.int64)
                    position = torch.full((batch,), 17, dtype=torch.int64)
                    temps = torch.full((batch,), temperature)
                    k = torch.full((batch,), top_k, dtype=torch.int64) if top_k else None
                    p = torch.full((batch,), min_p) if min_p else None
                    t = measure(
                        {
                            "margingate": lambda x=logits, s=seed, q=position, T=temps, k=k, p=p: (
                                margingate.sample_margin(x, s, q, T, k, p)
                            ),
                            "torch": lambda x=logits, k=top_k, p=min_p: torch_sample(x, temperature, k, p),
                        },
                        repeats=5 if quick else 9,
                    )
                    rows.append(
                        {
                            "dtype": name,
                            "truncation": truncation,
                            "B": batch,
                            "V": vocab,
                            "margingate_us": t["margingate"] * 1e6,
                            "torch_us": t["torch"] * 1e6,
                            "speedup": t["torch"] / t["margingate"],
                        }
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    args = parser.parse_args()
    print(
        f"sampling benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"simd={margingate.build_info()['simd']}, T=0.7"
    )
    rows = run(args.quick, tuple(args.dtypes))
    print_table(rows)
    speedups = [float(r["speedup"]) for r in rows]
    print(f"geomean speed-up {geomean(speedups):.2f}x, min {min(speedups):.2f}x")


if __name__ == "__main__":
    main()
