"""Test configuration: which backends this machine can run, and Triton's interpreter where there is no GPU.

Markers: ``gpu`` (needs CUDA; skipped without it), ``triton`` (Triton kernels; under the interpreter on a CPU-only
machine), ``distributed`` (several processes), ``slow`` (long cases: ``pytest -m "not slow"`` leaves them out),
``gpu_check`` (the short GPU subset scripts/gpu_check.sh runs, ``pytest -m "gpu_check and gpu"``: a few tests per
loss, optimizer and MCF kernel, each over every provider; registered in pyproject.toml).

Layout: one folder per op family (tests/<family>, no __init__.py, every test file's name unique in the tree); this
folder is on sys.path for all of them (pytest's default import mode puts a conftest's folder there), so
``from helpers import ...`` and ``import oracles`` work from every subfolder. The compile and memory report scripts
the tests run in a subprocess live in scripts/reports/ (helpers.run_report_script, helpers.REPORTS).
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
