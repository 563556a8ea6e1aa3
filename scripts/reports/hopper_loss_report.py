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
from leanops.triton_kernels import tiles

from hopper_ptxas import ptxas_report

HOPPER = GPUTarget("cuda", 90, 32)
FEATURES = 512
CUDA = torch.device("cuda")
# Pointers in the inputs' dtype; every other pointer is float32 (or int64 for groups and targets).
FEATURE_POINTERS = {"x_ptr", "y_ptr", "anchor_ptr", "other_ptr", "hidden_ptr", "weight_ptr", "bias_ptr",
                    "grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"}
INDEX_POINTERS = {"groups_ptr", "targets_ptr"}
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
CE_OPTIONS = {"HAS_BIAS": True, "HAS_SOFTCAP": True}


def _contrastive_forward(dtype):
    return kernels.forward_tile_candidates(CUDA, dtype)


def _contrastive_backward(atomics):
    return lambda dtype: kernels.backward_tile_candidates(CUDA, dtype, FEATURES, atomics)


def _ce_forward(dtype):
    return ce_kernels.forward_tile_candidates(CUDA, dtype)


def _ce_backward(dtype):
    return ce_kernels.backward_tile_candidates(CUDA, dtype, FEATURES)


# Per kernel: (the kernel, the launchers' constexprs besides the tiles, the tile candidates for a dtype).
KERNELS = {
    "clip_forward": (kernels._clip_forward_kernel, {}, _contrastive_forward),
    "siglip_forward": (kernels._siglip_forward_kernel, {}, _contrastive_forward),
    "clip_backward": (kernels._clip_backward_kernel, {"OTHER_SIDE": False}, _contrastive_backward(False)),
    "clip_backward_atomic": (kernels._clip_backward_kernel, {"OTHER_SIDE": True}, _contrastive_backward(True)),
    "siglip_backward": (kernels._siglip_backward_kernel,
                        {"WEIGHT_ON_ANCHOR": True, "OTHER_SIDE": False, "REDUCE_SCALARS": True},
                        _contrastive_backward(False)),
    "siglip_backward_atomic": (kernels._siglip_backward_kernel,
                               {"WEIGHT_ON_ANCHOR": True, "OTHER_SIDE": True, "REDUCE_SCALARS": True},
                               _contrastive_backward(True)),
    "linear_ce_forward": (ce_kernels._linear_ce_forward_kernel, CE_OPTIONS, _ce_forward),
    "linear_ce_grad_hidden": (ce_kernels._linear_ce_grad_hidden_kernel, {**CE_OPTIONS, "SCALE_TILE": False},
                              _ce_backward),
    "linear_ce_grad_weight": (ce_kernels._linear_ce_grad_weight_kernel, {**CE_OPTIONS, "SCALE_TILE": False},
                              _ce_backward),
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
            signature[name] = "i32"  # B, N, V, D
    return signature


def compile_case(kernel, dtype, candidate, extra):
    constexprs = {"BLOCK_M": candidate.block_m, "BLOCK_N": candidate.block_n, "BLOCK_D": candidate.block_d,
                  "INPUT_PRECISION": tiles.input_precision(dtype), **extra}
    if "BLOCK_DOUT" in kernel.arg_names:
        constexprs["BLOCK_DOUT"] = candidate.block_dout
    signature = signature_of(kernel, dtype, constexprs)
    runtime = [name for name in kernel.arg_names if signature[name] != "constexpr"]
    # What Triton's launcher specialises at run time: 16-byte aligned buffers, and D = 512 divisible by 16.
    attributes = {(runtime.index(name),): [["tt.divisibility", 16]] for name in runtime
                  if name.endswith("_ptr") or name == "D"}
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
        # float16 differs from bfloat16 only where a kernel scales its tiles for float16's range (SCALE_TILE).
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if "SCALE_TILE" in extra else (torch.bfloat16,
                                                                                                 torch.float32)
        for dtype in dtypes:
            constants = {**extra, "SCALE_TILE": dtype == torch.float16} if "SCALE_TILE" in extra else extra
            for index, candidate in enumerate(candidates_for(dtype)):
                report[f"{name}/{str(dtype).removeprefix('torch.')}/{index}"] = compile_case(kernel, dtype,
                                                                                            candidate, constants)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
