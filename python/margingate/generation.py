"""``margingate.generate``: greedy decoding under a policy, in margingate's own decode loop.

One decode step of a left-padded batch, top to bottom (``decode_gated``: ``off``, ``margin``,
``always``, ``invariant``):

1. prefill: ``margin``, ``always`` and ``invariant`` run the prompt once with the canonical forward
   (``canonical.py``), so the prompt K/V and the first token's logits are canonical; ``off`` runs
   the model's own kernels;
2. gate: ``MarginGateProcessor`` (``processor.py``) computes every row's top-1/top-2 margin with
   the fused kernel and sends the rows below the threshold to the ``Verifier`` (``verifier.py``),
   which replays them canonically and repairs their K/V columns in place;
3. the token is the argmax of the (partly verified) scores; finished rows get the pad id;
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
from .batching import encode_prompts, left_pad
from .decoding import BatchJob, Clock, Outcome, cut_at_eos, forward_last
from .policies import POLICIES, check_policy, check_threshold
from .processor import MarginGateProcessor, summarize
from .sampling import Sampling, check_seeds, choose
from .speculative import as_drafter, check_speculative, decode_speculative, summarize_speculative
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
    for key, value in list(unsupported.items()):
        if key in _REFUSED:
            if _harmless(key, value):
                del unsupported[key]  # greedy, one beam, one sequence: what this loop does anyway
                continue
            raise ValueError(f"{_WHERE}: {key}={value!r}: {_REFUSED[key]}")
    if unsupported:
        raise TypeError(f"{_WHERE}: unexpected keyword argument(s) {', '.join(sorted(unsupported))}")
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
    put = _streamer_put(streamer)
    sampling = Sampling.checked(temperature, top_k, min_p, top_p, _WHERE)
    if speculative is not None and not sampling.greedy:
        raise ValueError(f"{_WHERE}: speculative decoding is greedy only here; use temperature=0 or speculative=None")
    encoded = encode_prompts(prompts, tokenizer, hf_compat.vocab_size(model), _WHERE)
    seeds = check_seeds(seed, len(encoded), _WHERE)
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

    size = batch_size or len(encoded)
    chunks = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * max_new_tokens, desc=f"generate[{policy}]", unit="step", leave=False)

    sequences: list[list[int]] = [[] for _ in encoded]
    per_row: list[dict[str, Any]] = [{} for _ in encoded]
    margins: list[list[float]] | None = [[] for _ in encoded] if record_margins else None
    seconds, threshold_used = 0.0, 0.0
    extras: dict[str, int] = {}
    decode = decode_window if policy == "window" else decode_gated
    if speculative is not None:
        decode = functools.partial(decode_speculative, k=speculative, mars_threshold=mars_threshold, drafter=spec_drafter)
    try:
        for chunk in chunks:
            t0 = time.perf_counter()
            job = BatchJob(
                prompts=[encoded[i] for i in chunk],
                policy=policy,
                threshold=threshold,
                window=window,
                max_new_tokens=max_new_tokens,
                eos=eos,
                pad_id=int(pad_token_id),
                sampling=sampling,
                seeds=[seeds[i] for i in chunk],
                record_margins=record_margins,
                put=None if put is None else (lambda r, tokens, chunk=chunk: put(chunk[r], tokens)),
                bar=bar,
            )
            out = decode(model, job)
            seconds += time.perf_counter() - t0
            threshold_used = out.threshold
            for key, value in out.extras.items():
                extras[key] = extras.get(key, 0) + value
            for r, i in enumerate(chunk):
                sequences[i] = out.tokens[r]
                per_row[i] = out.rows[r]
                if margins is not None:
                    margins[i] = out.margins[r][: len(out.tokens[r])]
    finally:
        if bar is not None:
            bar.close()
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
    totals = summarize(per_row, policy=policy, threshold=threshold_used, seconds=seconds)
    totals["prefill"] = "fast" if policy == "off" else "canonical"
    totals["sampling"] = dataclasses.asdict(sampling)
    if policy == "window":
        rolled = sum(r["rolled_back"] for r in per_row)
        totals.update(window=window, rolled_back=rolled, rollback_rate=rolled / (rolled + totals["steps"] or 1), **extras)
    if speculative is not None:
        totals.update(summarize_speculative(per_row, extras["verify_passes"], speculative, mars_threshold))
    return GenerationResult(sequences=sequences, stats=totals, margins=margins)


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
    device = next(model.parameters()).device
    ids, mask = left_pad(job.prompts, job.pad_id, device)
    batch, prompt_length = ids.shape
    cache = hf_compat.new_cache()
    canonical_prefill = job.policy != "off"
    everything_canonical = job.policy == "invariant"
    proc = MarginGateProcessor(
        model,
        cache,
        policy="off" if everything_canonical else job.policy,
        threshold=job.threshold,
        attention_mask=mask,
        canonical_upto=prompt_length if canonical_prefill else 0,
        eos_token_id=job.eos,
        record_margins=job.record_margins,
        sampling=job.sampling,
        seeds=job.seeds,
    )
    eos_ids = torch.tensor(job.eos, dtype=torch.long, device=device)
    eos_set = set(job.eos)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    clock = Clock(batch, job.put)
    with torch.inference_mode():
        logits = forward_last(model, ids, mask, cache, canonical=canonical_prefill)
        for step in range(job.max_new_tokens):
            produced = time.perf_counter()
            proc(ids, logits)
            token = proc.last_tokens.to(device)
            token = torch.where(finished, torch.full_like(token, job.pad_id), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            for r, (t, done) in enumerate(zip(token.tolist(), finished.tolist(), strict=True)):
                if not done:
                    clock.final(r, [t], [produced])
            finished |= torch.isin(token, eos_ids)
            job.advance()
            if step == job.max_new_tokens - 1 or bool(finished.all()):
                job.advance(job.max_new_tokens - 1 - step)
                break
            logits = forward_last(model, token[:, None], mask, cache, canonical=everything_canonical)
    tokens = [cut_at_eos(row, eos_set) for row in ids[:, prompt_length:].cpu().tolist()]
    stats = proc.stats()["per_row"]
    rows = [{**stats[r], **clock.row_stats(r)} for r in range(batch)]
    margins = [[float(m[r]) for m in proc.margins] for r in range(batch)]
    return Outcome(tokens, rows, margins, proc.threshold, {})


def decode_window(model: torch.nn.Module, job: BatchJob) -> Outcome:
    """One left-padded batch under ``window``: fast decoding, a canonical check of every row's
    unverified tokens every ``window`` tokens (and when every row has stopped), commit up to the
    first mismatch, take the verifier's token there, roll the rest back and decode it again.

    Invariant at the top of the loop: ``ids`` holds L tokens and the cache L - 1 positions (the
    last token is not yet forwarded). Positions below ``final_len[b]`` are final for row ``b``."""
    device = next(model.parameters()).device
    ids, mask = left_pad(job.prompts, job.pad_id, device)
    batch, prompt_length = ids.shape
    limit = prompt_length + job.max_new_tokens
    eos_set = set(job.eos)
    cache = hf_compat.new_cache()
    verifier = Verifier(model, cache, batch, canonical_upto=prompt_length)
    clock = Clock(batch, job.put)
    committed: list[list[int]] = [[] for _ in range(batch)]
    produced_at: list[list[float]] = [[] for _ in range(batch)]  # per tentative token of each row
    margins: list[list[float]] = [[] for _ in range(batch)]
    rows_stats = [
        {"steps": 0, "verified": 0, "repairs": 0, "repair_steps": [], "repair_margins": [], "rolled_back": 0}
        for _ in range(batch)
    ]
    extras = {"verify_passes": 0, "redecoded_steps": 0}

    def done(b: int) -> bool:  # final: the row's committed tokens end in EOS or fill the budget
        c = committed[b]
        return len(c) >= job.max_new_tokens or (bool(c) and c[-1] in eos_set)

    def tentative_end(b: int, length: int) -> int:  # one past the row's last real token
        for p in range(prompt_length + len(committed[b]), length):
            if int(ids_list[b][p]) in eos_set:
                return p + 1
        return length

    def append(token: torch.Tensor) -> None:
        nonlocal ids, mask
        ids = torch.cat([ids, token[:, None].to(device)], dim=1)
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)

    def commit(b: int, tokens: list[int], produced: list[float]) -> None:
        committed[b] += tokens
        clock.final(b, tokens, produced)
        job.advance(len(tokens))

    seeds_t = torch.tensor(job.seeds, dtype=torch.long)

    def pick(logits: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        token, gate = choose(logits, job.sampling, None if job.sampling.greedy else seeds_t[rows], positions)
        return token.cpu(), gate.cpu()

    all_rows = torch.arange(batch)
    with torch.inference_mode():
        logits = forward_last(model, ids, mask, cache, canonical=True)
        first, first_margin = pick(logits, mask.sum(dim=1), all_rows)
        for b in range(batch):
            commit(b, [int(first[b])], [time.perf_counter()])
            margins[b].append(float(first_margin[b]))
        append(first)
        last_check = ids.shape[1]
        while not all(done(b) for b in range(batch)):
            length = ids.shape[1]
            ids_list = ids.cpu().tolist()
            stopped = all(done(b) or tentative_end(b, length) < length or length >= limit for b in range(batch))
            if length - last_check >= job.window or stopped:
                # -- the check: one canonical pass over every row's unverified positions
                hf_compat.extend(cache, 1)  # room for the last token, which the replay computes
                rows = [b for b in range(batch) if not done(b)]
                rows_t = torch.tensor(rows, dtype=torch.long)
                start = int(verifier.canonical_upto[rows_t].min())
                replayed = verifier.replay_(ids, mask, rows_t, start)  # [R, length - start, V]
                # position of the token each replayed logit row chooses: real tokens before it
                positions = mask.index_select(0, rows_t.to(device)).cumsum(dim=1)[:, start:]
                span = replayed.shape[1]
                predicted = pick(
                    replayed.reshape(-1, replayed.shape[-1]), positions.reshape(-1), rows_t.repeat_interleave(span)
                )[0].view(len(rows), span).tolist()
                extras["verify_passes"] += 1
                cut, following = length, {}
                for i, b in enumerate(rows):
                    first_open = prompt_length + len(committed[b])
                    end = tentative_end(b, length)
                    tokens, produced = [], []
                    mismatch = None
                    for p in range(first_open, end):
                        want = predicted[i][p - 1 - start]
                        if want != ids_list[b][p]:
                            mismatch = p
                            tokens.append(want)
                            produced.append(time.perf_counter())
                            rows_stats[b]["repairs"] += 1
                            rows_stats[b]["repair_steps"].append(p - prompt_length)
                            step = p - prompt_length
                            rows_stats[b]["repair_margins"].append(margins[b][step] if step < len(margins[b]) else float("nan"))
                            rows_stats[b]["rolled_back"] += end - p
                            break
                        tokens.append(want)
                        produced.append(produced_at[b][p - first_open])
                    commit(b, tokens, produced)
                    produced_at[b] = []
                    # fast margins of the committed steps (a corrected token keeps its step's margin)
                    margins[b] = (margins[b] + [float("nan")] * len(committed[b]))[: len(committed[b])]
                    if mismatch is not None:
                        cut = min(cut, mismatch)
                    elif end == length and not done(b):
                        following[b] = predicted[i][length - 1 - start]  # the verifier's next token
                if cut < length:  # roll back: every row re-feeds its committed tokens from `cut`
                    verifier.rollback_(cut)
                    ids, mask = ids[:, :cut], mask[:, :cut]
                    token = torch.tensor([_forced(committed[b], cut - prompt_length, job.pad_id) for b in range(batch)])
                    append(token)
                    extras["redecoded_steps"] += 1
                else:  # every checked row matched: the verifier's next token is final
                    token = torch.full((batch,), job.pad_id, dtype=torch.long)
                    for b, t in following.items():
                        if len(committed[b]) < job.max_new_tokens:
                            commit(b, [t], [time.perf_counter()])
                            margins[b].append(float("nan"))  # decided by the verifier: no fast step
                            token[b] = t
                    append(token)
                last_check = ids.shape[1]
                continue
            # -- a fast step: forward the last token, choose the next (forced where already final)
            logits = forward_last(model, ids[:, -1:], mask, cache, canonical=False)
            produced = time.perf_counter()
            fast, fast_margin = pick(logits, mask.sum(dim=1), all_rows)
            position = length - prompt_length
            token = torch.full((batch,), job.pad_id, dtype=torch.long)
            forced_any = False
            for b in range(batch):
                if position < len(committed[b]):
                    token[b] = committed[b][position]
                    forced_any = True
                elif not done(b) and tentative_end(b, length) == length and length < limit:
                    token[b] = fast[b]
                    produced_at[b].append(produced)
                    if len(margins[b]) == position:
                        margins[b].append(float(fast_margin[b]))
            extras["redecoded_steps"] += int(forced_any)
            append(token)
    for b in range(batch):
        # every committed token was checked by (or taken from) the canonical forward
        rows_stats[b]["steps"] = rows_stats[b]["verified"] = len(committed[b])
        rows_stats[b]["replayed_positions"] = int(verifier.replayed[b])
    rows = [{**rows_stats[b], **clock.row_stats(b)} for b in range(batch)]
    tokens = [cut_at_eos(c, eos_set) for c in committed]
    return Outcome(tokens, rows, margins if job.record_margins else [[] for _ in range(batch)], 0.0, extras)


def _forced(committed: list[int], position: int, pad_id: int) -> int:
    return committed[position] if position < len(committed) else pad_id


__all__ = ["DEFAULT_WINDOW", "POLICIES", "GenerationResult", "generate"]
