"""Tests of the CUDA kernels: exactness, invariance (bitwise) and closeness to plain torch.

Tests marked ``cuda`` (``@cuda``) need a GPU and a CUDA build of margingate and are skipped
without one. The invariance properties are the same as on the CPU and are checked with
``torch.equal``: a row / query computed alone, at another position of a batch, with other strides,
with more left padding, or as part of a prefill instead of a decode step gives the very same bits.
CUDA results need not equal the CPU's bit for bit (different reduction trees), only be close.

The tests at the top run everywhere: the argument checks that the CPU and CUDA registrations
share (on the CPU op; on both devices with a GPU), and a CMake configure that must keep torch's
CUDA flags out of the kernel library. ``bench/gpu_check.sh`` runs this file on a GPU machine, one
test function per process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import margingate

cuda = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Closeness tolerances (absolute, on O(1) values) against a float64 reference, per dtype: the
# output rounding of the dtype plus fp32 accumulation differences.
ATTENTION_ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float32, seed=0, device=None):
    """Seeded random normal values drawn on the target device (fast for the large shapes)."""
    device = device or DEVICE
    return torch.randn(*shape, generator=_gen(seed, device), device=device).to(dtype)


def mg_margin(x):
    return torch.ops.margingate.margin.default(x)


def mg_linear(x, w, b=None):
    return torch.ops.margingate.linear.default(x, w, b)


def mg_attention(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    return torch.ops.margingate.attention.default(
        q, k, v, kv_start, kv_rows, causal=causal, scale=scale, window=window
    )


# =============================================================================== without a GPU
def _attention_inputs(device):
    g = _gen(90)
    q = torch.randn(2, 4, 3, 16, generator=g).to(device)
    k = torch.randn(2, 2, 10, 16, generator=g).to(device)
    return q, k, k.clone()


# (what, call(device) -> None, message): one list for both registrations. Every call must raise
# the same error naming the argument on the CPU and on CUDA, before any kernel runs.
SHARED_BAD_INPUTS = [
    ("window 0", lambda d: mg_attention(*_attention_inputs(d), window=0), "window must be >= 1"),
    (
        "window without causal",
        lambda d: mg_attention(*_attention_inputs(d), causal=False, window=3),
        "a sliding window requires causal=True",
    ),
    ("infinite scale", lambda d: mg_attention(*_attention_inputs(d), scale=math.inf), "scale must be finite"),
    ("NaN scale", lambda d: mg_attention(*_attention_inputs(d), scale=math.nan), "scale must be finite"),
    (
        "kv_start past Tk",
        lambda d: mg_attention(*_attention_inputs(d), torch.tensor([0, 11], device=d)),
        "kv_start\\[1\\] = 11 is out of range \\[0, 10\\]",
    ),
    (
        "negative kv_start",
        lambda d: mg_attention(*_attention_inputs(d), torch.tensor([-1, 0], device=d)),
        "kv_start\\[0\\] = -1 is out of range",
    ),
    (
        "kv_rows past Bkv",
        lambda d: mg_attention(*_attention_inputs(d), None, torch.tensor([0, 2], device=d, dtype=torch.int32)),
        "kv_rows\\[1\\] = 2 is out of range \\[0, 2\\)",
    ),
    (
        "kv_start shape",
        lambda d: mg_attention(*_attention_inputs(d), torch.tensor([0, 1, 2], device=d)),
        "kv_start must have shape \\[2\\]",
    ),
    (
        "kv_start dtype",
        lambda d: mg_attention(*_attention_inputs(d), torch.tensor([0.0, 1.0], device=d)),
        "kv_start must be int32 or int64",
    ),
    (
        "heads",
        lambda d: mg_attention(_attention_inputs(d)[0][:, :3], *_attention_inputs(d)[1:]),
        "must be a multiple of the number of kv heads",
    ),
    (
        "head_dim",
        lambda d: mg_attention(*(torch.zeros(1, 1, 1, 257, device=d),) * 3),
        "head_dim must be in \\[1, 256\\]",
    ),
    (
        "kv batch without kv_rows",
        lambda d: mg_attention(_attention_inputs(d)[0], *(t[:1] for t in _attention_inputs(d)[1:])),
        "pass kv_rows",
    ),
    (
        "linear K",
        lambda d: mg_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 7, device=d)),
        "weight must be \\[N, K\\] with K = x.size\\(-1\\) = 8",
    ),
    (
        "linear bias",
        lambda d: mg_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, device=d), torch.zeros(4, device=d)),
        "bias must be 1-D \\[N\\] with N = 3",
    ),
    (
        "linear dtype",
        lambda d: mg_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, device=d, dtype=torch.bfloat16)),
        "weight must have x's dtype",
    ),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize(("what", "call", "message"), SHARED_BAD_INPUTS, ids=[c[0] for c in SHARED_BAD_INPUTS])
def test_shared_argument_checks(device, what, call, message):
    """The CPU and CUDA registrations share one argument check (csrc/attention_args.h,
    csrc/linear_args.h): the same input raises the same message on both. On CUDA a bad kv_start /
    kv_rows value raises on the host instead of reaching the kernel's trap, so the CUDA context
    survives (the op after it still runs)."""
    with pytest.raises((RuntimeError, TypeError, IndexError, ValueError), match=message):
        call(device)
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.equal(mg_linear(torch.ones(1, 4, device=device), torch.ones(2, 4, device=device)).cpu(),
                           torch.full((1, 2), 4.0))


FAKE_TORCH = """
import os
__version__ = "2.11.0+cu130"
class version:
    cuda = "13.0"
class _C:
    _GLIBCXX_USE_CXX11_ABI = True
class utils:
    cmake_prefix_path = os.path.join(os.path.dirname(__file__), "share", "cmake")
"""

# What a CUDA torch's TorchConfig does on a machine without a GPU: it appends its -gencode list,
# starting at compute_50, to CMAKE_CUDA_FLAGS (nvcc 13 rejects compute_50).
FAKE_TORCH_CONFIG = """
string(APPEND CMAKE_CUDA_FLAGS " -gencode arch=compute_50,code=sm_50")
set(TORCH_LIBRARIES c10 torch)
set(TORCH_INCLUDE_DIRS "${CMAKE_CURRENT_LIST_DIR}/../../../include")
set(Torch_FOUND TRUE)
"""


def _nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate.startswith("/") and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_cmake_keeps_torch_cuda_flags_out_of_the_kernels(tmp_path):
    """Configure (no build) against a fake CUDA torch whose TorchConfig appends compute_50, with a
    broken `nvcc` first on PATH: the kernel library must compile for exactly the architectures we
    set (sm_80, sm_90), never compute_50, with the nvcc we named; the extension as C++20 with
    the CUDA registrations."""
    cmake, ninja, nvcc = shutil.which("cmake"), shutil.which("ninja"), _nvcc()
    if not (cmake and ninja and nvcc):
        pytest.skip("needs cmake, ninja and nvcc (CUDA_HOME or /usr/local/cuda)")
    fake = tmp_path / "site" / "torch"
    (fake / "share" / "cmake" / "Torch").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "lib").mkdir()
    (fake / "__init__.py").write_text(FAKE_TORCH)
    (fake / "share" / "cmake" / "Torch" / "TorchConfig.cmake").write_text(FAKE_TORCH_CONFIG)
    for lib in ("c10", "torch_cpu", "torch", "c10_cuda", "torch_cuda"):
        (fake / "lib" / f"lib{lib}.so").write_bytes(b"")
    bad_bin = tmp_path / "bin"
    bad_bin.mkdir()
    (bad_bin / "nvcc").write_text("#!/bin/sh\necho 'not the nvcc you asked for' >&2\nexit 1\n")
    (bad_bin / "nvcc").chmod(0o755)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),
        "PATH": f"{bad_bin}:{os.environ['PATH']}",
        "TORCH_CUDA_ARCH_LIST": "5.0",
    }
    env.pop("CUDAFLAGS", None)
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    configure += [f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    configure += ["-DMARGINGATE_BUILD_BENCH=OFF", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"]
    result = subprocess.run(configure, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA registrations ON" in result.stdout, result.stdout
    commands = json.loads((build / "compile_commands.json").read_text())
    kernels = [c["command"] for c in commands if c["file"].endswith(".cu")]
    assert len(kernels) == len(list((ROOT / "cuda" / "src").glob("*.cu")))
    for command in kernels:
        assert "compute_50" not in command and "sm_50" not in command, command
        assert "arch=compute_80,code=[compute_80,sm_80]" in command or "sm_80" in command, command
        assert "sm_90" in command, command
        assert command.startswith(nvcc) or f"{nvcc} " in command, command
    bindings = [c for c in commands if "/csrc/" in c["file"]]
    assert any("/csrc/cuda/" in c["file"] for c in bindings)
    for c in bindings:
        assert "-std=gnu++20" in c["command"] or "-std=c++20" in c["command"], c["command"]
        if "/csrc/cuda/" in c["file"]:
            assert "-DMARGINGATE_WITH_CUDA=1" in c["command"], c["command"]


# =============================================================================== margin
def margin_reference(x: torch.Tensor):
    """top1 = argmax (first index on ties); top2 = argmax with top1 removed; computed in fp32."""
    v = x.float()
    top1 = v.argmax(dim=1)
    masked = v.clone()
    masked[torch.arange(v.shape[0], device=v.device), top1] = -math.inf
    # argmax of the rest, first index on ties; the removed slot must not win an all--inf row
    is_top1 = torch.zeros_like(masked, dtype=torch.bool)
    is_top1[torch.arange(v.shape[0], device=v.device), top1] = True
    best = masked.max(dim=1).values
    candidates = (masked == best[:, None]) & ~is_top1
    top2 = candidates.float().argmax(dim=1)
    rows = torch.arange(v.shape[0], device=v.device)
    gap = v[rows, top1] - v[rows, top2]
    gap = torch.where(v[rows, top1] == v[rows, top2], torch.zeros_like(gap), gap)
    return top1, top2, gap


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 2), (3, 7), (5, 1000), (64, 128256), (2, 152064), (1, 262147), (300, 515)]
)
def test_margin_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=shape[1])
    top1, top2, gap = mg_margin(x)
    r1, r2, rg = margin_reference(x)
    assert torch.equal(top1, r1)
    assert torch.equal(top2, r2)
    assert torch.equal(gap, rg)
    assert torch.equal(top1, x.argmax(dim=1))


@cuda
def test_margin_empty_batch():
    top1, top2, gap = mg_margin(torch.empty(0, 10, device=DEVICE))
    assert top1.shape == top2.shape == gap.shape == (0,)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_ties_and_infinities(dtype):
    x = torch.zeros(4, 9000, dtype=dtype, device=DEVICE)
    x[0, 17] = 3.0
    x[0, 8000] = 3.0  # tie: first index is top1, the other top2, margin exactly 0
    x[1, :] = -math.inf  # all -inf: top1 = 0, top2 = 1, tie
    x[2, 5] = math.inf
    x[2, 6000] = math.inf
    x[3, 8999] = 1.0
    top1, top2, gap = mg_margin(x)
    assert top1.tolist() == [17, 0, 5, 8999]
    assert top2.tolist() == [8000, 1, 6000, 0]
    assert gap.tolist() == [0.0, 0.0, 0.0, 1.0]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_nan_rows(dtype):
    x = randn(3, 20000, dtype=dtype, seed=1)
    x[0, 12345] = math.nan
    x[1, 7] = math.nan
    x[1, 19000] = math.nan
    top1, top2, gap = mg_margin(x)
    assert top1.tolist()[:2] == [12345, 7]
    assert top1.tolist() == x.cpu().argmax(dim=1).tolist()
    assert top2[1].item() == 19000
    assert top2[0].item() == x[0].float().nan_to_num(-math.inf).argmax().item()
    assert gap[:2].isnan().all() and not gap[2].isnan()


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_strides_and_offsets_are_exact(dtype):
    base = randn(8, 70001, dtype=dtype, seed=2)
    ref = mg_margin(base[:, 1:].contiguous())
    for view in (base[:, 1:], base.t().contiguous().t()[:, 1:], base[:, 1:][::1]):
        got = mg_margin(view)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)
    strided = randn(8, 2 * 70000, dtype=dtype, seed=3)[:, ::2]
    for a, b in zip(mg_margin(strided), mg_margin(strided.contiguous()), strict=True):
        assert torch.equal(a, b)


@cuda
def test_margin_rows_are_independent():
    x = randn(200, 32000, dtype=torch.bfloat16, seed=4)
    full = mg_margin(x)
    for i in (0, 1, 77, 199):
        alone = mg_margin(x[i : i + 1])
        for a, b in zip(alone, full, strict=True):
            assert torch.equal(a, b[i : i + 1])


@cuda
def test_margin_last_columns_of_the_widest_row():
    """V = 2^31 - 1 (the contract's limit; 4 GiB in bf16): one row is split into segments, and the
    last segment must end at the last column (32-bit column arithmetic used to wrap there and skip
    the row's last ~8M columns)."""
    V = 2**31 - 1
    if torch.cuda.get_device_properties(0).total_memory < 3 * V * 2:
        pytest.skip("needs ~13 GiB of GPU memory")
    x = torch.zeros(1, V, dtype=torch.bfloat16, device=DEVICE)
    x[0, V - 1] = 3.0
    x[0, V - 9] = 2.0
    x[0, 5] = 1.0
    top1, top2, gap = mg_margin(x)
    assert (top1.item(), top2.item(), gap.item()) == (V - 1, V - 9, 1.0)
    x[0, V - 1] = math.nan
    top1, top2, gap = mg_margin(x)
    assert (top1.item(), top2.item()) == (V - 1, V - 9) and math.isnan(gap.item())
    strided = x.view(-1)[: V - 1 : 2][None]  # col_stride 2 reaches the far end as well
    assert mg_margin(strided)[0].item() == (V - 9) // 2


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_cuda_equals_cpu(dtype):
    # margin involves no rounding, so CUDA and CPU agree exactly.
    x = randn(17, 50000, dtype=dtype, seed=5)
    x[3, 100] = math.nan
    for a, b in zip(mg_margin(x), mg_margin(x.cpu()), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


@cuda
def test_margin_opcheck():
    torch.library.opcheck(torch.ops.margingate.margin.default, (randn(4, 1000, dtype=torch.bfloat16),))


# =============================================================================== kv_patch_
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_device", ["cpu", "cuda"])
def test_kv_patch_exact(dtype, index_device):
    k = randn(4, 3, 50, 64, dtype=dtype, seed=6)
    v = randn(4, 3, 50, 64, dtype=dtype, seed=7)
    rows = torch.tensor([2, 0, 2], device=index_device)
    positions = torch.tensor([49, 0, 10], dtype=torch.int32, device=index_device)
    kn = randn(3, 3, 64, dtype=dtype, seed=8)
    vn = randn(3, 3, 64, dtype=dtype, seed=9)
    k_ref, v_ref = k.clone(), v.clone()
    for i in range(3):
        k_ref[rows[i], :, positions[i]] = kn[i]
        v_ref[rows[i], :, positions[i]] = vn[i]
    margingate.kv_patch_(k, v, rows, positions, kn, vn)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@cuda
def test_kv_patch_strided_cache():
    # HF-style cache view: storage [B, T, H, D], seen as [B, H, T, D].
    k = randn(2, 40, 4, 32, seed=10).transpose(1, 2)
    v = randn(2, 40, 4, 32, seed=11).transpose(1, 2)
    kn = randn(2, 32, 4, seed=12).transpose(1, 2)  # [2, 4, 32], strided
    vn = randn(2, 4, 32, seed=13)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[1, :, 39] = kn[0]
    k_ref[0, :, 5] = kn[1]
    v_ref[1, :, 39] = vn[0]
    v_ref[0, :, 5] = vn[1]
    margingate.kv_patch_(k, v, torch.tensor([1, 0]), torch.tensor([39, 5]), kn, vn)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@cuda
@pytest.mark.parametrize(
    ("rows", "positions", "message"),
    [
        ([0, 4], [1, 2], "rows\\[1\\] = 4"),
        ([0, 1], [1, -1], "positions\\[1\\]"),
        ([1, 1], [3, 3], "more than once"),
    ],
)
def test_kv_patch_bad_index_writes_nothing(rows, positions, message):
    k = randn(4, 2, 8, 16, seed=14)
    v = randn(4, 2, 8, 16, seed=15)
    k0, v0 = k.clone(), v.clone()
    with pytest.raises(RuntimeError, match=message):
        margingate.kv_patch_(
            k,
            v,
            torch.tensor(rows, device=DEVICE),
            torch.tensor(positions, device=DEVICE),
            randn(2, 2, 16, seed=16),
            randn(2, 2, 16, seed=17),
        )
    torch.cuda.synchronize()
    assert torch.equal(k, k0) and torch.equal(v, v0)


@cuda
def test_kv_patch_opcheck():
    k = randn(2, 2, 8, 16, seed=18)
    v = randn(2, 2, 8, 16, seed=19)
    args = (
        k,
        v,
        torch.tensor([1], device=DEVICE),
        torch.tensor([3], device=DEVICE),
        randn(1, 2, 16, seed=20),
        randn(1, 2, 16, seed=21),
    )
    torch.library.opcheck(torch.ops.margingate.kv_patch_.default, args)


# =============================================================================== linear
# Llama-3.1-8B / Qwen2.5-7B projections (K, N), trimmed where a test only needs the shape class.
# K = 1000 and 4000 are not multiples of 128 or 64: the decode (BK = 128) and prefill (BK = 64)
# tilings reach past K by different amounts, and must still run the same chain of MMAs.
LINEAR_SHAPES = [(4096, 6144), (3584, 4608), (14336, 512), (100, 72), (8, 3), (1000, 1001), (4000, 136)]
# M values that hit every tile configuration (<= 16, <= 32, <= 256, > 256) and their edges.
M_VALUES = [1, 2, 15, 16, 17, 32, 33, 100, 256, 257, 300]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("K", "N"), LINEAR_SHAPES)
def test_linear_rows_are_batch_invariant(dtype, K, N):
    x = randn(300, K, dtype=dtype, seed=K)
    w = randn(N, K, dtype=dtype, seed=N) / math.sqrt(K)
    bias = randn(N, dtype=dtype, seed=1)
    full = mg_linear(x, w, bias)
    for m in M_VALUES:
        for start in {0, 300 - m, (300 - m) // 2}:
            part = mg_linear(x[start : start + m], w, bias)
            assert torch.equal(part, full[start : start + m]), (m, start)
    # strided views of x and w (element loads instead of cp.async) give the same bits
    x_wide = torch.zeros(300, K + 3, dtype=dtype, device=DEVICE)
    x_wide[:, 1 : K + 1] = x
    assert torch.equal(mg_linear(x_wide[:, 1 : K + 1], w, bias), full)
    w_t = w.t().contiguous().t()  # column-major weight
    assert torch.equal(mg_linear(x, w_t, bias), full)
    assert torch.equal(mg_linear(x[::2], w, bias), full[::2])
    # leading dims are flattened: [a, b, K] rows are rows
    assert torch.equal(mg_linear(x.view(3, 100, K), w, bias).view(300, N), full)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("M", "K", "N"),
    [
        (1, 4096, 4096),
        (8, 4096, 14336),
        (32, 3584, 3584),
        (128, 1000, 200),
        (4096, 512, 256),
        (5, 8, 3),
        (3, 7, 5),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_close_to_torch(dtype, M, K, N, with_bias):
    x = randn(M, K, dtype=dtype, seed=M)
    w = randn(N, K, dtype=dtype, seed=K) / math.sqrt(K)
    bias = randn(N, dtype=dtype, seed=N) if with_bias else None
    got = mg_linear(x, w, bias)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    vendor = F.linear(x, w, bias)  # cuBLAS at the same precision: the yardstick for rounding error
    err = (got.double() - ref).abs().max().item()
    vendor_err = (vendor.double() - ref).abs().max().item()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert err <= 2 * vendor_err + atol, (err, vendor_err)


@cuda
def test_linear_k_zero_and_empty():
    w = randn(5, 0)
    b = randn(5, seed=1)
    assert torch.equal(mg_linear(randn(3, 0), w, b), b.expand(3, 5))
    assert mg_linear(randn(0, 8), randn(5, 8)).shape == (0, 5)


@cuda
def test_linear_cuda_close_to_cpu():
    x = randn(9, 1000, dtype=torch.bfloat16, seed=22)
    w = randn(300, 1000, dtype=torch.bfloat16, seed=23) / 30
    got = mg_linear(x, w).float().cpu()
    cpu = mg_linear(x.cpu(), w.cpu()).float()
    torch.testing.assert_close(got, cpu, atol=2e-2, rtol=1e-2)


@cuda
def test_linear_device_mix():
    with pytest.raises(RuntimeError, match="margingate.linear: x and weight must be on the same device"):
        mg_linear(randn(2, 8), randn(3, 8, device="cpu"))
    with pytest.raises(RuntimeError, match="margingate.linear: bias must be on x's device"):
        mg_linear(randn(2, 8), randn(3, 8), randn(3, device="cpu"))


@cuda
def test_linear_opcheck():
    x = randn(3, 64, dtype=torch.bfloat16)
    w = randn(16, 64, dtype=torch.bfloat16, seed=1)
    torch.library.opcheck(
        torch.ops.margingate.linear.default, (x, w, randn(16, dtype=torch.bfloat16, seed=2))
    )


# =============================================================================== attention
def attention_reference(q, k, v, kv_start=None, kv_rows=None, *, causal=True, scale=None, window=None):
    """Plain torch, float64, explicit mask; queries with no visible key give zeros."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if kv_rows is not None:
        k, v = k[kv_rows.long()], v[kv_rows.long()]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    t = torch.arange(Tk, device=q.device)
    pos = Tk - Tq + torch.arange(Tq, device=q.device)
    start = torch.zeros(B, dtype=torch.long, device=q.device) if kv_start is None else kv_start.long()
    visible = t[None, None, :] >= start[:, None, None]  # [B, 1, Tk]
    visible = visible & torch.ones(B, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (t[None, None, :] <= pos[None, :, None])
    if window is not None and window > 0:
        visible = visible & (t[None, None, :] > pos[None, :, None] - window)
    visible = visible[:, None]  # [B, 1, Tq, Tk]
    scores = scores.masked_fill(~visible, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vv)


def embed(seq: torch.Tensor, pad: int, seed: int = 0) -> torch.Tensor:
    """[H, L, D] -> [1, H, pad + L, D] with large random garbage in the padding (it must be ignored)."""
    H, L, D = seq.shape
    out = randn(1, H, pad + L, D, dtype=seq.dtype, seed=seed) * 100
    out[0, :, pad : pad + L] = seq
    return out


ATTN_CONFIGS = [
    # (Hq, Hkv, D)
    (8, 2, 128),
    (4, 4, 64),
    (20, 2, 64),  # group of 10 > 8 warps per block: two head blocks
    (2, 1, 256),
    (4, 2, 80),
    (2, 2, 40),
]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("Hq", "Hkv", "D"), ATTN_CONFIGS)
@pytest.mark.parametrize("window", [None, 100])
def test_attention_query_invariance(dtype, Hq, Hkv, D, window):
    """One sequence: alone, left-padded inside a batch, as decode steps, as a window replay and as a
    prefill, with the split-KV path (few blocks) and the one-block-per-query path (many blocks)."""
    L = 700  # three chunks of 256 keys: the in-order combine is exercised
    q_seq = randn(Hq, L, D, dtype=dtype, seed=30)
    k_seq = randn(Hkv, L, D, dtype=dtype, seed=31)
    v_seq = randn(Hkv, L, D, dtype=dtype, seed=32)

    def run(pad, n_queries, batch_others=0, end=L):
        """The last n_queries queries ending at `end`, with `pad` padding keys before the sequence."""
        k = embed(k_seq[:, :end], pad, seed=33)
        v = embed(v_seq[:, :end], pad, seed=34)
        q = q_seq[None, :, end - n_queries : end]
        start = torch.tensor([pad], device=DEVICE)
        if batch_others:
            Tk = k.shape[2]
            k = torch.cat([k, randn(batch_others, Hkv, Tk, D, dtype=dtype, seed=35)])
            v = torch.cat([v, randn(batch_others, Hkv, Tk, D, dtype=dtype, seed=36)])
            q = torch.cat([q, randn(batch_others, Hq, n_queries, D, dtype=dtype, seed=37)])
            start = torch.cat([start, torch.arange(batch_others, device=DEVICE) % Tk])
        return mg_attention(q, k, v, start, window=window)[0]

    prefill = run(0, L)
    ref = attention_reference(q_seq[None], k_seq[None], v_seq[None], window=window)[0]
    assert (prefill.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype]
    assert torch.equal(run(37, L), prefill)
    assert torch.equal(run(5, L, batch_others=3), prefill)
    for end in (1, 255, 256, 257, 513, L):
        decode = run(0, 1, end=end)  # few blocks: keys split across blocks
        assert torch.equal(decode, prefill[:, end - 1 : end]), end
        # 601 rows: enough blocks (>= 4 per SM on 132 SMs) that the keys are not split
        assert torch.equal(run(300, 1, end=end, batch_others=600), decode), end
    replay = run(11, 4, end=600)
    assert torch.equal(replay, prefill[:, 596:600])


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_close_to_reference(dtype):
    B, Hq, Hkv, Tq, Tk, D = 3, 8, 2, 5, 300, 128
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=40)
    k = randn(B, Hkv, Tk, D, dtype=dtype, seed=41)
    v = randn(B, Hkv, Tk, D, dtype=dtype, seed=42)
    start = torch.tensor([0, 17, 299], device=DEVICE)
    for causal, window, scale in [
        (True, None, None),
        (False, None, 0.3),
        (True, 64, None),
        (False, 10, None),
    ]:
        got = mg_attention(q, k, v, start, causal=causal, scale=scale, window=window)
        ref = attention_reference(q, k, v, start, causal=causal, scale=scale, window=window)
        assert (got.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype], (causal, window)


@cuda
def test_attention_fully_masked_queries_are_zero():
    q = randn(2, 4, 3, 64)
    k = randn(2, 2, 10, 64, seed=1)
    v = randn(2, 2, 10, 64, seed=2)
    out = mg_attention(q, k, v, torch.tensor([10, 9], device=DEVICE))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1, :, :2].abs().sum() == 0 and out[1, :, 2].abs().sum() > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kv_rows_and_strides(dtype):
    B, Hq, Hkv, Tq, Tk, D = 3, 4, 2, 2, 90, 64
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=50)
    k_bthd = randn(5, Tk, Hkv, D, dtype=dtype, seed=51)
    v_bthd = randn(5, Tk, Hkv, D, dtype=dtype, seed=52)
    k, v = k_bthd.transpose(1, 2), v_bthd.transpose(1, 2)  # [Bkv, Hkv, Tk, D] views, strided
    rows = torch.tensor([4, 0, 4], device=DEVICE)
    start = torch.tensor([3, 0, 50], device=DEVICE)
    got = mg_attention(q, k, v, start, rows)
    gathered = mg_attention(q, k[rows].contiguous(), v[rows].contiguous(), start)
    assert torch.equal(got, gathered)
    # element loads (odd head_dim slice) and vector loads agree
    k_odd = torch.zeros(5, Hkv, Tk, D + 1, dtype=dtype, device=DEVICE)
    k_odd[..., 1:] = k
    assert torch.equal(mg_attention(q, k_odd[..., 1:], v, start, rows), got)
    ref = attention_reference(q, k, v, start, rows)
    assert (got.double() - ref).abs().max().item() <= ATTENTION_ATOL[dtype]


@cuda
def test_attention_cuda_close_to_cpu():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16, seed=60)
    k = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=61)
    v = randn(2, 2, 40, 64, dtype=torch.bfloat16, seed=62)
    start = torch.tensor([0, 5])
    got = mg_attention(q, k, v, start.to(DEVICE)).float().cpu()
    cpu = mg_attention(q.cpu(), k.cpu(), v.cpu(), start).float()
    torch.testing.assert_close(got, cpu, atol=3e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_attention_cpu_indices_equal_device_indices(index_dtype):
    """kv_start / kv_rows may live on the CPU (checked there, copied asynchronously) or the GPU
    (copied to the host for the check): the same bits either way."""
    q = randn(3, 4, 2, 64, dtype=torch.bfloat16, seed=63)
    k = randn(4, 2, 50, 64, dtype=torch.bfloat16, seed=64)
    v = randn(4, 2, 50, 64, dtype=torch.bfloat16, seed=65)
    start = torch.tensor([0, 7, 49], dtype=index_dtype)
    rows = torch.tensor([3, 0, 3], dtype=index_dtype)
    on_gpu = mg_attention(q, k, v, start.to(DEVICE), rows.to(DEVICE))
    assert torch.equal(mg_attention(q, k, v, start, rows), on_gpu)
    with pytest.raises(IndexError, match="kv_start\\[2\\] = 51 is out of range"):
        mg_attention(q, k, v, torch.tensor([0, 0, 51], device=DEVICE), rows)
    assert torch.equal(mg_attention(q, k, v, start, rows), on_gpu)  # the context is alive


def _softmax_reference(q, k, v):
    """torch's attention semantics in float64 (softmax of the masked scores, then @ v): NaN for a
    query with a NaN or +inf score or with only -inf scores. Masked scores are replaced with
    masked_fill, so a NaN in a masked key stays out, as our contract has it (the math SDPA
    backend adds a -inf bias instead, and NaN + -inf is NaN)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    Tq, Tk = q.shape[2], k.shape[2]
    visible = torch.arange(Tk, device=q.device)[None, :] <= Tk - Tq + torch.arange(Tq, device=q.device)[:, None]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) / math.sqrt(q.shape[3])
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vv)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tk", [40, 700])  # one block per query / keys split across blocks
def test_attention_non_finite_inputs_propagate_like_torch(dtype, Tk):
    """A NaN in q, a NaN or a +inf in a visible key (a NaN or +inf score) makes the query's
    whole output NaN, as torch's attention does; a NaN in a visible value makes that dimension NaN;
    a key that is masked (padding, future) is never read, so its NaN changes nothing."""
    B, Hq, Hkv, Tq, D = 4, 4, 2, 2, 64
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=66)
    k = randn(B, Hkv, Tk, D, dtype=dtype, seed=67)
    v = randn(B, Hkv, Tk, D, dtype=dtype, seed=68)
    clean = mg_attention(q, k, v)
    q[0, 1, 0, 3] = math.nan  # row 0, head 1, first query: NaN scores
    k[1, 0, Tk // 2, 5] = math.nan  # row 1, kv head 0: every query of heads 0, 1 sees that key
    k[2, 1, 3, :] = math.inf  # row 2, kv head 1: +inf scores ...
    q[2, 2:] = q[2, 2:].abs()  # ... for heads 2, 3 (q > 0)
    v[3, 0, 0, 7] = math.nan  # row 3, kv head 0, dimension 7 of a visible value
    k[3, 1, Tk - 1, :] = math.nan  # row 3, kv head 1: the last key, visible only to the last query
    got = mg_attention(q, k, v)
    ref = _softmax_reference(q, k, v)
    assert torch.equal(got.isnan(), ref.isnan()), (got.isnan().sum(), ref.isnan().sum())
    assert got[0, 1, 0].isnan().all() and got[1, :2].isnan().all() and got[2, 2:].isnan().all()
    assert got[3, :2, :, 7].isnan().all() and not got[3, :2, :, :7].isnan().any()
    assert got[3, 2:, 1].isnan().all() and not got[3, 2:, 0].isnan().any()
    # Every query without a non-finite input keeps its clean bits.
    finite = ~ref.isnan().any(-1, keepdim=True).expand_as(ref)
    assert torch.equal(got[finite], clean[finite])


@cuda
def test_attention_all_minus_inf_scores_give_nan_and_no_keys_give_zeros():
    q = randn(2, 2, 1, 64, seed=69)
    k = randn(2, 2, 30, 64, seed=70)
    v = randn(2, 2, 30, 64, seed=71)
    k[0] = -math.inf
    q[0] = q[0].abs() + 1  # every score of row 0 is -inf (torch's softmax: NaN)
    got = mg_attention(q, k, v, torch.tensor([0, 30], device=DEVICE))  # row 1: no visible key
    assert got[0].isnan().all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert _softmax_reference(q[:1], k[:1], v[:1]).isnan().all()


@cuda
def test_attention_opcheck():
    q = randn(2, 4, 3, 64, dtype=torch.bfloat16)
    k = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=1)
    v = randn(2, 2, 10, 64, dtype=torch.bfloat16, seed=2)
    torch.library.opcheck(
        torch.ops.margingate.attention.default, (q, k, v, torch.tensor([0, 3], device=DEVICE))
    )


# =============================================================================== HF models on CUDA
# Tiny random models from tests/models.py (the CPU tests' builder), moved to the GPU in bf16: GQA,
# and for gemma3_text sliding-window layers, q/k norms and a GELU MLP.
GPU_FAMILIES = ("llama", "gemma3_text")
GEN_NEW_TOKENS = 16
GEN_PROMPTS = 6
# (prompt order, batch size): alone, shuffled in batches of 4 (the last one of 2), all at once reversed.
GEN_CONFIGS = {"alone": (list(range(GEN_PROMPTS)), 1), "b4": ([3, 0, 5, 1, 4, 2], 4), "b6": ([5, 4, 3, 2, 1, 0], 6)}
_gpu_models: dict[str, torch.nn.Module] = {}


def gpu_model(family: str) -> torch.nn.Module:
    pytest.importorskip("transformers")
    from tests.models import build_model

    if family not in _gpu_models:
        _gpu_models[family] = build_model(family, torch.bfloat16).to(DEVICE)
    return _gpu_models[family]


def gen_prompts() -> list[list[int]]:
    g = _gen(72)
    lengths = torch.randint(2, 40, (GEN_PROMPTS,), generator=g)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in lengths]


@cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_batch_invariant_mode_on_cuda_model(family):
    """Inside batch_invariant(model) (the model's sdpa attention switched to margingate's) every
    sequence's logits are bitwise the same alone and inside a left-padded batch."""
    model = gpu_model(family)
    prompts = gen_prompts()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with margingate.batch_invariant(model), torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, p in enumerate(prompts):
            alone_ids = torch.tensor([p], device=DEVICE)
            alone = model(
                input_ids=alone_ids,
                attention_mask=torch.ones_like(alone_ids),
                position_ids=torch.arange(len(p), device=DEVICE)[None],
            ).logits
            assert torch.equal(alone[0], batched[i, width - len(p) :]), (family, i)


def generate_in_every_config(model, policy: str, threshold: float | None = None):
    """{config: GenerationResult with sequences and margins back in prompt order}."""
    prompts = gen_prompts()
    out = {}
    for name, (order, batch_size) in GEN_CONFIGS.items():
        r = margingate.generate(
            model,
            [prompts[i] for i in order],
            policy=policy,
            threshold=threshold,
            batch_size=batch_size,
            max_new_tokens=GEN_NEW_TOKENS,
            record_margins=True,
        )
        back = {i: j for j, i in enumerate(order)}
        out[name] = margingate.GenerationResult(
            sequences=[r.sequences[back[i]] for i in range(GEN_PROMPTS)],
            stats=r.stats,
            margins=[r.margins[back[i]] for i in range(GEN_PROMPTS)],
        )
    return out


@cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_generation_deterministic_across_batch_sizes_on_cuda(family):
    """margingate.generate on a CUDA model: `always` and `margin` (threshold above every margin at
    which `off` flipped here) give every prompt the same tokens alone and in batches of 4 and 6;
    `off` (cuBLAS / SDPA) is reported, and may flip."""
    model = gpu_model(family)
    off = generate_in_every_config(model, "off")
    flips, margins = [], []
    for name, r in off.items():
        for i in range(GEN_PROMPTS):
            a, b = off["alone"].sequences[i], r.sequences[i]
            margins += r.margins[i]
            step = next((s for s in range(min(len(a), len(b))) if a[s] != b[s]), None)
            if step is not None:
                flips.append((name, i, step, off["alone"].margins[i][step], r.margins[i][step]))
    flip_margin = max((max(m1, m2) for *_, m1, m2 in flips), default=0.0)
    threshold = float(max(2 * flip_margin, torch.tensor(margins).quantile(0.10)))
    print(f"\n{family} on CUDA: off flips (config, prompt, step, margin alone, margin batched): {flips}")
    for policy, t in (("always", None), ("margin", threshold)):
        results = generate_in_every_config(model, policy, t)
        base = results["alone"].sequences
        assert all(len(seq) > 0 for seq in base)
        rates = {name: r.stats["trigger_rate"] for name, r in results.items()}
        print(f"{family}: {policy} (threshold {t}) trigger rates {rates}")
        for name, r in results.items():
            assert r.sequences == base, f"{policy} on {family} (CUDA): {name} differs from alone"


# =============================================================================== streams
@cuda
def test_ops_run_on_the_current_stream_and_capture_in_cuda_graphs():
    """Capturing into a CUDA graph fails if a kernel goes to the legacy default stream or the op
    synchronises, so this checks that margin / linear / attention launch on torch's current stream
    (and that they can be replayed from a graph in a decode loop)."""
    logits = randn(8, 50000, dtype=torch.bfloat16, seed=80)  # 8 rows: split rows + merge kernel
    x = randn(4, 512, dtype=torch.bfloat16, seed=81)
    w = randn(256, 512, dtype=torch.bfloat16, seed=82)
    q = randn(1, 8, 1, 128, dtype=torch.bfloat16, seed=83)
    k = randn(1, 2, 1000, 128, dtype=torch.bfloat16, seed=84)  # few blocks: split keys + combine
    v = randn(1, 2, 1000, 128, dtype=torch.bfloat16, seed=85)
    start = torch.tensor([3], device=DEVICE)

    def step():
        return mg_margin(logits), mg_linear(x, w), mg_attention(q, k, v, start)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm-up (and lazy attribute setup) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured[0], eager[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(captured[1], eager[1])
    assert torch.equal(captured[2], eager[2])
