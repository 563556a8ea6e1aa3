#!/usr/bin/env bash
# Regenerates the measured results the README shows, on this machine: every `leanops bench` family (the installed
# peers included) into benchmarks/results/<device>/ (cpu, or the GPU's name: h100, h200, gpu), the issue's target
# table from those results on a GPU (targets-cuda.md/.json: the default GPU sizes hold every target case), and both
# demos into benchmarks/results/demo/. On the H100, after `bash scripts/setup.sh` (and the peers' wheels);
# DEVICE=cpu|cuda overrides the detected device. For the short check within one GPU call, see scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LEANOPS_VENV:-.venv}
device=${DEVICE:-$("$venv/bin/python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
folder=$device
if [ "$device" = cuda ]; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H100*) folder=h100 ;;
    *H200*) folder=h200 ;;
    *) folder=gpu ;;
  esac
fi
"$venv/bin/leanops" bench --device "$device" --peers --out "benchmarks/results/$folder"
if [ "$device" = cuda ]; then  # the target sizes are GPU sizes: a CPU run has none of them
  "$venv/bin/python" -m leanops.benchmarks.targets "benchmarks/results/$folder" --device cuda
fi
"$venv/bin/leanops" demo lm --device "$device"
"$venv/bin/leanops" demo clip --device "$device"
