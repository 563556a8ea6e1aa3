"""Test configuration: which backends this machine can run, and Triton's interpreter where there is no GPU.

Markers: ``gpu`` (needs CUDA; skipped without it), ``triton`` (Triton kernels; under the interpreter on a CPU-only
machine), ``distributed`` (several processes).
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton kernels are first imported (triton.jit reads it when it decorates).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import leanops  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
