"""margingate.margin against a plain-torch reference: exact equality, never tolerance."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import margingate

from .conftest import DTYPES, run_at_simd_level
from .references import margin_reference


def assert_matches_reference(logits: torch.Tensor) -> None:
    top1, top2, margin = margingate.margin(logits)
    r1, r2, rm = margin_reference(logits)
    assert torch.equal(top1, r1), (top1, r1)
    assert torch.equal(top2, r2), (top2, r2)
    assert torch.equal(margin.isnan(), rm.isnan())
    assert torch.equal(margin.nan_to_num(nan=-1.0), rm.nan_to_num(nan=-1.0)), (margin, rm)
    assert top1.dtype == torch.int64 and top2.dtype == torch.int64 and margin.dtype == torch.float32


@st.composite
def logits_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(0, 9))
    vocab = draw(st.sampled_from([2, 3, 15, 16, 17, 31, 33, 100, 1000, 4097, 40000]))
    # Few distinct values make ties common; many make them rare.
    levels = draw(st.sampled_from([3, 50, 0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if levels:
        x = torch.randint(0, levels, (rows, vocab), generator=g).float()
    else:
        x = torch.randn(rows, vocab, generator=g) * 4
    specials = draw(st.lists(st.sampled_from(["inf", "-inf", "nan", "-0"]), max_size=3))
    for s in specials:
        if rows == 0:
            break
        r = int(torch.randint(0, rows, (1,), generator=g))
        c = int(torch.randint(0, vocab, (1,), generator=g))
        x[r, c] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-0": -0.0}[s]
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "column_slice", "transposed", "row_step"]))
    if layout == "column_slice":  # rows with a stride larger than the vocabulary
        wide = torch.zeros(rows, vocab + 7, dtype=dtype)
        wide[:, 3 : 3 + vocab] = x
        x = wide[:, 3 : 3 + vocab]
    elif layout == "transposed":  # column stride != 1
        x = x.t().contiguous().t()
    elif layout == "row_step":
        tall = torch.zeros(2 * rows, vocab, dtype=dtype)
        tall[::2] = x
        x = tall[::2]
    return x


@settings(max_examples=150, deadline=None)
@given(logits_cases())
def test_margin_matches_reference(logits):
    assert_matches_reference(logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 128256, 262144])
def test_margin_large_vocabularies(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(7, vocab, generator=g) * 6).to(dtype)
    # Ascending and descending rows: every block (or none) holds a new runner-up.
    logits[5] = torch.linspace(-50, 50, vocab).to(dtype)
    logits[6] = torch.linspace(50, -50, vocab).to(dtype)
    # Put the winners near the end, in the middle and at the start.
    logits[0, -1] = 100
    logits[1, vocab // 2] = 100
    logits[1, vocab // 2 + 1] = 100  # a tie at the top
    logits[2, 0] = 100
    assert_matches_reference(logits)
    assert margingate.margin(logits)[2][1].item() == 0.0


def test_margin_special_rows():
    inf, nan = math.inf, math.nan
    logits = torch.tensor(
        [
            [-inf, -inf, -inf, -inf],  # all -inf: a tie, margin exactly 0
            [inf, inf, 1.0, 2.0],  # equal infinities: a tie, margin 0 (not inf - inf = NaN)
            [inf, 1.0, 2.0, 3.0],  # margin inf
            [1.0, nan, 3.0, nan],  # NaN ranks first, like torch.argmax; margin NaN
            [-0.0, 0.0, -1.0, -2.0],  # signed zeros tie
        ]
    )
    top1, top2, margin = margingate.margin(logits)
    assert top1.tolist() == [0, 0, 0, 1, 0]
    assert top2.tolist() == [1, 1, 3, 3, 1]
    assert margin[0].item() == 0 and margin[1].item() == 0 and margin[2].item() == inf
    assert math.isnan(margin[3].item()) and margin[4].item() == 0
    assert_matches_reference(logits)


def test_margin_is_independent_of_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50000, generator=g).to(torch.bfloat16)
    batched = margingate.margin(logits)
    for r in (0, 17, 63):
        alone = margingate.margin(logits[r : r + 1])
        for a, b in zip(alone, batched, strict=True):
            assert torch.equal(a, b[r : r + 1])


_LEVEL_SCRIPT = """
import math, torch
from tests.test_margin import assert_matches_reference
g = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for vocab in (17, 2049, 70001, 262144):
        x = (torch.randn(6, vocab, generator=g) * 3).to(dtype)
        x[1, vocab - 1] = 100  # the winner in the last block, the runner-up far before it
        x[1, 3] = 99
        x[2, 5] = math.nan
        x[3] = -math.inf
        x[4] = torch.randint(0, 3, (vocab,), generator=g).to(dtype)  # ties everywhere
        assert_matches_reference(x)
        assert_matches_reference(x[:1])  # one row: split across threads
        assert_matches_reference(x.t().contiguous().t())  # column stride != 1
print("ok")
"""


def test_margin_every_simd_level_matches_reference(simd_level):
    """Margin has no rounding: every SIMD level this CPU has gives the reference's exact answer."""
    assert run_at_simd_level(simd_level, _LEVEL_SCRIPT).strip() == "ok"


def test_margin_opcheck():
    for dtype in DTYPES:
        x = torch.randn(4, 300).to(dtype)
        torch.library.opcheck(torch.ops.margingate.margin.default, (x,))
    torch.library.opcheck(torch.ops.margingate.margin.default, (torch.randn(0, 10),))


def test_margin_compiles():
    f = torch.compile(lambda x: margingate.margin(x)[2] * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 100)
    assert torch.equal(f(x), margingate.margin(x)[2] * 2)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.randn(10), RuntimeError, "2-D"),
        (torch.randn(2, 3, 4), RuntimeError, "2-D"),
        (torch.randn(3, 1), RuntimeError, "at least 2 columns"),
        (torch.randint(0, 5, (2, 8)), TypeError, "logits must be float32, float16 or bfloat16"),
        (torch.randn(2, 8, dtype=torch.float64), TypeError, "logits must be"),
    ],
)
def test_margin_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        margingate.margin(bad)


def test_margin_has_no_silent_backward():
    logits = torch.randn(2, 50, requires_grad=True)
    top1, _, margin = margingate.margin(logits)
    assert not top1.requires_grad and margin.requires_grad
    with pytest.raises(RuntimeError, match="derivative for margingate::margin is not implemented"):
        margin.sum().backward()
