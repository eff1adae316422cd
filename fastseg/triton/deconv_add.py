"""Triton kernels of the fused depthwise deconvolution + crop + skip-add (FCN's learned
upsampling), forward and backward.

Low-level contract (the same one as the C++ ops ``fastseg::deconv_add_forward`` /
``_backward``, schemas in csrc/fastseg.cpp; the public layer ``fastseg/ops/deconv_add.py``
validates the arguments and registers autograd):

- ``forward(x, weight, skip, stride, crop, skip_offset, output_size) -> out``: ``x``
  (N, C, H, W) and ``skip`` None or (N, C, >= oy + Ho, >= ox + Wo) with ANY strides,
  ``weight`` (C, 1, kh, kw) contiguous; ``out`` (N, C, Ho, Wo) in x's memory format.
- ``backward(grad_output, x, weight, stride, crop) -> (grad_x, grad_weight)``: grad_x in x's
  memory format, grad_weight (C, 1, kh, kw) contiguous in weight's dtype.
- float32 / float16 / bfloat16 (float64 under the interpreter); float32 accumulation.

Index math (mirrors csrc/include/fastseg/upsample_add.h). Per axis, the transposed
convolution D (stride s, kernel k, no padding) has (n - 1) * s + k outputs; D-index Y = o + crop
of output o receives input i at kernel tap p = Y - i * s for the inputs i in
deconv_input_range(Y) = [ceil((Y - k + 1) / s)^+, min(Y // s + 1, n)); input i reaches the
output through the taps deconv_tap_range(i) = [max(crop - i * s, 0), min(Ho + crop - i * s, k)).

    out[n, c, oy, ox]  = sum_{iy, ix} x[n, c, iy, ix] * w[c, Y - iy * sh, X - ix * sw] + skip
    grad_x[n, c, iy, ix] = sum_{p, q} w[c, p, q] * g[n, c, iy * sh + p - cy, ix * sw + q - cx]
    grad_w[c, p, q]    = sum_{n, iy, ix} x[n, c, iy, ix] * g[n, c, iy * sh + p - cy, ...]

Kernel design: the tiles of fastseg.triton.upsample_add (its ``SHIPPED_CONFIGS``: "nchw"
rows x columns of a plane, contiguous along W; "channels_last" columns x channels of a row,
contiguous along C). The forward walks the ceil(kh / sh) x ceil(kw / sw) input taps of its
outputs (the kernel values are gathered from the small, cached weight). The backward owns
tiles of x: it walks the kh x kw kernel taps, gathers grad_x (a gather: no atomics) and writes
for every tap the tile's sum of x * g - per-program partials in a float32 buffer
(spatial tiles, C * kh * kw) that torch sums over its first dimension afterwards: a
fixed-shape reduction, deterministic, no atomics and no host sync.
"""

import importlib
from typing import List, Optional, Tuple

import torch

from fastseg.triton import _common
from fastseg.triton import upsample_add as _up
from fastseg.triton.upsample_add import (  # noqa: F401 - re-exported
    INTERPRET, KernelConfig, SHIPPED_CONFIGS, resource_usage, select_config,
)

triton = _up.triton
tl = _up.tl

FORWARD_OP_NAME = "fastseg::deconv_add_forward_triton"
BACKWARD_OP_NAME = "fastseg::deconv_add_backward_triton"


def not_supported_reasons(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                          skip: Optional[torch.Tensor] = None) -> List[str]:
    """Why this backend cannot serve these tensors; empty when it can."""
    return _up.device_reasons("fastseg.triton.deconv_add", x, weight=weight, skip=skip)


if triton is not None:
    _tile = _up._tile
    _add_skip_and_store = _up._add_skip_and_store

    # Forward: out[n, c, oy, ox] = sum over the input taps (iy, ix) of the D-index
    # (Y, X) = (oy + cy, ox + cx) of x[n, c, iy, ix] * w[c, Y - iy * sh, X - ix * sw], + skip.
    @triton.jit
    def deconv_add_forward_kernel(
        x_ptr,       # (N, C, H, W), strides (sx_n, sx_c, sx_h, sx_w)
        weight_ptr,  # (C, 1, KH, KW) contiguous
        skip_ptr,    # (N, C, >= sy + Ho, >= sx + Wo) (dummy without HAS_SKIP)
        out_ptr,     # (N, C, Ho, Wo), strides (so_n, so_c, so_h, so_w)
        C, H, W, Ho, Wo, KH, KW,
        sx_n, sx_c, sx_h, sx_w,
        ss_n, ss_c, ss_h, ss_w,
        so_n, so_c, so_h, so_w,
        stride_h, stride_w,
        crop_h, crop_w,
        skip_y, skip_x,
        taps_h, taps_w,      # ceil(KH / stride_h), ceil(KW / stride_w)
        HAS_SKIP: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        n, hv, wv, cv, mask, _ = _tile(C, Ho, Wo, CHANNELS_LAST, INT64_INDEX, BLOCK_R, BLOCK_I)
        Y = hv + crop_h
        X = wv + crop_w
        # deconv_input_range: inputs [lo, hi) whose kernel reaches D-index Y (Y >= 0).
        fy = Y - KH + 1
        iy_lo = tl.where(fy <= 0, 0, (fy + stride_h - 1) // stride_h)
        iy_hi = tl.minimum(Y // stride_h + 1, H)
        fx = X - KW + 1
        ix_lo = tl.where(fx <= 0, 0, (fx + stride_w - 1) // stride_w)
        ix_hi = tl.minimum(X // stride_w + 1, W)
        x_base = x_ptr + n * sx_n + cv * sx_c
        w_base = weight_ptr + cv * (KH * KW)
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for ty in range(0, taps_h):
            iy = iy_lo + ty
            my = mask & (iy < iy_hi)
            p = Y - iy * stride_h
            for tx in range(0, taps_w):
                ix = ix_lo + tx
                m = my & (ix < ix_hi)
                q = X - ix * stride_w
                w = tl.load(w_base + p * KW + q, mask=m, other=0.0)
                v = tl.load(x_base + iy * sx_h + ix * sx_w, mask=m, other=0.0)
                acc += w.to(tl.float32) * v.to(tl.float32)
        _add_skip_and_store(acc, skip_ptr, out_ptr, n, hv, wv, cv, mask, ss_n, ss_c, ss_h, ss_w,
                            so_n, so_c, so_h, so_w, skip_y, skip_x, HAS_SKIP)

    # Backward, over a tile of x: for every kernel tap (p, q), g = grad_output at the tap's
    # output (iy * sh + p - cy, ix * sw + q - cx) (0 outside the output),
    #   grad_x += w[c, p, q] * g,     partial[tile, c, p, q] = sum over the tile of x * g.
    @triton.jit
    def deconv_add_backward_kernel(
        grad_output_ptr,  # (N, C, Ho, Wo), strides (sg_n, sg_c, sg_h, sg_w)
        x_ptr,            # (N, C, H, W), strides (sx_n, sx_c, sx_h, sx_w)
        weight_ptr,       # (C, 1, KH, KW) contiguous
        grad_x_ptr,       # (N, C, H, W), strides (sd_n, sd_c, sd_h, sd_w)
        partial_ptr,      # (spatial tiles, C * KH * KW) float32 grad_weight partials
        C, H, W, Ho, Wo, KH, KW,
        sg_n, sg_c, sg_h, sg_w,
        sx_n, sx_c, sx_h, sx_w,
        sd_n, sd_c, sd_h, sd_w,
        stride_h, stride_w,
        crop_h, crop_w,
        CHANNELS_LAST: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        n, hv, wv, cv, mask, spatial = _tile(C, H, W, CHANNELS_LAST, INT64_INDEX,
                                             BLOCK_R, BLOCK_I)
        xv = tl.load(x_ptr + n * sx_n + cv * sx_c + hv * sx_h + wv * sx_w, mask=mask,
                     other=0.0).to(tl.float32)
        y0 = hv * stride_h - crop_h  # output row of tap p = 0
        x0 = wv * stride_w - crop_w
        g_base = grad_output_ptr + n * sg_n + cv * sg_c
        w_base = weight_ptr + cv * (KH * KW)
        mask_c = cv < C
        KHW = KH * KW
        if INT64_INDEX:
            part_off = spatial.to(tl.int64) * C * KHW + cv * KHW
        else:
            part_off = spatial * C * KHW + cv * KHW
        part_row = partial_ptr + part_off
        if not CHANNELS_LAST:  # the program's one channel: a scalar pointer
            part_one = partial_ptr + tl.max(tl.max(part_off, axis=1), axis=0)
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for p in range(0, KH):
            oy = y0 + p
            my = mask & (oy >= 0) & (oy < Ho)
            for q in range(0, KW):
                ox = x0 + q
                m = my & (ox >= 0) & (ox < Wo)
                g = tl.load(g_base + oy * sg_h + ox * sg_w, mask=m, other=0.0).to(tl.float32)
                w = tl.load(w_base + p * KW + q, mask=mask_c, other=0.0).to(tl.float32)
                acc += w * g
                xg = xv * g
                if CHANNELS_LAST:  # one partial per channel of the tile
                    tl.store(part_row + p * KW + q, tl.sum(xg, axis=0)[None, :], mask=mask_c)
                else:  # one channel per program
                    tl.store(part_one + p * KW + q, tl.sum(tl.sum(xg, axis=1), axis=0))
        tl.store(grad_x_ptr + n * sd_n + cv * sd_c + hv * sd_h + wv * sd_w,
                 acc.to(grad_x_ptr.dtype.element_ty), mask=mask)

    _ops = importlib.import_module("fastseg.ops.deconv_add")

    def _forward_impl(
        x: torch.Tensor,
        weight: torch.Tensor,
        skip: Optional[torch.Tensor],
        stride: List[int],
        crop: List[int],
        skip_offset: List[int],
        output_size: List[int],
    ) -> torch.Tensor:
        """The cropped depthwise deconvolution of x plus the skip window (see module doc)."""
        N, C, H, W = x.shape
        KH, KW = weight.shape[2], weight.shape[3]
        Ho, Wo = output_size
        out = _ops.fake_forward(x, weight, skip, stride, crop, skip_offset, output_size)
        if out.numel() == 0 or _up.interpreted_fake(x):
            return out
        weight = _dense_weight(weight)
        config = select_config(out)
        programs, _ = _up.num_tiles(config, out.shape)
        block = max(config.block_r, config.block_i)
        skip_strides = skip.stride() if skip is not None else (0, 0, 0, 0)
        sh, sw = int(stride[0]), int(stride[1])
        _common.launch_tiled(
            deconv_add_forward_kernel, config, programs, x,
            x, weight, skip if skip is not None else out, out,
            C, H, W, Ho, Wo, KH, KW,
            *x.stride(), *skip_strides, *out.stride(),
            sh, sw, int(crop[0]), int(crop[1]),
            int(skip_offset[0]), int(skip_offset[1]),
            -(-KH // sh), -(-KW // sw),
            int64_index=_up.needs_int64(x, skip, out, weight, margin=block + KH + KW),
            HAS_SKIP=skip is not None,
        )
        return out

    def _backward_impl(
        grad_output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: List[int],
        crop: List[int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(grad_x, grad_weight) of the forward (see module doc)."""
        N, C, H, W = x.shape
        KH, KW = weight.shape[2], weight.shape[3]
        Ho, Wo = grad_output.shape[2], grad_output.shape[3]
        grad_x = _up._checks.empty_like_format(x, x.shape)
        if _up.interpreted_fake(x):
            return grad_x, torch.empty((C, 1, KH, KW), dtype=weight.dtype, device=weight.device)
        if grad_x.numel() == 0 or grad_output.numel() == 0:
            grad_x.zero_()
            return grad_x, torch.zeros((C, 1, KH, KW), dtype=weight.dtype, device=weight.device)
        weight = _dense_weight(weight)
        config = select_config(grad_x)
        programs, spatial = _up.num_tiles(config, grad_x.shape)
        partial = torch.empty((spatial, C * KH * KW), dtype=torch.float32, device=x.device)
        block = max(config.block_r, config.block_i)
        _common.launch_tiled(
            deconv_add_backward_kernel, config, programs, x,
            grad_output, x, weight, grad_x, partial,
            C, H, W, Ho, Wo, KH, KW,
            *grad_output.stride(), *x.stride(), *grad_x.stride(),
            int(stride[0]), int(stride[1]), int(crop[0]), int(crop[1]),
            int64_index=_up.needs_int64(grad_output, x, grad_x, partial,
                                        margin=block + KH + KW),
        )
        # A fixed-shape reduction in a fixed order: the same bits on every run.
        grad_weight = partial.sum(dim=0).view(C, 1, KH, KW).to(weight.dtype)
        return grad_x, grad_weight

    def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
        # The contract hands a contiguous (C, 1, kh, kw) weight; a tiny copy otherwise.
        return weight if weight.is_contiguous() else weight.contiguous()

    forward, backward = _common.define_ops(FORWARD_OP_NAME, _forward_impl, BACKWARD_OP_NAME,
                                           _backward_impl, _ops, INTERPRET)

else:
    forward = None
    backward = None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): tests/test_triton_aot.py.
# ---------------------------------------------------------------------------------------

def compile_ahead_of_time(kernel_name: str, config: KernelConfig, dtype: torch.dtype,
                          capability: int, *, has_skip: bool = True,
                          overrides: Optional[dict] = None,
                          ones: Optional[Tuple[str, ...]] = None):
    """Compile the forward or backward kernel at ``config`` for sm_<capability> (see
    fastseg.triton.upsample_add.compile_ahead_of_time)."""
    x = "*" + _up.TRITON_TYPES[dtype]
    constexprs = dict(CHANNELS_LAST=config.channels_last, INT64_INDEX=False,
                      BLOCK_R=config.block_r, BLOCK_I=config.block_i)
    if kernel_name == "forward":
        kernel = deconv_add_forward_kernel
        constexprs["HAS_SKIP"] = has_skip
        pointers = dict(x_ptr=x, weight_ptr=x, skip_ptr=x, out_ptr=x)
        default_ones = _up.unit_strides(config, ("sx", "ss", "so") if has_skip else ("sx", "so"))
    elif kernel_name == "backward":
        kernel = deconv_add_backward_kernel
        pointers = dict(grad_output_ptr=x, x_ptr=x, weight_ptr=x, grad_x_ptr=x,
                        partial_ptr="*fp32")
        default_ones = _up.unit_strides(config, ("sg", "sx", "sd"))
    else:
        raise _common.unknown_kernel(kernel_name)
    _common.apply_overrides(constexprs, overrides, kernel_name)
    ones = default_ones if ones is None else ones
    return _up.aot_compile(kernel, config, capability, pointers, {}, constexprs, ones=ones,
                           divisible=_up.aligned_arguments(kernel, ones))


__all__ = [
    "FORWARD_OP_NAME", "BACKWARD_OP_NAME", "SHIPPED_CONFIGS", "KernelConfig", "INTERPRET",
    "forward", "backward", "not_supported_reasons", "select_config", "compile_ahead_of_time",
    "resource_usage",
]
