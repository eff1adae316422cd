// Per-pixel arithmetic of the fused softmax cross-entropy, shared by the CPU and the CUDA
// kernel so that the CPU tests exercise exactly the formulas the GPU runs.
//
// For one pixel with logits x[0..C), target t, class weights w (all 1 without `weight`),
// W = sum_c w[c], smoothing eps and pixel weight pw, after the two passes over the classes
//   m = max_c x[c],  s = sum_c exp(x[c] - m),  lse = m + log(s)
//   nll    = w[t] * (lse - x[t])                 = w[t] * (log(s) - (x[t] - m))
//   smooth = -sum_c w[c] * (x[c] - lse)          = W * log(s) - sum_c w[c] * (x[c] - m)
//   loss   = pw * ((1 - eps) * nll + eps / C * smooth)          (torch's label smoothing)
// Working relative to m keeps every term small, so logits of +-1e4 lose nothing.
// The gradient with p[c] = exp((x[c] - m) - log(s)) (m and log(s) kept apart: folding them
// into one float lse would cost ulp(lse) relative error in every p) and the upstream scale g (grad_output, divided by
// sum(w[t] * pw) for reduction="mean") is
//   dloss/dx[c] = g * pw * (p[c] * ((1 - eps) * w[t] + eps / C * W)
//                           - eps / C * w[c] - [c == t] * (1 - eps) * w[t]).
// The T-templated helpers are also called with at::vec::Vectorized<float> on the CPU.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastseg {

// Reduction codes, as torch's at::Reduction.
enum CrossEntropyReduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

template <typename target_t>
C10_HOST_DEVICE inline bool ce_is_ignored(target_t t, int64_t ignore_index) {
  return static_cast<int64_t>(t) == ignore_index;
}

template <typename target_t>
C10_HOST_DEVICE inline bool ce_is_valid_class(target_t t, int64_t num_classes) {
  const int64_t v = static_cast<int64_t>(t);
  return v >= 0 && v < num_classes;
}

// Loss of one non-ignored pixel from the statistics of the two passes.
template <typename T>
C10_HOST_DEVICE inline T ce_pixel_loss(T log_sum, T target_minus_max, T weighted_sum_minus_max,
                                       T target_weight, T weight_total, T one_minus_eps,
                                       T eps_over_c, T pixel_weight) {
  const T nll = target_weight * (log_sum - target_minus_max);
  const T smooth = weight_total * log_sum - weighted_sum_minus_max;
  return pixel_weight * (one_minus_eps * nll + eps_over_c * smooth);
}

// Coefficient of p[c] in the gradient of one pixel, times the pixel's scale g * pw.
template <typename T>
C10_HOST_DEVICE inline T ce_softmax_scale(T target_weight, T weight_total, T one_minus_eps,
                                          T eps_over_c, T scale) {
  return scale * (one_minus_eps * target_weight + eps_over_c * weight_total);
}

// Gradient of class c without the target's one-hot term. smoothing_term is
// scale * eps / C * w[c] (zero without label smoothing: then this is one multiply).
template <typename T>
C10_HOST_DEVICE inline T ce_class_gradient(T p, T softmax_scale, T smoothing_term) {
  return p * softmax_scale - smoothing_term;
}

// What the target class subtracts on top of ce_class_gradient (computed in float32 or
// better before any rounding to the logits' dtype: near p = 1 the two terms cancel).
template <typename T>
C10_HOST_DEVICE inline T ce_target_gradient_term(T target_weight, T one_minus_eps, T scale) {
  return scale * one_minus_eps * target_weight;
}

}  // namespace fastseg
