"""Batch-invariant mode vs the default path on the real Gemma 3 270M (bf16, CPU), side by side.

    PYTHONPATH=python:. python bench/python/bench_batch_invariant.py            # timings
    PYTHONPATH=python:. python bench/python/bench_batch_invariant.py --row-ops  # the measurement
                                                                               # behind the mode
    PYTHONPATH=python:. python bench/python/bench_batch_invariant.py --check    # contract on the
                                                                               # real model
    PYTHONPATH=python:. python bench/python/bench_batch_invariant.py --overhead --threads 1 --cpu-time
                                                                   # the mode's Python cost per step

Timings: a prefill of ``--prompt`` tokens (batch 1, every position's logits, as a canonical
prefill computes them), then one decode step at batch 1, 8 and 32 over that cached context.
``default`` is ``model(...)`` (sdpa, MKL/oneDNN), ``invariant`` is ``margingate.canonical_forward``
(batch_invariant() + the "margingate" attention). Both are timed interleaved in one run with
``bench.python.harness.measure``; the ratio invariant / default is what to compare (the machine is
shared: absolute times move between runs).

``--row-ops``: which row-wise aten ops give a row different bits alone than inside a batch (or a
transposed head view) with the default kernels on this machine, and whether the mode fixes it.
This is the measurement that decides which ops ``batch_invariant()`` re-routes.

``--overhead``: one decode step of the same model (sdpa switched to nothing else) timed plain,
under a pass-through ``TorchDispatchMode``, under a pass-through ``TorchFunctionMode``, and under
``batch_invariant(model)``: the cost of each interception mechanism per step, the measurement
behind the mode's design (``invariant_mode.py``). ``--baseline-module FILE`` adds a column for
an older implementation of the mode (a ``batch_invariant()`` context in FILE, loaded as a module
of the package, e.g. ``git show 74a67fa:python/margingate/batch_invariant.py > /tmp/old.py``),
run with the model switched to the "margingate" attention.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import margingate
from bench.python.harness import measure, print_table
from margingate import hf_attention, hf_compat
from margingate.batching import position_ids as position_ids_from_mask


def _measure_cpu(fns, *, repeats: int, warmup: int) -> dict[str, float]:
    """Median process CPU seconds per call, interleaved. With one thread this removes the time
    other tenants of a shared machine hold the core (wall time then mostly measures them)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            samples[name].append(time.process_time() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def _default_step(model, ids, mask, cache):
    return hf_compat.forward(model, ids, mask, position_ids_from_mask(mask, ids.shape[1]), cache)


def _rewind(cache: DynamicCache, length: int) -> None:
    """Drops the decode step's column again so every timed call sees the same context."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _expand_cache(cache: DynamicCache, batch: int) -> DynamicCache:
    """A batch-``batch`` cache holding the batch-1 prompt in every row (fresh tensors)."""
    expanded = DynamicCache()
    for i, layer in enumerate(cache.layers):
        expanded.update(
            layer.keys.expand(batch, -1, -1, -1).contiguous(),
            layer.values.expand(batch, -1, -1, -1).contiguous(),
            i,
        )
    return expanded


def bench_model(args) -> None:
    model, _ = margingate.load_default_model(dtype=torch.bfloat16, progress=False)
    model.eval()
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(10, vocab, (1, args.prompt))
    prompt_mask = torch.ones_like(prompt)
    rows = []
    if args.cpu_time:

        def timer(fns, *, repeats, min_time_s, warmup):
            return _measure_cpu(fns, repeats=max(repeats, 5), warmup=warmup)

    else:
        timer = measure

    with torch.no_grad():

        def prefill_default():
            return _default_step(model, prompt, prompt_mask, DynamicCache())

        def prefill_invariant():
            return margingate.canonical_forward(
                model, prompt, attention_mask=prompt_mask, cache=DynamicCache()
            )

        t = timer(
            {"default": prefill_default, "invariant": prefill_invariant},
            repeats=args.repeats,
            min_time_s=0.0,
            warmup=1,
        )
        rows.append(_row("prefill", 1, args.prompt, t))

        base = DynamicCache()
        _default_step(model, prompt, prompt_mask, base)
        for batch in args.batches:
            caches = {"default": _expand_cache(base, batch), "invariant": _expand_cache(base, batch)}
            token = torch.randint(10, vocab, (batch, 1))
            mask = torch.ones((batch, args.prompt + 1), dtype=torch.long)

            def decode_default(cache=caches["default"], token=token, mask=mask):
                _rewind(cache, args.prompt)
                return _default_step(model, token, mask, cache)

            def decode_invariant(cache=caches["invariant"], token=token, mask=mask):
                _rewind(cache, args.prompt)
                return margingate.canonical_forward(model, token, attention_mask=mask, cache=cache)

            t = timer(
                {"default": decode_default, "invariant": decode_invariant},
                repeats=args.repeats,
                min_time_s=0.2,
                warmup=2,
            )
            rows.append(_row("decode", batch, args.prompt, t))

    print(
        f"Gemma 3 270M bf16, {'process CPU time' if args.cpu_time else 'wall time'}, "
        f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, simd {margingate.build_info().get('simd')}"
    )
    print_table(rows, ["phase", "batch", "context", "default_ms", "invariant_ms", "ratio"])


def _row(phase: str, batch: int, context: int, t: dict[str, float]) -> dict[str, object]:
    return {
        "phase": phase,
        "batch": batch,
        "context": context,
        "default_ms": t["default"] * 1e3,
        "invariant_ms": t["invariant"] * 1e3,
        "ratio": t["invariant"] / t["default"],
    }


# --------------------------------------------------------------------------- mechanism overhead
def _passthrough_modes():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThroughDispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **kwargs) if kwargs else func(*args)

    class PassThroughFunction(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **kwargs) if kwargs else func(*args)

    return PassThroughDispatch, PassThroughFunction


def _load_baseline(path: str):
    """An older mode implementation, imported as a submodule of margingate (relative imports work)."""
    spec = importlib.util.spec_from_file_location("margingate._baseline_mode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "_install_attention_guard"):
        module._install_attention_guard = lambda install: None  # it patched transformers' mapping
    return module


def bench_overhead(args) -> None:
    model, _ = margingate.load_default_model(dtype=torch.bfloat16, progress=False)
    model.eval()
    torch.manual_seed(0)
    prompt = torch.randint(10, model.config.vocab_size, (1, args.prompt))
    base = DynamicCache()
    with torch.no_grad():
        _default_step(model, prompt, torch.ones_like(prompt), base)
    dispatch_mode, function_mode = _passthrough_modes()
    contexts = {
        "default": contextlib.nullcontext,
        "dispatch_passthrough": dispatch_mode,
        "function_passthrough": function_mode,
        "mode": lambda: margingate.batch_invariant(model),
    }
    if args.baseline_module:
        baseline = _load_baseline(args.baseline_module)

        def baseline_context():
            stack = contextlib.ExitStack()
            stack.enter_context(hf_attention.use_margingate_attention(model))
            stack.enter_context(hf_attention.canonical_attention())
            stack.enter_context(baseline.batch_invariant())
            return stack

        contexts["baseline"] = baseline_context
    rows = []
    for batch in args.batches:
        token = torch.randint(10, model.config.vocab_size, (batch, 1))
        mask = torch.ones((batch, args.prompt + 1), dtype=torch.long)
        fns = {}
        for name, context in contexts.items():
            cache = _expand_cache(base, batch)

            def step(cache=cache, context=context, token=token, mask=mask):
                _rewind(cache, args.prompt)
                with torch.no_grad(), context():
                    return _default_step(model, token, mask, cache)

            fns[name] = step
        if "baseline" in fns:
            # The two implementations must compute the same canonical logits.
            assert torch.equal(fns["baseline"](), fns["mode"]()), "baseline and mode logits differ"
        if args.cpu_time:
            t = _measure_cpu(fns, repeats=max(args.repeats, 5), warmup=2)
        else:
            t = measure(fns, repeats=args.repeats, min_time_s=0.2, warmup=2)
        for name, seconds in t.items():
            rows.append(
                {
                    "batch": batch,
                    "context": args.prompt,
                    "path": name,
                    "ms": seconds * 1e3,
                    "minus_default_ms": (seconds - t["default"]) * 1e3,
                }
            )
    print(
        f"Gemma 3 270M bf16 decode step, {'process CPU time' if args.cpu_time else 'wall time'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, simd {margingate.build_info().get('simd')}"
    )
    print_table(rows, ["batch", "context", "path", "ms", "minus_default_ms"])


# --------------------------------------------------------------------------- real-model checks
CHECK_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Explain why the sky is blue in two sentences.",
    "1 + 1 =",
]


def check_real_model(args) -> None:
    """The test-suite contract on the real model: invariance (bitwise) and accuracy vs fp32."""
    m16, tokenizer = margingate.load_default_model(dtype=torch.bfloat16, progress=False)
    m32, _ = margingate.load_default_model(dtype=torch.float32, progress=False)
    seqs = [tokenizer(p).input_ids for p in CHECK_PROMPTS]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    real = mask.bool()
    batched = margingate.canonical_forward(m16, ids, attention_mask=mask)
    alone_ok = [
        torch.equal(
            margingate.canonical_forward(
                m16, torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)
            )[0],
            batched[i, width - len(s) :],
        )
        for i, s in enumerate(seqs)
    ]
    cache = DynamicCache()
    parts = [
        margingate.canonical_forward(m16, ids[:, :-3], attention_mask=mask[:, :-3], cache=cache)
    ]
    for j in range(width - 3, width):
        parts.append(
            margingate.canonical_forward(m16, ids[:, j : j + 1], attention_mask=mask[:, : j + 1], cache=cache)
        )
    decode_ok = torch.equal(torch.cat(parts, 1)[real], batched[real])
    rows = torch.tensor([2, 0])
    # the verifier: rows 2 and 0 replayed from two positions back over the shared cache
    from margingate.verifier import Verifier

    verified = Verifier(m16, cache, len(seqs), canonical_upto=width - 2).verify_(ids, mask, rows)
    rows_ok = torch.equal(verified, batched[rows, -1])
    with torch.no_grad():
        positions = position_ids_from_mask(mask, width)
        ref = m32(input_ids=ids, attention_mask=mask, position_ids=positions).logits[real].double()
        default16 = m16(input_ids=ids, attention_mask=mask, position_ids=positions).logits[real].double()
    canonical32 = margingate.canonical_forward(m32, ids, attention_mask=mask)[real].double()

    def err(x):
        return float((x - ref).abs().max())

    def top1(x):
        return float((x.argmax(-1) == ref.argmax(-1)).double().mean())

    print(f"alone == batched (every position), per prompt: {alone_ok}")
    print(f"prefill == prefix + token-by-token decode: {decode_ok}; rows= verifier == canonical: {rows_ok}")
    print(
        f"max |logit error| vs fp32 default: default bf16 {err(default16):.3g}, canonical bf16 "
        f"{err(batched[real].double()):.3g}, canonical fp32 {err(canonical32):.3g}; top-1 agreement "
        f"default bf16 {top1(default16):.3f}, canonical bf16 {top1(batched[real].double()):.3f}"
    )


# --------------------------------------------------------------------------- the measurement
ROW_OPS = {
    "mm": lambda x, w: x @ w.T,
    "rmsnorm_mean": lambda x, w: x.float().pow(2).mean(-1, keepdim=True),
    "sum": lambda x, w: x.sum(-1, keepdim=True),
    "softmax": lambda x, w: torch.softmax(x, -1),
    "log_softmax": lambda x, w: torch.log_softmax(x, -1),
    "gelu_tanh": lambda x, w: F.gelu(x, approximate="tanh"),
    "gelu_erf": lambda x, w: F.gelu(x),
    "silu": lambda x, w: F.silu(x),
    "erf": lambda x, w: x.erf(),
    "exp": lambda x, w: x.exp(),
    "tanh": lambda x, w: x.tanh(),
}
# Row layouts: (batch, tokens); a transposed [B, H, T, D/H] head view is tried as well.
SHAPES = [(2, 1), (3, 1), (8, 1), (32, 1), (1, 7), (5, 9), (9, 33)]


def _varies(op, dim: int, dtype: torch.dtype) -> list[str]:
    w = torch.randn(64, dim, dtype=dtype)
    where = []
    for batch, tokens in SHAPES:
        if batch * tokens * dim > 3e7:
            continue
        x = torch.randn(batch, tokens, dim, dtype=dtype) * 3
        b, t = batch - 1, tokens - 1
        if not torch.equal(op(x[b : b + 1, t : t + 1].clone(), w), op(x, w)[b : b + 1, t : t + 1]):
            where.append(f"{batch}x{tokens}")
        if dim % 4 == 0 and op is not ROW_OPS["mm"]:
            view = x.view(batch, tokens, 4, dim // 4).transpose(1, 2)
            if not torch.equal(
                op(view[b : b + 1, :1, t : t + 1].clone(), w), op(view, w)[b : b + 1, :1, t : t + 1]
            ):
                where.append(f"{batch}x{tokens}/heads")
    return where


def measure_row_ops(args) -> None:
    torch.manual_seed(0)
    rows = []
    for name, op in ROW_OPS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for dim in args.dims:
                if name == "mm" and dim > 4096:
                    continue
                off = _varies(op, dim, dtype)
                with margingate.batch_invariant():
                    on = _varies(op, dim, dtype)
                if off or on:
                    rows.append(
                        {
                            "op": name,
                            "dtype": str(dtype).removeprefix("torch."),
                            "row": dim,
                            "default varies at": " ".join(off) or "-",
                            "mode varies at": " ".join(on) or "-",
                        }
                    )
    print(f"row-wise ops whose result for one row depends on the batch ({torch.get_num_threads()} threads):")
    print("(ops / sizes not listed were bit-identical in every layout tried)")
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (both paths)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time by process CPU time (use with --threads 1)"
    )
    parser.add_argument("--check", action="store_true", help="invariance + accuracy on the real model")
    parser.add_argument("--row-ops", action="store_true", help="run the row-op measurement instead")
    parser.add_argument(
        "--overhead", action="store_true", help="per-step cost of the interception mechanisms"
    )
    parser.add_argument(
        "--baseline-module", default=None, help="with --overhead: an older mode implementation (file)"
    )
    parser.add_argument(
        "--dims",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[16, 64, 100, 640, 1000, 2048, 262144],
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        check_real_model(args)
    elif args.row_ops:
        measure_row_ops(args)
    elif args.overhead:
        bench_overhead(args)
    else:
        bench_model(args)


if __name__ == "__main__":
    main()
