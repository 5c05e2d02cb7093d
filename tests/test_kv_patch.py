"""margingate.kv_patch_: writes exactly the named columns, validates everything before writing."""

from __future__ import annotations

import math

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
    assert info["simd"] in ("scalar", "avx2", "avx512", "neon")
    assert isinstance(info["cuda"], bool)
    assert info["compiler"]


def test_kernels_run_on_torchs_threads():
    """The kernels reach torch's intra-op pool through at::parallel_for, which is parallel only in
    code compiled with OpenMP: a build without it ran every op on one thread, unnoticed, for a
    day. torch's CPU builds are OpenMP builds (``torch.__config__.parallel_info()``)."""
    backend = torch.__config__.parallel_info()
    if "OpenMP" not in backend and "native thread pool" not in backend:
        pytest.skip(f"this torch has no intra-op parallel backend: {backend!r}")
    assert margingate.build_info()["parallel"] is True


def test_cpu_only_build_has_a_clear_cuda_error_registered():
    """Without CUDA kernels, a CUDA kernel is still registered, and it only raises a clear error."""
    if margingate.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    for op in ("margin", "linear", "attention", "kv_patch_"):
        handle = getattr(torch.ops.margingate, op).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_patch_copies_non_finite_values_bit_for_bit(dtype):
    args = _valid_args(dtype)
    args["k_new"][0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    args["v_new"][1, 1, 1] = -math.nan
    margingate.kv_patch_(**args)
    ints = {4: torch.int32, 2: torch.int16}[args["k_new"].element_size()]
    assert torch.equal(args["k_cache"][0, :, 5].view(ints), args["k_new"][0].view(ints))
    assert torch.equal(args["v_cache"][2, :, 1].view(ints), args["v_new"][1].view(ints))


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize("arg", ["v_cache", "k_new", "v_new", "rows", "positions"])
def test_kv_patch_an_argument_on_meta_is_a_device_mix(arg):
    # One argument on meta used to send the call to the fake kernel: nothing written, no error.
    args = _valid_args()
    args[arg] = args[arg].to("meta")
    before = {key: t.clone() for key, t in args.items() if t.device.type == "cpu"}
    message = (
        f"{arg} is on meta but k_cache is on cpu; "
        + ("it must be on that device or the CPU" if arg in ("rows", "positions") else "all arguments")
    )
    with pytest.raises(RuntimeError, match=f"margingate.kv_patch_: {message}"):
        margingate.kv_patch_(**args)
    for key, t in before.items():
        assert torch.equal(args[key], t)


def test_kv_patch_all_on_meta_is_accepted():
    args = {key: t.to("meta") for key, t in _valid_args().items()}
    margingate.kv_patch_(**args)


# ----------------------------------------------------------------------------- aliasing
def _patch(k_cache, v_cache, k_new=None, v_new=None):
    k_new = torch.full((1, k_cache.shape[1], k_cache.shape[3]), 1.0) if k_new is None else k_new
    v_new = torch.full((1, k_cache.shape[1], k_cache.shape[3]), 2.0) if v_new is None else v_new
    margingate.kv_patch_(k_cache, v_cache, torch.tensor([1]), torch.tensor([2]), k_new, v_new)


def _aliased_cases():
    storage = torch.arange(3 * 2 * 4 * 8, dtype=torch.float32).reshape(3, 2, 4, 8)
    fresh = torch.zeros(2, 2, 4, 8)
    return {
        # k and v as overlapping views of one buffer: v_new would land in k.
        "k and v overlap": (storage[:2], storage[1:], None, None, "k_cache and v_cache overlap"),
        "k and v shifted by one column": (
            storage.view(-1)[: 2 * 2 * 4 * 8].view(2, 2, 4, 8),
            storage.view(-1)[8 : 8 + 2 * 2 * 4 * 8].view(2, 2, 4, 8),
            None, None, "k_cache and v_cache overlap",
        ),
        # An expanded cache maps every row to one place: a patch would write all rows at once.
        "expanded k_cache": (
            torch.zeros(1, 2, 4, 8).expand(2, 2, 4, 8), fresh, None, None, "k_cache has overlapping memory"
        ),
        "zero-stride v_cache": (
            fresh, torch.zeros(2, 2, 1, 8).expand(2, 2, 4, 8), None, None, "v_cache has overlapping memory"
        ),
        "k_new inside k_cache": (
            storage[:2], fresh, storage[0, :, 0].unsqueeze(0), None, "k_new shares memory with k_cache"
        ),
        "v_new inside k_cache": (
            storage[:2], fresh, None, storage[1, :, 3].unsqueeze(0), "v_new shares memory with k_cache"
        ),
        "v_new inside v_cache": (
            fresh, storage[1:], None, storage[2, :, 1].unsqueeze(0), "v_new shares memory with v_cache"
        ),
    }


@pytest.mark.parametrize("case", list(_aliased_cases()))
def test_kv_patch_refuses_aliased_memory_before_writing(case):
    k_cache, v_cache, k_new, v_new, match = _aliased_cases()[case]
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises(RuntimeError, match=f"margingate.kv_patch_: {match}"):
        _patch(k_cache, v_cache, k_new, v_new)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_kv_patch_accepts_k_and_v_that_share_a_buffer_without_overlap(layout):
    # One allocation for both caches is common: [2, B, H, T, D] (stacked) or [B, H, T, 2, D]
    # (k and v interleaved per position). Their elements never meet, so the patch is exact.
    if layout == "stacked":
        kv = torch.zeros(2, 2, 2, 4, 8)
        k_cache, v_cache = kv[0], kv[1]
    else:
        kv = torch.zeros(2, 2, 4, 2, 8)
        k_cache, v_cache = kv[:, :, :, 0], kv[:, :, :, 1]
    _patch(k_cache, v_cache)
    expected_k, expected_v = torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)
    expected_k[1, :, 2], expected_v[1, :, 2] = 1.0, 2.0
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_kv_patch_reads_k_new_from_another_allocation_of_the_same_values():
    # The cure the aliasing message suggests works: a copy of the cache's own column.
    k_cache, v_cache = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    column = k_cache[0, :, 0].unsqueeze(0).clone()
    _patch(k_cache, v_cache, column, None)
    assert torch.equal(k_cache[1, :, 2], k_cache[0, :, 0])


# ----------------------------------------------------------------------------- autograd
def test_kv_patch_bumps_the_version_counters():
    args = _valid_args()
    k_version, v_version = args["k_cache"]._version, args["v_cache"]._version
    margingate.kv_patch_(**args)
    assert args["k_cache"]._version == k_version + 1
    assert args["v_cache"]._version == v_version + 1
    with torch.inference_mode():  # normal tensors patched in inference mode: bumped too, like aten
        margingate.kv_patch_(**args)
    assert args["k_cache"]._version == k_version + 2


def test_kv_patch_after_a_save_for_backward_raises_instead_of_a_wrong_gradient():
    source = torch.randn(3, 2, 6, 4, requires_grad=True)
    args = _valid_args(torch.float32)
    args["k_cache"] = source * 1.0
    loss = (args["k_cache"] * args["k_cache"]).sum()  # saves k_cache for backward
    margingate.kv_patch_(**args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("new_requires_grad", [False, True])
def test_kv_patch_gradient_through_a_patched_cache_raises(new_requires_grad):
    # The overwritten columns no longer depend on the old values: no gradient may pretend so.
    source = torch.randn(3, 2, 6, 4, requires_grad=not new_requires_grad)
    args = _valid_args(torch.float32)
    args["k_cache"] = source * 2.0
    if new_requires_grad:
        args["k_new"].requires_grad_(True)
    margingate.kv_patch_(**args)
    assert args["k_cache"].requires_grad and args["v_cache"].requires_grad
    with pytest.raises(RuntimeError, match="derivative for margingate::kv_patch_ is not implemented"):
        args["k_cache"].sum().backward()


@pytest.mark.parametrize("view", [False, True])
def test_kv_patch_refuses_a_leaf_that_requires_grad(view):
    args = _valid_args(torch.float32)
    leaf = torch.randn(3, 2, 6, 4, requires_grad=True)
    args["v_cache"] = leaf[:, :, :] if view else leaf
    before = {key: t.detach().clone() for key, t in args.items()}
    match = "v_cache is a view of a leaf tensor" if view else "v_cache is a leaf tensor that requires grad"
    with pytest.raises(RuntimeError, match=match):
        margingate.kv_patch_(**args)
    for key, t in args.items():
        assert torch.equal(t.detach(), before[key])
    with torch.no_grad():  # allowed there, as for aten's in-place ops
        margingate.kv_patch_(**args)
    assert torch.equal(leaf[2, :, 1].detach(), args["v_new"][1])


def test_kv_patch_inference_tensors_only_inside_inference_mode():
    with torch.inference_mode():
        args = _valid_args()
    before = {key: t.clone() for key, t in args.items()}
    with pytest.raises(RuntimeError, match="k_cache is an inference tensor"):
        margingate.kv_patch_(**args)
    for key, t in args.items():
        assert torch.equal(t, before[key])
    with torch.inference_mode():
        margingate.kv_patch_(**args)
    assert torch.equal(args["k_cache"][0, :, 5], args["k_new"][0])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_kv_patch_compiles_with_its_autograd_registration(backend):
    def step(k, v, rows, positions, k_new, v_new):
        margingate.kv_patch_(k, v, rows, positions, k_new, v_new)
        return k.sum() + v.sum()

    args = _valid_args(torch.float32)
    expected = {key: t.clone() for key, t in args.items()}
    margingate.kv_patch_(**expected)
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    compiled(*args.values())
    assert torch.equal(args["k_cache"], expected["k_cache"])
    assert torch.equal(args["v_cache"], expected["v_cache"])
