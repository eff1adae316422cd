// Fused softmax cross-entropy on the CPU.
//
// The logits arrive as a (B, C, S) view with any strides. Pixels are processed in tiles of
// consecutive pixels of one image: a tile is copied (converted to the accumulation type)
// into a [C][tile] buffer that stays in L1, so the class loops run on contiguous vectors
// whatever the layout (NCHW reads a run of pixels per class, channels_last C contiguous
// values per pixel). The forward makes two passes over the
// buffer (max, then exp-sum) and saves the per-pixel logsumexp as its two parts, max and
// log(sum) (their float sum would lose ulp(max) in every probability); the backward makes one
// more pass over the logits and writes the gradient. Reductions go through fixed-size
// chunks summed in order, so results repeat bit for bit for any thread count.
//
// This file is compiled once per CPU capability (DEFAULT, AVX2, AVX512: see setup.py); the
// DEFAULT build also holds the op registration and picks the variant at run time.
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastseg/cpu_capability.h"
#include "fastseg/cpu_vec.h"
#include "fastseg/softmax_cross_entropy.h"

namespace fastseg::cpu {

// Everything a kernel needs, already checked by the op wrapper at the end of this file.
struct CrossEntropyArgs {
  at::Tensor input;                  // (B, C, S) logits, any strides
  at::Tensor target;                 // (B, S) contiguous integer ids
  std::optional<at::Tensor> weight;  // (C,) accumulation dtype
  std::optional<at::Tensor> pixel_weight;  // (B, S) accumulation dtype, contiguous
  int64_t ignore_index;
  int64_t reduction;
  double label_smoothing;
};

namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Tiles per reduction chunk: fixed, so the summation order does not depend on threads.
constexpr int64_t kTilesPerChunk = 8;
// Vector columns that advance together in the class loops, so that their max / sum chains
// overlap instead of each waiting on its own add latency.
constexpr int64_t kGroup = 4;
constexpr int64_t kMaxTile = 1024;

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// Pixels per tile: as many as keep the [C][tile] buffer near 64 KB (L2), and at least 128
// (512 bytes of each float row). Long runs along the pixels matter: an NCHW image's C class
// rows lie S elements apart, the same cache sets for power-of-two S, so short per-row reads
// thrash (measured: C = 150 with 32-pixel tiles ran 2.5x slower per element than C = 19).
template <typename acc_t>
int64_t tile_pixels(int64_t classes) {
  constexpr int64_t align = kGroup * Vectorized<acc_t>::size();
  constexpr int64_t min_tile = std::max<int64_t>(align, 128);
  const int64_t fit = (64 * 1024 / static_cast<int64_t>(sizeof(acc_t))) / std::max<int64_t>(classes, 1);
  return std::clamp<int64_t>(fit / align * align, min_tile, kMaxTile);
}

// Copies pixels [0, count) at `base` into buffer[c * tile + j], zero-padded to whole groups.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* base, int64_t stride_c, int64_t stride_s, int64_t classes,
                      int64_t count, int64_t tile, acc_t* buffer) {
  constexpr int64_t align = kGroup * Vectorized<acc_t>::size();
  const int64_t padded = std::min(tile, (count + align - 1) / align * align);
  if (stride_s == 1) {
    for (int64_t c = 0; c < classes; ++c) {
      const scalar_t* row = base + c * stride_c;
      acc_t* out = buffer + c * tile;
      for (int64_t j = 0; j < count; ++j) out[j] = static_cast<acc_t>(row[j]);
      for (int64_t j = count; j < padded; ++j) out[j] = acc_t(0);
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* pixel = base + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) buffer[c * tile + j] = static_cast<acc_t>(pixel[c * stride_c]);
    }
    for (int64_t c = 0; c < classes; ++c)
      for (int64_t j = count; j < padded; ++j) buffer[c * tile + j] = acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* buffer, int64_t stride_c, int64_t stride_s, int64_t classes,
                       int64_t count, int64_t tile, scalar_t* base) {
  if (stride_s == 1) {
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t* in = buffer + c * tile;
      scalar_t* row = base + c * stride_c;
      for (int64_t j = 0; j < count; ++j) row[j] = static_cast<scalar_t>(in[j]);
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      scalar_t* pixel = base + j * stride_s;
      for (int64_t c = 0; c < classes; ++c) pixel[c * stride_c] = static_cast<scalar_t>(buffer[c * tile + j]);
    }
  }
}

// Per-tile target ids: -1 marks ignored pixels. Throws ValueError on an id out of range.
template <typename target_t>
inline void load_targets(const target_t* target, int64_t count, int64_t classes,
                         int64_t ignore_index, int64_t* out) {
  for (int64_t j = 0; j < count; ++j) {
    const target_t t = target[j];
    if (ce_is_ignored(t, ignore_index)) {
      out[j] = -1;
      continue;
    }
    TORCH_CHECK_VALUE(ce_is_valid_class(t, classes), "softmax_cross_entropy: target contains ",
                      static_cast<int64_t>(t), ", expected a class id in [0, ", classes,
                      ") or ignore_index=", ignore_index);
    out[j] = static_cast<int64_t>(t);
  }
}

template <typename acc_t>
acc_t total_class_weight(const acc_t* weight, int64_t classes) {
  if (weight == nullptr) return static_cast<acc_t>(classes);
  acc_t sum = 0;
  for (int64_t c = 0; c < classes; ++c) sum += weight[c];
  return sum;
}

// Per pixel of a tile: max over classes, log(sum exp(x - max)) and sum w[c] (x - max).
// `rows` holds class c of the tile's pixel j at rows[c * row_stride + j].
template <typename acc_t, bool kSmoothing>
inline void tile_statistics(const acc_t* rows, int64_t row_stride, const acc_t* weight, int64_t classes,
                            int64_t count, acc_t* max_out, acc_t* log_sum_out, acc_t* wsum_out) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j0 = 0; j0 < count; j0 += kGroup * Vec::size()) {
    const acc_t* column = rows + j0;
    Vec m[kGroup], sum[kGroup], wsum[kGroup];
    for (int64_t g = 0; g < kGroup; ++g) m[g] = Vec::loadu(column + g * Vec::size());
    for (int64_t c = 1; c < classes; ++c)
      for (int64_t g = 0; g < kGroup; ++g)
        m[g] = max_for_shift(m[g], Vec::loadu(column + c * row_stride + g * Vec::size()));
    for (int64_t g = 0; g < kGroup; ++g) sum[g] = wsum[g] = Vec(acc_t(0));
    for (int64_t c = 0; c < classes; ++c) {
      const Vec w_c(kSmoothing && weight ? weight[c] : acc_t(1));
      for (int64_t g = 0; g < kGroup; ++g) {
        const Vec shifted = Vec::loadu(column + c * row_stride + g * Vec::size()) - m[g];
        sum[g] = sum[g] + exp_nonpositive(shifted);
        if constexpr (kSmoothing) wsum[g] = at::vec::fmadd(w_c, shifted, wsum[g]);
      }
    }
    for (int64_t g = 0; g < kGroup; ++g) {
      m[g].store(max_out + j0 + g * Vec::size());
      sum[g].log().store(log_sum_out + j0 + g * Vec::size());
      wsum[g].store(wsum_out + j0 + g * Vec::size());
    }
  }
}

// Work items per thread so that each thread gets at least ATen's grain of elements: below
// that, waking the OpenMP team costs more than the work (measured: a 2 x 97 x 97 map spent
// most of its time in libgomp with a grain of one tile).
inline int64_t parallel_grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elements_per_item, 1));
}

// Whether a tile can be read straight from the logits: same type as the accumulator,
// pixels contiguous, and whole vector groups (a partial group would read past the row).
template <typename scalar_t, typename acc_t>
inline bool reads_in_place(int64_t stride_s, int64_t count) {
  return std::is_same_v<scalar_t, acc_t> && stride_s == 1 &&
         count % (kGroup * Vectorized<acc_t>::size()) == 0;
}

// The tiles of the (B, C, S) view: tile i covers pixels [s0, s0 + count) of image b.
struct TileGrid {
  int64_t pixels, tile, per_image, count_all;
  TileGrid(int64_t batch, int64_t pixels_, int64_t tile_)
      : pixels(pixels_), tile(tile_), per_image((pixels_ + tile_ - 1) / tile_),
        count_all(batch * ((pixels_ + tile_ - 1) / tile_)) {}
  int64_t image(int64_t i) const { return i / per_image; }
  int64_t start(int64_t i) const { return (i % per_image) * tile; }
  int64_t count(int64_t i) const { return std::min(tile, pixels - start(i)); }
};

template <typename scalar_t, typename target_t>
void forward_typed(const CrossEntropyArgs& a, at::Tensor& loss, at::Tensor& lse,
                   at::Tensor& partials) {
  using acc_t = typename Accumulate<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  const int64_t batch = a.input.size(0), classes = a.input.size(1), pixels = a.input.size(2);
  const int64_t stride_b = a.input.stride(0), stride_c = a.input.stride(1),
                stride_s = a.input.stride(2);
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const target_t* target = a.target.const_data_ptr<target_t>();
  const acc_t* weight = a.weight ? a.weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* pixel_weight = a.pixel_weight ? a.pixel_weight->const_data_ptr<acc_t>() : nullptr;
  const bool per_pixel = a.reduction == kReductionNone;
  const bool smoothing = a.label_smoothing > 0;
  const acc_t one_minus_eps = static_cast<acc_t>(1.0 - a.label_smoothing);
  const acc_t eps_over_c = static_cast<acc_t>(a.label_smoothing / static_cast<double>(classes));
  const acc_t weight_total = total_class_weight(weight, classes);
  acc_t* max_out = lse.data_ptr<acc_t>();
  acc_t* log_sum_out = max_out + batch * pixels;
  scalar_t* loss_out = per_pixel ? loss.data_ptr<scalar_t>() : nullptr;
  double* partial_out = partials.data_ptr<double>();
  const TileGrid grid(batch, pixels, tile_pixels<acc_t>(classes));
  const int64_t chunks = (grid.count_all + kTilesPerChunk - 1) / kTilesPerChunk;

  const int64_t chunk_grain = parallel_grain(kTilesPerChunk * grid.tile * classes);
  at::parallel_for(0, chunks, chunk_grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> buffer(classes * grid.tile), max_s(grid.tile), log_sum_s(grid.tile),
        wsum_s(grid.tile), live_s(grid.tile), w_t_s(grid.tile), x_t_s(grid.tile), loss_s(grid.tile);
    std::vector<int64_t> ids(grid.tile);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double chunk_loss = 0, chunk_weight = 0;
      const int64_t tile_end = std::min(grid.count_all, (chunk + 1) * kTilesPerChunk);
      for (int64_t i = chunk * kTilesPerChunk; i < tile_end; ++i) {
        const int64_t b = grid.image(i), s0 = grid.start(i), count = grid.count(i);
        const int64_t pixel0 = b * pixels + s0;
        // Always through the buffer: the max and sum passes read each class row twice, and
        // NCHW rows S floats apart (S a power of two) share cache sets, so re-reads straight
        // from the logits miss in L1 and L2; the buffer's rows are `tile` apart.
        load_tile(input + b * stride_b + s0 * stride_s, stride_c, stride_s, classes, count,
                  grid.tile, buffer.data());
        const acc_t* rows = buffer.data();
        const int64_t row_stride = grid.tile;
        load_targets(target + pixel0, count, classes, a.ignore_index, ids.data());
        if (smoothing) {
          tile_statistics<acc_t, true>(rows, row_stride, weight, classes, count, max_s.data(),
                                       log_sum_s.data(), wsum_s.data());
        } else {
          tile_statistics<acc_t, false>(rows, row_stride, weight, classes, count, max_s.data(),
                                        log_sum_s.data(), wsum_s.data());
        }
        std::copy_n(max_s.data(), count, max_out + pixel0);
        std::copy_n(log_sum_s.data(), count, log_sum_out + pixel0);
        // Gather what each pixel's target selects (scalar), then the loss in vectors.
        for (int64_t j = 0; j < count; ++j) {
          const bool live = ids[j] >= 0;
          live_s[j] = live ? acc_t(1) : acc_t(0);
          w_t_s[j] = live && weight ? weight[ids[j]] : acc_t(1);
          x_t_s[j] = (live ? rows[ids[j] * row_stride + j] : max_s[j]) - max_s[j];
        }
        const Vec total_v(weight_total), one_minus_eps_v(one_minus_eps), eps_v(eps_over_c);
        for (int64_t j0 = 0; j0 < count; j0 += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), count - j0);
          const Vec pw = pixel_weight ? Vec::loadu(pixel_weight + pixel0 + j0, n) : Vec(acc_t(1));
          const Vec live = Vec::loadu(live_s.data() + j0), w_t = Vec::loadu(w_t_s.data() + j0);
          const Vec loss_v = live * ce_pixel_loss<Vec>(
              Vec::loadu(log_sum_s.data() + j0), Vec::loadu(x_t_s.data() + j0),
              Vec::loadu(wsum_s.data() + j0), w_t, total_v, one_minus_eps_v, eps_v, pw);
          loss_v.store(loss_s.data() + j0);
          (live * w_t * pw).store(w_t_s.data() + j0);
        }
        if (per_pixel) {
          for (int64_t j = 0; j < count; ++j) loss_out[pixel0 + j] = static_cast<scalar_t>(loss_s[j]);
        }
        // In double, four running sums: float sums over a whole tile lose digits.
        double tile_loss[4] = {0, 0, 0, 0}, tile_weight[4] = {0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 4 <= count; j += 4) {
          for (int64_t k = 0; k < 4; ++k) {
            tile_loss[k] += loss_s[j + k];
            tile_weight[k] += w_t_s[j + k];
          }
        }
        for (; j < count; ++j) {
          tile_loss[0] += loss_s[j];
          tile_weight[0] += w_t_s[j];
        }
        chunk_loss += (tile_loss[0] + tile_loss[1]) + (tile_loss[2] + tile_loss[3]);
        chunk_weight += (tile_weight[0] + tile_weight[1]) + (tile_weight[2] + tile_weight[3]);
      }
      partial_out[2 * chunk] = chunk_loss;
      partial_out[2 * chunk + 1] = chunk_weight;
    }
  });
}

// Gradient of a tile without the one-hot term: out[c][j] = p * softmax_scale - smoothing_term.
template <typename acc_t, bool kSmoothing>
inline void tile_gradient(const acc_t* rows, int64_t row_stride, acc_t* out, int64_t out_stride,
                          const acc_t* weight, acc_t eps_over_c, int64_t classes, int64_t count,
                          const acc_t* max_s, const acc_t* log_sum_s, const acc_t* scale_s,
                          const acc_t* softmax_scale_s) {
  using Vec = Vectorized<acc_t>;
  // Row by row: each class row of the tile is one sequential run in and out (the per-pixel
  // vectors come from L1), so rows that share cache sets never evict each other mid-use.
  for (int64_t c = 0; c < classes; ++c) {
    const Vec w_eps(eps_over_c * (weight ? weight[c] : acc_t(1)));
    const acc_t* row = rows + c * row_stride;
    acc_t* out_row = out + c * out_stride;
    for (int64_t j0 = 0; j0 < count; j0 += Vec::size()) {
      const Vec p = exp_nonpositive((Vec::loadu(row + j0) - Vec::loadu(max_s + j0)) -
                                    Vec::loadu(log_sum_s + j0));
      Vec smoothing_term(acc_t(0));
      if constexpr (kSmoothing) smoothing_term = Vec::loadu(scale_s + j0) * w_eps;
      ce_class_gradient<Vec>(p, Vec::loadu(softmax_scale_s + j0), smoothing_term).store(out_row + j0);
    }
  }
}

template <typename scalar_t, typename target_t>
void backward_typed(const CrossEntropyArgs& a, const at::Tensor& grad_output,
                    const at::Tensor& lse, const at::Tensor& total_weight, at::Tensor& grad_input) {
  using acc_t = typename Accumulate<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  const int64_t batch = a.input.size(0), classes = a.input.size(1), pixels = a.input.size(2);
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  scalar_t* grad = grad_input.data_ptr<scalar_t>();
  const target_t* target = a.target.const_data_ptr<target_t>();
  const acc_t* weight = a.weight ? a.weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* pixel_weight = a.pixel_weight ? a.pixel_weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* max_in = lse.const_data_ptr<acc_t>();
  const acc_t* log_sum_in = max_in + batch * pixels;
  const bool per_pixel = a.reduction == kReductionNone;
  const acc_t one_minus_eps = static_cast<acc_t>(1.0 - a.label_smoothing);
  const acc_t eps_over_c = static_cast<acc_t>(a.label_smoothing / static_cast<double>(classes));
  const acc_t weight_total = total_class_weight(weight, classes);
  // The upstream scale: per pixel for "none"; one value otherwise (mean divides by the total
  // weight, as eager does: 0 / 0 gives NaN when every pixel is ignored).
  const at::Tensor grad_acc = grad_output.to(lse.scalar_type()).contiguous();
  const acc_t* grad_per_pixel = per_pixel ? grad_acc.const_data_ptr<acc_t>() : nullptr;
  acc_t grad_scalar = 0;
  if (!per_pixel) {
    grad_scalar = grad_acc.const_data_ptr<acc_t>()[0];
    if (a.reduction == kReductionMean) grad_scalar /= total_weight.const_data_ptr<acc_t>()[0];
  }
  const TileGrid grid(batch, pixels, tile_pixels<acc_t>(classes));

  at::parallel_for(0, grid.count_all, parallel_grain(grid.tile * classes),
                   [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<acc_t> buffer(classes * grid.tile), max_s(grid.tile), log_sum_s(grid.tile),
        scale_s(grid.tile), coef_s(grid.tile), live_s(grid.tile), w_t_s(grid.tile);
    std::vector<int64_t> ids(grid.tile);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const int64_t b = grid.image(i), s0 = grid.start(i), count = grid.count(i);
      const int64_t pixel0 = b * pixels + s0;
      const scalar_t* tile_input = input + b * a.input.stride(0) + s0 * a.input.stride(2);
      scalar_t* tile_grad = grad + b * grad_input.stride(0) + s0 * grad_input.stride(2);
      // In place: read the logits' rows and write the gradient's rows directly.
      const bool in_place = reads_in_place<scalar_t, acc_t>(a.input.stride(2), count) &&
                            grad_input.stride(2) == 1;
      const acc_t* rows = reinterpret_cast<const acc_t*>(tile_input);
      acc_t* out_rows = reinterpret_cast<acc_t*>(tile_grad);
      int64_t row_stride = a.input.stride(1), out_row_stride = grad_input.stride(1);
      if (!in_place) {
        load_tile(tile_input, a.input.stride(1), a.input.stride(2), classes, count, grid.tile,
                  buffer.data());
        rows = out_rows = buffer.data();
        row_stride = out_row_stride = grid.tile;
      }
      load_targets(target + pixel0, count, classes, a.ignore_index, ids.data());
      const int64_t padded = (count + Vec::size() - 1) / Vec::size() * Vec::size();
      std::fill(live_s.begin() + count, live_s.begin() + padded, acc_t(0));
      std::fill(max_s.begin() + count, max_s.begin() + padded, acc_t(0));
      std::fill(log_sum_s.begin() + count, log_sum_s.begin() + padded, acc_t(0));
      std::copy_n(max_in + pixel0, count, max_s.data());
      std::copy_n(log_sum_in + pixel0, count, log_sum_s.data());
      for (int64_t j = 0; j < count; ++j) {
        live_s[j] = ids[j] >= 0 ? acc_t(1) : acc_t(0);
        w_t_s[j] = ids[j] >= 0 && weight ? weight[ids[j]] : acc_t(1);
      }
      const Vec total_v(weight_total), one_minus_eps_v(one_minus_eps), eps_v(eps_over_c);
      for (int64_t j0 = 0; j0 < count; j0 += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), count - j0);
        const Vec g = per_pixel ? Vec::loadu(grad_per_pixel + pixel0 + j0, n) : Vec(grad_scalar);
        const Vec pw = pixel_weight ? Vec::loadu(pixel_weight + pixel0 + j0, n) : Vec(acc_t(1));
        const Vec scale = Vec::loadu(live_s.data() + j0) * g * pw;
        scale.store(scale_s.data() + j0);
        ce_softmax_scale<Vec>(Vec::loadu(w_t_s.data() + j0), total_v, one_minus_eps_v, eps_v, scale)
            .store(coef_s.data() + j0);
      }
      if (a.label_smoothing > 0) {
        tile_gradient<acc_t, true>(rows, row_stride, out_rows, out_row_stride, weight, eps_over_c,
                                   classes, count, max_s.data(), log_sum_s.data(), scale_s.data(),
                                   coef_s.data());
      } else {
        tile_gradient<acc_t, false>(rows, row_stride, out_rows, out_row_stride, weight, eps_over_c,
                                    classes, count, max_s.data(), log_sum_s.data(), scale_s.data(),
                                    coef_s.data());
      }
      // The one-hot term, in the accumulation type before rounding to the logits' dtype.
      for (int64_t j = 0; j < count; ++j) {
        if (ids[j] < 0) continue;
        const acc_t w_t = weight ? weight[ids[j]] : acc_t(1);
        out_rows[ids[j] * out_row_stride + j] -= ce_target_gradient_term<acc_t>(w_t, one_minus_eps, scale_s[j]);
      }
      if (!in_place) {
        store_tile(buffer.data(), grad_input.stride(1), grad_input.stride(2), classes, count,
                   grid.tile, tile_grad);
      }
    }
  });
}

#define FASTSEG_CE_DISPATCH(ARGS, NAME, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(                                                              \
      at::kHalf, at::kBFloat16, (ARGS).input.scalar_type(), NAME, [&] {                         \
        using logits_t = scalar_t;                                                              \
        AT_DISPATCH_SWITCH((ARGS).target.scalar_type(), NAME,                                   \
                           AT_DISPATCH_CASE(at::kByte, [&] { __VA_ARGS__(logits_t, uint8_t); }) \
                           AT_DISPATCH_CASE(at::kInt, [&] { __VA_ARGS__(logits_t, int32_t); })  \
                           AT_DISPATCH_CASE(at::kLong, [&] { __VA_ARGS__(logits_t, int64_t); })); \
      })

void softmax_cross_entropy_forward_kernel(const CrossEntropyArgs& a, at::Tensor& loss,
                                          at::Tensor& lse, at::Tensor& partials) {
#define FASTSEG_CE_FORWARD(S, T) forward_typed<S, T>(a, loss, lse, partials)
  FASTSEG_CE_DISPATCH(a, "softmax_cross_entropy_forward", FASTSEG_CE_FORWARD);
#undef FASTSEG_CE_FORWARD
}

void softmax_cross_entropy_backward_kernel(const CrossEntropyArgs& a, const at::Tensor& grad_output,
                                           const at::Tensor& lse, const at::Tensor& total_weight,
                                           at::Tensor& grad_input) {
#define FASTSEG_CE_BACKWARD(S, T) backward_typed<S, T>(a, grad_output, lse, total_weight, grad_input)
  FASTSEG_CE_DISPATCH(a, "softmax_cross_entropy_backward", FASTSEG_CE_BACKWARD);
#undef FASTSEG_CE_BACKWARD
}

int64_t softmax_cross_entropy_chunks(int64_t batch, int64_t pixels, int64_t classes, bool is_double) {
  const int64_t tile = is_double ? tile_pixels<double>(classes) : tile_pixels<float>(classes);
  const TileGrid grid(batch, pixels, tile);
  return (grid.count_all + kTilesPerChunk - 1) / kTilesPerChunk;
}

}  // namespace CPU_CAPABILITY

#ifdef FASTSEG_CPU_DISPATCH_UNIT
FASTSEG_DECLARE_CPU_VARIANTS(
    void softmax_cross_entropy_forward_kernel(const CrossEntropyArgs&, at::Tensor&, at::Tensor&, at::Tensor&);
    void softmax_cross_entropy_backward_kernel(const CrossEntropyArgs&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, at::Tensor&);
    int64_t softmax_cross_entropy_chunks(int64_t, int64_t, int64_t, bool);)

namespace {

void check_inputs(const CrossEntropyArgs& a) {
  const auto& input = a.input;
  TORCH_CHECK_VALUE(input.dim() == 3, "softmax_cross_entropy_forward: input must be (B, C, S), got ",
                    input.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0, "softmax_cross_entropy_forward: input has no classes");
  TORCH_CHECK_VALUE(a.target.dim() == 2 && a.target.size(0) == input.size(0) &&
                        a.target.size(1) == input.size(2),
                    "softmax_cross_entropy_forward: target must be (B, S) = (", input.size(0), ", ",
                    input.size(2), "), got ", a.target.sizes());
  TORCH_CHECK_TYPE(a.target.scalar_type() == at::kByte || a.target.scalar_type() == at::kInt ||
                       a.target.scalar_type() == at::kLong,
                   "softmax_cross_entropy_forward: target must be uint8, int32 or int64, got ",
                   a.target.scalar_type());
  TORCH_CHECK_VALUE(a.target.is_contiguous(), "softmax_cross_entropy_forward: target must be contiguous");
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (a.weight) {
    TORCH_CHECK_VALUE(a.weight->dim() == 1 && a.weight->size(0) == input.size(1) &&
                          a.weight->scalar_type() == acc && a.weight->is_contiguous(),
                      "softmax_cross_entropy_forward: weight must be a contiguous (", input.size(1),
                      ",) tensor of ", acc, ", got ", a.weight->sizes(), " ", a.weight->scalar_type());
  }
  if (a.pixel_weight) {
    TORCH_CHECK_VALUE(a.pixel_weight->sizes() == a.target.sizes() &&
                          a.pixel_weight->scalar_type() == acc && a.pixel_weight->is_contiguous(),
                      "softmax_cross_entropy_forward: pixel_weight must be a contiguous ",
                      a.target.sizes(), " tensor of ", acc, ", got ", a.pixel_weight->sizes(), " ",
                      a.pixel_weight->scalar_type());
  }
  TORCH_CHECK_VALUE(a.reduction >= 0 && a.reduction <= 2,
                    "softmax_cross_entropy_forward: reduction must be 0, 1 or 2, got ", a.reduction);
  TORCH_CHECK_VALUE(a.label_smoothing >= 0.0 && a.label_smoothing <= 1.0,
                    "softmax_cross_entropy_forward: label_smoothing must be in [0, 1], got ",
                    a.label_smoothing);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pixel_weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing) {
  const CrossEntropyArgs a{input, target, weight, pixel_weight, ignore_index, reduction, label_smoothing};
  check_inputs(a);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({2, target.size(0), target.size(1)}, input.options().dtype(acc));
  const bool per_pixel = reduction == kReductionNone;
  auto loss = per_pixel ? at::empty(target.sizes(), input.options()) : at::Tensor();
  const int64_t chunks = FASTSEG_CPU_CALL(softmax_cross_entropy_chunks, input.size(0), input.size(2),
                                          input.size(1), acc == at::kDouble);
  auto partials = at::empty({chunks, 2}, input.options().dtype(at::kDouble));
  FASTSEG_CPU_CALL(softmax_cross_entropy_forward_kernel, a, loss, lse, partials);
  // Chunk sums added in chunk order, here rather than through at::sum, whose order may
  // depend on the thread count.
  double loss_sum = 0, weight_sum = 0;
  const double* partial = partials.const_data_ptr<double>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    loss_sum += partial[2 * chunk];
    weight_sum += partial[2 * chunk + 1];
  }
  if (!per_pixel) {
    const double value = reduction == kReductionMean ? loss_sum / weight_sum : loss_sum;
    loss = at::scalar_tensor(value, input.options());
  }
  return {loss, lse, at::scalar_tensor(weight_sum, input.options().dtype(acc))};
}

at::Tensor backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                        const at::Tensor& lse, const at::Tensor& total_weight,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& pixel_weight, int64_t ignore_index,
                        int64_t reduction, double label_smoothing) {
  const CrossEntropyArgs a{input, target, weight, pixel_weight, ignore_index, reduction, label_smoothing};
  check_inputs(a);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == 2 && lse.size(1) == target.size(0) &&
                        lse.size(2) == target.size(1) && lse.scalar_type() == acc && lse.is_contiguous(),
                    "softmax_cross_entropy_backward: lse must be a contiguous (2, B, S) tensor of ",
                    acc, ", got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK_VALUE(total_weight.numel() == 1 && total_weight.scalar_type() == acc,
                    "softmax_cross_entropy_backward: total_weight must be a one-element ", acc, " tensor");
  if (reduction == kReductionNone) {
    TORCH_CHECK_VALUE(grad_output.sizes() == target.sizes(),
                      "softmax_cross_entropy_backward: grad_output must be ", target.sizes(),
                      " for reduction none, got ", grad_output.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_output.numel() == 1,
                      "softmax_cross_entropy_backward: grad_output must have one element, got ",
                      grad_output.sizes());
  }
  auto grad_input = at::empty_like(input);
  FASTSEG_CPU_CALL(softmax_cross_entropy_backward_kernel, a, grad_output, lse, total_weight, grad_input);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("softmax_cross_entropy_forward", &forward_cpu);
  m.impl("softmax_cross_entropy_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
