"""vLLM outputs as margingate audit transcripts, and the margins side channel's reader."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..transcripts import Transcript


def transcripts_from_outputs(
    outputs: Sequence[Any], sampling_params: Any | Sequence[Any], *, provider: str | None = "vllm"
) -> list[Transcript]:
    """One ``margingate.transcripts.Transcript`` per vLLM ``RequestOutput`` (its first completion).

    ``sampling_params``: the ``SamplingParams`` the requests were made with, one for all or one
    per output (vLLM's outputs do not carry them). A T > 0 request must have a seed (margingate's
    noise is keyed by it; an unseeded vLLM sample cannot be re-scored) and no top_p. The
    transcript's id is the request id; score them with ``margingate.audit(model, transcripts)`` or
    write them with ``margingate.transcripts.write_transcripts`` for ``margingate audit``."""
    if not isinstance(sampling_params, Sequence):
        sampling_params = [sampling_params] * len(outputs)
    if len(sampling_params) != len(outputs):
        raise ValueError(
            f"margingate.vllm.transcripts_from_outputs: {len(outputs)} outputs but "
            f"{len(sampling_params)} sampling_params"
        )
    transcripts = []
    for output, params in zip(outputs, sampling_params, strict=True):
        if output.prompt_token_ids is None:
            raise ValueError(f"margingate.vllm.transcripts_from_outputs: request {output.request_id} has no prompt ids")
        temperature = float(params.temperature)
        transcript = Transcript(
            output_ids=list(output.outputs[0].token_ids),
            prompt_ids=list(output.prompt_token_ids),
            temperature=temperature,
            id=output.request_id,
            provider=provider,
        )
        if temperature > 0:
            if params.seed is None:
                raise ValueError(
                    f"margingate.vllm.transcripts_from_outputs: request {output.request_id} sampled at "
                    "T > 0 without a seed; it cannot be re-scored"
                )
            if params.top_p < 1.0:
                raise ValueError(
                    f"margingate.vllm.transcripts_from_outputs: request {output.request_id} used top_p, "
                    "which margingate's sampling rule does not have"
                )
            transcript.seed = int(params.seed)
            transcript.top_k = int(params.top_k) if params.top_k and params.top_k > 0 else 0
            transcript.min_p = float(params.min_p)
        transcripts.append(transcript)
    return transcripts


def read_margins(path: str | Path) -> dict[str, dict[int, dict[str, Any]]]:
    """The margins file (``MARGINGATE_VLLM_MARGINS``) as ``{tag: {position: record}}``; a record is
    ``{"token", "runner_up", "margin", "cutoff_margin"}``. The last line of a (tag, position) wins
    (earlier ones are logits of a partial prefill chunk that vLLM discarded). Positions count the
    prompt: output token ``i`` of a request with a prompt of ``n`` tokens is position ``n + i``."""
    margins: dict[str, dict[int, dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                tag, position = record.pop("tag"), record.pop("position")
                margins.setdefault(tag, {})[position] = record
    return margins
