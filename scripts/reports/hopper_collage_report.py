"""Compiles the Collage AdamW Triton kernel (triton_kernels/collage.py) for Hopper (sm_90) without a GPU and prints,
as JSON, what its PTX and ptxas report: fused multiply-adds, correctly rounded divisions and square roots (against
approximate or flush-to-zero ones), 16-byte vector loads and stores, registers and spills.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter kernels cannot be compiled);
tests/collage/test_collage_triton_compile.py runs it and checks the report.
"""
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from leanops.triton_kernels import collage as kernels

from hopper_ptxas import ptxas_report

HOPPER = GPUTarget("cuda", 90, 32)
STORAGES = {"float16": 1, "bfloat16": 2}
SCALARS = ("neg_lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta2_hi", "beta2_lo", "eps",
           "weight_decay", "bias_correction1", "bias_correction2")
PTX_PATTERNS = {
    "fma": r"\bfma\.rn\.f32\b",
    "div_rn": r"\bdiv\.rn\.f32\b",
    "div_approximate": r"\bdiv\.(?:full|approx)\.",
    "sqrt_rn": r"\bsqrt\.rn\.f32\b",
    "sqrt_approximate": r"\b(?:sqrt\.approx|rsqrt\.approx)\.",
    "flush_to_zero": r"\.ftz\b",
    "vector_loads": r"ld\.global[.\w]*\.v4",
    "vector_stores": r"st\.global[.\w]*\.v4",
}


def count_ptx(kernel, signature: dict, constexprs: dict, aligned_pointers: tuple[int, ...], num_warps: int) -> dict:
    """Compile `kernel` for sm_90 (no FMA contraction) and count PTX_PATTERNS in its PTX, plus ptxas's registers and
    spills. `signature` gives the runtime arguments' types; `aligned_pointers` are the argument positions that
    Triton's launcher specialises as 16-byte aligned at run time (torch's buffers are)."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    attributes = {(position,): [["tt.divisibility", 16]] for position in aligned_pointers}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "enable_fp_fusion": False})
    if "cubin" not in compiled.asm:
        raise RuntimeError("no cubin")
    ptx = compiled.asm["ptx"]
    report = {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_PATTERNS.items()}
    report.update(ptxas_report(ptx))
    return report


def compile_case(storage: int, plus: bool, metrics: bool, aligned: bool) -> dict:
    signature = {"table_ptr": "*i64", "n_rows": "i32", "partials_ptr": "*fp64"}
    signature.update({name: "fp32" for name in SCALARS})
    constexprs = {"STORAGE": storage, "PLUS": plus, "METRICS": metrics, "ALIGNED": aligned,
                  "BLOCK_SIZE": kernels.BLOCK_SIZE_GPU}
    report = count_ptx(kernels._collage_adamw_kernel, signature, constexprs, (0, 2), kernels.NUM_WARPS_GPU)
    # Elements per thread, times two code paths (full chunks and the masked tail chunk).
    report["elements_per_thread_paths"] = 2 * kernels.BLOCK_SIZE_GPU // (32 * kernels.NUM_WARPS_GPU)
    return report


def cases():
    for dtype, storage in STORAGES.items():
        for mode, plus in (("light", False), ("plus", True)):
            yield f"{dtype}/{mode}/metrics/aligned", (storage, plus, True, True)
    yield "bfloat16/light/no_metrics/aligned", (2, False, False, True)
    yield "bfloat16/plus/metrics/unaligned", (2, True, True, False)


def main() -> int:
    report = {name: compile_case(*arguments) for name, arguments in cases()}
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
