"""The gate at scale: flip rate, trigger rate and escapes of MarginGate's threshold (issue 28).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python -m bench.python.bench_gate \
        [--sets sharegpt,all] [--modes greedy,seeded] [--prompts 80] [--skip 0] [--tokens 48] \
        [--batch-sizes 1,8,16] [--threshold 0.75] [--candidates 0.125,0.25,...] [--json PATH] [--quick]

For every prompt set and decoding mode (greedy; seeded sampling at T = 0.7, top_k = 50) this
decodes the prompts with ``margin`` at ``--threshold`` in every batch configuration (alone in
order, then shuffled batches) and once with ``invariant`` (the canonical tokens; batch-invariant
by construction, so decoded in the largest batch). What it counts, per step of a row that is
still decoding:

- flip: the fast path's token differs from the canonical one at that step. Every verified step
  shows whether it flipped (a repair); a flip at a step the gate passed is an escape.
- trigger: the gate fired (fast margin below the threshold, or NaN).
- escape at threshold t: a flip whose fast margin is >= t. At ``--threshold`` itself it shows up
  as a repair of a row replayed only because another row was (the piggyback) or as a token that
  differs from the canonical tokens; for every candidate t below ``--threshold`` it is counted
  on the same decode: the steps with a margin in [t, threshold) were verified, so their flips are
  known. Candidates above ``--threshold`` cannot be judged from this run and are refused. A decode
  at t itself verifies fewer steps (staler fast K/V), so the escapes a shipped threshold really
  has are measured by decoding at it: ``--threshold T`` with T the shipped value (its escapes are
  the tokens that differ from the canonical ones, and the repairs of piggybacked rows at or above T).

Sharper gates are judged on the same steps and flips (greedy only; ``--no-signals`` skips them).
At every fast step the bench also records, per row, from the final hidden state h (the lm head's
input) and the lm head rows w1, w2 of the top two bf16 candidates:

- fp32 margin: h dotted in fp32 with the lm head rows of the 16 best bf16 candidates (top-1 by fp32
  minus the best other candidate, or the 16th candidate's bf16 value plus half an ulp, whichever is
  larger): the margin before the lm head rounds to bf16;
- fp32 margin of the fast token: the same, but of the token the fast path chose (the bf16 argmax,
  first index on ties) instead of the fp32 top-1, so it is negative when bf16 rounding tied the two
  and the tie went to the token that fp32 ranks second: the signal a gate on fp32 logits would read;
- margin in ulps: the bf16 margin in units of the bf16 ulp at the top logit's magnitude;
- the bf16 margin divided by a predicted size of the fast-vs-canonical shift of that margin,
  (w1 - w2) . dh, under three models of the hidden-state error dh: isotropic (|w1 - w2| |h|),
  per component relative to h (|(w1 - w2) * h|), or shaped by the final norm's weight g
  (|(w1 - w2) * g|, g = the norm of a vector of ones: its elementwise scale); and a blend, the
  margin over the square root of the relative model's scale.

A gate on a signal at t verifies the steps below t; its escapes are the flips whose signal is >= t.
Signals in their own units are judged at fixed candidates; every signal (the bf16 margin too) is
also judged at 1, 1.5 and 2 times its largest flip value on the set, and that threshold carried
to the other prompt set of the same mode (``transfer``): the comparison that does not depend on a
signal's units. Each set also gets a table of flips / steps per band of fast margin
(``measure.margin_bands``).

Prints one table per set, mode and signal (candidate threshold -> trigger rate, escapes, triggers
per flip) and the end-to-end check at ``--threshold``: prompts whose tokens differ from the
canonical tokens or between configurations. ``--json`` keeps every count and every flip's margin.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

DEFAULT_CANDIDATES = (0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75)
FP32_CANDIDATES = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5)
ULP_CANDIDATES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
FP32_CANDIDATE_TOKENS = 16
RELATIVE_FACTORS = (1.0, 1.5, 2.0)
# Recorded per step and row by Signals (column order), with the fixed candidates of those in units.
SIGNALS = (
    ("bf16 margin", None),
    ("fp32 margin", FP32_CANDIDATES),
    ("fp32 margin of the fast token", FP32_CANDIDATES),
    ("margin in ulps", ULP_CANDIDATES),
    ("margin / (|w1-w2| |h|)", None),
    ("margin / |(w1-w2) * h|", None),
    ("margin / |(w1-w2) * g|", None),
    ("margin / sqrt|(w1-w2) * h|", None),
)
SEEDED = {"temperature": 0.7, "top_k": 50, "seed": 0}


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


class Signals:
    """Alternative gate signals at every fast step of ``margin`` (see the module docstring), kept per
    processor (one per batch) and step: ``values[k][step]`` is a [B, S] tensor (one column per
    ``SIGNALS`` entry, in its order) of the k-th batch decoded."""

    def __init__(self, model) -> None:
        import margingate.processor as processor

        self.weight = model.get_output_embeddings().weight
        norm = model.get_decoder().norm  # the final norm: its output of a vector of ones is its scale
        self.norm_scale = norm(torch.ones(1, self.weight.shape[1], dtype=self.weight.dtype)).float()[0]
        self.hidden = None
        self.batches: list[Any] = []
        self.values: list[list[torch.Tensor]] = []
        model.get_output_embeddings().register_forward_hook(self._hook)
        original = processor.MarginGateProcessor.decide
        signals = self

        def decide(proc, input_ids, scores):
            if not signals.batches or signals.batches[-1] is not proc:
                signals.batches.append(proc)
                signals.values.append([])
            signals.values[-1].append(signals._signals(scores.float(), signals.hidden))
            return original(proc, input_ids, scores)

        processor.MarginGateProcessor.decide = decide

    def _hook(self, module, inputs, output) -> None:
        self.hidden = inputs[0][:, -1].float()  # the fast forward's, when decide runs (verification comes after)

    def _signals(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        top, idx = logits.topk(FP32_CANDIDATE_TOKENS, dim=-1)
        exact = torch.einsum("bk,bnk->bn", hidden, self.weight[idx].float())
        best = exact.argmax(dim=-1, keepdim=True)
        others = exact.scatter(1, best, -torch.inf).amax(dim=-1)
        ulp_top = torch.exp2(torch.floor(torch.log2(top[:, 0].abs().clamp_min(1e-30))) - 7)
        last = top[:, -1]
        bound = last + torch.exp2(torch.floor(torch.log2(last.abs().clamp_min(1e-30))) - 8)
        fp32 = exact.gather(1, best)[:, 0] - torch.maximum(others, bound)
        # the fast token: the bf16 argmax, first index on ties (the margin kernel's rule); NaN (verify)
        # in the unlikely case that more than 16 candidates tie with it and topk left it out
        is_fast = idx == logits.argmax(dim=-1, keepdim=True)
        fast = exact.masked_fill(~is_fast, 0.0).sum(dim=-1).masked_fill(~is_fast.any(dim=-1), torch.nan)
        fp32_fast = fast - torch.maximum(exact.masked_fill(is_fast, -torch.inf).amax(dim=-1), bound)
        bf16 = top[:, 0] - top[:, 1]
        ulps = bf16 / ulp_top
        rows = self.weight[idx[:, 0]].float() - self.weight[idx[:, 1]].float()
        relative = (rows * hidden).norm(dim=-1)
        isotropic = rows.norm(dim=-1) * hidden.norm(dim=-1)
        shaped = (rows * self.norm_scale).norm(dim=-1)
        return torch.stack([bf16, fp32, fp32_fast, ulps, bf16 / isotropic, bf16 / relative, bf16 / shaped, bf16 / relative.sqrt()], dim=1)

    def take(self, n_prompts: int, batch_size: int) -> list[list[torch.Tensor]]:
        """The signals recorded since the last ``take``, per prompt (prompt order) and step."""
        from margingate.measure import config_order

        order = config_order(n_prompts, batch_size)
        per_prompt: list[list[torch.Tensor]] = [[] for _ in range(n_prompts)]
        for k, steps in enumerate(self.values):
            for r, i in enumerate(order[k * batch_size : (k + 1) * batch_size]):
                per_prompt[i] = [v[r] for v in steps]
        self.batches, self.values = [], []
        return per_prompt


def signal_counts(report, signals: dict[int, list[list[torch.Tensor]]], column: int) -> dict[str, Any]:
    """``measure.gate_counts``' counts for a gate on signal ``column``: the same steps and flips as
    ``report`` (its repairs and its tokens that differ from the canonical ones), valued by that signal."""
    import math

    values, flips = [], []
    for b, per_prompt in signals.items():
        rows = report["runs"][b]["stats"]["per_row"]
        for i, steps in enumerate(per_prompt):
            seen = [float(v[column]) for v in steps[: rows[i]["steps"]]]
            values += seen[1:]
            flips += [seen[s] for s in rows[i]["repair_steps"] if s < len(seen)]
        flips += [seen_at(per_prompt, e, column) for e in report["end_to_end_mismatches"] if e["batch_size"] == b]
    return {
        "steps": report["steps"],
        "step_margins": values,
        "flips": len(flips),
        "flip_margins": [v for v in flips if not math.isnan(v)],
        "end_to_end_mismatches": [{"margin": v} for v in flips if math.isnan(v)],  # unjudged: counted as escapes
    }


def relative_thresholds(counts: dict[str, Any]) -> list[float]:
    """``RELATIVE_FACTORS`` x the largest flip value of a signal (none without a flip)."""
    top = max(counts["flip_margins"], default=None)
    return [] if top is None else [f * top for f in RELATIVE_FACTORS]


def _batch_of(label: str) -> int:
    """The batch size a ``gate_report`` run label names ("..., alone" or "..., batch 8")."""
    tail = label.rsplit(", ", 1)[-1]
    return 1 if tail == "alone" else int(tail.removeprefix("batch "))


def seen_at(per_prompt, event, column: int) -> float:
    steps = per_prompt[event["prompt"]]
    return float(steps[event["step"]][column]) if event["step"] < len(steps) else float("nan")


def _relative_row(signal: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"signal": signal, "largest flip": f"{rows[0]['threshold']:.4g}" if rows else "-"}
    for factor, r in zip(RELATIVE_FACTORS, rows, strict=False):
        row[f"x{factor:g}"] = f"{100 * r['trigger_rate']:.2f} %, {r['escapes']}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=_csv(str), default=["sharegpt", "all"], help="prompt sets (default sharegpt,all)")
    parser.add_argument("--modes", type=_csv(str), default=["greedy", "seeded"], help="greedy and/or seeded")
    parser.add_argument("--prompts", type=int, default=80, help="prompts per set (default 80)")
    parser.add_argument(
        "--skip", type=int, default=0, metavar="N",
        help="start each set at its prompt N (prompts a calibration did not see; default 0)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 8, 16], help="configurations (default 1,8,16)")
    parser.add_argument("--threshold", type=float, default=0.75, help="the threshold decoded with (default 0.75)")
    parser.add_argument("--candidates", type=_csv(float), default=list(DEFAULT_CANDIDATES), help="thresholds judged")
    parser.add_argument("--json", metavar="PATH", help="write every count as JSON")
    parser.add_argument("--no-signals", action="store_true", help="judge the bf16 margin gate only")
    parser.add_argument("--quick", action="store_true", help="4 prompts x 8 tokens, one set, greedy (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.modes, args.prompts, args.tokens, args.batch_sizes = ["all"], ["greedy"], 4, 8, [1, 4]
    bad = [m for m in args.modes if m not in ("greedy", "seeded")]
    if bad or len(args.batch_sizes) < 2 or any(b < 1 for b in args.batch_sizes):
        parser.error("--modes takes greedy,seeded; --batch-sizes needs two or more sizes >= 1")
    if args.skip < 0 or args.prompts < 1:
        parser.error("--skip takes N >= 0 and --prompts N >= 1")
    above = [t for t in args.candidates if t > args.threshold]
    if above:
        parser.error(f"--candidates {above} exceed --threshold {args.threshold}: this run cannot judge them")

    import margingate
    from margingate.batching import encode_prompts
    from margingate.cli.report import band_rows, print_table, write_json
    from margingate.measure import gate_at, gate_report, margin_bands
    from margingate.prompt_sets import resolve

    from .harness import run_header

    print(run_header())
    model, tokenizer = margingate.load_default_model(progress=False)
    signals = None if args.no_signals else Signals(model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: dict[str, Any] = {
        "threshold": args.threshold, "batch_sizes": args.batch_sizes, "tokens": args.tokens, "skip": args.skip,
    }  # fmt: skip
    started = time.perf_counter()
    kept: dict[tuple[str, str, str], dict[str, Any]] = {}  # (mode, set, signal) -> counts, for the transfer
    raw = {name: resolve(name)[args.skip : args.skip + args.prompts] for name in args.sets}
    empty = [name for name, prompts in raw.items() if not prompts]
    if empty:
        parser.error(f"--skip {args.skip} leaves no prompts in {', '.join(empty)}")
    vocab = margingate.hf_compat.vocab_size(model)
    encoded = {name: encode_prompts(prompts, tokenizer, vocab, name) for name, prompts in raw.items()}
    for mode in args.modes:
        for name, prompts in encoded.items():
            sampling = dict(SEEDED) if mode == "seeded" else None
            print(f"\n{name}, {mode}: {len(prompts)} prompts x {args.tokens} tokens", flush=True)
            recorded: dict[int, list[list[torch.Tensor]]] = {}
            labels: list[str] = []

            def on_run(label: str, prompts=prompts, recorded=recorded, labels=labels) -> None:
                if labels:  # the previous run is complete: keep its signals (margin runs) or drop them
                    finish(labels[-1], len(prompts), recorded)
                labels.append(label)
                print(f"  {label} ...", flush=True)

            def finish(label: str, n: int, recorded: dict) -> None:
                b = _batch_of(label)
                per_prompt = signals.take(n, b) if signals else None
                if per_prompt is not None and label.startswith("margin"):
                    recorded[b] = per_prompt

            table = gate_report(
                model, prompts, batch_sizes=args.batch_sizes, max_new_tokens=args.tokens, probe_threshold=args.threshold,
                candidates=args.candidates, eos=eos, pad_id=pad, sampling=sampling, on_run=on_run, keep_runs=True,
            )  # fmt: skip
            finish(labels[-1], len(prompts), recorded)
            table["margin_bands"] = margin_bands(table, args.threshold)
            if signals and mode == "greedy":
                table["signals"], table["relative"] = {}, {}
                for column, (signal, candidates) in enumerate(SIGNALS):
                    counts = signal_counts(table, recorded, column)
                    kept[(mode, name, signal)] = counts
                    if candidates:
                        table["signals"][signal] = [gate_at(counts, t) for t in candidates]
                    table["relative"][signal] = [gate_at(counts, t) for t in relative_thresholds(counts)]
            for bulky in ("step_margins", "runs", "canonical"):
                table.pop(bulky)
            results[f"{name}/{mode}"] = table
            print(
                f"{name}, {mode}: {table['steps']} decode steps in {len(args.batch_sizes)} configurations, {table['flips']} flips "
                f"(flip rate {100 * table['flip_rate']:.2f} %), largest flip margin {table['max_flip_margin']}, "
                f"end to end at {args.threshold:g}: {len(table['end_to_end_mismatches'])} (prompt, configuration) pairs "
                f"differ from the canonical tokens, {table['cross_config_divergences']} prompts differ between configurations"
            )
            for signal, rows in {"bf16 margin (the gate)": table["candidates"], **table.get("signals", {})}.items():
                print(f"gate on the {signal}:")
                print_table(
                    [
                        {
                            "threshold": r["threshold"],
                            "trigger rate": f"{100 * r['trigger_rate']:.2f} %",
                            "escapes": r["escapes"],
                            "triggers per flip": f"{r['triggers_per_flip']:.1f}",
                        }
                        for r in rows
                    ]
                )
            print("flips / steps by fast margin:")
            print_table(band_rows(table["margin_bands"]))
            if table.get("relative"):
                print("every signal at 1 / 1.5 / 2 x its largest flip value (trigger rate, escapes):")
                print_table([_relative_row(signal, rows) for signal, rows in table["relative"].items()])
            if args.json:  # after every set and mode: a long study keeps what it measured
                write_json(args.json, results)
        measured = [name for name in encoded if (mode, name, SIGNALS[0][0]) in kept]
        pairs = list(zip(measured, measured[1:] + measured[:1], strict=True)) if len(measured) > 1 else []
        for source, target in pairs:
            transfer = {
                signal: [gate_at(kept[(mode, target, signal)], t) for t in relative_thresholds(kept[(mode, source, signal)])]
                for signal, _ in SIGNALS
            }
            results[f"transfer {source} -> {target}/{mode}"] = transfer
            print(f"\n{mode}: thresholds of {source} (1 / 1.5 / 2 x its largest flip value) on {target}:")
            print_table([_relative_row(signal, rows) for signal, rows in transfer.items()])
    results["seconds"] = time.perf_counter() - started
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
