// FCN's per-class deconvolution + crop + skip-add on CUDA (deconv_add_forward / _backward).
//
// D = conv_transpose2d(x, weight, stride, groups=C) (no padding); out = D[crop window] + skip.
// Forward and grad_x write a dense tensor in its memory format, seen as a (rows, cols) matrix
// (element (r, j) at r * cols + j): for NCHW a row is one (n, c, y) line and a column one x;
// for channels_last a row is one (n, y) line and a column one (x, c) pair. A thread owns one
// column (its input / tap range along W, computed once) and walks a few rows whose ranges
// along H are computed once per block into shared memory. Consecutive threads write
// consecutive addresses and read consecutive x (NCHW) or c (channels_last); other strides
// are served in place, only slower.
//
// Forward: each output gathers the ceil(k/s)^2 inputs that reach it (4 for FCN's k = 2s; that
// case is unrolled) times their kernel taps; weights are read through the read-only cache (in
// NCHW a warp shares one class, so a weight load is one or two lines).
//
// Backward, grad_x: input (i, j) gathers w[p, q] * G[i*sh + p - cy, j*sw + q - cx] over the
// taps inside the crop (deconv_tap_range), p outer, q inner.
// Backward, grad_weight: one thread per (class, tap) - a group of threads per tap when the
// kernel has few taps - sums x * G over a fixed chunk of (n, i) rows; a group's partial sums
// are added in group order in shared memory, each block writes its partials to a float32
// buffer, and a second kernel adds the chunks in chunk order. The chunk count depends only on
// the shapes: no atomics, no host sync, the same bits on every run and every GPU.
// (grad_output is read once by each of the two backward kernels.)
//
// Index arithmetic (input and tap ranges) is fastseg/upsample_add.h, shared with the CPU kernel;
// the (rows, cols) view, launch shape and index-type helpers are fastseg/cuda_decoder.cuh,
// shared with upsample_add.cu.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>

#include "fastseg/cuda_decoder.cuh"
#include "fastseg/upsample_add.h"
#include "fastseg/upsample_add_checks.h"

namespace fastseg::cuda {
namespace {

constexpr int kRowsPerThread = 4;
constexpr int kTableRows = kMaxBlockRows * kRowsPerThread;
// Blocks of the grad_weight reduction over all classes and taps (a fixed number, so that the
// summation order depends on the shapes only).
constexpr int64_t kWeightBlocks = 1024;

// The deconvolution's geometry (small values: int).
struct Geometry {
  int stride_h, stride_w, k_h, k_w, crop_h, crop_w;
};

// w_row[w_i - j * sw] * x_i[j * xs.w] in the accumulation type: input (i, j) times its tap,
// where w_i is the weight index of row i's tap at j = 0 (see forward_kernel).
template <typename acc_t, typename scalar_t, typename index_t>
__device__ inline acc_t tap_product(const scalar_t* w_row, int w_i, const scalar_t* x_i, int j,
                                    int stride_w, index_t x_stride) {
  return static_cast<acc_t>(w_row[w_i - j * stride_w]) * static_cast<acc_t>(x_i[j * x_stride]);
}

// kTaps > 0: at most kTaps inputs per axis reach an output (unrolled); 0: any number.
template <typename scalar_t, typename index_t, int kTaps>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x,       // (N, C, Hi, Wi), strides xs
    const scalar_t* __restrict__ weight,  // (C, kh, kw) contiguous
    const scalar_t* __restrict__ skip,    // skip window origin (N, C, Ho, Wo), strides ss; or nullptr
    scalar_t* __restrict__ out,           // (rows, cols) dense, see the header comment
    Strides<index_t> xs, Strides<index_t> ss, index_t channels, index_t in_h, index_t in_w,
    index_t out_h, index_t rows, index_t cols, bool channels_last, Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ index_t row_x[kTableRows], row_skip[kTableRows];
  __shared__ int row_w[kTableRows], row_y[kTableRows], row_lo[kTableRows], row_hi[kTableRows];

  const auto tile = row_tile<kRowsPerThread>(rows, out_h, channels, channels_last);
  if (tile.fills_table) {
    const int64_t full_y = tile.h + geo.crop_h;  // the row in the uncropped deconvolution
    int64_t lo, hi;
    deconv_input_range(full_y, geo.stride_h, geo.k_h, in_h, &lo, &hi);
    row_x[tile.tid] = tile.n * xs.n + tile.c * xs.c;
    row_skip[tile.tid] = tile.n * ss.n + tile.c * ss.c + tile.h * ss.h;
    row_w[tile.tid] = static_cast<int>(tile.c) * geo.k_h * geo.k_w;
    row_y[tile.tid] = static_cast<int>(full_y);
    row_lo[tile.tid] = static_cast<int>(lo);
    row_hi[tile.tid] = static_cast<int>(hi);
  }
  __syncthreads();

  index_t col, ox, c;
  if (!thread_column(cols, channels, channels_last, &col, &ox, &c)) return;
  const int full_x = static_cast<int>(ox) + geo.crop_w;
  int64_t j_lo64, j_hi64;
  deconv_input_range(full_x, geo.stride_w, geo.k_w, in_w, &j_lo64, &j_hi64);
  const int j_lo = static_cast<int>(j_lo64), j_hi = static_cast<int>(j_hi64);
  const scalar_t* x_col = x + c * xs.c;
  const scalar_t* w_col = weight + static_cast<int>(c) * geo.k_h * geo.k_w;
  const index_t col_skip = c * ss.c + ox * ss.w;
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const auto [local, r] = tile_row(tile, k);
    if (r >= rows) break;  // rows only grow with k
    const scalar_t* x_row = x_col + row_x[local];
    const scalar_t* w_row = w_col + row_w[local];
    const int full_y = row_y[local], i_lo = row_lo[local], i_hi = row_hi[local];
    acc_t value = 0;
    if constexpr (kTaps > 0) {
#pragma unroll
      for (int a = 0; a < kTaps; ++a) {
        const int i = i_lo + a;
        if (i < i_hi) {
          // Tap (p, q) = (full_y - i * sh, full_x - j * sw): weight index w_i - j * sw.
          const int w_i = (full_y - i * geo.stride_h) * geo.k_w + full_x;
          const scalar_t* x_i = x_row + i * xs.h;
#pragma unroll
          for (int b = 0; b < kTaps; ++b) {
            const int j = j_lo + b;
            if (j < j_hi) {
              value += tap_product<acc_t>(w_row, w_i, x_i, j, geo.stride_w, xs.w);
            }
          }
        }
      }
    } else {
      for (int i = i_lo; i < i_hi; ++i) {
        const int w_i = (full_y - i * geo.stride_h) * geo.k_w + full_x;
        const scalar_t* x_i = x_row + i * xs.h;
        for (int j = j_lo; j < j_hi; ++j) {
          value += tap_product<acc_t>(w_row, w_i, x_i, j, geo.stride_w, xs.w);
        }
      }
    }
    if (skip != nullptr) value += static_cast<acc_t>(skip[row_skip[local] + col_skip]);
    out[r * cols + col] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) backward_input_kernel(
    const scalar_t* __restrict__ grad,    // (N, C, Ho, Wo), strides gs
    const scalar_t* __restrict__ weight,  // (C, kh, kw) contiguous
    scalar_t* __restrict__ grad_x,        // (rows, cols) dense view of (N, C, Hi, Wi)
    Strides<index_t> gs, index_t channels, index_t in_h, index_t out_h, index_t out_w,
    index_t rows, index_t cols, bool channels_last, Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ index_t row_g[kTableRows];
  __shared__ int row_w[kTableRows], row_y0[kTableRows], row_lo[kTableRows], row_hi[kTableRows];

  const auto tile = row_tile<kRowsPerThread>(rows, in_h, channels, channels_last);
  if (tile.fills_table) {
    int64_t lo, hi;
    deconv_tap_range(tile.h, geo.stride_h, geo.k_h, geo.crop_h, out_h, &lo, &hi);
    row_g[tile.tid] = tile.n * gs.n + tile.c * gs.c;
    row_w[tile.tid] = static_cast<int>(tile.c) * geo.k_h * geo.k_w;
    // The G row of tap 0 (may be < 0).
    row_y0[tile.tid] = static_cast<int>(tile.h * geo.stride_h - geo.crop_h);
    row_lo[tile.tid] = static_cast<int>(lo);
    row_hi[tile.tid] = static_cast<int>(hi);  // may be <= lo: no tap inside the crop
  }
  __syncthreads();

  index_t col, j, c;
  if (!thread_column(cols, channels, channels_last, &col, &j, &c)) return;
  int64_t q_lo64, q_hi64;
  deconv_tap_range(j, geo.stride_w, geo.k_w, geo.crop_w, out_w, &q_lo64, &q_hi64);
  const int q_lo = static_cast<int>(q_lo64), q_hi = static_cast<int>(q_hi64);
  const int x0 = static_cast<int>(j) * geo.stride_w - geo.crop_w;  // G column of tap 0
  const scalar_t* g_col = grad + c * gs.c;
  const scalar_t* w_col = weight + static_cast<int>(c) * geo.k_h * geo.k_w;
#pragma unroll 1
  for (int k = 0; k < kRowsPerThread; ++k) {
    const auto [local, r] = tile_row(tile, k);
    if (r >= rows) break;
    const scalar_t* g_row = g_col + row_g[local];
    const scalar_t* w_row = w_col + row_w[local];
    const int y0 = row_y0[local], p_hi = row_hi[local];
    acc_t sum = 0;
    for (int p = row_lo[local]; p < p_hi; ++p) {
      const scalar_t* g = g_row + static_cast<index_t>(y0 + p) * gs.h;
      const scalar_t* w = w_row + p * geo.k_w;
      for (int q = q_lo; q < q_hi; ++q) {
        sum += static_cast<acc_t>(w[q]) * static_cast<acc_t>(g[static_cast<index_t>(x0 + q) * gs.w]);
      }
    }
    grad_x[r * cols + col] = static_cast<scalar_t>(sum);
  }
}

// Block b = (chunk * C + c) * tap_blocks + tb. Lane v = tb * kThreads + threadIdx.x covers tap
// v % taps of group v / taps; a group sums every groups-th input column of the chunk's rows.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) backward_weight_kernel(
    const scalar_t* __restrict__ grad,  // (N, C, Ho, Wo), strides gs
    const scalar_t* __restrict__ x,     // (N, C, Hi, Wi), strides xs
    at::opmath_type<scalar_t>* __restrict__ partials,  // (C, chunks, kh * kw)
    Strides<index_t> gs, Strides<index_t> xs, index_t channels, index_t in_h, index_t in_w,
    index_t out_h, index_t out_w, index_t chunk_rows, index_t total_rows, int chunks,
    int tap_blocks, int groups, Geometry geo) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t group_sums[kThreads];
  const int taps = geo.k_h * geo.k_w;
  const int tb = static_cast<int>(blockIdx.x % tap_blocks);
  const int64_t chunk_class = blockIdx.x / tap_blocks;
  const index_t c = static_cast<index_t>(chunk_class % channels);
  const int chunk = static_cast<int>(chunk_class / channels);
  const int v = tb * kThreads + threadIdx.x;
  const int tap = v % taps, group = v / taps;
  const bool active = group < groups;
  const int p = tap / geo.k_w, q = tap - p * geo.k_w;

  acc_t sum = 0;
  if (active) {
    // Input columns whose tap q lands inside the crop: 0 <= j * sw + q - cx < Wo.
    const int shift = geo.crop_w - q;
    const index_t j_lo = shift <= 0 ? 0 : (shift + geo.stride_w - 1) / geo.stride_w;
    const index_t last = out_w - 1 + shift;  // the largest j * sw
    const index_t j_hi = last < 0 ? 0 : std::min<index_t>(in_w, last / geo.stride_w + 1);
    const index_t r_begin = static_cast<index_t>(chunk) * chunk_rows;
    const index_t r_end = std::min<index_t>(total_rows, r_begin + chunk_rows);
    for (index_t r = r_begin; r < r_end; ++r) {
      const index_t n = r / in_h, i = r - n * in_h;
      const index_t y = i * geo.stride_h + p - geo.crop_h;
      if (y < 0 || y >= out_h) continue;
      const scalar_t* x_row = x + n * xs.n + c * xs.c + i * xs.h;
      const scalar_t* g_row = grad + n * gs.n + c * gs.c + y * gs.h;
      for (index_t j = j_lo + group; j < j_hi; j += groups) {
        sum += static_cast<acc_t>(x_row[j * xs.w]) *
               static_cast<acc_t>(g_row[(j * geo.stride_w + q - geo.crop_w) * gs.w]);
      }
    }
  }
  acc_t* out = partials + (static_cast<int64_t>(c) * chunks + chunk) * taps;
  if (groups == 1) {
    if (active) out[v] = sum;
    return;
  }
  // groups > 1: one block holds all groups * taps <= kThreads lanes; add them in group order.
  group_sums[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < taps) {
    acc_t total = 0;
    for (int g = 0; g < groups; ++g) total += group_sums[g * taps + threadIdx.x];
    out[threadIdx.x] = total;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sum_chunks_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partials,  // (C, chunks, taps)
    scalar_t* __restrict__ grad_weight,                      // (C, taps)
    int64_t channels, int64_t chunks, int64_t taps) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= channels * taps) return;
  const int64_t c = e / taps, tap = e - c * taps;
  const at::opmath_type<scalar_t>* p = partials + c * chunks * taps + tap;
  at::opmath_type<scalar_t> total = 0;
  for (int64_t k = 0; k < chunks; ++k) total += p[k * taps];
  grad_weight[e] = static_cast<scalar_t>(total);
}

Geometry geometry_of(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef crop) {
  const auto fits = [](int64_t v) { return v <= std::numeric_limits<int32_t>::max() / 4; };
  TORCH_CHECK_VALUE(fits(stride[0]) && fits(stride[1]) && fits(crop[0]) && fits(crop[1]) &&
                        fits(weight.numel()),
                    "deconv_add: stride, crop or kernel too large");
  return {static_cast<int>(stride[0]), static_cast<int>(stride[1]),
          static_cast<int>(weight.size(2)), static_cast<int>(weight.size(3)),
          static_cast<int>(crop[0]), static_cast<int>(crop[1])};
}

// The kernels index rows and columns of the full deconvolution in int: it must fit.
void check_int_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        at::IntArrayRef stride) {
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t full = deconv_full_size(x.size(2 + axis), stride[axis], weight.size(2 + axis));
    TORCH_CHECK_VALUE(full <= std::numeric_limits<int32_t>::max() / 2, op,
                      ": the deconvolution is too large along axis ", axis, " (", full, ")");
  }
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& skip, at::IntArrayRef stride,
                        at::IntArrayRef crop, at::IntArrayRef skip_offset,
                        at::IntArrayRef output_size) {
  constexpr const char* op = "deconv_add_forward";
  check_decoder_inputs(op, x, skip, skip_offset, output_size);
  check_deconv_weight(op, weight, x, stride, crop);
  check_deconv_window(op, x, weight, stride, crop, output_size);
  check_int_geometry(op, x, weight, stride);
  const Geometry geo = geometry_of(weight, stride, crop);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t channels = x.size(1), out_h = output_size[0];
  const ForwardResult res = forward_result(op, "tensor", x, skip, output_size, kRowsPerThread);
  if (res.tensor.numel() == 0) return res.tensor;
  // FCN's k = 2 * s (and any k <= 2 * s): at most 2 inputs per axis reach an output.
  const bool two_taps = geo.k_h <= 2 * geo.stride_h && geo.k_w <= 2 * geo.stride_w;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH_FLOATS(x.scalar_type(), "deconv_add_forward_cuda", [&] {
    const scalar_t* skip_origin = skip_window<scalar_t>(skip, skip_offset);
    auto run = [&](auto index_zero, auto taps) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, index_t, decltype(taps)::value>
          <<<res.launch.grid, res.launch.block, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), skip_origin,
              res.tensor.mutable_data_ptr<scalar_t>(), strides_of<index_t>(x),
              strides_of<index_t>(skip),
              channels, x.size(2), x.size(3), out_h, res.rows, res.cols, res.channels_last, geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_index_variant<std::integral_constant<int, 2>, std::integral_constant<int, 0>>(
        res.wide, two_taps, run);
  });
  return res.tensor;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output,
                                                 const at::Tensor& x, const at::Tensor& weight,
                                                 at::IntArrayRef stride, at::IntArrayRef crop) {
  constexpr const char* op = "deconv_add_backward";
  check_scores(op, "grad_output", grad_output, x);
  TORCH_CHECK_VALUE(grad_output.size(0) == x.size(0) && grad_output.size(1) == x.size(1), op,
                    ": grad_output must have x's (N, C) = (", x.size(0), ", ", x.size(1),
                    "), got ", grad_output.sizes());
  const std::array<int64_t, 2> no_offset{0, 0};
  const std::array<int64_t, 2> out_size{grad_output.size(2), grad_output.size(3)};
  check_decoder_inputs(op, x, std::nullopt, no_offset, out_size);
  check_deconv_weight(op, weight, x, stride, crop);
  check_deconv_window(op, x, weight, stride, crop, out_size);
  check_int_geometry(op, x, weight, stride);
  const Geometry geo = geometry_of(weight, stride, crop);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), channels = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_h = out_size[0], out_w = out_size[1];
  DenseResult res = dense_result(op, "tensor", x, in_h, in_w, kRowsPerThread);
  at::Tensor& grad_x = res.tensor;
  if (channels == 0) return {grad_x, at::empty_like(weight, at::MemoryFormat::Contiguous)};
  if (batch == 0) return {grad_x, at::zeros_like(weight, at::MemoryFormat::Contiguous)};
  auto grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);

  const bool wide = needs_64bit(x) || needs_64bit(grad_output) || needs_64bit(grad_x);

  // grad_weight: groups of threads per tap when the kernel has fewer than kThreads taps.
  const int64_t taps = weight.size(2) * weight.size(3);
  const int64_t groups = std::max<int64_t>(1, kThreads / taps);
  const int64_t tap_blocks = (groups * taps + kThreads - 1) / kThreads;  // 1 when groups > 1
  const int64_t total_rows = batch * in_h;
  const int64_t wanted = std::max<int64_t>(1, kWeightBlocks / (channels * tap_blocks));
  const int64_t chunk_rows = (total_rows + std::min(wanted, total_rows) - 1) / std::min(wanted, total_rows);
  const int64_t chunks = (total_rows + chunk_rows - 1) / chunk_rows;
  const int64_t weight_blocks = chunks * channels * tap_blocks;
  TORCH_CHECK_VALUE(weight_blocks <= std::numeric_limits<int32_t>::max() &&
                        chunks <= std::numeric_limits<int32_t>::max(),
                    op, ": too many classes or taps for one launch");
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto partials = at::empty({channels, chunks, taps}, x.options().dtype(acc_type));
  const auto stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH_FLOATS(x.scalar_type(), "deconv_add_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      backward_input_kernel<scalar_t, index_t><<<res.launch.grid, res.launch.block, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          grad_x.mutable_data_ptr<scalar_t>(), strides_of<index_t>(grad_output), channels, in_h,
          out_h, out_w, res.rows, res.cols, res.channels_last, geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_weight_kernel<scalar_t, index_t>
          <<<static_cast<unsigned>(weight_blocks), kThreads, 0, stream>>>(
              grad_output.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              partials.mutable_data_ptr<acc_t>(), strides_of<index_t>(grad_output),
              strides_of<index_t>(x), channels, in_h, in_w, out_h, out_w, chunk_rows,
              total_rows, static_cast<int>(chunks), static_cast<int>(tap_blocks),
              static_cast<int>(groups), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (wide) run(int64_t{0}); else run(int32_t{0});
    const int64_t outputs = channels * taps;
    sum_chunks_kernel<scalar_t><<<static_cast<unsigned>((outputs + kThreads - 1) / kThreads),
                                  kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), channels,
        chunks, taps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("deconv_add_forward", &forward_cuda);
  m.impl("deconv_add_backward", &backward_cuda);
}

}  // namespace fastseg::cuda
