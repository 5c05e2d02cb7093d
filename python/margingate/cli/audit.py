"""``margingate audit``: re-scores transcripts against the canonical reference (Token-DiFR scores,
exactly 0 for an honest margingate run) and prints a verdict per transcript."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..difr import audit
from ..transcripts import TranscriptError, read_transcripts
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    load_model_from_args,
    model_info,
    one_line,
    require_canonical_forward,
    say,
)  # fmt: skip
from .options import UsageError
from .report import check_writable, fmt, pct, print_table, require_matplotlib, write_histogram, write_json


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    has_fp = any("fingerprint_max" in r for r in rows)
    table = []
    for r in rows:
        row = {
            "id": r["id"],
            "provider": r["provider"] or "-",
            "sampling": r["sampling"],
            "tokens": r["tokens"],
            "match": pct(r["match_rate"]),
            "mean score": r["mean_score"],
            "max score": r["max_score"],
        }
        if has_fp:
            row["fingerprint max"] = r.get("fingerprint_max")
        row["verdict"] = r["verdict"]
        table.append(row)
    return table


def _print_mismatches(rows: list[dict[str, Any]], show: int) -> int:
    shown = 0
    for r in rows:
        for m in r["mismatches"]:
            if shown >= show:
                break
            print(
                f"  transcript {fmt(r['id'])} token {m['step']}: provided {m['provided']}, reference {m['reference']}, "
                f"score {fmt(m['score'])}, reference margin {fmt(m['reference_margin'])}"
            )
            shown += 1
    mismatches = sum(len(r["mismatches"]) for r in rows)
    if mismatches > shown:
        print(f"  ... {mismatches - shown} more mismatching tokens (--show, --json)")
    return mismatches


def _write_plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(fmt(r["provider"] or r["verdict"]), []).extend(r["scores"])
    series = [
        (f"{label} ({len(scores)} tokens, {sum(1 for s in scores if s == 0)} at 0)", [s for s in scores if math.isfinite(s)])
        for label, scores in groups.items()
    ]
    write_histogram(
        path, series, xlabel="Token-DiFR score (logit units; 0 plotted at 0.001)", ylabel="tokens", title=title,
        bins=50, filled=False,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        check_writable(path, what)
    if args.plot:
        require_matplotlib()
    try:  # the whole file is checked before the model loads: a typo fails in a second
        transcripts = read_transcripts(args.transcripts)
    except TranscriptError as err:
        raise UsageError(f"--transcripts {err}") from None
    model, tokenizer, name = load_model_from_args(args)
    require_canonical_forward(model)
    try:
        report = audit(
            model, transcripts, tokenizer=tokenizer, threshold=args.threshold,
            fingerprint_tolerance=args.fingerprint_tolerance, batch_size=args.batch_size,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise UsageError(f"--transcripts {args.transcripts}: {one_line(err)}") from None
    rows, summary = report["transcripts"], report["summary"]
    print(
        f"\nmargingate audit: {name}, {summary['transcripts']} transcripts, {summary['tokens']} tokens, "
        f"threshold {args.threshold:g}"
    )
    print_table(_table(rows))
    mismatches = _print_mismatches(rows, args.show)
    print(
        f"{summary['exact']} exact, {summary['passed']} passed, {summary['failed']} failed; match rate "
        f"{pct(summary['match_rate'])}, mean score {fmt(summary['mean_score'])}, max score {fmt(summary['max_score'])}"
    )
    other = [fmt(r["id"]) for r in rows if r.get("other_bit_class")]
    if other:
        print(
            f"note: {len(other)} transcript(s) ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}) were made "
            f"under another canonical bit class than this machine's ({summary['canonical_bits']}): exact zero is not "
            "promised for them (build_info()['canonical_bits'])"
        )
    if mismatches:
        print(
            "note: a transcript of the fast path (`off`) may differ from the reference at near-ties without anything "
            "being wrong: compare each mismatch's reference margin with the model's gate threshold"
        )
    write_json(
        args.json,
        {"command": "audit", "model": model_info(model, name, args.dtype), "transcripts_file": args.transcripts, **report},
    )
    if args.plot:
        _write_plot(args.plot, rows, f"margingate audit, {name}")
        say(args, f"plot written to {args.plot}")
    return EXIT_FAILURE if summary["failed"] else EXIT_OK
