// Fused softmax cross-entropy on CUDA.
//
// One thread per pixel of the (B, C, S) logits view. With NCHW the class axis is strided
// by S and consecutive threads read consecutive pixels, so every class step is one
// coalesced load per warp; channels_last (class stride 1) reads each pixel's C values from
// one cache line run. The forward makes two passes over the pixel's classes (max, then
// exp-sum; the second pass hits L1/L2) and saves the per-pixel logsumexp in float32 as its
// two parts, max and log(sum) (their float sum would lose ulp(max) in every probability); the
// backward is one more pass that writes the gradient. Sums for "mean" / "sum" go through
// per-block partials reduced in a fixed order: no atomics, results repeat bit for bit, and
// nothing is synchronized with the host (the mean's denominator stays on the device).
//
// A target outside [0, C) that is not ignore_index never indexes memory: the pixel's loss
// and gradient become NaN and CUDA_KERNEL_ASSERT reports it at the next synchronization
// (as torch's own nll_loss does).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "fastseg/softmax_cross_entropy.h"

namespace fastseg::cuda {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
struct Options {
  const acc_t* weight;        // (C,) or nullptr
  const acc_t* pixel_weight;  // (B * S,) or nullptr
  const acc_t* weight_total;  // 1 value, sum(weight), read on the device; nullptr: C
  int64_t ignore_index;
  acc_t one_minus_eps;
  acc_t eps_over_c;
  bool smoothing;
};

template <typename acc_t>
__device__ inline acc_t total_class_weight(const Options<acc_t>& o, int64_t classes) {
  return o.weight_total ? *o.weight_total : static_cast<acc_t>(classes);
}

template <typename acc_t>
__device__ inline acc_t block_sum(acc_t value, acc_t* shared) {
  // Fixed-shape tree: the same order on every run.
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename target_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ input,  // (B, C, S) strided
    const target_t* __restrict__ target,  // (B * S,)
    scalar_t* __restrict__ loss,          // (B * S,) for reduction none, else nullptr
    acc_t* __restrict__ lse,              // (2, B * S): max, log(sum exp)
    acc_t* __restrict__ partials,         // (gridDim.x, 2): block sums of loss, weight
    int64_t classes, int64_t pixels, int64_t total_pixels, int64_t stride_b, int64_t stride_c,
    int64_t stride_s, Options<acc_t> o) {
  __shared__ acc_t shared[kThreads];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t pixel_loss = 0, pixel_weight = 0;
  if (i < total_pixels) {
    const int64_t b = i / pixels, s = i - b * pixels;
    const scalar_t* x = input + b * stride_b + s * stride_s;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < classes; ++c) m = fmaxf(m, static_cast<acc_t>(x[c * stride_c]));
    // NaN logits: fmaxf drops NaNs, so re-add them through the sum below.
    acc_t sum = 0, weighted = 0;
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t shifted = static_cast<acc_t>(x[c * stride_c]) - m;
      sum += expf(shifted);
      if (o.smoothing) weighted += (o.weight ? o.weight[c] : acc_t(1)) * shifted;
    }
    const acc_t log_sum = logf(sum);
    lse[i] = m;
    lse[total_pixels + i] = log_sum;
    const target_t t = target[i];
    if (!ce_is_ignored(t, o.ignore_index)) {
      if (ce_is_valid_class(t, classes)) {
        const acc_t pw = o.pixel_weight ? o.pixel_weight[i] : acc_t(1);
        const acc_t w_t = o.weight ? o.weight[static_cast<int64_t>(t)] : acc_t(1);
        const acc_t target_minus_max = static_cast<acc_t>(x[static_cast<int64_t>(t) * stride_c]) - m;
        pixel_loss = ce_pixel_loss<acc_t>(log_sum, target_minus_max, weighted, w_t,
                                          total_class_weight(o, classes),
                                          o.one_minus_eps, o.eps_over_c, pw);
        pixel_weight = w_t * pw;
      } else {
        CUDA_KERNEL_ASSERT(false && "softmax_cross_entropy: target out of [0, C) and not ignore_index");
        pixel_loss = std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
    if (loss != nullptr) loss[i] = static_cast<scalar_t>(pixel_loss);
  }
  if (loss == nullptr) {
    const acc_t block_loss = block_sum(pixel_loss, shared);
    const acc_t block_weight = block_sum(pixel_weight, shared);
    if (threadIdx.x == 0) {
      partials[2 * blockIdx.x] = block_loss;
      partials[2 * blockIdx.x + 1] = block_weight;
    }
  } else {
    const acc_t block_weight = block_sum(pixel_weight, shared);
    if (threadIdx.x == 0) {
      partials[2 * blockIdx.x] = 0;
      partials[2 * blockIdx.x + 1] = block_weight;
    }
  }
}

template <typename scalar_t, typename target_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ input,  // (B, C, S) strided
    const target_t* __restrict__ target,  // (B * S,)
    const acc_t* __restrict__ lse,        // (2, B * S): max, log(sum exp)
    const acc_t* __restrict__ grad_scale,  // (B * S,) for none, else (1,): g or g / total_weight
    scalar_t* __restrict__ grad,          // (B, C, S) strided like grad_input
    int64_t classes, int64_t pixels, int64_t total_pixels, int64_t stride_b, int64_t stride_c,
    int64_t stride_s, int64_t grad_stride_b, int64_t grad_stride_c, int64_t grad_stride_s,
    bool per_pixel_scale, Options<acc_t> o) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total_pixels) return;
  const int64_t b = i / pixels, s = i - b * pixels;
  const scalar_t* x = input + b * stride_b + s * stride_s;
  scalar_t* g = grad + b * grad_stride_b + s * grad_stride_s;
  const target_t t = target[i];
  const bool ignored = ce_is_ignored(t, o.ignore_index);
  const bool valid = !ignored && ce_is_valid_class(t, classes);
  const int64_t t_index = valid ? static_cast<int64_t>(t) : -1;
  const acc_t pw = o.pixel_weight ? o.pixel_weight[i] : acc_t(1);
  acc_t scale = ignored ? acc_t(0) : (per_pixel_scale ? grad_scale[i] : grad_scale[0]) * pw;
  if (!ignored && !valid) scale = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t w_t = valid && o.weight ? o.weight[t_index] : acc_t(1);
  const acc_t softmax_scale = ce_softmax_scale<acc_t>(w_t, total_class_weight(o, classes),
                                                      o.one_minus_eps, o.eps_over_c, scale);
  const acc_t pixel_max = lse[i], pixel_log_sum = lse[total_pixels + i];
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t p = expf((static_cast<acc_t>(x[c * stride_c]) - pixel_max) - pixel_log_sum);
    const acc_t smoothing_term = o.smoothing ? scale * o.eps_over_c * (o.weight ? o.weight[c] : acc_t(1)) : acc_t(0);
    acc_t value = ce_class_gradient<acc_t>(p, softmax_scale, smoothing_term);
    if (c == t_index) value -= ce_target_gradient_term<acc_t>(w_t, o.one_minus_eps, scale);
    g[c * grad_stride_c] = static_cast<scalar_t>(value);
  }
}

Options<float> make_options(const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pixel_weight,
                            const at::Tensor& weight_total, int64_t classes, int64_t ignore_index,
                            double label_smoothing) {
  return Options<float>{weight ? weight->const_data_ptr<float>() : nullptr,
                        pixel_weight ? pixel_weight->const_data_ptr<float>() : nullptr,
                        weight ? weight_total.const_data_ptr<float>() : nullptr,
                        ignore_index,
                        static_cast<float>(1.0 - label_smoothing),
                        static_cast<float>(label_smoothing / static_cast<double>(classes)),
                        label_smoothing > 0};
}

void check_cuda_inputs(const char* op, const at::Tensor& input, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& pixel_weight) {
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be (B, C, S), got ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0, op, ": input has no classes");
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == input.size(0) &&
                        target.size(1) == input.size(2) && target.is_contiguous(),
                    op, ": target must be a contiguous (B, S) tensor, got ", target.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kHalf ||
                       input.scalar_type() == at::kBFloat16,
                   op, " (CUDA): input must be float32, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kByte || target.scalar_type() == at::kInt ||
                       target.scalar_type() == at::kLong,
                   op, ": target must be uint8, int32 or int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == input.device(), op, ": target is on ", target.device(),
                    " but input is on ", input.device());
  if (weight) {
    TORCH_CHECK_VALUE(weight->device() == input.device() && weight->scalar_type() == at::kFloat &&
                          weight->is_contiguous() && weight->numel() == input.size(1),
                      op, ": weight must be a contiguous float32 (C,) tensor on ", input.device());
  }
  if (pixel_weight) {
    TORCH_CHECK_VALUE(pixel_weight->device() == input.device() &&
                          pixel_weight->scalar_type() == at::kFloat && pixel_weight->is_contiguous() &&
                          pixel_weight->sizes() == target.sizes(),
                      op, ": pixel_weight must be a contiguous float32 (B, S) tensor on ", input.device());
  }
}

// Float/half/bfloat16 logits x uint8/int32/int64 targets (float64 is served on the CPU).
#define FASTSEG_CE_TARGET_CASES(NAME, TARGET, ...)                                   \
  AT_DISPATCH_SWITCH((TARGET).scalar_type(), NAME,                                  \
                     AT_DISPATCH_CASE(at::kByte, [&] { __VA_ARGS__(logits_t, uint8_t); }) \
                     AT_DISPATCH_CASE(at::kInt, [&] { __VA_ARGS__(logits_t, int32_t); })  \
                     AT_DISPATCH_CASE(at::kLong, [&] { __VA_ARGS__(logits_t, int64_t); }))
#define FASTSEG_CE_LOGITS_CASE(TYPE, NAME, TARGET, ...) \
  AT_DISPATCH_CASE(TYPE, [&] {                         \
    using logits_t = scalar_t;                         \
    FASTSEG_CE_TARGET_CASES(NAME, TARGET, __VA_ARGS__); \
  })
#define FASTSEG_CE_CUDA_DISPATCH(INPUT, TARGET, NAME, ...)                       \
  AT_DISPATCH_SWITCH((INPUT).scalar_type(), NAME,                               \
                     FASTSEG_CE_LOGITS_CASE(at::kFloat, NAME, TARGET, __VA_ARGS__) \
                     FASTSEG_CE_LOGITS_CASE(at::kHalf, NAME, TARGET, __VA_ARGS__)  \
                     FASTSEG_CE_LOGITS_CASE(at::kBFloat16, NAME, TARGET, __VA_ARGS__))

int64_t grid_for(int64_t total_pixels) {
  const int64_t blocks = std::max<int64_t>(1, (total_pixels + kThreads - 1) / kThreads);
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "softmax_cross_entropy: too many pixels (",
                    total_pixels, ") for one launch");
  return blocks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pixel_weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing) {
  check_cuda_inputs("softmax_cross_entropy_forward", input, target, weight, pixel_weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t classes = input.size(1), pixels = input.size(2);
  const int64_t total_pixels = input.size(0) * pixels;
  const bool per_pixel = reduction == kReductionNone;
  auto lse = at::empty({2, target.size(0), target.size(1)}, input.options().dtype(at::kFloat));
  auto loss = per_pixel ? at::empty(target.sizes(), input.options()) : at::Tensor();
  const int64_t blocks = grid_for(total_pixels);
  auto partials = at::zeros({blocks, 2}, input.options().dtype(at::kFloat));
  const auto weight_total = weight ? weight->sum() : at::Tensor();
  const auto o = make_options(weight, pixel_weight, weight_total, classes, ignore_index, label_smoothing);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (total_pixels > 0) {
#define FASTSEG_LAUNCH(S, T)                                                                  \
  forward_kernel<S, T, float><<<blocks, kThreads, 0, stream>>>(                               \
      input.const_data_ptr<S>(), target.const_data_ptr<T>(),                                 \
      per_pixel ? loss.data_ptr<S>() : nullptr, lse.data_ptr<float>(),                        \
      partials.data_ptr<float>(), classes, pixels, total_pixels, input.stride(0),             \
      input.stride(1), input.stride(2), o)
    FASTSEG_CE_CUDA_DISPATCH(input, target, "softmax_cross_entropy_forward_cuda", FASTSEG_LAUNCH);
#undef FASTSEG_LAUNCH
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto sums = partials.sum(0);  // fixed-order reduction of the block partials
  if (!per_pixel) {
    loss = (reduction == kReductionMean ? sums[0] / sums[1] : sums[0]).to(input.scalar_type());
  }
  return {loss, lse, sums[1].clone()};
}

at::Tensor backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& target, const at::Tensor& lse,
                         const at::Tensor& total_weight, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pixel_weight, int64_t ignore_index,
                         int64_t reduction, double label_smoothing) {
  check_cuda_inputs("softmax_cross_entropy_backward", input, target, weight, pixel_weight);
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == 2 && lse.size(1) == target.size(0) &&
                        lse.size(2) == target.size(1) && lse.scalar_type() == at::kFloat &&
                        lse.is_contiguous() && lse.device() == input.device(),
                    "softmax_cross_entropy_backward: lse must be a contiguous float32 (2, B, S) tensor");
  TORCH_CHECK_VALUE(total_weight.numel() == 1 && total_weight.scalar_type() == at::kFloat,
                    "softmax_cross_entropy_backward: total_weight must be one float32 value");
  const bool per_pixel = reduction == kReductionNone;
  TORCH_CHECK_VALUE(per_pixel ? grad_output.sizes() == target.sizes() : grad_output.numel() == 1,
                    "softmax_cross_entropy_backward: grad_output has shape ", grad_output.sizes(),
                    per_pixel ? ", expected (B, S)" : ", expected one element");
  const c10::cuda::CUDAGuard guard(input.device());
  // The upstream scale on the device: per pixel for "none", g / total_weight for "mean".
  auto scale = grad_output.to(at::kFloat).contiguous();
  if (reduction == kReductionMean) scale = scale.reshape({1}) / total_weight.reshape({1});
  auto grad_input = at::empty_like(input);
  const int64_t classes = input.size(1), pixels = input.size(2);
  const int64_t total_pixels = input.size(0) * pixels;
  const auto weight_total = weight ? weight->sum() : at::Tensor();
  const auto o = make_options(weight, pixel_weight, weight_total, classes, ignore_index, label_smoothing);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (total_pixels > 0) {
#define FASTSEG_LAUNCH(S, T)                                                                   \
  backward_kernel<S, T, float><<<grid_for(total_pixels), kThreads, 0, stream>>>(               \
      input.const_data_ptr<S>(), target.const_data_ptr<T>(), lse.const_data_ptr<float>(),      \
      scale.const_data_ptr<float>(), grad_input.data_ptr<S>(), classes, pixels, total_pixels,  \
      input.stride(0), input.stride(1), input.stride(2), grad_input.stride(0),                 \
      grad_input.stride(1), grad_input.stride(2), per_pixel, o)
    FASTSEG_CE_CUDA_DISPATCH(input, target, "softmax_cross_entropy_backward_cuda", FASTSEG_LAUNCH);
#undef FASTSEG_LAUNCH
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("softmax_cross_entropy_forward", &forward_cuda);
  m.impl("softmax_cross_entropy_backward", &backward_cuda);
}

}  // namespace fastseg::cuda
