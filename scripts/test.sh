#!/usr/bin/env bash
# Runs every test that needs no GPU: the C++ unit tests of the error-free transformations (CMake + ctest), then
# pytest (the Triton kernels under TRITON_INTERPRET=1; CUDA tests are skipped without a GPU).
# Run scripts/setup.sh first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LEANOPS_VENV:-.venv}

PYTHON="$venv/bin/python" bash scripts/cmake_check.sh
"$venv/bin/python" -m pytest -q "$@"
