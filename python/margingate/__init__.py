"""margingate: reproducible LLM decoding (the same tokens alone or in any batch) at a fraction of
the cost of running everything with batch-invariant kernels.

The package root only re-exports (the transformers-dependent names on first use). Layers, each
importing only the ones above it in this list (docs/DESIGN.md has the module table):

- ``jsonl``: the one total reader of user JSON/JSONL files;
- ``ops``: the native kernels (``margin``, ``linear``, ``attention``, ``kv_patch_``,
  ``sample_margin``) and ``build_info``; ``noise``: the sampler's noise in plain torch;
- ``invariant_mode``: ``batch_invariant()``, row-invariant kernels for any torch model (it
  imports ``hf_attention`` only when given a transformers model);
- ``hf_attention``: the ``"margingate"`` Hugging Face attention implementation;
- ``hf_compat``, ``batching``: the owner of transformers internals; left padding;
- ``canonical``: ``canonical_forward`` / ``canonical_prefill``, the reference forward;
- ``verifier``: canonical replay and in-place K/V repair of flagged rows;
- ``policies``, ``sampling``, ``stats``, ``processor``: the policies and thresholds; the sampler;
  per-row statistics; ``MarginGateProcessor``, one gated step;
- ``decoding``, ``speculative``, ``generation``: ``generate``, margingate's decode loops;
- ``measure``: flips and determinism across batch configurations (the CLI and benchmarks use it);
- ``transcripts``, ``difr``: the transcript format; ``audit`` (Token-DiFR, Activation-DiFR);
- ``models``, ``prompt_sets``: model loading and the built-in prompt sets;
- ``cli``: the ``margingate`` command; ``vllm``: the vLLM plugin.
"""

import torch  # noqa: F401  (the extension links against the already-imported torch)

from .ops import attention, build_info, kv_patch_, linear, margin

__all__ = ["attention", "build_info", "kv_patch_", "linear", "margin"]
from . import noise  # noqa: E402  (sample_margin's Gumbel noise in plain torch, for audits)
from .ops import sample_margin  # noqa: E402

__all__ += ["noise", "sample_margin"]

from .invariant_mode import batch_invariant  # noqa: E402
from .policies import EXACT_POLICIES, POLICIES  # noqa: E402

__all__ += ["EXACT_POLICIES", "POLICIES", "batch_invariant"]

# The decode stack imports transformers (the optional [hf] extra, and a few seconds of imports):
# its names are loaded on first use, so `import margingate` (and a CLI usage error) stays fast.
_LAZY = {
    "audit": "difr",
    "SUPPORTED_MODEL_TYPES": "canonical",
    "canonical_forward": "canonical",
    "canonical_prefill": "canonical",
    "GenerationResult": "generation",
    "generate": "generation",
    "MarginGateProcessor": "processor",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'margingate' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as error:  # transformers is the optional [hf] extra
        if error.name != "transformers" and not str(error.name).startswith("transformers."):
            raise
        raise ImportError(f'margingate.{name} needs transformers: pip install "margingate[hf]"') from None
    globals()[name] = value
    return value


__all__ += [
    "SUPPORTED_MODEL_TYPES",
    "GenerationResult",
    "MarginGateProcessor",
    "audit",
    "canonical_forward",
    "canonical_prefill",
    "generate",
]

from . import prompt_sets  # noqa: E402
from .models import load_default_model, load_model  # noqa: E402

__all__ += ["load_default_model", "load_model", "prompt_sets"]
__version__ = "0.1.0"
