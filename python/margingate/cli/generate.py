"""``margingate generate``: decodes a prompt set under one policy and writes one transcript per
prompt (JSONL), the input of ``margingate audit``."""

from __future__ import annotations

import argparse

from ..difr import fingerprints
from ..generation import generate
from ..ops import canonical_bits_on
from ..sampling import prompt_seed
from ..transcripts import FINAL_HIDDEN, transcripts_from_generation, write_transcripts
from .common import (
    EXIT_OK,
    encode,
    eos_and_pad,
    load_model_from_args,
    read_prompts,
    require_canonical_forward,
)  # fmt: skip
from .options import UsageError
from .report import check_writable, pct, print_table


def run(args: argparse.Namespace) -> int:
    check_writable(args.transcripts, "--transcripts")
    raw_prompts = read_prompts(args.prompts, args.limit)
    model, tokenizer, name = load_model_from_args(args)
    require_canonical_forward(model)
    layer = args.fingerprint_layer
    if args.fingerprint is not None and layer != FINAL_HIDDEN and layer not in dict(model.named_modules()):
        raise UsageError(f"--fingerprint-layer {layer!r} is not a module of {name}")
    prompts = encode(raw_prompts, tokenizer, model)
    eos, pad = eos_and_pad(model, tokenizer)
    seeds = [prompt_seed(args.seed, i) for i in range(len(prompts))]
    try:
        result = generate(
            model, prompts, policy=args.policy, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, eos_token_id=eos, pad_token_id=pad, progress=not args.quiet,
            temperature=args.temperature, top_k=args.top_k, min_p=args.min_p, seed=seeds,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    provider = f"margingate {args.policy} batch {args.batch_size or len(prompts)}"
    bits = canonical_bits_on(next(model.parameters()).device)
    transcripts = transcripts_from_generation(prompts, result.sequences, provider, canonical_bits=bits)
    if args.temperature > 0:  # each transcript carries what the audit needs to re-sample it
        for t, seed in zip(transcripts, seeds, strict=True):
            t.temperature, t.seed, t.top_k, t.min_p = args.temperature, seed, args.top_k or 0, args.min_p or 0.0
    if args.fingerprint is not None:
        try:
            transcripts = fingerprints(
                model, transcripts, k=args.fingerprint, seed=args.fingerprint_seed, layer=layer, pad_token_id=pad
            )
        except ValueError as err:
            raise UsageError(f"--fingerprint: {err}") from None
    try:
        write_transcripts(args.transcripts, transcripts)
    except OSError as err:
        raise UsageError(f"cannot write {args.transcripts}: {err.strerror or err}") from None
    stats = result.stats
    print_table(
        [
            {
                "policy": args.policy,
                "prompts": len(prompts),
                "tokens": sum(len(s) for s in result.sequences),
                "trigger rate": pct(stats.get("trigger_rate")) if args.policy != "off" else "-",
                "fingerprints": args.fingerprint or "-",
                "seconds": round(stats.get("seconds", 0.0), 1),
            }
        ]
    )
    print(f"transcripts written to {args.transcripts} (audit: margingate audit --transcripts {args.transcripts})")
    return EXIT_OK
