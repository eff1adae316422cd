// How the CPU kernels of the FCN decoder ops walk a 4-D (N, C, H, W) tensor of any strides:
// as `planes` of rows of `cells`. In NCHW order a plane is one (n, c) image and a cell one
// value; in channels_last order a plane is one image n and a cell the C values of a pixel,
// so the innermost loop runs over the contiguous axis either way.
#pragma once

#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

namespace fastseg::cpu {

struct Strided4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
  Strided4() = default;
  explicit Strided4(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  // Offset of plane p (see above).
  int64_t plane(int64_t p, bool channels_last, int64_t channels) const {
    return channels_last ? p * n : (p / channels) * n + (p % channels) * c;
  }
};

struct PlaneOrder {
  bool channels_last;
  int64_t channels;  // C
  int64_t planes;    // N * C or N
  int64_t cell;      // values per cell: 1 or C
  PlaneOrder(bool cl, int64_t batch, int64_t c)
      : channels_last(cl), channels(c), planes(cl ? batch : batch * c), cell(cl ? c : 1) {}
  int64_t channel_of(int64_t plane) const { return channels_last ? 0 : plane % channels; }
};

// Rows per parallel task so that each task has at least ATen's grain of elements.
inline int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elements_per_row, 1));
}

// Calls f(strides...) with every stride as a compile-time 1 when they all are 1, so that the
// loops over the contiguous axis vectorize; else with the runtime values (any strides).
template <typename F, typename... Strides>
inline void with_unit_strides(F&& f, Strides... strides) {
  if (((strides == 1) && ...)) {
    f(((void)strides, std::integral_constant<int64_t, 1>{})...);
  } else {
    f(strides...);
  }
}

}  // namespace fastseg::cpu
