"""MarginGate generation: the Hugging Face logits-processor hook, the four policies, K/V repair.

Greedy decoding keeps the fast (vendor-kernel) path. Each step ``MarginGateProcessor`` computes
the top-1/top-2 logit margin of every row; rows whose margin is below the threshold (or NaN) are
re-run together, for their current position only, with the canonical (batch-invariant) forward
over the shared batch cache. That forward overwrites the position's K/V column in place (the
repair) and its logits replace the row's scores, so the token chosen and everything the cache
holds for that position no longer depend on the batch the row happened to be in.

Why a low margin is the only place a batch can change a token: the fast path's logits differ
between batch shapes by a few ulps of bf16 accumulation, so only a step whose top-2 are closer
than that can flip. The threshold is calibrated to sit well above that noise
(``CALIBRATED_THRESHOLDS``); it is an empirical bound, not a proof: the verifier reads the K/V of
earlier, unverified positions, which the fast path computed. ``always`` (every position verified,
canonical prefill) and ``invariant`` are exact.

Policies (``POLICIES``):

- ``off``: the fast path only (the baseline that flips);
- ``margin``: MarginGate, verify rows with margin < threshold;
- ``always``: verify every row at every step (the always-on baseline);
- ``invariant``: the whole generation under ``margingate.batch_invariant()``.

Canonical prefill (on by default in ``generate`` for every policy but ``off``) runs the prompt's
single prefill forward in batch-invariant mode, so prompt K/V is canonical too without running
the prompt twice; the first generated token then needs no verification.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache, DynamicLayer

from .ops import margin as _margin

POLICIES = ("off", "margin", "always", "invariant")

# Thresholds calibrated on real checkpoints (logit units, bf16 model, margin of the fast-path
# logits), keyed by (HF model_type, vocab size).
# Gemma 3 270M (bf16, CPU): 16 prompts x 64 tokens decoded in batches of 16 and of 8 diverged on 4
# sequences, every time at a fast margin of 0 or 0.125 (one bf16 ulp at these logit magnitudes);
# 0.5 covers 4 ulps (the verifier also reads the unverified, batch-dependent K/V of earlier
# positions) and flagged 7.8 % of those steps. See bench/README.md, "generation".
CALIBRATED_THRESHOLDS: dict[tuple[str, int], float] = {("gemma3_text", 262144): 0.5}

# For a model without a calibration: DESIGN.md measured first divergences at margins 0.06-0.13 on
# Gemma 3 270M with a median margin of 3.4; 0.5 leaves a 4x safety factor over the largest flip.
FALLBACK_THRESHOLD = 0.5

_NAME = "margingate.MarginGateProcessor"


def default_threshold(model: torch.nn.Module) -> float:
    """The calibrated threshold for this model if there is one, else ``FALLBACK_THRESHOLD``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    key = (str(getattr(config, "model_type", "")), int(getattr(config, "vocab_size", 0) or 0))
    return CALIBRATED_THRESHOLDS.get(key, FALLBACK_THRESHOLD)


@contextlib.contextmanager
def canonical_mode(model: torch.nn.Module) -> Iterator[None]:
    """The mode of the canonical forward for ``model``: batch-invariant kernels plus the
    ``"margingate"`` attention implementation (what ``canonical_forward`` runs under)."""
    from .batch_invariant import batch_invariant

    with batch_invariant(model):
        yield


def _check_policy(policy: str, where: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"{where}: policy must be one of {POLICIES}, got {policy!r}")


def _check_threshold(threshold: float | None, where: str) -> None:
    if threshold is None:
        return
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"{where}: threshold must be a float, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"{where}: threshold must be >= 0 (a logit margin), got {threshold}")


def _check_model(model: torch.nn.Module, where: str) -> None:
    from . import SUPPORTED_MODEL_TYPES  # bimode's list of model families proven by tests

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: unsupported model type {model_type!r}; the canonical forward is proven for "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )


def _check_cache(cache: Any, where: str) -> None:
    if type(cache) is not DynamicCache:
        raise TypeError(
            f"{where}: cache must be a transformers DynamicCache() (built without a config), got "
            f"{type(cache).__name__}; the verifier rewrites K/V columns of a plain full cache in place"
        )
    bad = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate not in (None, DynamicLayer):
        bad.add(replicate.__name__)
    if bad:
        raise TypeError(
            f"{where}: cache must be a DynamicCache() built WITHOUT a config so every layer is a plain "
            f"DynamicLayer; got layers {sorted(bad)} (sliding-window truncation drops the columns the "
            "verifier attends to and rewrites)"
        )


def _check_greedy(config: GenerationConfig, where: str) -> None:
    if config.do_sample:
        raise ValueError(
            f"{where}: sampling (do_sample=True) is not supported; MarginGate makes greedy "
            "(temperature 0) decoding deterministic. Pass do_sample=False."
        )
    if (config.num_beams or 1) > 1:
        raise ValueError(
            f"{where}: beam search (num_beams={config.num_beams}) is not supported; use greedy decoding"
        )


class MarginGateProcessor(LogitsProcessor):
    """Margin-gated verification of greedy decoding, as a ``transformers`` logits processor.

    Use it inside a plain ``model.generate(input_ids, attention_mask=mask, past_key_values=cache,
    logits_processor=[proc], do_sample=False)`` with left-padded batches, where ``cache`` is the
    ``DynamicCache()`` given to the processor and ``mask`` the prompt attention mask (1 = token,
    0 = left padding; ``None`` = no padding).

    It must be the FIRST logits processor applied (it checks this when called from a
    ``LogitsProcessorList``): its margin has to be that of the model's logits, and the verified
    logits it returns must still pass through every later processor. ``transformers`` puts the
    processors it derives from the generation config (repetition penalty, min length, ...) before
    the user's list, so configure those through the user list instead.

    One processor serves one ``generate`` call: it follows the cache and mask step by step.

    Args:
        model: a causal LM whose ``model_type`` is in ``margingate.SUPPORTED_MODEL_TYPES``.
        cache: the ``DynamicCache()`` shared by the generate call (the verifier repairs it in place).
        policy: one of ``POLICIES``.
        threshold: verify rows whose fast-path margin is below this (logit units, >= 0); ``None``
            takes the calibrated default of the model (``default_threshold``). Only ``margin``
            uses it.
        attention_mask: the prompt's mask ``[B, P]``; extended by one column of ones per step,
            exactly as ``generate`` extends it.
        canonical_prefill: run the prefill forward of this cache in batch-invariant mode (a forward
            pre-hook that enters ``margingate.batch_invariant()`` for the call that fills the empty
            cache, so the prompt runs once).
        eos_token_id: rows that generated one of these are finished: not counted, not verified.
        record_margins: keep every step's fast-path margin per row (``margins``) for plotting.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: DynamicCache,
        policy: str = "margin",
        threshold: float | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        canonical_prefill: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        record_margins: bool = False,
    ) -> None:
        _check_policy(policy, _NAME)
        _check_threshold(threshold, _NAME)
        _check_model(model, _NAME)
        _check_cache(cache, _NAME)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"{_NAME}: attention_mask must be 2-D [batch, prompt_length], got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(torch.long)
        self.model = model
        self.cache = cache
        self.policy = policy
        if policy == "always":
            self.threshold = math.inf
        elif policy == "margin":
            self.threshold = float(default_threshold(model) if threshold is None else threshold)
        else:
            self.threshold = 0.0
        self.prompt_mask = attention_mask
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(t) for t in eos_token_id]
        self.eos_token_id = torch.tensor(eos, dtype=torch.long)
        self.record_margins = record_margins

        # Per-run state, set on the first call.
        self.prompt_length: int | None = None
        self.batch_size: int | None = None
        self._last_length: int | None = None
        self._mask: torch.Tensor | None = None
        self.prefill_was_canonical = False
        self.steps: torch.Tensor | None = None  # [B] int64: decode steps per active row
        self.verified: torch.Tensor | None = None
        self.repairs: torch.Tensor | None = None
        self.repair_events: list[tuple[int, int, float]] = []  # (row, step, fast margin)
        self.verified_rows: list[list[int]] = []  # per step: the rows the verifier re-ran
        self.verify_starts: list[int | None] = []  # per step: first position of the replayed window
        self.replayed: torch.Tensor | None = None  # [B] int64: positions recomputed canonically
        self._canonical_upto: torch.Tensor | None = None  # [B]: positions < this are canonical K/V
        self.margins: list[torch.Tensor] = []  # per step [B] fp32, NaN for finished rows

        self._hooks: list[Any] = []
        if canonical_prefill:
            self._install_prefill_hooks()

    # ------------------------------------------------------------------ canonical prefill
    def _install_prefill_hooks(self) -> None:
        state: dict[str, Any] = {"mode": None}

        def is_prefill(kwargs: dict[str, Any]) -> bool:
            return kwargs.get("past_key_values") is self.cache and self.cache.get_seq_length() == 0

        def pre_hook(module, args, kwargs):
            if state["mode"] is None and is_prefill(kwargs):
                mode = canonical_mode(self.model)
                mode.__enter__()
                state["mode"] = mode
                self.prefill_was_canonical = True

        def post_hook(module, args, kwargs, output):
            mode = state["mode"]
            if mode is not None:
                state["mode"] = None
                mode.__exit__(None, None, None)

        self._hooks.append(self.model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(post_hook, with_kwargs=True, always_call=True))

    def remove_hooks(self) -> None:
        """Removes the canonical-prefill hooks (done automatically at the first step)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ the step
    def _check_caller(self) -> None:
        """Best effort: when called by a LogitsProcessorList inside ``generate``, check that this
        processor is first and that decoding is greedy."""
        frame = sys._getframe(3)  # _check_caller <- _start <- __call__ <- its caller
        for _ in range(3):
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if isinstance(owner, LogitsProcessorList) and len(owner) and owner[0] is not self:
                index = next((i for i, p in enumerate(owner) if p is self), None)
                if index is not None:
                    before = [type(p).__name__ for p in owner[:index]]
                    raise ValueError(
                        f"{_NAME} must be the first logits processor (it gates on the model's own logits "
                        f"and its verified logits must pass through the later ones); it runs after {before}. "
                        "transformers puts processors derived from the generation config first: pass them "
                        "in logits_processor after the MarginGateProcessor instead."
                    )
            config = frame.f_locals.get("generation_config")
            if isinstance(config, GenerationConfig):
                _check_greedy(config, _NAME)
                return
            frame = frame.f_back

    def _start(self, input_ids: torch.Tensor) -> None:
        self.remove_hooks()
        batch, length = input_ids.shape
        if self.prompt_mask is None:
            self.prompt_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
        if tuple(self.prompt_mask.shape) != (batch, length):
            raise ValueError(
                f"{_NAME}: attention_mask has shape {tuple(self.prompt_mask.shape)} but the first step sees "
                f"input_ids of shape {(batch, length)}; pass the prompt mask given to generate"
            )
        self.prompt_mask = self.prompt_mask.to(input_ids.device)
        self.prompt_length = length
        self.batch_size = batch
        self._mask = self.prompt_mask
        self.steps = torch.zeros(batch, dtype=torch.long)
        self.verified = torch.zeros(batch, dtype=torch.long)
        self.repairs = torch.zeros(batch, dtype=torch.long)
        self.replayed = torch.zeros(batch, dtype=torch.long)
        # A canonical prefill made every prompt position canonical; otherwise the prompt stays as
        # the fast path wrote it and only the last prompt position is re-run at the first step.
        self._canonical_upto = torch.full((batch,), length if self.prefill_was_canonical else length - 1)
        self._check_caller()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        if self.prompt_length is None:
            self._start(input_ids)
        elif batch != self.batch_size or length != self._last_length + 1:
            raise RuntimeError(
                f"{_NAME}: expected input_ids of shape {(self.batch_size, self._last_length + 1)}, got "
                f"{(batch, length)}; a processor serves exactly one generate call (make a new one per call)"
            )
        self._last_length = length
        if self.policy in ("margin", "always"):
            _check_cache(self.cache, _NAME)
            if self.cache.get_seq_length() != length:
                raise RuntimeError(
                    f"{_NAME}: the cache holds {self.cache.get_seq_length()} positions but the sequence has "
                    f"{length}; pass the same DynamicCache as past_key_values to generate"
                )
        step = length - self.prompt_length
        if self._mask.shape[1] < length:
            pad = self._mask.new_ones((batch, length - self._mask.shape[1]))
            self._mask = torch.cat([self._mask, pad], dim=1)

        active = torch.ones(batch, dtype=torch.bool)
        if step > 0 and self.eos_token_id.numel():
            generated = input_ids[:, self.prompt_length :].cpu()
            active = ~torch.isin(generated, self.eos_token_id).any(dim=1)
        self.steps += active.long()

        self.verified_rows.append([])
        self.verify_starts.append(None)
        gate = self.policy in ("margin", "always") and not (step == 0 and self.prefill_was_canonical)
        if not gate and not self.record_margins:
            return scores
        top1, _, fast_margin = _margin(scores)
        if self.record_margins:
            self.margins.append(torch.where(active, fast_margin.cpu(), torch.nan))
        if not gate:
            return scores

        # NaN margins fail `>=` and get verified: a NaN row is exactly where the fast path is unreliable.
        flagged = active & ~(fast_margin.cpu() >= self.threshold)
        rows = flagged.nonzero().flatten()
        if rows.numel() == 0:
            return scores
        from . import canonical_forward

        # The verifier replays each flagged row from its first non-canonical position (the one
        # after its previous verification) to the current one. Re-running only the current position
        # would attend over K/V that the fast path wrote since then, which differ by a few ulps
        # between batches and can flip a near-tie of the verified logits; after the replay the row's
        # whole cache, and so its verified logits, are canonical: a function of its tokens alone.
        # One window length serves all flagged rows (re-running a canonical position reproduces it
        # bit for bit, the canonical forward being Tq-invariant).
        start = min(int(self._canonical_upto[rows].min()), length - 1)
        rows_dev = rows.to(input_ids.device)
        verified_logits = canonical_forward(
            self.model,
            input_ids.index_select(0, rows_dev)[:, start:],
            attention_mask=self._mask,
            past_key_values=self.cache,
            rows=rows_dev,
            # Only the current position's logits are used; the lm head is row-invariant, so
            # skipping the window's earlier positions leaves these bits unchanged.
            logits_to_keep=1,
        )
        verified = verified_logits[:, -1].to(dtype=scores.dtype, device=scores.device)
        changed = (verified.argmax(dim=-1) != top1.index_select(0, rows_dev)).cpu()
        self.verified[rows] += 1
        self.replayed[rows] += length - start
        self._canonical_upto[rows] = length
        self.verified_rows[-1] = rows.tolist()
        self.verify_starts[-1] = start
        self.repairs[rows[changed]] += 1
        for row in rows[changed].tolist():
            self.repair_events.append((row, step, float(fast_margin[row])))
        # Out of place: generate may keep the raw logits tensor (output_logits=True).
        return scores.index_copy(0, rows_dev, verified)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Totals and per-row figures of the run so far (see ``GenerationResult.stats``)."""
        if self.steps is None:
            return _stats_from_rows([], policy=self.policy, threshold=self.threshold)
        rows = []
        for r in range(self.batch_size):
            rows.append(
                {
                    "steps": int(self.steps[r]),
                    "verified": int(self.verified[r]),
                    "repairs": int(self.repairs[r]),
                    "replayed_positions": int(self.replayed[r]),
                    "repair_steps": [s for (row, s, _) in self.repair_events if row == r],
                    "repair_margins": [m for (row, _, m) in self.repair_events if row == r],
                }
            )
        return _stats_from_rows(rows, policy=self.policy, threshold=self.threshold)


def _stats_from_rows(
    rows: list[dict[str, Any]], *, policy: str, threshold: float, seconds: float = 0.0
) -> dict[str, Any]:
    steps = sum(r["steps"] for r in rows)
    verified = sum(r["verified"] for r in rows)
    repairs = sum(r["repairs"] for r in rows)
    replayed = sum(r["replayed_positions"] for r in rows)
    for r in rows:
        r["trigger_rate"] = r["verified"] / r["steps"] if r["steps"] else 0.0
    return {
        "policy": policy,
        "threshold": threshold,
        "steps": steps,
        "verified": verified,
        "repairs": repairs,
        "replayed_positions": replayed,
        "trigger_rate": verified / steps if steps else 0.0,
        "repair_margins": [m for r in rows for m in r["repair_margins"]],
        "per_row": rows,
        "seconds": seconds,
    }


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` returns.

    ``sequences[i]``: the generated token ids of prompt ``i`` (no prompt, no padding; up to and
    including the first EOS when stopping at EOS). ``stats``: ``steps`` (decode steps of unfinished
    rows), ``verified``, ``repairs`` (verified steps whose token changed), ``trigger_rate``
    (= verified / steps), ``replayed_positions`` (positions the verifier recomputed: each
    verification replays the row from its first non-canonical position), ``repair_margins``
    (fast-path margin at each repair), ``per_row`` (the
    same per prompt, in prompt order, plus ``repair_steps``), ``seconds`` (wall time of the
    ``model.generate`` calls), ``policy``, ``threshold``. ``margins[i]``: prompt ``i``'s fast-path
    margin at every step, when asked for with ``record_margins=True``.
    """

    sequences: list[list[int]]
    stats: dict[str, Any]
    margins: list[list[float]] | None = None


def _encode(prompts: Sequence[Any], tokenizer: Any) -> list[list[int]]:
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("margingate.generate: prompts are strings, pass tokenizer= to encode them")
            p = tokenizer(p)["input_ids"]
        elif isinstance(p, torch.Tensor):
            p = p.flatten().tolist()
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"margingate.generate: prompt {i} is empty")
        encoded.append(p)
    return encoded


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Any],
    *,
    policy: str = "margin",
    threshold: float | None = None,
    max_new_tokens: int = 64,
    tokenizer: Any = None,
    batch_size: int | None = None,
    canonical_prefill: bool = True,
    progress: bool = False,
    record_margins: bool = False,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Greedy decoding of ``prompts`` under a MarginGate ``policy``.

    ``prompts``: token-id lists (or strings, with ``tokenizer``). They are decoded in order, in
    left-padded batches of ``batch_size`` (``None``: one batch), each with its own
    ``DynamicCache()`` and ``MarginGateProcessor``. ``canonical_prefill`` applies to ``margin`` and
    ``always`` (``invariant`` is canonical throughout, ``off`` never). Extra keyword arguments go to
    ``model.generate`` (sampling and beam search are refused).
    """
    where = "margingate.generate"
    _check_policy(policy, where)
    _check_threshold(threshold, where)
    _check_model(model, where)
    if max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if generate_kwargs.get("do_sample") or (generate_kwargs.get("temperature") or 0) > 0:
        raise ValueError(
            f"{where}: sampling (do_sample / temperature > 0) is not supported; MarginGate makes greedy "
            "(temperature 0) decoding deterministic"
        )
    for key in ("past_key_values", "logits_processor", "attention_mask", "generation_config"):
        if key in generate_kwargs:
            raise ValueError(
                f"{where}: {key} is set up by margingate.generate; use MarginGateProcessor directly"
            )

    encoded = _encode(prompts, tokenizer)
    if eos_token_id is not None:
        eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    else:
        eos = _eos_ids(model, tokenizer)
    if not stop_at_eos:
        eos = []
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    pad_token_id = int(pad_token_id if not isinstance(pad_token_id, list) else pad_token_id[0])

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        eos_token_id=eos or None,
        pad_token_id=pad_token_id,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        temperature=None,
        top_k=None,
        top_p=None,
    )
    if not eos:
        # generate fills an unset eos_token_id from the model's generation config; an id past the
        # vocabulary can never be the argmax, so this is "no EOS" without touching the model.
        config.eos_token_id = int(model.config.get_text_config().vocab_size)
    size = batch_size or len(encoded)
    device = next(model.parameters()).device
    chunks = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"generate[{policy}]", unit="batch")

    sequences: list[list[int] | None] = [None] * len(encoded)
    per_row: list[dict[str, Any] | None] = [None] * len(encoded)
    margins: list[list[float]] | None = [[] for _ in encoded] if record_margins else None
    seconds = 0.0
    threshold_used = 0.0

    for chunk in chunks:
        ids, mask = _left_pad([encoded[i] for i in chunk], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        proc = MarginGateProcessor(
            model,
            cache,
            policy=policy,
            threshold=threshold,
            attention_mask=mask,
            canonical_prefill=canonical_prefill and policy in ("margin", "always"),
            eos_token_id=eos,
            record_margins=record_margins,
        )
        threshold_used = proc.threshold
        mode = contextlib.nullcontext()
        if policy == "invariant":
            mode = canonical_mode(model)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), mode:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    past_key_values=cache,
                    logits_processor=LogitsProcessorList([proc]),
                    generation_config=config,
                    **generate_kwargs,
                )
        finally:
            proc.remove_hooks()
        seconds += time.perf_counter() - t0
        new = out[:, ids.shape[1] :].cpu()
        stats = proc.stats()
        for r, i in enumerate(chunk):
            tokens = new[r].tolist()
            for j, t in enumerate(tokens):
                if t in eos:
                    tokens = tokens[: j + 1]
                    break
            sequences[i] = tokens
            per_row[i] = stats["per_row"][r]
            if margins is not None:
                margins[i] = [float(m[r]) for m in proc.margins][: stats["per_row"][r]["steps"]]
    totals = _stats_from_rows(per_row, policy=policy, threshold=threshold_used, seconds=seconds)
    return GenerationResult(sequences=sequences, stats=totals, margins=margins)
