"""Prompts to left-padded batches: the one place margingate pads, masks and numbers positions.

Every batch margingate runs is left-padded: row ``b`` is ``pad ... pad t_0 ... t_{n-1}`` with the
attention mask ``0 ... 0 1 ... 1``, and the position of a token is the number of real tokens
before it (Hugging Face's convention ``cumsum(mask) - 1``; padding positions clamped to 0). The
canonical forward is invariant to the amount of padding, so a prompt gets the same canonical
logits whatever its neighbours' lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def encode_prompts(
    prompts: Sequence[Any], tokenizer: Any, vocab_size: int, where: str
) -> list[list[int]]:
    """Token-id lists of ``prompts`` (strings need ``tokenizer``; lists, tuples and 1-D tensors of
    ids are taken as they are). Raises ``ValueError``/``TypeError`` naming the prompt for an empty
    prompt, a non-integer id or an id outside ``[0, vocab_size)``."""
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"{where}: prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError(f"{where}: no prompts given")
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"{where}: prompt {i} is text; pass tokenizer= to encode it")
            p = tokenizer(p)["input_ids"]
        elif isinstance(p, torch.Tensor):
            if p.dim() > 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
                raise TypeError(f"{where}: prompt {i} must be a 1-D integer tensor, got {p.dtype} {tuple(p.shape)}")
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"{where}: prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        ids = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{where}: prompt {i} holds {t!r}; token ids must be ints")
            ids.append(int(t))
        if not ids:
            raise ValueError(f"{where}: prompt {i} is empty")
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where}: prompt {i} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"
            )
        encoded.append(ids)
    return encoded


def left_pad(
    batch: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both [len(batch), longest] int64, left-padded."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the last ``n`` columns of a left-padded mask: ``cumsum(mask) - 1``, clamped."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)[:, -n:]


def check_left_padded(attention_mask: torch.Tensor, where: str) -> None:
    """Raises ``ValueError`` unless every row of the 2-D mask is ``0 ... 0 1 ... 1``."""
    if attention_mask.dim() != 2:
        raise ValueError(f"{where}: attention_mask must be 2-D [batch, length], got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.bool)
    if mask.shape[1] > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            f"{where}: attention_mask is not left-padded (a 1 is followed by a 0); margingate needs every "
            "row as 0...0 1...1 (tokenizer padding_side='left')"
        )
