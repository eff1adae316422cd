// U-Net's crop + concat + convolution on CUDA (crop_concat_conv2d_forward / _backward), bf16
// and fp16 on sm_80+, never materializing the crop or the concatenation.
//
// Forward: a tensor-core implicit GEMM out[m, co] = sum_k A[m, k] * B[k, co] with
// m = (n, oy, ox) over the N * Ho * Wo output pixels, co over Cout, K = (Cs + Cx) * k * k. A
// block owns a BM x BN tile (128 x 64 with 4 warps, or 128 x 128 with 8 warps; each warp
// 64 x 32 = 4 x 4 mma.m16n8k16 tiles, float32 accumulators in registers) and loops over the
// reduction in steps of kBK = 32 channels: the k * k taps outer, per tap first the skip's
// channels, then x's. The two sources are read in place: the skip through the zero-copy view
// of its crop window (base pointer skip + oy * stride_h + ox * stride_w, the skip's strides),
// x through its own; each source's positions are bounds-checked against the crop window
// (= x's H x W), so the padding taps read zeros even where the skip has pixels beyond the
// window, as in the concatenation. Channel tails (a source's last chunk) and rows past M read
// zeros too. The weight is repacked once per call (a small kernel, Cout * k * k * Kpad
// elements) into (Cout, k * k, Kpad): each source's channels padded with zeros to a multiple
// of 32, so that every B tile row is one aligned 64-byte run.
//
// Tiles go through shared memory, double-buffered (one barrier per step: step s + 1 is
// fetched while step s is multiplied). The B tiles and, when both sources have a contiguous
// channel axis, channel counts that are multiples of 8 and 16-byte aligned pixels (the
// channels_last fast path), the A tiles are fetched with 16-byte cp.async copies, zero-filled
// (src-size 0) outside the window. Otherwise (NCHW, any other strides) an element loader reads
// the A tile with bounds-checked 2-byte loads into registers before the step's MMAs and stores
// it to shared memory after them; a warp then reads 32 consecutive pixels of one channel
// (consecutive addresses in NCHW). Shared rows are padded to 80 bytes: ldmatrix reads are free
// of bank conflicts.
//
// Why mma.sync + ldmatrix (inline PTX) rather than nvcuda::wmma: the accumulator lane layout
// of mma.m16n8k16 is documented (PTX ISA), so bias + ReLU are applied directly on the
// registers and every lane map (fastseg/ccc_igemm.cuh) can be checked on a CPU; wmma's
// fragment layout is opaque. mma.sync runs on sm_80 and sm_90 (HMMA; sm_90's wgmma would be
// faster and is not used).
//
// Epilogue: + bias, ReLU, one rounding to the 16-bit type, staged through shared memory (the
// pipeline buffers) and stored in the output's memory format (x's): channels_last with 16-byte
// stores along Cout (when Cout % 8 == 0), NCHW with a warp writing 32 consecutive pixels of one
// channel. Instances: {bf16, fp16} x {int32, int64 offsets} x {128x64, 128x128} x {cp.async,
// element} A loaders (16 kernels) plus one weight repack kernel. float32 / float64 are not
// served here (the Triton backend serves float32, the CPU float64).
//
// Backward: ccc::backward_on_views (cuDNN's convolution backward on the zero-copy views) - the
// designated design for now.
//
// All index arithmetic (pixel and step decodes, crop window, packed weight, the threads' and
// lanes' shares of a tile) is fastseg/ccc_igemm.cuh, so that it can be run on a CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastseg/ccc_igemm.cuh"
#include "fastseg/crop_concat_conv2d.h"
#include "fastseg/cuda_decoder.cuh"
#include "fastseg/upsample_add_checks.h"

namespace fastseg::cuda {
namespace {

using namespace fastseg::ccc::igemm;

using Narrow = TileConfig<128, 64, 2, 2>;  // Cout <= 64 (U-Net's first level) or few tiles
using Wide = TileConfig<128, 128, 2, 4>;   // Cout > 64 with enough tiles to fill the GPU

template <typename index_t>
struct Source {
  const uint16_t* data;  // the window origin: skip + oy * stride_h + ox * stride_w, or x
  Strides4<index_t> stride;
  int channels;
};

template <typename index_t>
struct Params {
  Source<index_t> skip, x;
  const uint16_t* weight;  // packed (Cout, k * k, width), see packed_channel
  const uint16_t* bias;    // (Cout,), strides bias_stride; or nullptr
  uint16_t* out;           // (N, Cout, Ho, Wo), strides out_stride
  Strides4<index_t> out_stride;
  index_t m_total;         // N * Ho * Wo
  index_t bias_stride;
  int h, w, out_h, out_w;  // the crop window (= x's size) and the output's size
  int cout, ksize, padding, skip_chunks, x_chunks, n_tiles;
  bool relu, out_channels_last, out_vec;  // out_vec: 16-byte stores along Cout are aligned
};

// ---- PTX wrappers (sm_80+) ----

// The device code exists for sm_80+ only (cp.async, bf16 mma); an older architecture in
// TORCH_CUDA_ARCH_LIST gets a kernel that traps (the host refuses such devices first).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTSEG_CCC_TENSOR_CORES 1
#else
#define FASTSEG_CCC_TENSOR_CORES 0
#endif

#if FASTSEG_CCC_TENSOR_CORES

__device__ inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zeros (and no read) when !valid.
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ inline void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem)));
}

// d += a * b, 16 x 8 x 16, float32 accumulators.
template <bool kBf16>
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

#endif  // FASTSEG_CCC_TENSOR_CORES

template <bool kBf16>
__device__ inline float to_float(uint16_t bits) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

template <bool kBf16>
__device__ inline uint16_t from_float(float v) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// ---- The forward kernel ----

// kVecA: the A tiles by 16-byte cp.async copies (see the header comment), else element loads.
template <bool kBf16, typename index_t, typename Cfg, bool kVecA>
__global__ void __launch_bounds__(Cfg::kThreads) forward_kernel(const Params<index_t> p) {
#if !FASTSEG_CCC_TENSOR_CORES
  __trap();  // the host checks the compute capability first; nothing to run below sm_80
#else
  __shared__ __align__(16) uint16_t smem[Cfg::kSmemElems];
  uint16_t* const a_tiles = smem;                          // kStages x (BM x kLd)
  uint16_t* const b_tiles = smem + kStages * Cfg::kAStage;  // kStages x (BN x kLd)
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const TileIndex tile = block_tiles(blockIdx.x, p.n_tiles);
  const index_t m0 = static_cast<index_t>(tile.m_tile) * Cfg::BM;
  const int n0 = tile.n_tile * Cfg::BN;
  const int steps = k_steps(p.ksize, p.skip_chunks, p.x_chunks);
  const int width = packed_width(p.skip_chunks, p.x_chunks);
  const index_t weight_row = static_cast<index_t>(p.ksize * p.ksize) * width;

  // The output pixels of this thread's A rows.
  constexpr int kRows = kVecA ? Cfg::kACopies : 1;
  Pixel pixel[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = kVecA ? Cfg::copy_row(tid, i) : Cfg::elem_row(tid);
    pixel[i] = row_pixel<index_t>(m0, row, p.m_total, p.out_h, p.out_w);
  }

  // The source of a step (a select, not an indexed parameter: no local memory).
  struct StepSource {
    const uint16_t* data;
    Strides4<index_t> stride;
    int channels, ky, kx;
  };
  auto step_source = [&](const KStep& s) {
    const bool from_x = s.source != 0;
    const int ky = s.tap / p.ksize;
    return StepSource{from_x ? p.x.data : p.skip.data, from_x ? p.x.stride : p.skip.stride,
                      from_x ? p.x.channels : p.skip.channels, ky, s.tap - ky * p.ksize};
  };

  // B: the packed weight's rows n0 + [0, BN), columns wcol + [0, kBK); zeros past Cout.
  auto fetch_b = [&](const KStep& s, int stage) {
    uint16_t* dst = b_tiles + stage * Cfg::kBStage;
#pragma unroll
    for (int i = 0; i < Cfg::kBCopies; ++i) {
      const int row = Cfg::copy_row(tid, i), col = Cfg::copy_col(tid);
      const bool valid = n0 + row < p.cout;
      const uint16_t* src =
          p.weight + (valid ? static_cast<index_t>(n0 + row) * weight_row + s.wcol + col : 0);
      cp_async_16(dst + row * kLd + col, src, valid);
    }
  };

  // A by 16-byte copies: every chunk of 8 channels is wholly inside or outside the source
  // (its channel count is a multiple of 8).
  auto copy_a = [&](const KStep& s, int stage) {
    const StepSource src = step_source(s);
    const int col = Cfg::copy_col(tid), c = s.c0 + col;
    uint16_t* dst = a_tiles + stage * Cfg::kAStage;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      int iy, ix;
      const bool valid = tap_position(pixel[i].y, pixel[i].x, src.ky, src.kx, p.padding, p.h,
                                      p.w, &iy, &ix) &&
                         c < src.channels;
      const uint16_t* from =
          src.data + (valid ? element_offset(src.stride, pixel[i].n, c, iy, ix) : 0);
      cp_async_16(dst + Cfg::copy_row(tid, i) * kLd + col, from, valid);
    }
  };

  // A by element loads into registers (two per word, the lower channel in the low half).
  uint32_t a_regs[Cfg::kAElems / 2];
  auto load_a = [&](const KStep& s) {
    const StepSource src = step_source(s);
    const int c = s.c0 + Cfg::elem_col(tid);
    int iy, ix;
    const bool inside = tap_position(pixel[0].y, pixel[0].x, src.ky, src.kx, p.padding, p.h, p.w,
                                     &iy, &ix);
    const uint16_t* from = src.data + (inside ? element_offset(src.stride, pixel[0].n, c, iy, ix) : 0);
#pragma unroll
    for (int j = 0; j < Cfg::kAElems; j += 2) {
      const uint32_t lo = inside && c + j < src.channels ? __ldg(from + j * src.stride.c) : 0;
      const uint32_t hi =
          inside && c + j + 1 < src.channels ? __ldg(from + (j + 1) * src.stride.c) : 0;
      a_regs[j / 2] = lo | (hi << 16);
    }
  };
  auto store_a = [&](int stage) {
    uint4* dst = reinterpret_cast<uint4*>(a_tiles + stage * Cfg::kAStage +
                                          Cfg::elem_row(tid) * kLd + Cfg::elem_col(tid));
#pragma unroll
    for (int q = 0; q < Cfg::kAElems / 8; ++q) {
      dst[q] = make_uint4(a_regs[4 * q], a_regs[4 * q + 1], a_regs[4 * q + 2], a_regs[4 * q + 3]);
    }
  };

  float acc[Cfg::kMmaM][Cfg::kMmaN][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
    }
  }

  const int warp_row = Cfg::warp_row(warp), warp_col = Cfg::warp_col(warp);
  auto multiply = [&](int stage) {
    const uint16_t* a = a_tiles + stage * Cfg::kAStage;
    const uint16_t* b = b_tiles + stage * Cfg::kBStage;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[Cfg::kMmaM][4], bf[Cfg::kMmaN][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
        ldmatrix_x4(af[mi], a + (warp_row + mi * 16 + ldsm_a_row(lane)) * kLd + kk + ldsm_a_col(lane));
      }
#pragma unroll
      for (int nj = 0; nj < Cfg::kMmaN / 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, b + (warp_col + nj * 16 + ldsm_b_row(lane)) * kLd + kk + ldsm_b_col(lane));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < Cfg::kMmaN; ++ni) mma_16816<kBf16>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
  };

  static_assert(kStages == 2, "the pipeline below alternates two stages (stage ^ 1)");
  // The pipeline: one barrier per step; it publishes step s's tiles and frees step s - 1's
  // buffers, which then receive step s + 1's while step s is multiplied.
  if (steps > 0) {
    const KStep first = k_step(0, p.skip_chunks, p.x_chunks);
    fetch_b(first, 0);
    if constexpr (kVecA) {
      copy_a(first, 0);
    } else {
      load_a(first);
      store_a(0);
    }
    cp_async_commit();
  }
#pragma unroll 1
  for (int step = 0; step < steps; ++step) {
    const int stage = step % kStages;
    cp_async_wait_all();
    __syncthreads();
    const bool more = step + 1 < steps;
    if (more) {
      const KStep next = k_step(step + 1, p.skip_chunks, p.x_chunks);
      fetch_b(next, stage ^ 1);
      if constexpr (kVecA) {
        copy_a(next, stage ^ 1);
      } else {
        load_a(next);
      }
    }
    cp_async_commit();
    multiply(stage);
    if constexpr (!kVecA) {
      if (more) store_a(stage ^ 1);
    }
  }
  cp_async_wait_all();
  __syncthreads();  // the pipeline buffers become the output tile

  // Epilogue: bias, ReLU and the rounding on the registers, into the staged output tile.
  uint16_t* const out_tile = smem;
  const bool cl = p.out_channels_last;
#pragma unroll
  for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
    float bias[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int co = n0 + warp_col + ni * 8 + acc_col(lane, e);
      bias[e] = p.bias != nullptr && co < p.cout ? to_float<kBf16>(p.bias[co * p.bias_stride]) : 0.f;
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = acc[mi][ni][i] + bias[i % 2];
        if (p.relu && v < 0.f) v = 0.f;  // NaN stays NaN, as torch.relu
        const int r = warp_row + mi * 16 + acc_row(lane, i);
        const int c = warp_col + ni * 8 + acc_col(lane, i);
        out_tile[Cfg::out_index(cl, r, c)] = from_float<kBf16>(v);
      }
    }
  }
  __syncthreads();

  if (cl) {
    const int c = Cfg::cl_col(tid), co = n0 + c;
#pragma unroll 1
    for (int j = 0; j < Cfg::kClPasses; ++j) {
      const int r = Cfg::cl_row(tid, j);
      if (m0 + r >= p.m_total || co >= p.cout) continue;
      const Pixel q = output_pixel<index_t>(m0 + r, p.out_h, p.out_w);
      uint16_t* dst = p.out + element_offset(p.out_stride, q.n, co, q.y, q.x);
      const uint16_t* from = out_tile + Cfg::out_index(true, r, c);
      if (p.out_vec && co + kVec <= p.cout) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(from);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          if (co + e < p.cout) dst[e * p.out_stride.c] = from[e];
        }
      }
    }
  } else {
    const int r = Cfg::cf_row(tid);
    if (m0 + r < p.m_total) {
      const Pixel q = output_pixel<index_t>(m0 + r, p.out_h, p.out_w);
      uint16_t* dst = p.out + element_offset(p.out_stride, q.n, n0, q.y, q.x);
#pragma unroll 4
      for (int j = 0; j < Cfg::kCfPasses; ++j) {
        const int c = Cfg::cf_col(tid, j);
        if (n0 + c < p.cout) dst[c * p.out_stride.c] = out_tile[Cfg::out_index(false, r, c)];
      }
    }
  }
#endif
}

// weight (Cout, Cs + Cx, k, k), any strides -> packed (Cout, k * k, width), see packed_channel.
__global__ void __launch_bounds__(256) pack_weight_kernel(
    const uint16_t* __restrict__ weight, Strides4<int64_t> ws, uint16_t* __restrict__ packed,
    int64_t total, int ksize, int width, int skip_chunks, int cs, int cx) {
  const int taps = ksize * ksize;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int col = static_cast<int>(i % width);
    const int64_t rest = i / width;
    const int tap = static_cast<int>(rest % taps);
    const int co = static_cast<int>(rest / taps);
    const int ch = packed_channel(col, skip_chunks, cs, cx);
    packed[i] = ch < 0 ? uint16_t{0} : weight[element_offset(ws, co, ch, tap / ksize, tap % ksize)];
  }
}

// ---- Host side ----

template <typename index_t>
Strides4<index_t> strides4(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          static_cast<index_t>(t.stride(2)), static_cast<index_t>(t.stride(3))};
}

const uint16_t* bits_of(const at::Tensor& t) {
  return static_cast<const uint16_t*>(t.const_data_ptr());
}

// Whether a source (view) can be read by 16-byte copies: channel axis contiguous, channel
// count and the other strides multiples of 8 elements, origin 16-byte aligned. A source with
// no channels is never read.
bool copies_16_bytes(const at::Tensor& t) {
  if (t.size(1) == 0) return true;
  return t.stride(1) == 1 && t.size(1) % kVec == 0 && t.stride(0) % kVec == 0 &&
         t.stride(2) % kVec == 0 && t.stride(3) % kVec == 0 &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// Checks what this backend serves (16-bit types, sm_80+) after the op's argument checks.
void check_served(const char* op, const at::Tensor& x) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
      ": the CUDA backend serves bfloat16 and float16 only, got ", x.scalar_type(),
      " (float32 is served by the Triton backend, float64 by the CPU backend)");
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.get_device());
  TORCH_CHECK_NOT_IMPLEMENTED(props->major >= 8, op,
                              ": the CUDA backend needs compute capability 8.0 or newer "
                              "(bf16 / fp16 mma.sync), got ",
                              props->major, ".", props->minor, " on ", x.device());
}

at::Tensor forward_cuda(const at::Tensor& skip, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, int64_t padding,
                        int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_forward";
  const ccc::Sources s = ccc::split(op, skip, x, weight, padding, activation);
  ccc::check_bias(op, bias, weight);
  check_cuda(op, "x", x);
  check_cuda(op, "skip", skip);
  check_cuda(op, "weight", weight);
  if (bias) check_cuda(op, "bias", *bias);
  const c10::cuda::CUDAGuard guard(x.device());
  check_served(op, x);

  const int64_t batch = x.size(0), cs = skip.size(1), cx = x.size(1), cout = weight.size(0);
  const int64_t ksize = weight.size(2);
  const int64_t out_h = ccc::conv_output_size(x.size(2), ksize, padding);
  const int64_t out_w = ccc::conv_output_size(x.size(3), ksize, padding);
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = at::empty({batch, cout, out_h, out_w}, x.options().memory_format(format));
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(cs + cx <= std::numeric_limits<int32_t>::max() / 2 &&
                        x.size(2) <= std::numeric_limits<int32_t>::max() / 2 &&
                        x.size(3) <= std::numeric_limits<int32_t>::max() / 2,
                    op, ": channel or spatial sizes too large");

  const auto stream = at::cuda::getCurrentCUDAStream();
  const int skip_chunks = chunks_of(static_cast<int>(cs)), x_chunks = chunks_of(static_cast<int>(cx));
  const int width = packed_width(skip_chunks, x_chunks);
  // The per-call weight repack (Cout, k * k, width): every B tile row one aligned 64-byte run.
  at::Tensor packed = at::empty({cout, ksize * ksize, width}, weight.options());
  if (packed.numel() > 0) {
    const int64_t blocks = std::min<int64_t>((packed.numel() + 255) / 256, 4096);
    pack_weight_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        bits_of(weight), strides4<int64_t>(weight), static_cast<uint16_t*>(packed.data_ptr()),
        packed.numel(), static_cast<int>(ksize), width, skip_chunks, static_cast<int>(cs),
        static_cast<int>(cx));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t m_total = batch * out_h * out_w;
  // int64 offsets when a tensor may pass 2^31 elements (or a tile row index m0 + r could).
  const bool wide = needs_64bit(skip) || needs_64bit(x) || needs_64bit(out) ||
                    packed.numel() > std::numeric_limits<int32_t>::max() ||
                    m_total > std::numeric_limits<int32_t>::max() - Wide::BM;
  const bool vec_a = copies_16_bytes(s.crop) && copies_16_bytes(x);
  const bool out_cl = format == at::MemoryFormat::ChannelsLast;
  const int sms = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
  const int64_t wide_tiles = (m_total + Wide::BM - 1) / Wide::BM * ((cout + Wide::BN - 1) / Wide::BN);
  // 128 x 128 tiles (twice the reuse of A) for Cout > 64, unless they leave the GPU short of
  // two blocks per SM; then 128 x 64 (not tuned on a GPU yet).
  const bool use_wide = cout > 64 && wide_tiles >= 2 * int64_t{sms};

  const bool bf16 = x.scalar_type() == at::kBFloat16;

  auto launch = [&](auto index_zero, auto cfg, auto is_bf16, auto vec) {
    using index_t = decltype(index_zero);
    using Cfg = decltype(cfg);
    Params<index_t> p;
    p.skip = {bits_of(s.crop), strides4<index_t>(s.crop), static_cast<int>(cs)};
    p.x = {bits_of(x), strides4<index_t>(x), static_cast<int>(cx)};
    p.weight = bits_of(packed);
    p.bias = bias ? bits_of(*bias) : nullptr;
    p.bias_stride = bias ? static_cast<index_t>(bias->stride(0)) : 0;
    p.out = static_cast<uint16_t*>(out.data_ptr());
    p.out_stride = strides4<index_t>(out);
    p.m_total = static_cast<index_t>(m_total);
    p.h = static_cast<int>(x.size(2));
    p.w = static_cast<int>(x.size(3));
    p.out_h = static_cast<int>(out_h);
    p.out_w = static_cast<int>(out_w);
    p.cout = static_cast<int>(cout);
    p.ksize = static_cast<int>(ksize);
    p.padding = static_cast<int>(padding);
    p.skip_chunks = skip_chunks;
    p.x_chunks = x_chunks;
    p.n_tiles = static_cast<int>((cout + Cfg::BN - 1) / Cfg::BN);
    p.relu = activation == 1;
    p.out_channels_last = out_cl;
    p.out_vec = out_cl && cout % kVec == 0 && out.stride(0) % kVec == 0 &&
                out.stride(2) % kVec == 0 && out.stride(3) % kVec == 0 &&
                reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
    const int64_t blocks = (m_total + Cfg::BM - 1) / Cfg::BM * p.n_tiles;
    TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op,
                      ": output too large for one launch (", blocks, " tiles)");
    forward_kernel<decltype(is_bf16)::value, index_t, Cfg, decltype(vec)::value>
        <<<static_cast<unsigned>(blocks), Cfg::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_loader = [&](auto index_zero, auto cfg, auto is_bf16) {
    if (vec_a) launch(index_zero, cfg, is_bf16, std::true_type{});
    else launch(index_zero, cfg, is_bf16, std::false_type{});
  };
  auto with_type = [&](auto index_zero, auto cfg) {
    if (bf16) with_loader(index_zero, cfg, std::true_type{});
    else with_loader(index_zero, cfg, std::false_type{});
  };
  auto with_config = [&](auto index_zero) {
    if (use_wide) with_type(index_zero, Wide{});
    else with_type(index_zero, Narrow{});
  };
  if (wide) with_config(int64_t{0});
  else with_config(int32_t{0});
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& skip,
    const at::Tensor& x, const at::Tensor& weight, int64_t padding, int64_t activation) {
  constexpr const char* op = "crop_concat_conv2d_backward";
  check_cuda(op, "grad_output", grad_output);
  check_cuda(op, "output", output);
  check_cuda(op, "x", x);
  check_cuda(op, "skip", skip);
  check_cuda(op, "weight", weight);
  const c10::cuda::CUDAGuard guard(x.device());
  return ccc::backward_on_views(op, grad_output, output, skip, x, weight, padding, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("crop_concat_conv2d_forward", &forward_cuda);
  m.impl("crop_concat_conv2d_backward", &backward_cuda);
}

}  // namespace fastseg::cuda
