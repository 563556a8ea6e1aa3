"""Compiles the CUDA providers of the loss primitives (csrc/cuda/contrastive.cu, csrc/cuda/cross_entropy.cu) for
Hopper (sm_90) without a GPU, with setup.py's flags, and prints as JSON, per family, what they are made of:

- "kernels": per kernel (its name and template argument, e.g. ``clip_backward_rows_kernel<__half>``) what ptxas
  reports: registers, spill stores and spill loads (bytes);
- "tensor_core_instructions": the mma / wmma / wgmma instructions of the PTX. The providers leave every heavy
  product to cuBLAS (leanops/contrastive_plan_host.h, leanops/cross_entropy_plan_host.h); their own kernels are
  elementwise steps and reductions, so none is expected;
- "wmma_in_sources": whether the .cu or a leanops header it includes (transitively) mentions WMMA or mma_sync;
- "gemm_operators": the ATen GEMM operators the object calls, from its undefined ``at::_ops::<op>::call`` symbols
  (mm, mm_out, mm_dtype, mm_dtype_out, addmm, addmm_out, addmm_dtype, addmm_dtype_out).

Run as a script: ``python scripts/reports/hopper_cuda_report.py [contrastive | cross_entropy]`` (both families
without an argument). tests/contrastive/test_contrastive_cuda_compile.py and
tests/cross_entropy/test_cross_entropy_cuda_compile.py run it and check the report. Needs nvcc and a CUDA build of
torch (for its headers), not a GPU.
"""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ("contrastive", "cross_entropy")
# setup.py's nvcc flags (keep the two lists in sync).
NVCC_FLAGS = ["-O3", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-Xcompiler",
              "-ffp-contract=off", "-Xcompiler", "-fvisibility=hidden", "-DLEANOPS_WITH_CUDA=1"]
GEMM_OPERATORS = {"mm", "mm_out", "mm_dtype", "mm_dtype_out", "addmm", "addmm_out", "addmm_dtype", "addmm_dtype_out"}
TENSOR_CORE_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?(w?mma|wgmma)\.", re.MULTILINE)
WMMA_MENTION = re.compile(r"wmma|mma_sync|mma\.sync", re.IGNORECASE)


def _cuda_home() -> str:
    """The toolkit's folder, as setup.py finds it (a wrapper script such as /usr/local/bin/nvcc would point torch at
    /usr/local)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise SystemExit("no CUDA toolkit (nvcc) found")
    return cpp_extension.CUDA_HOME


def _compile_command(source: str, output: str, keep_dir: str) -> list[str]:
    nvcc = os.path.join(_cuda_home(), "bin", "nvcc")
    import torch
    from torch.utils import cpp_extension
    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6: include_paths(cuda: bool)
        includes = cpp_extension.include_paths(cuda=True)
    includes = includes + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc", "include")]
    standard = "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([nvcc, "-c", source, "-o", output, standard,
             "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "--keep", "--keep-dir", keep_dir,
             "-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
            + NVCC_FLAGS + cpp_extension.COMMON_NVCC_FLAGS + [f"-I{path}" for path in includes])


def _kernel_name(mangled: str) -> str:
    """``clip_backward_rows_kernel<__half>`` for a mangled kernel symbol (the symbol itself without c++filt)."""
    if shutil.which("c++filt") is None:
        return mangled
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    match = re.search(r"(\w+)(<[^()]*>)?\(", demangled)
    return match.group(1) + (match.group(2) or "") if match else demangled


def _ptxas_kernels(output: str) -> dict:
    """{kernel: {"registers", "spill_stores", "spill_loads"}} from nvcc's -Xptxas -v output."""
    kernels = {}
    current = None
    for line in output.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)",
                                                                                  line)
        if entry:
            current = kernels.setdefault(_kernel_name(entry.group(1)), {})
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current is not None:
            current["spill_stores"], current["spill_loads"] = int(spills.group(1)), int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current is not None:
            current["registers"] = int(registers.group(1))
    return kernels


def _included_sources(path: str, seen: set) -> set:
    """`path` and every csrc/include/leanops header it includes, transitively."""
    if path in seen:
        return seen
    seen.add(path)
    with open(path) as handle:
        for header in re.findall(r'#include "(leanops/[^"]+)"', handle.read()):
            _included_sources(os.path.join(ROOT, "csrc", "include", header), seen)
    return seen


def report_family(family: str) -> dict:
    source = os.path.join(ROOT, "csrc", "cuda", f"{family}.cu")
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, f"{family}.o")
        result = subprocess.run(_compile_command(source, output, folder), capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"nvcc failed on {source}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
        ptx = ""
        for name in os.listdir(folder):
            if name.endswith(".ptx"):
                with open(os.path.join(folder, name)) as handle:
                    ptx += handle.read()
        symbols = subprocess.run(["nm", "-C", "--undefined-only", output], capture_output=True, text=True,
                                 check=True).stdout
    sources = sorted(_included_sources(source, set()))
    wmma = [os.path.relpath(path, ROOT) for path in sources if WMMA_MENTION.search(open(path).read())]
    operators = sorted(set(re.findall(r"at::_ops::(\w+)::call", symbols)) & GEMM_OPERATORS)
    return {"kernels": _ptxas_kernels(result.stdout + result.stderr),
            "tensor_core_instructions": len(TENSOR_CORE_INSTRUCTION.findall(ptx)),
            "ptx_bytes": len(ptx),
            "wmma_in_sources": wmma,
            "gemm_operators": operators}


def main(families: list[str]) -> int:
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; expected some of {list(FAMILIES)}")
    json.dump({family: report_family(family) for family in (families or FAMILIES)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
