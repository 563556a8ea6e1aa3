"""Compiles every MCF Triton kernel for Hopper (sm_90) without a GPU and prints, as JSON, what its PTX contains.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter kernels cannot be compiled);
tests/mcf/test_mcf_hopper_compile.py runs it and checks the counts.
"""
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from leanops.triton_kernels import mcf as kernels

HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPE = {0: "*fp32", 1: "*fp16", 2: "*i16"}  # float32, float16, bfloat16 (moved as int16 bit patterns)
STORAGES = {"float32": 0, "float16": 1, "bfloat16": 2}
PATTERNS = {"fma": r"\bfma\.rn\.f32", "vector_loads": r"ld\.global[.\w]*\.v4", "vector_stores": r"st\.global[.\w]*\.v4"}


def compile_for_hopper(kernel, pointers, storage, constexprs, float32_pointers=()) -> str:
    signature = {name: ("*fp32" if name in float32_pointers else POINTER_TYPE[storage]) for name in pointers}
    signature["n"] = "i32"
    constexprs = {"STORAGE": storage, "BLOCK_SIZE": 2048, **constexprs}
    signature.update({name: "constexpr" for name in constexprs})
    # What Triton's launcher specialises at run time for torch's 16-byte aligned buffers and n % 16 == 0.
    attributes = {(index,): [["tt.divisibility", 16]] for index in range(len(pointers) + 1)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": 8, "enable_fp_fusion": False})
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{kernel.__name__}: no cubin")
    return compiled.asm["ptx"]


def kernel_cases():
    binary = ["a_ptr", "b_ptr", "hi_ptr", "lo_ptr"]
    for dtype, storage in STORAGES.items():
        for op, code in (("two_sum", kernels._OP_TWO_SUM), ("fast_two_sum", kernels._OP_FAST_TWO_SUM),
                         ("two_prod", kernels._OP_TWO_PROD)):
            yield op, dtype, (kernels._binary_kernel, binary, storage, {"OP": code, "FUSED_FMA": True})
        yield "grow", dtype, (kernels._grow_kernel, ["hi_ptr", "lo_ptr", "v_ptr", "hi_out_ptr", "lo_out_ptr"],
                              storage, {})
        yield "scale", dtype, (kernels._scale_kernel,
                               ["hi_ptr", "lo_ptr", "b_hi_ptr", "b_lo_ptr", "hi_out_ptr", "lo_out_ptr"], storage,
                               {"B_HI_BROADCAST": True, "B_LO_BROADCAST": True, "FUSED_FMA": True})
        yield "split", dtype, (kernels._split_kernel, ["x_ptr", "hi_ptr", "lo_ptr"], storage, {}, ("x_ptr",))
        yield "merge", dtype, (kernels._merge_kernel, ["hi_ptr", "lo_ptr", "out_ptr"], storage, {}, ("out_ptr",))


def main() -> int:
    report = {}
    for op, dtype, arguments in kernel_cases():
        ptx = compile_for_hopper(*arguments)
        report[f"{op}/{dtype}"] = {name: len(re.findall(pattern, ptx)) for name, pattern in PATTERNS.items()}
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
