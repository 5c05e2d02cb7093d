"""margingate inside vLLM: a vLLM general plugin that makes vLLM's CPU path batch-invariant.

Off unless ``MARGINGATE_VLLM=invariant`` is set in the environment of every vLLM process
(installing margingate never changes a vLLM deployment by itself). When on, in every process:

- ``plugin``: checks the vLLM version (``SUPPORTED_VLLM``), the platform (CPU only) and, when vLLM
  builds its config, the model's features; refuses anything else with one line;
- ``linear``: every unquantized CPU linear layer, the lm head included, runs ``margingate.linear``;
- ``attention``: vLLM's CPU attention backend is replaced by one that writes K/V into vLLM's paged
  cache and attends each request's keys (gathered from its block table) with
  ``margingate.attention``, so a query's bits do not depend on the batch, on how chunked prefill
  split the prompt, on a prefix-cache hit or on decode vs prefill;
- ``activations``: the gated GELU / SiLU with margingate's position-free activation functions;
- ``sampler``: a vLLM (v1) logits processor: seeded T > 0 requests are sampled with
  ``margingate.sample_margin`` (counter-based noise keyed by seed and position, so any batch gives
  the same token), and opted-in requests' top-1/top-2 margins are written to a JSONL side channel;
- ``transcripts``: vLLM ``RequestOutput`` objects to margingate audit transcripts, and the reader
  of the margins file.

The vLLM internals used are named in ``plugin.py``'s docstring; ``SUPPORTED_VLLM`` pins the
releases they were tested against.
"""

from .plugin import ENV, SUPPORTED_VLLM, enabled, register
from .transcripts import read_margins, transcripts_from_outputs

__all__ = ["ENV", "SUPPORTED_VLLM", "enabled", "read_margins", "register", "transcripts_from_outputs"]
