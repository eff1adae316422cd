// Fused bilinear upsampling + skip-add (FCN's decoder) on the CPU.
//
// Bilinear interpolation is separable, so each output row is made in two passes over small
// buffers: the two source rows are blended vertically into one row t (Wi cells, in L1),
// then every output cell blends two cells of t horizontally, adds the skip and is written
// once. The backward is the same in reverse, as a gather: an input row sums, vertically, the
// output-gradient rows whose taps contain it (a contiguous run, linear_tap_range), into a
// row T of Wo cells; every input cell then sums its run of T horizontally. Each value is
// summed in a fixed order by one thread: no atomics, results repeat bit for bit for any
// thread count. Rows are walked as planes of cells (cpu_planes.h): NCHW and channels_last
// both run along their contiguous axis; other strides are read as they are.
//
// This file is compiled once per CPU capability (see setup.py and cpu_capability.h).
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

struct BilinearGeometry {
  int64_t in_h, in_w, out_h, out_w;
  double scale_h, scale_w;
  bool align_corners;
};

namespace CPU_CAPABILITY {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One axis' taps, structure of arrays so that the horizontal loop can vectorize (gathers).
template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> w0, w1;
  AxisTaps(double scale, int64_t in, int64_t out, bool align_corners)
      : i0(out), i1(out), w0(out), w1(out) {
    for (int64_t d = 0; d < out; ++d) {
      const auto t = linear_taps<acc_t>(static_cast<acc_t>(scale), d, in, out, align_corners);
      i0[d] = t.i0, i1[d] = t.i1, w0[d] = t.w0, w1[d] = t.w1;
    }
  }
  LinearTaps<acc_t> operator[](int64_t d) const { return {i0[d], i1[d], w0[d], w1[d]}; }
  // runs[i] = the first output index whose first tap is >= i (i in [0, in]): the outputs
  // that blend inputs i0 = i and i1 form the run [runs[i], runs[i + 1]) (i0 never decreases).
  std::vector<int64_t> runs(int64_t in) const {
    std::vector<int64_t> starts(in + 1, static_cast<int64_t>(i0.size()));
    for (int64_t d = static_cast<int64_t>(i0.size()) - 1; d >= 0; --d) starts[i0[d]] = d;
    for (int64_t i = in - 1; i >= 0; --i) starts[i] = std::min(starts[i], starts[i + 1]);
    return starts;
  }
};

template <typename scalar_t>
void forward_typed(const at::Tensor& x, const at::Tensor* skip, at::IntArrayRef offset,
                   const BilinearGeometry& g, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const AxisTaps<acc_t> ty(g.scale_h, g.in_h, g.out_h, g.align_corners);
  const AxisTaps<acc_t> tx(g.scale_w, g.in_w, g.out_w, g.align_corners);
  const PlaneOrder order(output_memory_format(out) == at::MemoryFormat::ChannelsLast,
                         x.size(0), x.size(1));
  const Strided4 xs(x), os(out);
  const Strided4 ss = skip ? Strided4(*skip) : Strided4(out);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* skip_data =
      skip ? skip->const_data_ptr<scalar_t>() + offset[0] * ss.h + offset[1] * ss.w : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t cell = order.cell, in_w = g.in_w, out_w = g.out_w;
  const int64_t rows = order.planes * g.out_h;
  const std::vector<int64_t> x_run_starts = tx.runs(g.in_w);
  const int64_t* __restrict__ x_runs = x_run_starts.data();
  const int64_t* __restrict__ tx0 = tx.i0.data();
  const int64_t* __restrict__ tx1 = tx.i1.data();
  const acc_t* __restrict__ txw0 = tx.w0.data();
  const acc_t* __restrict__ txw1 = tx.w1.data();

  // x_step, s_step, o_step: strides along the innermost axis (w for NCHW cells, c else).
  auto run = [&](auto x_step, auto s_step, auto o_step) {
    at::parallel_for(0, rows, rows_per_task((in_w + out_w) * cell), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> blended(in_w * cell);
      acc_t* __restrict__ t = blended.data();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t plane = row / g.out_h, y = row % g.out_h;
        const auto vy = ty[y];
        const scalar_t* r0 = x_data + xs.plane(plane, order.channels_last, order.channels) + vy.i0 * xs.h;
        const scalar_t* r1 = r0 + (vy.i1 - vy.i0) * xs.h;
        scalar_t* __restrict__ o = out_data + os.plane(plane, order.channels_last, order.channels) + y * os.h;
        const scalar_t* s = skip_data ? skip_data + ss.plane(plane, order.channels_last, order.channels) + y * ss.h
                                      : nullptr;
        if (cell == 1) {
          for (int64_t j = 0; j < in_w; ++j) {
            t[j] = vy.w0 * static_cast<acc_t>(r0[j * x_step]) + vy.w1 * static_cast<acc_t>(r1[j * x_step]);
          }
          // Run by run, the two taps are loop constants: contiguous, gather-free loops
          // (a per-output gather ran at ~8 cycles an element).
          for (int64_t j = 0; j < in_w; ++j) {
            const int64_t lo = x_runs[j], hi = x_runs[j + 1];
            if (lo == hi) continue;
            const acc_t a = t[j], b = t[tx1[lo]];
            if (s) {
              for (int64_t xo = lo; xo < hi; ++xo) {
                o[xo * o_step] = static_cast<scalar_t>(txw0[xo] * a + txw1[xo] * b +
                                                       static_cast<acc_t>(s[xo * s_step]));
              }
            } else {
              for (int64_t xo = lo; xo < hi; ++xo) o[xo * o_step] = static_cast<scalar_t>(txw0[xo] * a + txw1[xo] * b);
            }
          }
        } else {
          for (int64_t j = 0; j < in_w; ++j) {
            const scalar_t* a = r0 + j * xs.w;
            const scalar_t* b = r1 + j * xs.w;
            acc_t* tj = t + j * cell;
            for (int64_t c = 0; c < cell; ++c) {
              tj[c] = vy.w0 * static_cast<acc_t>(a[c * x_step]) + vy.w1 * static_cast<acc_t>(b[c * x_step]);
            }
          }
          for (int64_t xo = 0; xo < out_w; ++xo) {
            const acc_t w0 = txw0[xo], w1 = txw1[xo];
            const acc_t* t0 = t + tx0[xo] * cell;
            const acc_t* t1 = t + tx1[xo] * cell;
            scalar_t* oc = o + xo * os.w;
            if (s) {
              const scalar_t* sc = s + xo * ss.w;
              for (int64_t c = 0; c < cell; ++c) {
                oc[c * o_step] = static_cast<scalar_t>(w0 * t0[c] + w1 * t1[c] +
                                                       static_cast<acc_t>(sc[c * s_step]));
              }
            } else {
              for (int64_t c = 0; c < cell; ++c) oc[c * o_step] = static_cast<scalar_t>(w0 * t0[c] + w1 * t1[c]);
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
void backward_typed(const at::Tensor& grad, const BilinearGeometry& g, at::Tensor& grad_x) {
  using acc_t = acc_type<scalar_t>;
  const AxisTaps<acc_t> ty(g.scale_h, g.in_h, g.out_h, g.align_corners);
  const AxisTaps<acc_t> tx(g.scale_w, g.in_w, g.out_w, g.align_corners);
  // Per input index, the run of output indices that read it.
  auto ranges = [&](double scale, int64_t in, int64_t out) {
    std::vector<int64_t> lo(in), hi(in);
    for (int64_t i = 0; i < in; ++i) {
      linear_tap_range<acc_t>(static_cast<acc_t>(scale), i, in, out, g.align_corners, &lo[i], &hi[i]);
    }
    return std::make_pair(lo, hi);
  };
  const auto [y_lo, y_hi] = ranges(g.scale_h, g.in_h, g.out_h);
  const auto [x_lo, x_hi] = ranges(g.scale_w, g.in_w, g.out_w);
  const PlaneOrder order(output_memory_format(grad_x) == at::MemoryFormat::ChannelsLast,
                         grad.size(0), grad.size(1));
  const Strided4 gs(grad), xs(grad_x);
  const scalar_t* g_data = grad.const_data_ptr<scalar_t>();
  scalar_t* gx_data = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t cell = order.cell, in_w = g.in_w, out_w = g.out_w;
  const int64_t rows = order.planes * g.in_h;
  const int64_t rows_per_input = std::max<int64_t>(1, g.out_h / std::max<int64_t>(g.in_h, 1));

  // g_step: the gradient's stride along the innermost axis (w for NCHW cells, c else).
  auto run = [&](auto g_step) {
    at::parallel_for(0, rows, rows_per_task(2 * rows_per_input * out_w * cell), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> column_sums(out_w * cell), cell_sum(cell);
      acc_t* __restrict__ T = column_sums.data();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t plane = row / g.in_h, i = row % g.in_h;
        const scalar_t* gp = g_data + gs.plane(plane, order.channels_last, order.channels);
        std::fill(column_sums.begin(), column_sums.end(), acc_t(0));
        for (int64_t y = y_lo[i]; y < y_hi[i]; ++y) {
          const acc_t wy = linear_tap_weight(ty[y], i);
          const scalar_t* gr = gp + y * gs.h;
          if (cell == 1) {
            for (int64_t xo = 0; xo < out_w; ++xo) T[xo] += wy * static_cast<acc_t>(gr[xo * g_step]);
          } else {
            for (int64_t xo = 0; xo < out_w; ++xo) {
              const scalar_t* gc = gr + xo * gs.w;
              acc_t* Tc = T + xo * cell;
              for (int64_t c = 0; c < cell; ++c) Tc[c] += wy * static_cast<acc_t>(gc[c * g_step]);
            }
          }
        }
        scalar_t* o = gx_data + xs.plane(plane, order.channels_last, order.channels) + i * xs.h;
        for (int64_t j = 0; j < in_w; ++j) {
          if (cell == 1) {
            acc_t sum = 0;
            // A vector reduction (OpenMP simd): without it the float sum is one serial chain.
#pragma omp simd reduction(+ : sum)
            for (int64_t xo = x_lo[j]; xo < x_hi[j]; ++xo) sum += linear_tap_weight(tx[xo], j) * T[xo];
            o[j * xs.w] = static_cast<scalar_t>(sum);
          } else {
            std::fill(cell_sum.begin(), cell_sum.end(), acc_t(0));
            for (int64_t xo = x_lo[j]; xo < x_hi[j]; ++xo) {
              const acc_t wx = linear_tap_weight(tx[xo], j);
              const acc_t* Tc = T + xo * cell;
              for (int64_t c = 0; c < cell; ++c) cell_sum[c] += wx * Tc[c];
            }
            scalar_t* oc = o + j * xs.w;
            for (int64_t c = 0; c < cell; ++c) oc[c * xs.c] = static_cast<scalar_t>(cell_sum[c]);
          }
        }
      }
    });
  };
  with_unit_strides(run, cell == 1 ? gs.w : gs.c);
}

void upsample_add_forward_kernel(const at::Tensor& x, const at::Tensor* skip, at::IntArrayRef offset,
                                 const BilinearGeometry& g, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_add_forward", [&] {
    forward_typed<scalar_t>(x, skip, offset, g, out);
  });
}

void upsample_add_backward_kernel(const at::Tensor& grad, const BilinearGeometry& g, at::Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_add_backward", [&] {
    backward_typed<scalar_t>(grad, g, grad_x);
  });
}

}  // namespace CPU_CAPABILITY

#ifdef FASTSEG_CPU_DISPATCH_UNIT
FASTSEG_DECLARE_CPU_VARIANTS(
    void upsample_add_forward_kernel(const at::Tensor&, const at::Tensor*, at::IntArrayRef,
                                     const BilinearGeometry&, at::Tensor&);
    void upsample_add_backward_kernel(const at::Tensor&, const BilinearGeometry&, at::Tensor&);)

namespace {

at::Tensor forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                       at::IntArrayRef skip_offset, at::IntArrayRef output_size,
                       at::ArrayRef<double> scales, bool align_corners) {
  constexpr const char* op = "upsample_add_forward";
  check_decoder_inputs(op, x, skip, skip_offset, output_size);
  TORCH_CHECK_VALUE(scales.size() == 2, op, ": scales must have two values, got ", scales.size());
  const BilinearGeometry g{x.size(2), x.size(3), output_size[0], output_size[1], scales[0], scales[1],
                           align_corners};
  auto out = at::empty({x.size(0), x.size(1), g.out_h, g.out_w},
                       x.options().memory_format(output_memory_format(x)));
  if (out.numel() == 0) return out;
  FASTSEG_CPU_CALL(upsample_add_forward_kernel, x, skip ? &*skip : nullptr, skip_offset, g, out);
  return out;
}

at::Tensor backward_cpu(const at::Tensor& grad_output, at::IntArrayRef input_size,
                        at::ArrayRef<double> scales, bool align_corners) {
  constexpr const char* op = "upsample_add_backward";
  TORCH_CHECK_VALUE(grad_output.dim() == 4, op, ": grad_output must be 4-D, got ", grad_output.sizes());
  check_pair(op, "input_size", input_size, 1);
  TORCH_CHECK_VALUE(scales.size() == 2, op, ": scales must have two values, got ", scales.size());
  const BilinearGeometry g{input_size[0], input_size[1], grad_output.size(2), grad_output.size(3),
                           scales[0], scales[1], align_corners};
  auto grad_x = at::empty({grad_output.size(0), grad_output.size(1), g.in_h, g.in_w},
                          grad_output.options().memory_format(output_memory_format(grad_output)));
  if (grad_x.numel() == 0) return grad_x;
  FASTSEG_CPU_CALL(upsample_add_backward_kernel, grad_output, g, grad_x);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("upsample_add_forward", &forward_cpu);
  m.impl("upsample_add_backward", &backward_cpu);
}
#endif  // FASTSEG_CPU_DISPATCH_UNIT

}  // namespace fastseg::cpu
