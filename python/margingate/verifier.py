"""The verifier: the one place that replays rows canonically and repairs the shared KV cache.

A batch decodes on the fast path into one shared ``DynamicCache``. When the gate flags rows, the
verifier recomputes them with the canonical forward and overwrites their K/V in place:

1. Each row has a canonical frontier ``canonical_upto[b]``: its positions below it hold canonical
   K/V (after a canonical prefill: the whole prompt; after a verification: everything up to that
   step). Columns at or past the frontier were written by the fast path and differ in their last
   bits between batch configurations.
2. ``verify_`` takes the flagged rows' cache prefix below ``start = min(frontier of those rows)``
   (a copy: a few MB at most, next to the weights a forward reads), runs the canonical forward over
   their tokens ``[start, L)`` on that copy, and writes the recomputed columns back into the shared
   cache with ``margingate.kv_patch_`` (the MarginGate repair). Replaying from the frontier, not
   just the current position, is what makes the verified logits a function of the row's tokens
   alone: attending over fast-path columns let near-ties of the verified logits flip (measured on
   Gemma 3 270M, README "generation"). Re-running an already canonical position reproduces it bit
   for bit (the canonical forward is query-invariant), so one window serves all flagged rows.
3. The model runs on the copy, and the shared cache is written only after it succeeded: a
   verification that raises (bad mask, interrupt) leaves the shared cache as it was.

Window policies (``rollback_``) crop the shared cache back to a committed length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from . import hf_compat
from .canonical import canonical_forward
from .ops import kv_patch_


class Verifier:
    """Canonical replay and in-place repair of rows of one shared batch cache.

    Args:
        model: the model whose cache this is (a supported family).
        cache: the shared ``DynamicCache()`` of the batch.
        batch_size: rows of the batch.
        canonical_upto: positions already canonical in every row (0, or the prompt length after a
            canonical prefill).
    """

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, batch_size: int, canonical_upto: int = 0):
        self.model = model
        self.cache = cache
        self.canonical_upto = torch.full((batch_size,), int(canonical_upto), dtype=torch.long)
        self.replayed = torch.zeros(batch_size, dtype=torch.long)  # positions recomputed per row
        self.last_start: int | None = None  # first position replayed by the last call

    def verify_(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Canonical logits [R, V] of the last position of ``rows`` (LongTensor [R], distinct, on the
        CPU), whose tokens are ``input_ids`` [B, L] and mask ``attention_mask`` [B, L]; the shared
        cache must hold exactly L positions. Repairs the rows' K/V columns ``[start, L)`` in place and
        moves their frontier to L."""
        where = "margingate.Verifier.verify_"
        length = input_ids.shape[1]
        held = hf_compat.cache_length(self.cache)
        if held != length:
            raise RuntimeError(
                f"{where}: the cache holds {held} positions but the sequences have {length}; the verifier "
                "must see the cache the fast path just appended to"
            )
        start = min(int(self.canonical_upto[rows].min()), length - 1)
        return self._replay_(input_ids, attention_mask, rows, start, logits_to_keep=1)[:, -1]

    def replay_(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Canonical logits [R, L - start, V] of positions ``[start, L)`` of ``rows`` (every position,
        for a window check), repairing those K/V columns like ``verify_``. ``start`` must not lie
        past any of the rows' frontiers."""
        if start > int(self.canonical_upto[rows].min()):
            raise RuntimeError("margingate.Verifier.replay_: start lies past a row's canonical frontier")
        return self._replay_(input_ids, attention_mask, rows, start)

    def rollback_(self, length: int) -> None:
        """Drops every cache position from ``length`` on (all rows) and pulls the frontiers back."""
        hf_compat.crop(self.cache, length)
        self.canonical_upto.clamp_(max=length)

    def _replay_(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, start: int, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """The one replay: the canonical forward of ``rows``' tokens ``[start, L)`` on a copy of their
        cache prefix, then the repair of those columns in the shared cache (only after the forward
        succeeded), the statistics and the new frontier L."""
        length = input_ids.shape[1]
        rows_dev = rows.to(input_ids.device)
        row_cache = hf_compat.cache_from_rows(self.cache, rows_dev, start)
        logits = canonical_forward(
            self.model,
            input_ids.index_select(0, rows_dev)[:, start:],
            attention_mask=attention_mask.index_select(0, rows_dev),
            cache=row_cache,
            logits_to_keep=logits_to_keep,
        )
        self._write_back_(row_cache, rows_dev, start, length)
        self.replayed[rows] += length - start
        self.canonical_upto[rows] = length
        self.last_start = start
        return logits

    def _write_back_(self, row_cache: DynamicCache, rows: torch.Tensor, start: int, length: int) -> None:
        """The repair: columns ``[start, length)`` of the replayed rows into the shared cache."""
        n = length - start
        if n <= 0:
            return
        flat_rows = rows.repeat_interleave(n)
        flat_positions = torch.arange(start, length, device=rows.device).repeat(rows.numel())
        for (k_cache, v_cache), (k_row, v_row) in zip(
            hf_compat.layer_kv(self.cache), hf_compat.layer_kv(row_cache), strict=True
        ):
            # [R, H, n, D] -> [R * n, H, D]: one (row, position) pair per column.
            k_new = k_row[:, :, start:length].transpose(1, 2).reshape(-1, k_row.shape[1], k_row.shape[3])
            v_new = v_row[:, :, start:length].transpose(1, 2).reshape(-1, v_row.shape[1], v_row.shape[3])
            kv_patch_(k_cache, v_cache, flat_rows, flat_positions, k_new, v_new)
