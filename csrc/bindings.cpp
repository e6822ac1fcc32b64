// bindings.cpp — the Python module of the extension and the owner of the op namespace.
//
// The kernels are torch.library ops (torch.ops.mmkernels_cuda.*), registered when the shared
// library is loaded; the module itself exports nothing.  It exists so that `import
// mmkernels._C` (setup.py build) or torch.utils.cpp_extension.load(name="mmkernels_C") (JIT)
// loads the library — without pybind11, whose headers cost minutes of compile time.
//
// Each kernel family adds its ops with TORCH_LIBRARY_FRAGMENT(mmkernels_cuda, m) and its CUDA
// implementations with TORCH_LIBRARY_IMPL(mmkernels_cuda, CUDA, m) in its own .cpp.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mmkernels_cuda, m) { (void)m; }

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define MMK_CONCAT_(a, b) a##b
#define MMK_CONCAT(a, b) MMK_CONCAT_(a, b)
#define MMK_STR_(a) #a
#define MMK_STR(a) MMK_STR_(a)

extern "C" PyMODINIT_FUNC MMK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      MMK_STR(TORCH_EXTENSION_NAME),
      "mmkernels CUDA kernels; the ops are torch.ops.mmkernels_cuda.*",
      -1,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  return PyModule_Create(&module);
}
