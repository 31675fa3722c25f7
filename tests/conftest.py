"""Shared test settings: Triton kernels run under the CPU interpreter where there is no GPU, and
GPU tests skip there (they are never deleted)."""

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted, so on a CPU-only machine the
# interpreter must be on before any kernel module is imported: conftest is imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
