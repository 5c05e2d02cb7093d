"""``margingate check``, the main job: decodes a prompt set alone and in batches under each policy
and prints whether each stays identical across the configurations, what it costs, and which of
the timed policies was the fastest deterministic one (never a policy it did not time)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..measure import check_report, config_name
from ..policies import EXACT_POLICIES, GATE, POLICIES, default_threshold
from .common import (
    EXIT_FAILURE,
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
    require_canonical_forward,
    sampling_from_args,
    say,
)  # fmt: skip
from .options import UsageError
from .report import check_writable, fmt, pct, print_table, write_json, write_margin_plot

_GATED = ("margin", "always", "window")  # the policies with a trigger rate and repairs


def _sampling(args: argparse.Namespace) -> dict[str, Any] | None:
    sampling = sampling_from_args(args)
    if sampling and args.speculative:
        raise UsageError("--speculative is greedy only; drop --temperature/--top-k/--min-p or --speculative")
    return sampling


def _table(per_policy: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    has_always = "always" in per_policy
    return [
        {
            "policy": policy,
            "identical": f"{e['identical']}/{n}",
            "flip rate": pct(e["flip_rate"]),
            "trigger rate": pct(e["trigger_rate"]) if policy in _GATED else "-",
            "repairs": e["repairs"] if policy in _GATED else "-",
            "tokens/s": e["tokens_per_s"],
            "latency +": "-" if policy == "off" else f"{e['latency_increment_s']:+.1f} s ({e['latency_increment_pct']:+.0f}%)",
            "final after p50/p99": f"{1e3 * e['stream']['delay_p50_s']:.0f}/{1e3 * e['stream']['delay_p99_s']:.0f} ms",
            "= always": f"{e['matches_always']}/{n}" if has_always else "-",
        }
        for policy, e in per_policy.items()
    ]


def config_table(per_policy: dict[str, dict[str, Any]], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Each policy's seconds per configuration, and its increment over ``off`` in the same
    configuration (alone and batched costs differ: a policy can win batched and lose alone)."""
    off = per_policy["off"]["per_config"]
    rows = []
    for policy, e in per_policy.items():
        row: dict[str, Any] = {"policy": policy}
        for b in batch_sizes:
            seconds = e["per_config"][str(b)]["seconds"]
            extra = "" if policy == "off" else f" ({seconds - off[str(b)]['seconds']:+.1f})"
            row[f"{config_name(b)} s"] = f"{seconds:.1f}{extra}"
        rows.append(row)
    return rows


def increment_line(per_policy: dict[str, dict[str, Any]], baseline: str, paper: str | None = None) -> str | None:
    """``increment(baseline) / increment(margin)`` with the two increments it rests on: a ratio of
    two small increments swings a lot between runs (3.78x to 28.4x seen on quiet runs), so the
    seconds are printed beside it, and no ratio at all when an increment is not positive."""
    if baseline not in per_policy or "margin" not in per_policy:
        return None
    inc_b, inc_m = per_policy[baseline]["latency_increment_s"], per_policy["margin"]["latency_increment_s"]
    rests_on = f"{baseline} {inc_b:+.1f} s over off, margin {inc_m:+.1f} s"
    if inc_b > 0 and inc_m > 0:
        return f"latency increment {baseline} / margin: {inc_b / inc_m:.2f}x ({rests_on})" + (f"; paper: {paper}" if paper else "")
    return f"latency increment {baseline} / margin: no ratio ({rests_on}: an increment within timing noise)"


def advice_line(report: dict[str, Any], timed: list[str]) -> str | None:
    """The policy advice, true to what was measured: the fastest of the timed policies that was
    deterministic here, the policies it was compared with, and how to time the ones left out."""
    per_policy = report["policies"]
    candidates = [p for p in timed if p in per_policy and per_policy[p]["deterministic"]]
    if not candidates:
        return None
    fastest = min(candidates, key=lambda p: per_policy[p]["seconds"])
    times = ", ".join(f"{p} {per_policy[p]['seconds']:.1f} s" for p in sorted(candidates, key=lambda p: per_policy[p]["seconds"]))
    untimed = [p for p in POLICIES if p not in timed]
    scope = "of all five policies" if not untimed else f"of those timed ({', '.join(timed)})"
    line = f"fastest deterministic policy {scope} on this machine: {fastest} ({times})"
    if fastest == "off":
        line += "; `off` did not flip on these prompts but is not deterministic by construction"
    elif fastest == "invariant" and per_policy["invariant"]["seconds"] < per_policy["off"]["seconds"]:
        # only where the whole decode ran our kernels: margin's or always's lead over off is noise or gating
        line += " - faster than `off` here: the invariant kernels beat the vendor's on this CPU"
    if untimed:
        line += f"; not timed: {', '.join(untimed)} (`--policies all` times every policy)"
    return line


def gate_line(gate: dict[str, Any] | None) -> str | None:
    """The gate's three numbers on this run: flips (fast token != the canonical one, per step),
    trigger rate, and escapes (flips the gate let through, at or above the threshold)."""
    if gate is None:
        return None
    return (
        f"gate {GATE} at {gate['threshold']:.4g}: {gate['flips']} flips in {gate['steps']} margin steps "
        f"(flip rate {pct(gate['flip_rate'])}, against {gate['against']}), trigger rate {pct(gate['trigger_rate'])}, "
        f"escapes {gate['escapes']}" + ("" if gate["escapes"] == 0 else " (flips at or above the threshold: NOT COVERED)")
    )


def _print_verdicts(report: dict[str, Any], n: int) -> None:
    per_policy = report["policies"]
    off = per_policy["off"]
    if off["deterministic"]:
        print(
            "note: `off` did not flip on these prompts (flip rate 0); flips are rare (~0.3 % of steps) - "
            "use more prompts or tokens to see them"
        )
    else:
        margins = ", ".join(fmt(e.get("margin")) for e in report["off_flip_events"])
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
        print(f"{policy}: {verdict} ({e['identical']}/{n} prompts identical), trigger rate {pct(e['trigger_rate'])}{where}")


def _print_report(args, report: dict[str, Any], name: str, n: int, threshold: float, source: str, machine) -> None:
    per_policy = report["policies"]
    configs = ", ".join(config_name(b) for b in args.batch_sizes)
    print(
        f"\nmargingate check: {name}, {n} prompts x {args.max_new_tokens} new tokens, configurations {configs} "
        f"(reference {config_name(report['reference_batch_size'])}), threshold {threshold:.4g} ({source})"
    )
    print(machine_line(machine))
    print_table(_table(per_policy, n))
    print("seconds per configuration (+ over off in the same configuration):")
    print_table(config_table(per_policy, args.batch_sizes))
    for baseline, paper in (("window", "2.23x on Llama-3.1-8B vs LLM-42"), ("always", None)):
        line = increment_line(per_policy, baseline, paper)
        if line:
            print(line)
    if "speculative" in per_policy:
        e = per_policy["speculative"]
        print(
            f"speculative (k={args.speculative}, prompt lookup): acceptance {pct(e['acceptance_rate'])}, "
            f"{e['tokens_per_pass']:.2f} tokens per verifier pass"
        )
    _print_verdicts(report, n)
    line = gate_line(report.get("gate"))
    if line:
        print(line)
    advice = advice_line(report, list(dict.fromkeys(["off", *args.policies])))
    if advice:
        print(advice)
    say(args, f"decoding took {report['seconds']:.0f} s")


def run(args: argparse.Namespace) -> int:
    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        check_writable(path, what)
    need_two_configs(args)
    threshold, source = read_threshold(args)
    raw_prompts = read_prompts(args.prompts, args.limit)
    sampling = _sampling(args)
    model, tokenizer, name = load_model_from_args(args)
    require_canonical_forward(model, "; `margingate flips` works with any model")
    prompts = encode(raw_prompts, tokenizer, model)
    if threshold is None:
        threshold, source = default_threshold(model)
    eos, pad = eos_and_pad(model, tokenizer)
    n = len(prompts)
    all_policies = list(dict.fromkeys(["off", *args.policies]))
    say(
        args,
        f"check: {n} prompts x {args.max_new_tokens} new tokens, configurations "
        f"{', '.join(config_name(b) for b in args.batch_sizes)}, policies {', '.join(all_policies)}, "
        f"threshold {threshold:.4g} ({source})" + (f", sampling {sampling}" if sampling else ", greedy"),
    )
    with RunBar(args, len(args.batch_sizes) * (len(all_policies) + bool(args.speculative)), "check") as bar:
        report = check_report(
            model, prompts, policies=all_policies, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
            threshold=threshold, window=args.window, eos=eos, pad_id=pad, on_run=bar.on_run, sampling=sampling,
            speculative=args.speculative, progress=not args.quiet,
        )  # fmt: skip
    machine = machine_info()
    _print_report(args, report, name, n, threshold, source, machine)
    write_json(
        args.json,
        {
            "command": "check",
            "model": model_info(model, name, args.dtype),
            "machine": machine,
            "prompt_set": args.prompts,
            **public(report),
            "threshold_source": source,
            "untimed_policies": [p for p in POLICIES if p not in all_policies],
        },
    )
    if args.plot:
        write_margin_plot(args.plot, report["step_margins"], report["flip_margins"], threshold, f"margingate check, {name}")
        say(args, f"plot written to {args.plot}")
    return _exit_code(args, report)


def _exit_code(args: argparse.Namespace, report: dict[str, Any]) -> int:
    if report["exact_failures"]:
        print(
            f"determinism failure: {', '.join(report['exact_failures'])} must be deterministic by construction "
            f"({', '.join(EXACT_POLICIES)} always are); this is a margingate bug or an unsupported dependency "
            "version (please report it with `pip list`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.strict and report["determinism_failures"]:
        print(f"determinism failure: {', '.join(report['determinism_failures'])} (--strict)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
