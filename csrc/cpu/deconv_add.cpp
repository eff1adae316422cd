// Fused per-class deconvolution + crop + skip-add (FCN's decoder) on the CPU.
//
// Forward, per output row of the cropped window: every input row that reaches it (at most
// ceil(k / s)) adds, input cell by input cell, its value times one row of the class's kernel
// into an accumulator row of Wo cells (each thread owns its rows, so this local scatter needs
// no atomics and has a fixed order); the skip is added and the row written once.
// Backward, per input row: the k rows of the output gradient it reaches are read once and
// give both gradients - grad_x (the kernel taps dotted with the gradient) and the input's
// contribution to grad_weight, accumulated per fixed block of input rows. The blocks are
// summed in order at the end, so grad_weight repeats bit for bit for any thread count.
// Rows are walked as planes of cells (cpu_planes.h); in channels_last order the kernel is
// read transposed to (kh, kw, C) so that the innermost loop runs over contiguous channels.
//
// This file is compiled once per CPU capability (see setup.py and cpu_capability.h).
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastseg/cpu_capability.h"
#include "fastseg/cpu_planes.h"
#include "fastseg/upsample_add.h"
#include "fastseg/upsample_add_checks.h"

namespace fastseg::cpu {

struct DeconvGeometry {
  int64_t in_h, in_w, out_h, out_w, kh, kw, stride_h, stride_w, crop_h, crop_w;
};

// Input rows per grad_weight partial: fixed, so that the summation order never depends on
// how the rows were split among threads.
constexpr int64_t kRowsPerPartial = 8;

namespace CPU_CAPABILITY {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The kernel as acc_t, laid out for the plane order: (C, kh, kw) for NCHW (a plane reads its
// class's kh x kw block), (kh, kw, C) for channels_last (a cell reads C contiguous values).
template <typename acc_t>
at::Tensor kernel_for(const at::Tensor& weight, const PlaneOrder& order) {
  auto w = weight.to(c10::CppTypeToScalarType<acc_t>::value).reshape({weight.size(0), weight.size(2), weight.size(3)});
  return order.channels_last ? w.permute({1, 2, 0}).contiguous() : w.contiguous();
}

// The phase decomposition of one row of a stride-s transposed convolution (NCHW rows, one
// class): D-index X = m * s + r (phase r in [0, s)) receives x[m - t] * k[t * s + r] for the
// taps t < T = ceil(k / s). The output window starts at D-index `crop`, so the row needs
// m in [m_lo, m_lo + M).
struct PhaseRows {
  int64_t stride, taps, m_lo, count;  // s, T, m_lo, M
  PhaseRows(int64_t stride_, int64_t k, int64_t crop, int64_t out)
      : stride(stride_), taps((k + stride_ - 1) / stride_), m_lo(crop / stride_),
        count((crop + out - 1) / stride_ - crop / stride_ + 1) {}
};

// Forward: adds the row x (in_w values, step x_step) through kernel row kr (kw taps) to
// drow[(m - m_lo) * s + r] (the D row from D-index m_lo * s). Tap block t of every input
// lands on its own block of s values, so consecutive inputs never write overlapping
// ranges (adding all k taps at once overlaps the next input's range, and the partial-overlap
// store-to-load forwarding stalled that loop at ~15 cycles an input). xbuf: M + T - 1 values.
// drow[u * S + r] += xt[u] * kt[r] for u < count, r < S (a stride known at compile time, so
// the block is whole vectors, unrolled).
template <int S, typename acc_t>
inline void add_blocks(const acc_t* __restrict__ xt, const acc_t* __restrict__ kt, int64_t count,
                       acc_t* __restrict__ drow) {
  for (int64_t u = 0; u < count; ++u) {
    const acc_t v = xt[u];
    acc_t* __restrict__ d = drow + u * S;
    for (int r = 0; r < S; ++r) d[r] += v * kt[r];
  }
}

template <typename scalar_t, typename acc_t, typename Step>
inline void add_row_by_phase(const scalar_t* x, Step x_step, int64_t in_w, const acc_t* __restrict__ kr,
                             int64_t kw, const PhaseRows& ph, acc_t* __restrict__ xbuf,
                             acc_t* __restrict__ drow) {
  const int64_t first = ph.m_lo - (ph.taps - 1);  // input index of xbuf[0]
  for (int64_t u = 0; u < ph.count + ph.taps - 1; ++u) {
    const int64_t j = first + u;
    xbuf[u] = (j >= 0 && j < in_w) ? static_cast<acc_t>(x[j * x_step]) : acc_t(0);
  }
  for (int64_t t = 0; t < ph.taps; ++t) {
    const acc_t* __restrict__ xt = xbuf + (ph.taps - 1 - t);  // xt[u] = x[m_lo + u - t]
    const acc_t* __restrict__ kt = kr + t * ph.stride;
    const int64_t phases = std::min(ph.stride, kw - t * ph.stride);
    if (phases == ph.stride) {  // FCN's k = 2s: whole blocks, with a compile-time size
      switch (ph.stride) {
        case 2: add_blocks<2>(xt, kt, ph.count, drow); continue;
        case 4: add_blocks<4>(xt, kt, ph.count, drow); continue;
        case 8: add_blocks<8>(xt, kt, ph.count, drow); continue;
        case 16: add_blocks<16>(xt, kt, ph.count, drow); continue;
        case 32: add_blocks<32>(xt, kt, ph.count, drow); continue;
        default: break;
      }
    }
    for (int64_t u = 0; u < ph.count; ++u) {
      const acc_t v = xt[u];
      acc_t* __restrict__ d = drow + u * ph.stride;
      for (int64_t r = 0; r < phases; ++r) d[r] += v * kt[r];
    }
  }
}

// Backward, phase-major: for one gradient row g (out values, step g_step):
// phase[r * M + u] = g at D-index m * s + r for m in [0, M) (M = in_w + T - 1), 0 outside.
template <typename scalar_t, typename acc_t, typename Step>
inline void row_to_phases(const scalar_t* g, Step g_step, int64_t crop, int64_t out, int64_t stride,
                          int64_t count, acc_t* __restrict__ phase) {
  for (int64_t m = 0; m < count; ++m) {
    const int64_t base = m * stride - crop;
    for (int64_t r = 0; r < stride; ++r) {
      const int64_t xo = base + r;
      phase[r * count + m] = (xo >= 0 && xo < out) ? static_cast<acc_t>(g[xo * g_step]) : acc_t(0);
    }
  }
}

template <typename scalar_t>
void forward_typed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* skip,
                   at::IntArrayRef offset, const DeconvGeometry& g, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const PlaneOrder order(output_memory_format(out) == at::MemoryFormat::ChannelsLast,
                         x.size(0), x.size(1));
  const at::Tensor kernel = kernel_for<acc_t>(weight, order);
  const acc_t* k_data = kernel.const_data_ptr<acc_t>();
  const Strided4 xs(x), os(out);
  const Strided4 ss = skip ? Strided4(*skip) : Strided4(out);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* skip_data =
      skip ? skip->const_data_ptr<scalar_t>() + offset[0] * ss.h + offset[1] * ss.w : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t cell = order.cell, C = order.channels;
  const int64_t rows = order.planes * g.out_h;
  const int64_t taps = (g.kh + g.stride_h - 1) / g.stride_h;

  // x_step, s_step, o_step: x, skip and output strides along the innermost axis (w for NCHW
  // cells, c for channels_last ones).
  auto run = [&](auto x_step, auto s_step, auto o_step) {
  at::parallel_for(0, rows, rows_per_task(g.out_w * cell * taps), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(g.out_w * cell);
    acc_t* __restrict__ acc = sums.data();
    const PhaseRows ph(g.stride_w, g.kw, g.crop_w, g.out_w);
    std::vector<acc_t> d_row(cell == 1 ? ph.stride * ph.count : 0), x_row(ph.count + ph.taps);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / g.out_h, y = row % g.out_h;
      const scalar_t* xp = x_data + xs.plane(plane, order.channels_last, C);
      // NCHW: this plane's class block; channels_last: the whole transposed kernel.
      const acc_t* kp = k_data + order.channel_of(plane) * g.kh * g.kw * (order.channels_last ? 0 : 1);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      int64_t i_lo, i_hi;
      deconv_input_range(y + g.crop_h, g.stride_h, g.kh, g.in_h, &i_lo, &i_hi);
      if (cell == 1) {
        std::fill(d_row.begin(), d_row.end(), acc_t(0));
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const int64_t p = y + g.crop_h - i * g.stride_h;
          add_row_by_phase(xp + i * xs.h, x_step, g.in_w, kp + p * g.kw, g.kw, ph, x_row.data(),
                           d_row.data());
        }
        const acc_t* window = d_row.data() + (g.crop_w - ph.m_lo * ph.stride);
        std::copy(window, window + g.out_w, acc);
      }
      for (int64_t i = i_lo; i < i_hi && cell > 1; ++i) {
        const int64_t p = y + g.crop_h - i * g.stride_h;
        const scalar_t* xr = xp + i * xs.h;
        const acc_t* kr = kp + p * g.kw * cell;
        // channels_last: cells of C values. Taps in chunks of one stride: within a chunk,
        // consecutive inputs j write disjoint
        // runs of the accumulator (all k taps at once overlap the next input's run, and the
        // partial-overlap store-to-load forwarding stalled the loop at ~15 cycles an input).
        for (int64_t q0 = 0; q0 < g.kw; q0 += g.stride_w) {
          for (int64_t j = 0; j < g.in_w; ++j) {
            int64_t q_lo, q_hi;
            deconv_tap_range(j, g.stride_w, g.kw, g.crop_w, g.out_w, &q_lo, &q_hi);
            q_lo = std::max(q_lo, q0);
            q_hi = std::min(q_hi, q0 + g.stride_w);
            if (q_lo >= q_hi) continue;
            acc_t* __restrict__ a = acc + (j * g.stride_w - g.crop_w) * cell;  // output cell of tap 0
            const scalar_t* xc = xr + j * xs.w;
            for (int64_t q = q_lo; q < q_hi; ++q) {
              acc_t* aq = a + q * cell;
              const acc_t* kq = kr + q * cell;
              for (int64_t c = 0; c < cell; ++c) aq[c] += static_cast<acc_t>(xc[c * x_step]) * kq[c];
            }
          }
        }
      }
      scalar_t* __restrict__ o = out_data + os.plane(plane, order.channels_last, C) + y * os.h;
      const scalar_t* s = skip_data ? skip_data + ss.plane(plane, order.channels_last, C) + y * ss.h : nullptr;
      if (cell == 1 && s) {
        for (int64_t xo = 0; xo < g.out_w; ++xo) {
          o[xo * o_step] = static_cast<scalar_t>(acc[xo] + static_cast<acc_t>(s[xo * s_step]));
        }
      } else if (cell == 1) {
        for (int64_t xo = 0; xo < g.out_w; ++xo) o[xo * o_step] = static_cast<scalar_t>(acc[xo]);
      } else {
        for (int64_t xo = 0; xo < g.out_w; ++xo) {
          const acc_t* a = acc + xo * cell;
          scalar_t* oc = o + xo * os.w;
          if (s) {
            const scalar_t* sc = s + xo * ss.w;
            for (int64_t c = 0; c < cell; ++c) {
              oc[c * o_step] = static_cast<scalar_t>(a[c] + static_cast<acc_t>(sc[c * s_step]));
            }
          } else {
            for (int64_t c = 0; c < cell; ++c) oc[c * o_step] = static_cast<scalar_t>(a[c]);
          }
        }
      }
    }
  });
  };
  if (cell == 1) {
    with_unit_strides(run, xs.w, skip ? ss.w : 1, os.w);
  } else {
    with_unit_strides(run, xs.c, skip ? ss.c : 1, os.c);
  }
}

template <typename scalar_t>
void backward_typed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                    const DeconvGeometry& g, at::Tensor& grad_x, at::Tensor& grad_weight) {
  using acc_t = acc_type<scalar_t>;
  const PlaneOrder order(output_memory_format(grad_x) == at::MemoryFormat::ChannelsLast,
                         x.size(0), x.size(1));
  const at::Tensor kernel = kernel_for<acc_t>(weight, order);
  const acc_t* k_data = kernel.const_data_ptr<acc_t>();
  const Strided4 gs(grad), xs(x), dxs(grad_x);
  const scalar_t* g_data = grad.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* gx_data = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t cell = order.cell, C = order.channels;
  const int64_t taps = g.kh * g.kw * cell;  // one partial's size
  const int64_t blocks = (g.in_h + kRowsPerPartial - 1) / kRowsPerPartial;
  const int64_t units = order.planes * blocks;
  // partials[unit][tap]: unit = plane * blocks + block.
  std::vector<acc_t> partials(units * taps, acc_t(0));

  const int64_t work_per_unit = kRowsPerPartial * g.kh * g.in_w * g.kw * cell;
  // g_step, x_step: gradient and x strides along the innermost axis (w for NCHW cells, c else).
  auto run = [&](auto g_step, auto x_step) {
  at::parallel_for(0, units, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work_per_unit, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_sums(g.in_w * cell);
    const int64_t taps_w = (g.kw + g.stride_w - 1) / g.stride_w, count = g.in_w + taps_w - 1;
    std::vector<acc_t> phase_table(cell == 1 ? g.stride_w * count : 0), x_row(cell == 1 ? g.in_w : 0);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t plane = unit / blocks, block = unit % blocks;
      const scalar_t* gp = g_data + gs.plane(plane, order.channels_last, C);
      const scalar_t* xp = x_data + xs.plane(plane, order.channels_last, C);
      const acc_t* kp = k_data + order.channel_of(plane) * g.kh * g.kw * (order.channels_last ? 0 : 1);
      acc_t* part = partials.data() + unit * taps;
      const int64_t i_end = std::min(g.in_h, (block + 1) * kRowsPerPartial);
      for (int64_t i = block * kRowsPerPartial; i < i_end; ++i) {
        std::fill(row_sums.begin(), row_sums.end(), acc_t(0));
        const scalar_t* xr = xp + i * xs.h;
        int64_t p_lo, p_hi;
        deconv_tap_range(i, g.stride_h, g.kh, g.crop_h, g.out_h, &p_lo, &p_hi);
        if (cell == 1) {
          // Phase by phase (see PhaseRows): grad_x[j] += k[q] * G[j * s + q - crop] and
          // grad_weight[q] += sum_j x[j] * G[j * s + q - crop] are, for each tap q, one
          // contiguous axpy and one dot product over j.
          for (int64_t j = 0; j < g.in_w; ++j) x_row[j] = static_cast<acc_t>(xr[j * x_step]);
          for (int64_t p = p_lo; p < p_hi; ++p) {
            row_to_phases(gp + (i * g.stride_h + p - g.crop_h) * gs.h, g_step, g.crop_w, g.out_w,
                          g.stride_w, count, phase_table.data());
            const acc_t* __restrict__ kr = kp + p * g.kw;
            acc_t* __restrict__ pr = part + p * g.kw;
            acc_t* __restrict__ rs = row_sums.data();
            const acc_t* __restrict__ xv = x_row.data();
            for (int64_t q = 0; q < g.kw; ++q) {
              const acc_t* __restrict__ gq = phase_table.data() + (q % g.stride_w) * count + q / g.stride_w;
              const acc_t w = kr[q];
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t j = 0; j < g.in_w; ++j) {
                rs[j] += w * gq[j];
                dot += xv[j] * gq[j];
              }
              pr[q] += dot;
            }
          }
        }
        for (int64_t p = p_lo; p < p_hi && cell > 1; ++p) {
          const scalar_t* gr = gp + (i * g.stride_h + p - g.crop_h) * gs.h;
          const acc_t* __restrict__ kr = kp + p * g.kw * cell;
          acc_t* __restrict__ pr = part + p * g.kw * cell;
          for (int64_t j = 0; j < g.in_w; ++j) {
            int64_t q_lo, q_hi;
            deconv_tap_range(j, g.stride_w, g.kw, g.crop_w, g.out_w, &q_lo, &q_hi);
            if (q_lo >= q_hi) continue;
            const scalar_t* __restrict__ gq0 = gr + (j * g.stride_w - g.crop_w) * gs.w;  // gradient at tap 0
            const scalar_t* xc = xr + j * xs.w;
            acc_t* rs = row_sums.data() + j * cell;
            for (int64_t q = q_lo; q < q_hi; ++q) {
              const scalar_t* gc = gq0 + q * gs.w;
              const acc_t* kq = kr + q * cell;
              acc_t* pq = pr + q * cell;
              for (int64_t c = 0; c < cell; ++c) {
                const acc_t d = static_cast<acc_t>(gc[c * g_step]);
                rs[c] += kq[c] * d;
                pq[c] += static_cast<acc_t>(xc[c * x_step]) * d;
              }
            }
          }
        }
        scalar_t* o = gx_data + dxs.plane(plane, order.channels_last, C) + i * dxs.h;
        for (int64_t j = 0; j < g.in_w; ++j) {
          for (int64_t c = 0; c < cell; ++c) o[j * dxs.w + c * dxs.c] = static_cast<scalar_t>(row_sums[j * cell + c]);
        }
      }
    }
  });
  };
  if (cell == 1) {
    with_unit_strides(run, gs.w, xs.w);
  } else {
    with_unit_strides(run, gs.c, xs.c);
  }

  // grad_weight[c, p, q]: the partials of class c summed over (n, block) in a fixed order.
  const int64_t kk = g.kh * g.kw, batch = x.size(0);
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  const int64_t reads_per_weight = batch * blocks;
  at::parallel_for(0, C * kk, rows_per_task(reads_per_weight), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t c = e / kk, tap = e % kk;
      acc_t sum = 0;
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t plane = order.channels_last ? n : n * C + c;
        const int64_t within = order.channels_last ? tap * C + c : tap;
        for (int64_t b = 0; b < blocks; ++b) sum += partials[(plane * blocks + b) * taps + within];
      }
      gw[e] = static_cast<scalar_t>(sum);
    }
  });
}

void deconv_add_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* skip,
                               at::IntArrayRef offset, const DeconvGeometry& g, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deconv_add_forward", [&] {
    forward_typed<scalar_t>(x, weight, skip, offset, g, out);
  });
}

void deconv_add_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                const DeconvGeometry& g, at::Tensor& grad_x, at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deconv_add_backward", [&] {
    backward_typed<scalar_t>(grad, x, weight, g, grad_x, grad_weight);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef FASTSEG_CPU_DISPATCH_UNIT
FASTSEG_DECLARE_CPU_VARIANTS(
    void deconv_add_forward_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor*,
                                   at::IntArrayRef, const DeconvGeometry&, at::Tensor&);
    void deconv_add_backward_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const DeconvGeometry&, at::Tensor&, at::Tensor&);)

namespace {

DeconvGeometry geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef crop, int64_t out_h, int64_t out_w) {
  return {x.size(2), x.size(3), out_h, out_w, weight.size(2), weight.size(3),
          stride[0], stride[1], crop[0], crop[1]};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& skip,
                       at::IntArrayRef stride, at::IntArrayRef crop, at::IntArrayRef skip_offset,
                       at::IntArrayRef output_size) {
  constexpr const char* op = "deconv_add_forward";
  check_decoder_inputs(op, x, skip, skip_offset, output_size);
  check_deconv_weight(op, weight, x, stride, crop);
  check_deconv_window(op, x, weight, stride, crop, output_size);
  auto out = at::empty({x.size(0), x.size(1), output_size[0], output_size[1]},
                       x.options().memory_format(output_memory_format(x)));
  if (out.numel() == 0) return out;
  FASTSEG_CPU_CALL(deconv_add_forward_kernel, x, weight, skip ? &*skip : nullptr, skip_offset,
                   geometry(x, weight, stride, crop, output_size[0], output_size[1]), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& x,
                                                const at::Tensor& weight, at::IntArrayRef stride,
                                                at::IntArrayRef crop) {
  constexpr const char* op = "deconv_add_backward";
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == x.size(0) &&
                        grad_output.size(1) == x.size(1),
                    op, ": grad_output must be (N, C, Ho, Wo) with x's (N, C), got ", grad_output.sizes());
  check_decoder_inputs(op, x, std::nullopt, {0, 0}, {std::max<int64_t>(grad_output.size(2), 1),
                                                     std::max<int64_t>(grad_output.size(3), 1)});
  check_scores(op, "grad_output", grad_output, x);
  check_deconv_weight(op, weight, x, stride, crop);
  check_deconv_window(op, x, weight, stride, crop, {grad_output.size(2), grad_output.size(3)});
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(output_memory_format(x)));
  auto grad_weight = at::empty(weight.sizes(), weight.options());
  if (x.numel() == 0 || grad_output.numel() == 0) {
    grad_x.zero_();
    grad_weight.zero_();
    return {grad_x, grad_weight};
  }
  FASTSEG_CPU_CALL(deconv_add_backward_kernel, grad_output, x, weight,
                   geometry(x, weight, stride, crop, grad_output.size(2), grad_output.size(3)),
                   grad_x, grad_weight);
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("deconv_add_forward", &forward_cpu);
  m.impl("deconv_add_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
