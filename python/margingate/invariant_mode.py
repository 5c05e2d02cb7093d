"""``batch_invariant()``: run any torch / Hugging Face model with row-invariant kernels.

Inside ``with margingate.batch_invariant():`` the result for one row of a batch depends on that
row alone, bit for bit, whatever the batch size, the row's position and the amount of padding.
Three kinds of aten ops break that on the default path, and only those are re-routed:

* **matmuls** (``aten::mm``, ``aten::addmm``, ``aten::bmm``; ``linear`` and ``matmul`` decompose
  into these): MKL / oneDNN / cuBLAS pick the tiling and the K-split from the batch shape. They go
  to ``margingate.linear``, whose per-element K-reduction order is fixed forever.
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
``batch_invariant(model)`` switches ``model`` to it for the duration; without a model, an
sdpa / flash / flex attention raises inside the mode instead of giving batch-dependent logits.

Mechanism: one ``torch.library.Library("aten", "IMPL")`` registers Python kernels for the CPU and
CUDA dispatch keys while at least one thread is inside the context; the last thread to leave
destroys it, which restores the original kernels. The kernels check a thread-local depth: a thread
that is not inside the context (or a nested region that ran on another thread) gets the vendor
kernel through the op's ``.out`` overload, which is not overridden. The context is re-entrant and
restores everything on exceptions.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)

_thread_state = threading.local()
_registration_lock = threading.Lock()
_active_threads = 0
_library: torch.library.Library | None = None


def is_enabled() -> bool:
    """Whether the calling thread is inside ``batch_invariant()``."""
    return getattr(_thread_state, "depth", 0) > 0


@contextlib.contextmanager
def batch_invariant(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Route matmuls, batch-sensitive row reductions and activations through row-invariant
    kernels for the calling thread (see the module docstring). Re-entrant; restores the original
    kernels when the last thread leaves, also on exceptions.

    With ``model`` (a Hugging Face model), its attention layers are switched to the
    ``"margingate"`` implementation for the duration as well. Without it, a model whose attention
    is sdpa / flash / flex raises inside the mode rather than give batch-dependent logits."""
    if model is not None:
        from .hf_attention import use_margingate_attention

        with use_margingate_attention(model), batch_invariant():
            yield
        return
    depth = getattr(_thread_state, "depth", 0)
    if depth == 0:
        _acquire()
    _thread_state.depth = depth + 1
    try:
        yield
    finally:
        _thread_state.depth = depth
        if depth == 0:
            _release()


def _acquire() -> None:
    global _active_threads, _library
    with _registration_lock:
        if _active_threads == 0:
            _library = _register()
            _install_attention_guard(True)
        _active_threads += 1


def _release() -> None:
    global _active_threads, _library
    with _registration_lock:
        _active_threads -= 1
        if _active_threads == 0 and _library is not None:
            _library._destroy()
            _library = None
            _install_attention_guard(False)


def _install_attention_guard(install: bool) -> None:
    try:
        from . import hf_attention
    except ImportError:  # transformers not installed: no HF attention to guard
        return
    if install:
        hf_attention.install_guard()
    else:
        hf_attention.remove_guard()


# --------------------------------------------------------------------------- matmuls
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.margingate.linear.default(x, weight, bias)


def _check_float(op: str, *tensors: torch.Tensor) -> bool:
    """True: route through margingate.linear. False: integer / bool, exact on any kernel."""
    dtype = tensors[0].dtype
    if not dtype.is_floating_point and not dtype.is_complex:
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


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not is_enabled() or not _check_float("mm", a, b):
        return torch.ops.aten.mm.out(a, b, out=a.new_empty((a.shape[0], b.shape[1])))
    return _linear(a, b.t())


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if not is_enabled() or not _check_float("addmm", bias, a, b):
        out = a.new_empty((a.shape[0], b.shape[1]))
        return torch.ops.aten.addmm.out(bias, a, b, beta=beta, alpha=alpha, out=out)
    if beta == 1 and alpha == 1 and bias.dim() == 1 and bias.shape[0] == b.shape[1]:
        return _linear(a, b.t(), bias)
    # Any other bias is elementwise per output row: still row-invariant.
    product = _linear(a, b.t())
    if alpha != 1:
        product = product * alpha
    return product + (bias if beta == 1 else bias * beta) if beta != 0 else product


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not is_enabled() or not _check_float("bmm", a, b):
        return torch.ops.aten.bmm.out(a, b, out=a.new_empty((a.shape[0], a.shape[1], b.shape[2])))
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
    return len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


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


def _mean_dim(x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    if (
        is_enabled()
        and x.dtype in _FLOAT_TYPES
        and _reduces_last_dim_only(x, dim)
        and dtype in (None, x.dtype, torch.float32)
    ):
        out_dtype = dtype or x.dtype
        return (fixed_order_sum(x, keepdim=keepdim) / x.shape[-1]).to(out_dtype)
    out = _reduction_out_like(x, dim, keepdim, dtype)
    return torch.ops.aten.mean.out(x, dim, keepdim, dtype=dtype, out=out)


def _sum_dim(x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    if (
        is_enabled()
        and x.dtype in _FLOAT_TYPES
        and _reduces_last_dim_only(x, dim)
        and dtype in (None, x.dtype, torch.float32)
    ):
        return fixed_order_sum(x, keepdim=keepdim).to(dtype or x.dtype)
    out = _reduction_out_like(x, dim, keepdim, dtype)
    return torch.ops.aten.sum.IntList_out(x, dim, keepdim, dtype=dtype, out=out)


def _reduction_out_like(x: torch.Tensor, dim, keepdim: bool, dtype) -> torch.Tensor:
    if dtype is None:
        dtype = torch.int64 if (not x.dtype.is_floating_point and not x.dtype.is_complex) else x.dtype
    # Let aten.out resize the output: an empty tensor of the right dtype is enough.
    return x.new_empty((0,), dtype=dtype)


def fixed_order_softmax(x: torch.Tensor, dim: int, *, log: bool = False) -> torch.Tensor:
    """Softmax / log_softmax from an exact max, an elementwise exp and the fixed-order sum."""
    xf = x.float().movedim(dim, -1)
    shifted = xf - xf.amax(-1, keepdim=True)  # max is exact in any order
    exp = shifted.exp()
    total = fixed_order_sum(exp, keepdim=True)
    out = shifted - total.log() if log else exp / total
    return out.movedim(-1, dim)


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else x.dtype
    if is_enabled() and x.dtype in _FLOAT_TYPES:
        return fixed_order_softmax(x, dim).to(out_dtype)
    return torch.ops.aten._softmax.out(x, dim, half_to_float, out=x.new_empty((0,), dtype=out_dtype))


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else x.dtype
    if is_enabled() and x.dtype in _FLOAT_TYPES:
        return fixed_order_softmax(x, dim, log=True).to(out_dtype)
    return torch.ops.aten._log_softmax.out(x, dim, half_to_float, out=x.new_empty((0,), dtype=out_dtype))


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


def _gelu(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    if is_enabled() and x.dtype in _FLOAT_TYPES:
        return fixed_gelu(x, approximate)
    return torch.ops.aten.gelu.out(x, approximate=approximate, out=torch.empty_like(x))


def _silu(x: torch.Tensor) -> torch.Tensor:
    if is_enabled() and x.dtype in _FLOAT_TYPES:
        return fixed_silu(x)
    return torch.ops.aten.silu.out(x, out=torch.empty_like(x))


# --------------------------------------------------------------------------- registration
# (aten op, kernel, dispatch keys). Softmax stays on the vendor kernel on CPU: measured invariant.
_OVERRIDES = (
    ("mm", _mm, ("CPU", "CUDA")),
    ("addmm", _addmm, ("CPU", "CUDA")),
    ("bmm", _bmm, ("CPU", "CUDA")),
    ("mean.dim", _mean_dim, ("CPU", "CUDA")),
    ("sum.dim_IntList", _sum_dim, ("CPU", "CUDA")),
    ("_softmax", _softmax, ("CUDA",)),
    ("_log_softmax", _log_softmax, ("CUDA",)),
    ("gelu", _gelu, ("CPU",)),
    ("silu", _silu, ("CPU",)),
)


def _register() -> torch.library.Library:
    import warnings

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # Overriding a kernel is the point; torch warns once per (op, key).
        warnings.simplefilter("ignore")
        for op, kernel, keys in _OVERRIDES:
            for key in keys:
                library.impl(op, kernel, key)
    return library
