// U-Net's crop + concat + convolution on the CPU: a direct convolution that reads the skip's
// crop window and x in place, with neither the crop nor the concatenation materialized.
//
// A convolution is linear in its input channels, so the reduction over the Cs + Cx input
// channels simply runs over the two sources one after the other: the crop is an offset into
// the skip (ccc::split gives the zero-copy window), channel c < Cs reads the window, c >= Cs
// reads x.
//
// Two register-tiled micro-kernels serve the convolution passes (convolution_pass picks):
// - conv_tile (channel-vectorized): PIX output pixels x 2 vectors of output channels
//   accumulate over the k x k taps and the reduction channels, one broadcast input value times
//   2 weight vectors per step (6 x 16 floats in AVX2, 12 x 32 in AVX-512). It reads rows in
//   (pixel, channel) order.
// - planar_tile (pixel-vectorized), for outputs of at most one vector (the top U-Net levels,
//   where conv_tile would be bound by its broadcasts): OC output channels x PV vectors of
//   consecutive pixels, PV input loads and OC weight broadcasts per step. It reads planar
//   ([channel][pixel]) rows.
// The accumulators are arrays of the raw vector type (RawVector), which gcc keeps in
// registers. The passes:
// - forward: per thread, a ring of k input rows packed from the two sources (the crop window
//   and x, any strides) with the zero padding columns included; the weight packed once per
//   call as (Cout block, tap, Cin, lanes). Bias and ReLU are applied when the output row is
//   written, in the output's memory format.
// - grad input: the same convolution of the ReLU-masked output gradient G, stored once in
//   (n, y, x, Cout) order with a zero border of k - 1 - padding (the mask applied while it is
//   stored: G is the only temporary, the size of the output), with the weight flipped and
//   transposed; its output channels are written straight into the skip's crop window of
//   grad_skip (zero elsewhere) and into grad_x.
// - grad weight: per task, a fixed block of input channels x a fixed slice of output
//   channels: every tap's (input channel, output channel) tile is reduced over the pixels of
//   blocks of rows and accumulated in the task's buffer, rows in order (wgrad_tile); for at
//   most half a vector of output channels, dot products over planar rows instead
//   (planar_wgrad_tile), per task of input channels x a fixed chunk of rows, the tasks' sums
//   added in task order. No atomics and no partial sums that depend on the thread count:
//   every pass repeats bit for bit for any number of threads.
//
// This file is compiled once per CPU capability (see setup.py and cpu_capability.h).
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastseg/cpu_capability.h"
#include "fastseg/cpu_planes.h"
#include "fastseg/crop_concat_conv2d.h"

namespace fastseg::cpu {

// The problem, in the terms of the convolution a pass runs (its input rows in, its output
// rows out): batch, output rows and columns, kernel size.
struct ConvShape {
  int64_t batch, out_h, out_w, k;
};

namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// f(0), ..., f(N - 1) with compile-time indices: the register tiles must be unrolled
// completely for their accumulators to stay in registers.
template <int N, typename F>
inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The register tiles' accumulators are arrays of the raw vector type: an array of AVX-512
// Vectorized objects gcc keeps on the stack (a load and a store around every FMA: the
// AVX-512 kernels ran slower than the AVX2 ones), the raw __m512 it keeps in registers.
// AVX-512 has 32 vector registers, AVX2 16: the register tiles are twice as large there.
template <typename T>
constexpr bool kWideRegisterFile = Vectorized<T>::size() * sizeof(T) == 64;

#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
using RawVector = std::conditional_t<std::is_same_v<T, float>, __m512, __m512d>;
#elif defined(CPU_CAPABILITY_AVX2)
template <typename T>
using RawVector = std::conditional_t<std::is_same_v<T, float>, __m256, __m256d>;
#else
template <typename T>
using RawVector = Vectorized<T>;
#endif

// out[p][j] (+)= sum over taps t = ky * K + kx in [t0, t1) and reduction channels c in
// [c0, c1) of  rows[ky][(x0 + p + kx) * pixel_stride + c] * w[(t * C + c) * CB + j]
// for PIX pixels and CB = NV * vector-size lanes. The sum starts from zero and is added to
// out once (`accumulate`), so a long reduction is summed in two levels: its float32 error
// stays near eager's.
// Not inlined (nor wgrad_tile): inside the callers' loop nests gcc runs out of registers
// and keeps the accumulators on the stack (seen: 2x slower).
template <typename T, int K, int PIX, int NV>
C10_NOINLINE __attribute__((flatten)) void conv_tile(const T* const* rows, int64_t pixel_stride, int64_t x0, int64_t C, int64_t c0, int64_t c1,
                      int t0, int t1, const T* w, T* out, bool accumulate) {
  using V = Vectorized<T>;
  using R = RawVector<T>;
  constexpr int VS = V::size(), CB = NV * VS;
  R acc[PIX][NV];
  unroll<PIX>([&](auto p) { unroll<NV>([&](auto j) { acc[p][j] = R(V(T(0))); }); });
  for (int t = t0; t < t1; ++t) {
    const int ky = t / K, kx = t % K;
    const T* a = rows[ky] + (x0 + kx) * pixel_stride;
    const T* wt = w + t * C * CB;
    for (int64_t c = c0; c < c1; ++c) {
      V b[NV];
      unroll<NV>([&](auto j) { b[j] = V::loadu(wt + c * CB + j * VS); });
      unroll<PIX>([&](auto p) {
        const V av(a[p * pixel_stride + c]);
        unroll<NV>([&](auto j) { acc[p][j] = R(at::vec::fmadd(av, b[j], V(acc[p][j]))); });
      });
    }
  }
  unroll<PIX>([&](auto p) {
    unroll<NV>([&](auto j) {
      T* to = out + p * CB + j * VS;
      (accumulate ? V::loadu(to) + V(acc[p][j]) : V(acc[p][j])).store(to);
    });
  });
}

// acc[i][j] += sum over rows r < rows and x < width of
//   a_rows[r][a_offset + x * a_stride + i] * g_rows[r][g_offset + x * g_stride + j]:
// one tap's (CI input channels) x (CB output channels) tile of the weight gradient over a block
// of rows (several rows per call: at the deep levels a row is only a few dozen pixels).
template <typename T, int CI, int NV>
C10_NOINLINE __attribute__((flatten)) void wgrad_tile(const T* const* a_rows, int64_t a_offset, int64_t a_stride, const T* const* g_rows,
                             int64_t g_offset, int64_t g_stride, int rows, int64_t width, T* acc_out,
                             int64_t acc_stride) {
  using V = Vectorized<T>;
  using R = RawVector<T>;
  constexpr int VS = V::size();
  R acc[CI][NV];
  unroll<CI>([&](auto i) { unroll<NV>([&](auto j) { acc[i][j] = R(V(T(0))); }); });
  for (int r = 0; r < rows; ++r) {
    const T* a = a_rows[r] + a_offset;
    const T* g = g_rows[r] + g_offset;
    for (int64_t x = 0; x < width; ++x) {
      V b[NV];
      unroll<NV>([&](auto j) { b[j] = V::loadu(g + x * g_stride + j * VS); });
      unroll<CI>([&](auto i) {
        const V av(a[x * a_stride + i]);
        unroll<NV>([&](auto j) { acc[i][j] = R(at::vec::fmadd(av, b[j], V(acc[i][j]))); });
      });
    }
  }
  // The block's sum is added once: two-level summation keeps the float32 error near eager's.
  unroll<CI>([&](auto i) {
    unroll<NV>([&](auto j) {
      T* to = acc_out + i * acc_stride + j * VS;
      (V::loadu(to) + V(acc[i][j])).store(to);
    });
  });
}

// The pixel-vectorized tile, for narrow outputs (at most one vector of output channels: the
// top U-Net levels). There the channel-vectorized tile broadcasts one input value per FMA and
// is bound by loads (and with 8 output channels AVX-512 leaves half of each vector empty);
// here the lanes hold PV vectors of consecutive pixels of OC output channels, so per
// (tap, reduction channel) PV input loads and OC weight broadcasts feed OC x PV FMAs:
// out[o * out_plane + x0 + i] (+)= sum over taps t in [t0, t1), channels c in [c0, c1) of
//   rows[ky][c * plane + x0 + i + kx] * w[(t * C + c) * OC + o]          (i < PV * VS, o < OC)
template <typename T, int K, int OC, int PV>
C10_NOINLINE __attribute__((flatten)) void planar_tile(const T* const* rows, int64_t plane, int64_t x0, int64_t C,
                                                       int64_t c0, int64_t c1, int t0, int t1, const T* w, T* out,
                                                       int64_t out_plane, bool accumulate) {
  using V = Vectorized<T>;
  using R = RawVector<T>;
  constexpr int VS = V::size();
  R acc[OC][PV];
  unroll<OC>([&](auto o) { unroll<PV>([&](auto i) { acc[o][i] = R(V(T(0))); }); });
  for (int t = t0; t < t1; ++t) {
    const int ky = t / K, kx = t % K;
    const T* a = rows[ky] + x0 + kx;
    const T* wt = w + t * C * OC;
    for (int64_t c = c0; c < c1; ++c) {
      V in[PV];
      unroll<PV>([&](auto i) { in[i] = V::loadu(a + c * plane + i * VS); });
      unroll<OC>([&](auto o) {
        const V wv(wt[c * OC + o]);
        unroll<PV>([&](auto i) { acc[o][i] = R(at::vec::fmadd(in[i], wv, V(acc[o][i]))); });
      });
    }
  }
  unroll<OC>([&](auto o) {
    unroll<PV>([&](auto i) {
      T* to = out + o * out_plane + x0 + i * VS;
      (accumulate ? V::loadu(to) + V(acc[o][i]) : V(acc[o][i])).store(to);
    });
  });
}

// The weight gradient's pixel-vectorized tile, for narrow outputs (the channel-vectorized
// wgrad_tile would fill at most one vector with output channels, half of it with 8 of them in
// AVX-512, and broadcast an input value per FMA): one tap's OC output x CI input channels as
// dot products over the pixels of a block of rows, on planar rows:
// acc_out[(o * acc_stride + i) * VS + lane] += sum over r < rows, v < vectors of
//   g_rows[r][o * g_plane + v * VS + lane] * a_rows[r][i * a_plane + v * VS + lane]
// (the caller sums the lanes at the end; G is zero past the row's last pixel). The caller
// keeps `rows` small enough for the rows to stay in L1 across the taps' calls.
template <typename T, int OC, int CI>
C10_NOINLINE __attribute__((flatten)) void planar_wgrad_tile(const T* const* a_rows, int64_t a_offset, int64_t a_plane,
                                                             const T* const* g_rows, int64_t g_offset, int64_t g_plane,
                                                             int rows, int64_t vectors, T* acc_out,
                                                             int64_t acc_stride) {
  using V = Vectorized<T>;
  using R = RawVector<T>;
  constexpr int VS = V::size();
  R acc[OC][CI];
  unroll<OC>([&](auto o) { unroll<CI>([&](auto i) { acc[o][i] = R(V(T(0))); }); });
  for (int r = 0; r < rows; ++r) {
    const T* a = a_rows[r] + a_offset;
    const T* g = g_rows[r] + g_offset;
    for (int64_t v = 0; v < vectors; ++v) {
      V gv[OC];
      unroll<OC>([&](auto o) { gv[o] = V::loadu(g + o * g_plane + v * VS); });
      unroll<CI>([&](auto i) {
        const V av = V::loadu(a + i * a_plane + v * VS);
        unroll<OC>([&](auto o) { acc[o][i] = R(at::vec::fmadd(gv[o], av, V(acc[o][i]))); });
      });
    }
  }
  unroll<OC>([&](auto o) {
    unroll<CI>([&](auto i) {
      T* to = acc_out + (o * acc_stride + i) * VS;
      (V::loadu(to) + V(acc[o][i])).store(to);
    });
  });
}

// The reduction's input: the crop window and x, C = Cs + Cx channels (N, C, H, W), any strides.
template <typename T>
struct TwoSources {
  const T* data[2];
  Strided4 stride[2];
  int64_t channels[2];
  int64_t h, w;
};

// Packs input row `iy` of image n, channels [c0, c0 + count), into dst[(P + ix) * ld + c - c0]
// for ix in [0, W); the padding columns [0, P) and [P + W, width), the channels [count, ld)
// and a row outside [0, H) are zeros.
template <typename T>
void pack_row(const TwoSources<T>& in, int64_t n, int64_t iy, int64_t P, int64_t c0, int64_t count,
              int64_t ld, int64_t width, T* dst) {
  if (iy < 0 || iy >= in.h) {
    std::fill(dst, dst + width * ld, T(0));
    return;
  }
  std::fill(dst, dst + P * ld, T(0));
  std::fill(dst + (P + in.w) * ld, dst + width * ld, T(0));
  if (count < ld)
    for (int64_t ix = 0; ix < in.w; ++ix) std::fill(dst + (P + ix) * ld + count, dst + (P + ix + 1) * ld, T(0));
  T* row = dst + P * ld;
  int64_t first = 0;  // the first concatenated channel of source s
  for (int s = 0; s < 2; ++s) {
    const int64_t lo = std::max(c0, first), hi = std::min(c0 + count, first + in.channels[s]);
    if (lo < hi) {
      const Strided4& st = in.stride[s];
      const T* src = in.data[s] + n * st.n + iy * st.h + (lo - first) * st.c;
      T* out = row + (lo - c0);
      const int64_t cn = hi - lo;
      if (st.c == 1) {  // channels_last: a pixel's channels are one run
        for (int64_t ix = 0; ix < in.w; ++ix) {
          const T* from = src + ix * st.w;
          T* to = out + ix * ld;
          for (int64_t c = 0; c < cn; ++c) to[c] = from[c];
        }
      } else if (st.w == 1) {  // NCHW: rows of pixels per channel, transposed in register blocks
        at::vec::transpose_mxn<T>(src, st.c, out, ld, static_cast<int>(cn), static_cast<int>(in.w));
      } else {
        for (int64_t c = 0; c < cn; ++c)
          for (int64_t ix = 0; ix < in.w; ++ix) out[ix * ld + c] = src[c * st.c + ix * st.w];
      }
    }
    first += in.channels[s];
  }
}

// Where a pass writes its output channels: channel c of [begin, begin + count) to
// data[n * s.n + (c - begin) * s.c + y * s.h + x * s.w]. Up to two destinations.
template <typename T>
struct Destination {
  T* data;
  Strided4 stride;
  int64_t begin, count;
};

template <typename T>
struct Outputs {
  std::array<Destination<T>, 2> dst;
  int ndst;
  const T* bias;  // per output channel, or nullptr
  bool relu;
};

// Writes lanes [0, count) of a row buffer (rowbuf[x * x_stride + j * lane_stride] is channel
// c0 + j of column x) into the destinations, bias and ReLU applied.
template <typename T>
void write_row(const Outputs<T>& o, int64_t n, int64_t y, int64_t width, int64_t c0, int64_t count,
               const T* rowbuf, int64_t x_stride, int64_t lane_stride) {
  for (int d = 0; d < o.ndst; ++d) {
    const Destination<T>& dst = o.dst[d];
    const int64_t lo = std::max(c0, dst.begin), hi = std::min(c0 + count, dst.begin + dst.count);
    if (lo >= hi) continue;
    const Strided4& s = dst.stride;
    T* base = dst.data + n * s.n + y * s.h + (lo - dst.begin) * s.c;
    const auto write = [&](auto relu_) {
      constexpr bool relu = decltype(relu_)::value;
      using V = Vectorized<T>;
      constexpr int64_t VS = V::size();
      if (s.c == 1 && lane_stride == 1) {  // a pixel's channels are one run: vectors of lanes
        for (int64_t x = 0; x < width; ++x) {
          const T* from = rowbuf + x * x_stride + (lo - c0);
          T* to = base + x * s.w;
          for (int64_t c = 0; c < hi - lo; c += VS) {
            const int64_t m = std::min(VS, hi - lo - c);
            V v = V::loadu(from + c, m);
            if (o.bias) v = v + V::loadu(o.bias + lo + c, m);
            if (relu) v = at::vec::clamp_min(v, V(T(0)));  // as torch.relu: NaN stays NaN
            v.store(to + c, m);
          }
        }
      } else {
        for (int64_t c = lo; c < hi; ++c) {
          const T bias = o.bias ? o.bias[c] : T(0);
          T* to = base + (c - lo) * s.c;
          const T* from = rowbuf + (c - c0) * lane_stride;
          for (int64_t x = 0; x < width; ++x) {
            const T v = from[x * x_stride] + bias;
            to[x * s.w] = relu && v < T(0) ? T(0) : v;
          }
        }
      }
    };
    if (o.relu) {
      write(std::true_type{});
    } else {
      write(std::false_type{});
    }
  }
}

// Calls f(c0, c1, t0, t1, accumulate) for the groups a reduction over C channels x K x K taps
// is summed in: chunks of channels whose K x K x chunk x lanes weights stay in L1
// across a row's tiles, each chunk in groups of taps of at most about kTermsPerSum terms
// whatever the vector width (one group of all K * K taps of AVX-512's half-width chunk was 126
// terms, and grad_x's float32 error went past twice eager's). The first group starts the sum.
// The weights' budget is 32 KiB with AVX-512 (its forward measured 5-6% faster at the deep
// U-Net levels than with 16 KiB: longer runs of the innermost loop), 16 KiB otherwise.
template <typename T, int K, typename F>
inline void for_each_reduction_group(int64_t C, int64_t lanes, F&& f) {
  constexpr int64_t kL1Weights = kWideRegisterFile<T> ? 32768 : 16384, kTermsPerSum = 96;
  const int64_t chunk = std::max<int64_t>(8, kL1Weights / (K * K * lanes * int64_t(sizeof(T))));
  for (int64_t c0 = 0; c0 < std::max<int64_t>(C, 1); c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    const int taps = static_cast<int>(std::clamp<int64_t>(kTermsPerSum / std::max<int64_t>(c1 - c0, 1), 1, K * K));
    for (int t0 = 0; t0 < K * K; t0 += taps) f(c0, c1, t0, std::min(K * K, t0 + taps), c0 > 0 || t0 > 0);
  }
}

// One output row's tiles of the channel-vectorized kernel (rowbuf[x * CB + j]).
template <typename T, int K, int PIX, int NV>
void channel_tiles(const T* const* rows, int64_t pixel_stride, int64_t out_w, int64_t C, int64_t c0, int64_t c1,
                   int t0, int t1, const T* w, T* rowbuf, bool accumulate) {
  constexpr int64_t CB = NV * Vectorized<T>::size();
  int64_t x0 = 0;
  for (; x0 + PIX <= out_w; x0 += PIX)
    conv_tile<T, K, PIX, NV>(rows, pixel_stride, x0, C, c0, c1, t0, t1, w, rowbuf + x0 * CB, accumulate);
  // The row's last pixels in a narrower tile (PIX / 3 or 2 PIX / 3 wide) rather than a whole
  // one: up to 5 of 6 pixels would be computed for nothing (W = 32: 11%).
  const int64_t rest = out_w - x0;
  T* out = rowbuf + x0 * CB;
  if (rest <= 0) return;
  if (rest <= PIX / 3) {
    conv_tile<T, K, PIX / 3, NV>(rows, pixel_stride, x0, C, c0, c1, t0, t1, w, out, accumulate);
  } else if (rest <= 2 * PIX / 3) {
    conv_tile<T, K, 2 * PIX / 3, NV>(rows, pixel_stride, x0, C, c0, c1, t0, t1, w, out, accumulate);
  } else {
    conv_tile<T, K, PIX, NV>(rows, pixel_stride, x0, C, c0, c1, t0, t1, w, out, accumulate);
  }
}

// One output row's tiles of the pixel-vectorized kernel (rowbuf[o * out_plane + x]); the
// row's last pixels in 1 or 2 vectors when fewer are left.
template <typename T, int K, int OC, int PV>
void planar_tiles(const T* const* rows, int64_t plane, int64_t out_w, int64_t C, int64_t c0, int64_t c1, int t0,
                  int t1, const T* w, T* rowbuf, int64_t out_plane, bool accumulate) {
  constexpr int64_t VS = Vectorized<T>::size();
  int64_t x0 = 0;
  for (; x0 + PV * VS <= out_w; x0 += PV * VS)
    planar_tile<T, K, OC, PV>(rows, plane, x0, C, c0, c1, t0, t1, w, rowbuf, out_plane, accumulate);
  const int64_t rest = out_w - x0;
  if (rest <= 0) return;
  if (rest <= VS) {
    planar_tile<T, K, OC, 1>(rows, plane, x0, C, c0, c1, t0, t1, w, rowbuf, out_plane, accumulate);
  } else if (rest <= 2 * VS) {
    planar_tile<T, K, OC, std::min(2, PV)>(rows, plane, x0, C, c0, c1, t0, t1, w, rowbuf, out_plane, accumulate);
  } else {
    planar_tile<T, K, OC, PV>(rows, plane, x0, C, c0, c1, t0, t1, w, rowbuf, out_plane, accumulate);
  }
}

// Runs a register-tiled kernel over every output row: out(n, y) = sum over ky of
// rows(n, y + ky) (*) w, in blocks of `lanes` output channels (the weight packed per block).
// make_source() gives a thread its rows (row(n, r): padded input row r of image n);
// row_tiles(rows, w_block, c0, c1, t0, t1, accumulate, rowbuf) computes one reduction group
// of a row into rowbuf, whose (column x, lane j) is at x * x_stride + j * lane_stride.
template <typename T, int K, typename RowSource, typename RowTiles>
void conv_rows(const ConvShape& shape, int64_t C, int64_t out_channels, int64_t lanes, int64_t rowbuf_size,
               int64_t x_stride, int64_t lane_stride, const T* w_packed, const Outputs<T>& outputs,
               const RowSource& make_source, const RowTiles& row_tiles) {
  const int64_t blocks = (out_channels + lanes - 1) / lanes;
  const int64_t rows = shape.batch * shape.out_h;
  const int64_t work_per_row = std::max<int64_t>(1, shape.out_w * out_channels * C * K * K);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / work_per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    auto source = make_source();  // per-thread state (the packing ring)
    std::vector<T> rowbuf(rowbuf_size);
    const T* row_ptrs[K];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / shape.out_h, y = r % shape.out_h;
      for (int ky = 0; ky < K; ++ky) row_ptrs[ky] = source.row(n, y + ky);
      for (int64_t b = 0; b < blocks; ++b) {
        const T* wb = w_packed + b * K * K * C * lanes;
        for_each_reduction_group<T, K>(C, lanes,
                                       [&](int64_t c0, int64_t c1, int t0, int t1, bool accumulate) {
                                         row_tiles(row_ptrs, wb, c0, c1, t0, t1, accumulate, rowbuf.data());
                                       });
        write_row(outputs, n, y, shape.out_w, b * lanes, std::min(lanes, out_channels - b * lanes), rowbuf.data(),
                  x_stride, lane_stride);
      }
    }
  });
}

// A thread's ring of `slots` packed rows: pack(n, r, dst) packs row r of image n once while it
// is in use (K slots serve one output row at a time).
template <typename T, typename Pack>
struct RowRing {
  Pack pack;
  int64_t rows_per_image, row_size, slots;
  std::vector<T> ring;
  std::vector<int64_t> held;  // n * rows_per_image + r of the row in each slot, -1 if none
  RowRing(Pack pack_, int64_t rows_per_image_, int64_t row_size_, int64_t slots_)
      : pack(std::move(pack_)), rows_per_image(rows_per_image_), row_size(row_size_), slots(slots_),
        ring(slots_ * row_size_), held(slots_, -1) {}
  const T* row(int64_t n, int64_t r) {
    const int64_t slot = r % slots, key = n * rows_per_image + r;
    T* dst = ring.data() + slot * row_size;
    if (held[slot] != key) {
      pack(n, r, dst);
      held[slot] = key;
    }
    return dst;
  }
};

template <typename T, typename Pack>
RowRing<T, Pack> row_ring(Pack pack, int64_t rows_per_image, int64_t row_size, int64_t slots) {
  return RowRing<T, Pack>(std::move(pack), rows_per_image, row_size, slots);
}

// Rows of the two sources in (pixel, channel) order: channels [c0, c0 + count) at ld per pixel
// (see pack_row), `width` pixels with the P padding columns; rows padded by P above and below.
template <typename T>
auto packed_rows(const TwoSources<T>& in, int64_t P, int64_t c0, int64_t count, int64_t ld, int64_t width,
                 int64_t slots) {
  return row_ring<T>([&in, P, c0, count, ld, width](int64_t n, int64_t r, T* dst) {
    pack_row(in, n, r - P, P, c0, count, ld, width, dst);
  }, in.h + 2 * P, width * ld, slots);
}

// Rows of the two sources in (channel, pixel) order: channels [c0, c0 + count) in planes of
// `plane` pixels (the P padding columns, the row, then zeros), zero planes up to `planes`;
// rows padded by P above and below.
template <typename T>
auto planar_rows(const TwoSources<T>& in, int64_t P, int64_t plane, int64_t slots, int64_t c0, int64_t count,
                 int64_t planes) {
  return row_ring<T>([&in, P, plane, c0, count, planes](int64_t n, int64_t r, T* dst) {
    const int64_t iy = r - P;
    std::fill(dst + count * plane, dst + planes * plane, T(0));
    for (int64_t c = c0; c < c0 + count; ++c) {
      T* row = dst + (c - c0) * plane;
      if (iy < 0 || iy >= in.h) {
        std::fill(row, row + plane, T(0));
        continue;
      }
      const int s = c < in.channels[0] ? 0 : 1;
      const Strided4& st = in.stride[s];
      const T* from = in.data[s] + n * st.n + iy * st.h + (s == 0 ? c : c - in.channels[0]) * st.c;
      std::fill(row, row + P, T(0));
      if (st.w == 1) {
        std::copy(from, from + in.w, row + P);
      } else {
        for (int64_t ix = 0; ix < in.w; ++ix) row[P + ix] = from[ix * st.w];
      }
      std::fill(row + P + in.w, row + plane, T(0));
    }
  }, in.h + 2 * P, planes * plane, slots);
}

// dst[c * plane + x] = from[x * ld + c] for c < channels, x < columns, zeros for x in
// [columns, plane): a stored (pixel, channel) row of G as planar rows, transposed in register
// blocks.
template <typename T>
void stored_row_to_planar(const T* from, int64_t ld, int64_t channels, int64_t columns, int64_t plane, T* dst) {
  at::vec::transpose_mxn<T>(from, ld, dst, plane, static_cast<int>(columns), static_cast<int>(channels));
  for (int64_t c = 0; c < channels; ++c) std::fill(dst + c * plane + columns, dst + (c + 1) * plane, T(0));
}

// Rows of a stored (n, y, x, channel) buffer (the masked output gradient).
template <typename T>
struct StoredRows {
  const T* data;
  int64_t rows_per_image, row_stride;
  const T* row(int64_t n, int64_t r) const { return data + (n * rows_per_image + r) * row_stride; }
};

// weight (Cout, Cin, K, K) -> [block of CB output lanes][ky][kx][reduction channel][lane].
// forward: lanes = Cout, reduction = Cin; transposed (grad input): lanes = Cin, reduction =
// Cout, taps flipped.
template <typename T, int K>
at::Tensor pack_weight(const at::Tensor& weight, int64_t CB, bool transposed) {
  const int64_t cout = weight.size(0), cin = weight.size(1);
  const int64_t lanes = transposed ? cin : cout, reduction = transposed ? cout : cin;
  const int64_t blocks = (lanes + CB - 1) / CB;
  at::Tensor packed = at::empty({blocks * K * K * reduction * CB}, weight.options());
  T* out = packed.data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  const Strided4 s(weight);
  // In the packed order, one (block, tap) per task: at the deep levels this runs on every call
  // and a scattered scalar loop over the weight took a third of the forward's time.
  at::parallel_for(0, blocks * K * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / (K * K), ky = task % (K * K) / K, kx = task % K;
      const int64_t wy = transposed ? K - 1 - ky : ky, wx = transposed ? K - 1 - kx : kx;
      const int64_t used = std::min(CB, lanes - block * CB);
      const T* tap = w + wy * s.h + wx * s.w;
      // lane l and reduction channel r: weight (co, ci) = (l, r), transposed (r, l)
      const int64_t lane_stride = transposed ? s.c : s.n, reduction_stride = transposed ? s.n : s.c;
      T* dst = out + task * reduction * CB;
      for (int64_t r = 0; r < reduction; ++r, dst += CB) {
        const T* src = tap + r * reduction_stride + block * CB * lane_stride;
        for (int64_t j = 0; j < used; ++j) dst[j] = src[j * lane_stride];
        std::fill(dst + used, dst + CB, T(0));
      }
    }
  });
  return packed;
}

template <typename T>
TwoSources<T> two_sources(const at::Tensor& crop, const at::Tensor& x) {
  return {{crop.const_data_ptr<T>(), x.const_data_ptr<T>()},
          {Strided4(crop), Strided4(x)},
          {crop.size(1), x.size(1)},
          x.size(2),
          x.size(3)};
}

// The widest pixel tile (rows are padded to a multiple of it).
constexpr int64_t kMaxTilePixels = 24;

// The channel-vectorized tile: 6 pixels x 2 vectors of output channels (12 accumulators of
// AVX2's 16 registers), twice the pixels with AVX-512 (24 accumulators + the weights + a
// broadcast of its 32).
template <typename T>
constexpr int kChannelTilePixels = kWideRegisterFile<T> ? 12 : 6;
// The pixel-vectorized tile (outputs of at most one vector): OC channels x PV vectors of
// pixels, 24 accumulators with AVX-512, 8 with AVX2.
template <typename T>
constexpr int kPlanarChannels = kWideRegisterFile<T> ? 8 : 4;
template <typename T>
constexpr int kPlanarVectors = kWideRegisterFile<T> ? 3 : 2;
// The weight gradient's pixel-vectorized tile: OC output x CI input channels (24 accumulators
// + 4 gradient vectors + an input vector with AVX-512; 12 + 2 + 1 with AVX2).
template <typename T>
constexpr int kPlanarWgradOut = kWideRegisterFile<T> ? 4 : 2;
template <typename T>
constexpr int kPlanarWgradIn = 6;

// A convolution pass over (N, out_h, out_w) with `lanes` output channels from `reduction`
// channels: the pixel-vectorized kernel on planar rows when the outputs fit in one vector, the
// channel-vectorized one on (pixel, channel) rows otherwise. make_planar_source(plane) and
// make_packed_source(width) give a thread its rows; transposed: the weight of the input
// gradient.
template <typename T, int K, typename PlanarSource, typename PackedSource>
void convolution_pass(const ConvShape& shape, int64_t reduction, int64_t lanes, const at::Tensor& weight,
                      bool transposed, const Outputs<T>& outputs, int64_t pixel_stride,
                      const PlanarSource& make_planar_source, const PackedSource& make_packed_source) {
  constexpr int64_t VS = Vectorized<T>::size();
  if (lanes <= VS) {
    constexpr int OC = kPlanarChannels<T>, PV = kPlanarVectors<T>;
    const at::Tensor w = pack_weight<T, K>(weight, OC, transposed);
    const int64_t out_plane = round_up(shape.out_w, VS), plane = out_plane + K - 1;
    conv_rows<T, K>(shape, reduction, lanes, OC, OC * out_plane, 1, out_plane, w.const_data_ptr<T>(), outputs,
                    [&] { return make_planar_source(plane); },
                    [&](const T* const* rows, const T* wb, int64_t c0, int64_t c1, int t0, int t1, bool accumulate,
                        T* rowbuf) {
                      planar_tiles<T, K, OC, PV>(rows, plane, shape.out_w, reduction, c0, c1, t0, t1, wb, rowbuf,
                                                 out_plane, accumulate);
                    });
  } else {
    constexpr int PIX = kChannelTilePixels<T>, NV = 2;
    constexpr int64_t CB = NV * VS;
    const at::Tensor w = pack_weight<T, K>(weight, CB, transposed);
    const int64_t width = round_up(shape.out_w, kMaxTilePixels) + K - 1;
    conv_rows<T, K>(shape, reduction, lanes, CB, round_up(shape.out_w, PIX) * CB, CB, 1, w.const_data_ptr<T>(),
                    outputs, [&] { return make_packed_source(width); },
                    [&](const T* const* rows, const T* wb, int64_t c0, int64_t c1, int t0, int t1, bool accumulate,
                        T* rowbuf) {
                      channel_tiles<T, K, PIX, NV>(rows, pixel_stride, shape.out_w, reduction, c0, c1, t0, t1, wb,
                                                   rowbuf, accumulate);
                    });
  }
}

template <typename F>
void with_kernel_size(int64_t k, F&& f) {
  if (k == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void forward_typed(const at::Tensor& crop, const at::Tensor& x, const at::Tensor& weight, const T* bias,
                   int64_t padding, bool relu, at::Tensor& out) {
  const TwoSources<T> in = two_sources<T>(crop, x);
  const int64_t C = crop.size(1) + x.size(1), cout = weight.size(0);
  const ConvShape shape{x.size(0), out.size(2), out.size(3), weight.size(2)};
  Outputs<T> outputs{{Destination<T>{out.data_ptr<T>(), Strided4(out), 0, cout}, Destination<T>{}}, 1, bias, relu};
  with_kernel_size(shape.k, [&](auto k_) {
    constexpr int K = decltype(k_)::value;
    convolution_pass<T, K>(
        shape, C, cout, weight, /*transposed=*/false, outputs, C,
        [&](int64_t plane) { return planar_rows(in, padding, plane, K, 0, C, C); },
        [&](int64_t width) { return packed_rows(in, padding, 0, C, C, width, K); });
  });
}

template <typename T>
void backward_typed(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& crop,
                    const at::Tensor& x, const at::Tensor& weight, int64_t padding, bool relu,
                    at::Tensor& grad_crop, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using V = Vectorized<T>;
  constexpr int VS = V::size();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), cs = crop.size(1), cx = x.size(1);
  const int64_t cin = cs + cx, cout = weight.size(0), k = weight.size(2);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  const int64_t border = k - 1 - padding;  // the transposed convolution's padding
  // The masked gradient G in (n, y, x, channel) order, Cout padded to the lanes the
  // channel-vectorized weight gradient reads (one vector up to VS channels, else whole vector
  // pairs; not padded for at most VS / 2, whose weight gradient reads planar copies), with
  // `border` zero rows and columns around it and room for whole pixel tiles.
  const int64_t cg = 2 * cout <= VS ? std::max<int64_t>(cout, 1)
                                    : round_up(cout, cout <= VS ? VS : 2 * VS);
  const int64_t hg = Ho + 2 * border, wg = round_up(W, kMaxTilePixels) + k - 1;
  at::Tensor g = at::zeros({N, hg, wg, cg}, grad_output.options());
  {
    T* gd = g.data_ptr<T>();
    const T* go = grad_output.const_data_ptr<T>();
    const T* od = output.const_data_ptr<T>();
    const Strided4 sg(grad_output), so(output);
    at::parallel_for(0, N * Ho, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(Wo * cout, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / Ho, y = r % Ho;
        T* row = gd + ((n * hg + y + border) * wg + border) * cg;
        const T* gy = go + n * sg.n + y * sg.h;
        const T* oy = od + n * so.n + y * so.h;
        // ReLU: the gradient passes where the output is positive (threshold_backward). Both
        // values are loaded and one selected, without a branch: a branch on the mask of a
        // random sign pattern mispredicts half the time (this copy took a third of the
        // backward at the deep levels).
        const auto copy = [&](auto relu_) {
          const auto masked = [&](int64_t c, int64_t xx) {
            const T v = gy[c * sg.c + xx * sg.w];
            if constexpr (decltype(relu_)::value) {
              return oy[c * so.c + xx * so.w] > T(0) ? v : T(0);
            } else {
              return v;
            }
          };
          if (sg.c == 1 && so.c == 1) {  // channels_last: both runs contiguous
            for (int64_t xx = 0; xx < Wo; ++xx)
              for (int64_t c = 0; c < cout; ++c) row[xx * cg + c] = masked(c, xx);
          } else {
            for (int64_t c = 0; c < cout; ++c)
              for (int64_t xx = 0; xx < Wo; ++xx) row[xx * cg + c] = masked(c, xx);
          }
        };
        if (relu) {
          copy(std::true_type{});
        } else {
          copy(std::false_type{});
        }
      }
    });
  }
  grad_bias.copy_(g.view({-1, cg}).narrow(1, 0, cout).sum(0));
  const StoredRows<T> g_rows{g.const_data_ptr<T>(), hg, wg * cg};

  with_kernel_size(k, [&](auto k_) {
    constexpr int K = decltype(k_)::value;
    // Grad input: conv(G padded by `border`, flipped transposed weight) over (N, H, W).
    Outputs<T> outputs{{Destination<T>{grad_crop.data_ptr<T>(), Strided4(grad_crop), 0, cs},
                        Destination<T>{grad_x.data_ptr<T>(), Strided4(grad_x), cs, cx}},
                       2, nullptr, false};
    convolution_pass<T, K>(
        ConvShape{N, H, W, K}, cout, cin, weight, /*transposed=*/true, outputs, cg,
        // G's rows transposed to planar ones (zeros past G's columns).
        [&](int64_t plane) {
          return row_ring<T>([&, plane](int64_t n, int64_t r, T* dst) {
            stored_row_to_planar(g_rows.row(n, r), cg, cout, std::min(plane, wg), plane, dst);
          }, hg, cout * plane, K);
        },
        [&](int64_t) { return g_rows; });

    // Grad weight of the narrowest outputs: tasks of CI input channels x a fixed chunk of rows; each
    // task's partial sums in its own buffer, added in task order (the same for any thread
    // count).
    const auto planar_wgrad = [&] {
      constexpr int OC = kPlanarWgradOut<T>, CI = kPlanarWgradIn<T>, kRowBlock = 8;
      constexpr int64_t kRowsPerTask = 4 * kRowBlock;
      const int64_t co_planes = round_up(cout, OC), g_plane = round_up(Wo, VS), a_plane = g_plane + K - 1;
      // Rows per block: the block's OC + CI planes stay in L1 (32 KiB) across the 9 taps.
      const int rows_per_block = static_cast<int>(
          std::clamp<int64_t>(32768 / ((OC + CI) * a_plane * int64_t(sizeof(T))), 1, kRowBlock));
      const int64_t ci_blocks = (cin + CI - 1) / CI, row_chunks = (N * Ho + kRowsPerTask - 1) / kRowsPerTask;
      const int64_t partial_size = K * K * co_planes * CI * VS;
      std::vector<T> partials(ci_blocks * row_chunks * partial_size, T(0));
      const TwoSources<T> in = two_sources<T>(crop, x);
      at::parallel_for(0, ci_blocks * row_chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> gbuf(kRowBlock * co_planes * g_plane, T(0));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t ci0 = (task / row_chunks) * CI, ci_count = std::min<int64_t>(CI, cin - ci0);
          const int64_t row0 = (task % row_chunks) * kRowsPerTask, row1 = std::min(N * Ho, row0 + kRowsPerTask);
          T* acc = partials.data() + task * partial_size;
          auto rows = planar_rows(in, padding, a_plane, kRowBlock + K - 1, ci0, ci_count, CI);
          const T* a_rows[K][kRowBlock];
          const T* grad_rows[kRowBlock];
          // Blocks of up to rows_per_block rows of one image.
          for (int64_t r0 = row0; r0 < row1;) {
            const int64_t n = r0 / Ho, y0 = r0 % Ho;
            const int block = static_cast<int>(std::min<int64_t>({rows_per_block, Ho - y0, row1 - r0}));
            for (int r = 0; r < block + K - 1; ++r) {
              const T* packed = rows.row(n, y0 + r);
              for (int ky = 0; ky < K; ++ky)
                if (r - ky >= 0 && r - ky < block) a_rows[ky][r - ky] = packed;
            }
            for (int r = 0; r < block; ++r) {  // G's rows, planar (zeros past Wo and cout)
              T* dst = gbuf.data() + r * co_planes * g_plane;
              stored_row_to_planar(g_rows.row(n, y0 + r + border) + border * cg, cg, cout, Wo, g_plane, dst);
              grad_rows[r] = dst;
            }
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx)
                for (int64_t co0 = 0; co0 < co_planes; co0 += OC)
                  planar_wgrad_tile<T, OC, CI>(a_rows[ky], kx, a_plane, grad_rows, co0 * g_plane, g_plane, block,
                                               g_plane / VS, acc + ((ky * K + kx) * co_planes + co0) * CI * VS, CI);
            r0 += block;
          }
        }
      });
      T* gw = grad_weight.data_ptr<T>();  // contiguous (Cout, Cin, K, K)
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t co = 0; co < cout; ++co)
          for (int64_t tap = 0; tap < K * K; ++tap) {
            const int64_t b = ci / CI;
            T sum = T(0);
            for (int64_t chunk = 0; chunk < row_chunks; ++chunk) {
              const T* lanes = partials.data() + (b * row_chunks + chunk) * partial_size +
                               ((tap * co_planes + co) * CI + ci % CI) * VS;
              for (int j = 0; j < VS; ++j) sum += lanes[j];
            }
            gw[(co * cin + ci) * K * K + tap] = sum;
          }
    };

    // Grad weight: tasks of CIB input channels x (a slice of output channels), in register
    // tiles of CI input channels (12 with AVX-512's 32 registers, 6 with AVX2's 16).
    const auto wgrad = [&](auto nv_) {
      constexpr int NV = decltype(nv_)::value, CI = kWideRegisterFile<T> ? 12 : 6;
      constexpr int64_t CB = NV * VS, CIB = 12, kChannelTiles = CIB / CI;
      constexpr int kRowBlock = 8;
      const int64_t slice = std::min<int64_t>(round_up(cout, CB), 4 * CB);
      const int64_t ci_blocks = (cin + CIB - 1) / CIB, co_slices = (round_up(cout, CB) + slice - 1) / slice;
      const TwoSources<T> in = two_sources<T>(crop, x);
      const int64_t width = round_up(Wo, kMaxTilePixels) + K - 1;
      T* gw = grad_weight.data_ptr<T>();  // contiguous (Cout, Cin, K, K)
      at::parallel_for(0, ci_blocks * co_slices, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> acc(K * K * CIB * slice);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t ci0 = (task / co_slices) * CIB, co0 = (task % co_slices) * slice;
          const int64_t ci_count = std::min(CIB, cin - ci0);
          const int64_t co_count = std::min(slice, cout - co0), co_lanes = round_up(co_count, CB);
          std::fill(acc.begin(), acc.end(), T(0));
          // Fixed blocks of kRowBlock output rows per image (the same for any thread count).
          auto rows = packed_rows(in, padding, ci0, ci_count, CIB, width, kRowBlock + K - 1);
          const T* a_rows[K][kRowBlock];
          const T* grad_rows[kRowBlock];
          for (int64_t n = 0; n < N; ++n) {
            for (int64_t y0 = 0; y0 < Ho; y0 += kRowBlock) {
              const int block = static_cast<int>(std::min<int64_t>(kRowBlock, Ho - y0));
              for (int r = 0; r < block + K - 1; ++r) {
                const T* packed = rows.row(n, y0 + r);
                for (int ky = 0; ky < K; ++ky)
                  if (r - ky >= 0 && r - ky < block) a_rows[ky][r - ky] = packed;
              }
              for (int r = 0; r < block; ++r) grad_rows[r] = g_rows.row(n, y0 + r + border) + border * cg + co0;
              for (int ky = 0; ky < K; ++ky)
                for (int kx = 0; kx < K; ++kx)
                  for (int64_t t = 0; t < kChannelTiles; ++t)
                    for (int64_t cb = 0; cb < co_lanes; cb += CB)
                      wgrad_tile<T, CI, NV>(a_rows[ky], kx * CIB + CI * t, CIB, grad_rows, cb, cg, block, Wo,
                                            acc.data() + ((ky * K + kx) * CIB + CI * t) * slice + cb, slice);
            }
          }
          for (int64_t co = 0; co < co_count; ++co)
            for (int64_t ci = 0; ci < ci_count; ++ci)
              for (int64_t tap = 0; tap < K * K; ++tap)
                gw[((co0 + co) * cin + ci0 + ci) * K * K + tap] = acc[(tap * CIB + ci) * slice + co];
        }
      });
    };
    // The pixel-vectorized tile where the channel-vectorized one would leave half of its one
    // vector empty (measured at 8 output channels in AVX-512: 1.6x faster; at 16 it is slower).
    if (2 * cout <= VS) {
      planar_wgrad();
    } else if (cout <= VS) {
      wgrad(std::integral_constant<int, 1>{});
    } else {
      wgrad(std::integral_constant<int, 2>{});
    }
  });
}

void crop_concat_conv2d_forward_kernel(const at::Tensor& crop, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor* bias, int64_t padding, bool relu, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "crop_concat_conv2d_forward", [&] {
    forward_typed<scalar_t>(crop, x, weight, bias ? bias->const_data_ptr<scalar_t>() : nullptr, padding, relu,
                            out);
  });
}

void crop_concat_conv2d_backward_kernel(const at::Tensor& grad_output, const at::Tensor& output,
                                        const at::Tensor& crop, const at::Tensor& x, const at::Tensor& weight,
                                        int64_t padding, bool relu, at::Tensor& grad_crop, at::Tensor& grad_x,
                                        at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "crop_concat_conv2d_backward", [&] {
    backward_typed<scalar_t>(grad_output, output, crop, x, weight, padding, relu, grad_crop, grad_x, grad_weight,
                             grad_bias);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef FASTSEG_CPU_DISPATCH_UNIT
FASTSEG_DECLARE_CPU_VARIANTS(
    void crop_concat_conv2d_forward_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor*, int64_t, bool, at::Tensor&);
    void crop_concat_conv2d_backward_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t, bool, at::Tensor&,
                                            at::Tensor&, at::Tensor&, at::Tensor&);)

namespace {

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK_NOT_IMPLEMENTED(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                              ": the CPU kernel takes float32 and float64, got ", x.scalar_type());
}

at::Tensor forward_cpu(const at::Tensor& skip, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t padding, int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_forward";
  const ccc::Sources s = ccc::split(op, skip, x, weight, padding, activation);
  ccc::check_bias(op, bias, weight);
  check_cpu_dtype(op, x);
  const int64_t k = weight.size(2);
  at::Tensor out = at::empty({x.size(0), weight.size(0), ccc::conv_output_size(x.size(2), k, padding),
                              ccc::conv_output_size(x.size(3), k, padding)},
                             x.options().memory_format(output_memory_format(x)));
  if (out.numel() == 0) return out;
  FASTSEG_CPU_CALL(crop_concat_conv2d_forward_kernel, s.crop, x, weight, bias ? &*bias : nullptr, padding,
                   activation == 1, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& skip, const at::Tensor& x,
    const at::Tensor& weight, int64_t padding, int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_backward";
  const ccc::Sources s = ccc::split(op, skip, x, weight, padding, activation);
  ccc::check_grad(op, grad_output, output);
  check_scores(op, "grad_output", grad_output, x);
  check_scores(op, "output", output, x);
  check_cpu_dtype(op, x);
  at::Tensor grad_skip = at::empty(skip.sizes(), skip.options().memory_format(output_memory_format(skip)));
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(output_memory_format(x)));
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty({weight.size(0)}, weight.options());
  if (grad_output.numel() == 0) {
    grad_skip.zero_();
    grad_x.zero_();
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_skip, grad_x, grad_weight, grad_bias};
  }
  // The kernel writes the whole crop window; only the rest is zeroed (the gradient is zero
  // there), so the window is not written twice.
  const int64_t h = x.size(2), w = x.size(3);
  grad_skip.narrow(2, 0, s.oy).zero_();
  grad_skip.narrow(2, s.oy + h, skip.size(2) - s.oy - h).zero_();
  at::Tensor window_rows = grad_skip.narrow(2, s.oy, h);
  window_rows.narrow(3, 0, s.ox).zero_();
  window_rows.narrow(3, s.ox + w, skip.size(3) - s.ox - w).zero_();
  at::Tensor grad_crop = window_rows.narrow(3, s.ox, w);
  FASTSEG_CPU_CALL(crop_concat_conv2d_backward_kernel, grad_output, output, s.crop, x, weight, padding,
                   activation == 1, grad_crop, grad_x, grad_weight, grad_bias);
  return {grad_skip, grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("crop_concat_conv2d_forward", &forward_cpu);
  m.impl("crop_concat_conv2d_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
