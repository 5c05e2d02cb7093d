"""The one Python benchmark harness: warm-up, repeats, median, ratio to the vendor kernel.

Every Python benchmark times its candidate and its baseline with ``measure`` in the same run,
alternating the two, and prints rows through ``print_table``. Ratios are what we report:
these machines are shared and noisy, absolute times are not comparable across runs.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence


def run_header() -> str:
    """The facts every benchmark prints first, so a figure never travels without its ISA: torch,
    threads, the SIMD level margingate's CPU kernels run at and why (detected, or capped by
    MARGINGATE_SIMD), and OMP_WAIT_POLICY (PASSIVE keeps torch's baselines fair on a busy machine)."""
    import torch

    import margingate

    info = margingate.build_info()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, simd={info['simd']} "
        f"({info['simd_reason']}; CPU supports {info['simd_supported']}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def _calls_for(fn: Callable[[], object], min_time_s: float) -> int:
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time_s or calls >= 1 << 16:
            return calls
        calls *= 2


def measure(
    fns: dict[str, Callable[[], object]], *, repeats: int = 9, min_time_s: float = 0.02, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved (a, b, a, b, ...) so that
    machine noise hits every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {name: _calls_for(fn, min_time_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def print_table(rows: list[dict[str, object]], columns: Sequence[str] | None = None) -> None:
    """Prints dict rows as an aligned text table (floats with 3 significant decimals)."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    """The machine's measured copy bandwidth (read + write bytes per second, GB/s) with torch's
    own copy on all threads: the roof that memory-bound kernels are judged against."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, repeats=5, min_time_s=0.05)["copy"]
    return 2 * nbytes / t / 1e9
