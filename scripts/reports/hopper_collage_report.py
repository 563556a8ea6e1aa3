"""Compiles the Collage AdamW step kernels for Hopper (sm_90) without a GPU and prints, as JSON, what their code holds.

``python hopper_collage_report.py`` (or ``triton``): the Triton kernel (triton_kernels/collage.py), each variant
(storage, mode, telemetry, alignment): what its PTX and ptxas report (fused multiply-adds, correctly rounded divisions
and square roots against approximate or flush-to-zero ones, 16-byte vector loads and stores, registers and spills)
and, for aligned variants, its SASS instructions per element on the full-chunk path (hopper_ptxas.per_element:
"static" and "hot", which leaves out the inline stubs of the IEEE division / square root slow paths; and
packed_arithmetic: the packed 16-bit instructions that compute the arithmetic in F, none of them a contracted
multiply-add).

``python hopper_collage_report.py cuda``: the CUDA kernel (csrc/cuda/collage.cu) compiled by nvcc for sm_90 with
setup.py's flags, each instantiation of collage_step_kernel: SASS instructions per element of its vector loop, the
loop's 16-byte loads and stores and packed 16-bit arithmetic, registers and spills (ptxas -v); or {"unavailable":
reason} without nvcc or torch's C++ headers.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter kernels cannot be compiled);
tests/collage/test_collage_triton_compile.py and tests/collage/test_collage_sass.py run it and check the reports.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from leanops.triton_kernels import collage as kernels

from hopper_ptxas import per_element, ptxas_report, sass_functions, vector_loop, vector_path

HOPPER = GPUTarget("cuda", 90, 32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    "vector_loads_8": r"ld\.global[.\w]*\.v2\.b32",
    "vector_stores_8": r"st\.global[.\w]*\.v2\.b32",
}


PACKED = re.compile(r"^(?:@!?U?P\w+\s+)?(HADD2|HMUL2|HFMA2)((?:\.[A-Z0-9_]+)*)\s+(.*)$")


def packed_arithmetic(instructions: list, region: tuple) -> dict:
    """The packed 16-bit arithmetic of `region` (HADD2 / HMUL2 / HFMA2 on two bfloat16 or float16 lanes, widenings
    HADD2.F32 and immediate moves HFMA2 -RZ, RZ, ... aside): "packed", how many; "packed_fma", how many of them are a
    multiply-add that is not an exact rewrite of one operation (ptxas writes an add or a sub as HFMA2 a, 1, 1, b and
    a mul as HFMA2 a, b, -RZ; a contracted a * b + c would be rounded once, not as the F operations the kernels
    compute: the double-rounding equivalence does not cover it)."""
    first, last = region
    counts = {"packed": 0, "packed_fma": 0}
    for address, instruction in instructions:
        match = PACKED.match(instruction)
        if not first <= address <= last or match is None:
            continue
        name, modifiers, operands = match.groups()
        operands = [operand.strip() for operand in operands.replace(".reuse", "").split(",")]
        if ".F32" in modifiers or operands[1:3] == ["-RZ", "RZ"]:
            continue  # a widening to float32, or an immediate moved into a register
        counts["packed"] += 1
        if name == "HFMA2" and operands[2:4] != ["1", "1"] and operands[-1] != "-RZ":
            counts["packed_fma"] += 1
    return counts


def compile_for_hopper(kernel, signature: dict, constexprs: dict, aligned_pointers: tuple[int, ...],
                       num_warps: int):
    """`kernel` compiled for sm_90 (no FMA contraction). `signature` gives the runtime arguments' types;
    `aligned_pointers` are the argument positions that Triton's launcher specialises as 16-byte aligned at run time
    (torch's buffers are)."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    attributes = {(position,): [["tt.divisibility", 16]] for position in aligned_pointers}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "enable_fp_fusion": False})
    if "cubin" not in compiled.asm:
        raise RuntimeError("no cubin")
    return compiled


def ptx_counts(compiled) -> dict:
    """PTX_PATTERNS counted in the PTX, plus ptxas's registers and spills."""
    ptx = compiled.asm["ptx"]
    report = {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_PATTERNS.items()}
    report.update(ptxas_report(ptx))
    return report


def count_ptx(kernel, signature: dict, constexprs: dict, aligned_pointers: tuple[int, ...], num_warps: int) -> dict:
    """Compile `kernel` for sm_90 and count PTX_PATTERNS in its PTX, plus ptxas's registers and spills."""
    return ptx_counts(compile_for_hopper(kernel, signature, constexprs, aligned_pointers, num_warps))


def compile_case(storage: int, plus: bool, metrics: bool, aligned: bool) -> dict:
    signature = {"table_ptr": "*i64", "n_rows": "i32", "partials_ptr": "*fp64"}
    signature.update({name: "fp32" for name in SCALARS})
    constexprs = {"STORAGE": storage, "PLUS": plus, "METRICS": metrics, "ALIGNED": aligned,
                  "BLOCK_SIZE": kernels.BLOCK_SIZE_GPU, "NATIVE": True}
    compiled = compile_for_hopper(kernels._collage_adamw_kernel, signature, constexprs, (0, 2),
                                  kernels.NUM_WARPS_GPU)
    report = ptx_counts(compiled)
    elements_per_thread = kernels.BLOCK_SIZE_GPU // (32 * kernels.NUM_WARPS_GPU)
    # Elements per thread, times the code paths: full chunks and the masked tail chunk when aligned, the masked path
    # alone when not.
    report["elements_per_thread_paths"] = (2 if aligned else 1) * elements_per_thread
    if aligned:
        (instructions,) = sass_functions(compiled.asm["cubin"]).values()
        path = vector_path(instructions)
        report["sass"] = {**per_element(instructions, path, elements_per_thread),
                          **packed_arithmetic(instructions, path)}
    return report


def cases():
    for dtype, storage in STORAGES.items():
        for mode, plus in (("light", False), ("plus", True)):
            for telemetry, metrics in (("no_metrics", False), ("metrics", True)):
                yield f"{dtype}/{mode}/{telemetry}/aligned", (storage, plus, metrics, True)
    yield "bfloat16/plus/metrics/unaligned", (2, True, True, False)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernel.

# setup.py's nvcc flags (IEEE arithmetic as written), C++20 for torch's headers.
NVCC_FLAGS = ["-O3", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++20",
              "-DLEANOPS_WITH_CUDA=1", "-Xcompiler", "-ffp-contract=off"]
PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
STORED_OPERANDS = {False: 4, True: 5}  # theta, theta_lo, m, v (+ v_lo in plus mode)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def ptxas_resources(output: str) -> dict:
    """{mangled kernel name: {"registers", "spill_stores", "spill_loads", "stack"}} from nvcc -Xptxas -v."""
    resources, current = {}, None
    for line in output.splitlines():
        match = PTXAS_FUNCTION.search(line)
        if match:
            current = resources.setdefault(match.group(1), {})
            continue
        if current is None:
            continue
        match = PTXAS_SPILLS.search(line)
        if match:
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        match = PTXAS_REGISTERS.search(line)
        if match:
            current["registers"] = int(match.group(1))
    return resources


def cuda_variant(name: str) -> str | None:
    """"bfloat16/plus/no_metrics" for collage_step_kernel<BFloat16Storage, true, false> (from the mangled name)."""
    match = re.search(r"collage_step_kernelINS\d+_(\d+)(\w+?)StorageELb([01])ELb([01])E", name)
    if match is None:
        return None
    dtype = {"BFloat16": "bfloat16", "Float16": "float16"}[match.group(2)]
    return f"{dtype}/{'plus' if match.group(3) == '1' else 'light'}/" \
           f"{'metrics' if match.group(4) == '1' else 'no_metrics'}"


def cuda_report() -> dict:
    nvcc = find_nvcc()
    if nvcc is None:
        return {"unavailable": "nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)"}
    try:
        from torch.utils import cpp_extension

        includes = cpp_extension.include_paths()
    except Exception as error:  # noqa: BLE001 - any failure means no headers to compile against
        return {"unavailable": f"torch's C++ headers: {error}"}
    includes = [os.path.join(ROOT, "csrc", "include"), *includes, sysconfig.get_paths()["include"]]
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "collage.cubin")
        command = [nvcc, "-arch=sm_90", "-cubin", "-Xptxas", "-v", *NVCC_FLAGS,
                   *[f"-I{path}" for path in includes], os.path.join(ROOT, "csrc", "cuda", "collage.cu"), "-o", cubin]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{result.stderr[-4000:]}")
        with open(cubin, "rb") as handle:
            functions = sass_functions(handle.read())
    resources = ptxas_resources(result.stdout + result.stderr)
    report = {}
    for name, instructions in functions.items():
        variant = cuda_variant(name)
        if variant is None:
            continue
        plus = "/plus/" in variant
        loop = vector_loop(instructions)
        stores = per_element(instructions, loop, 1)["vector_stores"]
        if stores == 0 or stores % STORED_OPERANDS[plus]:
            raise RuntimeError(f"{variant}: {stores} 16-byte stores in the vector loop, not whole vectors")
        elements = 8 * stores // STORED_OPERANDS[plus]  # eight 16-bit values per 16-byte store of each operand
        sass = {**per_element(instructions, loop, elements), **packed_arithmetic(instructions, loop)}
        report[variant] = {"sass": sass, "elements_per_iteration": elements, **resources.get(name, {})}
    return report


def main(arguments: list[str]) -> int:
    if arguments in ([], ["triton"]):
        report = {name: compile_case(*case) for name, case in cases()}
    elif arguments == ["cuda"]:
        report = cuda_report()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} [triton | cuda]")
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
