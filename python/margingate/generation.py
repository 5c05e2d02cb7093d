"""``margingate.generate``: greedy decoding under a policy, in margingate's own decode loop.

One decode step of a left-padded batch, top to bottom (``decode_gated``: ``off``, ``margin``,
``always``, ``invariant``):

1. prefill: ``margin``, ``always`` and ``invariant`` run the prompt once with the canonical forward
   (``canonical.py``), so the prompt K/V and the first token's logits are canonical; ``off`` runs
   the model's own kernels;
2. gate: ``MarginGateProcessor`` (``processor.py``) computes every row's top-1/top-2 margin with
   the fused kernel and sends the rows below the threshold to the ``Verifier`` (``verifier.py``),
   which replays them canonically and repairs their K/V columns in place;
3. the token is the argmax of the (partly verified) scores (``MarginGateProcessor.decide`` returns
   both); finished rows get the pad id;
4. the next forward runs the new tokens on the fast path (under ``invariant``: canonically).

``window`` (LLM-42's scheme on our verifier, ``decode_window``) decodes on the fast path and every
``window`` tokens replays the unverified positions of every row in one canonical pass: the matching
prefix is committed, the verifier's token replaces the first mismatch, the rest is rolled back
(the cache cropped) and decoded again. The canonical forward is query-invariant, so the tokens do
not depend on the window size and equal ``always``'s.

The loop calls ``model(...)`` directly (``hf_compat.forward``), so no transformers release can
skip the canonical prefill by renaming a ``generate`` argument, and nothing is hooked.

Streaming: a token is *final* when no later verification can change it: at its own step for the
per-step policies, after its window's check for ``window``. ``streamer`` (optional) receives the
final tokens of each prompt as they become final; the statistics report the delay between the
fast path producing a token and the token being final, and the time to the first final token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import hf_compat
from .batching import encode_prompts
from .decoding import Batch, BatchJob, Outcome
from .policies import POLICIES, check_policy, check_threshold
from .processor import MarginGateProcessor
from .sampling import Sampling, check_seeds
from .speculative import as_drafter, check_speculative, decode_speculative
from .stats import RowStats, summarize
from .verifier import Verifier

DEFAULT_WINDOW = 64  # LLM-42's default window

_WHERE = "margingate.generate"

# Arguments of transformers' generate that this loop refuses, with the reason.
_REFUSED = {
    "num_beams": "beam search is not supported; margingate decodes one sequence per prompt",
    "num_return_sequences": "one sequence per prompt: pass a prompt several times (with its own seed) instead",
    "do_sample": "pass temperature > 0 (and seed=) to sample; do_sample alone says nothing about how",
}


def _harmless(key: str, value: Any) -> bool:
    """Whether a transformers generate argument asks for exactly what this greedy loop does."""
    if isinstance(value, bool):
        return key == "do_sample" and value is False
    if value is None:
        return True
    if key in ("num_beams", "num_return_sequences"):
        return isinstance(value, int | float) and value == 1
    return False


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` returns.

    ``sequences[i]``: the generated token ids of prompt ``i`` (no prompt, no padding; up to and
    including the first EOS when stopping at EOS). ``stats``: ``policy``, ``threshold``,
    ``prefill`` (``"canonical"`` or ``"fast"``), ``steps`` (decode steps of unfinished rows),
    ``verified``, ``repairs`` (verified steps whose token changed), ``trigger_rate``
    (= verified / steps), ``replayed_positions`` (positions the verifier recomputed: a verification
    replays the row from its canonical frontier), ``repair_margins`` (fast-path margin at each
    repair), ``stream`` (``delay_p50_s``, ``delay_p99_s``: fast path producing a token to the token
    being final; ``ttft_p50_s``, ``ttft_p99_s``: batch start to a prompt's first final token),
    ``per_row`` (the same per prompt, in prompt order, plus ``repair_steps``), ``seconds`` (wall
    time of the decode loops); under ``window`` also ``window``, ``verify_passes``, ``rolled_back``
    (tentative tokens discarded), ``rollback_rate`` (rolled back / (rolled back + steps)),
    ``redecoded_steps`` (decode steps spent re-feeding committed tokens after a rollback); with
    ``speculative`` also ``speculative``, ``mars_threshold``, ``exact``, ``drafted``, ``accepted``,
    ``acceptance_rate``, ``verify_passes`` (canonical passes, prefill included), ``tokens_per_pass``
    and ``mars_changed`` (per row also ``passes`` and ``mars_steps``; ``margins`` then holds the
    canonical margin deciding each token).
    ``margins[i]``: prompt ``i``'s fast-path margin at every step, with ``record_margins=True``.
    """

    sequences: list[list[int]]
    stats: dict[str, Any]
    margins: list[list[float]] | None = None


def _check_count(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_WHERE}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{_WHERE}: {name} must be >= 1, got {value}")


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Any],
    *,
    policy: str = "margin",
    threshold: float | None = None,
    window: int = DEFAULT_WINDOW,
    max_new_tokens: int = 64,
    tokenizer: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
    record_margins: bool = False,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    min_p: float | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] = 0,
    speculative: int | None = None,
    mars_threshold: float | None = None,
    drafter: Any = None,
    **unsupported: Any,
) -> GenerationResult:
    """Greedy decoding of ``prompts`` under ``policy`` (one of ``margingate.POLICIES``).

    ``prompts``: token-id lists (or strings, with ``tokenizer``), decoded in order in left-padded
    batches of ``batch_size`` (``None``: one batch), each with its own ``DynamicCache()``.
    ``threshold`` (``margin`` only): verify steps whose fast-path margin is below it; ``None`` takes
    the model's shipped calibration. ``window`` (``window`` only): tokens between two checks.
    ``streamer``: a callable ``streamer(prompt_index, tokens)`` or an object with such a ``put``
    method (and optionally ``end()``), called with each prompt's tokens as they become final.
    ``temperature`` > 0 samples (seeded Gumbel-max, ``margingate.sampling``) with optional
    ``top_k`` / ``min_p``; ``seed`` is an int (prompt i gets its own stream ``prompt_seed(seed, i)``)
    or one int per prompt, so a prompt's tokens depend on its seed alone, in any batch and under
    every policy but ``off``. ``top_p`` is refused (no margin can gate its cut-off).
    ``speculative`` (``always`` only): speculative decoding with up to ``k`` draft tokens per round,
    each round verified by one canonical pass; the tokens equal ``always``'s bit for bit
    (``margingate.speculative``). ``drafter``: ``None`` (prompt lookup), a draft causal LM sharing
    the tokenizer, or an object with ``propose(contexts, k)``. ``mars_threshold`` (with
    ``speculative``): MARS margin-aware acceptance, NOT equal to greedy (see ``stats["mars_changed"]``).
    Every argument is checked before anything runs; a bad one raises ``ValueError`` or
    ``TypeError`` and leaves the model as it was.
    """
    _refuse(unsupported)
    check_policy(policy, _WHERE)
    check_threshold(threshold, _WHERE)
    hf_compat.check_supported(model, _WHERE)
    _check_count(max_new_tokens, "max_new_tokens")
    _check_count(batch_size, "batch_size", allow_none=True)
    _check_count(window, "window")
    check_speculative(speculative, mars_threshold, policy)
    spec_drafter = as_drafter(drafter, model) if speculative is not None else None
    if drafter is not None and speculative is None:
        raise ValueError(f"{_WHERE}: drafter needs speculative=k")
    _streamer_put(streamer)  # checked here, used by _decode_batches
    sampling = Sampling.checked(temperature, top_k, min_p, top_p, _WHERE)
    if speculative is not None and not sampling.greedy:
        raise ValueError(f"{_WHERE}: speculative decoding is greedy only here; use temperature=0 or speculative=None")
    encoded = encode_prompts(prompts, tokenizer, hf_compat.vocab_size(model), _WHERE)
    seeds = check_seeds(seed, len(encoded), _WHERE)
    eos, pad_id = _eos_and_pad(model, tokenizer, eos_token_id, stop_at_eos, pad_token_id)

    decode = decode_window if policy == "window" else decode_gated
    if speculative is not None:
        decode = functools.partial(decode_speculative, k=speculative, mars_threshold=mars_threshold, drafter=spec_drafter)
    template = BatchJob(
        [], policy, threshold, window, max_new_tokens, eos, pad_id, sampling, [], record_margins=record_margins
    )
    result, rows, threshold_used, seconds, counters = _decode_batches(
        model, decode, template, encoded, seeds, batch_size or len(encoded), streamer=streamer, progress=progress
    )
    run = {
        "prefill": "fast" if policy == "off" else "canonical",
        "sampling": dataclasses.asdict(sampling),
        "window": window if policy == "window" else None,
        "speculative": speculative,
        "mars_threshold": mars_threshold,
    }
    result.stats = summarize(rows, policy=policy, threshold=threshold_used, seconds=seconds, run=run, counters=counters)
    return result


def _refuse(unsupported: dict[str, Any]) -> None:
    """Raises for a transformers generate argument this loop does not implement; drops (in place)
    those that ask for what it does anyway (greedy, one beam, one sequence)."""
    for key, value in list(unsupported.items()):
        if key in _REFUSED:
            if _harmless(key, value):
                del unsupported[key]
                continue
            raise ValueError(f"{_WHERE}: {key}={value!r}: {_REFUSED[key]}")
    if unsupported:
        raise TypeError(f"{_WHERE}: unexpected keyword argument(s) {', '.join(sorted(unsupported))}")


def _eos_and_pad(model, tokenizer, eos_token_id, stop_at_eos: bool, pad_token_id) -> tuple[list[int], int]:
    """The EOS ids (none when not stopping at EOS) and the checked pad id."""
    eos = hf_compat.as_token_ids(eos_token_id) if eos_token_id is not None else hf_compat.eos_ids(model, tokenizer)
    if not stop_at_eos:
        eos = []
    if pad_token_id is None:
        pad_token_id = hf_compat.pad_id(model, tokenizer, eos)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise TypeError(f"{_WHERE}: pad_token_id must be an int >= 0, got {pad_token_id!r}")
    if pad_token_id >= hf_compat.vocab_size(model):
        raise ValueError(
            f"{_WHERE}: pad_token_id {pad_token_id} is outside the model's vocabulary [0, {hf_compat.vocab_size(model)})"
        )
    return eos, int(pad_token_id)


def _decode_batches(model, decode, template: BatchJob, encoded, seeds, size: int, *, streamer, progress: bool):
    """Decodes the prompts in batches of ``size`` with ``decode``, each a copy of ``template`` with
    its prompts, seeds and streamer (``streamer.end()``, if any, called however it ends); returns the ``GenerationResult`` (stats still to come), the
    rows' statistics in prompt order, the threshold used, the loops' wall time and their summed
    counters."""
    put = _streamer_put(streamer)
    chunks = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(encoded) * template.max_new_tokens  # final tokens, a row's unused ones counted at its end
        # mininterval: at most one refresh a second (a log file gets one line per refresh)
        bar = tqdm(total=total, desc=f"generate[{template.policy}]", unit="token", leave=False, mininterval=1.0)
    result = GenerationResult([[] for _ in encoded], {}, [[] for _ in encoded] if template.record_margins else None)
    rows: list[RowStats] = [RowStats() for _ in encoded]
    seconds, threshold_used, counters = 0.0, 0.0, {}
    try:
        for chunk in chunks:
            t0 = time.perf_counter()
            job = dataclasses.replace(
                template,
                prompts=[encoded[i] for i in chunk],
                seeds=[seeds[i] for i in chunk],
                put=None if put is None else (lambda r, tokens, chunk=chunk: put(chunk[r], tokens)),
                bar=bar,
            )
            out = decode(model, job)
            seconds += time.perf_counter() - t0
            threshold_used = out.threshold
            for key, value in out.extras.items():
                counters[key] = counters.get(key, 0) + value
            for r, i in enumerate(chunk):
                result.sequences[i] = out.tokens[r]
                rows[i] = out.rows[r]
                if result.margins is not None:
                    result.margins[i] = out.margins[r][: len(out.tokens[r])]
    finally:
        if bar is not None:
            bar.close()
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
    return result, rows, threshold_used, seconds, counters


def _streamer_put(streamer: Any):
    if streamer is None:
        return None
    put = getattr(streamer, "put", None)
    if callable(put):
        return put
    if callable(streamer):
        return streamer
    raise TypeError(f"{_WHERE}: streamer must be callable or have a put(prompt_index, tokens) method")


def decode_gated(model: torch.nn.Module, job: BatchJob) -> Outcome:
    """One left-padded batch under a per-step policy (``off``, ``margin``, ``always``, ``invariant``):
    every token is final at its own step."""
    batch = Batch(model, job)
    canonical_prefill = job.policy != "off"
    everything_canonical = job.policy == "invariant"
    proc = MarginGateProcessor(
        model,
        batch.cache,
        policy="off" if everything_canonical else job.policy,
        threshold=job.threshold,
        attention_mask=batch.mask,
        canonical_upto=batch.prompt_length if canonical_prefill else 0,
        eos_token_id=job.eos,
        record_margins=job.record_margins,
        sampling=job.sampling,
        seeds=job.seeds,
    )
    pad = torch.full((batch.size,), job.pad_id, dtype=torch.long)
    with torch.inference_mode():
        logits = batch.forward_last(batch.ids, canonical=canonical_prefill)
        for step in range(job.max_new_tokens):
            produced = time.perf_counter()
            token, _ = proc.decide(batch.ids, logits)
            finished = [batch.done(b) for b in range(batch.size)]
            token = torch.where(torch.tensor(finished), pad, token.cpu())
            batch.append(token)
            for b, t in enumerate(token.tolist()):
                if not finished[b]:
                    batch.commit(b, [t], [produced])
            if step == job.max_new_tokens - 1 or batch.all_done():
                break
            logits = batch.forward_last(batch.ids[:, -1:], canonical=everything_canonical)
    for b, record in enumerate(proc.row_stats()):
        batch.stats[b] = record
    margins = [[float(m[r]) for m in proc.margins] for r in range(batch.size)]
    return batch.finish(proc.threshold, margins=margins)


def decode_window(model: torch.nn.Module, job: BatchJob) -> Outcome:
    """One left-padded batch under ``window``: fast decoding, a canonical check of every row's
    unverified tokens every ``window`` tokens (and when every row has stopped), commit up to the
    first mismatch, take the verifier's token there, roll the rest back and decode it again.

    Invariant at the top of the loop: ``ids`` holds L tokens and the cache L - 1 positions (the
    last token is not yet forwarded). Positions below ``prompt_length + len(committed[b])`` are
    final for row ``b``."""
    batch = Batch(model, job)
    loop = _WindowLoop(batch, Verifier(model, batch.cache, batch.size, canonical_upto=batch.prompt_length))
    with torch.inference_mode():
        logits = batch.forward_last(batch.ids, canonical=True)
        first, first_margin = batch.pick(logits, batch.mask.sum(dim=1), torch.arange(batch.size))
        for b in range(batch.size):
            batch.commit(b, [int(first[b])], [time.perf_counter()])
            batch.margins[b].append(float(first_margin[b]))
        batch.append(first)
        last_check = batch.ids.shape[1]
        while not batch.all_done():
            length = batch.ids.shape[1]
            ids = batch.ids.cpu().tolist()
            ends = [_tentative_end(ids[b], batch.prompt_length + len(batch.committed[b]), batch.eos) for b in range(batch.size)]
            stopped = all(batch.done(b) or ends[b] < length or length >= loop.limit for b in range(batch.size))
            if length - last_check >= job.window or stopped:
                loop.check(ids, ends)
                last_check = batch.ids.shape[1]
            else:
                loop.fast_step(ends)
    for b, record in enumerate(batch.stats):
        # every committed token was checked by (or taken from) the canonical forward
        record.steps = record.verified = len(batch.committed[b])
        record.replayed_positions = int(loop.verifier.replayed[b])
    return batch.finish(0.0, loop.extras)


class _WindowLoop:
    """The two moves of ``decode_window``: a fast step, and the check of every row's tentative
    tokens (commit, repair, roll back). ``produced_at[b]``: when each tentative token of row ``b``
    was produced."""

    def __init__(self, batch: Batch, verifier: Verifier) -> None:
        self.batch, self.verifier = batch, verifier
        self.limit = batch.prompt_length + batch.job.max_new_tokens
        self.produced_at: list[list[float]] = [[] for _ in range(batch.size)]
        self.extras = {"verify_passes": 0, "redecoded_steps": 0}
        for record in batch.stats:
            record.rolled_back = 0

    def fast_step(self, ends: list[int]) -> None:
        """Forward the last token, choose the next (forced where already final)."""
        batch = self.batch
        length = batch.ids.shape[1]
        logits = batch.forward_last(batch.ids[:, -1:], canonical=False)
        produced = time.perf_counter()
        fast, fast_margin = batch.pick(logits, batch.mask.sum(dim=1), torch.arange(batch.size))
        position = length - batch.prompt_length
        token = torch.full((batch.size,), batch.job.pad_id, dtype=torch.long)
        forced_any = False
        for b in range(batch.size):
            if position < len(batch.committed[b]):
                token[b] = batch.committed[b][position]
                forced_any = True
            elif not batch.done(b) and ends[b] == length and length < self.limit:
                token[b] = fast[b]
                self.produced_at[b].append(produced)
                if len(batch.margins[b]) == position:
                    batch.margins[b].append(float(fast_margin[b]))
        self.extras["redecoded_steps"] += int(forced_any)
        batch.append(token)

    def check(self, ids: list[list[int]], ends: list[int]) -> None:
        """One canonical pass over every row's unverified positions; each row commits up to its
        first mismatch (the verifier's token there); then roll back to the earliest mismatch, or,
        when every row matched, commit the verifier's next token."""
        batch, verifier = self.batch, self.verifier
        length = batch.ids.shape[1]
        hf_compat.extend(batch.cache, 1)  # room for the last token, which the replay computes
        rows = [b for b in range(batch.size) if not batch.done(b)]
        rows_t = torch.tensor(rows, dtype=torch.long)
        start = int(verifier.canonical_upto[rows_t].min())
        replayed = verifier.replay_(batch.ids, batch.mask, rows_t, start)  # [R, length - start, V]
        # position of the token each replayed logit row chooses: real tokens before it
        positions = batch.mask.index_select(0, rows_t.to(batch.device)).cumsum(dim=1)[:, start:]
        span = replayed.shape[1]
        predicted = batch.pick(
            replayed.reshape(-1, replayed.shape[-1]), positions.reshape(-1), rows_t.repeat_interleave(span)
        )[0].view(len(rows), span).tolist()
        self.extras["verify_passes"] += 1
        cut, following = length, {}
        for i, b in enumerate(rows):
            mismatch = self._commit_row(b, predicted[i][ends[b] - 1 - start :: -1][::-1], start, ids[b], ends[b])
            if mismatch is not None:
                cut = min(cut, mismatch)
            elif ends[b] == length and not batch.done(b):
                following[b] = predicted[i][length - 1 - start]  # the verifier's next token
        if cut < length:  # roll back: every row re-feeds its committed tokens from `cut`
            verifier.rollback_(cut)
            batch.ids, batch.mask = batch.ids[:, :cut], batch.mask[:, :cut]
            position = cut - batch.prompt_length
            batch.append(torch.tensor([_forced(c, position, batch.job.pad_id) for c in batch.committed]))
            self.extras["redecoded_steps"] += 1
            return
        token = torch.full((batch.size,), batch.job.pad_id, dtype=torch.long)
        for b, t in following.items():  # every checked row matched: the verifier's next token is final
            if len(batch.committed[b]) < batch.job.max_new_tokens:
                batch.commit(b, [t], [time.perf_counter()])
                batch.margins[b].append(float("nan"))  # decided by the verifier: no fast step
                token[b] = t
        batch.append(token)

    def _commit_row(self, b: int, predicted: list[int], start: int, ids: list[int], end: int) -> int | None:
        """Commits row ``b``'s tentative tokens up to ``end`` as the canonical forward predicted them
        (``predicted[j]``: its token after position ``start + j``), the first mismatch replaced by
        the prediction; returns that mismatch's position, or None."""
        batch = self.batch
        record, margins = batch.stats[b], batch.margins[b]
        first_open = batch.prompt_length + len(batch.committed[b])
        tokens, produced, mismatch = [], [], None
        for p in range(first_open, end):
            want = predicted[p - 1 - start]
            tokens.append(want)
            if want != ids[p]:
                mismatch, step = p, p - batch.prompt_length
                produced.append(time.perf_counter())
                record.repair(step, margins[step] if step < len(margins) else float("nan"))
                record.rolled_back += end - p
                break
            produced.append(self.produced_at[b][p - first_open])
        batch.commit(b, tokens, produced)
        self.produced_at[b] = []
        # fast margins of the committed steps (a corrected token keeps its step's margin)
        committed = len(batch.committed[b])
        batch.margins[b] = (margins + [float("nan")] * committed)[:committed]
        return mismatch


def _tentative_end(ids: list[int], first_open: int, eos: set[int]) -> int:
    """One past a row's last real token: its first EOS at or after ``first_open``, or the end."""
    for p in range(first_open, len(ids)):
        if ids[p] in eos:
            return p + 1
    return len(ids)


def _forced(committed: list[int], position: int, pad_id: int) -> int:
    return committed[position] if position < len(committed) else pad_id


__all__ = ["DEFAULT_WINDOW", "POLICIES", "GenerationResult", "generate"]
