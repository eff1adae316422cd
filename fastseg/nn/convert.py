"""fastseg.nn.convert: swap a model's layers for their fused fastseg equivalents.

Only layers with an exact, drop-in equivalent are replaced, each keeping its parameters,
buffers and state_dict keys:

- ``nn.CrossEntropyLoss`` -> ``fastseg.nn.SoftmaxCrossEntropyLoss`` (same arguments and
  class weight);
- ``nn.Upsample(mode="bilinear")`` and ``nn.UpsamplingBilinear2d`` -> ``fastseg.nn.UpsampleAdd``
  (same size / scale_factor / align_corners; called with one input it is ``F.interpolate``);
- FCN's per-class deconvolution, ``nn.ConvTranspose2d(C, C, k, s, groups=C, bias=False)`` with
  no padding, output padding or dilation -> ``fastseg.nn.DeconvAdd`` (the same weight; fixed
  if it did not require grad).

The fusions that join several layers (the skip-add after an upsampling, U-Net's crop + concat +
convolution) live in a model's forward, which a module swap cannot see: use
``DeconvAdd(..., skip=...)`` / ``UpsampleAdd`` with a skip and ``CropConcatConv2d`` in your
forward, or ``fastseg.models``.
"""

from __future__ import annotations

import copy

from torch import nn

from fastseg.nn.loss import SoftmaxCrossEntropyLoss
from fastseg.nn.upsample import DeconvAdd, UpsampleAdd


def _cross_entropy(m: nn.CrossEntropyLoss, backend):
    new = SoftmaxCrossEntropyLoss(ignore_index=m.ignore_index, reduction=m.reduction,
                                  label_smoothing=m.label_smoothing, backend=backend)
    new.weight = m.weight  # the registered buffer (or None), as the original holds it
    return new, None


def _upsample(m: nn.Upsample, backend):
    if m.mode != "bilinear":
        return None, f"mode {m.mode!r} (only 'bilinear' has a fused equivalent)"
    if m.recompute_scale_factor:
        return None, "recompute_scale_factor=True (UpsampleAdd keeps F.interpolate's default)"
    scale = m.scale_factor
    if isinstance(scale, tuple) and len(set(scale)) == 1:
        scale = scale[0]
    return UpsampleAdd(size=m.size, scale_factor=scale, align_corners=bool(m.align_corners),
                       backend=backend), None


def _deconvolution(m: nn.ConvTranspose2d, backend):
    c = m.in_channels
    if not (m.out_channels == c and m.groups == c and m.bias is None):
        return None, "not a per-class deconvolution (ConvTranspose2d(C, C, k, s, groups=C, bias=False))"
    if any(m.padding) or any(m.output_padding) or any(d != 1 for d in m.dilation):
        return None, "padding, output_padding or dilation (DeconvAdd crops its output instead)"
    if m.padding_mode != "zeros":
        return None, f"padding_mode {m.padding_mode!r}"
    learnable = m.weight.requires_grad
    new = DeconvAdd(c, m.kernel_size, m.stride, learnable=learnable, backend=backend,
                    device=m.weight.device, dtype=m.weight.dtype)
    new.weight.data.copy_(m.weight.data)
    return new, None


# exact types only: a subclass may change forward
_CONVERTERS = {
    nn.CrossEntropyLoss: _cross_entropy,
    nn.Upsample: _upsample,
    nn.UpsamplingBilinear2d: _upsample,
    nn.ConvTranspose2d: _deconvolution,
}


def convert(module: nn.Module, *, backend: str | None = None, inplace: bool = False,
            verbose: bool = False) -> nn.Module:
    """Return ``module`` with every layer that has an exact fastseg equivalent replaced by it.

    Args:
        module: any ``nn.Module`` (or a single layer: the layer itself is replaced).
        backend: the backend the new modules pin (None: follow ``fastseg.backend()``).
        inplace: modify ``module`` itself instead of a deep copy.
        verbose: print the report.

    The returned module has ``fastseg_conversions``: one line per candidate layer, what it
    became or why it was kept (``"decoder.up: Upsample -> UpsampleAdd"``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be an nn.Module, got {type(module).__name__}")
    root = module if inplace else copy.deepcopy(module)
    report: list[str] = []

    def swap(layer: nn.Module, name: str):
        converter = _CONVERTERS.get(type(layer))
        if converter is None:
            return None
        new, why = converter(layer, backend)
        label = name or "(root)"
        if new is None:
            report.append(f"{label}: {type(layer).__name__} kept: {why}")
            return None
        new.train(layer.training)
        report.append(f"{label}: {type(layer).__name__} -> {type(new).__name__}")
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            new = swap(child, name)
            if new is not None:
                setattr(parent, child_name, new)
            else:
                visit(child, name + ".")

    replaced_root = swap(root, "")
    if replaced_root is not None:
        root = replaced_root
    else:
        visit(root, "")
    root.fastseg_conversions = report
    if verbose:
        print("fastseg.nn.convert:" + ("".join(f"\n  {line}" for line in report) or " nothing to replace"))
    return root
