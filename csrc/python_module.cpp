// The Python module leanops._C: importing it loads the operator library (ops.cpp and the kernels) into the process.
// Its one function reports how it was built, for `leanops info`.
#include <Python.h>

#ifndef LEANOPS_WITH_CUDA
#define LEANOPS_WITH_CUDA 0
#endif
#ifndef LEANOPS_CUDA_ARCH_LIST
#define LEANOPS_CUDA_ARCH_LIST ""
#endif
#ifndef LEANOPS_BUILT_WITH_TORCH
#define LEANOPS_BUILT_WITH_TORCH ""
#endif

static PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  return Py_BuildValue("{s:O,s:s,s:s}", "cuda", LEANOPS_WITH_CUDA ? Py_True : Py_False, "cuda_arch_list",
                       LEANOPS_CUDA_ARCH_LIST, "torch", LEANOPS_BUILT_WITH_TORCH);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How leanops._C was built: CUDA kernels, target architectures, torch."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "leanops operator library", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
