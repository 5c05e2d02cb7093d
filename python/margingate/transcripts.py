"""Transcripts: what a provider claims to have produced, as margingate reads and writes them.

A transcript is a prompt (``prompt_ids``, or ``prompt`` text with a tokenizer), the
``output_ids`` the provider returned and the sampling parameters it claims (greedy, or
``temperature`` > 0 with ``seed`` and optionally ``top_k`` / ``min_p``, as
``margingate.ops.sample_margin`` defines them), optionally with Activation-DiFR fingerprints.
One JSON object per line of a JSONL file (read through ``margingate.jsonl``: one-line errors
naming the file and line). ``margingate.difr`` scores them; this module needs neither torch nor
transformers, so the command line checks a transcript file before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .jsonl import JSONFileError, read_jsonl

__all__ = [
    "DEFAULT_AUDIT_BATCH_SIZE",
    "FINAL_HIDDEN",
    "Transcript",
    "TranscriptError",
    "parse_transcript",
    "read_transcripts",
    "transcripts_from_generation",
    "write_transcripts",
]

DEFAULT_AUDIT_BATCH_SIZE = 8
FINAL_HIDDEN = "final"  # the fingerprint layer meaning: the input of the output embedding
_KEYS = {
    "id",
    "provider",
    "prompt",
    "prompt_ids",
    "output_ids",
    "temperature",
    "top_k",
    "min_p",
    "seed",
    "fingerprint",
    "canonical_bits",
}


class TranscriptError(ValueError):
    """A malformed transcript; the message is one line naming the transcript and the field."""


@dataclasses.dataclass
class Transcript:
    """One transcript, validated. ``temperature == 0`` is greedy (``seed``, ``top_k``, ``min_p``
    unused). ``fingerprint``: ``{"k": int, "seed": int, "layer": str, "values": [[k floats] per
    output token]}`` or None. ``prompt`` is kept when given as text (``prompt_ids`` then None until
    encoded)."""

    output_ids: list[int]
    prompt_ids: list[int] | None = None
    prompt: str | None = None
    temperature: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    fingerprint: dict[str, Any] | None = None
    id: Any = None
    provider: str | None = None
    # the bit class of the canonical forward where the transcript was made (build_info()["canonical_bits"])
    canonical_bits: str | None = None
    source: str | None = dataclasses.field(default=None, compare=False)  # "FILE line N"; not written

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        if self.provider is not None:
            d["provider"] = self.provider
        if self.canonical_bits is not None:
            d["canonical_bits"] = self.canonical_bits
        if self.prompt_ids is not None:
            d["prompt_ids"] = list(self.prompt_ids)
        else:
            d["prompt"] = self.prompt
        d["output_ids"] = list(self.output_ids)
        d["temperature"] = self.temperature
        if self.temperature > 0:
            d.update(seed=self.seed, top_k=self.top_k, min_p=self.min_p)
        if self.fingerprint is not None:
            d["fingerprint"] = self.fingerprint
        return d


# ----------------------------------------------------------------------------- parsing
def check_token_ids(value: Any, name: str, where: str, vocab: int | None) -> list[int]:
    if not isinstance(value, list) or not value:
        raise TranscriptError(f"{where}: {name} must be a non-empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TranscriptError(f"{where}: {name} holds {t!r}; token ids must be integers")
        if t < 0:
            raise TranscriptError(f"{where}: {name} holds token id {t}; token ids are >= 0")
        if vocab is not None and t >= vocab:
            raise TranscriptError(f"{where}: {name} holds token id {t}, outside the vocabulary [0, {vocab})")
    return [int(t) for t in value]


def _number(d: dict, key: str, where: str, default: float, low: float, high: float) -> float:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TranscriptError(f"{where}: {key} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise TranscriptError(f"{where}: {key} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def parse_transcript(d: Any, where: str = "transcript", vocab_size: int | None = None) -> Transcript:
    """A ``Transcript`` from its JSON dict; raises ``TranscriptError`` (one line) when malformed."""
    if not isinstance(d, dict):
        raise TranscriptError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "top_p" in d:
        raise TranscriptError(f"{where}: top_p cannot be audited exactly; use top_k or min_p")
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise TranscriptError(
            f"{where}: unknown field(s) {', '.join(unknown)} (expected some of {', '.join(sorted(_KEYS))})"
        )
    has_text, has_ids = "prompt" in d, "prompt_ids" in d
    if has_text == has_ids:
        raise TranscriptError(f"{where}: give exactly one of prompt (text) and prompt_ids")
    if has_text and (not isinstance(d["prompt"], str) or not d["prompt"]):
        raise TranscriptError(f"{where}: prompt must be a non-empty string")
    if "output_ids" not in d:
        raise TranscriptError(f"{where}: output_ids is missing")
    t = Transcript(
        output_ids=check_token_ids(d["output_ids"], "output_ids", where, vocab_size),
        prompt_ids=check_token_ids(d["prompt_ids"], "prompt_ids", where, vocab_size) if has_ids else None,
        prompt=d["prompt"] if has_text else None,
        temperature=_number(d, "temperature", where, 0.0, 0.0, 1e6),
        id=d.get("id"),
        provider=d.get("provider"),
    )
    if t.provider is not None and not isinstance(t.provider, str):
        raise TranscriptError(f"{where}: provider must be a string")
    bits = d.get("canonical_bits")
    if bits is not None and not (isinstance(bits, str) and 0 < len(bits) <= 64):
        raise TranscriptError(f"{where}: canonical_bits must be a short string like '1/cpu-fma8', got {bits!r}")
    t.canonical_bits = bits
    if t.temperature > 0:
        seed = d.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise TranscriptError(f"{where}: temperature > 0 needs an integer seed (64-bit), got {seed!r}")
        t.seed = int(seed)
        top_k = d.get("top_k", 0) or 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise TranscriptError(f"{where}: top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        t.top_k = int(top_k)
        t.min_p = _number(d, "min_p", where, 0.0, 0.0, 1.0)
    if "fingerprint" in d and d["fingerprint"] is not None:
        t.fingerprint = _parse_fingerprint(d["fingerprint"], len(t.output_ids), where)
    return t


def _parse_fingerprint(fp: Any, n: int, where: str) -> dict[str, Any]:
    if not isinstance(fp, dict) or not {"k", "seed", "values"} <= set(fp):
        raise TranscriptError(f"{where}: fingerprint must be an object with k, seed, values (and layer)")
    k, seed, layer = fp["k"], fp["seed"], fp.get("layer", FINAL_HIDDEN)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TranscriptError(f"{where}: fingerprint.k must be an integer >= 1, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TranscriptError(f"{where}: fingerprint.seed must be an integer, got {seed!r}")
    if not isinstance(layer, str):
        raise TranscriptError(f"{where}: fingerprint.layer must be a module name or {FINAL_HIDDEN!r}")
    values = fp["values"]
    if not isinstance(values, list) or len(values) != n:
        raise TranscriptError(f"{where}: fingerprint.values must hold one vector per output token ({n})")
    for row in values:
        if (
            not isinstance(row, list)
            or len(row) != k
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in row
            )
        ):
            raise TranscriptError(f"{where}: fingerprint.values must be lists of {k} finite numbers")
    return {"k": k, "seed": seed, "layer": layer, "values": values}


def read_transcripts(path: str | Path, vocab_size: int | None = None) -> list[Transcript]:
    """The transcripts of a JSONL file (one JSON object a line; blank lines skipped). Raises
    ``TranscriptError`` with a one-line message naming the file and line of the first problem;
    each transcript remembers its line (``source``), so a later check against a model's
    vocabulary names the line too."""
    try:
        values = read_jsonl(path, "transcripts")
    except JSONFileError as err:
        raise TranscriptError(str(err)) from None
    transcripts = []
    for number, d in values:
        where = f"{path} line {number}"
        t = parse_transcript(d, where, vocab_size)
        t.source = where
        transcripts.append(t)
    if not transcripts:
        raise TranscriptError(f"{path}: no transcripts (expected one JSON object per line)")
    return transcripts


def write_transcripts(path: str | Path, transcripts: Sequence[Transcript]) -> None:
    """Writes ``transcripts`` as JSONL (floats as their shortest round-tripping decimal, so the
    fingerprints read back bit for bit), atomically: a temporary file beside the target, renamed."""
    target = Path(path).expanduser()
    text = "".join(json.dumps(t.to_json(), allow_nan=False) + "\n" for t in transcripts)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def transcripts_from_generation(
    prompts: Sequence[Sequence[int]],
    sequences: Sequence[Sequence[int]],
    provider: str | None = None,
    canonical_bits: str | None = None,
) -> list[Transcript]:
    """Greedy transcripts of ``generate``'s prompts (token ids) and ``GenerationResult.sequences``;
    ``canonical_bits``: the bit class they were made under (``build_info()["canonical_bits"]``)."""
    return [
        Transcript(output_ids=list(s), prompt_ids=list(p), id=i, provider=provider, canonical_bits=canonical_bits)
        for i, (p, s) in enumerate(zip(prompts, sequences, strict=True))
    ]
