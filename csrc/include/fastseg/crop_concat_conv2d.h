// U-Net's crop + concat + convolution (crop_concat_conv2d): what the CPU and the CUDA kernels
// share - the crop map (host and device), the argument checks of the C++ ops, the zero-copy
// views of the two sources, and the backward through ATen's convolution_backward on those
// views (oneDNN on the CPU, cuDNN on the GPU) for the problems a backend leaves to it.
//
// A convolution is linear in its input channels:
//   conv(cat([crop, x]), W) = conv(crop, W[:, :Cs]) + conv(x, W[:, Cs:])
// where crop = skip[:, :, oy:oy + H, ox:ox + W] is only an offset into the skip.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros_like.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "fastseg/upsample_add_checks.h"

namespace fastseg::ccc {

// The center-crop offset along one axis: floor((skip - x) / 2), as documented (odd
// differences leave the extra row / column at the far side).
C10_HOST_DEVICE inline int64_t center_crop_offset(int64_t skip_size, int64_t x_size) {
  return (skip_size - x_size) / 2;
}

// Output size along one axis of the stride-1 convolution (k 1 or 3, padding 0 or 1).
C10_HOST_DEVICE inline int64_t conv_output_size(int64_t in_size, int64_t k, int64_t padding) {
  return in_size + 2 * padding - k + 1;
}

struct Sources {
  at::Tensor crop;    // skip[:, :, oy:oy + H, ox:ox + W], a view
  at::Tensor w_skip;  // weight[:, :Cs], a view
  at::Tensor w_x;     // weight[:, Cs:], a view
  int64_t oy, ox;
};

// Checks the op's arguments (the Python layer gives friendlier messages first; these guard
// direct calls of the registered ops) and returns the zero-copy views.
inline Sources split(const char* op, const at::Tensor& skip, const at::Tensor& x,
                     const at::Tensor& weight, int64_t padding, int64_t activation) {
  check_scores(op, "skip", skip, x);
  check_scores(op, "weight", weight, x);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D, got ", x.sizes());
  TORCH_CHECK_VALUE(skip.size(0) == x.size(0) && skip.size(2) >= x.size(2) && skip.size(3) >= x.size(3),
                    op, ": skip ", skip.sizes(), " must have x's batch and at least its spatial size ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == skip.size(1) + x.size(1), op, ": weight ", weight.sizes(),
                    " must have skip + x = ", skip.size(1) + x.size(1), " input channels");
  const int64_t k = weight.size(2);
  TORCH_CHECK_VALUE(weight.size(3) == k && (k == 1 || k == 3), op, ": kernel must be 3x3 or 1x1, got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(padding == 0 || (padding == 1 && k == 3), op,
                    ": padding must be 0, or 1 with a 3x3 kernel, got ", padding);
  TORCH_CHECK_VALUE(activation == 0 || activation == 1, op, ": activation must be 0 or 1, got ",
                    activation);
  TORCH_CHECK_VALUE(std::min(x.size(2), x.size(3)) + 2 * padding >= k, op, ": x ", x.sizes(),
                    " is smaller than the kernel");
  const int64_t oy = center_crop_offset(skip.size(2), x.size(2));
  const int64_t ox = center_crop_offset(skip.size(3), x.size(3));
  const int64_t cs = skip.size(1);
  return {skip.narrow(2, oy, x.size(2)).narrow(3, ox, x.size(3)), weight.narrow(1, 0, cs),
          weight.narrow(1, cs, x.size(1)), oy, ox};
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (",
                    weight.size(0), ",), got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->device() == weight.device() && bias->scalar_type() == weight.scalar_type(), op,
                    ": bias must have the weight's dtype and device");
}

inline void check_grad(const char* op, const at::Tensor& grad_output, const at::Tensor& output) {
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), op, ": grad_output ", grad_output.sizes(),
                    " must match output ", output.sizes());
}

// The backward through ATen on the zero-copy views: the ReLU mask from the saved output
// (torch's threshold_backward), one convolution_backward per source, the crop window's
// gradient pasted into zeros. Returns (grad_skip, grad_x, grad_weight, grad_bias) in the
// layouts the fake implementation promises.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_on_views(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& skip,
    const at::Tensor& x, const at::Tensor& weight, int64_t padding, int64_t activation) {
  const Sources s = split(op, skip, x, weight, padding, activation);
  check_grad(op, grad_output, output);
  const at::Tensor grad = activation == 1 ? at::threshold_backward(grad_output, output, 0) : grad_output;
  const at::Tensor grad_bias = grad.sum({0, 2, 3});
  const std::vector<int64_t> stride{1, 1}, pad{padding, padding}, dilation{1, 1}, output_padding{0, 0};
  auto backward_of = [&](const at::Tensor& input, const at::Tensor& w) {
    return at::convolution_backward(grad, input, w, std::nullopt, stride, pad, dilation,
                                    /*transposed=*/false, output_padding, /*groups=*/1,
                                    {true, true, false});
  };
  at::Tensor grad_x = at::zeros_like(x), grad_w_x = at::zeros_like(s.w_x, at::MemoryFormat::Contiguous);
  if (x.size(1) > 0) std::tie(grad_x, grad_w_x, std::ignore) = backward_of(x, s.w_x);
  // at::zeros takes no memory format: empty in the skip's format, then zero.
  at::Tensor grad_skip =
      at::empty(skip.sizes(), skip.options().memory_format(output_memory_format(skip))).zero_();
  at::Tensor grad_w_skip = at::zeros_like(s.w_skip, at::MemoryFormat::Contiguous);
  if (s.crop.size(1) > 0) {
    auto [grad_crop, grad_ws, unused_s] = backward_of(s.crop, s.w_skip);
    grad_skip.narrow(2, s.oy, x.size(2)).narrow(3, s.ox, x.size(3)).copy_(grad_crop);
    grad_w_skip = grad_ws;
  }
  return {grad_skip, grad_x.contiguous(output_memory_format(x)),
          at::cat({grad_w_skip, grad_w_x}, 1).contiguous(), grad_bias};
}

}  // namespace fastseg::ccc
