// Host and device helpers shared by the decoder's CUDA kernels (csrc/cuda/upsample_add.cu,
// csrc/cuda/deconv_add.cu).
//
// Both write a dense tensor in its memory format seen as a (rows, cols) matrix whose element
// (r, j) sits at r * cols + j: for NCHW a row is one (n, c, h) line and a column one w; for
// channels_last a row is one (n, h) line and a column one (w, c) pair. A block is blockDim.x
// columns (a warp multiple) times blockDim.y thread rows; each thread walks rows_per_thread rows
// of one column, and each row's share is computed once per block into a shared table.
//
// Everything here has internal linkage (an unnamed namespace): each .cu gets its own copy, as
// when the helpers were written out in both files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include "fastseg/upsample_add_checks.h"

#include <cstdint>
#include <limits>
#include <optional>

namespace fastseg::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMinColumns = 32;  // blockDim.x >= one warp: a warp never straddles two rows
constexpr int kMaxBlockRows = kThreads / kMinColumns;

// float32 / float16 / bfloat16 (float64 is served on the CPU, as for the other ops).
#define FASTSEG_DISPATCH_FLOATS(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- Host side ----

// A 4-d tensor's strides, passed by value to the kernels in their index type.
template <typename index_t>
struct Strides {
  index_t n, c, h, w;
};

template <typename index_t>
Strides<index_t> strides_of(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          static_cast<index_t>(t.stride(2)), static_cast<index_t>(t.stride(3))};
}

// An optional skip's strides; zeros when there is none (the kernels then never read it).
template <typename index_t>
Strides<index_t> strides_of(const std::optional<at::Tensor>& t) {
  return t ? strides_of<index_t>(*t) : Strides<index_t>{0, 0, 0, 0};
}

// Whether some offset into t may not fit in int32 (negative strides do not exist in torch):
// picks the kernels' index type.
inline bool needs_64bit(const at::Tensor& t) {
  int64_t span = 1;
  for (int d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return span > std::numeric_limits<int32_t>::max() ||
         t.numel() > std::numeric_limits<int32_t>::max();
}

// The skip window's origin skip[:, :, oy, ox] (the checks guarantee the window exists), or
// nullptr without a skip.
template <typename scalar_t>
const scalar_t* skip_window(const std::optional<at::Tensor>& skip, at::IntArrayRef skip_offset) {
  return skip ? skip->const_data_ptr<scalar_t>() + skip_offset[0] * skip->stride(2) +
                    skip_offset[1] * skip->stride(3)
              : nullptr;
}

// The (rows, cols) view of a dense (batch, channels, height, width) tensor in `format`.
struct DenseView {
  bool channels_last;
  int64_t rows, cols;
};

inline DenseView dense_view(at::MemoryFormat format, int64_t batch, int64_t channels,
                            int64_t height, int64_t width) {
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  return {channels_last, channels_last ? batch * height : batch * channels * height,
          channels_last ? width * channels : width};
}

struct Launch {
  dim3 grid, block;
};

// blockDim.x columns (the smallest warp multiple covering cols, at most kThreads) times
// blockDim.y thread rows; a block covers blockDim.y * rows_per_thread rows. `what` names the
// tensor in the error message.
inline Launch launch_for(const char* op, const char* what, int64_t rows, int64_t cols,
                         int rows_per_thread) {
  const int tx = cols <= 32 ? 32 : cols <= 64 ? 64 : cols <= 128 ? 128 : kThreads;
  const int ty = kThreads / tx;
  const int64_t block_rows = int64_t{ty} * rows_per_thread;
  const int64_t gx = (rows + block_rows - 1) / block_rows;
  const int64_t gy = (cols + tx - 1) / tx;
  TORCH_CHECK_VALUE(gx <= std::numeric_limits<int32_t>::max() && gy <= 65535, op, ": ", what,
                    " too large for one launch (", rows, " rows x ", cols, " columns)");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty)};
}

// A kernel's dense (N, C, height, width) result, (N, C) and options from `like`, in the memory
// format output_memory_format(like), with its (rows, cols) view and its launch shape. An empty
// result gets no launch shape (nothing is launched, and nothing can be too large).
struct DenseResult {
  at::Tensor tensor;
  bool channels_last;
  int64_t rows, cols;
  Launch launch;
};

inline DenseResult dense_result(const char* op, const char* what, const at::Tensor& like,
                                int64_t height, int64_t width, int rows_per_thread) {
  const int64_t batch = like.size(0), channels = like.size(1);
  const auto format = output_memory_format(like);
  DenseResult res;
  res.tensor = at::empty({batch, channels, height, width}, like.options().memory_format(format));
  const DenseView view = dense_view(format, batch, channels, height, width);
  res.channels_last = view.channels_last;
  res.rows = view.rows;
  res.cols = view.cols;
  if (res.tensor.numel() != 0) {
    res.launch = launch_for(op, what, res.rows, res.cols, rows_per_thread);
  }
  return res;
}

// A forward's result: x's (N, C) at output_size, as dense_result; wide: whether an offset
// into x, the result or the skip may need int64.
struct ForwardResult : DenseResult {
  bool wide;
};

inline ForwardResult forward_result(const char* op, const char* what, const at::Tensor& x,
                                    const std::optional<at::Tensor>& skip,
                                    at::IntArrayRef output_size, int rows_per_thread) {
  ForwardResult res{dense_result(op, what, x, output_size[0], output_size[1], rows_per_thread)};
  res.wide = needs_64bit(x) || needs_64bit(res.tensor) || (skip && needs_64bit(*skip));
  return res;
}

// Calls run(index_zero, Variant{}): index_zero is int64_t{0} when `wide`, int32_t{0} otherwise
// (the kernels' index type); Variant is First when `first`, else Second (a kernel variant,
// usually a std::integral_constant).
template <typename First, typename Second, typename Run>
void dispatch_index_variant(bool wide, bool first, Run&& run) {
  if (wide) {
    if (first) run(int64_t{0}, First{}); else run(int64_t{0}, Second{});
  } else {
    if (first) run(int32_t{0}, First{}); else run(int32_t{0}, Second{});
  }
}

// ---- Device side ----

// Row r of the (rows, cols) view -> (n, c, h) for NCHW, (n, 0, h) for channels_last.
template <typename index_t>
__device__ inline void decode_row(index_t r, index_t height, index_t channels, bool channels_last,
                                  index_t* n, index_t* c, index_t* h) {
  if (channels_last) {
    *n = r / height;
    *c = 0;
    *h = r - *n * height;
  } else {
    const index_t plane = r / height;
    *h = r - plane * height;
    *n = plane / channels;
    *c = plane - *n * channels;
  }
}

// The block's share of the rows, from first_row on. The thread with flat index tid fills the
// row table's entry tid when fills_table (row first_row + tid exists); (n, c, h) is then that
// row, decoded (decode_row), and is left unset otherwise.
template <typename index_t>
struct RowTile {
  index_t first_row;
  int tid;
  bool fills_table;
  index_t n, c, h;
};

template <int kRowsPerThread, typename index_t>
__device__ inline RowTile<index_t> row_tile(index_t rows, index_t height, index_t channels,
                                            bool channels_last) {
  RowTile<index_t> tile;
  const int block_rows = blockDim.y * kRowsPerThread;
  tile.first_row = static_cast<index_t>(blockIdx.x) * block_rows;
  tile.tid = threadIdx.y * blockDim.x + threadIdx.x;
  tile.fills_table = tile.tid < block_rows && tile.first_row + tile.tid < rows;
  if (tile.fills_table) {
    decode_row<index_t>(tile.first_row + tile.tid, height, channels, channels_last, &tile.n,
                        &tile.c, &tile.h);
  }
  return tile;
}

// Step k of this thread's walk over the tile's rows: the row table entry `local` and its row
// r (past the last row once r >= rows; rows only grow with k).
template <typename index_t>
struct TileRow {
  int local;
  index_t r;
};

template <typename index_t>
__device__ inline TileRow<index_t> tile_row(const RowTile<index_t>& tile, int k) {
  const int local = k * blockDim.y + threadIdx.y;
  return {local, tile.first_row + local};
}

// This thread's column of the (rows, cols) view: false if it is past the last one; else
// col and its (w, c): (col, 0) for NCHW, (col / C, col % C) for channels_last.
template <typename index_t>
__device__ inline bool thread_column(index_t cols, index_t channels, bool channels_last,
                                     index_t* col, index_t* w, index_t* c) {
  *col = static_cast<index_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (*col >= cols) return false;
  *w = *col;
  *c = 0;
  if (channels_last) {
    *w = *col / channels;
    *c = *col - *w * channels;
  }
  return true;
}

}  // namespace
}  // namespace fastseg::cuda
