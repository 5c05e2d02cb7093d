"""The sampling noise in plain torch, bit-identical to the native ``sample_margin``.

The definition (also in ``cpp/include/margingate/sampling.h``; all integers uint64 modulo 2^64,
seed and position taken as two's-complement uint64):

    G        = 0x9E3779B97F4A7C15
    mix64(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    row_key  = mix64(mix64(seed + G) ^ position)
    bits(i)  = mix64(row_key + (i + 1) * G)
    u        = ((bits >> 12) + 0.5) * 2**-52                  (float64, exact, in (0, 1))
    g        = float32(-log_mg(-log_mg(u)))                    (float64, rounded once to float32)

``log_mg`` is fdlibm's logarithm written with IEEE ``+ - * /`` only, so that the CPU, CUDA and this
module compute the same bits (libm ``log`` differs in the last bit between platforms). Run these
functions eagerly: a compiler that fuses ``a * b + c`` into an FMA would change the bits.

For audits: ``noised_scores`` gives the scores ``float32(logits / T) + g`` of every index, the
quantity whose noised top-1 ``sample_margin`` returns.
"""

from __future__ import annotations

import torch

__all__ = ["gumbel_noise", "log_mg", "noise_bits", "noised_scores"]


def _int64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)
_MANTISSA = (1 << 52) - 1
_SQRT2_MANTISSA = 0x6A09E00000000


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64 in torch, which is the uint64 product's bits.
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _as_int64(value: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"margingate.noise: seed and position must be integers, got {value.dtype}")
        return value.to(device=device, dtype=torch.int64)
    return torch.tensor(_int64(int(value)), dtype=torch.int64, device=device)


def noise_bits(
    seed: int | torch.Tensor, position: int | torch.Tensor, vocab_indices: torch.Tensor
) -> torch.Tensor:
    """The 64 hash bits (as int64) of each index; seed and position broadcast against the indices."""
    device = vocab_indices.device
    row_key = _mix64(_mix64(_as_int64(seed, device) + _GOLDEN) ^ _as_int64(position, device))
    return _mix64(row_key + (vocab_indices.to(torch.int64) + 1) * _GOLDEN)


def log_mg(x: torch.Tensor) -> torch.Tensor:
    """fdlibm's natural logarithm of a positive, normal, finite float64 tensor (see sampling.h)."""
    bits = x.view(torch.int64)
    mantissa = bits & _MANTISSA
    big = mantissa >= _SQRT2_MANTISSA
    k = (bits >> 52) - 1023 + big.to(torch.int64)
    exponent = torch.where(big, 0x3FE << 52, 0x3FF << 52)
    y = (mantissa | exponent).view(torch.float64)
    f = y - 1.0
    hfsq = (0.5 * f) * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    lg1, lg2, lg3, lg4, lg5, lg6, lg7 = _LG
    t1 = w * (lg2 + w * (lg4 + w * lg6))
    t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)))
    r = t2 + t1
    dk = k.to(torch.float64)
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


def _gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    u = (_shift_right(bits, 12).to(torch.float64) + 0.5) * 2.0**-52
    return (-log_mg(-log_mg(u))).to(torch.float32)


def gumbel_noise(
    seed: int | torch.Tensor, position: int | torch.Tensor, vocab_indices: torch.Tensor
) -> torch.Tensor:
    """The float32 Gumbel noise ``sample_margin`` adds to ``logits / T`` at these indices.

    ``seed`` and ``position`` are Python ints (any value; a seed >= 2^63 is taken modulo 2^64) or
    integer tensors that broadcast against ``vocab_indices`` (e.g. ``seed[:, None]`` with
    ``torch.arange(V)`` gives the ``[B, V]`` noise of a batch). Computed on the indices' device.
    """
    return _gumbel_from_bits(noise_bits(seed, position, vocab_indices))


def noised_scores(
    logits: torch.Tensor,
    seed: int | torch.Tensor,
    position: int | torch.Tensor,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """``float32(logits / T) + g`` for every index of ``[B, V]`` logits (materialised; for audits).

    ``seed``, ``position`` and ``temperature`` are scalars or ``[B]`` tensors; T must be > 0. The
    token ``sample_margin`` draws from a row without truncation is the first argmax of its row.
    """
    rows, vocab = logits.shape
    device = logits.device

    def per_row(value, dtype):
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        return t.to(device=device, dtype=dtype).reshape(-1, 1).expand(rows, 1)

    seeds = per_row(seed if isinstance(seed, torch.Tensor) else _int64(seed), torch.int64)
    positions = per_row(position if isinstance(position, torch.Tensor) else _int64(position), torch.int64)
    temperatures = per_row(temperature, torch.float32)
    g = gumbel_noise(seeds, positions, torch.arange(vocab, device=device))
    return logits.float() / temperatures + g
