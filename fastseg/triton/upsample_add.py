"""Triton kernels of the fused bilinear upsampling + skip-add (FCN's decoder), forward and
backward.

Low-level contract (the same one as the C++ ops ``fastseg::upsample_add_forward`` /
``_backward``, schemas in csrc/fastseg.cpp; the public layer ``fastseg/ops/upsample_add.py``
validates the arguments and registers autograd):

- ``forward(x, skip, skip_offset, output_size, scales, align_corners) -> out``:
  ``x`` (N, C, Hi, Wi) and ``skip`` None or (N, C, >= oy + Ho, >= ox + Wo), ANY strides
  (never copied: the kernels take the strides); ``out`` (N, C, Ho, Wo) in x's memory format
  (``fastseg.ops._checks.empty_like_format``).
- ``backward(grad_output, input_size, scales, align_corners) -> grad_x`` (N, C, Hi, Wi) in
  grad_output's memory format. A GATHER: every program owns input elements and sums the
  output gradients that read them, in a fixed order - no atomics, bit-for-bit repeatable.
- float32 / float16 / bfloat16 (float64 under the interpreter); float32 accumulation.

Index math (mirrors csrc/include/fastseg/upsample_add.h, in float32 like the CUDA kernel).
Per axis, output index d reads the input taps i0 <= i1 with weights (1 - l, l):

    src = scale * d                     (align_corners)
    src = max(scale * (d + 0.5) - 0.5, 0) (otherwise)
    i0 = min(int(src), in - 1); l = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1)
    (in == out: i0 = i1 = d, l = 0)

``scale`` is PyTorch's source-per-destination ratio (1 / scale_factor, in / out, or
(in - 1) / (out - 1) with align_corners). The backward finds, per input index i, the
contiguous run [lo, hi) of outputs whose taps contain i by a fixed-iteration binary search
over the same (monotonic) tap map - the first d with i1 >= i, then the first d with i0 > i -
and sums  w_y(oy, iy) * sum_ox w_x(ox, ix) * g[oy, ox]  over it.

Kernel design. Both kernels work on 2-D tiles [BLOCK_R, BLOCK_I] of one image, decided by the
layout of the tensor the kernel writes (``SHIPPED_CONFIGS``):
- "nchw": a tile is BLOCK_R rows x BLOCK_I columns of one (n, c) plane: loads and stores are
  contiguous along W (row taps per row, column taps per column: computed once per vector).
- "channels_last": a tile is BLOCK_R columns x BLOCK_I channels of one (n, row): the channel
  axis is the contiguous one.
The three index vectors (row, column, channel) are broadcastable 2-D tensors ([R, 1], [1, I],
[1, 1] or permuted), so that the per-axis tap math is done on vectors, not on tiles. Every
tensor is addressed through its strides (the JIT specializes the unit ones), int64 offsets
only when a tensor can pass 2^31 elements.

The module imports without triton; then :func:`not_supported_reasons` says why it cannot
serve, and ``forward`` / ``backward`` are None (no op is registered).
"""

from typing import List, NamedTuple, Optional, Tuple

import torch

from fastseg.ops import _checks
from fastseg.triton import _common
from fastseg.triton._common import device_guard as _device_guard  # noqa: F401 - shared
from fastseg.triton._common import (  # noqa: F401 - shared, re-exported
    CUDA_DTYPES, INTERPRETER_DTYPES, MIN_CAPABILITY, needs_int64,
)

# (None, None, why) without a usable triton: then not_supported_reasons says why.
triton, tl, _TRITON_IMPORT_ERROR = _common.import_triton()

# Whether the kernels below are defined in interpreter mode (decided at import, as triton).
INTERPRET = _common.interpret_flag()

FORWARD_OP_NAME = "fastseg::upsample_add_forward_triton"
BACKWARD_OP_NAME = "fastseg::upsample_add_backward_triton"


class KernelConfig(NamedTuple):
    """One shipped tile configuration (of the upsample_add and the deconv_add kernels).

    layout: "nchw" (a tile of rows x columns of one plane) or "channels_last" (columns x
    channels of one row), the memory format of the tensor the kernel writes.
    max_inner: serves inner sizes (W for "nchw", C for "channels_last") <= max_inner;
    None serves any.
    """

    layout: str
    max_inner: Optional[int]
    block_r: int
    block_i: int
    num_warps: int = 4
    num_stages: int = 1

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    @property
    def name(self) -> str:
        inner = "any" if self.max_inner is None else f"le{self.max_inner}"
        return (f"{self.layout}-I{inner}-R{self.block_r}xI{self.block_i}"
                f"-w{self.num_warps}s{self.num_stages}")


# The tile configurations the launchers use (forward and backward, both ops) and the AOT test
# compiles for sm_80 and sm_90. The first entry whose layout matches and whose max_inner
# covers the inner size is used. 512 elements per program with 4 warps (4 per thread), 1024
# (8 per thread) for wide maps: the kernels are memory bound and gather-heavy (4 bilinear
# taps, or ceil(k/s)^2 deconvolution taps, per element), so moderate tiles keep registers low
# and many programs in flight.
# - "nchw": inner = W. Coarse maps (the backward's input, FCN's 16..64 wide score maps) get
#   tall tiles of 32 columns (W <= 64: two per row, as full as 64 columns would be); wide
#   ones 8 rows of 128 contiguous columns (16-byte accesses). 8 x 64 and 4 x 128 tiles (4
#   elements per thread) spill 8 bytes in the deconv_add forward (bfloat16, sm_90) with
#   triton 3.6's ptxas (CUDA 12.8).
# - "channels_last": inner = C (21 VOC / 19 Cityscapes / 150 ADE20K classes): 32 channels
#   when C <= 32 (one chunk), else 64 (ADE20K: 3 chunks, 78% used).
SHIPPED_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig("nchw", 32, 16, 32),
    KernelConfig("nchw", 64, 16, 32),
    KernelConfig("nchw", None, 8, 128),
    KernelConfig("channels_last", 16, 32, 16),
    KernelConfig("channels_last", 32, 16, 32),
    KernelConfig("channels_last", None, 8, 64),
)


def select_config(reference: torch.Tensor, configs=None) -> KernelConfig:
    """The shipped config for the tensor a kernel writes (its layout and its inner size)."""
    channels_last = _checks.channels_last_output(reference)
    layout = "channels_last" if channels_last else "nchw"
    inner = reference.shape[1] if channels_last else reference.shape[3]
    for config in configs or SHIPPED_CONFIGS:
        if config.layout == layout and (config.max_inner is None or inner <= config.max_inner):
            return config
    raise AssertionError(f"no shipped config for {layout} and inner size {inner}")  # unreachable


def num_tiles(config: KernelConfig, shape) -> Tuple[int, int]:
    """(programs, spatial tiles) for a kernel writing a tensor of ``shape`` (N, C, H, W).

    Spatial tiles: the programs of one channel block ("nchw": of one channel), the first
    dimension of the deconvolution's grad_weight partials.
    """
    N, C, H, W = shape
    if config.channels_last:
        spatial = N * H * triton.cdiv(W, config.block_r)
        return spatial * triton.cdiv(C, config.block_i), spatial
    spatial = N * triton.cdiv(H, config.block_r) * triton.cdiv(W, config.block_i)
    return spatial * C, spatial


def not_supported_reasons(x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> List[str]:
    """Why this backend cannot serve these tensors; empty when it can."""
    return device_reasons("fastseg.triton.upsample_add", x, skip=skip)


def device_reasons(module: str, x: torch.Tensor, **others) -> List[str]:
    """The reasons shared by the FCN decoder kernels: triton, device, dtype, capability."""
    reasons: List[str] = []
    if _TRITON_IMPORT_ERROR is not None:
        reasons.append(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    device = x.device
    if device.type == "cuda":
        if not INTERPRET:
            if x.dtype not in CUDA_DTYPES:
                reasons.append(f"x dtype {x.dtype} on cuda is not supported "
                               f"(supported: {', '.join(str(d) for d in CUDA_DTYPES)})")
            try:
                capability = torch.cuda.get_device_capability(device)
            except Exception as error:  # pragma: no cover - a broken CUDA setup
                reasons.append(f"cannot query the compute capability of {device}: {error}")
            else:
                if capability < MIN_CAPABILITY:
                    reasons.append(
                        f"compute capability {capability[0]}.{capability[1]} of {device} is "
                        f"below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (untested)")
    elif device.type == "cpu":
        if not INTERPRET:
            reasons.append(f"x is on cpu and TRITON_INTERPRET was not 1 when {module} was "
                           "imported")
    else:
        reasons.append(f"x is on {device.type}: the triton backend runs on cuda "
                       "(and on cpu under TRITON_INTERPRET=1)")
    if (device.type != "cuda" or INTERPRET) and x.dtype not in INTERPRETER_DTYPES:
        reasons.append(f"x dtype {x.dtype} is not supported")
    for name, t in others.items():
        if t is None:
            continue
        if t.device != device:
            reasons.append(f"{name} is on {t.device}, x on {device}")
        if t.dtype != x.dtype:
            reasons.append(f"{name} has dtype {t.dtype}, x {x.dtype}")
    return reasons


if triton is not None:

    @triton.jit
    def _tile(
        C, H, W,                      # sizes of the tensor the program's tile indexes
        CHANNELS_LAST: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        """This program's image n, broadcastable row / column / channel index tensors, the
        tile mask and the spatial tile id (the programs of one channel block).

        "nchw": rows [R, 1], columns [1, I], channel [1, 1] (pid: n, c, row block, column
        block from slowest to fastest). "channels_last": row [1, 1], columns [R, 1],
        channels [1, I] (pid: n, row, column block, channel block).
        """
        pid = tl.program_id(0)
        if CHANNELS_LAST:
            n_cb = tl.cdiv(C, BLOCK_I)
            n_wb = tl.cdiv(W, BLOCK_R)
            cb = pid % n_cb
            t = pid // n_cb
            wb = t % n_wb
            t = t // n_wb
            h = t % H
            n = t // H
            spatial = t * n_wb + wb
            hv = tl.full([1, 1], 0, tl.int32) + h
            wv = (wb * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
            cv = (cb * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]
        else:
            n_hb = tl.cdiv(H, BLOCK_R)
            n_wb = tl.cdiv(W, BLOCK_I)
            wb = pid % n_wb
            t = pid // n_wb
            hb = t % n_hb
            t = t // n_hb
            c = t % C
            n = t // C
            spatial = (n * n_hb + hb) * n_wb + wb
            hv = (hb * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
            wv = (wb * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]
            cv = tl.full([1, 1], 0, tl.int32) + c
        mask = (hv < H) & (wv < W) & (cv < C)
        if INT64_INDEX:
            n = n.to(tl.int64)
            hv = hv.to(tl.int64)
            wv = wv.to(tl.int64)
            cv = cv.to(tl.int64)
        return n, hv, wv, cv, mask, spatial

    @triton.jit
    def _add_skip_and_store(
        acc, skip_ptr, out_ptr, n, hv, wv, cv, mask,
        ss_n, ss_c, ss_h, ss_w,
        so_n, so_c, so_h, so_w,
        skip_y, skip_x,
        HAS_SKIP: tl.constexpr,
    ):
        """The forwards' epilogue: out[tile] = acc (float32) + skip[n, c, y + sy, x + sx]."""
        if HAS_SKIP:
            s = tl.load(skip_ptr + n * ss_n + cv * ss_c + (hv + skip_y) * ss_h
                        + (wv + skip_x) * ss_w, mask=mask, other=0.0)
            acc += s.to(tl.float32)
        tl.store(out_ptr + n * so_n + cv * so_c + hv * so_h + wv * so_w,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _linear_taps(scale, dst, in_size, out_size, ALIGN_CORNERS: tl.constexpr):
        """(i0, i1, w0, w1) of output indices `dst` along one axis (see the module doc)."""
        d = dst.to(tl.float32)
        if ALIGN_CORNERS:
            src = scale * d
        else:
            src = scale * (d + 0.5) - 0.5
            src = tl.maximum(src, 0.0)
        i0 = src.to(dst.dtype)  # src >= 0: truncation is floor
        i0 = tl.minimum(i0, in_size - 1)
        lam = src - i0.to(tl.float32)
        lam = tl.minimum(tl.maximum(lam, 0.0), 1.0)
        i1 = i0 + tl.where(i0 < in_size - 1, 1, 0).to(dst.dtype)
        same = in_size == out_size  # equal sizes copy
        i0 = tl.where(same, dst, i0)
        i1 = tl.where(same, dst, i1)
        w1 = tl.where(same, 0.0, lam)
        w0 = tl.where(same, 1.0, 1.0 - lam)
        return i0, i1, w0, w1

    @triton.jit
    def _tap_weight(i0, i1, w0, w1, i):
        """Weight of input index i in an interpolation (0 when it is not one of its taps)."""
        return tl.where(i0 == i, w0, 0.0) + tl.where(i1 == i, w1, 0.0)

    @triton.jit
    def _tap_range(scale, i, in_size, out_size, search_steps, ALIGN_CORNERS: tl.constexpr):
        """Outputs [lo, hi) whose taps contain input index i (linear_tap_range): a binary
        search of search_steps >= bit_length(out_size) halvings, vectorized over i."""
        a = tl.zeros_like(i)
        b = tl.zeros_like(i) + out_size
        for _ in range(search_steps):  # first dst in [a, b) with i1 >= i
            mid = a + (b - a) // 2
            _, t1, _, _ = _linear_taps(scale, mid, in_size, out_size, ALIGN_CORNERS)
            live = a < b
            left = t1 >= i
            b = tl.where(live & left, mid, b)
            a = tl.where(live & (left == 0), mid + 1, a)
        lo = a
        b = tl.zeros_like(i) + out_size
        for _ in range(search_steps):  # first dst in [a, b) with i0 > i
            mid = a + (b - a) // 2
            t0, _, _, _ = _linear_taps(scale, mid, in_size, out_size, ALIGN_CORNERS)
            live = a < b
            left = t0 > i
            b = tl.where(live & left, mid, b)
            a = tl.where(live & (left == 0), mid + 1, a)
        return lo, a

    # Forward. For output (n, c, oy, ox), with (y0, y1, wy0, wy1) the row taps of oy and
    # (x0, x1, wx0, wx1) the column taps of ox:
    #   out = wy0 * (wx0 * x[y0, x0] + wx1 * x[y0, x1]) + wy1 * (wx0 * x[y1, x0] + wx1 * x[y1, x1])
    #         + skip[n, c, oy + sy, ox + sx]
    @triton.jit
    def upsample_add_forward_kernel(
        x_ptr,      # (N, C, Hi, Wi), strides (sx_n, sx_c, sx_h, sx_w)
        skip_ptr,   # (N, C, >= sy + Ho, >= sx + Wo) (dummy without HAS_SKIP)
        out_ptr,    # (N, C, Ho, Wo), strides (so_n, so_c, so_h, so_w)
        C, Hi, Wi, Ho, Wo,
        sx_n, sx_c, sx_h, sx_w,
        ss_n, ss_c, ss_h, ss_w,
        so_n, so_c, so_h, so_w,
        skip_y, skip_x,            # skip_offset
        scale_h, scale_w,          # float32 source-per-destination ratios
        HAS_SKIP: tl.constexpr,
        ALIGN_CORNERS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        n, hv, wv, cv, mask, _ = _tile(C, Ho, Wo, CHANNELS_LAST, INT64_INDEX, BLOCK_R, BLOCK_I)
        y0, y1, wy0, wy1 = _linear_taps(scale_h, hv, Hi, Ho, ALIGN_CORNERS)
        x0, x1, wx0, wx1 = _linear_taps(scale_w, wv, Wi, Wo, ALIGN_CORNERS)
        base = x_ptr + n * sx_n + cv * sx_c
        r0 = base + y0 * sx_h
        r1 = base + y1 * sx_h
        c0 = x0 * sx_w
        c1 = x1 * sx_w
        v00 = tl.load(r0 + c0, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(r0 + c1, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(r1 + c0, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(r1 + c1, mask=mask, other=0.0).to(tl.float32)
        val = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        _add_skip_and_store(val, skip_ptr, out_ptr, n, hv, wv, cv, mask, ss_n, ss_c, ss_h, ss_w,
                            so_n, so_c, so_h, so_w, skip_y, skip_x, HAS_SKIP)

    # Backward (a gather). For input (n, c, iy, ix), with [ylo, yhi) / [xlo, xhi) the output
    # rows / columns whose taps contain iy / ix:
    #   grad_x = sum_{oy in [ylo, yhi)} w_y(oy, iy) * sum_{ox in [xlo, xhi)} w_x(ox, ix) * g[oy, ox]
    # summed in this order (rows outer, columns inner): the same bits on every run.
    @triton.jit
    def upsample_add_backward_kernel(
        grad_output_ptr,  # (N, C, Ho, Wo), strides (sg_n, sg_c, sg_h, sg_w)
        grad_x_ptr,       # (N, C, Hi, Wi), strides (sd_n, sd_c, sd_h, sd_w)
        C, Hi, Wi, Ho, Wo,
        sg_n, sg_c, sg_h, sg_w,
        sd_n, sd_c, sd_h, sd_w,
        scale_h, scale_w,
        steps_h, steps_w,          # binary-search steps: bit_length(Ho), bit_length(Wo)
        ALIGN_CORNERS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        n, hv, wv, cv, mask, _ = _tile(C, Hi, Wi, CHANNELS_LAST, INT64_INDEX, BLOCK_R, BLOCK_I)
        ylo, yhi = _tap_range(scale_h, hv, Hi, Ho, steps_h, ALIGN_CORNERS)
        xlo, xhi = _tap_range(scale_w, wv, Wi, Wo, steps_w, ALIGN_CORNERS)
        # Out-of-tile lanes contribute no iterations.
        ny = tl.max(tl.max(tl.where(hv < Hi, yhi - ylo, 0), axis=1), axis=0)
        nx = tl.max(tl.max(tl.where(wv < Wi, xhi - xlo, 0), axis=1), axis=0)
        g_base = grad_output_ptr + n * sg_n + cv * sg_c
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for dy in range(0, ny):
            oy = ylo + dy
            y0, y1, wy0, wy1 = _linear_taps(scale_h, oy, Hi, Ho, ALIGN_CORNERS)
            wy = tl.where(oy < yhi, _tap_weight(y0, y1, wy0, wy1, hv), 0.0)
            row_mask = mask & (oy < yhi)
            row = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
            for dx in range(0, nx):
                ox = xlo + dx
                x0, x1, wx0, wx1 = _linear_taps(scale_w, ox, Wi, Wo, ALIGN_CORNERS)
                wx = tl.where(ox < xhi, _tap_weight(x0, x1, wx0, wx1, wv), 0.0)
                g = tl.load(g_base + oy * sg_h + ox * sg_w, mask=row_mask & (ox < xhi),
                            other=0.0)
                row += wx * g.to(tl.float32)
            acc += wy * row
        tl.store(grad_x_ptr + n * sd_n + cv * sd_c + hv * sd_h + wv * sd_w,
                 acc.to(grad_x_ptr.dtype.element_ty), mask=mask)


def interpreted_fake(tensor: torch.Tensor) -> bool:
    """Whether this is a fake (metadata only) pass under TRITON_INTERPRET=1 (see
    fastseg.triton._common.interpreted_fake); also deconv_add's."""
    return _common.interpreted_fake(tensor, INTERPRET)


def search_steps(out_size: int) -> int:
    """Halvings that take a binary search over [0, out_size] to one point."""
    return max(int(out_size).bit_length(), 1)


if triton is not None:
    import importlib

    # The module (fastseg.ops re-exports the function under the same name).
    _ops = importlib.import_module("fastseg.ops.upsample_add")

    def _forward_impl(
        x: torch.Tensor,
        skip: Optional[torch.Tensor],
        skip_offset: List[int],
        output_size: List[int],
        scales: List[float],
        align_corners: bool,
    ) -> torch.Tensor:
        """Bilinear upsampling of x to output_size plus the skip window (see module doc)."""
        N, C, Hi, Wi = x.shape
        Ho, Wo = output_size
        out = _ops.fake_forward(x, skip, skip_offset, output_size, scales, align_corners)
        if out.numel() == 0 or interpreted_fake(x):
            return out
        config = select_config(out)
        programs, _ = num_tiles(config, out.shape)
        block = max(config.block_r, config.block_i)
        skip_strides = skip.stride() if skip is not None else (0, 0, 0, 0)
        _common.launch_tiled(
            upsample_add_forward_kernel, config, programs, x,
            x, skip if skip is not None else out, out,
            C, Hi, Wi, Ho, Wo,
            *x.stride(), *skip_strides, *out.stride(),
            int(skip_offset[0]), int(skip_offset[1]),
            float(scales[0]), float(scales[1]),
            int64_index=needs_int64(x, skip, out, margin=block),
            HAS_SKIP=skip is not None,
            ALIGN_CORNERS=bool(align_corners),
        )
        return out

    def _backward_impl(
        grad_output: torch.Tensor,
        input_size: List[int],
        scales: List[float],
        align_corners: bool,
    ) -> torch.Tensor:
        """grad_x of the forward: a gather over the output gradient (see module doc)."""
        N, C, Ho, Wo = grad_output.shape
        Hi, Wi = input_size
        grad_x = _ops.fake_backward(grad_output, input_size, scales, align_corners)
        if grad_x.numel() == 0 or interpreted_fake(grad_output):
            return grad_x
        if grad_output.numel() == 0:  # no output rows or columns: nothing reads x
            return grad_x.zero_()
        config = select_config(grad_x)
        programs, _ = num_tiles(config, grad_x.shape)
        block = max(config.block_r, config.block_i)
        _common.launch_tiled(
            upsample_add_backward_kernel, config, programs, grad_output,
            grad_output, grad_x,
            C, Hi, Wi, Ho, Wo,
            *grad_output.stride(), *grad_x.stride(),
            float(scales[0]), float(scales[1]),
            search_steps(Ho), search_steps(Wo),
            int64_index=needs_int64(grad_output, grad_x, margin=block),
            ALIGN_CORNERS=bool(align_corners),
        )
        return grad_x

    # triton ops on the GPU, opaque custom ops under the interpreter; the fakes of
    # fastseg.ops.upsample_add and its autograd (see fastseg.triton._common.define_ops).
    forward, backward = _common.define_ops(FORWARD_OP_NAME, _forward_impl, BACKWARD_OP_NAME,
                                           _backward_impl, _ops, INTERPRET)

else:
    forward = None
    backward = None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): tests/test_triton_aot.py.
# ---------------------------------------------------------------------------------------

TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
}


def aot_compile(kernel, config: KernelConfig, capability: int, pointers: dict, scalars: dict,
                constexprs: dict, ones: Tuple[str, ...] = (), divisible: Tuple[str, ...] = ()):
    """Compile `kernel` for ``GPUTarget("cuda", capability, 32)`` without a GPU.

    pointers / scalars: triton types of the arguments by name; ``ones`` names integer
    arguments that equal 1 (the JIT turns them into constants: unit strides); ``divisible``
    names arguments divisible by 16 (the JIT's hint for aligned pointers and sizes).
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if INTERPRET:
        raise RuntimeError("cannot compile ahead of time under TRITON_INTERPRET=1")

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = scalars.get(name, "i32")
    divisible = [n for n in tuple(pointers) + tuple(divisible)
                 if n in signature and signature[n] != "constexpr"]
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    attrs = {(index[n],): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


# Sizes whose divisibility by 16 the JIT sees for typical aligned maps (512 x 512, ...).
_SIZE_ARGS = ("C", "H", "W", "Hi", "Wi", "Ho", "Wo")


def aligned_arguments(kernel, ones) -> Tuple[str, ...]:
    """The tensor strides (``s?_[nchw]``) and map sizes of `kernel` that are not unit
    constants: the JIT sees them divisible by 16 for aligned shapes (W = 512, C = 64), which
    is what lets it use vector accesses along the contiguous axis."""
    import re

    return tuple(n for n in kernel.arg_names if n not in ones and (
        re.fullmatch(r"s[a-z]_[nchw]", n) or n in _SIZE_ARGS))


def unit_strides(config: KernelConfig, prefixes) -> Tuple[str, ...]:
    """The stride arguments that are 1 for densely stored tensors of the config's layout."""
    axis = "c" if config.channels_last else "w"
    return tuple(f"{p}_{axis}" for p in prefixes)


def compile_ahead_of_time(kernel_name: str, config: KernelConfig, dtype: torch.dtype,
                          capability: int, *, has_skip: bool = True,
                          align_corners: bool = False, overrides: Optional[dict] = None,
                          ones: Optional[Tuple[str, ...]] = None):
    """Compile the forward or backward kernel at ``config`` for sm_<capability>.

    Defaults to what the launcher passes for densely stored tensors of the config's layout
    (the unit inner strides become constants, as in the JIT); ``overrides`` replaces
    constexprs (e.g. ``{"INT64_INDEX": True}``), ``ones`` the unit-stride arguments.
    Returns triton's CompiledKernel.
    """
    x = "*" + TRITON_TYPES[dtype]
    constexprs = dict(ALIGN_CORNERS=align_corners, CHANNELS_LAST=config.channels_last,
                      INT64_INDEX=False, BLOCK_R=config.block_r, BLOCK_I=config.block_i)
    scalars = dict(scale_h="fp32", scale_w="fp32")
    if kernel_name == "forward":
        kernel = upsample_add_forward_kernel
        constexprs["HAS_SKIP"] = has_skip
        pointers = dict(x_ptr=x, skip_ptr=x, out_ptr=x)
        default_ones = unit_strides(config, ("sx", "ss", "so") if has_skip else ("sx", "so"))
    elif kernel_name == "backward":
        kernel = upsample_add_backward_kernel
        pointers = dict(grad_output_ptr=x, grad_x_ptr=x)
        default_ones = unit_strides(config, ("sg", "sd"))
    else:
        raise _common.unknown_kernel(kernel_name)
    _common.apply_overrides(constexprs, overrides, kernel_name)
    ones = default_ones if ones is None else ones
    return aot_compile(kernel, config, capability, pointers, scalars, constexprs, ones=ones,
                       divisible=aligned_arguments(kernel, ones))


def resource_usage(compiled) -> dict:
    """Registers and spills of a compiled kernel (cuobjdump of the cubin, no GPU)."""
    from fastseg.triton.softmax_cross_entropy import resource_usage as usage

    return usage(compiled)


__all__ = [
    "FORWARD_OP_NAME", "BACKWARD_OP_NAME", "SHIPPED_CONFIGS", "KernelConfig", "INTERPRET",
    "forward", "backward", "not_supported_reasons", "select_config", "compile_ahead_of_time",
    "resource_usage",
]
