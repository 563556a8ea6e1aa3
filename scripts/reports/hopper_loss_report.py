"""Compiles the loss kernels (contrastive and linear cross-entropy) for Hopper (sm_90) without a GPU, for every tile
candidate the launchers may pick (triton_kernels/contrastive.py, triton_kernels/cross_entropy.py), and prints, as
JSON, what ptxas reports: registers, spill bytes, shared memory, and how many wgmma (Hopper tensor-core)
instructions the PTX holds.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter kernels cannot be compiled):
``python scripts/reports/hopper_loss_report.py [contrastive | cross_entropy]`` (both families without an argument);
tests/contrastive/test_contrastive_hopper_compile.py and tests/cross_entropy/test_cross_entropy_hopper_compile.py run
it and check the report. D = 512 (D % 16 == 0: the case the tiles are made for).
"""
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from leanops.triton_kernels import contrastive as kernels
from leanops.triton_kernels import cross_entropy as ce_kernels
from leanops.triton_kernels import gemm
from leanops.triton_kernels import tiles

from hopper_ptxas import ptxas_report

HOPPER = GPUTarget("cuda", 90, 32)
FEATURES = 512
CUDA = torch.device("cuda")
# Pointers in the inputs' dtype; every other pointer is float32 (or int64 for groups and targets), unless a case
# says otherwise (the GEMM's output).
FEATURE_POINTERS = {"x_ptr", "y_ptr", "hidden_ptr", "weight_ptr", "bias_ptr", "g_ptr", "a_ptr", "b_ptr"}
INDEX_POINTERS = {"groups_ptr", "targets_ptr"}
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
CE_OPTIONS = {"HAS_BIAS": True, "HAS_SOFTCAP": True}
# The GEMM's operands as the plans call it: A row-major (G Y, G W) or transposed (G^T X, G^T h: A's rows are
# columns of G), B and C row-major. Strides equal to 1 are specialised by Triton's launcher (constexpr 1).
MATMUL = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "ACCUMULATE": True}
MATMUL_TRANSPOSED_A = {"stride_am": 1, "stride_bn": 1, "stride_cn": 1, "ACCUMULATE": True}


def _forward(module):
    return lambda dtype: module.forward_tile_candidates(CUDA, dtype)


def _backward(module):
    return lambda dtype: module.backward_tile_candidates(CUDA, dtype)


def _matmul(dtype):
    return (gemm.matmul_tiles(CUDA, dtype),)


# Per kernel: (the kernel, the launchers' constexprs besides the tiles, the tile candidates for a dtype).
KERNELS = {
    "clip_forward": (kernels._clip_forward_kernel, {}, _forward(kernels)),
    "siglip_forward": (kernels._siglip_forward_kernel, {}, _forward(kernels)),
    "clip_gradient_panel": (kernels._clip_gradient_panel_kernel, {}, _backward(kernels)),
    "siglip_gradient_panel": (kernels._siglip_gradient_panel_kernel, {}, _backward(kernels)),
    "contrastive_matmul": (gemm._matmul_kernel, MATMUL, _matmul),
    "contrastive_matmul_transposed_a": (gemm._matmul_kernel, MATMUL_TRANSPOSED_A, _matmul),
    "linear_ce_forward": (ce_kernels._linear_ce_forward_kernel, CE_OPTIONS, _forward(ce_kernels)),
    "linear_ce_gradient_chunk": (ce_kernels._linear_ce_gradient_chunk_kernel, CE_OPTIONS, _backward(ce_kernels)),
    "linear_ce_matmul": (gemm._matmul_kernel, MATMUL, _matmul),
    "linear_ce_matmul_transposed_a": (gemm._matmul_kernel, MATMUL_TRANSPOSED_A, _matmul),
}


# The kernels of each family.
FAMILIES = {"contrastive": [name for name in KERNELS if not name.startswith("linear_ce_")],
            "cross_entropy": [name for name in KERNELS if name.startswith("linear_ce_")]}


def signature_of(kernel, dtype, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FEATURE_POINTERS:
            signature[name] = TRITON_TYPES[dtype]
        elif name in INDEX_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name == "softcap":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"  # sizes, offsets, strides
    return signature


def compile_case(kernel, dtype, candidate, extra):
    constexprs = {"BLOCK_M": candidate.block_m, "BLOCK_N": candidate.block_n,
                  "INPUT_PRECISION": tiles.input_precision(dtype), **extra}
    constexprs["BLOCK_K" if "BLOCK_K" in kernel.arg_names else "BLOCK_D"] = candidate.block_d
    signature = signature_of(kernel, dtype, constexprs)
    runtime = [name for name in kernel.arg_names if signature[name] != "constexpr"]
    # What Triton's launcher specialises at run time: 16-byte aligned buffers, and D = 512, the row strides of the
    # G panels and of the GEMM operands divisible by 16 (the launchers pad them so).
    attributes = {(runtime.index(name),): [["tt.divisibility", 16]] for name in runtime
                  if name.endswith("_ptr") or name in ("D", "g_stride") or name.startswith("stride_")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=HOPPER,
                              options={"num_warps": candidate.num_warps, "num_stages": candidate.num_stages})
    report = ptxas_report(compiled.asm["ptx"])
    report["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", compiled.asm["ptx"]))
    report["shared_bytes"] = compiled.metadata.shared
    return report


def main(families: list[str]) -> int:
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; expected some of {sorted(FAMILIES)}")
    names = [name for family in (families or FAMILIES) for name in FAMILIES[family]]
    report = {}
    for name in names:
        kernel, extra, candidates_for = KERNELS[name]
        # float16 compiles like bfloat16 (the kernels treat them alike; float16's scaling happens outside).
        for dtype in (torch.bfloat16, torch.float32):
            for index, candidate in enumerate(candidates_for(dtype)):
                report[f"{name}/{str(dtype).removeprefix('torch.')}/{index}"] = compile_case(kernel, dtype,
                                                                                            candidate, extra)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
