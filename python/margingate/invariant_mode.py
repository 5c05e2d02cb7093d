"""``batch_invariant()``: run any torch / Hugging Face model with row-invariant kernels.

Inside ``with margingate.batch_invariant():`` the result for one row of a batch depends on that
row alone, bit for bit, whatever the batch size, the row's position and the amount of padding.
Three kinds of aten ops break that on the default path, and only those are re-routed:

* **matmuls** (``aten::mm``, ``aten::addmm``, ``aten::bmm``; ``linear``, ``matmul`` and ``einsum``
  decompose into these): MKL / oneDNN / cuBLAS pick the tiling and the K-split from the batch
  shape. They go to ``margingate.linear``, whose per-element K-reduction order is fixed forever.
* **row reductions** (``aten::mean.dim``, ``aten::sum.dim_IntList`` over the last dim, as RMSNorm
  uses them): measured on this CPU (AMD EPYC, 2 threads, torch 2.13), a row's mean / sum is
  batch-invariant for rows up to 32768 elements but NOT for long rows (262144: it varies with the
  batch size and the layout, because TensorIterator then splits the reduction across threads);
  on more threads the split starts at shorter rows, and CUDA's reduction config depends on the
  number of rows. They go through ``margingate.linear`` against a ones vector: a sum with the
  linear op's fixed K order. ``softmax`` / ``log_softmax`` were measured invariant on this CPU at
  every size (up to 262144 columns, bf16 and fp32), so on CPU they keep the vendor kernel; on
  CUDA (where the block size depends on the row count) they are composed from an exact max, an
  elementwise exp and the fixed-order sum.
* **elementwise activations with a scalar tail** (``aten::gelu``, ``aten::silu`` on CPU): the
  vectorised loop handles whole SIMD vectors with SLEEF and the leftover tail (and the edges of
  every thread's chunk) with the scalar libm formula, which rounds differently; whether an element
  of a row falls in the tail depends on the batch. Measured: gelu (tanh and erf forms) varies in
  bf16 and fp32 (also at hidden 640 as a transposed head view), silu in fp32. They are recomposed
  in fp32 from ops whose every element is computed the same way (``mul``/``add``/``div`` are
  exactly rounded; ``tanh``, ``exp``, ``erf`` were measured invariant in every layout).

The measurement is reproducible: ``bench/python/bench_batch_invariant.py --row-ops`` (results in
``bench/README.md``).

Attention is the Hugging Face attention implementation ``"margingate"`` (``hf_attention.py``):
``batch_invariant(model)`` switches ``model`` to it for the duration. Any other attention kernel
raises inside the mode instead of giving batch-dependent logits: the mode refuses the aten
scaled-dot-product-attention ops (every sdpa backend, including the math fallback's
``_safe_softmax``), flash-attention custom ops and the ``flex_attention`` higher-order op. An
"eager" attention (plain matmuls and a softmax, routed like any other op) is not refused; it is
batch-invariant only without left padding, since a padded row reduces over more keys.

Mechanism: two torch modes pushed on the calling thread's mode stacks, which torch keeps per
thread, so other threads never see them and nothing is registered or patched process-wide.
``BatchInvariantMode`` (a ``TorchDispatchMode``) does the routing above at the aten level, where it
also sees the ops that composites (``linear``, ``matmul``, ``einsum``, ``rms_norm``...) call from
C++. Left alone on the stack it costs one Python call per aten op of the model (measured: +40 % of
a Gemma 3 270M decode step). So a ``TorchFunctionMode`` stands in front of it: torch functions
known to reach no routed op (views, elementwise arithmetic, conversions: ``_LEAF_*`` below) run
directly, ``F.linear`` and ``mean`` go straight to the same fixed kernels, and every other function
runs with the dispatch mode pushed for the duration of the call, so its aten ops are routed exactly
as if the dispatch mode were on all along. (Measured in ``bench/README.md``: the pair costs about
what the old process-wide aten registration did.) A call that bypasses ``__torch_function__``
(code under ``torch._C.DisableTorchFunction``) is not routed.

The context is re-entrant (a nested entry only counts), and every exit path, ``KeyboardInterrupt``
included, pops the modes and restores the model in ``__exit__``.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode, _push_mode

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
# The flex_attention higher-order op (torch registers it on import of torch.nn.attention.flex_attention).
_FLEX_ATTENTION = getattr(torch.ops.higher_order, "flex_attention", None)

_thread_state = threading.local()


def is_enabled() -> bool:
    """Whether the calling thread is inside ``batch_invariant()``."""
    return getattr(_thread_state, "depth", 0) > 0


class _BatchInvariant:
    """The context manager ``batch_invariant()`` returns (one instance may be entered again while
    it is active: every entry is undone by the matching exit)."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self._model = model
        self._switches: list[object] = []

    def __enter__(self) -> None:
        switch = None
        if self._model is not None:
            from .hf_attention import use_margingate_attention  # needs transformers: only with a model

            switch = use_margingate_attention(self._model)
            switch.__enter__()
        try:
            _enter_thread()
        except BaseException:
            if switch is not None:
                switch.__exit__(None, None, None)
            raise
        self._switches.append(switch)

    def __exit__(self, exc_type, exc, traceback) -> None:
        switch = self._switches.pop()
        try:
            _leave_thread()
        finally:
            if switch is not None:
                switch.__exit__(None, None, None)


def batch_invariant(model: torch.nn.Module | None = None) -> _BatchInvariant:
    """Route matmuls, batch-sensitive row reductions and activations through row-invariant
    kernels for the calling thread (see the module docstring). Re-entrant; restores everything
    on every exit path, exceptions and ``KeyboardInterrupt`` included.

    With ``model`` (a Hugging Face model), its attention layers are switched to the
    ``"margingate"`` implementation for the duration as well (other threads using the model
    outside the mode keep its own implementation, see ``hf_attention``). Without it, a model
    whose attention is sdpa / flash / flex raises inside the mode rather than give
    batch-dependent logits."""
    return _BatchInvariant(model)


def _enter_thread() -> None:
    depth = getattr(_thread_state, "depth", 0)
    if depth == 0:
        function_filter = _FunctionFilter(BatchInvariantMode())
        function_filter.__enter__()
        try:
            attention = _canonical_attention()
            if attention is not None:
                attention.__enter__()
        except BaseException:
            function_filter.__exit__(None, None, None)
            raise
        _thread_state.entered = (function_filter, attention)
    _thread_state.depth = depth + 1


def _leave_thread() -> None:
    depth = _thread_state.depth - 1
    _thread_state.depth = depth
    if depth == 0:
        (function_filter, attention), _thread_state.entered = _thread_state.entered, None
        try:
            if attention is not None:
                attention.__exit__(None, None, None)
        finally:
            function_filter.__exit__(None, None, None)


def _canonical_attention():
    """hf_attention's per-thread switch (its "margingate" attention runs our kernel only in threads
    inside the mode), or None without transformers."""
    try:
        from . import hf_attention
    except ModuleNotFoundError as error:
        if error.name != "transformers" and not str(error.name).startswith("transformers."):
            raise
        return None
    return hf_attention.canonical_attention()


class BatchInvariantMode(TorchDispatchMode):
    """The dispatch mode behind ``batch_invariant()``: routes the ops of ``_ROUTES`` and refuses
    attention kernels that are not batch-invariant; every other op runs unchanged."""

    # flex_attention is a higher-order op: it reaches __torch_dispatch__ (and raises) only with this.
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            handler = _handlers[func]
        except KeyError:
            handler = _handlers[func] = _handler_for(func)
        if handler is None:
            return func(*args, **kwargs) if kwargs else func(*args)
        return handler(func, *args, **(kwargs or {}))


class _FunctionFilter(TorchFunctionMode):
    """The cheap first stage: a function-level mode that lets through the torch functions known to
    reach no routed or refused aten op (views, elementwise arithmetic, conversions), sends
    ``F.linear`` straight to ``margingate.linear``, and runs every other function with
    ``BatchInvariantMode`` pushed, so that the aten ops it reaches, also from C++ composites, are
    routed exactly as if the dispatch mode were on for the whole block. (A dispatch mode alone
    costs one Python call per aten op of the model: see the module docstring.)"""

    def __init__(self, dispatch_mode: BatchInvariantMode) -> None:
        super().__init__()
        self._dispatch_mode = dispatch_mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _FLEX_ATTENTION:
            # flex_attention wraps its op in torch.compile, which traces this method: refuse here,
            # before torch.compile fails on the mode's stack edits with a less helpful message.
            _refuse_attention(func)
        kind = _function_kinds.get(func)
        if kind is None and isinstance(func, torch._ops.OpOverload) and func.namespace == "margingate":
            kind = _function_kinds[func] = _LEAF  # our own kernels
        if kind is _LEAF:
            return func(*args, **kwargs) if kwargs else func(*args)
        if kind is not None:
            out = kind(*args, **(kwargs or {}))
            if out is not None:
                return out
        # torch's own mode push / pop (TorchDispatchMode.__enter__ also toggles process-wide
        # Python flags, which threads would race on); the stack it edits is this thread's.
        _push_mode(self._dispatch_mode)
        try:
            return func(*args, **kwargs) if kwargs else func(*args)
        finally:
            _pop_mode()


# --------------------------------------------------------------------------- matmuls
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.margingate.linear.default(x, weight, bias)


def _routes_float(op: str, *tensors: torch.Tensor) -> bool:
    """True: a float CPU / CUDA op, route it. False: integer / bool (exact on any kernel) or another
    device: run the vendor kernel."""
    dtype = tensors[0].dtype
    if not dtype.is_floating_point and not dtype.is_complex:
        return False
    if tensors[0].device.type not in ("cpu", "cuda"):
        return False
    for t in tensors:
        if t.dtype not in _FLOAT_TYPES:
            raise RuntimeError(
                f"margingate.batch_invariant: aten::{op} on {t.dtype} has no batch-invariant kernel "
                "(supported: float32, bfloat16, float16); run it outside batch_invariant()"
            )
    if any(t.dtype != dtype for t in tensors):
        raise RuntimeError(
            f"margingate.batch_invariant: aten::{op} got mixed dtypes {[t.dtype for t in tensors]}"
        )
    return True


def _mm(func, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _routes_float("mm", a, b):
        return func(a, b)
    return _linear(a, b.t())


def _addmm(func, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if not _routes_float("addmm", bias, a, b):
        return func(bias, a, b, beta=beta, alpha=alpha)
    if beta == 1 and alpha == 1 and bias.dim() == 1 and bias.shape[0] == b.shape[1]:
        return _linear(a, b.t(), bias)
    # Any other bias is elementwise per output row: still row-invariant.
    product = _linear(a, b.t())
    if alpha != 1:
        product = product * alpha
    return product + (bias if beta == 1 else bias * beta) if beta != 0 else product


def _bmm(func, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _routes_float("bmm", a, b):
        return func(a, b)
    if a.shape[2] == 1:
        # K == 1 (the rotary embedding's outer product): one exactly rounded product per element,
        # the same on every kernel.
        return a * b
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    for i in range(a.shape[0]):
        out[i] = _linear(a[i], b[i].t())
    return out


# --------------------------------------------------------------------------- row reductions
def _reduces_last_dim_only(x: torch.Tensor, dim) -> bool:
    if dim is None or x.dim() == 0:
        return False
    dims = [dim] if isinstance(dim, int) else list(dim)
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % x.dim() == x.dim() - 1


_ones_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """A cached fp32 ones row [1, n]: the weight of the fixed-order sum (read-only)."""
    key = (n, device)
    ones = _ones_cache.get(key)
    if ones is None:
        if len(_ones_cache) > 64:
            _ones_cache.clear()
        ones = _ones_cache[key] = torch.ones((1, n), dtype=torch.float32, device=device)
    return ones


def fixed_order_sum(x: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
    """Sum over the last dim in fp32 with margingate.linear's fixed K order (row-invariant)."""
    xf = x if x.dtype == torch.float32 else x.float()
    ones = _ones(xf.shape[-1], xf.device)
    total = xf.new_zeros((*xf.shape[:-1], 1)) if xf.shape[-1] == 0 else _linear(xf, ones)
    return total if keepdim else total.squeeze(-1)


def _routes_reduction(x: torch.Tensor, dim, dtype) -> bool:
    return (
        x.dtype in _FLOAT_TYPES
        and x.device.type in ("cpu", "cuda")
        and _reduces_last_dim_only(x, dim)
        and dtype in (None, x.dtype, torch.float32)
    )


def _mean_dim(func, x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    if not _routes_reduction(x, dim, dtype):
        return func(x, dim, keepdim, dtype=dtype)
    return (fixed_order_sum(x, keepdim=keepdim) / x.shape[-1]).to(dtype or x.dtype)


def _sum_dim(func, x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    if not _routes_reduction(x, dim, dtype):
        return func(x, dim, keepdim, dtype=dtype)
    return fixed_order_sum(x, keepdim=keepdim).to(dtype or x.dtype)


def fixed_order_softmax(x: torch.Tensor, dim: int, *, log: bool = False) -> torch.Tensor:
    """Softmax / log_softmax from an exact max, an elementwise exp and the fixed-order sum."""
    xf = x.float().movedim(dim, -1)
    shifted = xf - xf.amax(-1, keepdim=True)  # max is exact in any order
    exp = shifted.exp()
    total = fixed_order_sum(exp, keepdim=True)
    out = shifted - total.log() if log else exp / total
    return out.movedim(-1, dim)


def _softmax(func, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    # CUDA only: on CPU the vendor softmax was measured invariant (module docstring).
    if x.device.type != "cuda" or x.dtype not in _FLOAT_TYPES:
        return func(x, dim, half_to_float)
    return fixed_order_softmax(x, dim).to(torch.float32 if half_to_float else x.dtype)


def _log_softmax(func, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    if x.device.type != "cuda" or x.dtype not in _FLOAT_TYPES:
        return func(x, dim, half_to_float)
    return fixed_order_softmax(x, dim, log=True).to(torch.float32 if half_to_float else x.dtype)


# --------------------------------------------------------------------------- activations
_GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # torch's kBeta: sqrt(2 / pi)
_GELU_KAPPA = 0.044715


def fixed_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU in fp32 from exactly rounded ops and tanh / erf (no scalar tail: position-free)."""
    # In place on one fp32 temporary: the same exactly rounded steps as the expression
    # 0.5 * x * (1 + tanh(beta * (x + kappa * x^3))), with fewer allocations.
    xf = x.float()
    if approximate == "tanh":
        out = xf * xf
        out.mul_(xf).mul_(_GELU_KAPPA).add_(xf).mul_(_GELU_BETA).tanh_().add_(1.0)
    else:
        out = (xf * math.sqrt(0.5)).erf_().add_(1.0)
    return out.mul_(xf).mul_(0.5).to(x.dtype)


def fixed_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU in fp32 as x / (1 + exp(-x)) (no scalar tail: position-free)."""
    xf = x.float()
    return torch.div(xf, xf.neg().exp_().add_(1.0)).to(x.dtype)


def _gelu(func, x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    # CPU only: CUDA's elementwise kernels have no scalar tail.
    if x.device.type != "cpu" or x.dtype not in _FLOAT_TYPES:
        return func(x, approximate=approximate)
    return fixed_gelu(x, approximate)


def _silu(func, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype not in _FLOAT_TYPES:
        return func(x)
    return fixed_silu(x)


# --------------------------------------------------------------------------- attention guard
# Every aten entry of scaled_dot_product_attention's backends (the math fallback decomposes into
# matmuls and the attention-only _safe_softmax), and the fused-attention kernels they call.
_REFUSED_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "_safe_softmax",
)


def _refuse_attention(func, *args, **kwargs):
    raise RuntimeError(
        f"margingate.batch_invariant: an attention kernel that is not batch-invariant ran inside the mode "
        f"({func}: the model's attn_implementation is sdpa, flash or flex); use "
        "`with margingate.batch_invariant(model):` (switches the model to the 'margingate' attention), "
        "margingate.canonical_forward, or load it with attn_implementation='margingate'"
    )


# --------------------------------------------------------------------------- the routing table
_ROUTES = {
    torch.ops.aten.mm.default: _mm,
    torch.ops.aten.addmm.default: _addmm,
    torch.ops.aten.bmm.default: _bmm,
    torch.ops.aten.mean.dim: _mean_dim,
    torch.ops.aten.sum.dim_IntList: _sum_dim,
    torch.ops.aten._softmax.default: _softmax,
    torch.ops.aten._log_softmax.default: _log_softmax,
    torch.ops.aten.gelu.default: _gelu,
    torch.ops.aten.silu.default: _silu,
}


def _handler_for(func):
    """The handler of an op the mode has not seen yet (None: run it unchanged)."""
    if func in _ROUTES:
        return _ROUTES[func]
    name = getattr(func, "__name__", "")
    namespace = getattr(func, "namespace", "")
    if isinstance(func, torch._ops.HigherOrderOperator):
        return _refuse_attention if "flex_attention" in name else _run_higher_order
    if namespace == "aten" and func.overloadpacket.__name__ in _REFUSED_ATTENTION:
        return _refuse_attention
    # flash-attn's own ops (flash_attn::*, flash_attn_3::*) and the Hub kernels' (_flash_attn_<hash>::*).
    if "flash_attn" in namespace:
        return _refuse_attention
    return None


def _run_higher_order(func, *args, **kwargs):
    return func(*args, **kwargs)


# Handlers by op, filled on first sight (a dict lookup per op afterwards; racing fills agree).
_handlers: dict[object, object] = dict(_ROUTES)


# --------------------------------------------------------------------------- the function filter
_LEAF = "leaf"

# Tensor methods and torch functions that are one aten op (or a view) none of which is routed or
# refused above, whatever their arguments: they run without the dispatch stage. Anything not listed
# (sum, mean, softmax, matmul, einsum, norms, losses, attention, ...) takes the exact aten path.
# fmt: off
_LEAF_TENSOR_METHODS = [
    "__getitem__", "__setitem__", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__",
    "__pow__", "__rpow__", "__and__", "__or__", "__xor__", "__invert__", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__index__", "__int__", "__float__", "add",
    "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "neg_", "pow", "pow_", "rsqrt", "rsqrt_",
    "sqrt", "sqrt_", "exp", "exp_", "tanh", "tanh_", "cos", "sin", "abs", "clamp", "clamp_", "float",
    "half", "bfloat16", "double", "long", "int", "bool", "to", "type", "type_as", "view", "view_as",
    "reshape", "reshape_as", "transpose", "transpose_", "permute", "unsqueeze", "unsqueeze_", "squeeze",
    "squeeze_", "contiguous", "clone", "detach", "expand", "expand_as", "flatten", "narrow", "select",
    "split", "chunk", "index_select", "gather", "masked_fill", "masked_fill_", "copy_", "fill_", "zero_",
    "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "repeat", "flip", "dim", "size",
    "numel", "stride", "is_contiguous", "item", "tolist", "any", "all", "data_ptr", "element_size",
    "is_floating_point",
]
_LEAF_TORCH_FUNCTIONS = [
    "cat", "stack", "rsqrt", "sqrt", "exp", "tanh", "cos", "sin", "neg", "tensor", "as_tensor", "arange",
    "ones", "zeros", "empty", "full", "ones_like", "zeros_like", "empty_like", "full_like", "where",
    "clamp",
]
# fmt: on


def _needs_autograd(*tensors) -> bool:
    """The direct paths call margingate ops, which have no derivative: with autograd recording,
    take the aten path (routed below autograd, so linear's / mean's own backward applies)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _direct_mean(x, dim=None, keepdim=False, *, dtype=None, out=None):
    """``mean`` over the last dim as ``aten::mean.dim``'s handler computes it (None: any other
    form, take the aten path)."""
    if (
        out is not None
        or not isinstance(x, torch.Tensor)
        or _needs_autograd(x)
        or not _routes_reduction(x, dim, dtype)
    ):
        return None
    return (fixed_order_sum(x, keepdim=keepdim) / x.shape[-1]).to(dtype or x.dtype)


def _direct_linear(x, weight, bias=None):
    """``F.linear`` as one ``margingate.linear`` call (None: not a case it covers, take the aten
    path). Same bits as the aten route (addmm / mm -> margingate.linear: a row's result depends on
    the row alone, however the rows are folded), except that the bias is always fused: aten adds it
    separately for a non-contiguous 3-D input, which could make a row's bits depend on its batch's
    layout."""
    dtype = x.dtype
    if (
        _needs_autograd(x, weight, bias)
        or dtype not in _FLOAT_TYPES
        or weight.dtype != dtype
        or weight.dim() != 2
        or x.dim() < 2
        or x.device.type not in ("cpu", "cuda")
        or (bias is not None and (bias.dtype != dtype or bias.dim() != 1))
    ):
        return None
    return _linear(x, weight, bias)


def _function_kinds_table() -> dict[object, str]:
    kinds: dict[object, str] = {}
    for name in _LEAF_TENSOR_METHODS:
        kinds[getattr(torch.Tensor, name)] = _LEAF
    for name in _LEAF_TORCH_FUNCTIONS:
        kinds[getattr(torch, name)] = _LEAF
    # Attribute reads (shape, dtype, device, T, ...) reach __torch_function__ as getters.
    for name in dir(torch._C.TensorBase):
        attribute = getattr(torch._C.TensorBase, name, None)
        if type(attribute).__name__ == "getset_descriptor":
            kinds[attribute.__get__] = _LEAF
    kinds[torch._C._nn.linear] = _direct_linear
    kinds[torch.Tensor.mean] = kinds[torch.mean] = _direct_mean
    return kinds


_function_kinds = _function_kinds_table()
