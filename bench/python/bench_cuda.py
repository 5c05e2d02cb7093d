"""GPU benchmark of the CUDA kernels against the vendor kernels, side by side in one run.

    PYTHONPATH=python python -m bench.python.bench_cuda [--ops linear,margin,attention] [--quick]

- linear (bf16): margingate.linear vs cuBLAS (torch.nn.functional.linear) at the decode shapes of
  Llama-3.1-8B and Qwen2.5-7B, M in {1, 8, 32, 128}, and at M = 4096.
  Targets: geomean >= 0.9x cuBLAS at decode, >= 0.8x at M = 4096.
- margin (bf16): B = 64, V = 128256 / 152064; achieved read bandwidth vs the device's measured copy
  bandwidth (torch copy_, read + write bytes). Target: >= 80 %.
- attention decode (bf16): margingate.attention vs SDPA with the flash backend. Target: >= 0.8x.

Times are CUDA-event medians, candidates interleaved (a, b, a, b, ...). Ratios are
vendor_time / margingate_time (> 1: margingate is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.python.harness import geomean, print_table

# (model, layer, K, N) of the dense projections (q/k/v fused, o, gate/up fused, down).
LINEAR_SHAPES = [
    ("llama3.1-8b", "qkv", 4096, 6144),
    ("llama3.1-8b", "o", 4096, 4096),
    ("llama3.1-8b", "gate_up", 4096, 28672),
    ("llama3.1-8b", "down", 14336, 4096),
    ("qwen2.5-7b", "qkv", 3584, 4608),
    ("qwen2.5-7b", "o", 3584, 3584),
    ("qwen2.5-7b", "gate_up", 3584, 37888),
    ("qwen2.5-7b", "down", 18944, 3584),
]
DECODE_M = [1, 8, 32, 128]
PREFILL_M = 4096
# (model, Hq, Hkv, D)
ATTENTION_MODELS = [("llama3.1-8b", 32, 8, 128), ("qwen2.5-7b", 28, 4, 128)]
ATTENTION_BATCH_TK = [(1, 1024), (1, 8192), (8, 4096), (32, 2048), (64, 4096)]
MARGIN_VOCABS = [128256, 152064]


def cuda_measure(
    fns: dict[str, Callable[[], object]], *, repeats: int = 15, min_time_ms: float = 5.0
) -> dict[str, float]:
    """Median seconds per call of each function, from CUDA events, interleaved."""
    for fn in fns.values():  # warm-up (also autotuning / lazy init of the vendor kernels)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        n = 1
        while True:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            if start.elapsed_time(end) >= min_time_ms or n >= 1 << 14:
                calls[name] = n
                break
            n *= 2
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls[name]):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_linear(quick: bool) -> None:
    rows, decode_ratios, prefill_ratios = [], [], []
    shapes = LINEAR_SHAPES[:2] if quick else LINEAR_SHAPES
    for model, layer, K, N in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        for M in [*DECODE_M, PREFILL_M]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t = cuda_measure(
                {
                    "margingate": lambda x=x, w=w: torch.ops.margingate.linear.default(x, w, None),
                    "cublas": lambda x=x, w=w: F.linear(x, w),
                }
            )
            ratio = t["cublas"] / t["margingate"]
            (prefill_ratios if M == PREFILL_M else decode_ratios).append(ratio)
            flops = 2 * M * N * K
            weight_gbs = N * K * 2 / t["margingate"] / 1e9
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "M": M,
                    "K": K,
                    "N": N,
                    "margingate_us": t["margingate"] * 1e6,
                    "cublas_us": t["cublas"] * 1e6,
                    "ratio": ratio,
                    "TFLOP/s": flops / t["margingate"] / 1e12,
                    "weight_GB/s": weight_gbs,
                }
            )
    print("\n## linear bf16 (ratio = cuBLAS time / margingate time)")
    print_table(rows)
    print(f"geomean ratio at decode M in {DECODE_M}: {geomean(decode_ratios):.3f} (target >= 0.9)")
    print(f"geomean ratio at M = {PREFILL_M}: {geomean(prefill_ratios):.3f} (target >= 0.8)")


def device_copy_gbs(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    t = cuda_measure({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * nbytes / t / 1e9


def bench_margin(quick: bool) -> None:
    copy = device_copy_gbs()
    rows = []
    for V in MARGIN_VOCABS[:1] if quick else MARGIN_VOCABS:
        logits = torch.randn(64, V, device="cuda", dtype=torch.bfloat16)
        t = cuda_measure(
            {
                "margingate": lambda logits=logits: torch.ops.margingate.margin.default(logits),
                "torch_topk": lambda logits=logits: torch.topk(logits, 2, dim=1),
            }
        )
        gbs = logits.numel() * 2 / t["margingate"] / 1e9
        rows.append(
            {
                "B": 64,
                "V": V,
                "margingate_us": t["margingate"] * 1e6,
                "topk_us": t["torch_topk"] * 1e6,
                "GB/s": gbs,
                "copy_GB/s": copy,
                "fraction_of_copy": gbs / copy,
            }
        )
    print("\n## margin bf16 (read bandwidth vs the device copy bandwidth; target >= 0.8)")
    print_table(rows)


def bench_attention(quick: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, ratios = [], []
    configs = ATTENTION_BATCH_TK[:2] if quick else ATTENTION_BATCH_TK
    for model, Hq, Hkv, D in ATTENTION_MODELS:
        for B, Tk in configs:
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)

            def flash(q=q, k=k, v=v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            try:
                flash()
                baseline = "flash(gqa)"
            except RuntimeError:  # an older flash without GQA: expand K/V outside the timing
                k_full = k.repeat_interleave(Hq // Hkv, dim=1)
                v_full = v.repeat_interleave(Hq // Hkv, dim=1)

                def flash(q=q, k=k_full, v=v_full):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v)

                baseline = "flash(expanded kv)"
            t = cuda_measure(
                {
                    "margingate": lambda q=q, k=k, v=v: torch.ops.margingate.attention.default(
                        q, k, v, None, None
                    ),
                    "sdpa_flash": flash,
                }
            )
            ratio = t["sdpa_flash"] / t["margingate"]
            ratios.append(ratio)
            kv_gbs = 2 * B * Hkv * Tk * D * 2 / t["margingate"] / 1e9
            rows.append(
                {
                    "model": model,
                    "B": B,
                    "Tk": Tk,
                    "baseline": baseline,
                    "margingate_us": t["margingate"] * 1e6,
                    "flash_us": t["sdpa_flash"] * 1e6,
                    "ratio": ratio,
                    "kv_GB/s": kv_gbs,
                }
            )
    print("\n## attention decode bf16 (Tq = 1; ratio = SDPA flash time / margingate time)")
    print_table(rows)
    print(f"geomean ratio: {geomean(ratios):.3f} (target >= 0.8)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", default="linear,margin,attention")
    parser.add_argument("--quick", action="store_true", help="a few shapes only (smoke test)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
            "this benchmark only runs on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    import margingate

    if not margingate.build_info()["cuda"]:
        print(
            "bench_cuda: this margingate build has no CUDA kernels (build_info()['cuda'] is False); "
            "rebuild with nvcc available against a CUDA torch.",
            file=sys.stderr,
        )
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ops = set(args.ops.split(","))
    if "linear" in ops:
        bench_linear(args.quick)
    if "margin" in ops:
        bench_margin(args.quick)
    if "attention" in ops:
        bench_attention(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
