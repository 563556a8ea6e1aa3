"""The Collage AdamW step kernels' SASS for Hopper (sm_90), compiled without a GPU: instructions per element, spills
and 16-byte memory accesses of the Triton kernel (triton_kernels/collage.py) and of the CUDA kernel
(csrc/cuda/collage.cu), from scripts/reports/hopper_collage_report.py; and the CUDA kernel's step, two elements at a
time (csrc/include/leanops/collage_cuda.cuh), compiled for the host against collage.h's: the same bits.

Instructions per element (scripts/reports/hopper_ptxas.py, per_element): the SASS of the code that steps a full,
aligned chunk (the CUDA kernel's vector loop; the Triton kernel's full-chunk path), divided by the elements it steps
per thread. "hot" leaves out the inline stubs that call the out-of-line slow paths of IEEE division and square root
(run only for zero, infinite, denormal or extreme operands); "static" counts them too. Without telemetry, hot/static:

                          before (issue 14)     packed conversions     now: packed arithmetic in F
    CUDA    bf16 light    108.2 / 127.4         85.3 / 104.4           68.8 / 87.4
            bf16 plus     167.0 / 187.2         124.4 / 144.2          81.4 / 100.6
            fp16 light    100.2 / 118.0         89.2 / 108.6           68.8 / 87.6
            fp16 plus     157.2 / 177.6         138.3 / 158.1          81.4 / 100.9
    Triton  bf16 light    143.1 / 164.8         87.0 / 106.8           71.0 / 90.6
            bf16 plus     258.5 / 280.3         126.2 / 146.0          86.2 / 105.9
            fp16 light    70.6 / 92.5           71.6 / 91.1            72.4 / 91.9
            fp16 plus     91.4 / 113.0          95.9 / 115.5           86.5 / 106.1

(the Triton "before" leaves out the pointer arithmetic the old kernel did ahead of its branch, about 1.3 per element.)
The issue's targets are 90 (light) and 120 (plus); every variant is within them. With the arithmetic in F as a float32
operation followed by a rounding, bfloat16 plus (both kernels) and the CUDA kernel's float16 plus stayed above 120
(per element, 27 F operations of two instructions each at best, on top of the float32 expressions, the three divisions
and the square root). Now each F operation is one packed 16-bit instruction for two elements (add.rn / sub.rn /
mul.rn on bf16x2 or f16x2; csrc/include/leanops/collage_cuda.cuh, triton_kernels/collage.py's pair path), the same
bits by the double-rounding theorem, which tests/collage/test_collage_packed_rounding.py checks. The Triton kernel's
float16 full chunks had been under the targets since LLVM computes most of their F arithmetic in float16x2
instructions by itself (one value per element); they now take the pair path too (plus 95.9 -> 86.5, light 71.6 ->
72.4), and test_arithmetic_in_f_is_packed_and_never_contracted counts one packed instruction per F operation and two
elements in every variant.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]  # compiles the kernels for sm_90 in subprocesses (~30 s)

from helpers import REPORTS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(REPORTS))  # the repository (REPORTS is scripts/reports)
LIGHT, PLUS = 90, 120  # the targets, hot instructions per element


def _toolchain_reason() -> str | None:
    """Why the sm_90 compile reports cannot run here (None when they can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as error:  # noqa: BLE001 - any failure: no Triton sm_90 toolchain
        return f"Triton cannot compile for sm_90 here: {error}"
    if not ptxas or not os.path.exists(ptxas):
        return "Triton's ptxas is missing"
    sys.path.insert(0, REPORTS)
    try:
        from hopper_ptxas import cuobjdump_path

        cuobjdump_path()
    except FileNotFoundError as error:
        return str(error)
    finally:
        sys.path.remove(REPORTS)
    return None


@pytest.fixture(scope="module")
def reports():
    """{"triton": report, "cuda": report}: both report scripts, run at once (the CUDA compile takes ~30 s)."""
    reason = _toolchain_reason()
    if reason is not None:
        pytest.skip(reason)
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(REPORTS, "hopper_collage_report.py")
    processes = {kind: subprocess.Popen([sys.executable, script, kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=environment) for kind in ("triton", "cuda")}
    results = {}
    for kind, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{kind} report: {stderr[-4000:]}"
        results[kind] = json.loads(stdout)
    return results


def _variants(report: dict, kind: str) -> dict:
    """{"bfloat16/light/no_metrics": counts, ...} of the aligned variants of one kernel."""
    if kind == "cuda":
        return report
    return {name.removesuffix("/aligned"): counts for name, counts in report.items() if name.endswith("/aligned")}


def _bound(variant: str) -> float:
    return PLUS if variant.split("/")[1] == "plus" else LIGHT


@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_instructions_per_element_within_bounds(reports, kind):
    report = reports[kind]
    if "unavailable" in report:
        pytest.skip(f"the CUDA kernel cannot be compiled here: {report['unavailable']}")
    variants = _variants(report, kind)
    assert len(variants) == 8, sorted(variants)  # two storages, light and plus, with and without telemetry
    for variant, counts in variants.items():
        if variant.endswith("/no_metrics"):
            assert counts["sass"]["hot"] <= _bound(variant), f"{kind} {variant}: {counts['sass']}"


# Operations in F of two F values per element (collage_cuda.cuh): grow of the parameter pair (10); in plus mode also
# scale's cross terms and renormalisation (7) and grow of the second moment (10).
F_OPERATIONS = {"light": 10, "plus": 27}


@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_arithmetic_in_f_is_packed_and_never_contracted(reports, kind):
    """Every operation in F is one packed 16-bit instruction for two elements (add.rn / sub.rn / mul.rn on bf16x2 or
    f16x2: the same bits as the float32 operation then the rounding, tests/collage/test_collage_packed_rounding.py),
    and none is a contracted multiply-add (rounded once where the F operations round twice)."""
    report = reports[kind]
    if "unavailable" in report:
        pytest.skip(f"the CUDA kernel cannot be compiled here: {report['unavailable']}")
    for variant, counts in _variants(report, kind).items():
        assert counts["sass"]["packed_fma"] == 0, f"{kind} {variant}: {counts['sass']}"
        mode = variant.split("/")[1]
        # Elements per thread of the code counted: the CUDA kernel's loop iteration, the Triton kernel's full chunk.
        elements = counts["elements_per_iteration"] if kind == "cuda" else counts["elements_per_thread_paths"] // 2
        assert counts["sass"]["packed"] == F_OPERATIONS[mode] * elements // 2, f"{kind} {variant}: {counts['sass']}"


@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_no_spills_and_16_byte_accesses(reports, kind):
    report = reports[kind]
    if "unavailable" in report:
        pytest.skip(f"the CUDA kernel cannot be compiled here: {report['unavailable']}")
    for variant, counts in _variants(report, kind).items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{kind} {variant}: {counts}"
        plus = "/plus/" in variant
        # Loads: param, param_lo, m, v, grad (+ v_lo); stores: param, param_lo, m, v (+ v_lo); each 16 bytes a thread
        # (per vector of the CUDA kernel's loop, which steps elements_per_iteration / 8 vectors).
        vectors = counts.get("elements_per_iteration", 8) // 8
        assert counts["sass"]["vector_loads"] == (6 if plus else 5) * vectors, f"{kind} {variant}: {counts}"
        assert counts["sass"]["vector_stores"] == (5 if plus else 4) * vectors, f"{kind} {variant}: {counts}"


# ---------------------------------------------------------------------------------------------------------------
# collage_cuda.cuh's step_pair against collage.h's step, on the host: there, step_pair's conversions fall back to
# collage.h's own and its packed arithmetic in F (add / sub / mul of two words) to collage.h's float32 operation
# then rounding, so what differs would be the transcription of the math (an operation missing, moved or added). That
# the packed instructions the device takes instead give those bits: tests/collage/test_collage_packed_rounding.py.

HOST_PROGRAM = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>

#include "leanops/collage_cuda.cuh"

using namespace leanops;
using namespace collage;  // (spelled so: tests/test_registry.py looks for namespace strings)

template <typename W>
float value_of(uint32_t bits) { return W::widen(bits & 0xFFFFu).lo; }

template <typename W>
uint32_t bits_of(float x) { return W::word(pairs::Lanes{x, 0.0f}) & 0xFFFFu; }

bool same(float a, float b) { return (a != a && b != b) || eft::float_bits(a) == eft::float_bits(b); }

// A storage value: any bit pattern (NaN, infinities and denormals included) or one of the magnitudes that matter.
template <typename W>
uint32_t draw(std::mt19937& rng, bool any, float scale) {
  if (any) return rng() & 0xFFFFu;
  std::uniform_real_distribution<float> exponent(-12.0f, 2.0f);
  const float x = std::pow(10.0f, exponent(rng)) * scale * ((rng() & 1) ? 1.0f : -1.0f);
  return bits_of<W>(W::Format::round(x));
}

template <typename W, bool Plus>
long check(std::mt19937& rng, const Scalars& s, int trials) {
  using F = typename W::Format;
  long failures = 0;
  for (int t = 0; t < trials; ++t) {
    const bool any = t % 4 == 0;
    uint32_t e[2][6];  // per lane: theta, theta_lo, m, v, v_lo, g
    for (int lane = 0; lane < 2; ++lane) {
      for (int k = 0; k < 6; ++k) e[lane][k] = draw<W>(rng, any, k == 1 || k == 4 ? 1e-3f : 1.0f);
      if (!any) e[lane][3] = bits_of<W>(std::fabs(value_of<W>(e[lane][3])));
    }
    auto word = [&](int k) { return e[0][k] | (e[1][k] << 16); };
    pairs::Words words{word(0), word(1), word(2), word(3), Plus ? word(4) : 0u};
    const pairs::Outcomes outcomes = pairs::step_pair<W, Plus>(words, word(5), s);
    const uint32_t after[5] = {words.theta, words.theta_lo, words.m, words.v, words.v_lo};
    for (int lane = 0; lane < 2; ++lane) {
      float theta = value_of<W>(e[lane][0]), theta_lo = value_of<W>(e[lane][1]), m = value_of<W>(e[lane][2]);
      float v = value_of<W>(e[lane][3]), v_lo = Plus ? value_of<W>(e[lane][4]) : 0.0f;
      const Outcome outcome = step<F, Plus>(theta, theta_lo, m, v, v_lo, value_of<W>(e[lane][5]), s);
      const float expected[5] = {theta, theta_lo, m, v, v_lo};
      bool ok = same(outcome.stored, lane ? outcomes.stored.hi : outcomes.stored.lo) &&
                same(outcome.delta, lane ? outcomes.delta.hi : outcomes.delta.lo);
      for (int k = 0; k < (Plus ? 5 : 4); ++k) ok = ok && same(expected[k], value_of<W>(after[k] >> (16 * lane)));
      if (!ok && failures++ < 5) std::printf("mismatch: plus %d, trial %d, lane %d\n", int(Plus), t, lane);
    }
  }
  return failures;
}

template <typename F>
Scalars scalars(double beta1, double beta2, double weight_decay, int step) {
  Scalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.beta2_hi = F::round(static_cast<float>(beta2));
  s.beta2_lo = F::round(static_cast<float>(beta2 - static_cast<double>(s.beta2_hi)));
  s.eps = 1e-8f;
  s.weight_decay = static_cast<float>(weight_decay);
  s.neg_lr = -1e-3f;
  s.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, step));
  s.bias_correction2 = static_cast<float>(1.0 - std::pow(beta2, step));
  return s;
}

int main() {
  std::mt19937 rng(14);
  long failures = 0;
  for (int step : {1, 10, 1000}) {
    for (double weight_decay : {0.0, 0.1}) {
      const Scalars bf = scalars<eft::BFloat16Format>(0.9, 0.999, weight_decay, step);
      const Scalars hf = scalars<eft::Float16Format>(0.9, 0.999, weight_decay, step);
      failures += check<pairs::BFloat16Words, false>(rng, bf, 20000);
      failures += check<pairs::BFloat16Words, true>(rng, bf, 20000);
      failures += check<pairs::Float16Words, false>(rng, hf, 20000);
      failures += check<pairs::Float16Words, true>(rng, hf, 20000);
    }
  }
  std::printf("%ld mismatches\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_cuda_pair_step_is_collage_h_step_on_the_host():
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler (c++, g++, clang++) on PATH")
    with tempfile.TemporaryDirectory() as folder:
        source, program = os.path.join(folder, "pairs.cpp"), os.path.join(folder, "pairs")
        with open(source, "w") as handle:
            handle.write(HOST_PROGRAM)
        # -ffp-contract=off: IEEE arithmetic as written, as setup.py compiles the host side.
        build = subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math",
                                f"-I{os.path.join(ROOT, 'csrc', 'include')}", source, "-o", program],
                               capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-4000:]
        result = subprocess.run([program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
