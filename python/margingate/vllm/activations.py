"""vLLM's gated activations (``GeluAndMul``, ``SiluAndMul``) with position-free GELU / SiLU.

On CPU vLLM computes them with torch's ``gelu`` / ``silu`` on the first half of each row
(``forward_native``). torch's vectorised loop handles whole SIMD vectors with SLEEF and a leftover
tail (and the edge of every thread's chunk) with the scalar formula, which rounds differently, and
which elements fall in a tail depends on the number of rows (measured in
``margingate.invariant_mode``). The replacement computes them with margingate's
``fixed_gelu`` / ``fixed_silu`` (fp32, exactly rounded steps and tanh / erf / exp, which were
measured invariant in every layout): the same functions ``batch_invariant()`` uses, so the
activation bits also match margingate's canonical forward.
"""

from __future__ import annotations

import torch

from ..invariant_mode import fixed_gelu, fixed_silu


def _gelu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return fixed_gelu(x[..., :d], self.approximate) * x[..., d:]


def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return fixed_silu(x[..., :d]) * x[..., d:]


def install() -> None:
    """Before the model is built (a layer binds its forward method when it is constructed)."""
    from vllm.model_executor.layers import activation

    for cls, forward in ((activation.GeluAndMul, _gelu_and_mul), (activation.SiluAndMul, _silu_and_mul)):
        cls.forward_native = forward
        cls.forward_cpu = forward
