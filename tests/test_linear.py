"""margingate.linear: row invariance (bitwise), accuracy against fp64, opcheck and input checks.

Invariance is an exact property and is tested with ``torch.equal``. Accuracy follows the
flash-attention rule: our error against an fp64 reference may be at most twice torch's own error
at the same precision (plus a small absolute slack), not a magic tolerance. Every SIMD level the
CPU has is tested in its own subprocess, since a process fixes its level on first use.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import margingate

from .conftest import DTYPES, run_at_simd_level
from .references import linear_reference

# Absolute slack on top of "2x torch's error", in units of the output dtype's epsilon times the
# typical magnitude of an output element (inputs are ~N(0, 1), so |y| ~ sqrt(K)).
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close_to_fp64(y, x, w, b):
    ref = linear_reference(x, w, b)
    ours = (y.double() - ref).abs().max().item() if y.numel() else 0.0
    theirs = (torch.nn.functional.linear(x, w, b).double() - ref).abs().max().item() if y.numel() else 0.0
    atol = 4 * EPS[x.dtype] * max(1.0, x.shape[-1] ** 0.5)
    assert ours <= 2 * theirs + atol, f"error {ours} vs torch {theirs} (atol {atol})"


def assert_rows_invariant(x2, w, b, y2, other_rows=7, seed=0):
    """Each row of y2 = linear(x2) equals the row computed alone and the row computed at another
    position inside another batch, bit for bit."""
    M = x2.shape[0]
    g = torch.Generator().manual_seed(seed)
    for i in range(M):
        alone = margingate.linear(x2[i : i + 1], w, b)
        assert torch.equal(alone[0], y2[i]), f"row {i} of {M} differs from the row alone"
    # Every row again, each at a random position of a batch of random other rows.
    others = torch.randn(other_rows, x2.shape[1], generator=g).to(x2.dtype)
    for i in range(0, M, max(1, M // 5)):
        pos = int(torch.randint(0, other_rows + 1, (1,), generator=g))
        batch = torch.cat([others[:pos], x2[i : i + 1], others[pos:]])
        assert torch.equal(margingate.linear(batch, w, b)[pos], y2[i]), f"row {i} moved to {pos} differs"


def _make(M, K, N, dtype, x_layout, w_layout, with_bias, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if x_layout == "contiguous":
        x = randn(M, K)
    elif x_layout == "sliced":  # column stride 2
        x = randn(M, 2 * K)[:, ::2]
    elif x_layout == "transposed":  # row stride 1, column stride M
        x = randn(K, M).t()
    else:  # 3-D, split M into (M, 1) with a padded row stride
        x = randn(M, 1, K + 3)[..., :K]
    if w_layout == "contiguous":
        w = randn(N, K)
    elif w_layout == "transposed":  # what mm(a, b) routes as linear(a, b.t())
        w = randn(K, N).t()
    else:  # rows with a gap between them
        w = randn(N, K + 5)[:, :K]
    if not with_bias:
        b = None
    elif w_layout == "padded":  # a strided bias too
        b = randn(2 * N)[::2]
    else:
        b = randn(N)
    return x, w, b


@settings(max_examples=30, deadline=None)
@given(
    M=st.integers(1, 300),
    K=st.one_of(st.integers(1, 80), st.integers(80, 700)),
    N=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    x_layout=st.sampled_from(["contiguous", "sliced", "transposed", "3d"]),
    w_layout=st.sampled_from(["contiguous", "transposed", "padded"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rows_invariant_and_accurate(M, K, N, dtype, x_layout, w_layout, with_bias, seed):
    x, w, b = _make(M, K, N, dtype, x_layout, w_layout, with_bias, seed)
    y = margingate.linear(x, w, b)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    x2, y2 = x.reshape(-1, K), y.reshape(-1, N)
    assert_rows_invariant(x2, w, b, y2, seed=seed)
    # Strides never matter: the same values laid out contiguously give the same bits.
    assert torch.equal(margingate.linear(x.contiguous(), w.contiguous(), b), y)
    assert_close_to_fp64(y2, x2, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(640, 67), (2048, 40), (1536, 96), (4099, 13)])
def test_model_shapes_every_batch_size(dtype, K, N):
    """The decode/prefill regime of real layers: batches of 1, 4, 16, 64 and 130 rows share
    their rows bit for bit (different tile shapes, edge tiles and thread splits)."""
    x, w, b = _make(130, K, N, dtype, "contiguous", "contiguous", True, seed=K + N)
    y = margingate.linear(x, w, b)
    for M in (1, 2, 3, 4, 5, 16, 64):
        for start in (0, 130 - M):
            assert torch.equal(margingate.linear(x[start : start + M], w, b), y[start : start + M])
    assert_close_to_fp64(y, x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_matter(dtype):
    x, w, b = _make(37, 300, 150, dtype, "contiguous", "contiguous", True, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = margingate.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(margingate.linear(x, w, b), one)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_values_stay_in_their_row(dtype):
    """inf/NaN in one row give the same bits alone and in a batch, and never leak into other rows."""
    x, w, b = _make(9, 100, 20, dtype, "contiguous", "contiguous", True, seed=5)
    x[3, 17] = float("inf")
    x[5, 40] = float("nan")
    y = margingate.linear(x, w, b)
    assert torch.isfinite(y[[0, 1, 2, 4, 6, 7, 8]]).all()
    assert not torch.isfinite(y[3]).all() and y[5].isnan().all()
    for i in range(9):
        assert torch.equal(_bits(margingate.linear(x[i : i + 1], w, b)[0]), _bits(y[i]))


def test_empty_and_degenerate_shapes():
    w = torch.randn(5, 3)
    b = torch.randn(5)
    assert margingate.linear(torch.randn(0, 3), w, b).shape == (0, 5)
    assert margingate.linear(torch.randn(2, 0, 3), w).shape == (2, 0, 5)
    assert margingate.linear(torch.randn(4, 3), torch.randn(0, 3)).shape == (4, 0)
    # K = 0: the empty sum is 0, so y is the bias (or zeros).
    assert torch.equal(margingate.linear(torch.randn(4, 0), torch.randn(5, 0), b), b.expand(4, 5))
    assert torch.equal(margingate.linear(torch.randn(4, 0), torch.randn(5, 0)), torch.zeros(4, 5))
    # 1-D x, like torch.nn.functional.linear.
    x = torch.randn(3)
    assert torch.equal(margingate.linear(x, w, b), margingate.linear(x[None], w, b)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(dtype, with_bias):
    x, w, b = _make(6, 37, 11, dtype, "3d", "transposed", with_bias, seed=1)
    torch.library.opcheck(torch.ops.margingate.linear.default, (x, w, b))


def test_torch_compile_sees_one_op():
    x, w, b = _make(5, 40, 9, torch.float32, "contiguous", "contiguous", True, seed=2)
    compiled = torch.compile(margingate.linear, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, w, b), margingate.linear(x, w, b))


@pytest.mark.parametrize(
    "x,w,b,error,match",
    [
        (
            torch.randn(4, 3),
            torch.randn(5, 4),
            None,
            RuntimeError,
            "weight must be \\[N, K\\] with K = x.size\\(-1\\) = 3",
        ),
        (torch.randn(4, 3), torch.randn(5, 3, 1), None, RuntimeError, "weight must be 2-D"),
        (torch.randn(4, 3), torch.randn(3), None, RuntimeError, "weight must be 2-D"),
        (torch.tensor(1.0), torch.randn(5, 1), None, RuntimeError, "x must have at least 1 dimension"),
        (
            torch.randn(4, 3, dtype=torch.float64),
            torch.randn(5, 3, dtype=torch.float64),
            None,
            TypeError,
            "x must be float32, float16 or bfloat16",
        ),
        (torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (5, 3)), None, TypeError, "x must be float32"),
        (
            torch.randn(4, 3),
            torch.randn(5, 3, dtype=torch.bfloat16),
            None,
            TypeError,
            "weight must have x's dtype",
        ),
        (
            torch.randn(4, 3),
            torch.randn(5, 3),
            torch.randn(4),
            RuntimeError,
            "bias must be 1-D \\[N\\] with N = 5",
        ),
        (torch.randn(4, 3), torch.randn(5, 3), torch.randn(1, 5), RuntimeError, "bias must be 1-D"),
        (
            torch.randn(4, 3),
            torch.randn(5, 3),
            torch.randn(5, dtype=torch.float16),
            TypeError,
            "bias must have x's dtype",
        ),
    ],
)
def test_bad_input_raises_clear_error(x, w, b, error, match):
    with pytest.raises(error, match="margingate.linear: " + match):
        margingate.linear(x, w, b)


def test_device_mix_is_rejected():
    # A CPU x with a weight on another device (meta here; CUDA on a GPU machine) is refused.
    with pytest.raises(RuntimeError, match="margingate.linear: x and weight must be on the same device"):
        margingate.linear(torch.randn(4, 3), torch.randn(5, 3, device="meta"))


_LEVEL_SCRIPT = """
import torch
from tests.test_linear import _make, assert_rows_invariant, assert_close_to_fp64
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # Strided layouts, edge tiles, a zero-filled last chunk, and the decode shapes (M <= 3) whose
    # tiles stream the weight with prefetching, up to a wide N.
    for M, K, N, xl, wl in [(70, 37, 13, "sliced", "transposed"), (9, 300, 20, "3d", "padded"),
                            (130, 257, 7, "contiguous", "contiguous"), (5, 8, 3, "transposed", "contiguous"),
                            (1, 640, 4099, "contiguous", "contiguous"), (3, 301, 517, "contiguous", "padded")]:
        x, w, b = _make(M, K, N, dtype, xl, wl, True, seed=M + K)
        y = margingate.linear(x, w, b)
        x2, y2 = x.reshape(-1, K), y.reshape(-1, N)
        assert_rows_invariant(x2, w, b, y2)
        assert_close_to_fp64(y2, x2, w, b)
print("ok")
"""


def test_every_simd_level_is_invariant_on_its_own(simd_level):
    """Each level has its own fixed reduction order; rows are invariant at each (tests/conftest.py
    runs every level this CPU has, each in its own process)."""
    assert run_at_simd_level(simd_level, _LEVEL_SCRIPT).strip() == "ok"


# ----------------------------------------------------------------------------- meta, autograd, aliasing
@pytest.mark.parametrize("arg", ["weight", "bias"])
def test_an_argument_on_meta_is_a_device_mix(arg):
    # linear(x, w, bias_on_meta) used to reach the fake kernel and return an uninitialised CPU
    # tensor (0.0 where 64.0 is right).
    args = {"x": torch.ones(2, 16), "weight": torch.full((3, 16), 4.0), "bias": torch.zeros(3)}
    args[arg] = args[arg].to("meta")
    with pytest.raises(RuntimeError, match=f"margingate.linear: .*{arg} .*meta"):
        margingate.linear(args["x"], args["weight"], args["bias"])
    out = margingate.linear(*(t.to("meta") for t in args.values()))
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_autograd_has_no_silent_backward():
    x = torch.randn(3, 8, requires_grad=True)
    y = margingate.linear(x, torch.randn(5, 8))
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="derivative for margingate::linear is not implemented"):
        y.sum().backward()


def test_aliased_inputs_are_only_read():
    # x and weight may be one tensor (x @ x.T): the op only reads its inputs.
    x = torch.randn(6, 40)
    assert torch.equal(margingate.linear(x, x, x[0, :6]), margingate.linear(x.clone(), x.clone(), x[0, :6].clone()))
