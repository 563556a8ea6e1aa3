#!/usr/bin/env bash
# Configures and builds the CMake tree (CMakeLists.txt: the operator library leanops_ops against libtorch, and the C++
# unit tests) into build/cmake, then runs ctest. Exits nonzero on any failure.
#
#   PYTHON     the interpreter whose torch is built against (default python3): it gives torch's CMake prefix, and
#              ctest uses it to load the built library
#   BUILD_DIR  the build tree (default build/cmake, git-ignored)
#   JOBS       parallel build jobs (default 2: the CI machines have two cores)
# Further arguments go to the configure step, e.g. -DLEANOPS_BUILD_CUDA=OFF or -DCMAKE_CUDA_ARCHITECTURES=80.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
build_dir=${BUILD_DIR:-$repo_root/build/cmake}
jobs=${JOBS:-2}

if ! torch_prefix=$("$python" -c "import torch; print(torch.utils.cmake_prefix_path)"); then
  echo "cmake_check: cannot import torch with $python; set PYTHON to an interpreter that has torch" >&2
  exit 1
fi
python_path=$(command -v "$python")
# ctest runs from the build tree: a relative interpreter path (such as .venv/bin/python) must become absolute there.
# Not through realpath: a virtual environment's python is a symlink whose target is outside the environment.
case $python_path in
  /*) ;;
  *) python_path="$PWD/$python_path" ;;
esac

generator=()
# A build tree keeps the generator it was first configured with; only choose one for a fresh tree.
if [[ ! -f $build_dir/CMakeCache.txt ]] && command -v ninja >/dev/null; then
  generator=(-G Ninja)
fi

start=$SECONDS
cmake -S "$repo_root" -B "$build_dir" "${generator[@]}" \
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DLEANOPS_TEST_PYTHON="$python_path" "$@"
configured=$SECONDS
cmake --build "$build_dir" --parallel "$jobs"
built=$SECONDS
echo "cmake_check: configure $((configured - start)) s, build $((built - configured)) s"

ctest --test-dir "$build_dir" --output-on-failure
