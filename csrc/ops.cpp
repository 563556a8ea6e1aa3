// Every leanops operator schema, in one place. Kernels live in csrc/cpu/<family>.cpp (CPU) and
// csrc/cuda/<family>.cu (CUDA); fake (meta) kernels for torch.compile are registered from Python
// (python/leanops/custom_ops/).
#include <torch/library.h>

TORCH_LIBRARY(leanops, m) {
  // Multi-component float (MCF) arithmetic: python/leanops/mcf.py documents the math.
  m.def("two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)");
  m.def("fast_two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)");
  m.def("two_prod(Tensor a, Tensor b) -> (Tensor product, Tensor error)");
  m.def("grow(Tensor hi, Tensor lo, Tensor v) -> (Tensor hi_out, Tensor lo_out)");
  m.def("grow_(Tensor(a!) hi, Tensor(b!) lo, Tensor v) -> ()");
  m.def("scale(Tensor hi, Tensor lo, Tensor b_hi, Tensor b_lo) -> (Tensor hi_out, Tensor lo_out)");
  m.def("split(Tensor x, ScalarType dtype) -> (Tensor hi, Tensor lo)");
  m.def("merge(Tensor hi, Tensor lo) -> Tensor");
}
