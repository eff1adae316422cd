// Every fastseg op schema, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; fake implementations and autograd live in fastseg/ops (Python).
#include <Python.h>
#include <torch/library.h>


// fastseg._C is a plain extension module: importing it runs the static registrations below
// and in the kernel files. No pybind11 needed.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastseg, m) {
  // input (B, C, S) any strides; target (B, S) contiguous integer; weight (C,) float32;
  // pixel_weight (B, S) float32; reduction 0 none / 1 mean / 2 sum.
  // Returns (loss, lse (2, B, S) = per-pixel max and log(sum exp) in float32 (float64 for
  // float64 logits), total_weight 0-d = sum of weight[target] * pixel_weight over kept pixels).
  m.def(
      "softmax_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pixel_weight, int ignore_index, int reduction, float label_smoothing) "
      "-> (Tensor, Tensor, Tensor)");
  // grad_output (B, S) for reduction none, 0-d otherwise. Returns grad_input like input.
  m.def(
      "softmax_cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, "
      "Tensor lse, Tensor total_weight, Tensor? weight, Tensor? pixel_weight, "
      "int ignore_index, int reduction, float label_smoothing) -> Tensor");
}
