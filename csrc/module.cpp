// The Python module of each extension (fastseg._C: the op schemas and the CPU kernels;
// fastseg._C_cuda: the CUDA kernels). A plain extension module: importing it runs the static
// registrations of the files linked with it. No pybind11 needed. TORCH_EXTENSION_NAME is the
// module's name, set by torch's extension builder.
#include <Python.h>

#define FASTSEG_CONCAT_(a, b) a##b
#define FASTSEG_CONCAT(a, b) FASTSEG_CONCAT_(a, b)
#define FASTSEG_STRING_(a) #a
#define FASTSEG_STRING(a) FASTSEG_STRING_(a)

PyMODINIT_FUNC FASTSEG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, FASTSEG_STRING(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
