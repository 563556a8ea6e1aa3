"""Builds leanops and its operator library leanops._C.

The C++ CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build and nvcc is found;
no GPU is needed to compile them. Environment:

  LEANOPS_BUILD_CUDA=0|1   force the CUDA kernels off, or on (an error if they cannot be built)
  TORCH_CUDA_ARCH_LIST     target architectures; with no GPU visible the default is Hopper, "9.0"
  LEANOPS_BUILD_STRICT=1   fail the install if the extension fails to compile (CI sets it); otherwise a failed
                           build installs the package without leanops._C, and the Triton and reference backends serve
  MAX_JOBS                 parallel compile jobs
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _locate_cuda_home():
    """torch guesses the toolkit from the directory above `nvcc` on PATH; a wrapper script such as
    /usr/local/bin/nvcc then points it at /usr/local, which holds no libcudart. Prefer the toolkit's own folder."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


def _extension_modules():
    """The extension modules to build, and the build_ext command class that builds them."""
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("leanops: torch is not installed in the build environment; building without leanops._C "
              "(install torch first and use pip's --no-build-isolation)", file=sys.stderr)
        return [], {}

    want_cuda = _env_flag("LEANOPS_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not cuda_possible:
        raise SystemExit("LEANOPS_BUILD_CUDA=1 but CUDA kernels cannot be built: "
                         f"torch.version.cuda={torch.version.cuda!r}, nvcc home={cpp_extension.CUDA_HOME!r}")
    with_cuda = cuda_possible if want_cuda is None else want_cuda
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: target Hopper, the machines we benchmark on

    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Exactness of the error-free transformations needs IEEE arithmetic as written: no FMA contraction, no
    # reassociation, no flush-to-zero (see csrc/include/leanops/eft.h).
    # -fvisibility=hidden: the module exports only PyInit__C (the operators register through static initialisers),
    # so calls between our inline functions stay direct instead of going through the PLT.
    # -fopenmp: at::parallel_for in our CPU kernels runs serially unless the extension itself is built with OpenMP
    # (torch's own parallel backend is OpenMP; the module then shares torch's libgomp and thread pool).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden", "-fopenmp",
                 f"-DLEANOPS_WITH_CUDA={int(with_cuda)}",
                 f'-DLEANOPS_BUILT_WITH_TORCH="{torch.__version__}"']
    nvcc_flags = ["-O3", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true",
                  "-Xcompiler", "-ffp-contract=off", "-Xcompiler", "-fvisibility=hidden", "-DLEANOPS_WITH_CUDA=1"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        cxx_flags.append(f'-DLEANOPS_CUDA_ARCH_LIST="{arch_list}"')
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extension = cpp_extension.CUDAExtension(
            "leanops._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        extension = cpp_extension.CppExtension(
            "leanops._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"])

    strict = _env_flag("LEANOPS_BUILD_STRICT") or False

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed compile is a warning, not a failed install, unless strict."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if strict:
                    raise
                print(f"leanops: WARNING: building leanops._C failed ({error}); installing without it. "
                      "Set LEANOPS_BUILD_STRICT=1 to make this an error.", file=sys.stderr)

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="leanops",
    version=VERSION,
    description="Memory-efficient training ops for PyTorch: blockwise contrastive losses, chunked linear "
                "cross-entropy, Collage multi-component-float arithmetic and optimizers",
    python_requires=">=3.10",
    package_dir={"": "python", "leanops.triton_kernels": "triton_kernels", "leanops.benchmarks": "benchmarks"},
    packages=(find_packages("python") + ["leanops.triton_kernels", "leanops.benchmarks"]
              + [f"leanops.benchmarks.{name}" for name in find_packages("benchmarks")]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "bench": ["matplotlib"],
        "test": ["pytest", "expecttest"],
    },
    entry_points={"console_scripts": ["leanops = leanops.cli:main"]},
    zip_safe=False,
)
