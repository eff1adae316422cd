"""SoftmaxCrossEntropyLoss: nn.CrossEntropyLoss on the fused kernel."""

from __future__ import annotations

import torch
from torch import nn

from fastseg.ops.softmax_cross_entropy import softmax_cross_entropy


class SoftmaxCrossEntropyLoss(nn.CrossEntropyLoss):
    """A drop-in for ``nn.CrossEntropyLoss``: the same constructor, buffers and state_dict
    (it is a subclass), computed by ``fastseg.ops.softmax_cross_entropy``.

    ``forward(input, target, pixel_weight=None)`` also takes U-Net's per-pixel weight map.
    ``backend`` (keyword only) pins a backend for this module; None follows
    ``fastseg.backend()`` / ``fastseg.set_backend()``.
    """

    def __init__(self, weight: torch.Tensor | None = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, backend: str | None = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
        return softmax_cross_entropy(input, target, self.weight, self.ignore_index,
                                     self.reduction, self.label_smoothing, pixel_weight,
                                     backend=self.backend)
