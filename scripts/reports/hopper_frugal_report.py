"""Compiles the FRUGAL split-step Triton kernel (triton_kernels/frugal.py) for Hopper (sm_90) without a GPU and
prints, as JSON, what its PTX and ptxas report (the counts of hopper_collage_report.py: fused multiply-adds,
correctly rounded divisions and square roots, flush-to-zero, vector loads and stores of 16 bytes (ld.global.v4) and
of 8 bytes (ld.global.v2.b32), registers and spills).

Every variant is compiled as the launcher runs it on torch's (16-byte aligned) buffers, ALIGNED: full chunks take
vector loads and stores of the contiguous streams; one variant is compiled unaligned (scalar accesses only).

Run as a script, in a process where TRITON_INTERPRET is unset; tests/frugal/test_frugal_triton_compile.py runs it and
checks it.
"""
import json
import sys

from leanops.triton_kernels import frugal as kernels

from hopper_collage_report import count_ptx

STORAGES = {"float32": 0, "float16": 1, "bfloat16": 2}
SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "free_lr")


def compile_case(storage: int, grad_storage: int, compensated: bool, rule: int, aligned: bool = True) -> dict:
    signature = {"table_ptr": "*i64", "scalars_ptr": "*fp32", "n_rows": "i32"}
    signature.update({name: "fp32" for name in SCALARS})
    constexprs = {"STORAGE": storage, "GRAD_STORAGE": grad_storage, "COMPENSATED": compensated, "RULE": rule,
                  "ALIGNED": aligned, "BLOCK_SIZE": kernels.BLOCK_SIZE_GPU}
    return count_ptx(kernels._frugal_split_step_kernel, signature, constexprs, (0, 1), kernels.NUM_WARPS_GPU)


def cases():
    for rule, name in ((0, "signsgd"), (1, "sgd"), (2, "none")):
        yield f"float32/float32/plain/{name}", (0, 0, False, rule)
    yield "bfloat16/bfloat16/plain/signsgd", (2, 2, False, 0)
    yield "bfloat16/bfloat16/compensated/signsgd", (2, 2, True, 0)
    yield "bfloat16/float32/compensated/sgd", (2, 0, True, 1)
    yield "float16/float16/compensated/signsgd", (1, 1, True, 0)
    yield "bfloat16/bfloat16/compensated/signsgd/unaligned", (2, 2, True, 0, False)


def main() -> int:
    json.dump({name: compile_case(*arguments) for name, arguments in cases()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
