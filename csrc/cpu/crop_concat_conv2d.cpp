// U-Net's crop + concat + convolution on the CPU, with neither the crop nor the
// concatenation materialized.
//
// A convolution is linear in its input channels:
//   conv(cat([crop, x]), W) = conv(crop, W[:, :Cs]) + conv(x, W[:, Cs:])
// so the forward runs ATen's convolution (oneDNN here) on the two zero-copy views - the crop
// is a view of the skip, the weight slices views of the weight - summed in place, with the
// bias in the first and the ReLU applied in place. The backward masks the gradient with the
// saved output (ReLU), runs the convolution backward once per source and writes the skip's
// gradient into its crop window (zeros elsewhere). Peak memory stays below eager's by the
// concatenation it never allocates (and its gradient).
//
// The file has no per-capability code (ATen's convolution dispatches itself); its kernels
// live in the DEFAULT build only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastseg/upsample_add_checks.h"

namespace fastseg::cpu {

#ifdef FASTSEG_CPU_DISPATCH_UNIT
namespace {

constexpr const char* kForward = "crop_concat_conv2d_forward";

struct Sources {
  at::Tensor crop;      // skip[:, :, oy:oy + H, ox:ox + W], a view
  at::Tensor w_skip;    // weight[:, :Cs], a view
  at::Tensor w_x;       // weight[:, Cs:], a view
  int64_t oy, ox;
};

Sources split(const char* op, const at::Tensor& skip, const at::Tensor& x, const at::Tensor& weight,
              int64_t padding, int64_t activation) {
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
  const int64_t oy = (skip.size(2) - x.size(2)) / 2, ox = (skip.size(3) - x.size(3)) / 2;
  const int64_t cs = skip.size(1);
  return {skip.narrow(2, oy, x.size(2)).narrow(3, ox, x.size(3)), weight.narrow(1, 0, cs),
          weight.narrow(1, cs, x.size(1)), oy, ox};
}

at::Tensor forward_cpu(const at::Tensor& skip, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t padding, int64_t activation) {
  const Sources s = split(kForward, skip, x, weight, padding, activation);
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kForward, ": bias must be (",
                      weight.size(0), ",), got ", bias->sizes());
  }
  // A source with no channels contributes nothing (and oneDNN would give 0 output channels).
  const bool use_skip = s.crop.size(1) > 0, use_x = x.size(1) > 0 || !use_skip;
  at::Tensor out = use_x ? at::conv2d(x, s.w_x, bias, 1, padding)
                         : at::conv2d(s.crop, s.w_skip, bias, 1, padding);
  if (use_x && use_skip) out.add_(at::conv2d(s.crop, s.w_skip, std::nullopt, 1, padding));
  if (activation == 1) out.relu_();
  // The memory format the fake implementation promises: x's (no copy when oneDNN agrees).
  return out.contiguous(output_memory_format(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& skip, const at::Tensor& x,
    const at::Tensor& weight, int64_t padding, int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_backward";
  const Sources s = split(op, skip, x, weight, padding, activation);
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), op, ": grad_output ", grad_output.sizes(),
                    " must match output ", output.sizes());
  // ReLU: the gradient passes where the output is positive (torch's threshold_backward).
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

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("crop_concat_conv2d_forward", &forward_cpu);
  m.impl("crop_concat_conv2d_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
