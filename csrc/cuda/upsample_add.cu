// FCN's bilinear upsampling + skip-add on CUDA (upsample_add_forward / _backward).
//
// Both kernels write a dense tensor in its memory format, seen as a (rows, cols) matrix whose
// element (r, j) sits at r * cols + j: for NCHW a row is one (n, c, y) line and a column one
// x; for channels_last a row is one (n, y) line and a column one (x, c) pair. Each thread owns
// one column (its x taps, or its x tap range and weights, are computed once, in registers) and
// walks a few rows; each row's share (y taps, base offsets, or the y tap range) is computed
// once per block into shared memory. Consecutive threads write consecutive addresses and read
// consecutive x (NCHW) or c (channels_last), so both common layouts are coalesced; any other
// strides are still served, only slower. Nothing is copied with .contiguous().
//
// Forward: out = wy0 * (wx0 * x00 + wx1 * x01) + wy1 * (wx0 * x10 + wx1 * x11) + skip, in the
// accumulation type, rounded once (PyTorch's formula; eager rounds the upsampled map first).
//
// Backward: a gather. Input pixel (i, j) sums wy(y, i) * wx(x, j) * G[y, x] over the output
// rows and columns whose taps contain it (linear_tap_range), rows outer, columns inner, in
// ascending order: no atomics, bit-for-bit repeatable. When a column's range fits in
// kMaxTaps its weights stay in registers across rows; otherwise they are recomputed inline
// (same values, same order, so the result does not depend on the path).
//
// All index and weight arithmetic is fastseg/upsample_add.h, shared with the CPU kernel; the
// (rows, cols) view, launch shape and index-type helpers are fastseg/cuda_decoder.cuh, shared
// with deconv_add.cu.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "fastseg/cuda_decoder.cuh"
#include "fastseg/upsample_add.h"
#include "fastseg/upsample_add_checks.h"

namespace fastseg::cuda {
namespace {

constexpr int kForwardRows = 4;   // rows per thread: 4 rows x 5 loads in flight
constexpr int kBackwardRows = 8;  // more rows amortize the column's tap-range search

// The weight of input `in_index` in output `out_index`'s taps along one axis (0 if none).
template <typename acc_t, typename index_t>
__device__ inline acc_t tap_weight(acc_t scale, index_t out_index, index_t in_size,
                                   index_t out_size, bool align_corners, index_t in_index) {
  return linear_tap_weight(
      linear_taps<acc_t>(scale, out_index, in_size, out_size, align_corners), in_index);
}

// wa * row[a] + wb * row[b] in the accumulation type: one row's share of a bilinear tap.
template <typename acc_t, typename scalar_t, typename index_t>
__device__ inline acc_t lerp2(acc_t wa, acc_t wb, const scalar_t* row, index_t a, index_t b) {
  return wa * static_cast<acc_t>(row[a]) + wb * static_cast<acc_t>(row[b]);
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x,     // (N, C, Hi, Wi), strides xs
    const scalar_t* __restrict__ skip,  // skip window origin (N, C, Ho, Wo), strides ss; or nullptr
    scalar_t* __restrict__ out,         // (rows, cols) dense, see the header comment
    Strides<index_t> xs, Strides<index_t> ss, index_t channels, index_t in_h, index_t in_w,
    index_t out_h, index_t out_w, index_t rows, index_t cols, bool channels_last,
    at::opmath_type<scalar_t> scale_h, at::opmath_type<scalar_t> scale_w, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTableRows = kMaxBlockRows * kForwardRows;
  __shared__ index_t row_x0[kTableRows], row_x1[kTableRows], row_skip[kTableRows];
  __shared__ acc_t row_w0[kTableRows], row_w1[kTableRows];

  const auto tile = row_tile<kForwardRows>(rows, out_h, channels, channels_last);
  if (tile.fills_table) {
    const auto t = linear_taps<acc_t>(scale_h, tile.h, in_h, out_h, align_corners);
    const index_t base = tile.n * xs.n + tile.c * xs.c;
    row_x0[tile.tid] = base + static_cast<index_t>(t.i0) * xs.h;
    row_x1[tile.tid] = base + static_cast<index_t>(t.i1) * xs.h;
    row_w0[tile.tid] = t.w0;
    row_w1[tile.tid] = t.w1;
    row_skip[tile.tid] = tile.n * ss.n + tile.c * ss.c + tile.h * ss.h;
  }
  __syncthreads();

  index_t col, ox, c;
  if (!thread_column(cols, channels, channels_last, &col, &ox, &c)) return;
  const auto t = linear_taps<acc_t>(scale_w, ox, in_w, out_w, align_corners);
  const index_t col_x0 = c * xs.c + static_cast<index_t>(t.i0) * xs.w;
  const index_t col_x1 = c * xs.c + static_cast<index_t>(t.i1) * xs.w;
  const index_t col_skip = c * ss.c + ox * ss.w;
#pragma unroll
  for (int k = 0; k < kForwardRows; ++k) {
    const auto [local, r] = tile_row(tile, k);
    if (r >= rows) break;  // rows only grow with k
    const acc_t top = lerp2(t.w0, t.w1, x + row_x0[local], col_x0, col_x1);
    const acc_t bottom = lerp2(t.w0, t.w1, x + row_x1[local], col_x0, col_x1);
    acc_t value = row_w0[local] * top + row_w1[local] * bottom;
    if (skip != nullptr) value += static_cast<acc_t>(skip[row_skip[local] + col_skip]);
    out[r * cols + col] = static_cast<scalar_t>(value);
  }
}

// Two blocks per SM: without the bound ptxas picks 64 registers and spills the int64 variant.
template <typename scalar_t, typename index_t, int kMaxTaps>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(
    const scalar_t* __restrict__ grad,  // (N, C, Ho, Wo), strides gs
    scalar_t* __restrict__ grad_x,      // (rows, cols) dense view of (N, C, Hi, Wi)
    Strides<index_t> gs, index_t channels, index_t in_h, index_t in_w, index_t out_h,
    index_t out_w, index_t rows, index_t cols, bool channels_last,
    at::opmath_type<scalar_t> scale_h, at::opmath_type<scalar_t> scale_w, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTableRows = kMaxBlockRows * kBackwardRows;
  __shared__ index_t row_g[kTableRows], row_i[kTableRows], row_lo[kTableRows], row_hi[kTableRows];

  const auto tile = row_tile<kBackwardRows>(rows, in_h, channels, channels_last);
  if (tile.fills_table) {
    int64_t lo, hi;
    linear_tap_range<acc_t>(scale_h, tile.h, in_h, out_h, align_corners, &lo, &hi);
    row_g[tile.tid] = tile.n * gs.n + tile.c * gs.c;
    row_i[tile.tid] = tile.h;
    row_lo[tile.tid] = static_cast<index_t>(lo);
    row_hi[tile.tid] = static_cast<index_t>(hi);
  }
  __syncthreads();

  index_t col, j, c;
  if (!thread_column(cols, channels, channels_last, &col, &j, &c)) return;
  int64_t x_lo, x_hi;
  linear_tap_range<acc_t>(scale_w, j, in_w, out_w, align_corners, &x_lo, &x_hi);
  const index_t first_x = static_cast<index_t>(x_lo);
  const index_t count_x = static_cast<index_t>(x_hi - x_lo);  // may be <= 0: no taps
  const bool in_registers = count_x <= kMaxTaps;
  acc_t wx[kMaxTaps];
#pragma unroll
  for (int k = 0; k < kMaxTaps; ++k) {
    wx[k] = in_registers && k < count_x
                ? tap_weight<acc_t, index_t>(scale_w, first_x + k, in_w, out_w, align_corners, j)
                : acc_t(0);
  }
  const index_t col_g = c * gs.c;

#pragma unroll 1  // rolled: the x weights already hold the registers
  for (int k = 0; k < kBackwardRows; ++k) {
    const auto [local, r] = tile_row(tile, k);
    if (r >= rows) break;
    const index_t i = row_i[local];
    const scalar_t* g_plane = grad + row_g[local] + col_g;
    acc_t sum = 0;
    for (index_t y = row_lo[local]; y < row_hi[local]; ++y) {
      const acc_t wy = tap_weight<acc_t, index_t>(scale_h, y, in_h, out_h, align_corners, i);
      const scalar_t* g = g_plane + y * gs.h;
      acc_t row_sum = 0;
      if (in_registers) {
        // A running pointer: kMaxTaps hoisted 64-bit offsets would spill.
        const scalar_t* gx = g + first_x * gs.w;
#pragma unroll
        for (int kx = 0; kx < kMaxTaps; ++kx) {
          if (kx < count_x) row_sum += wx[kx] * static_cast<acc_t>(*gx);
          gx += gs.w;
        }
      } else {
        for (index_t ox = first_x; ox < first_x + count_x; ++ox) {
          const acc_t w = tap_weight<acc_t, index_t>(scale_w, ox, in_w, out_w, align_corners, j);
          row_sum += w * static_cast<acc_t>(g[ox * gs.w]);
        }
      }
      sum += wy * row_sum;
    }
    grad_x[r * cols + col] = static_cast<scalar_t>(sum);
  }
}

// An upper bound of the number of outputs whose taps contain one input, along one axis:
// the sources of consecutive outputs are `scale` apart and a tap set spans 2 input units.
// Only chooses the register path; the kernel checks each column's actual count.
int64_t tap_count_bound(double scale, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return 1;
  if (!(scale * static_cast<double>(out_size) > 2.0)) return out_size;
  return std::min<int64_t>(out_size, static_cast<int64_t>(std::floor(2.0 / scale)) + 3);
}

at::Tensor forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                        at::IntArrayRef skip_offset, at::IntArrayRef output_size,
                        at::ArrayRef<double> scales, bool align_corners) {
  constexpr const char* op = "upsample_add_forward";
  check_decoder_inputs(op, x, skip, skip_offset, output_size);
  TORCH_CHECK_VALUE(scales.size() == 2, op, ": scales must be two values, got ", scales);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t channels = x.size(1), out_h = output_size[0], out_w = output_size[1];
  const ForwardResult res = forward_result(op, "output", x, skip, output_size, kForwardRows);
  if (res.tensor.numel() == 0) return res.tensor;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH_FLOATS(x.scalar_type(), "upsample_add_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* skip_origin = skip_window<scalar_t>(skip, skip_offset);
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, index_t><<<res.launch.grid, res.launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), skip_origin, res.tensor.mutable_data_ptr<scalar_t>(),
          strides_of<index_t>(x), strides_of<index_t>(skip), channels, x.size(2), x.size(3),
          out_h, out_w, res.rows, res.cols, res.channels_last, static_cast<acc_t>(scales[0]),
          static_cast<acc_t>(scales[1]), align_corners);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (res.wide) run(int64_t{0}); else run(int32_t{0});
  });
  return res.tensor;
}

at::Tensor backward_cuda(const at::Tensor& grad_output, at::IntArrayRef input_size,
                         at::ArrayRef<double> scales, bool align_corners) {
  constexpr const char* op = "upsample_add_backward";
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(2) > 0 && grad_output.size(3) > 0,
                    op, ": grad_output must be (N, C, Ho, Wo) with Ho, Wo > 0, got ",
                    grad_output.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_output.scalar_type()), op,
                   ": grad_output must be floating point, got ", grad_output.scalar_type());
  check_pair(op, "input_size", input_size, 1);
  TORCH_CHECK_VALUE(scales.size() == 2, op, ": scales must be two values, got ", scales);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t channels = grad_output.size(1);
  const int64_t out_h = grad_output.size(2), out_w = grad_output.size(3);
  const int64_t in_h = input_size[0], in_w = input_size[1];
  DenseResult res = dense_result(op, "output", grad_output, in_h, in_w, kBackwardRows);
  at::Tensor& grad_x = res.tensor;
  if (grad_x.numel() == 0) return grad_x;
  const bool wide = needs_64bit(grad_output) || needs_64bit(grad_x);
  const bool few_taps = tap_count_bound(scales[1], in_w, out_w) <= 4;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH_FLOATS(grad_output.scalar_type(), "upsample_add_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto index_zero, auto max_taps) {
      using index_t = decltype(index_zero);
      backward_kernel<scalar_t, index_t, decltype(max_taps)::value>
          <<<res.launch.grid, res.launch.block, 0, stream>>>(
              grad_output.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
              strides_of<index_t>(grad_output), channels, in_h, in_w, out_h, out_w, res.rows,
              res.cols, res.channels_last, static_cast<acc_t>(scales[0]),
              static_cast<acc_t>(scales[1]), align_corners);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // 4 taps: upsampling by <= 2 (FCN's skips); 16: by <= 8. Larger factors recompute inline.
    dispatch_index_variant<std::integral_constant<int, 4>, std::integral_constant<int, 16>>(
        wide, few_taps, run);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("upsample_add_forward", &forward_cuda);
  m.impl("upsample_add_backward", &backward_cuda);
}

}  // namespace fastseg::cuda
