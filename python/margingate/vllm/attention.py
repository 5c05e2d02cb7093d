"""A batch-invariant attention backend over vLLM's paged KV cache (CPU).

It keeps vLLM's CPU backend for everything but the arithmetic: the cache tensor (its shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: per block, ``block_size`` key rows then
``block_size`` value rows), the metadata builder (query start offsets, sequence lengths, block
tables, slot mapping) and the scheduler. What changes:

- **cache write** (``do_kv_cache_update``): each new token's K and V rows are copied into their
  slot with plain indexing (an exact copy; vLLM's ``cpu_attn_reshape_and_cache`` may pack keys in
  an ISA-specific layout, so this backend owns both the write and the read);
- **attention** (``forward``): each request's keys and values are gathered from its blocks
  (block table, positions ``0 .. seq_len - 1``) and ``margingate.attention`` attends its queries
  over them. That kernel reduces the keys in fixed chunks counted from the request's first key, so
  a query's bits are a function of the query and the keys it sees: the same alone or in a batch,
  whether the prompt came in one prefill or in chunks, from a prefix-cache hit or not, in a decode
  step or inside a prefill. Decode requests (one query) of a step run as one call, left-padded to
  the longest (``kv_start`` skips the padding); each prefill chunk runs as its own call.

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
    def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        kv = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
        return kv[:, :, :block_size], kv[:, :, block_size:], block_size

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache, block_size = self._split(kv_cache)
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0  # padded tokens carry slot -1
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[: keep.shape[0]][keep], value[: keep.shape[0]][keep]
        blocks, offsets = slots // block_size, slots % block_size
        key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
        value_cache[blocks, :, offsets] = value.to(value_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:  # fmt: skip
        if output_scale is not None or output_block_scale is not None:
            _refuse("fused output quantization")
        if attn_metadata is None:  # vLLM's warm-up / profiling run
            return output
        if not attn_metadata.causal or attn_metadata.dynamic_causal is not None:
            _refuse("non-causal attention")
        key_cache, value_cache, block_size = self._split(kv_cache)
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        tokens = attn_metadata.num_actual_tokens
        out = output[:tokens].view(tokens, self.num_heads, self.head_size)
        window = self.sliding_window if self.sliding_window > 0 else None
        block_table = attn_metadata.block_table

        decodes = [r for r in range(len(starts) - 1) if starts[r + 1] - starts[r] == 1]
        prefills = [r for r in range(len(starts) - 1) if starts[r + 1] - starts[r] > 1]
        if decodes:
            rows = torch.tensor(decodes)
            lengths = torch.tensor([seq_lens[r] for r in decodes])
            k, v, kv_start = self._gather(key_cache, value_cache, block_size, block_table[rows], lengths)
            first = torch.tensor([starts[r] for r in decodes])
            q = query[first].unsqueeze(2)  # [R, Hq, 1, D]
            o = invariant_attention(q, k, v, kv_start, causal=True, scale=self.scale, window=window)
            out[first] = o.squeeze(2).to(out.dtype)
        for r in prefills:
            lengths = torch.tensor([seq_lens[r]])
            k, v, kv_start = self._gather(key_cache, value_cache, block_size, block_table[r : r + 1], lengths)
            q = query[starts[r] : starts[r + 1]].transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, D]
            o = invariant_attention(q, k, v, None, causal=True, scale=self.scale, window=window)
            out[starts[r] : starts[r + 1]] = o[0].transpose(0, 1).to(out.dtype)
        return output

    @staticmethod
    def _gather(key_cache, value_cache, block_size, block_table, lengths):
        """K and V ``[R, Hkv, T, D]`` of ``R`` requests, right-aligned at ``T = max(lengths)``:
        row ``r`` holds positions ``0 .. lengths[r] - 1`` at ``T - lengths[r] ..``; ``kv_start`` is
        ``T - lengths`` (left padding, which margingate.attention ignores)."""
        longest = int(lengths.max())
        kv_start = longest - lengths
        position = torch.arange(longest).unsqueeze(0) - kv_start.unsqueeze(1)  # [R, T]
        position = position.clamp_(min=0)
        blocks = torch.gather(block_table.long(), 1, position // block_size)
        offsets = position % block_size
        k = key_cache[blocks, :, offsets].transpose(1, 2)  # [R, T, Hkv, D] -> [R, Hkv, T, D]
        v = value_cache[blocks, :, offsets].transpose(1, 2)
        return k, v, kv_start


def install() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
