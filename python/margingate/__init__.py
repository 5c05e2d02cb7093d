"""margingate: deterministic greedy LLM decoding at a fraction of the cost of batch-invariant kernels.

Import torch first (this module does it for you); the native ops are then available both as
``torch.ops.margingate.*`` and as the typed wrappers below.
"""

import torch  # noqa: F401  (the extension links against the already-imported torch)

from .ops import attention, build_info, kv_patch_, linear, margin

__all__ = ["attention", "build_info", "kv_patch_", "linear", "margin"]
from . import noise  # noqa: E402  (sample_margin's Gumbel noise in plain torch, for audits)
from .ops import sample_margin  # noqa: E402

__all__ += ["noise", "sample_margin"]

# Batch-invariant mode and the canonical forward (registers the "margingate" HF attention).
from .batch_invariant import batch_invariant  # noqa: E402

try:
    from .canonical import SUPPORTED_MODEL_TYPES, canonical_forward
except ModuleNotFoundError as error:  # transformers is the optional [hf] extra
    if error.name != "transformers" and not str(error.name).startswith("transformers."):
        raise
    SUPPORTED_MODEL_TYPES = ()

    def canonical_forward(*args, **kwargs):
        raise ImportError('margingate.canonical_forward needs transformers: pip install "margingate[hf]"')


__all__ += ["SUPPORTED_MODEL_TYPES", "batch_invariant", "canonical_forward"]

# Model loading and prompt sets (the cli engineer's part of the API).
from . import prompt_sets  # noqa: E402
from .models import load_default_model, load_model  # noqa: E402

__all__ += ["load_default_model", "load_model", "prompt_sets"]
__version__ = "0.1.0"

# --- generation (MarginGate policies, the HF logits-processor hook)
try:
    from .generation import POLICIES, GenerationResult, MarginGateProcessor, generate
except ModuleNotFoundError as error:  # transformers is the optional [hf] extra
    if error.name != "transformers" and not str(error.name).startswith("transformers."):
        raise
    POLICIES = ("off", "margin", "always", "invariant")

    def _needs_transformers(*args, **kwargs):
        raise ImportError('margingate generation needs transformers: pip install "margingate[hf]"')

    GenerationResult = MarginGateProcessor = generate = _needs_transformers

__all__ += ["POLICIES", "GenerationResult", "MarginGateProcessor", "generate"]
