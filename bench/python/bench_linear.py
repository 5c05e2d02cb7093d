"""margingate.linear against torch.nn.functional.linear, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python -m bench.python.bench_linear \
        [--dtypes bf16 fp32] [--m 1 4] [--shapes 640,262144 ...] [--repeats 9]

Decode shapes M in {1, 4, 16, 64} x (K, N) in {(640, 2048), (2048, 640), (1536, 8960),
(4096, 4096)} and prefill M = 512, in each dtype; --shapes/--m replace them (e.g. Gemma 3 270M's
lm head: --dtypes bf16 --m 1 --shapes 640,262144 640,32768). Prints time per call, ratio torch/ours (> 1 =
we are faster), GB/s of weight streamed and GFLOP/s, then the geometric means per regime and the
machine's copy bandwidth for the M = 1 rows.
"""

from __future__ import annotations

import argparse

import torch

import margingate
from bench.python.harness import copy_bandwidth_gbs, geomean, measure, print_table, run_header

SHAPES = [(640, 2048), (2048, 640), (1536, 8960), (4096, 4096)]
DECODE_M = [1, 4, 16, 64]
PREFILL_M = [512]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(
    dtypes: list[str], ms: list[int], repeats: int, min_time_s: float, shapes: list[tuple[int, int]] = SHAPES
) -> list[dict[str, object]]:
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        for K, N in shapes:
            w = torch.randn(N, K).to(dtype)
            for M in ms:
                x = torch.randn(M, K).to(dtype)
                t = measure(
                    {
                        "ours": lambda x=x, w=w: margingate.linear(x, w),
                        "torch": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                    },
                    repeats=repeats,
                    min_time_s=min_time_s,
                )
                wbytes = N * K * w.element_size()
                rows.append(
                    {
                        "dtype": name,
                        "M": M,
                        "K": K,
                        "N": N,
                        "ours_us": t["ours"] * 1e6,
                        "torch_us": t["torch"] * 1e6,
                        "speedup": t["torch"] / t["ours"],
                        "ours_w_GB/s": wbytes / t["ours"] / 1e9,
                        "torch_w_GB/s": wbytes / t["torch"] / 1e9,
                        "ours_GFLOP/s": 2 * M * N * K / t["ours"] / 1e9,
                    }
                )
                r = rows[-1]
                print(
                    f"{name} M={M} K={K} N={N}: ours {r['ours_us']:.1f} us, torch {r['torch_us']:.1f} us, "
                    f"speedup {r['speedup']:.2f}",
                    flush=True,
                )
    return rows


def _shape(text: str) -> tuple[int, int]:
    K, _, N = text.partition(",")
    return int(K), int(N)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--m", nargs="+", type=int, default=DECODE_M + PREFILL_M)
    parser.add_argument(
        "--shapes", nargs="+", type=_shape, default=SHAPES, metavar="K,N", help="weight shapes [N, K] as K,N"
    )
    parser.add_argument("--repeats", type=int, default=9)
    # Long samples: the machines are shared, and a 20 ms sample is easily hit by a preemption.
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per timed sample")
    args = parser.parse_args()
    print(f"linear benchmark: {run_header()}")
    rows = run(args.dtypes, args.m, args.repeats, args.min_time, args.shapes)
    print()
    print_table(rows)
    print()
    for name in args.dtypes:
        decode = [r["speedup"] for r in rows if r["dtype"] == name and r["M"] in DECODE_M]
        prefill = [r["speedup"] for r in rows if r["dtype"] == name and r["M"] in PREFILL_M]
        if decode:
            print(f"{name} decode: geomean speedup {geomean(decode):.3f}, min {min(decode):.3f}")
        if prefill:
            print(f"{name} prefill M=512: geomean speedup {geomean(prefill):.3f}, min {min(prefill):.3f}")
        other = [r["speedup"] for r in rows if r["dtype"] == name and r["M"] not in DECODE_M + PREFILL_M]
        if other:
            print(f"{name} other M: geomean speedup {geomean(other):.3f}, min {min(other):.3f}")
    m1 = [r for r in rows if r["M"] == 1]
    if m1:
        bw = copy_bandwidth_gbs()
        print(f"copy bandwidth (read+write, torch copy_, all threads): {bw:.1f} GB/s")
        for r in m1:
            print(
                f"  M=1 {r['dtype']} K={r['K']} N={r['N']}: weight streamed at {r['ours_w_GB/s']:.1f} GB/s "
                f"= {r['ours_w_GB/s'] / bw:.2f} x copy (torch {r['torch_w_GB/s']:.1f} GB/s)"
            )


if __name__ == "__main__":
    main()
