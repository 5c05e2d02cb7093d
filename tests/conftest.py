"""Shared test fixtures, the one GPU marker (``@pytest.mark.cuda``: skipped without a GPU) and the
one SIMD-level parametrization (``simd_level``: every CPU kernel level this machine has)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import margingate  # noqa: F401  (loads the native library)

HAS_CUDA = torch.cuda.is_available() and bool(margingate.build_info()["cuda"])

# The dtypes every native op takes: the one list the op tests (CPU and CUDA) parametrize over.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The CPU kernel levels a CPU with the given best level can run (x86 levels nest; neon is aarch64's).
_LEVELS_BELOW = {
    "scalar": ["scalar"],
    "avx2": ["scalar", "avx2"],
    "avx512": ["scalar", "avx2", "avx512"],
    "neon": ["scalar", "neon"],
}
SIMD_LEVELS = _LEVELS_BELOW[str(margingate.build_info()["simd_supported"])]


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(request) -> str:
    """Each SIMD level this machine has, for tests that run code with ``run_at_simd_level``."""
    return request.param


def run_at_simd_level(level: str, code: str, *args: str) -> str:
    """Runs ``code`` (``python -c``) with ``MARGINGATE_SIMD=level`` and returns its stdout.

    A process fixes its SIMD level on first use, so every level gets its own interpreter. It imports
    the same margingate as the tests (installed or the dev build) and can import ``tests.*``. Fails
    the test when the code fails, or when the level did not take effect or ``build_info()`` does not
    say why it runs (detected, or capped by ``MARGINGATE_SIMD``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(margingate.__file__)))
    env = dict(os.environ, MARGINGATE_SIMD=level)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, root, env.get("PYTHONPATH", "")])
    # build_info() must say which level runs and why.
    why = "detected" if level == SIMD_LEVELS[-1] else f"capped by MARGINGATE_SIMD={level}"
    check = (
        "import margingate\n"
        "info = margingate.build_info()\n"
        f"assert info['simd'] == {level!r} and info['simd_reason'].startswith({why!r}), info\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check + code, *args], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, f"at MARGINGATE_SIMD={level}:\n{out.stdout}{out.stderr}"
    return out.stdout


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of margingate")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
