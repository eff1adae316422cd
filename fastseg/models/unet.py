"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015) on fastseg's fused decoder op.

    fastseg.models.unet(*, in_channels=1, num_classes=2, base_channels=64, depth=5,
                        padding="valid", up_mode="deconv", batch_norm=False, fused=True)
    fastseg.models.unet_output_size(in_size, depth=5, *, padding="valid")
    fastseg.models.unet_valid_input_size(in_size, depth=5, *, padding="valid", round="up")

The network, level by level (level l has ``base_channels * 2**l`` channels, ``depth`` levels):

- contracting path: at every level two 3x3 convolutions, each followed by a ReLU (with
  ``batch_norm=True``: conv -> BatchNorm -> ReLU, the conv then has no bias); a 2x2 max-pool
  (stride 2) between levels;
- expansive path: from level l+1 to level l, a 2x2 up-convolution (``ConvTranspose2d``,
  kernel 2, stride 2) halving the channels, or with ``up_mode="bilinear"`` a bilinear x2
  upsampling followed by a 1x1 convolution halving the channels; then the encoder's level-l
  map, center-cropped to the up-sampled map's size, is concatenated in front of it along the
  channels and a 3x3 convolution + ReLU follows - with ``fused=True`` these three steps are one
  ``fastseg.nn.CropConcatConv2d`` that never materializes the crop or the concatenation; then
  a second 3x3 convolution + ReLU;
- a final 1x1 convolution to ``num_classes`` scores.

``padding="valid"`` is the paper's network (unpadded convolutions; 572x572 -> 388x388 for
depth 5). Only some input sizes work - each level's two convolutions must leave an even size
before every pool - see :func:`unet_output_size` and :func:`unet_valid_input_size`.

``padding="same"`` pads the 3x3 convolutions by 1 and gives an output of the input's size for
any H, W >= 1. Odd sizes: the max-pools use ``ceil_mode=True`` (a map of odd size s pools to
ceil(s / 2): its last row/column is a window of one pixel, so every pixel reaches the deeper
levels and even a 1x1 input works), the up-convolution then gives 2 * ceil(s / 2) = s + 1 and
its last row/column is dropped. Output pixels 2i and 2i+1 of a kernel-2 stride-2
up-convolution come from pooled pixel i, whose window is exactly rows/columns 2i and 2i+1 of
the skip: keeping the first s aligns the decoder map with the skip exactly (no shift, no zero
padding, no interpolation). In bilinear mode the map is interpolated straight to the skip's
size (``F.interpolate(size=skip size)``, align_corners=False), exactly x2 at even sizes.

Parameter names (identical for ``fused=True`` and ``fused=False``, so state dicts move
between the two with ``strict=True``)::

    encoder.{l}.conv1 / bn1 / conv2 / bn2         l = 0 .. depth-1 (depth-1: the bottom)
    decoder.{l}.up                                 ConvTranspose2d(2c, c, 2, 2), or the
                                                   Conv2d(2c, c, 1) after the bilinear upsample
    decoder.{l}.conv1 / bn1 / conv2 / bn2          l = 0 .. depth-2: decoder[l] makes level l
                                                   from level l+1 and encoder[l]'s skip
    head                                           Conv2d(base_channels, num_classes, 1)

(bn* only with ``batch_norm=True``). ``decoder.{l}.conv1`` is a ``CropConcatConv2d`` (fused)
or a :class:`CropConcatConv2dEager` (the same ``nn.Conv2d`` subclass, eager crop + cat); its
weight's first ``c`` input channels see the skip, as in the paper's concatenation.

Weights start as the paper says: Gaussian, std sqrt(2 / N), N the number of inputs of one
output unit (Cin * k * k for a convolution, Cin for the kernel-2 stride-2 up-convolution),
biases zero; BatchNorm at weight 1, bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.nn.conv import CropConcatConv2d
from fastseg.nn.upsample import UpsampleAdd
from fastseg.ops import _reference

__all__ = ["UNet", "CropConcatConv2dEager", "unet", "unet_output_size", "unet_valid_input_size"]

_PADDINGS = ("valid", "same")
_UP_MODES = ("deconv", "bilinear")


# --- argument checks -------------------------------------------------------------------------

def _positive_int(where: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int >= {minimum}, got "
                        f"{type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _choice(where: str, name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{where}: {name} must be {options}, got {value!r}")
    return value


def _flag(where: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _size_arg(where: str, in_size) -> tuple[tuple[int, int], bool]:
    """(H, W) and whether in_size was a single int."""
    if isinstance(in_size, int) and not isinstance(in_size, bool):
        pair, single = (in_size, in_size), True
    else:
        try:
            pair = tuple(in_size)
        except TypeError:
            pair = ()
        single = False
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise TypeError(f"{where}: in_size must be an int or a pair of ints (H, W), got "
                            f"{in_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{where}: in_size must be >= 1, got {in_size!r}")
    return (int(pair[0]), int(pair[1])), single


# --- geometry of the valid (unpadded) network ------------------------------------------------

def _valid_trace(n: int, depth: int) -> tuple[int | None, str]:
    """The output size of one spatial dimension of size n in the valid network, or
    (None, why not)."""
    size = n
    for level in range(depth):
        size -= 4  # two unpadded 3x3 convolutions
        if size < 1:
            return None, (f"the two unpadded 3x3 convolutions of level {level} leave {size} "
                          f"pixels (each takes 2)")
        if level < depth - 1:
            if size % 2:
                return None, (f"level {level}'s convolutions leave an odd size {size} before the "
                              "2x2 max-pool")
            size //= 2
    for level in reversed(range(depth - 1)):
        size = 2 * size - 4  # 2x2 up-convolution, then two unpadded 3x3 convolutions
        if size < 1:
            return None, (f"the decoder's convolutions at level {level} leave {size} pixels")
    return size, ""


def _valid_grid(depth: int) -> tuple[int, int]:
    """Valid input sizes are first + k * step, k >= 0."""
    step = 2 ** (depth - 1)
    offset = 4 * (step - 1)  # s_l = 2 s_{l+1} + 4, bottom size b: s_0 = step * b + offset
    b = 1
    while _valid_trace(step * b + offset, depth)[0] is None:
        b += 1
    return step * b + offset, step


def _nearest_valid(n: int, depth: int) -> tuple[int | None, int]:
    """The largest valid size below n (None if there is none) and the smallest above n."""
    first, step = _valid_grid(depth)
    if n < first:
        return None, first
    k = (n - first) // step
    below = first + k * step
    if below == n:
        below = below - step if k > 0 else None
    return below, first + (k + 1) * step


def _invalid_size_message(where: str, name: str, n: int, depth: int, why: str) -> str:
    below, above = _nearest_valid(n, depth)
    first, step = _valid_grid(depth)
    nearest = (f"the nearest valid sizes are {below} and {above}" if below is not None
               else f"the smallest valid size is {above}")
    return (f"{where}: {name} {n} does not work for the valid (unpadded) U-Net of depth {depth}: "
            f"{why}; {nearest} (valid sizes are {first} + {step}k; "
            "see fastseg.models.unet_valid_input_size, or use padding='same' for any size)")


def _check_valid_size(where: str, size: tuple[int, int], depth: int) -> tuple[int, int]:
    out = []
    for name, n in zip(("height", "width"), size):
        o, why = _valid_trace(n, depth)
        if o is None:
            raise ValueError(_invalid_size_message(where, f"input {name}", n, depth, why))
        out.append(o)
    return out[0], out[1]


def unet_output_size(in_size, depth: int = 5, *, padding: str = "valid"):
    """The output size of a U-Net of ``depth`` levels for an input of ``in_size``.

    ``in_size`` is an int or (H, W); the result has the same form. With ``padding="valid"``
    (the paper's network, ``unet_output_size(572) == 388``) an input size that does not work
    raises a ValueError naming the nearest valid sizes below and above; with
    ``padding="same"`` it is ``in_size``.
    """
    where = "unet_output_size"
    depth = _positive_int(where, "depth", depth)
    _choice(where, "padding", padding, _PADDINGS)
    size, single = _size_arg(where, in_size)
    out = size if padding == "same" else _check_valid_size(where, size, depth)
    return out[0] if single else out


def unet_valid_input_size(in_size, depth: int = 5, *, padding: str = "valid", round: str = "up"):
    """The valid input size nearest to ``in_size`` for a U-Net of ``depth`` levels:
    the smallest one >= in_size (``round="up"``: the size to pad an image to) or the largest
    one <= in_size (``round="down"``: the size to crop it to), per dimension.

    ``in_size`` is an int or (H, W); the result has the same form, equal to ``in_size`` when it
    is valid (so ``unet_valid_input_size(s) == s`` tests a size). Valid sizes of depth d are
    ``first + 2**(d-1) * k``: 188, 204, ..., 572, ... for depth 5. With ``padding="same"`` every
    size is valid.
    """
    where = "unet_valid_input_size"
    depth = _positive_int(where, "depth", depth)
    _choice(where, "padding", padding, _PADDINGS)
    _choice(where, "round", round, ("up", "down"))
    size, single = _size_arg(where, in_size)
    if padding == "same":
        return size[0] if single else size
    out = []
    for n in size:
        if _valid_trace(n, depth)[0] is not None:
            out.append(n)
            continue
        below, above = _nearest_valid(n, depth)
        if round == "up":
            out.append(above)
        elif below is None:
            raise ValueError(f"{where}: no valid size <= {n} for the valid U-Net of depth {depth}; "
                             f"the smallest valid size is {above}")
        else:
            out.append(below)
    return out[0] if single else (out[0], out[1])


# --- modules ---------------------------------------------------------------------------------

class CropConcatConv2dEager(nn.Conv2d):
    """The eager twin of ``fastseg.nn.CropConcatConv2d``: the same ``nn.Conv2d`` subclass
    (parameters, init and state_dict keys), whose ``forward(skip, x)`` center-crops the skip by
    slicing, concatenates with ``torch.cat`` and runs ``nn.Conv2d`` (+ ReLU)."""

    def __init__(self, skip_channels: int, x_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 0, activation: str | None = "relu", bias: bool = True) -> None:
        super().__init__(skip_channels + x_channels, out_channels, kernel_size, padding=padding,
                         bias=bias)
        self.skip_channels = skip_channels
        self.x_channels = x_channels
        self.activation = activation

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore
        # the eager composition: crop (a slice) + torch.cat + F.conv2d (+ relu)
        return _reference.crop_concat_conv2d(skip, x, self.weight, self.bias, self.padding[0],
                                             self.activation)

    def extra_repr(self) -> str:
        return (f"skip_channels={self.skip_channels}, x_channels={self.x_channels}, "
                + super().extra_repr() + f", activation={self.activation!r}")


class _BilinearUpsample(nn.Module):
    """Eager bilinear upsampling to a given size: F.interpolate(mode="bilinear",
    align_corners=False) - the twin of fastseg.nn.UpsampleAdd called with one input."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.same = same

    def forward(self, x: torch.Tensor, output_size) -> torch.Tensor:
        return F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)

    def _get_name(self) -> str:
        return "BilinearUpsample"

    def extra_repr(self) -> str:
        return _upsample_repr(self.same)


class _FusedBilinearUpsample(UpsampleAdd):
    """fastseg.nn.UpsampleAdd (bilinear, align_corners=False, deterministic backward), called
    with one input and an output size; under autocast it runs in its input's dtype."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.same = same

    def forward(self, x: torch.Tensor, output_size) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, output_size=output_size)

    def _get_name(self) -> str:
        return "UpsampleAdd"

    def extra_repr(self) -> str:
        return _upsample_repr(self.same)


def _upsample_repr(same: bool) -> str:
    return ("mode='bilinear', size=the skip's, align_corners=False" if same
            else "mode='bilinear', scale_factor=2, align_corners=False")


class DoubleConv(nn.Module):
    """One level of the contracting path: (3x3 conv [-> BatchNorm] -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=not batch_norm)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=padding, bias=not batch_norm)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x)
        x = self.relu1(x)
        x = self.conv2(x)
        if self.batch_norm:
            x = self.bn2(x)
        return self.relu2(x)


class UpBlock(nn.Module):
    """One level of the expansive path: up-sample the map from below halving its channels,
    crop + concatenate the skip, then (3x3 conv [-> BatchNorm] -> ReLU) x 2.

    ``forward(skip, x)``: ``skip`` is the encoder's map at this level, ``x`` the decoder's map
    one level below (half the size, twice the channels)."""

    def __init__(self, channels: int, padding: str, up_mode: str, batch_norm: bool,
                 fused: bool) -> None:
        super().__init__()
        c = channels
        self.same = padding == "same"
        self.up_mode = up_mode
        self.batch_norm = batch_norm
        if up_mode == "deconv":
            self.up = nn.ConvTranspose2d(2 * c, c, kernel_size=2, stride=2)
        else:
            self.upsample = (_FusedBilinearUpsample if fused else _BilinearUpsample)(self.same)
            self.up = nn.Conv2d(2 * c, c, kernel_size=1)
        conv = CropConcatConv2d if fused else CropConcatConv2dEager
        p = 1 if self.same else 0
        self.conv1 = conv(c, c, c, kernel_size=3, padding=p,
                          activation=None if batch_norm else "relu", bias=not batch_norm)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(c)
            self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=p, bias=not batch_norm)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.up_mode == "deconv":
            x = self.up(x)
            if self.same and x.shape[-2:] != skip.shape[-2:]:
                # ceil-mode pooling of an odd size: 2 * ceil(s / 2) = s + 1; the first s rows
                # and columns are the ones aligned with the skip (see the module docstring).
                x = x[:, :, :skip.shape[-2], :skip.shape[-1]]
        else:
            size = (tuple(skip.shape[-2:]) if self.same
                    else (2 * x.shape[-2], 2 * x.shape[-1]))
            x = self.up(self.upsample(x, size))
        x = self.conv1(skip, x)  # crop (valid padding) + concat + conv [+ ReLU]
        if self.batch_norm:
            x = self.relu1(self.bn1(x))
        x = self.conv2(x)
        if self.batch_norm:
            x = self.bn2(x)
        return self.relu2(x)

    def extra_repr(self) -> str:
        return f"up_mode={self.up_mode!r}"


class UNet(nn.Module):
    """U-Net; build it with :func:`fastseg.models.unet` (the arguments are documented there).

    Attributes: ``in_channels``, ``num_classes``, ``base_channels``, ``depth``, ``padding``,
    ``up_mode``, ``batch_norm``, ``fused``, ``channels`` (per level); ``encoder``,
    ``decoder`` (``ModuleList``s indexed by level), ``pool``, ``head``. ``output_size(in_size)``
    gives the output size for an input size (and checks it).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64,
                 depth: int = 5, padding: str = "valid", up_mode: str = "deconv",
                 batch_norm: bool = False, fused: bool = True) -> None:
        super().__init__()
        where = "unet"
        self.in_channels = _positive_int(where, "in_channels", in_channels)
        self.num_classes = _positive_int(where, "num_classes", num_classes)
        self.base_channels = _positive_int(where, "base_channels", base_channels)
        self.depth = _positive_int(where, "depth", depth)
        self.padding = _choice(where, "padding", padding, _PADDINGS)
        self.up_mode = _choice(where, "up_mode", up_mode, _UP_MODES)
        self.batch_norm = _flag(where, "batch_norm", batch_norm)
        self.fused = _flag(where, "fused", fused)
        self.channels = tuple(base_channels * 2 ** level for level in range(depth))
        p = 1 if padding == "same" else 0
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if level == 0 else self.channels[level - 1], c, p, batch_norm)
            for level, c in enumerate(self.channels))
        # ceil_mode only matters at odd sizes, which the valid network never pools.
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=padding == "same")
        self.decoder = nn.ModuleList(
            UpBlock(c, padding, up_mode, batch_norm, fused) for c in self.channels[:-1])
        self.head = nn.Conv2d(base_channels, num_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialization: Gaussian weights with std sqrt(2 / N), N the inputs of
        one output unit; zero biases; BatchNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                # kernel == stride: each output unit sees one input pixel's Cin channels
                fan_in = m.in_channels * (m.kernel_size[0] * m.kernel_size[1]
                                          // (m.stride[0] * m.stride[1]))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                continue
            else:
                continue
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def output_size(self, in_size):
        """The output size for an input of ``in_size`` (int or (H, W)); raises for an input
        size the valid network cannot take."""
        return unet_output_size(in_size, self.depth, padding=self.padding)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet: the input must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"UNet: the input must be 4-D (N, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"UNet: the input must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: the input has {x.shape[1]} channels but the network takes "
                             f"in_channels={self.in_channels} (input shape {tuple(x.shape)})")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"UNet: the input has an empty spatial size {tuple(x.shape[2:])}")
        if self.padding == "valid":
            _check_valid_size("UNet", (x.shape[2], x.shape[3]), self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        skips = []
        last = self.depth - 1
        for level, block in enumerate(self.encoder):
            x = block(x)
            if level < last:
                skips.append(x)
                x = self.pool(x)
        for level in range(last - 1, -1, -1):
            x = self.decoder[level](skips[level], x)
        return self.head(x)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"base_channels={self.base_channels}, depth={self.depth}, "
                f"padding={self.padding!r}, up_mode={self.up_mode!r}, "
                f"batch_norm={self.batch_norm}, fused={self.fused}")


def unet(*, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 5,
         padding: str = "valid", up_mode: str = "deconv", batch_norm: bool = False,
         fused: bool = True) -> UNet:
    """U-Net (Ronneberger et al., 2015); the defaults are the paper's network.

    Args:
        in_channels: input image channels.
        num_classes: output score channels (the final 1x1 convolution).
        base_channels: channels of the first level; level l has ``base_channels * 2**l``
            (64 .. 1024 in the paper).
        depth: the number of resolution levels (5 in the paper: four pools and four
            up-convolutions); 1 is two convolutions and the 1x1 head.
        padding: ``"valid"`` (the paper's unpadded 3x3 convolutions: 572x572 -> 388x388; only
            some input sizes work, see ``unet_valid_input_size``) or ``"same"`` (padded by 1:
            the output has the input's size, any H, W >= 1, odd sizes included).
        up_mode: ``"deconv"`` (the paper's 2x2 up-convolution halving the channels) or
            ``"bilinear"`` (bilinear x2 upsampling, then a 1x1 convolution halving them).
        batch_norm: conv -> BatchNorm -> ReLU instead of conv -> ReLU (the convolutions then
            have no bias).
        fused: the decoder's crop + concat + conv through ``fastseg.nn.CropConcatConv2d`` and
            the bilinear upsampling through ``fastseg.nn.UpsampleAdd``; False builds the same
            network from eager PyTorch modules, with the same parameter names and shapes.

    Returns a :class:`UNet`; ``forward(x)`` maps ``(N, in_channels, H, W)`` to
    ``(N, num_classes, *unet_output_size((H, W), depth, padding=padding))``.
    """
    return UNet(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                depth=depth, padding=padding, up_mode=up_mode, batch_norm=batch_norm, fused=fused)
