"""Weight initializers for the fastseg modules."""

from __future__ import annotations

import torch


def bilinear_kernel(size_h: int, size_w: int | None = None, *, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """FCN's bilinear upsampling kernel of (size_h, size_w): the outer product of two 1-D
    tents, each of half-width factor = ceil(size / 2) centred on the kernel."""
    def tent(size: int) -> torch.Tensor:
        factor = (size + 1) // 2
        center = factor - 1 if size % 2 == 1 else factor - 0.5
        taps = torch.arange(size, dtype=torch.float64)
        return 1 - (taps - center).abs() / factor

    size_w = size_h if size_w is None else size_w
    kernel = tent(size_h)[:, None] * tent(size_w)[None, :]
    return kernel.to(dtype=dtype, device=device)


@torch.no_grad()
def bilinear_(weight: torch.Tensor) -> torch.Tensor:
    """Fills a deconvolution weight with FCN's bilinear kernel, in place; returns it.

    ``(C, 1, kh, kw)`` (fastseg's per-class DeconvAdd): every class gets the kernel.
    ``(C, C, kh, kw)`` (an ``nn.ConvTranspose2d(C, C, k)``, as in the FCN release): the
    kernel on the class-to-same-class diagonal, zeros elsewhere.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("bilinear_: weight must be a 4-D (C, 1, kh, kw) or (C, C, kh, kw) tensor, "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    channels, groups_or_out, kh, kw = weight.shape
    kernel = bilinear_kernel(kh, kw, dtype=weight.dtype, device=weight.device)
    if groups_or_out == 1:
        weight.copy_(kernel.expand_as(weight))
    elif groups_or_out == channels:
        weight.zero_()
        index = torch.arange(channels, device=weight.device)
        weight[index, index] = kernel
    else:
        raise ValueError(f"bilinear_: weight must be (C, 1, kh, kw) or (C, C, kh, kw), got "
                         f"{tuple(weight.shape)}")
    return weight
