"""Builds leanops and its operator library leanops._C.

The C++ CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build and nvcc is found;
no GPU is needed to compile them. Environment:

  LEANOPS_BUILD_CUDA=0|1   force the CUDA kernels off, or on (an error if they cannot be built)
  TORCH_CUDA_ARCH_LIST     target architectures; with no GPU visible the default is Hopper, "9.0"
  LEANOPS_BUILD_STRICT=0   install without leanops._C when it fails to compile (the Triton and reference backends
                           serve), with a warning; by default (1) a failed compile fails the install: an install
                           never reports success with kernels that cannot load
  MAX_JOBS                 parallel compile jobs

leanops._C links the torch it is compiled against and loads only beside that same torch. `pip install .` with
pip's build isolation compiles in a temporary environment: the build requirement is then the torch installed in
the environment being installed into (`torch==<its version>`, from setup_requires below, which setuptools hands to
pip), so the kernels match it; a build that would compile against another torch stops with what to do instead.
`pip install --no-build-isolation .` (scripts/setup.sh, CI) compiles against the installed torch directly.
"""
import glob
import importlib.metadata
import os
import sys
import sysconfig

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


# setup.py commands that need torch (pip's PEP 517 hooks run dist_info for the metadata, then bdist_wheel or
# editable_wheel; "egg_info" is the hook that only asks for the build requirements, when torch need not be
# importable yet).
BUILD_COMMANDS = {"dist_info", "bdist_wheel", "editable_wheel", "build", "build_ext", "install", "develop", "bdist_egg"}
FIX = ("leanops compiles its kernels against the torch of the environment it is installed into. Install torch "
       "there first (pip install torch==2.13.0 for the CPU build, torch==2.14.1 for the CUDA 13.0 build), then "
       "build leanops against it:\n"
       "    pip install --no-build-isolation .        (or -e . for an editable install)")


def _target_site_dirs() -> list[str]:
    """The site-packages of the environment being installed into: this interpreter's own. (Under pip's build
    isolation sys.path holds a temporary environment instead; sysconfig still names the interpreter's.)"""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(os.path.realpath(paths[key]) for key in ("purelib", "platlib")))


def _installed_torch(paths: list[str] | None) -> tuple[str, str] | None:
    """(version, folder) of the torch distribution found in `paths` (None: on sys.path), read from its metadata
    without importing it; None if there is none."""
    for distribution in importlib.metadata.distributions(name="torch", **({} if paths is None else {"path": paths})):
        return distribution.version, os.path.realpath(str(distribution.locate_file("")))
    return None


def _build_requirements() -> list[str]:
    """The torch to compile against: the one installed in the target environment, exactly (pip installs it into
    its isolated build environment through setuptools' get_requires_for_build_wheel); any torch if there is
    none, and install_requires then pins the one compiled against."""
    target = _installed_torch(_target_site_dirs())
    return [f"torch=={target[0]}"] if target else ["torch>=2.4"]


def _check_build_torch() -> str:
    """Stop a build that would compile against a torch other than the target environment's (pip's build isolation
    with a different torch): the kernels would not load there. Returns the install requirement on torch."""
    target_dirs = _target_site_dirs()
    target = _installed_torch(target_dirs)
    building = _installed_torch(None)
    isolated = building is not None and building[1] not in target_dirs
    if target is not None and building is not None and target[0] != building[0]:
        raise SystemExit(
            f"leanops: this build would compile leanops._C against torch {building[0]} (in {building[1]}), but the "
            f"environment it installs into has torch {target[0]} (in {target[1]}): the kernels would not load "
            f"there.\n{FIX}")
    if isolated and target is None:
        # Nothing installed to match: the environment must get the torch the kernels are compiled against.
        return f"torch=={building[0]}"
    return "torch>=2.4"


def _extension_modules():
    """The extension modules to build, the build_ext command class that builds them, and the install requirement
    on torch."""
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if BUILD_COMMANDS & set(sys.argv[1:]):
            raise SystemExit(f"leanops: torch is not importable in the build environment ({error}).\n{FIX}")
        return [], {}, "torch>=2.4"  # only the build requirements are asked for (pip's get_requires hook)
    torch_requirement = _check_build_torch()

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

    strict = _env_flag("LEANOPS_BUILD_STRICT") is not False  # strict unless LEANOPS_BUILD_STRICT=0

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed compile is a warning, not a failed install, unless strict."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if strict:
                    raise
                print(f"leanops: WARNING: building leanops._C failed ({error}); installing without it, as "
                      "LEANOPS_BUILD_STRICT=0 asks (the cpu and cuda backends will be unavailable).",
                      file=sys.stderr)

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, torch_requirement


ext_modules, cmdclass, torch_requirement = _extension_modules()

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
    # The build requirements beyond pyproject.toml's: the target environment's own torch (see the docstring).
    setup_requires=_build_requirements(),
    install_requires=[torch_requirement, "numpy"],
    extras_require={
        "triton": ["triton"],
        "bench": ["matplotlib"],
        "test": ["pytest", "expecttest"],
    },
    entry_points={"console_scripts": ["leanops = leanops.cli:main"]},
    zip_safe=False,
)
