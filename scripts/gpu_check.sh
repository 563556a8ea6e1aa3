#!/usr/bin/env bash
# The GPU check, one command on the GPU machine (H100): build leanops there, run the GPU tests (once more under
# compute-sanitizer's memcheck for the CUDA kernels), run the benchmarks, and print a short table last.
#
#   bash scripts/gpu_check.sh            # from the repository root; logs and JSON go to $OUT (or ./gpu-check)
#   STEPS="build tests" bash scripts/gpu_check.sh          # some steps only (build tests memcheck bench); the
#   STEPS="build bench" FAMILIES="clip siglip" bash ...    # device tool allows 10 minutes per call, so a full
#                                                          # check is several calls on one warm machine
#
# The machine has no network: it uses its own python3 (torch, triton, pytest installed) and builds with
# --no-build-isolation. Peers' wheels, when carried in .whl/ (../shared/tools/peer_wheels.sh), are installed into a
# private folder and put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export MAX_JOBS=16 LEANOPS_BUILD_STRICT=1 PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if ls .whl/*.whl >/dev/null 2>&1; then
  step "peer wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
fi

steps=${STEPS:-build tests memcheck bench}
wants() { [[ " $steps " == *" $1 "* ]]; }
test_status=0 memcheck_status=0 bench_status=0

wants build && {
step "build"
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
leanops info | tee "$out/info.txt"
}

wants tests && {
step "tests on the GPU (the whole suite: CUDA and Triton cases run natively here)"
python3 -m pytest -q -x tests/ 2>&1 | tee "$out/pytest.log" | tail -25
test_status=${PIPESTATUS[0]}
[ "$test_status" -eq 0 ] || status=1
}

wants memcheck && {
step "CUDA kernels under compute-sanitizer memcheck"
# The loss kernels' primitive tests too (never run on a GPU before the first check); capped in time, since
# memcheck slows kernels down by 10-100x.
timeout 900 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  python3 -m pytest -q -x -m gpu -k "cuda-cuda or cuda_primitives or collage_cuda" tests/mcf/test_mcf_exactness.py \
  tests/mcf/test_mcf_grow_scale.py tests/contrastive/test_contrastive_primitives.py \
  tests/cross_entropy/test_cross_entropy_primitives.py \
  tests/collage/test_collage_primitives.py tests/frugal/test_frugal_primitives.py tests/frugal/test_frugal_optimizer.py \
  >"$out/memcheck.log" 2>&1
memcheck_status=$?
tail -5 "$out/memcheck.log"
[ "$memcheck_status" -eq 0 ] || status=1
}

wants bench && {
step "benchmarks ${FAMILIES:-(all families)}"
# shellcheck disable=SC2086  # FAMILIES is a list of words
leanops bench ${FAMILIES:-} --device cuda --peers --out "$out" 2>&1 | tee "$out/bench.log" | tail -40
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 0 ] || status=1
}

step "summary"
outcome() {  # step name, its status, the word for success
  if ! wants "$1"; then echo "not run"; elif [ "$2" -eq 0 ]; then echo "$3"; else echo FAILED; fi
}
printf '%-34s %s\n' "pytest (GPU + CPU)" "$(outcome tests "$test_status" passed)" \
  "compute-sanitizer memcheck" "$(outcome memcheck "$memcheck_status" clean)" \
  "leanops bench (checked vs reference)" "$(outcome bench "$bench_status" passed)"
python3 - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-cuda.json")):
    data = json.loads(path.read_text())
    print(f"\n{path.name}: {data.get('environment', {}).get('device', '?')}, copy {data.get('copy_bandwidth_gbps', 0):.0f} GB/s")
    for row in data.get("rows", []):
        ms = row.get("ms")
        frac = row.get("fraction_of_copy")
        print(f"  {row['op']:<10} {row['backend']:<10} {row['dtype']:<9} "
              f"{'%.3f ms' % ms if ms else row.get('check', ''):>10} "
              f"{'%.0f%% of copy' % (100 * frac) if frac else ''}")
PY
exit $status
