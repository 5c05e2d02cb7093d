"""A batch-invariant attention backend over vLLM's paged KV cache (CPU).

It keeps vLLM's CPU backend for everything but the arithmetic: the cache tensor (its shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: per block, ``block_size`` key rows then
``block_size`` value rows), the metadata builder (query start offsets, sequence lengths, block
tables, slot mapping) and the scheduler. What changes:

- **cache write** (``do_kv_cache_update``): each new token's K and V rows are copied into their
  slot with plain indexing (an exact copy). The cache keeps vLLM's shape and size, but the order
  inside a block is this backend's: slot-major (a token's K then V, all heads), so a request's
  tokens gather with one index per token (vLLM's ``cpu_attn_reshape_and_cache`` packs keys in an
  ISA-specific order instead; nothing else reads the cache's contents);
- **attention** (``forward``): each request's keys and values are gathered from its blocks
  (block table, positions ``0 .. seq_len - 1``) and ``margingate.attention`` attends its queries
  over them. That kernel reduces the keys in fixed chunks counted from the request's first key, so
  a query's bits are a function of the query and the keys it sees: the same alone or in a batch,
  whether the prompt came in one prefill or in chunks, from a prefix-cache hit or not, in a decode
  step or inside a prefill. Decode requests (one query) of a step run as one call, left-padded to
  the longest (``kv_start`` skips the padding); each prefill chunk runs as its own call. The slots
  to gather are computed once per step and shared by all layers.

The gather is a copy of each request's K/V per layer and step (a first version: correct, and
cheap for short contexts; a kernel that reads the block table directly would remove it).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..ops import attention as invariant_attention

BACKEND = "margingate.vllm.attention.MarginGateAttentionBackend"


class MarginGateAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend (same name, cache layout and metadata) with the impl below."""

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [size for size in super().get_supported_head_sizes() if size <= 256]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[MarginGateAttentionImpl]:
        return MarginGateAttentionImpl


def _refuse(feature: str) -> None:
    from .plugin import UnsupportedError

    raise UnsupportedError(
        f"margingate: the invariant attention does not cover {feature}; unset MARGINGATE_VLLM to run vLLM without it"
    )


class MarginGateAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:  # fmt: skip
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )  # fmt: skip
        if attn_type != AttentionType.DECODER:
            _refuse(f"{attn_type} attention (decoder self-attention only)")
        if alibi_slopes is not None:
            _refuse("ALiBi slopes")
        if self.logits_soft_cap:
            _refuse(f"attention logit soft-capping ({self.logits_soft_cap})")
        if sinks is not None:
            _refuse("attention sinks")
        if self.is_fp8_kv_cache:
            _refuse(f"a quantized KV cache ({kv_cache_dtype})")
        if head_size > 256:
            _refuse(f"head size {head_size} (at most 256)")

    @staticmethod
    def _tokens(kv_cache: torch.Tensor) -> torch.Tensor:
        """The cache as ``[num_blocks * block_size, 2, num_kv_heads, head_size]``: slot ``s`` (block
        ``s // block_size``, row ``s % block_size``) holds its token's K then V, every head. vLLM's
        shape and size are kept; the order inside a block is this backend's own (it alone writes
        and reads the cache), chosen so that a request's tokens gather with one index per token."""
        num_blocks, num_kv_heads, block_size, twice_head = kv_cache.shape
        if not kv_cache.is_contiguous():
            raise RuntimeError("margingate: the invariant attention needs a contiguous KV cache per layer")
        return kv_cache.view(num_blocks * block_size, 2, num_kv_heads, twice_head // 2)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        tokens = self._tokens(kv_cache)
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0  # padded tokens carry slot -1
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[: keep.shape[0]][keep], value[: keep.shape[0]][keep]
        tokens[slots, 0] = key.to(tokens.dtype)
        tokens[slots, 1] = value.to(tokens.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:  # fmt: skip
        if output_scale is not None or output_block_scale is not None:
            _refuse("fused output quantization")
        if attn_metadata is None:  # vLLM's warm-up / profiling run
            return output
        if not attn_metadata.causal or attn_metadata.dynamic_causal is not None:
            _refuse("non-causal attention")
        tokens = self._tokens(kv_cache)
        plan = _plan(attn_metadata, kv_cache.shape[2])
        n = attn_metadata.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        window = self.sliding_window if self.sliding_window > 0 else None
        for group in plan:
            kv = tokens[group.slots]  # [R, T, 2, Hkv, D]
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [R, Hkv, T, D]
            if group.queries is not None:  # decode rows: one query each, at their token index
                q = query[group.queries].unsqueeze(2)  # [R, Hq, 1, D]
                o = invariant_attention(q, k, v, group.kv_start, causal=True, scale=self.scale, window=window)
                out[group.queries] = o.squeeze(2)
            else:  # one prefill chunk: queries start .. stop of one request
                q = query[group.start : group.stop].transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, D]
                o = invariant_attention(q, k, v, None, causal=True, scale=self.scale, window=window)
                out[group.start : group.stop] = o[0].transpose(0, 1)
        return output


class _Group:
    """One ``margingate.attention`` call: the cache slots of its rows' keys ``[R, T]`` (row ``r``
    right-aligned: positions ``0 .. len_r - 1`` at ``T - len_r ..``, the padding pointing at the
    row's first slot), ``kv_start = T - len`` (the left padding the kernel skips), and the query
    token indices (decode rows) or the ``start:stop`` range of one prefill chunk."""

    __slots__ = ("slots", "kv_start", "queries", "start", "stop")

    def __init__(self, slots, kv_start=None, queries=None, start=0, stop=0) -> None:
        self.slots, self.kv_start, self.queries, self.start, self.stop = slots, kv_start, queries, start, stop


def _plan(attn_metadata, block_size: int) -> list[_Group]:
    """The step's calls, computed once per metadata object (every layer of the step shares it)."""
    plan = getattr(attn_metadata, "_margingate_plan", None)
    if plan is not None and plan[0] == block_size:
        return plan[1]
    starts = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    block_table = attn_metadata.block_table
    requests = range(len(starts) - 1)
    decodes = [r for r in requests if starts[r + 1] - starts[r] == 1]
    groups = []
    if decodes:
        lengths = torch.tensor([seq_lens[r] for r in decodes])
        slots, kv_start = _slots(block_table[torch.tensor(decodes)], lengths, block_size)
        groups.append(_Group(slots, kv_start, queries=torch.tensor([starts[r] for r in decodes])))
    for r in requests:
        if starts[r + 1] - starts[r] > 1:
            slots, _ = _slots(block_table[r : r + 1], torch.tensor([seq_lens[r]]), block_size)
            groups.append(_Group(slots, start=starts[r], stop=starts[r + 1]))
    attn_metadata._margingate_plan = (block_size, groups)
    return groups


def _slots(block_table: torch.Tensor, lengths: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = int(lengths.max())
    kv_start = longest - lengths
    position = (torch.arange(longest).unsqueeze(0) - kv_start.unsqueeze(1)).clamp_(min=0)  # [R, T]
    blocks = torch.gather(block_table.long(), 1, position // block_size)
    return blocks * block_size + position % block_size, kv_start


def install() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
