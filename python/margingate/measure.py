"""Measuring flips and determinism across batch configurations (the CLI and benchmarks call this).

Definitions (README "How we measure"):

- configuration: the prompt set decoded in left-padded batches of one batch size; batch size 1
  keeps the prompts in order, larger ones use a fixed shuffled order so that each prompt gets
  different neighbours and padding. The first batch size given is the reference.
- flip: the first step at which a prompt's tokens in a configuration differ from the reference;
  flip rate = flips / compared steps (steps up to and including the first difference).
- flip margin: the larger of the two fast-path top-1/top-2 margins (reference and batched run) at
  the flip step, i.e. the threshold a gate needs to exceed to verify that step in both runs.
- margin perturbation: the largest change of the fast-path margin between the reference and a
  batched run over all steps with an identical prefix: how far the batch moves a margin.
- latency increment: a policy's decode time minus ``off``'s, for the same requests in one run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .generation import DEFAULT_WINDOW, generate
from .policies import EXACT_POLICIES
from .sampling import prompt_seed
from .stats import RowStats, quantile, speculative_totals

QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50)


def config_order(n: int, batch_size: int) -> list[int]:
    """Prompt order of a configuration: in order alone, a fixed shuffle per batch size otherwise."""
    order = list(range(n))
    if batch_size > 1:
        random.Random(batch_size).shuffle(order)
    return order


def config_name(batch_size: int) -> str:
    return "alone" if batch_size == 1 else f"batch {batch_size}"


def decode_config(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    policy: str,
    batch_size: int,
    max_new_tokens: int,
    threshold: float | None = None,
    window: int = DEFAULT_WINDOW,
    eos: Sequence[int] = (),
    pad_id: int = 0,
    record_margins: bool = False,
    sampling: dict[str, Any] | None = None,
    speculative: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One configuration: ``generate`` over the prompts in ``config_order``; the result back in
    prompt order as ``{"sequences", "margins", "stats", "seconds"}``. ``sampling``: ``temperature``,
    ``top_k``, ``min_p``, ``seed`` (an int: prompt i keeps the stream ``prompt_seed(seed, i)`` of its
    index in ``prompts``, whatever its place in the configuration). ``policy="speculative"``:
    ``always`` with ``speculative=speculative`` (draft tokens per round). ``progress``: ``generate``'s
    token bar for this configuration (it disappears when the configuration is done)."""
    if policy == "speculative":
        policy = "always"
    else:
        speculative = None
    order = config_order(len(prompts), batch_size)
    sampling = dict(sampling or {})
    seed = sampling.pop("seed", 0)
    seeds = [prompt_seed(seed, i) for i in order]
    result = generate(
        model,
        [list(prompts[i]) for i in order],
        policy=policy,
        threshold=threshold,
        window=window,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        record_margins=record_margins,
        eos_token_id=list(eos),
        stop_at_eos=bool(eos),
        pad_token_id=pad_id,
        seed=seeds,
        **sampling,
        speculative=speculative,
        progress=progress,
    )
    n = len(order)
    sequences: list[list[int]] = [[] for _ in range(n)]
    margins: list[list[float]] | None = [[] for _ in range(n)] if result.margins is not None else None
    per_row: list[dict[str, Any]] = [{} for _ in range(n)]
    for position, i in enumerate(order):
        sequences[i] = list(result.sequences[position])
        per_row[i] = result.stats["per_row"][position]
        if margins is not None:
            margins[i] = list(result.margins[position])
    stats = {**result.stats, "per_row": per_row}
    return {"sequences": sequences, "margins": margins, "stats": stats, "seconds": stats["seconds"]}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def _nanmax(*values: float) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


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
    with_margins = reference_margins is not None and other_margins is not None
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        d = first_difference(a, b)
        compared += (d + 1) if d is not None else len(a)
        if with_margins:
            ma, mb = reference_margins[i], other_margins[i]
            last = d if d is not None else min(len(ma), len(mb)) - 1
            for s in range(min(last + 1, len(ma), len(mb))):
                if not (math.isnan(ma[s]) or math.isnan(mb[s])):
                    perturbation = max(perturbation, abs(ma[s] - mb[s]))
        if d is None:
            continue
        event: dict[str, Any] = {"prompt": i, "step": d}
        if with_margins:
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


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """``QUANTILES`` of the values (NaN ignored; all NaN when none is left), named ``p01`` ...."""
    return {f"p{round(q * 100):02d}": quantile(values, q) for q in QUANTILES}


def implied_trigger_rate(margins: Sequence[float], threshold: float) -> float:
    """Fraction of steps a gate at ``threshold`` would verify (NaN margins always verify)."""
    if not margins:
        return 0.0
    return sum(1 for m in margins if math.isnan(m) or m < threshold) / len(margins)


def _require_two(batch_sizes: Sequence[int]) -> None:
    if len(batch_sizes) < 2:
        raise ValueError("batch_sizes needs at least two configurations to compare (e.g. 1,8)")


def flip_report(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    eos: Sequence[int] = (),
    pad_id: int = 0,
    on_run: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fast-path (``off``) flips of every batched configuration against the first one."""
    _require_two(batch_sizes)
    runs = {}
    started = time.perf_counter()
    for b in batch_sizes:
        if on_run is not None:
            on_run(f"off, {config_name(b)}")
        runs[b] = decode_config(
            model, prompts, policy="off", batch_size=b, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
            record_margins=True, progress=progress,
        )
    reference = batch_sizes[0]
    ref = runs[reference]
    configs, events = [], []
    for b in batch_sizes[1:]:
        cmp = compare_configs(
            ref["sequences"], runs[b]["sequences"], reference_margins=ref["margins"], other_margins=runs[b]["margins"]
        )
        events += [{"batch_size": b, **e} for e in cmp["events"]]
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
    all_margins = [m for b in batch_sizes for row in runs[b]["margins"] for m in row]
    flip_margins = [e["margin"] for e in events if not math.isnan(e["margin"])]
    compared = sum(c["compared_steps"] for c in configs)
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batch_sizes": list(batch_sizes),
        "reference_batch_size": reference,
        "steps": sum(len(row) for row in ref["sequences"]),
        "configs": configs,
        "flips": len(events),
        "compared_steps": compared,
        "flip_rate": len(events) / compared if compared else 0.0,
        "flip_events": events,
        "flip_margin_max": max(flip_margins) if flip_margins else None,
        "margin_perturbation_max": max((c["margin_perturbation_max"] for c in configs), default=0.0),
        "margin_quantiles": quantiles(all_margins),
        "step_margins": all_margins,
        "flip_margins": flip_margins,
        "seconds": time.perf_counter() - started,
    }


def gate_counts(
    runs: dict[int, dict[str, Any]], canonical: list[list[int]], candidates: Sequence[float] = ()
) -> dict[str, Any]:
    """Flips, triggers and escapes of the gate from ``margin`` runs with margins recorded (a
    ``decode_config`` result per batch size, all at one threshold) and the canonical tokens of the
    same prompts. Per step of a row still decoding:

    - flip: the fast path's token differs from the canonical one. A verified step shows it (a
      repair, with its fast margin); a flip the gate passed (an escape) shows as a token that
      differs from the canonical tokens, its margin the recorded one at that step.
    - for every candidate threshold t (at most the decoding threshold): ``trigger_rate``, the
      steps whose fast margin is below t (NaN included; step 0 comes from the canonical prefill
      and is never gated), and ``escapes``, the flips whose fast margin is >= t: for t below the
      decoding threshold these are counted on this run's decode (every step with a margin in
      [t, threshold) was verified, so its flip is known). A decode at t itself verifies fewer
      steps, so more of its K/V are the fast path's and its shifts can differ: the escapes a
      threshold really has are those of a decode at it (its tokens against the canonical ones).
    """
    steps, margins, flip_margins, mismatched, configs = 0, [], [], [], {}
    for b, run in runs.items():
        per_row = run["stats"]["per_row"]
        c_steps = sum(r["steps"] for r in per_row)
        steps += c_steps
        for i, row in enumerate(per_row):
            flip_margins += row["repair_margins"]
            recorded = run["margins"][i][: row["steps"]]
            margins += recorded[1:]
            d = first_difference(run["sequences"][i], canonical[i])
            if d is not None:
                m = recorded[d] if d < len(recorded) else math.nan
                mismatched.append({"config": config_name(b), "batch_size": b, "prompt": i, "step": d, "margin": m})
        configs[config_name(b)] = {
            "steps": c_steps,
            "triggered": run["stats"]["triggered"],
            "verified": run["stats"]["verified"],
            "repairs": run["stats"]["repairs"],
            "seconds": run["seconds"],
            "identical_to_canonical": sum(1 for i, s in enumerate(run["sequences"]) if s == canonical[i]),
        }
    flip_margins += [e["margin"] for e in mismatched]
    finite = [m for m in flip_margins if not math.isnan(m)]
    first = next(iter(runs.values()))["sequences"]
    counts = {
        "steps": steps,
        "flips": len(flip_margins),
        "flip_rate": len(flip_margins) / steps if steps else 0.0,
        "flip_margins": sorted(finite),
        "max_flip_margin": max(finite, default=None),
        "end_to_end_mismatches": mismatched,
        "cross_config_divergences": sum(
            1 for i in range(len(first)) if any(run["sequences"][i] != first[i] for run in runs.values())
        ),
        "configs": configs,
        "step_margins": margins,
    }
    return {**counts, "candidates": [gate_at(counts, t) for t in candidates]}


def gate_at(counts: dict[str, Any], threshold: float) -> dict[str, Any]:
    """What a gate at ``threshold`` does on the steps of ``gate_counts``: its trigger rate, the
    flips it lets through (``escapes``: fast margin >= threshold) and its triggers per flip."""
    triggers = sum(1 for m in counts["step_margins"] if not m >= threshold)
    flips = counts["flips"]
    return {
        "threshold": threshold,
        "trigger_rate": triggers / counts["steps"] if counts["steps"] else 0.0,
        "escapes": sum(1 for m in counts["flip_margins"] if m >= threshold)
        + sum(1 for e in counts["end_to_end_mismatches"] if math.isnan(e["margin"])),
        "triggers_per_flip": triggers / flips if flips else math.inf,
    }


def gate_report(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    probe_threshold: float,
    candidates: Sequence[float] = (),
    eos: Sequence[int] = (),
    pad_id: int = 0,
    sampling: dict[str, Any] | None = None,
    on_run: Callable[[str], None] | None = None,
    progress: bool = False,
    keep_runs: bool = False,
    canonical: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """``gate_counts`` of ``margin`` at ``probe_threshold`` in every configuration, against the
    canonical tokens (``invariant``, batch-invariant by construction, decoded once in the largest
    batch; returned as ``canonical``). ``canonical``: those tokens from an earlier report on the same
    prompts, decoding settings and sampling (they depend on nothing else), not decoded again.
    ``keep_runs``: also return the ``decode_config`` results per batch size (``runs``)."""
    common = dict(max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, sampling=sampling, progress=progress)
    started = time.perf_counter()
    if canonical is None:
        if on_run is not None:
            on_run(f"canonical tokens, {config_name(max(batch_sizes))}")
        canonical = decode_config(model, prompts, policy="invariant", batch_size=max(batch_sizes), **common)["sequences"]
    elif len(canonical) != len(prompts):
        raise ValueError(f"gate_report: {len(canonical)} canonical sequences for {len(prompts)} prompts")
    runs = {}
    for b in batch_sizes:
        if on_run is not None:
            on_run(f"margin at {probe_threshold:g}, {config_name(b)}")
        runs[b] = decode_config(
            model, prompts, policy="margin", batch_size=b, threshold=probe_threshold, record_margins=True, **common
        )
    counts = gate_counts(runs, canonical, [t for t in candidates if t <= probe_threshold])
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batch_sizes": list(batch_sizes),
        "probe_threshold": probe_threshold,
        **counts,
        "seconds": time.perf_counter() - started,
        "canonical": [list(seq) for seq in canonical],
        **({"runs": runs} if keep_runs else {}),
    }


# Band edges of ``margin_bands`` (logit units): bf16 margins of logits in [8, 32) are multiples of
# 1/16 or 1/8, so the first bands hold one representable value each.
MARGIN_BAND_EDGES = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def margin_bands(counts: dict[str, Any], upto: float) -> list[dict[str, Any]]:
    """Where the flips of ``gate_counts`` sit: per band of fast margin below ``upto`` (the probe
    threshold: every step below it was verified, so its flips are all known), the steps, the flips
    and the flip rate; for a band without flips, ``upper_95``: the flip probability per step that
    band is below with 95 % confidence (1 - 0.05^(1/steps)). Ties (margin 0) are a band of their own."""
    edges = [0.0, *(e for e in MARGIN_BAND_EDGES if e < upto), upto]
    bands = [(0.0, 0.0)] + [(lo, hi) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]
    rows = []
    for lo, hi in bands:
        inside = (lambda m: m == 0) if hi == 0 else (lambda m, lo=lo, hi=hi: lo <= m < hi and m > 0)
        steps = sum(1 for m in counts["step_margins"] if inside(m))
        flips = sum(1 for m in counts["flip_margins"] if inside(m))
        rows.append(
            {
                "from": lo,
                "below": hi,
                "steps": steps,
                "flips": flips,
                "flip_rate": flips / steps if steps else None,
                "upper_95": 1 - 0.05 ** (1 / steps) if steps and not flips else None,
            }
        )
    return rows


def check_safety_factor(safety_factor: float) -> None:
    """Raises ``ValueError`` unless ``safety_factor`` > 1 (a threshold must exceed every flip margin)."""
    if not safety_factor > 1:
        raise ValueError(f"the safety factor must be > 1 (the threshold must exceed every flip margin), got {safety_factor:g}")


def calibrated_threshold(report: dict[str, Any], safety_factor: float) -> float:
    """``safety_factor`` (> 1) x the largest fast margin at which the fast token differed from the
    canonical one in a ``gate_report`` (when every flip was at a tie, margin 0: x the smallest
    positive margin seen instead). Raises ``ValueError`` when no flip was seen, or when the result
    exceeds the probe threshold (steps above it were not verified: the run cannot judge it)."""
    check_safety_factor(safety_factor)
    largest = report["max_flip_margin"]
    if largest is None:
        raise ValueError(
            f"no flips on the calibration set ({report['steps']} steps): nothing to calibrate "
            "(use more prompts, more tokens or larger batch sizes)"
        )
    base = largest if largest > 0 else min((m for m in report["step_margins"] if m > 0), default=0.0)
    threshold = safety_factor * base
    if not threshold > 0:
        raise ValueError("every flip and every step was at a tie (margin 0): no threshold separates them")
    if threshold > report["probe_threshold"]:
        raise ValueError(
            f"threshold {threshold:.4g} (= {safety_factor:g} x the largest flip margin {base:.4g}) exceeds "
            f"--probe-threshold {report['probe_threshold']:g}: steps above the probe were not verified, so this run "
            "cannot judge it; raise --probe-threshold"
        )
    return threshold


def increment_ratio(per_policy: dict[str, dict[str, Any]], baseline: str, policy: str) -> float | None:
    """increment(baseline) / increment(policy), both over ``off`` in the same run; None when either
    policy is missing or an increment is not positive (a ratio of noise)."""
    if baseline not in per_policy or policy not in per_policy:
        return None
    inc_b = per_policy[baseline]["latency_increment_s"]
    inc_p = per_policy[policy]["latency_increment_s"]
    return inc_b / inc_p if inc_b > 0 and inc_p > 0 else None


def _speculative_totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance over the configurations of a speculative entry (nothing for the others)."""
    if not any("drafted" in s for s in stats):
        return {}
    totals = speculative_totals([RowStats.from_dict(r) for s in stats for r in s["per_row"]])
    return {k: totals[k] for k in ("drafted", "accepted", "acceptance_rate", "tokens_per_pass")}


def _policy_entry(
    runs: dict[int, dict[str, Any]], batch_sizes: Sequence[int], off_seconds: float, always_ref: list | None
) -> dict[str, Any]:
    """One policy's entry of ``check_report`` from its run per configuration (``decode_config``)."""
    reference = batch_sizes[0]
    ref = runs[reference]["sequences"]
    n = len(ref)
    identical = sum(1 for i in range(n) if all(runs[b]["sequences"][i] == ref[i] for b in batch_sizes))
    events: list[dict[str, Any]] = []
    compared = 0
    for b in batch_sizes[1:]:
        cmp = compare_configs(
            ref, runs[b]["sequences"], reference_margins=runs[reference]["margins"], other_margins=runs[b]["margins"],
        )
        compared += cmp["compared_steps"]
        events += [{"batch_size": b, **e} for e in cmp["events"]]
    stats = [runs[b]["stats"] for b in batch_sizes]
    steps = sum(s["steps"] for s in stats)
    triggered = sum(s["triggered"] for s in stats)
    seconds = sum(runs[b]["seconds"] for b in batch_sizes)
    tokens = sum(len(s) for b in batch_sizes for s in runs[b]["sequences"])
    increment = seconds - off_seconds
    return {
        "identical": identical,
        "prompts": n,
        "deterministic": identical == n,
        "flips": len(events),
        "compared_steps": compared,
        "flip_rate": len(events) / compared if compared else 0.0,
        "divergences": events,
        "steps": steps,
        "verified": sum(s["verified"] for s in stats),
        "triggered": triggered,
        "trigger_rate": triggered / steps if steps else 0.0,
        "repairs": sum(s["repairs"] for s in stats),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "latency_increment_s": increment,
        "latency_increment_pct": 100 * increment / off_seconds if off_seconds > 0 else float("nan"),
        "matches_always": sum(1 for i in range(n) if ref[i] == always_ref[i]) if always_ref else None,
        "threshold": stats[0]["threshold"],
        "prefill": stats[0]["prefill"],
        "stream": stats[0]["stream"],
        "rolled_back": sum(s.get("rolled_back", 0) for s in stats),
        "verify_passes": sum(s.get("verify_passes", 0) for s in stats),
        **_speculative_totals(stats),
        "per_config": {
            str(b): {k: runs[b]["stats"][k] for k in ("seconds", "steps", "verified", "repairs", "stream")}
            for b in batch_sizes
        },
    }


def check_report(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    policies: Sequence[str],
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    threshold: float | None,
    window: int = DEFAULT_WINDOW,
    eos: Sequence[int] = (),
    pad_id: int = 0,
    on_run: Callable[[str], None] | None = None,
    progress: bool = False,
    sampling: dict[str, Any] | None = None,
    speculative: int | None = None,
) -> dict[str, Any]:
    """``speculative=k`` adds the entry ``"speculative"`` (``always`` decoded speculatively with k
    draft tokens per round: exact, with ``acceptance_rate`` and ``tokens_per_pass``).

    Decodes ``prompts`` in every configuration under every policy (``off`` first; interleaved
    configuration-major, so machine noise hits every policy alike) and reports per policy: prompts
    identical in all configurations, flips against the reference, trigger rate, repairs, time and
    latency increment over ``off``. ``exact_failures`` lists the exact policies (``always``,
    ``invariant``, ``window``) that were not deterministic: a bug, never a calibration miss.
    ``fastest_deterministic`` names the fastest policy whose sequences were identical in every
    configuration (``off`` included: on some CPUs the invariant kernels beat the vendor's)."""
    _require_two(batch_sizes)
    policies = list(dict.fromkeys(["off", *policies, *(["speculative"] if speculative else [])]))
    n = len(prompts)
    results: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in policies}
    started = time.perf_counter()
    for b in batch_sizes:
        for policy in policies:
            if on_run is not None:
                on_run(f"{policy}, {config_name(b)}")
            results[policy][b] = decode_config(
                model, prompts, policy=policy, batch_size=b, max_new_tokens=max_new_tokens, threshold=threshold,
                window=window, eos=eos, pad_id=pad_id, record_margins=policy in ("off", "margin"), sampling=sampling,
                speculative=speculative, progress=progress,
            )
    reference = batch_sizes[0]
    off_seconds = sum(results["off"][b]["seconds"] for b in batch_sizes)
    always_ref = results["always"][reference]["sequences"] if "always" in results else None
    per_policy = {
        policy: _policy_entry(results[policy], batch_sizes, off_seconds, always_ref) for policy in policies
    }
    ratios = {
        baseline: increment_ratio(per_policy, baseline, "margin") for baseline in ("window", "always")
    }
    deterministic = [p for p in policies if per_policy[p]["deterministic"]]
    fastest = min(deterministic, key=lambda p: per_policy[p]["seconds"]) if deterministic else None
    off_events = per_policy["off"]["divergences"]
    step_margins = [m for b in batch_sizes for row in results["off"][b]["margins"] for m in row]
    gated = [p for p in policies if p != "off"]
    gate = None
    if "margin" in results:
        # The canonical tokens are those of an exact policy, when one ran (all its configurations agree).
        canonical = next((results[p][reference]["sequences"] for p in ("always", "invariant") if p in results), None)
        # Without them margin's reference configuration stands in: escapes are then only the flips
        # that made another configuration differ from it (a lower bound).
        counts = gate_counts(results["margin"], canonical or results["margin"][reference]["sequences"])
        gate = {
            "against": "canonical tokens" if canonical else f"margin's own {config_name(reference)} tokens",
            **{k: counts[k] for k in ("steps", "flips", "flip_rate", "max_flip_margin", "end_to_end_mismatches")},
            **gate_at(counts, per_policy["margin"]["threshold"]),
        }
    return {
        "prompts": n,
        "max_new_tokens": max_new_tokens,
        "batch_sizes": list(batch_sizes),
        "reference_batch_size": reference,
        "threshold": threshold,
        "sampling": dict(sampling or {"temperature": 0.0}),
        "policies": per_policy,
        "increment_ratio_window_over_margin": ratios["window"],
        "increment_ratio_always_over_margin": ratios["always"],
        "fastest_deterministic": fastest,
        "fastest_deterministic_beats_off": fastest is not None
        and fastest != "off"
        and per_policy[fastest]["seconds"] < per_policy["off"]["seconds"],
        "deterministic": all(per_policy[p]["deterministic"] for p in gated),
        "determinism_failures": [p for p in gated if not per_policy[p]["deterministic"]],
        "exact_failures": [
            p for p in (*EXACT_POLICIES, "speculative") if p in per_policy and not per_policy[p]["deterministic"]
        ],
        "gate": gate,
        "off_flip_events": off_events,
        "off_margin_quantiles": quantiles(step_margins),
        "step_margins": step_margins,
        "flip_margins": [e["margin"] for e in off_events if not math.isnan(e.get("margin", math.nan))],
        "seconds": time.perf_counter() - started,
    }
