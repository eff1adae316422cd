"""fastseg.ops.upsample_add: FCN's bilinear upsampling and skip-add in one pass.

    upsample_add(x, skip, size, scale_factor, align_corners, skip_offset)
      == F.interpolate(x, size, scale_factor, mode="bilinear", align_corners)
         + skip[:, :, oy:oy + Ho, ox:ox + Wo]

The forward reads x and the skip window once and writes the output once (eager writes the
upsampled map and reads it back for the add). The backward for x is a gather: each input
pixel sums the output gradients of the contiguous run of output rows and columns whose
bilinear taps contain it, in a fixed order - no atomics, bit-for-bit repeatable (eager's CUDA
backward scatters with atomicAdd). The skip's gradient is the output gradient itself, pasted
into zeros when the skip is larger than the window.
"""

from __future__ import annotations

import math

import torch

from fastseg import _backend
from fastseg.ops import _checks, _reference
from fastseg.ops._autograd import register_fused_op

_OP = "upsample_add"


def upsample_add(
    x: torch.Tensor,
    skip: torch.Tensor | None = None,
    size=None,
    scale_factor=None,
    align_corners: bool = False,
    skip_offset=(0, 0),
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.interpolate(x, size, scale_factor, mode="bilinear", align_corners) +
    skip[:, :, oy:oy + Ho, ox:ox + Wo]``, fused.

    Args:
        x: coarse scores ``(N, C, H, W)``, float32/float16/bfloat16 (float64 on the CPU).
        skip: finer scores ``(N, C, Hs, Ws)`` with x's dtype and device, or None (a plain,
            deterministic bilinear upsampling).
        size / scale_factor: as in ``F.interpolate`` (one of them, an int/float or a pair).
            With neither, ``size = (Hs - oy, Ws - ox)``: the rest of the skip.
        align_corners: as in ``F.interpolate``.
        skip_offset: ``(oy, ox)``, where the output's window starts in the skip (FCN's crop).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference".

    Any strides are read in place; the output is channels_last when x is.
    """
    x, skip, out_size, scales, offset = _check(x, skip, size, scale_factor, align_corners,
                                               skip_offset)
    name = OP.select(backend, x.device.type, x, skip)
    if name == "reference":
        sizes = None if scale_factor is not None else out_size
        return _reference.upsample_add(x, skip, sizes, scale_factor, align_corners, offset)
    return _forward_op(name)(x, skip, list(offset), list(out_size), list(scales),
                             bool(align_corners))


def _check(x, skip, size, scale_factor, align_corners, skip_offset):
    x = _checks.tensor4d(_OP, "x", x)
    if not isinstance(align_corners, bool):
        raise TypeError(f"{_OP}: align_corners must be a bool, got {type(align_corners).__name__}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{_OP}: x must have a non-empty spatial size, got {tuple(x.shape)}")
    in_size = (x.shape[2], x.shape[3])
    if size is not None and scale_factor is not None:
        raise ValueError(f"{_OP}: give only one of size and scale_factor")
    if size is not None:
        out_size = _checks.int_pair(_OP, "size", size, 1)
    elif scale_factor is not None:
        factors = _checks.float_pair(_OP, "scale_factor", scale_factor)
        # F.interpolate's rule: floor(in * scale), in double precision.
        out_size = tuple(int(math.floor(float(n) * f)) for n, f in zip(in_size, factors))
        if min(out_size) < 1:
            raise ValueError(f"{_OP}: scale_factor {scale_factor!r} makes an empty output "
                             f"{out_size} from x of spatial size {in_size}")
    else:
        if skip is None:
            raise ValueError(f"{_OP}: give size or scale_factor (or a skip, whose size is used)")
        offset = _checks.int_pair(_OP, "skip_offset", skip_offset, 0)
        _checks.tensor4d(_OP, "skip", skip)
        out_size = (skip.shape[2] - offset[0], skip.shape[3] - offset[1])
        if min(out_size) < 1:
            raise ValueError(f"{_OP}: skip_offset {offset} leaves no output inside the skip of "
                             f"spatial size {tuple(skip.shape[2:])}")
    offset = _checks.skip_window(_OP, skip, x, skip_offset, out_size)
    factors = None if scale_factor is None else _checks.float_pair(_OP, "scale_factor", scale_factor)
    scales = tuple(source_scale(n, m, align_corners, None if factors is None else factors[i])
                   for i, (n, m) in enumerate(zip(in_size, out_size)))
    return x, skip, out_size, scales, offset


def source_scale(in_size: int, out_size: int, align_corners: bool, scale_factor) -> float:
    """PyTorch's source-per-destination ratio (area_pixel_compute_scale)."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    if scale_factor is not None:
        return 1.0 / scale_factor
    return in_size / out_size


# --- backends ----------------------------------------------------------------------------

def _cpu_reasons(x, skip=None):
    return _backend.extension_reasons("cpu", x)


def _cuda_reasons(x, skip=None):
    return _backend.extension_reasons("cuda", x)


def _triton_reasons(x, skip=None):
    return _backend.triton_reasons(_OP, x, skip)


# auto's preference. CUDA: the CUDA C++ kernel first (no JIT warm-up, no triton dependency);
# the GPU benchmark (scripts/gpu_check.sh) is what should reorder these. CPU: the C++ kernel.
OP = _backend.register_op(_backend.OpBackends(
    op=_OP, auto_order={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}))
OP.register("cuda", _cuda_reasons)
OP.register("triton", _triton_reasons)
OP.register("cpu", _cpu_reasons)
OP.register("reference", lambda x, skip=None: [])


def _forward_op(name):
    if name == "triton":
        from fastseg.triton import upsample_add as kernels
        return kernels.forward
    return torch.ops.fastseg.upsample_add_forward


# --- torch.library: fake implementations and autograd --------------------------------------

def register_autograd(forward_name: str, backward) -> None:
    """Autograd of an upsample_add forward op (the C++ one or its Triton twin)."""

    def setup_context(ctx, inputs, output):
        x, skip, skip_offset, output_size, scales, align_corners = inputs
        ctx.options = (list(x.shape[2:]), scales, align_corners)
        ctx.skip = None if skip is None else (
            tuple(skip.shape), tuple(skip_offset), _checks.channels_last_output(skip))

    def backward_fn(ctx, grad):
        grad_x = grad_skip = None
        if ctx.needs_input_grad[0]:
            grad_x = backward(grad, *ctx.options)
        if ctx.skip is not None and ctx.needs_input_grad[1]:
            grad_skip = _checks.paste(grad, *ctx.skip)
        return grad_x, grad_skip, None, None, None, None

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)


def fake_forward(x, skip, skip_offset, output_size, scales, align_corners):
    return _checks.empty_like_format(x, (x.shape[0], x.shape[1], *output_size))


def fake_backward(grad_output, input_size, scales, align_corners):
    return _checks.empty_like_format(grad_output, (*grad_output.shape[:2], *input_size))


register_fused_op(_OP, fake_forward, fake_backward, register_autograd)
