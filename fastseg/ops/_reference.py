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
