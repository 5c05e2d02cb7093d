"""The native ops: typed wrappers around ``torch.ops.margingate.*`` and their fake kernels.

Each wrapper calls the registered op (so ``torch.compile`` sees one opaque call) and sits next
to the ``register_fake`` that tells the compiler its output shapes.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_library() -> None:
    """Loads ``_margingate.so``: the one beside this file (an installed wheel, or a development
    build that put it there), else the one an editable install built into site-packages (its
    import finder maps ``margingate._margingate`` there while the sources stay in the checkout)."""
    candidates = sorted(glob.glob(os.path.join(_HERE, "_margingate*.so")))
    if not candidates:
        spec = importlib.util.find_spec(f"{__package__}._margingate")
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            candidates = [spec.origin]
    if not candidates:
        raise ImportError(
            "margingate: the native library _margingate.so is missing from "
            f"{_HERE}. Install with `pip install --no-build-isolation .` (see README.md)."
        )
    torch.ops.load_library(candidates[0])


_load_library()


def build_info() -> dict[str, object]:
    """What this build is and what it runs: ``torch`` (built against), ``compiler``, ``cuda``,
    ``torch_runtime``, and the CPU kernels' SIMD level: ``simd`` (in use: scalar, avx2, avx512 or
    neon), ``simd_supported`` (the best this CPU has) and ``simd_reason`` (why ``simd`` is what it
    is: ``detected``, ``capped by MARGINGATE_SIMD=...``, or why a ``MARGINGATE_SIMD`` value was not
    honoured). The level is fixed when the process first uses it. ``parallel``: whether the
    kernels run on torch's intra-op threads (``torch.get_num_threads()``); False means a build
    without OpenMP, where every op runs on one thread.

    ``canonical_bits``: which bits the canonical forward gives here, ``"<contract>/<class>"``
    (docs/DESIGN.md, "One bit pattern per op"). Contract 1: every op reduces in one fixed order per
    bit class and is independent of batch, padding, query window and threads. Classes: ``cpu-fma8``
    (the scalar, avx2 and neon levels: the same bits on every such CPU, checked op by op by
    ``margingate_bench --check`` and end to end by the tests), ``cpu-avx512`` (16-lane linear and
    vdpbf16ps: its own bits until rewritten and tested on an AVX-512 machine), ``cuda`` (its own
    until a GPU run measures it). Transcripts record it; the audit promises exact zero within
    one class."""
    info: dict[str, object] = {}
    for item in torch.ops.margingate.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = value
    info["cuda"] = info.get("cuda") == "1"
    info["parallel"] = info.get("parallel") == "1"
    info["torch_runtime"] = torch.__version__
    info["canonical_bits"] = canonical_bits(str(info.get("simd", "")))
    return info


CANONICAL_BITS_CONTRACT = 1


def canonical_bits(simd: str, device: str = "cpu") -> str:
    """The bit class of the canonical forward at a SIMD level (or on CUDA): see ``build_info``."""
    if device == "cuda":
        return f"{CANONICAL_BITS_CONTRACT}/cuda"
    return f"{CANONICAL_BITS_CONTRACT}/cpu-avx512" if simd == "avx512" else f"{CANONICAL_BITS_CONTRACT}/cpu-fma8"


def canonical_bits_on(device: torch.device) -> str:
    """The bit class of a canonical forward whose weights are on ``device``, in this process."""
    return canonical_bits(str(build_info()["simd"]), device.type)


def _check_devices(op: str, anchor: str, tensors: dict, indices: dict | None = None) -> None:
    """The device rules of the native kernels, for the fake kernels.

    The dispatcher sends a call to the ``Meta`` kernel (the fake) as soon as one argument is on
    ``meta``, even when the others are CPU tensors: without this check a ``meta`` bias gave an
    uninitialised CPU result and a ``meta`` ``k_new`` patched nothing, silently. Data tensors must
    all be on the device of ``tensors[anchor]``; index tensors on that device or the CPU (the CUDA
    kernels accept host indices).
    """
    device = tensors[anchor].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(
                f"margingate.{op}: {name} is on {t.device} but {anchor} is on {device}; "
                "all arguments must be on one device"
            )
    for name, t in (indices or {}).items():
        if t is not None and t.device != device and t.device.type != "cpu":
            raise RuntimeError(
                f"margingate.{op}: {name} is on {t.device} but {anchor} is on {device}; "
                "it must be on that device or the CPU"
            )


# --------------------------------------------------------------------------- margin
def margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 index, top-2 index and the logit margin of each row, in one fused pass.

    ``logits`` is ``[B, V]`` (bf16/fp16/fp32, any strides, V >= 2). ``top1`` equals
    ``torch.argmax(logits, -1)`` (first index on ties), ``margin = logits[top1] - logits[top2]``
    is >= 0, exactly 0 on ties and NaN for a row holding NaN.
    """
    return torch.ops.margingate.margin.default(logits)


@torch.library.register_fake("margingate::margin")
def _margin_fake(logits):
    torch._check(logits.dim() == 2, lambda: "margingate.margin: logits must be 2-D")
    rows = logits.shape[0]
    return (
        logits.new_empty((rows,), dtype=torch.int64),
        logits.new_empty((rows,), dtype=torch.int64),
        logits.new_empty((rows,), dtype=torch.float32),
    )


# --------------------------------------------------------------------------- kv_patch_
def kv_patch_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """In place: ``k_cache[rows[i], :, positions[i], :] = k_new[i]`` and the same for ``v``.

    Caches use the Hugging Face layout ``[B, H_kv, T, D]`` (any strides); ``k_new``/``v_new``
    are ``[n, H_kv, D]``. Every index is validated before the first write: on an error the
    caches are untouched. Like aten's in-place ops it bumps the caches' version counters, refuses a
    leaf that requires grad while grad mode is on and an inference tensor outside inference mode,
    and it refuses aliased memory: caches that overlap each other or themselves (an expanded
    cache), and ``k_new``/``v_new`` that share memory with a cache (pass a ``.clone()``).
    """
    torch.ops.margingate.kv_patch_.default(k_cache, v_cache, rows, positions, k_new, v_new)


@torch.library.register_fake("margingate::kv_patch_")
def _kv_patch_fake(k_cache, v_cache, rows, positions, k_new, v_new):
    _check_devices(
        "kv_patch_",
        "k_cache",
        {"k_cache": k_cache, "v_cache": v_cache, "k_new": k_new, "v_new": v_new},
        {"rows": rows, "positions": positions},
    )
    return None


# --------------------------------------------------------------------------- linear
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with a fixed K-reduction order: every output row is batch-invariant.

    ``x`` is ``[..., K]``, ``weight`` ``[N, K]`` (the ``nn.Linear`` layout), ``bias`` ``[N]`` or
    None, all of one dtype (bf16, fp16 or fp32), any strides; the result is ``[..., N]`` in x's
    dtype, accumulated in fp32. Row ``i`` of the result is bit-identical to computing that row
    alone, for any number of rows, any position and any strides (the reduction order of each
    element is fixed per SIMD level; see ``cpp/src/linear/linear.cpp``). A bf16 weight is read as
    bf16 (never copied to fp32); a weight whose rows are not contiguous along K is first packed
    to a dense ``[N, K]`` copy of its own dtype (a transposed 4096 x 4096 weight costs ~40 ms of
    CPU per call on the dev machine: callers that reuse one should pass a contiguous copy).
    Inference only: the op has no backward.

    How the batch-invariant mode routes aten's matmuls through it (``w.t()`` is a free view):

    - ``linear(x, w, b)``           -> ``linear(x, w, b)``
    - ``mm(a[M, K], b[K, N])``      -> ``linear(a, b.t())``
    - ``addmm(c, a, b, beta=1, alpha=1)`` with ``c`` a bias ``[N]`` (or broadcast to it)
                                    -> ``linear(a, b.t(), c)``; other ``c``/``beta``/``alpha``:
                                       ``beta * c + alpha * linear(a, b.t())`` (elementwise, so
                                       still row-invariant)
    - ``matmul(a[..., K], b[K, N])`` (2-D ``b``) -> ``linear(a, b.t())``
    - ``bmm(a[B, M, K], b[B, K, N])`` and ``matmul`` with a batched ``b``
                                    -> ``torch.stack([linear(a[i], b[i].t()) for i in range(B)])``
                                       (one call per batch entry; each is row-invariant)
    """
    return torch.ops.margingate.linear.default(x, weight, bias)


@torch.library.register_fake("margingate::linear")
def _linear_fake(x, weight, bias=None):
    torch._check(x.dim() >= 1, lambda: "margingate.linear: x must have at least 1 dimension")
    torch._check(weight.dim() == 2, lambda: "margingate.linear: weight must be 2-D [N, K]")
    torch._check(
        weight.shape[1] == x.shape[-1], lambda: "margingate.linear: weight must be [N, K] with K = x.size(-1)"
    )
    torch._check(weight.dtype == x.dtype, lambda: "margingate.linear: weight must have x's dtype")
    # The native kernels' own messages (csrc/cpu/linear.cpp).
    if weight.device != x.device:
        raise RuntimeError(
            "margingate.linear: x and weight must be on the same device, "
            f"got x on {x.device} and weight on {weight.device}"
        )
    if bias is not None and bias.device != x.device:
        raise RuntimeError(f"margingate.linear: bias must be on x's device {x.device}, got {bias.device}")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: "margingate.linear: bias must be 1-D [N]",
        )
        torch._check(bias.dtype == x.dtype, lambda: "margingate.linear: bias must have x's dtype")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# --------------------------------------------------------------------------- attention
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_rows: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Batch- and query-invariant GQA attention (Hugging Face layout, any strides).

    ``q`` is ``[B, Hq, Tq, D]``, ``k``/``v`` are ``[Bkv, Hkv, Tk, D]`` (bf16/fp16/fp32, one dtype,
    ``Hq % Hkv == 0``, ``D <= 256``). The queries are the last ``Tq`` positions: query ``j`` sits at
    ``p = Tk - Tq + j`` and sees keys ``t`` with ``kv_start[b] <= t`` (left padding), ``t <= p``
    when ``causal`` and ``p - window < t`` with a sliding ``window`` (which requires ``causal``).
    ``kv_rows[b]`` names the k/v row that query row ``b`` reads (default: row ``b``, then
    ``Bkv == B``). ``scale`` defaults to ``1/sqrt(D)``. Returns a contiguous ``[B, Hq, Tq, D]``
    tensor in q's dtype; a query that sees no key gets zeros. A NaN or +inf among a query's scores
    (a NaN in q or in a key it sees, an infinite key element) makes its output NaN, and a NaN in a
    value it sees makes that output column NaN, as in torch's attention.

    Each output is bit-identical whatever the batch, the padding amount, the cache capacity, the
    kv_rows indirection and Tq (a decode step equals the same query inside a prefill).
    """
    return torch.ops.margingate.attention.default(
        q, k, v, kv_start, kv_rows, causal=causal, scale=scale, window=window
    )


@torch.library.register_fake("margingate::attention")
def _attention_fake(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    torch._check(q.dim() == 4, lambda: "margingate.attention: q must be 4-D [batch, heads, seq, head_dim]")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "margingate.attention: k and v must be 4-D")
    torch._check(
        k.dtype == q.dtype and v.dtype == q.dtype, lambda: "margingate.attention: q, k, v dtypes differ"
    )
    torch._check(k.shape[3] == q.shape[3], lambda: "margingate.attention: q and k head_dim differ")
    _check_devices("attention", "q", {"q": q, "k": k, "v": v}, {"kv_start": kv_start, "kv_rows": kv_rows})
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------- sample_margin
def sample_margin(
    logits: torch.Tensor,
    seed: int | torch.Tensor,
    position: int | torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    *,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded Gumbel-max sampling of one token per row, with the margins a gate needs.

    ``logits`` is ``[B, V]`` (bf16/fp16/fp32, any strides, V >= 2). Per row: ``seed`` (int64),
    ``position`` (int), ``temperature`` (float32, >= 0; 0 = greedy), ``top_k`` (int, 0 = off) and
    ``min_p`` (float32 in [0, 1], 0 = off); each is a ``[B]`` tensor on the logits' device or a
    Python scalar for every row. Returns int64 ``token`` and ``runner_up`` and float32 ``margin``
    and ``cutoff_margin``, all ``[B]``:

    - ``token = argmax`` over the candidates of ``s = float32(logits / T) + g`` (first index on
      ties), ``g`` the counter-based Gumbel noise of (seed, position, index)
      (``margingate.noise.gumbel_noise``), never materialised;
    - ``runner_up``: the second-best candidate by ``s`` (-1 when only one candidate is left);
    - ``margin = T * (s[token] - s[runner_up])`` in logit units, exactly 0 on ties, +inf with a
      single candidate;
    - ``cutoff_margin``: how far (in logit units) the top_k / min_p cut-off is from changing the
      token (+inf without truncation); see ``cpp/include/margingate/sampling.h`` for the exact rule.

    top_k keeps exactly k candidates (ties at the k-th value keep the lowest indices); min_p keeps
    ``logits - max >= T * ln(min_p)``. A row with T = 0 is greedy (``margingate.margin``'s answer,
    cutoff_margin +inf); a row with NaN gets margingate.margin's token and NaN margins.
    A token is the same under any perturbation of the logits smaller than h whenever ``margin`` and
    ``cutoff_margin`` are both above 2h (plus rounding): the gate of greedy decoding carries over.

    ``top_p`` is refused: its cut-off is a cumulative sum of softmax probabilities, so whether a
    token is kept depends on the rounding of every probability in the sum, not on a gap between two
    logits that a margin can bound; use ``top_k`` or ``min_p``.
    """
    if top_p is not None:
        raise ValueError(
            "margingate.sample_margin: top_p is not supported: its cut-off is a cumulative sum of "
            "softmax probabilities, so whether a token is kept depends on the rounding of every "
            "probability in the sum, which no margin can bound; use top_k or min_p instead"
        )
    rows, device = (logits.shape[0] if logits.dim() >= 1 else 0), logits.device

    def per_row(value, dtype):
        if value is None or isinstance(value, torch.Tensor):
            return value
        if dtype == torch.int64:
            value = int(value) & ((1 << 64) - 1)
            value = value - (1 << 64) if value >= 1 << 63 else value
        return torch.full((rows,), value, dtype=dtype, device=device)

    return torch.ops.margingate.sample_margin.default(
        logits,
        per_row(seed, torch.int64),
        per_row(position, torch.int64),
        per_row(temperature, torch.float32),
        per_row(top_k, torch.int64),
        per_row(min_p, torch.float32),
    )


@torch.library.register_fake("margingate::sample_margin")
def _sample_margin_fake(logits, seed, position, temperature, top_k=None, min_p=None):
    # A meta argument next to real logits dispatches here, not to the CPU kernel: without the device
    # rule this returned uninitialised tokens (the CPU/CUDA kernels apply the same rule).
    _check_devices(
        "sample_margin", "logits",
        {"logits": logits, "seed": seed, "position": position, "temperature": temperature, "top_k": top_k, "min_p": min_p},
    )  # fmt: skip
    torch._check(logits.dim() == 2, lambda: "margingate.sample_margin: logits must be 2-D")
    rows = logits.shape[0]
    for name, t in (("seed", seed), ("position", position), ("temperature", temperature),
                    ("top_k", top_k), ("min_p", min_p)):
        if t is not None:
            torch._check(t.dim() == 1, lambda name=name: f"margingate.sample_margin: {name} must be 1-D")
    return (
        logits.new_empty((rows,), dtype=torch.int64),
        logits.new_empty((rows,), dtype=torch.int64),
        logits.new_empty((rows,), dtype=torch.float32),
        logits.new_empty((rows,), dtype=torch.float32),
    )
