"""Test helper for the Triton kernel tests: run them under the CPU interpreter when no GPU exists.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be set
before the kernel modules are imported; if another test imported them first, reload them.
"""

import importlib
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_MODULES = ("nsa_kernels._triton_utils", "nsa_kernels.cache_write", "nsa_kernels.dense_decode",
            "nsa_kernels.nsa_decode")


def load_kernels():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        for name in _MODULES:  # in dependency order
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return [importlib.import_module(n) for n in _MODULES]


def assert_matches(got, want, twin, tol):
    """A kernel's output `got` against the float64 formula `want` (relative norm error < tol) and
    against its PyTorch twin `twin` elementwise (rtol = tol, atol = tol · max |want|)."""
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert torch.allclose(got.double(), twin.double(), rtol=tol, atol=tol * want.abs().max().item())
