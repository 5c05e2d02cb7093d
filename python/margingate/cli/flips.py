"""``margingate flips``: where batch-induced flips happen, on the fast path alone (no
verification): per-configuration flip rate, the margin at every flip, the margin quantiles."""

from __future__ import annotations

import argparse
from typing import Any

from ..measure import config_name, flip_report, implied_trigger_rate
from .common import (
    EXIT_OK,
    RunBar,
    encode,
    eos_and_pad,
    load_model_from_args,
    machine_info,
    machine_line,
    model_info,
    need_two_configs,
    public,
    read_prompts,
    read_threshold,
    say,
)  # fmt: skip
from .report import check_writable, fmt, pct, print_table, write_json, write_margin_plot


def measure_flips(args: argparse.Namespace, model, prompts, eos, pad, label: str) -> dict[str, Any]:
    """``measure.flip_report`` over ``--batch-sizes``, with a progress bar (shared with calibrate)."""
    with RunBar(args, len(args.batch_sizes), f"flips{label}") as bar:
        return flip_report(
            model, prompts, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens, eos=eos, pad_id=pad,
            on_run=bar.on_run, progress=not args.quiet,
        )  # fmt: skip


def print_flips(report: dict[str, Any], label: str = "") -> None:
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
                "flip rate": pct(c["flip_rate"]),
                "flipped prompts": len(c["flipped_prompts"]),
                "max margin shift": c["margin_perturbation_max"],
            }
            for c in report["configs"]
        ]
    )
    q = report["margin_quantiles"]
    print("margin quantiles (all steps): " + ", ".join(f"{k} {fmt(v)}" for k, v in q.items()))
    if not report["flip_events"]:
        print("no flips observed")
        return
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


def run(args: argparse.Namespace) -> int:
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    need_two_configs(args)
    threshold, source = read_threshold(args)
    raw_prompts = read_prompts(args.prompts, args.limit)
    model, tokenizer, name = load_model_from_args(args)
    prompts = encode(raw_prompts, tokenizer, model)
    eos, pad = eos_and_pad(model, tokenizer)
    machine = machine_info()
    print(machine_line(machine))
    report = measure_flips(args, model, prompts, eos, pad, "")
    print_flips(report)
    if threshold is not None:
        report["threshold"] = threshold
        report["threshold_source"] = source
        report["implied_trigger_rate"] = implied_trigger_rate(report["step_margins"], threshold)
        print(
            f"threshold {threshold:.4g} ({source}): trigger rate {pct(report['implied_trigger_rate'])}, "
            f"flips at or above it: {sum(1 for m in report['flip_margins'] if m >= threshold)}"
        )
    step_margins, flip_margins = report["step_margins"], report["flip_margins"]
    write_json(
        args.json,
        {
            "command": "flips",
            "model": model_info(model, name, args.dtype),
            "machine": machine,
            "prompt_set": args.prompts,
            **public(report),
        },
    )
    if args.plot:
        write_margin_plot(args.plot, step_margins, flip_margins, threshold, f"fast-path margins, {name}")
        say(args, f"plot written to {args.plot}")
    return EXIT_OK
