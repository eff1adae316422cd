// Every fastseg op schema, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; fake implementations and autograd live in fastseg/ops (Python).
#include <torch/library.h>

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

  // FCN decoder, bilinear form. x (N, C, Hi, Wi), skip None or (N, C, >= oy + Ho, >= ox + Wo),
  // any strides; scales = PyTorch's source-per-destination scale per axis (1 / scale_factor,
  // Hi / Ho, or (Hi - 1) / (Ho - 1) with align_corners). Returns (N, C, Ho, Wo) in x's memory
  // format (channels_last when x is channels_last-contiguous and not contiguous).
  m.def(
      "upsample_add_forward(Tensor x, Tensor? skip, int[2] skip_offset, int[2] output_size, "
      "float[2] scales, bool align_corners) -> Tensor");
  // Gradient for x only (a gather: no atomics), in grad_output's memory format.
  m.def(
      "upsample_add_backward(Tensor grad_output, int[2] input_size, float[2] scales, "
      "bool align_corners) -> Tensor");
  // FCN decoder, deconvolution form. weight (C, 1, kh, kw) contiguous; the depthwise
  // transposed convolution D (no padding) is cropped at `crop` to output_size, plus the skip
  // cropped at skip_offset. Returns (N, C, Ho, Wo) in x's memory format.
  m.def(
      "deconv_add_forward(Tensor x, Tensor weight, Tensor? skip, int[2] stride, int[2] crop, "
      "int[2] skip_offset, int[2] output_size) -> Tensor");
  // Returns (grad_x in x's memory format, grad_weight (C, 1, kh, kw) in weight's dtype);
  // grad_weight is summed in a fixed order (the CPU kernel gets both from one read of
  // grad_output, the CUDA kernel reads it once per gradient).
  m.def(
      "deconv_add_backward(Tensor grad_output, Tensor x, Tensor weight, int[2] stride, "
      "int[2] crop) -> (Tensor, Tensor)");
  // U-Net decoder: act(conv2d(cat([center_crop(skip), x], 1), weight, bias, padding)) without
  // materializing the crop or the concatenation. weight (Cout, Cskip + Cx, k, k), k in {1, 3},
  // padding in {0, 1}, activation 0 none / 1 relu. Returns (N, Cout, Ho, Wo) in x's memory
  // format.
  m.def(
      "crop_concat_conv2d_forward(Tensor skip, Tensor x, Tensor weight, Tensor? bias, int padding, "
      "int activation) -> Tensor");
  // Returns (grad_skip (zero outside the crop window), grad_x, grad_weight, grad_bias (Cout,));
  // the ReLU mask is read from `output`.
  m.def(
      "crop_concat_conv2d_backward(Tensor grad_output, Tensor output, Tensor skip, Tensor x, "
      "Tensor weight, int padding, int activation) -> (Tensor, Tensor, Tensor, Tensor)");
}
