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

#include "fastseg/crop_concat_conv2d.h"

namespace fastseg::cpu {

#ifdef FASTSEG_CPU_DISPATCH_UNIT
namespace {

at::Tensor forward_cpu(const at::Tensor& skip, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t padding, int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_forward";
  const ccc::Sources s = ccc::split(op, skip, x, weight, padding, activation);
  ccc::check_bias(op, bias, weight);
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
  return ccc::backward_on_views("crop_concat_conv2d_backward", grad_output, output, skip, x, weight,
                                padding, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("crop_concat_conv2d_forward", &forward_cpu);
  m.impl("crop_concat_conv2d_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
