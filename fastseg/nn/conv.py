"""CropConcatConv2d: U-Net's decoder step (center-crop the skip, concatenate, convolve)."""

from __future__ import annotations

import torch
from torch import nn

from fastseg.ops.crop_concat_conv2d import _ACTIVATIONS, crop_concat_conv2d


class CropConcatConv2d(nn.Conv2d):
    """``act(conv(cat([center_crop(skip), x], 1)))`` with neither the crop nor the
    concatenation materialized.

    It is an ``nn.Conv2d(skip_channels + x_channels, out_channels, kernel_size,
    padding=padding, bias=bias)`` (a subclass: the same parameters, initialization and
    state_dict keys, so weights move between the two), whose forward takes the two sources:
    ``forward(skip, x)``. The weight's first ``skip_channels`` input channels see the skip.
    """

    def __init__(self, skip_channels: int, x_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 0, activation: str | None = "relu", bias: bool = True, *,
                 backend: str | None = None, device=None, dtype=None) -> None:
        for name, value in (("skip_channels", skip_channels), ("x_channels", x_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"CropConcatConv2d: {name} must be a non-negative int, got {value!r}")
        if kernel_size not in (1, 3):
            raise NotImplementedError(f"CropConcatConv2d: kernel_size must be 3 or 1, got {kernel_size!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"CropConcatConv2d: activation must be None or 'relu', got {activation!r}")
        super().__init__(skip_channels + x_channels, out_channels, kernel_size, padding=padding,
                         bias=bias, device=device, dtype=dtype)
        self.skip_channels = skip_channels
        self.x_channels = x_channels
        self.activation = activation
        self.backend = backend

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return crop_concat_conv2d(skip, x, self.weight, self.bias, self.padding[0], self.activation,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return (f"skip_channels={self.skip_channels}, x_channels={self.x_channels}, "
                + super().extra_repr() + f", activation={self.activation!r}")
