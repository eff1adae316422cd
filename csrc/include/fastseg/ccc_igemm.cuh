// The index arithmetic of crop_concat_conv2d's CUDA implicit GEMM (csrc/cuda/crop_concat_conv2d.cu),
// as host + device inline functions, so that a CPU program can run the exact maps the kernel
// runs: output pixel m -> (n, oy, ox); reduction step -> (tap, source, channel chunk, packed
// weight column); tap + channel -> source element offset, zero outside the crop window; the
// threads' loader / warp / epilogue shares of a tile; and the ldmatrix / mma.m16n8k16 lane
// maps. No CUDA intrinsics here: the header compiles with a host compiler as well.
//
// GEMM view: out[m, co] = sum_k A[m, k] * B[k, co], m = (n, oy, ox) over N * Ho * Wo output
// pixels, co over Cout, k over (tap, source, channel): for each of the k * k taps, first the
// skip's crop window (weight channels [0, Cs)), then x (weight channels [Cs, Cs + Cx)), each in
// chunks of kBK channels (the last chunk of a source zero-padded).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastseg::ccc::igemm {

constexpr int kBK = 32;              // input channels per reduction step (two k16 MMA steps)
constexpr int kVec = 8;              // 16-bit elements per 16-byte copy
constexpr int kLd = kBK + 8;         // shared row stride of the A / B tiles: 80 bytes, so that
                                     // ldmatrix's 8 row addresses hit 8 distinct bank quads
constexpr int kStages = 2;           // double buffering
constexpr int kNoPixel = -4;         // y of a tile row past M: every tap (|ky - padding| <= 2)
                                     // falls outside the window

template <typename index_t>
struct Strides4 {
  index_t n, c, h, w;
};

// n * s.n + c * s.c + y * s.h + x * s.w in index_t (all four in range: no negative offsets).
template <typename index_t>
C10_HOST_DEVICE inline index_t element_offset(const Strides4<index_t>& s, int n, int c, int y,
                                              int x) {
  return static_cast<index_t>(n) * s.n + static_cast<index_t>(c) * s.c +
         static_cast<index_t>(y) * s.h + static_cast<index_t>(x) * s.w;
}

// ---- The output pixel of GEMM row m ----

struct Pixel {
  int n, y, x;
};

template <typename index_t>
C10_HOST_DEVICE inline Pixel output_pixel(index_t m, int out_h, int out_w) {
  const index_t plane = static_cast<index_t>(out_h) * out_w;
  const index_t n = m / plane;
  const index_t rem = m - n * plane;
  const index_t y = rem / out_w;
  return {static_cast<int>(n), static_cast<int>(y), static_cast<int>(rem - y * out_w)};
}

// The pixel of tile row `row` (tile origin m0), or one whose taps are all outside past M.
template <typename index_t>
C10_HOST_DEVICE inline Pixel row_pixel(index_t m0, int row, index_t m_total, int out_h, int out_w) {
  const index_t m = m0 + row;
  return m < m_total ? output_pixel<index_t>(m, out_h, out_w) : Pixel{0, kNoPixel, kNoPixel};
}

// Tap (ky, kx) of output (y, x) reads window position (y + ky - padding, x + kx - padding):
// true (and the position) when it lies inside the h x w window. The window is the CROP window
// for the skip (its origin is the data pointer), so the padding taps are zero even where the
// skip has pixels outside the window - as in the concatenation.
C10_HOST_DEVICE inline bool tap_position(int y, int x, int ky, int kx, int padding, int h, int w,
                                         int* iy, int* ix) {
  *iy = y + ky - padding;
  *ix = x + kx - padding;
  return *iy >= 0 && *iy < h && *ix >= 0 && *ix < w;
}

// ---- The reduction steps ----

C10_HOST_DEVICE constexpr int chunks_of(int channels) { return (channels + kBK - 1) / kBK; }

// Packed weight columns per tap: each source's channels padded to a multiple of kBK.
C10_HOST_DEVICE constexpr int packed_width(int skip_chunks, int x_chunks) {
  return (skip_chunks + x_chunks) * kBK;
}

struct KStep {
  int tap;     // ky * k + kx
  int source;  // 0: the skip's crop window, 1: x
  int c0;      // first channel of the chunk, in the source
  int wcol;    // its column in a packed weight row (tap * width + chunk * kBK)
};

// Step `it` of the reduction: taps outer; per tap the skip's chunks, then x's.
C10_HOST_DEVICE inline KStep k_step(int it, int skip_chunks, int x_chunks) {
  const int per_tap = skip_chunks + x_chunks;
  const int tap = it / per_tap;
  const int r = it - tap * per_tap;
  const int source = r < skip_chunks ? 0 : 1;
  return {tap, source, (r - source * skip_chunks) * kBK, (tap * per_tap + r) * kBK};
}

C10_HOST_DEVICE constexpr int k_steps(int ksize, int skip_chunks, int x_chunks) {
  return ksize * ksize * (skip_chunks + x_chunks);
}

// The packed weight is (Cout, k * k, width), element (co, tap, col) = weight[co, ch, ky, kx]
// with ch = packed_channel(col) (the concatenation's channel), 0 where ch < 0 (padding).
C10_HOST_DEVICE inline int packed_channel(int col, int skip_chunks, int cs, int cx) {
  const int skip_width = skip_chunks * kBK;
  if (col < skip_width) return col < cs ? col : -1;
  const int c = col - skip_width;
  return c < cx ? cs + c : -1;
}

// ---- Blocks ----

struct TileIndex {
  int64_t m_tile;
  int n_tile;
};

// Block b -> (m tile, n tile), n fastest: the blocks that share an A tile run together.
C10_HOST_DEVICE inline TileIndex block_tiles(int64_t block, int n_tiles) {
  const int64_t m_tile = block / n_tiles;
  return {m_tile, static_cast<int>(block - m_tile * n_tiles)};
}

// A block tile of BM output pixels x BN output channels, kWarpsM x kWarpsN warps of WM x WN.
template <int BM_, int BN_, int kWarpsM_, int kWarpsN_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int kMmaM = WM / 16, kMmaN = WN / 8;  // m16n8k16 tiles per warp

  // 16-byte copies (cp.async): thread t copies chunk t % 4 of rows t / 4 + i * kRowsPerPass.
  static constexpr int kChunksPerRow = kBK / kVec;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kACopies = BM / kRowsPerPass, kBCopies = BN / kRowsPerPass;
  C10_HOST_DEVICE static constexpr int copy_row(int t, int i) {
    return t / kChunksPerRow + i * kRowsPerPass;
  }
  C10_HOST_DEVICE static constexpr int copy_col(int t) { return (t % kChunksPerRow) * kVec; }

  // Element loader (any strides): thread t loads kAElems consecutive channels of row t % BM
  // (a warp = 32 consecutive pixels: consecutive addresses in NCHW).
  static constexpr int kAGroups = kThreads / BM;
  static constexpr int kAElems = kBK / kAGroups;
  C10_HOST_DEVICE static constexpr int elem_row(int t) { return t % BM; }
  C10_HOST_DEVICE static constexpr int elem_col(int t) { return (t / BM) * kAElems; }

  // Warp w's tile origin in the block tile.
  C10_HOST_DEVICE static constexpr int warp_row(int w) { return (w % kWarpsM) * WM; }
  C10_HOST_DEVICE static constexpr int warp_col(int w) { return (w / kWarpsM) * WN; }

  // Shared memory (16-bit elements): kStages A tiles (BM x kLd), kStages B tiles (BN x kLd);
  // the epilogue reuses it for the output tile, pixel-major (channels_last output: BN + 8
  // per row) or channel-major (otherwise: BM + 8 per row).
  static constexpr int kAStage = BM * kLd, kBStage = BN * kLd;
  static constexpr int kOutLdCl = BN + 8, kOutLdCf = BM + 8;
  static constexpr int kPipeElems = kStages * (kAStage + kBStage);
  static constexpr int kOutElems = BM * kOutLdCl > BN * kOutLdCf ? BM * kOutLdCl : BN * kOutLdCf;
  static constexpr int kSmemElems = kPipeElems > kOutElems ? kPipeElems : kOutElems;
  C10_HOST_DEVICE static constexpr int out_index(bool channels_last, int r, int c) {
    return channels_last ? r * kOutLdCl + c : c * kOutLdCf + r;
  }

  // Epilogue stores. channels_last: thread t writes 8 channels (chunk t % kOutChunks) of rows
  // t / kOutChunks + j * kClRowsPerPass. Otherwise: row t % BM, channels t / BM + j * kCfCols.
  static constexpr int kOutChunks = BN / kVec;
  static constexpr int kClRowsPerPass = kThreads / kOutChunks, kClPasses = BM / kClRowsPerPass;
  C10_HOST_DEVICE static constexpr int cl_row(int t, int j) {
    return t / kOutChunks + j * kClRowsPerPass;
  }
  C10_HOST_DEVICE static constexpr int cl_col(int t) { return (t % kOutChunks) * kVec; }
  static constexpr int kCfCols = kThreads / BM, kCfPasses = BN / kCfCols;
  C10_HOST_DEVICE static constexpr int cf_row(int t) { return t % BM; }
  C10_HOST_DEVICE static constexpr int cf_col(int t, int j) { return t / BM + j * kCfCols; }

  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: whole m16 x (2 x n8) blocks");
  static_assert(kThreads % kChunksPerRow == 0 && BM % kRowsPerPass == 0 &&
                    BN % kRowsPerPass == 0, "16-byte copies cover the tiles exactly");
  static_assert(kThreads % BM == 0 && kAElems % kVec == 0, "element loader: whole 16-byte stores");
  static_assert(BN % kVec == 0 && kThreads % kOutChunks == 0 && BM % kClRowsPerPass == 0 &&
                    BN % kCfCols == 0, "epilogue covers the tile exactly");
};

// ---- Lane maps of ldmatrix.x4 and mma.m16n8k16 (PTX ISA, "Matrix fragments for
// mma.m16n8k16" with .f16 / .bf16 inputs and .f32 accumulators) ----
//
// A (16 x 16, row-major in shared memory): lane l gives the address of row l % 16, columns
// (l / 16) * 8 + [0, 8): matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15) = registers a0..a3.
C10_HOST_DEVICE constexpr int ldsm_a_row(int lane) { return lane % 16; }
C10_HOST_DEVICE constexpr int ldsm_a_col(int lane) { return (lane / 16) * 8; }
// B for two n8 blocks (16 channels x 16 k, stored channel-major = the "col" operand): lane l
// gives row (l % 8) + (l / 16) * 8, columns ((l / 8) % 2) * 8: matrices 0..3 = b0, b1 of the
// first n8 block, b0, b1 of the second.
C10_HOST_DEVICE constexpr int ldsm_b_row(int lane) { return lane % 8 + (lane / 16) * 8; }
C10_HOST_DEVICE constexpr int ldsm_b_col(int lane) { return ((lane / 8) % 2) * 8; }
// Accumulator register i (0..3) of lane l holds D[row][col] of the 16 x 8 tile.
C10_HOST_DEVICE constexpr int acc_row(int lane, int i) { return lane / 4 + (i / 2) * 8; }
C10_HOST_DEVICE constexpr int acc_col(int lane, int i) { return (lane % 4) * 2 + i % 2; }

}  // namespace fastseg::ccc::igemm
