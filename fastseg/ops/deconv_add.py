"""fastseg.ops.deconv_add: FCN's per-class deconvolution, its crop and the skip-add in one pass.

    deconv_add(x, weight, stride, skip, crop, skip_offset, output_size)
      == F.conv_transpose2d(x, weight, stride=stride, groups=C)[:, :, cy:cy + Ho, cx:cx + Wo]
         + skip[:, :, oy:oy + Ho, ox:ox + Wo]

Only the cropped window of the deconvolution is computed, and the skip is added before the
single write. The backward reads the output gradient once and gathers from it both the
gradient of x (each input pixel: its k x k taps) and the gradient of the weight (per class:
sum over N, H, W of x times the gradient at each tap, in fixed-size partials summed in a
fixed order) - no atomics, bit-for-bit repeatable.
"""

from __future__ import annotations

import torch

from fastseg import _backend
from fastseg.ops import _checks, _reference
from fastseg.ops._autograd import register_fused_op

_OP = "deconv_add"


def deconv_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride,
    skip: torch.Tensor | None = None,
    crop=(0, 0),
    skip_offset=(0, 0),
    output_size=None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, stride=stride, groups=C)[:, :, cy:cy + Ho, cx:cx + Wo]
    + skip[:, :, oy:oy + Ho, ox:ox + Wo]``, fused.

    Args:
        x: scores ``(N, C, H, W)``, float32/float16/bfloat16 (float64 on the CPU).
        weight: ``(C, 1, kh, kw)``, one kernel per class (FCN: k = 2 * stride, initialized
            by :func:`fastseg.nn.init.bilinear_`), x's dtype and device.
        stride: an int or a pair.
        skip: optional finer scores ``(N, C, Hs, Ws)``.
        crop: ``(cy, cx)``, where the output window starts in the full deconvolution
            ``((H - 1) * sh + kh, (W - 1) * sw + kw)``.
        skip_offset: ``(oy, ox)``, where the window starts in the skip.
        output_size: ``(Ho, Wo)``; default: the rest of the deconvolution after the crop.
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference".

    Any strides are read in place; the output is channels_last when x is. Under autocast x,
    weight and skip are cast as for ``F.conv_transpose2d`` (to the region's dtype; float64
    left alone).
    """
    if isinstance(x, torch.Tensor):
        x, weight, skip = _checks.autocast_inputs(x.device.type, x, weight, skip)
    x, weight, skip, stride, crop, offset, out_size = _check(
        x, weight, stride, skip, crop, skip_offset, output_size)
    name = OP.select(backend, x.device.type, x, weight, skip)
    if name == "reference":
        return _reference.deconv_add(x, weight, stride, skip, crop, offset, out_size)
    return _forward_op(name)(x, weight.contiguous(), skip, list(stride), list(crop),
                             list(offset), list(out_size))


def _check(x, weight, stride, skip, crop, skip_offset, output_size):
    x = _checks.tensor4d(_OP, "x", x)
    weight = _checks.tensor4d(_OP, "weight", weight)
    _checks.like(_OP, "weight", weight, x)
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f"{_OP}: weight must be depthwise ({channels}, 1, kh, kw) for x with "
                         f"{channels} channels, got {tuple(weight.shape)}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"{_OP}: weight has an empty kernel {tuple(weight.shape[2:])}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{_OP}: x must have a non-empty spatial size, got {tuple(x.shape)}")
    stride = _checks.int_pair(_OP, "stride", stride, 1)
    crop = _checks.int_pair(_OP, "crop", crop, 0)
    full = tuple((n - 1) * s + k for n, s, k in zip(x.shape[2:], stride, weight.shape[2:]))
    if output_size is None:
        out_size = (full[0] - crop[0], full[1] - crop[1])
        if min(out_size) < 1:
            raise ValueError(f"{_OP}: crop {crop} leaves nothing of the deconvolution of size {full}")
    else:
        out_size = _checks.int_pair(_OP, "output_size", output_size, 1)
        if crop[0] + out_size[0] > full[0] or crop[1] + out_size[1] > full[1]:
            raise ValueError(f"{_OP}: output_size {out_size} at crop {crop} does not fit in the "
                             f"deconvolution of size {full} (x {tuple(x.shape[2:])}, stride "
                             f"{stride}, kernel {tuple(weight.shape[2:])})")
    offset = _checks.skip_window(_OP, skip, x, skip_offset, out_size)
    return x, weight, skip, stride, crop, offset, out_size


# --- backends ----------------------------------------------------------------------------

def _cpu_reasons(x, weight=None, skip=None):
    return _backend.extension_reasons("cpu", x)


def _cuda_reasons(x, weight=None, skip=None):
    return _backend.extension_reasons("cuda", x)


def _triton_reasons(x, weight=None, skip=None):
    return _backend.triton_reasons(_OP, x, weight, skip)


# auto's preference: as for upsample_add (CUDA C++ first until the GPU benchmark says).
OP = _backend.register_op(_backend.OpBackends(
    op=_OP, auto_order={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}))
OP.register("cuda", _cuda_reasons)
OP.register("triton", _triton_reasons)
OP.register("cpu", _cpu_reasons)
OP.register("reference", lambda x, weight=None, skip=None: [])


def _forward_op(name):
    if name == "triton":
        from fastseg.triton import deconv_add as kernels
        return kernels.forward
    return torch.ops.fastseg.deconv_add_forward


# --- torch.library: fake implementations and autograd --------------------------------------

def register_autograd(forward_name: str, backward) -> None:
    """Autograd of a deconv_add forward op (the C++ one or its Triton twin)."""

    def setup_context(ctx, inputs, output):
        x, weight, skip, stride, crop, skip_offset, output_size = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = (stride, crop)
        ctx.skip = None if skip is None else (
            tuple(skip.shape), tuple(skip_offset), _checks.channels_last_output(skip))

    def backward_fn(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_skip = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x, grad_weight = backward(grad, x, weight, *ctx.options)
        if ctx.skip is not None and ctx.needs_input_grad[2]:
            grad_skip = _checks.paste(grad, *ctx.skip)
        return grad_x, grad_weight, grad_skip, None, None, None, None

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)


def fake_forward(x, weight, skip, stride, crop, skip_offset, output_size):
    return _checks.empty_like_format(x, (x.shape[0], x.shape[1], *output_size))


def fake_backward(grad_output, x, weight, stride, crop):
    return _checks.empty_like_format(x, x.shape), torch.empty_like(weight)


register_fused_op(_OP, fake_forward, fake_backward, register_autograd)
