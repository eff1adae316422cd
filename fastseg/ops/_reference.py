"""Pure-PyTorch references of every fastseg op.

These are the contracts written as eager compositions. They are the "reference" backend
and the ground truth the tests compare every fused kernel against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# torch's Reduction enum values, used by the low-level ops' `reduction: int` argument.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def softmax_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy, plus an optional per-pixel weight map.

    With `pixel_weight` each pixel's loss is multiplied by it; with reduction="mean" the
    denominator is sum(weight[target] * pixel_weight) over non-ignored pixels (for
    class-probability targets, which have no ignored pixels and no per-class denominator:
    sum(pixel_weight)).
    """
    if pixel_weight is None:
        if not target.dtype.is_floating_point:
            target = target.long()
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    probability_target = target.dtype.is_floating_point
    per_pixel = F.cross_entropy(
        input, target if probability_target else target.long(), weight,
        ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
    )
    per_pixel = per_pixel * pixel_weight.to(per_pixel.dtype)
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    if probability_target:
        return per_pixel.sum() / pixel_weight.to(per_pixel.dtype).sum()
    valid = target != ignore_index
    class_weight = (
        torch.ones((), dtype=per_pixel.dtype, device=input.device)
        if weight is None
        else weight.to(per_pixel.dtype)[torch.where(valid, target.long(), 0)]
    )
    denominator = (class_weight * pixel_weight.to(per_pixel.dtype) * valid).sum()
    return per_pixel.sum() / denominator


def upsample_add(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    size=None,
    scale_factor=None,
    align_corners: bool = False,
    skip_offset=(0, 0),
) -> torch.Tensor:
    """F.interpolate(x, bilinear) + skip cropped at skip_offset to the interpolated size."""
    up = F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear",
                       align_corners=align_corners)
    if skip is None:
        return up
    oy, ox = skip_offset
    return up + skip[:, :, oy:oy + up.shape[2], ox:ox + up.shape[3]]


def deconv_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride,
    skip: torch.Tensor | None = None,
    crop=(0, 0),
    skip_offset=(0, 0),
    output_size=None,
) -> torch.Tensor:
    """FCN's per-class deconvolution, cropped, plus the cropped skip."""
    full = F.conv_transpose2d(x, weight, stride=stride, groups=x.shape[1])
    cy, cx = crop
    if output_size is None:
        output_size = (full.shape[2] - cy, full.shape[3] - cx)
    ho, wo = output_size
    out = full[:, :, cy:cy + ho, cx:cx + wo]
    if skip is None:  # a new tensor in x's memory format, not a view that pins the full map
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.clone(memory_format=torch.channels_last if cl else torch.contiguous_format)
    oy, ox = skip_offset
    return out + skip[:, :, oy:oy + ho, ox:ox + wo]


def center_crop_offset(skip_size, size) -> tuple[int, int]:
    """U-Net's center crop: where a window of `size` starts in a map of `skip_size` (floor)."""
    return ((skip_size[0] - size[0]) // 2, (skip_size[1] - size[1]) // 2)


def crop_concat_conv2d(
    skip: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 0,
    activation: str | None = None,
) -> torch.Tensor:
    """act(conv2d(cat([center_crop(skip, x.shape[-2:]), x], 1), weight, bias, padding))."""
    oy, ox = center_crop_offset(skip.shape[-2:], x.shape[-2:])
    crop = skip[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]]
    out = F.conv2d(torch.cat([crop, x], dim=1), weight, bias, padding=padding)
    return F.relu(out) if activation == "relu" else out
