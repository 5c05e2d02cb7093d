"""What runs without a GPU: the argument checks the CPU and CUDA registrations share (on the CPU op;
on both devices with a GPU), and a CMake configure that must keep torch's CUDA flags out of the
kernel library.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .cuda_support import ROOT, cuda, mg_attention, mg_linear, seeded


def _attention_inputs(device):
    g = seeded(90)
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
