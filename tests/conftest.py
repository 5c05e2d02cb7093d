"""Shared test fixtures and the one GPU marker (``@pytest.mark.cuda``: skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import margingate  # noqa: F401  (loads the native library)

HAS_CUDA = torch.cuda.is_available() and bool(margingate.build_info()["cuda"])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of margingate")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
