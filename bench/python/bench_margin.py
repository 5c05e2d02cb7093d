"""margin vs torch.topk(logits, 2) + subtraction, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python -m bench.python.bench_margin [--quick]
    (MARGINGATE_SIMD=avx2 ... runs the AVX2 kernels on an AVX-512 machine)

Prints one row per (dtype, B, V): median µs of both, the speed-up, and margin's achieved GB/s
(bytes of logits read per second) next to the machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch

import margingate

from .harness import copy_bandwidth_gbs, geomean, measure, print_table, run_header


def torch_margin(logits: torch.Tensor):
    values, indices = torch.topk(logits, 2, dim=-1)
    return indices[:, 0], indices[:, 1], (values[:, 0] - values[:, 1]).float()


def run(quick: bool = False) -> list[dict[str, object]]:
    rows = []
    batches = [1, 64] if quick else [1, 8, 64]
    vocabs = [32000, 262144] if quick else [32000, 128256, 262144]
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in vocabs:
            for batch in batches:
                logits = (torch.randn(batch, vocab) * 4).to(dtype)
                t = measure(
                    {"margingate": lambda x=logits: margingate.margin(x), "torch": lambda x=logits: torch_margin(x)},
                    repeats=5 if quick else 11,
                )
                nbytes = logits.numel() * logits.element_size()
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "B": batch,
                        "V": vocab,
                        "margingate_us": t["margingate"] * 1e6,
                        "torch_topk_us": t["torch"] * 1e6,
                        "speedup": t["torch"] / t["margingate"],
                        "GB/s": nbytes / t["margingate"] / 1e9,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = parser.parse_args()
    print(f"margin benchmark: {run_header()}")
    rows = run(args.quick)
    print_table(rows)
    speedups = [float(r["speedup"]) for r in rows]
    print(f"geomean speed-up {geomean(speedups):.2f}x, min {min(speedups):.2f}x; "
          f"copy bandwidth {copy_bandwidth_gbs():.1f} GB/s (read+write)")


if __name__ == "__main__":
    main()
