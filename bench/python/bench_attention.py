"""margingate.attention vs torch.nn.functional.scaled_dot_product_attention, same inputs, one run.

    PYTHONPATH=python python bench/python/bench_attention.py [--quick] [--decode-only|--prefill-only]

Decode: Tq=1, B in {1, 8, 32}, Tk in {512, 4096}, Hq/Hkv in {8/1, 32/8}, D in {64, 128, 256},
bf16, no padding (SDPA without a mask then computes exactly the same attention). Prefill:
Tq=Tk=1024 with is_causal=True. SDPA gets enable_gqa=True (no K/V copies on our side either).
Reported: median times, speed ratio (SDPA time / ours, > 1 = we are faster), the K/V bytes our
decode streams per second, and the machine's copy bandwidth as the roof.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import copy_bandwidth_gbs, geomean, measure, print_table, run_header  # noqa: E402

import margingate  # noqa: E402


def make(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=gen).to(dtype)
    return q, k, v


def run_case(B, Hq, Hkv, Tq, Tk, D, dtype, repeats):
    q, k, v = make(B, Hq, Hkv, Tq, Tk, D, dtype)
    causal = Tq > 1  # Tq == 1 at the end of the keys sees every key: no mask needed by SDPA
    # Same answer first (the thing timed is the thing checked).
    ours = margingate.attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    err = (ours.float() - theirs.float()).abs().max().item()
    assert err < 0.05, f"margingate and SDPA disagree by {err}"
    t = measure(
        {
            "margingate": lambda: margingate.attention(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
        },
        repeats=repeats,
        min_time_s=0.02,
        warmup=1,
    )
    kv_bytes = 2 * k.numel() * k.element_size()
    pairs = Tq * Tk - (Tq * (Tq - 1) // 2 if causal else 0)  # visible (query, key) pairs per head
    return {
        "B": B,
        "Hq/Hkv": f"{Hq}/{Hkv}",
        "Tq": Tq,
        "Tk": Tk,
        "D": D,
        "ours_ms": t["margingate"] * 1e3,
        "sdpa_ms": t["sdpa"] * 1e3,
        "speed_vs_sdpa": t["sdpa"] / t["margingate"],
        "kv_GB/s": kv_bytes / t["margingate"] / 1e9,
        "GFLOP/s": 4 * B * Hq * pairs * D / t["margingate"] / 1e9,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (both sides)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeats = 3 if args.quick else 5
    print(f"attention benchmark: {run_header()}, dtype={args.dtype}")
    roof = copy_bandwidth_gbs()
    print(f"copy bandwidth (read+write, torch copy_): {roof:.1f} GB/s")

    if not args.prefill_only:
        rows = []
        Bs = [1, 32] if args.quick else [1, 8, 32]
        Ds = [128] if args.quick else [64, 128, 256]
        for B in Bs:
            for Tk in (512, 4096):
                for Hq, Hkv in ((8, 1), (32, 8)):
                    for D in Ds:
                        rows.append(run_case(B, Hq, Hkv, 1, Tk, D, dtype, repeats))
        print("\ndecode (Tq=1):")
        print_table(rows)
        print(
            f"decode geomean speed vs SDPA: {geomean([r['speed_vs_sdpa'] for r in rows]):.2f}x "
            f"(target >= 0.8); K/V stream median {sorted(r['kv_GB/s'] for r in rows)[len(rows) // 2]:.1f} "
            f"GB/s, max {max(r['kv_GB/s'] for r in rows):.1f} GB/s vs copy {roof:.1f} GB/s"
        )

    if not args.decode_only:
        rows = []
        shapes = (
            [(1, 32, 8, 128)]
            if args.quick
            else [(1, 32, 8, 128), (1, 8, 1, 64), (1, 8, 1, 256), (2, 16, 4, 64)]
        )
        for B, Hq, Hkv, D in shapes:
            rows.append(run_case(B, Hq, Hkv, 1024, 1024, D, dtype, repeats))
        print("\nprefill (Tq=Tk=1024, causal):")
        print_table(rows)
        print(
            f"prefill geomean speed vs SDPA: {geomean([r['speed_vs_sdpa'] for r in rows]):.2f}x (target >= 0.5)"
        )


if __name__ == "__main__":
    main()
