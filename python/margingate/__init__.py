"""margingate: deterministic greedy LLM decoding at a fraction of the cost of batch-invariant kernels.

Import torch first (this module does it for you); the native ops are then available both as
``torch.ops.margingate.*`` and as the typed wrappers below.
"""

import torch  # noqa: F401  (the extension links against the already-imported torch)

from .ops import attention, build_info, kv_patch_, linear, margin

__all__ = ["attention", "build_info", "kv_patch_", "linear", "margin"]
__version__ = "0.1.0"
