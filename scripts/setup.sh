#!/usr/bin/env bash
# Sets up a fresh machine for leanops: a virtual environment in .venv with torch, the test tools and leanops itself
# (its C++ CPU kernels, and its CUDA kernels wherever torch is a CUDA build and nvcc is found: no GPU is needed to
# compile them). Safe to run again: an existing .venv is reused and only what changed is rebuilt.
#
#   LEANOPS_TORCH     the torch requirement (default torch==2.14.1: a CUDA 13.0 build, enough to compile CUDA code)
#   LEANOPS_VENV      where the virtual environment lives (default .venv)
#   LEANOPS_BUILD_STRICT=1, LEANOPS_BUILD_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${LEANOPS_VENV:-.venv}
torch_requirement=${LEANOPS_TORCH:-torch==2.14.1}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch_requirement" numpy pytest pytest-benchmark hypothesis ninja setuptools \
  wheel matplotlib
# transformers and accelerate: the Hugging Face integration's tests (tiny random models, nothing downloaded; Trainer needs accelerate).
"$venv/bin/python" -m pip install --quiet transformers accelerate
# open_clip: the open_clip integration's tests (tiny models built from configs, nothing downloaded). torchvision is
# the build made for the torch above (0.29.1 for torch 2.14.1), installed without its dependencies so that pip never
# swaps torch; with another LEANOPS_TORCH, install the matching torchvision and open_clip_torch by hand.
if [ "$torch_requirement" = "torch==2.14.1" ]; then
  "$venv/bin/python" -m pip install --quiet --no-deps torchvision==0.29.1
  "$venv/bin/python" -m pip install --quiet open_clip_torch==3.3.0 ftfy timm
fi
# --no-build-isolation: the extension compiles against the torch installed above, not a second download.
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
"$venv/bin/leanops" info
