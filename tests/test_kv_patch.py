"""margingate.kv_patch_: writes exactly the named columns, validates everything before writing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import margingate

from .conftest import DTYPES


def make_cache(batch, heads, capacity, head_dim, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, heads, capacity, head_dim, generator=g).to(dtype)
    if layout == "contiguous":
        return base
    if layout == "capacity_slice":  # a view into a larger preallocated cache
        big = torch.zeros(batch, heads, capacity + 5, head_dim, dtype=dtype)
        big[:, :, 2 : 2 + capacity] = base
        return big[:, :, 2 : 2 + capacity]
    # heads and time swapped in memory ([B, T, H, D] storage viewed as [B, H, T, D])
    return base.transpose(1, 2).contiguous().transpose(1, 2)


@st.composite
def patch_cases(draw):
    batch = draw(st.integers(1, 5))
    heads = draw(st.integers(1, 4))
    capacity = draw(st.integers(1, 12))
    head_dim = draw(st.sampled_from([1, 3, 8, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "capacity_slice", "heads_last"]))
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, batch - 1), st.integers(0, capacity - 1)), unique=True, max_size=6
        )
    )
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    new_layout = draw(st.sampled_from(["contiguous", "transposed"]))
    return batch, heads, capacity, head_dim, dtype, layout, pairs, index_dtype, new_layout


@settings(max_examples=80, deadline=None)
@given(patch_cases(), st.integers(0, 2**31 - 1))
def test_kv_patch_writes_exactly_the_named_columns(case, seed):
    batch, heads, capacity, head_dim, dtype, layout, pairs, index_dtype, new_layout = case
    k = make_cache(batch, heads, capacity, head_dim, dtype, layout, seed)
    v = make_cache(batch, heads, capacity, head_dim, dtype, layout, seed + 1)
    n = len(pairs)
    rows = torch.tensor([p[0] for p in pairs], dtype=index_dtype)
    positions = torch.tensor([p[1] for p in pairs], dtype=index_dtype)
    g = torch.Generator().manual_seed(seed + 2)
    k_new = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    if new_layout == "transposed":
        k_new = k_new.transpose(1, 2).contiguous().transpose(1, 2)
    expected_k, expected_v = k.clone(), v.clone()
    for i, (r, p) in enumerate(pairs):
        expected_k[r, :, p] = k_new[i]
        expected_v[r, :, p] = v_new[i]
    k_ptr, v_ptr = k.data_ptr(), v.data_ptr()
    margingate.kv_patch_(k, v, rows, positions, k_new, v_new)
    assert k.data_ptr() == k_ptr and v.data_ptr() == v_ptr  # in place
    assert torch.equal(k, expected_k)
    assert torch.equal(v, expected_v)


def _valid_args(dtype=torch.bfloat16):
    k = torch.randn(3, 2, 6, 4).to(dtype)
    v = torch.randn(3, 2, 6, 4).to(dtype)
    rows = torch.tensor([0, 2])
    positions = torch.tensor([5, 1])
    k_new = torch.randn(2, 2, 4).to(dtype)
    v_new = torch.randn(2, 2, 4).to(dtype)
    return dict(k_cache=k, v_cache=v, rows=rows, positions=positions, k_new=k_new, v_new=v_new)


BAD_INPUTS = [
    ("row out of range", dict(rows=torch.tensor([0, 3])), RuntimeError, r"rows\[1\] = 3 is out of range"),
    ("negative row", dict(rows=torch.tensor([-1, 0])), RuntimeError, r"rows\[0\] = -1"),
    ("position out of range", dict(positions=torch.tensor([6, 0])), RuntimeError, r"positions\[0\] = 6"),
    ("duplicate pair", dict(rows=torch.tensor([2, 2]), positions=torch.tensor([1, 1])), RuntimeError,
     "appears more than once"),
    ("float rows", dict(rows=torch.tensor([0.0, 1.0])), TypeError, "rows must be int32 or int64"),
    ("rows/positions length", dict(positions=torch.tensor([1])), RuntimeError, "positions has 1 entries"),
    ("k_new dtype", dict(k_new=torch.randn(2, 2, 4)), TypeError, "k_new has dtype"),
    ("v_cache dtype", dict(v_cache=torch.randn(3, 2, 6, 4)), TypeError, "v_cache has dtype"),
    ("k_new heads", dict(k_new=torch.randn(2, 3, 4).bfloat16()), RuntimeError, "k_new size\\(1\\)"),
    ("v_new head_dim", dict(v_new=torch.randn(2, 2, 5).bfloat16()), RuntimeError, "v_new size\\(2\\)"),
    ("k_new count", dict(k_new=torch.randn(3, 2, 4).bfloat16()), RuntimeError, "k_new size\\(0\\)"),
    ("v_cache shape", dict(v_cache=torch.randn(3, 2, 7, 4).bfloat16()), RuntimeError, "v_cache capacity"),
    ("cache rank", dict(k_cache=torch.randn(3, 2, 6).bfloat16()), RuntimeError, "k_cache must be 4-D"),
    ("cache dtype", dict(k_cache=torch.zeros(3, 2, 6, 4, dtype=torch.int32)), TypeError, "k_cache must be"),
]


@pytest.mark.parametrize("name, change, error, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_kv_patch_bad_input_raises_and_writes_nothing(name, change, error, match):
    args = _valid_args()
    args.update(change)
    before = {key: t.clone() for key, t in args.items()}
    with pytest.raises(error, match=match):
        margingate.kv_patch_(**args)
    for key, t in args.items():
        assert torch.equal(t, before[key]), f"{key} was modified by a failed call"


def test_kv_patch_same_tensor_for_k_and_v_is_refused():
    args = _valid_args()
    args["v_cache"] = args["k_cache"]
    with pytest.raises(RuntimeError, match="different tensors"):
        margingate.kv_patch_(**args)


def test_kv_patch_empty_is_a_no_op():
    args = _valid_args()
    before = args["k_cache"].clone()
    args.update(rows=torch.tensor([], dtype=torch.int64), positions=torch.tensor([], dtype=torch.int64),
                k_new=torch.empty(0, 2, 4, dtype=torch.bfloat16), v_new=torch.empty(0, 2, 4, dtype=torch.bfloat16))
    margingate.kv_patch_(**args)
    assert torch.equal(args["k_cache"], before)


def test_kv_patch_opcheck():
    for dtype in DTYPES:
        args = _valid_args(dtype)
        torch.library.opcheck(torch.ops.margingate.kv_patch_.default, tuple(args.values()))


def test_build_info_reports_the_build():
    info = margingate.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["simd"] in ("scalar", "avx2", "avx512")
    assert isinstance(info["cuda"], bool)
    assert info["compiler"]


def test_cpu_only_build_has_a_clear_cuda_error_registered():
    """Without CUDA kernels, a CUDA kernel is still registered, and it only raises a clear error."""
    if margingate.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    for op in ("margin", "linear", "attention", "kv_patch_"):
        handle = getattr(torch.ops.margingate, op).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")
