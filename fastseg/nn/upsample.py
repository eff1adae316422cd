"""UpsampleAdd and DeconvAdd: FCN's decoder steps (upsample the scores, add a cropped skip)."""

from __future__ import annotations

import torch
from torch import nn

from fastseg.nn import init
from fastseg.ops import _checks
from fastseg.ops.deconv_add import deconv_add
from fastseg.ops.upsample_add import upsample_add


class UpsampleAdd(nn.Module):
    """Bilinear upsampling (``F.interpolate`` semantics) plus an optional cropped skip, fused.

    ``forward(x, skip=None, skip_offset=(0, 0), output_size=None)``: ``output_size`` overrides
    the module's size / scale_factor for this call; with none of them the output covers the
    skip from ``skip_offset`` on.
    """

    def __init__(self, size=None, scale_factor=None, align_corners: bool = False, *,
                 backend: str | None = None) -> None:
        super().__init__()
        if size is not None and scale_factor is not None:
            raise ValueError("UpsampleAdd: give only one of size and scale_factor")
        self.size = None if size is None else _checks.int_pair("UpsampleAdd", "size", size, 1)
        self.scale_factor = (None if scale_factor is None
                             else _checks.float_pair("UpsampleAdd", "scale_factor", scale_factor))
        self.align_corners = align_corners
        self.backend = backend

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, skip_offset=(0, 0),
                output_size=None) -> torch.Tensor:
        size, scale = (output_size, None) if output_size is not None else (self.size, self.scale_factor)
        return upsample_add(x, skip, size, scale, self.align_corners, skip_offset,
                            backend=self.backend)

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size else f"scale_factor={self.scale_factor}"
        return f"{what}, align_corners={self.align_corners}"


class DeconvAdd(nn.Module):
    """FCN's per-class deconvolution (``ConvTranspose2d(C, C, k, stride, groups=C, bias=False)``)
    with its crop and the skip-add fused.

    The weight ``(C, 1, k, k)`` starts as FCN's bilinear kernel; ``learnable=False`` keeps it
    fixed as a buffer (FCN's reference release), still saved in the state_dict.
    ``forward(x, skip=None, crop=(0, 0), skip_offset=(0, 0), output_size=None)``.
    """

    def __init__(self, channels: int, kernel_size, stride, learnable: bool = True, *,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DeconvAdd: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.kernel_size = _checks.int_pair("DeconvAdd", "kernel_size", kernel_size, 1)
        self.stride = _checks.int_pair("DeconvAdd", "stride", stride, 1)
        self.learnable = learnable
        self.backend = backend
        weight = init.bilinear_(torch.empty(channels, 1, *self.kernel_size, device=device,
                                            dtype=dtype))
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, crop=(0, 0),
                skip_offset=(0, 0), output_size=None) -> torch.Tensor:
        return deconv_add(x, self.weight, self.stride, skip, crop, skip_offset, output_size,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"learnable={self.learnable}")
