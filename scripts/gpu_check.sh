#!/usr/bin/env bash
# The GPU check in one short call of the GPU machine (one H100, bare: torch 2.11, Triton 3.6, Python 3.12, 16 cores,
# no network): build leanops, run the marked GPU tests, compute-sanitizer on one small call of every CUDA kernel, and
# the benchmark at the issue's target sizes with the peers. The issue's target table, beside the measured values,
# comes last; it is written with the device, date and commit under benchmarks/results/<gpu>/ (targets-cuda.md/.json,
# beside each family's JSON and CSV) and copied to $OUT/results/<gpu>/, which the device tool brings back.
#
#   bash scripts/gpu_check.sh                       # the default steps: under 8 minutes from a bare machine
#   STEPS="reports suite" bash scripts/gpu_check.sh # longer, named steps: each its own call, after a default call
#   STEPS="build sweep" bash scripts/gpu_check.sh   #   on the same warm machine (or with "build" in STEPS)
#
# From the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540). The peers' wheels
# (../shared/tools/peer_wheels.sh, into .whl/, git-ignored: hence carry) are installed into a private folder on
# PYTHONPATH; without them the peers' rows say "not installed".
#
# Budget, in seconds (estimate / cap). Every step runs under `timeout`: its cap, cut to what is left of BUDGET_S
# (default 470 s, under 8 minutes) less a 15 s reserve for the summary, so one slow step cannot eat the call; a step
# that hits its cap fails alone and the later steps still run (a step with under 10 s left is skipped, and says so).
#   default steps (STEPS unset: "build tests memcheck bench"):
#     setup     the device, versions, the peers' wheels                                              ~10 /   -
#     build     pip install --no-build-isolation -e . (MAX_JOBS=16), leanops info                  ~150 / 240
#     tests     pytest -m "gpu_check and gpu": ~200 CUDA-device cases (every provider: reference, cuda,
#               triton) of the loss, optimizer and MCF kernels, marked in tests/*/ (not the ~2,600 of
#               the whole suite; the Triton compile reports are not among them)                      ~60 / 120
#     memcheck  compute-sanitizer --tool memcheck over benchmarks/kernel_smoke.py: one small call of
#               every CUDA kernel (MCF, CLIP, SigLIP, linear CE forward + backward, bf16 and fp32;
#               CollageAdamW light/plus, FRUGAL)                                                     ~45 /  90
#     bench     leanops bench --targets (siglip, clip, optim, ce; the peers; 3 s of repeats a row)
#               --time-limit: an equal share of what is left per family, unused time carried on   ~180 / the rest
#     summary   each step's outcome, then the target table (printed last)                           ~5 /   -
#               total ~450 s
#   named steps, each in a call of its own (each capped; BUDGET_S=560 suits them):
#     reports   the Triton compile reports (tests/*/test_*hopper_compile.py, *_triton_compile.py): they
#               depend on the Triton version, so they never fail the check (non-fatal)               ~120 / 300
#     suite     the whole test suite on the GPU (-m "not slow"; the compile reports left to `reports`) ~400 / 540
#     sweep     leanops bench at the default sizes, every family, the peers (--time-limit 60 a family,
#               unused time carried on)                                                              ~400 / 540
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export MAX_JOBS=${MAX_JOBS:-16} LEANOPS_BUILD_STRICT=1 PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-470}
RESERVE_S=15
steps=${STEPS:-build tests memcheck bench}
started=$SECONDS
status=0
declare -A outcome=()

step() { echo; echo "=== $* (at $((SECONDS - started)) s, $(date -u +%H:%M:%S) UTC)"; }
wants() { [[ " $steps " == *" $1 "* ]]; }
# cap STEP_CAP: the seconds a step may take: its own cap, cut to what is left of the budget less the reserve.
cap() {
  local left=$((BUDGET_S - (SECONDS - started) - RESERVE_S))
  if ((left < $1)); then echo "$left"; else echo "$1"; fi
}
# record STEP STATUS [fatal|nonfatal]: remember a step's outcome (124: it hit its cap).
record() {
  local word=passed
  if [ "$2" -eq 124 ]; then word="TIMED OUT (cap)"; elif [ "$2" -ne 0 ]; then word=FAILED; fi
  if [ "${3:-fatal}" = nonfatal ] && [ "$2" -ne 0 ]; then word="$word (non-fatal)"; fi
  outcome[$1]=$word
  if [ "${3:-fatal}" = fatal ] && [ "$2" -ne 0 ]; then status=1; fi
}
# enough STEP SECONDS: whether a step has at least 10 s; if not, it is recorded as skipped.
enough() {
  if (($2 < 10)); then outcome[$1]="skipped: out of budget"; status=1; return 1; fi
}

step "setup: device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
  'cuda', torch.version.cuda, 'triton', triton.__version__)"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$gpu_name" in
  *H100*) gpu=h100 ;;
  *H200*) gpu=h200 ;;
  *) gpu=gpu ;;
esac
results=${RESULTS:-benchmarks/results/$gpu}
wheels=${PEER_WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  step "setup: peers' wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no peers' wheels in $wheels/ (../shared/tools/peer_wheels.sh; carry .whl): the peers' rows say not installed"
fi

if wants build; then
  seconds=$(cap 240)
  step "build (cap ${seconds} s)"
  if enough build "$seconds"; then
    timeout "$seconds" python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
    build_status=$?
    record build $build_status
    if [ $build_status -ne 0 ]; then
      tail -40 "$out/build.log"
      echo "build failed: the other steps need it; stopping"
      printf '%-10s %s\n' build "${outcome[build]}"
      exit 1
    fi
    leanops info >"$out/info.txt" 2>&1
    grep -iE "cuda|triton|built" "$out/info.txt" | head -12
  fi
fi

if wants tests; then
  seconds=$(cap 120)
  step "tests: the gpu_check subset on the GPU (cap ${seconds} s)"
  if enough tests "$seconds"; then
    timeout "$seconds" python3 -m pytest -q -m "gpu_check and gpu" -p no:cacheprovider --durations=10 \
      tests/mcf tests/contrastive tests/cross_entropy tests/collage tests/frugal >"$out/pytest.log" 2>&1
    record tests $?
    grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -20
    tail -3 "$out/pytest.log"
  fi
fi

if wants memcheck; then
  seconds=$(cap 90)
  step "memcheck: compute-sanitizer over one small call of every CUDA kernel (cap ${seconds} s)"
  if enough memcheck "$seconds"; then
    # No caching allocator: each tensor its own allocation, so an access past its end is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$seconds" compute-sanitizer --tool memcheck --error-exitcode 9 \
      --print-limit 20 python3 -m leanops.benchmarks.kernel_smoke --backend cuda >"$out/memcheck.log" 2>&1
    record memcheck $?
    grep -E "^(FAILED|=+ (ERROR|Invalid))" "$out/memcheck.log" | head -10
    tail -3 "$out/memcheck.log"
  fi
fi

if wants bench; then
  seconds=$(cap 400)
  step "bench: the issue's target sizes, with the peers (cap ${seconds} s)"
  if enough bench "$seconds"; then
    # Four families; 30 s kept for start-up (imports, the device's ceilings) and the last rows' overrun.
    limit=$(((seconds - 30) / 4))
    ((limit < 5)) && limit=5
    mkdir -p "$results"
    timeout "$seconds" python3 -m leanops.cli bench siglip clip optim ce --targets --device cuda --peers \
      --time-limit "$limit" --out "$results" >"$out/bench.log" 2>&1
    record bench $?
    # The families' tables without their notes (in bench.log and the JSON); the target table comes at the end.
    grep -vE "^(note:|leanops bench: (running|wrote))" "$out/bench.log" | sed '/^issue 14 targets/,$d'
  fi
fi

if wants reports; then
  seconds=$(cap 300)
  step "reports: the Triton compile reports (they depend on the Triton version: never fatal; cap ${seconds} s)"
  if enough reports "$seconds"; then
    timeout "$seconds" python3 -m pytest -q -p no:cacheprovider tests/*/test_*hopper_compile.py \
      tests/*/test_*triton_compile.py >"$out/reports.log" 2>&1
    record reports $? nonfatal
    tail -15 "$out/reports.log"
  fi
fi

if wants suite; then
  seconds=$(cap 540)
  step "suite: every test on the GPU but the slow ones and the compile reports (cap ${seconds} s)"
  if enough suite "$seconds"; then
    timeout "$seconds" python3 -m pytest -q -m "not slow" -p no:cacheprovider --durations=15 \
      --ignore-glob='*hopper_compile*' --ignore-glob='*triton_compile*' tests/ >"$out/suite.log" 2>&1
    record suite $?
    grep -E "^(FAILED|ERROR)" "$out/suite.log" | head -30
    tail -3 "$out/suite.log"
  fi
fi

if wants sweep; then
  seconds=$(cap 540)
  step "sweep: leanops bench at the default sizes, every family, the peers (cap ${seconds} s)"
  if enough sweep "$seconds"; then
    mkdir -p "$out/sweep"
    timeout "$seconds" python3 -m leanops.cli bench --device cuda --peers --time-limit 60 --out "$out/sweep" \
      >"$out/sweep.log" 2>&1
    record sweep $?
    grep -vE "^note:" "$out/sweep.log" | tail -60
  fi
fi

step "summary ($((SECONDS - started)) s in all; budget ${BUDGET_S} s)"
for name in build tests memcheck bench reports suite sweep; do
  if wants "$name"; then printf '%-10s %s\n' "$name" "${outcome[$name]:-not reached}"; fi
done | tee "$out/summary.txt"
if wants bench && [ -d "$results" ]; then
  # The target table from the JSON files the bench step wrote (the families it finished), written beside them.
  python3 -m leanops.benchmarks.targets "$results" --device cuda >"$out/targets.txt" 2>&1
  mkdir -p "$out/results"
  cp -r "$results" "$out/results/"
  echo "results: $results (copied to $out/results/$(basename "$results"))"
  echo
  cat "$out/targets.txt"  # last
fi
exit $status
