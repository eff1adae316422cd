// Index and weight arithmetic of the fused FCN decoder ops (upsample_add, deconv_add),
// shared by the CPU and the CUDA kernels so that the CPU tests exercise exactly the maps the
// GPU uses.
//
// Bilinear (upsample_add) works per axis: output index d reads input taps i0 <= i1 = i0 + 1
// (or i0 at the last index) with weights w0 = 1 - l, w1 = l, exactly as PyTorch's
// upsample_bilinear2d computes them (area_pixel_compute_source_index, then the index is
// clamped to the input and l to [0, 1]; equal sizes copy). The backward is a gather: input
// index i receives from the contiguous run of output indices whose taps contain it, found by
// a binary search over the same monotonic tap map, so it is exact by construction.
//
// Deconvolution (deconv_add) per axis: the transposed convolution with stride s and kernel k
// (no padding) has D = (n - 1) * s + k outputs; output D-index Y receives input i at kernel
// tap p = Y - i * s for every i with 0 <= p < k.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastseg {

template <typename acc_t>
struct LinearTaps {
  int64_t i0, i1;
  acc_t w0, w1;
};

// The two input taps of output index `dst` along one axis. `scale` is PyTorch's
// source-per-destination ratio in the accumulation type.
template <typename acc_t>
C10_HOST_DEVICE inline LinearTaps<acc_t> linear_taps(acc_t scale, int64_t dst, int64_t in_size,
                                                     int64_t out_size, bool align_corners) {
  if (in_size == out_size) return {dst, dst, acc_t(1), acc_t(0)};
  acc_t src;
  if (align_corners) {
    src = scale * static_cast<acc_t>(dst);
  } else {
    src = scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5);
    if (src < acc_t(0)) src = acc_t(0);
  }
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  acc_t l = src - static_cast<acc_t>(i0);
  l = l < acc_t(0) ? acc_t(0) : (l > acc_t(1) ? acc_t(1) : l);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  return {i0, i1, acc_t(1) - l, l};
}

// Weight of input index i in output index dst's interpolation (0 when it is not a tap).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t linear_tap_weight(const LinearTaps<acc_t>& t, int64_t i) {
  return (t.i0 == i ? t.w0 : acc_t(0)) + (t.i1 == i ? t.w1 : acc_t(0));
}

// The output indices [*lo, *hi) whose taps contain input index i (empty when none: a
// downsampling can skip inputs). i0 and i1 never decrease with dst, so these are the first
// dst with i1 >= i and one past the last dst with i0 <= i.
template <typename acc_t>
C10_HOST_DEVICE inline void linear_tap_range(acc_t scale, int64_t i, int64_t in_size,
                                             int64_t out_size, bool align_corners, int64_t* lo,
                                             int64_t* hi) {
  int64_t a = 0, b = out_size;  // first dst in [a, b) with i1 >= i
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (linear_taps(scale, mid, in_size, out_size, align_corners).i1 >= i) b = mid; else a = mid + 1;
  }
  *lo = a;
  b = out_size;  // first dst in [a, b) with i0 > i
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (linear_taps(scale, mid, in_size, out_size, align_corners).i0 > i) b = mid; else a = mid + 1;
  }
  *hi = a;
}

// Inputs [*lo, *hi) that reach D-index Y (kernel taps p = Y - i * stride in [0, k)).
C10_HOST_DEVICE inline void deconv_input_range(int64_t Y, int64_t stride, int64_t k,
                                               int64_t in_size, int64_t* lo, int64_t* hi) {
  const int64_t first = Y - k + 1;  // smallest i * stride that reaches Y
  int64_t a = first <= 0 ? 0 : (first + stride - 1) / stride;
  int64_t b = Y / stride + 1;
  *lo = a;
  *hi = b < in_size ? b : in_size;
}

// Kernel taps [*lo, *hi) of input i whose D-index i * stride + p - crop lands in the
// cropped output [0, out_size).
C10_HOST_DEVICE inline void deconv_tap_range(int64_t i, int64_t stride, int64_t k, int64_t crop,
                                             int64_t out_size, int64_t* lo, int64_t* hi) {
  const int64_t start = i * stride - crop;  // output index of tap 0
  *lo = start < 0 ? -start : 0;
  const int64_t end = out_size - start;     // first tap past the output
  *hi = end < k ? end : k;
}

}  // namespace fastseg
