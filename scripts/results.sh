#!/usr/bin/env bash
# Regenerates the measured results the README shows, on this machine: every `leanops bench` family (the installed
# peers included) into benchmarks/results/<device>/, and both demos into benchmarks/results/demo/. On the H100,
# after `bash scripts/setup.sh` (and the peers' wheels); DEVICE=cpu|cuda overrides the detected device.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LEANOPS_VENV:-.venv}
device=${DEVICE:-$("$venv/bin/python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
"$venv/bin/leanops" bench --device "$device" --peers --out "benchmarks/results/$device"
"$venv/bin/leanops" demo lm --device "$device"
"$venv/bin/leanops" demo clip --device "$device"
