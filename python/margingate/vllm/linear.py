"""Every unquantized CPU linear layer of a vLLM model, the lm head included, on ``margingate.linear``.

vLLM's CPU linear layers bypass ``aten::linear``: at load time ``dispatch_cpu_unquantized_gemm``
gives each layer a ``cpu_linear`` callable (oneDNN's matmul with a prepacked weight, the sgl
kernel for small weights, zentorch on AMD), and those pick their blocking and K split from the
number of rows, so a row's output depends on the batch. The replacement keeps the weight as loaded
(a contiguous ``[N, K]`` tensor, never prepacked) and calls ``margingate.linear``, whose
per-element K-reduction order is fixed: each token's output row is a function of that row alone.
"""

from __future__ import annotations

import torch

from ..ops import linear as invariant_linear


def dispatch_invariant_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Stands in for ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``."""
    del remove_weight  # the weight is what margingate.linear reads; it is never dropped
    weight = layer.weight
    if weight.is_meta:  # a layer the checkpoint leaves out (vLLM's own rule)
        layer.cpu_linear = torch.nn.functional.linear
        return
    if weight.ndim != 2:
        from .plugin import UnsupportedError

        raise UnsupportedError(
            f"margingate: the invariant plugin does not cover layer {type(layer).__name__} with a "
            f"{weight.ndim}-D weight (mixture-of-experts or convolution kernels); unset MARGINGATE_VLLM"
        )
    if not weight.is_contiguous():
        weight.data = weight.data.contiguous()
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.dtype != weight.dtype:
        raise RuntimeError(f"margingate: linear bias dtype {bias.dtype} differs from its weight's {weight.dtype}")
    layer.cpu_linear = _invariant_cpu_linear


def _invariant_cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return invariant_linear(x, weight, bias)


def install() -> None:
    from vllm.model_executor.layers import utils

    utils.dispatch_cpu_unquantized_gemm = dispatch_invariant_gemm
