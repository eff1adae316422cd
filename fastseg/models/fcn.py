"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell, "Fully Convolutional Networks for
Semantic Segmentation"), the reference release's ``voc-fcn32s`` / ``voc-fcn16s`` / ``voc-fcn8s``
nets, on fastseg's fused decoder.

The network, for an input of any size H x W (>= 1):

    VGG16 trunk   conv1_1 (3x3, padding 100) ... conv5_3 (3x3, padding 1) + ReLU,
                  pool1..pool5 (2x2, stride 2, ceil_mode=True)
    fc6           7x7 convolution (no padding) to 4096 + ReLU + Dropout(0.5)
    fc7           1x1 convolution to 4096 + ReLU + Dropout(0.5)
    score_fr      1x1 convolution to the classes

    FCN-32s   score = upscore(score_fr)          [x32: kernel 64, stride 32], cropped at 19
    FCN-16s   fuse_pool4 = upscore2(score_fr)    [x2: kernel 4, stride 2]
                           + score_pool4(pool4) cropped at 5
              score = upscore16(fuse_pool4)      [x16: kernel 32, stride 16], cropped at 27
    FCN-8s    fuse_pool4 as in FCN-16s
              fuse_pool3 = upscore_pool4(fuse_pool4) [x2] + score_pool3(pool3) cropped at 9
              score = upscore8(fuse_pool3)       [x8: kernel 16, stride 8], cropped at 31

The crop offsets are not typed in: :func:`fcn_crop_offsets` derives them from the layer
geometry as the release's ``coord_map.py`` does (each layer maps coordinates affinely; a crop
is the shift between two maps of equal scale).

The upsamplings are per-class deconvolutions with FCN's bilinear kernel, fixed (buffers) by
default as in the reference release, learnable with ``learnable_upsampling=True`` as the paper
trains them. ``fused=True`` runs each upsampling + crop + skip-add as one
``fastseg.nn.DeconvAdd`` call; ``fused=False`` builds the same network from eager modules
(``nn.ConvTranspose2d(C, C, k, stride, groups=C, bias=False)``, slicing, ``+``) with the same
parameter and buffer names and shapes, so a state dict moves between the two
(``strict=True``).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from fractions import Fraction
from numbers import Real

import torch
from torch import nn

from fastseg.nn import DeconvAdd, init

__all__ = ["FCN", "fcn32s", "fcn16s", "fcn8s", "fcn_crop_offsets", "load_vgg16_backbone",
           "convolutionalize"]

# --- the geometry, in one place (the model and the offset derivation both read it) --------

# VGG16's five blocks: (output channels at width 1.0, number of 3x3 convolutions).
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
FIRST_PADDING = 100           # conv1_1's padding: every input size gives a valid fc6 map
FC_CHANNELS = 4096
FC6_KERNEL = 7                # VGG16's classifier saw 7x7 pool5 maps
POOL_KERNEL = POOL_STRIDE = 2
# The upsampling deconvolutions: name -> (kernel, stride). FCN's kernel is twice the stride.
UPSAMPLING = {"upscore": (64, 32), "upscore2": (4, 2), "upscore16": (32, 16),
              "upscore_pool4": (4, 2), "upscore8": (16, 8)}
VARIANTS = ("fcn32s", "fcn16s", "fcn8s")

# The crops of each variant, keyed by the layer whose output is cropped (the release's
# score_pool4c / score_pool3c / score crop layers).
_VARIANT_CROPS = {"fcn32s": ("upscore",), "fcn16s": ("score_pool4", "upscore16"),
                  "fcn8s": ("score_pool4", "score_pool3", "upscore8")}


# --- crop offsets from the coordinate maps -----------------------------------------------

def _conv_map(kernel: int, stride: int, padding: int):
    """Convolution / pooling: output y sits over input s*y - p + (k-1)/2, i.e.
    y = x / s + (p - (k-1)/2) / s (Caffe coord_map)."""
    return Fraction(1, stride), (Fraction(padding) - Fraction(kernel - 1, 2)) / stride


def _deconv_map(kernel: int, stride: int, padding: int = 0):
    """Deconvolution: the inverse of the convolution's map, y = s * x + (k-1)/2 - p."""
    return Fraction(stride), Fraction(kernel - 1, 2) - padding


def _compose(*maps):
    """The coordinate map of layers applied in order (each map: y = a * x + b)."""
    a, b = Fraction(1), Fraction(0)
    for a2, b2 in maps:
        a, b = a2 * a, a2 * b + b2
    return a, b


def _crop_offset(name: str, cropped, reference) -> int:
    """Where `reference`'s origin lies in the map `cropped`, both maps given from the input."""
    (a1, b1), (a2, b2) = cropped, reference
    if a1 != a2:
        raise ValueError(f"fcn_crop_offsets: {name}: the maps have different scales "
                         f"({a1} vs {a2}); only maps of the same resolution can be cropped")
    offset = b1 - b2
    if offset.denominator != 1 or offset < 0:
        raise ValueError(f"fcn_crop_offsets: {name}: the crop offset {offset} is not a "
                         "non-negative integer for this geometry (the maps are misaligned)")
    return int(offset)


def fcn_crop_offsets(variant: str | None = None, *, first_padding: int = FIRST_PADDING,
                     fc6_kernel: int = FC6_KERNEL) -> dict[str, int]:
    """FCN's crop offsets, derived from the layer geometry (the same in H and W).

    Each layer maps its input coordinates to its output coordinates affinely (Caffe's
    ``coord_map``): a convolution or pooling of kernel k, stride s, padding p maps
    ``y = (x + p - (k-1)/2) / s``; a deconvolution ``y = s * x + (k-1)/2 - p``. Composing them
    from the input gives each map's ``y = a * x + b``; a crop of map A to map B (same ``a``) starts
    at ``b_A - b_B``, which must be a non-negative integer. (Pooling's ceil mode changes the map
    sizes, not the maps.) With the reference geometry (conv1_1 padded by 100, 7x7 fc6)::

        score_pool4 5   (FCN-16s and FCN-8s)     upscore   19  (FCN-32s)
        score_pool3 9   (FCN-8s)                 upscore16 27  (FCN-16s)
                                                 upscore8  31  (FCN-8s)

    Returns all five as a dict, keyed by the layer whose output is cropped, or with ``variant``
    ("fcn32s", "fcn16s", "fcn8s") only that net's. ``first_padding`` and ``fc6_kernel`` are there
    to explore the geometry: a choice that misaligns the maps raises ValueError.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"fcn_crop_offsets: variant must be one of {VARIANTS} or None, "
                         f"got {variant!r}")
    for name, value, low in (("first_padding", first_padding, 0), ("fc6_kernel", fc6_kernel, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"fcn_crop_offsets: {name} must be an int >= {low}, got {value!r}")

    maps = {}
    m = (Fraction(1), Fraction(0))                     # the input ("data")
    for block, (_, convs) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(convs):
            padding = first_padding if (block, i) == (1, 0) else 1
            m = _compose(m, _conv_map(3, 1, padding))
        m = _compose(m, _conv_map(POOL_KERNEL, POOL_STRIDE, 0))
        maps[f"pool{block}"] = m
    m = _compose(m, _conv_map(fc6_kernel, 1, 0))       # fc6; fc7 and score_fr are 1x1: identity
    maps["score_fr"] = m
    maps["upscore"] = _compose(m, _deconv_map(*UPSAMPLING["upscore"]))
    maps["upscore2"] = _compose(m, _deconv_map(*UPSAMPLING["upscore2"]))       # = fuse_pool4
    maps["upscore16"] = _compose(maps["upscore2"], _deconv_map(*UPSAMPLING["upscore16"]))
    maps["upscore_pool4"] = _compose(maps["upscore2"], _deconv_map(*UPSAMPLING["upscore_pool4"]))
    maps["upscore8"] = _compose(maps["upscore_pool4"], _deconv_map(*UPSAMPLING["upscore8"]))
    data = (Fraction(1), Fraction(0))

    offsets = {
        # score_pool4 (1x1 conv of pool4: pool4's map) cropped to upscore2
        "score_pool4": _crop_offset("score_pool4", maps["pool4"], maps["upscore2"]),
        "score_pool3": _crop_offset("score_pool3", maps["pool3"], maps["upscore_pool4"]),
        "upscore": _crop_offset("upscore", maps["upscore"], data),
        "upscore16": _crop_offset("upscore16", maps["upscore16"], data),
        "upscore8": _crop_offset("upscore8", maps["upscore8"], data),
    }
    if variant is None:
        return offsets
    return {name: offsets[name] for name in _VARIANT_CROPS[variant]}


# --- the network ---------------------------------------------------------------------------

def _width(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def _eager_deconv(channels: int, kernel: int, stride: int, learnable: bool) -> nn.ConvTranspose2d:
    """The eager twin of DeconvAdd: a per-class ConvTranspose2d with the bilinear kernel, its
    weight (C, 1, k, k) a parameter or (fixed) a buffer named ``weight``, as DeconvAdd's."""
    module = nn.ConvTranspose2d(channels, channels, kernel, stride, groups=channels, bias=False)
    weight = init.bilinear_(module.weight.detach().clone())
    del module.weight
    if learnable:
        module.weight = nn.Parameter(weight)
    else:
        module.register_buffer("weight", weight)
    return module


class FCN(nn.Module):
    """One of FCN-32s / 16s / 8s; build it with :func:`fcn32s`, :func:`fcn16s`, :func:`fcn8s`.

    ``forward(x)``: ``x`` (N, in_channels, H, W), H, W >= 1 -> scores (N, num_classes, H, W).

    These are the staged nets of the reference release (``voc-fcn16s``, ``voc-fcn8s``): the
    pool3 / pool4 scores are added unscaled (the "at-once" FCN-8s scales them by 1e-4 / 1e-2;
    not implemented). Layer names are the release's (``conv1_1`` ... ``conv5_3``, ``fc6``,
    ``fc7``, ``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore``, ``upscore2``,
    ``upscore16``, ``upscore_pool4``, ``upscore8``).

    Dropout is ``nn.Dropout(0.5)`` (element-wise, as Caffe's Dropout layer in the release),
    not ``nn.Dropout2d``. Initialization: the VGG convolutions as torchvision's VGG (Kaiming
    normal, fan_out), fc6 / fc7 normal(0, 0.01) (torchvision's classifier Linears), the scoring
    layers zero (as the paper initializes them; in the release's nets it is Caffe's default
    constant-0 filler), the upsamplings bilinear. Biases zero. Load ImageNet weights with
    :func:`load_vgg16_backbone`.

    Attributes: ``variant``, ``num_classes``, ``in_channels``, ``width_mult``, ``fused``,
    ``learnable_upsampling``, ``crop_offsets`` (the variant's, from :func:`fcn_crop_offsets`),
    ``upsampling_layers`` (the names of its upsampling modules, in forward order).
    """

    def __init__(self, variant: str, *, num_classes: int = 21, in_channels: int = 3,
                 width_mult: float = 1.0, fused: bool = True,
                 learnable_upsampling: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"FCN: variant must be one of {VARIANTS}, got {variant!r}")
        _check_args(variant, num_classes, in_channels, width_mult, fused, learnable_upsampling)
        self.variant = variant
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = float(width_mult)
        self.fused = fused
        self.learnable_upsampling = learnable_upsampling
        self.crop_offsets = fcn_crop_offsets(variant)

        trunk = []   # (module name, module) in forward order
        channels = in_channels
        self._widths = {}
        for block, (width, convs) in enumerate(VGG16_BLOCKS, start=1):
            out = _width(width, width_mult)
            for i in range(1, convs + 1):
                padding = FIRST_PADDING if (block, i) == (1, 1) else 1
                trunk.append((f"conv{block}_{i}", nn.Conv2d(channels, out, 3, padding=padding)))
                trunk.append((f"relu{block}_{i}", nn.ReLU(inplace=True)))
                channels = out
            trunk.append((f"pool{block}", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE, ceil_mode=True)))
            self._widths[f"pool{block}"] = out
        fc = _width(FC_CHANNELS, width_mult)
        trunk += [("fc6", nn.Conv2d(channels, fc, FC6_KERNEL)), ("relu6", nn.ReLU(inplace=True)),
                  ("drop6", nn.Dropout(0.5)),
                  ("fc7", nn.Conv2d(fc, fc, 1)), ("relu7", nn.ReLU(inplace=True)),
                  ("drop7", nn.Dropout(0.5)),
                  ("score_fr", nn.Conv2d(fc, num_classes, 1))]
        for name, module in trunk:
            self.add_module(name, module)
        self._trunk = tuple(name for name, _ in trunk)

        if variant in ("fcn16s", "fcn8s"):
            self.score_pool4 = nn.Conv2d(self._widths["pool4"], num_classes, 1)
        if variant == "fcn8s":
            self.score_pool3 = nn.Conv2d(self._widths["pool3"], num_classes, 1)
        self.upsampling_layers = {
            "fcn32s": ("upscore",), "fcn16s": ("upscore2", "upscore16"),
            "fcn8s": ("upscore2", "upscore_pool4", "upscore8")}[variant]
        for name in self.upsampling_layers:
            kernel, stride = UPSAMPLING[name]
            if fused:
                module = DeconvAdd(num_classes, kernel, stride, learnable=learnable_upsampling)
            else:
                module = _eager_deconv(num_classes, kernel, stride, learnable_upsampling)
            self.add_module(name, module)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for name, module in self.named_children():
            if not isinstance(module, nn.Conv2d):
                continue
            if name.startswith("conv"):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif name in ("fc6", "fc7"):
                nn.init.normal_(module.weight, 0.0, 0.01)
            else:  # score_fr, score_pool4, score_pool3
                nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    # -- forward --

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.variant}: input must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{self.variant}: input must be 4-D (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{self.variant}: input has {x.shape[1]} channels but the model "
                             f"takes in_channels={self.in_channels} (shape {tuple(x.shape)})")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{self.variant}: input must have H, W >= 1, got shape "
                             f"{tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{self.variant}: input must be a floating-point tensor, got "
                            f"{x.dtype}")
        weight = self.conv1_1.weight
        if x.device != weight.device:
            raise ValueError(f"{self.variant}: input is on {x.device} but the model is on "
                             f"{weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{self.variant}: input has dtype {x.dtype} but the model's "
                            f"parameters are {weight.dtype}; convert one of them (or use "
                            "torch.autocast)")

    def _upsample(self, name: str, x, skip=None, crop=(0, 0), skip_offset=(0, 0),
                  output_size=None):
        """``deconv(x)[crop window] + skip[skip window]`` through the fused op or eagerly."""
        module = getattr(self, name)
        if self.fused:  # (under autocast deconv_add casts as conv_transpose2d would)
            return module(x, skip, crop, skip_offset, output_size)
        out = module(x)
        cy, cx = crop
        ho, wo = output_size if output_size is not None else (out.shape[2] - cy,
                                                               out.shape[3] - cx)
        out = out[:, :, cy:cy + ho, cx:cx + wo]
        if skip is None:
            return out
        oy, ox = skip_offset
        return out + skip[:, :, oy:oy + ho, ox:ox + wo]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[2], x.shape[3])
        pools = {}
        h = x
        for name in self._trunk:
            h = getattr(self, name)(h)
            if name in ("pool3", "pool4"):
                pools[name] = h
        offsets = self.crop_offsets
        if self.variant == "fcn32s":
            o = offsets["upscore"]
            return self._upsample("upscore", h, crop=(o, o), output_size=size)
        # upscore2 = deconv(score_fr), uncropped, + score_pool4 cropped at its offset: the
        # skip's crop is DeconvAdd's skip_offset, the deconvolution's crop is 0.
        o4 = offsets["score_pool4"]
        h = self._upsample("upscore2", h, self.score_pool4(pools["pool4"]), skip_offset=(o4, o4))
        if self.variant == "fcn16s":
            o = offsets["upscore16"]
            return self._upsample("upscore16", h, crop=(o, o), output_size=size)
        o3 = offsets["score_pool3"]
        h = self._upsample("upscore_pool4", h, self.score_pool3(pools["pool3"]),
                           skip_offset=(o3, o3))
        o = offsets["upscore8"]
        return self._upsample("upscore8", h, crop=(o, o), output_size=size)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, num_classes={self.num_classes}, "
                f"in_channels={self.in_channels}, width_mult={self.width_mult}, "
                f"fused={self.fused}, learnable_upsampling={self.learnable_upsampling}, "
                f"crop_offsets={self.crop_offsets}")


def _check_args(variant, num_classes, in_channels, width_mult, fused, learnable_upsampling):
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{variant}: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{variant}: {name} must be >= 1, got {value}")
    if isinstance(width_mult, bool) or not isinstance(width_mult, Real):
        raise TypeError(f"{variant}: width_mult must be a real number, got "
                        f"{type(width_mult).__name__}")
    if not math.isfinite(width_mult) or width_mult <= 0:
        raise ValueError(f"{variant}: width_mult must be a finite number > 0, got {width_mult}")
    for name, value in (("fused", fused), ("learnable_upsampling", learnable_upsampling)):
        if not isinstance(value, bool):
            raise TypeError(f"{variant}: {name} must be a bool, got {type(value).__name__}")


def fcn32s(*, num_classes: int = 21, in_channels: int = 3, width_mult: float = 1.0,
           fused: bool = True, learnable_upsampling: bool = False) -> FCN:
    """FCN-32s: VGG16 + fc6/fc7 as convolutions, scores upsampled x32 (kernel 64, stride 32,
    bilinear) and cropped at 19 to the input size. See :class:`FCN`."""
    return FCN("fcn32s", num_classes=num_classes, in_channels=in_channels,
               width_mult=width_mult, fused=fused, learnable_upsampling=learnable_upsampling)


def fcn16s(*, num_classes: int = 21, in_channels: int = 3, width_mult: float = 1.0,
           fused: bool = True, learnable_upsampling: bool = False) -> FCN:
    """FCN-16s (staged, unscaled skip): x2 upsampling of the scores + pool4 scores cropped at
    5, then x16 (kernel 32, stride 16) cropped at 27. See :class:`FCN`."""
    return FCN("fcn16s", num_classes=num_classes, in_channels=in_channels,
               width_mult=width_mult, fused=fused, learnable_upsampling=learnable_upsampling)


def fcn8s(*, num_classes: int = 21, in_channels: int = 3, width_mult: float = 1.0,
          fused: bool = True, learnable_upsampling: bool = False) -> FCN:
    """FCN-8s (staged, unscaled skips - not the "at-once" net that scales pool3/pool4 by
    1e-4/1e-2): as FCN-16s, then x2 + pool3 scores cropped at 9, then x8 (kernel 16,
    stride 8) cropped at 31. See :class:`FCN`."""
    return FCN("fcn8s", num_classes=num_classes, in_channels=in_channels,
               width_mult=width_mult, fused=fused, learnable_upsampling=learnable_upsampling)


# --- torchvision VGG16 weights --------------------------------------------------------------

# torchvision's vgg16 `features` indices of the 13 convolutions, in order.
_VGG16_FEATURE_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _vgg16_key_map() -> dict[str, str]:
    """torchvision key -> FCN parameter name."""
    names = [f"conv{b}_{i}" for b, (_, n) in enumerate(VGG16_BLOCKS, start=1)
             for i in range(1, n + 1)]
    out = {}
    for index, name in zip(_VGG16_FEATURE_CONVS, names):
        out[f"features.{index}.weight"] = f"{name}.weight"
        out[f"features.{index}.bias"] = f"{name}.bias"
    for index, name in ((0, "fc6"), (3, "fc7")):
        out[f"classifier.{index}.weight"] = f"{name}.weight"
        out[f"classifier.{index}.bias"] = f"{name}.bias"
    return out


_VGG16_IGNORED = ("classifier.6.weight", "classifier.6.bias")   # the ImageNet 1000-way scores


@torch.no_grad()
def load_vgg16_backbone(model: FCN, state_dict) -> FCN:
    """Loads a torchvision VGG16 state dict (``torchvision.models.vgg16().state_dict()``, or a
    path to one saved with ``torch.save``; nothing is downloaded) into an FCN's trunk:
    ``features.{0,2,...,28}`` into ``conv1_1`` ... ``conv5_3``, and the classifier's
    ``classifier.0`` (Linear 25088 -> 4096) / ``classifier.3`` (Linear 4096 -> 4096),
    convolutionalized, into ``fc6`` (4096, 512, 7, 7) / ``fc7`` (4096, 4096, 1, 1).
    ``classifier.6`` (ImageNet's 1000 scores) is ignored; the scoring and upsampling layers
    are left as they are. Values are converted to the model's dtype and device.

    The model must be full width (``width_mult=1.0``) with ``in_channels=3``. A dict with
    missing or unexpected keys raises KeyError listing both; a tensor of the wrong shape
    raises ValueError naming it. Nothing is copied unless everything fits. Returns ``model``.
    """
    if not isinstance(model, FCN):
        raise TypeError("load_vgg16_backbone: model must be an FCN from fastseg.models "
                        f"(fcn32s / fcn16s / fcn8s), got {type(model).__name__}")
    if model.width_mult != 1.0:
        raise ValueError("load_vgg16_backbone: VGG16 weights need a full-width model "
                         f"(width_mult=1.0), got width_mult={model.width_mult}")
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError("load_vgg16_backbone: state_dict must be a mapping of torchvision "
                        "VGG16 keys to tensors (or a path to one), got "
                        f"{type(state_dict).__name__}")
    key_map = _vgg16_key_map()
    missing = [k for k in key_map if k not in state_dict]
    unexpected = [k for k in state_dict if k not in key_map and k not in _VGG16_IGNORED]
    if missing or unexpected:
        raise KeyError("load_vgg16_backbone: not a torchvision VGG16 state dict: "
                       f"missing keys {missing}, unexpected keys {unexpected}")
    params = dict(model.named_parameters())
    plan = []
    for key, name in key_map.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_vgg16_backbone: {key} must be a Tensor, got "
                            f"{type(value).__name__}")
        target = params[name]
        expect = tuple(target.shape)
        if name.startswith("fc") and name.endswith("weight"):
            expect = (target.shape[0], target[0].numel())   # the Linear's (out, in)
        if tuple(value.shape) != expect:
            raise ValueError(f"load_vgg16_backbone: {key} has shape {tuple(value.shape)} but "
                             f"{name} {tuple(target.shape)} needs {expect}")
        plan.append((target, value.reshape(target.shape)))
    for target, value in plan:
        target.copy_(value)
    return model


# --- convolutionalize ----------------------------------------------------------------------

# Layers that act element-wise or per channel on dim 1, the same on (N, F) as on (N, F, H, W).
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
              nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
              nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.AlphaDropout)


def convolutionalize(head: nn.Sequential, input_shape) -> nn.Sequential:
    """The paper's first step as a tool: a classifier head made fully convolutional.

    ``head``: an ``nn.Sequential`` of an optional leading ``nn.Flatten()`` (start_dim=1) then
    ``nn.Linear`` layers with element-wise layers before and between them (activations,
    ``nn.Dropout``; after the first Linear also ``nn.Softmax`` / ``nn.LogSoftmax`` over the
    features), trained on features of ``input_shape`` =
    (C, H, W). Returns a new ``nn.Sequential``: the Flatten dropped, the first Linear an HxW
    convolution, later Linears 1x1 convolutions (weights copied; Flatten's order is C, H, W),
    the other layers copied unchanged. On a (N, C, H, W) map it gives the classifier's
    scores as (N, K, 1, 1); on a larger map, a dense (N, K, H' - H + 1, W' - W + 1) score map.
    The head is not modified. Unsupported heads raise ValueError / TypeError.
    """
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"convolutionalize: head must be an nn.Sequential, got "
                        f"{type(head).__name__}")
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                              for v in shape):
        raise ValueError("convolutionalize: input_shape must be (C, H, W), three positive ints, "
                         f"got {input_shape!r}")
    c, h, w = shape
    layers = list(head.named_children())
    if layers and isinstance(layers[0][1], nn.Flatten):
        flatten = layers[0][1]
        if flatten.start_dim != 1 or flatten.end_dim != -1:
            raise ValueError("convolutionalize: the leading Flatten must flatten dims 1..-1 "
                             f"(start_dim=1, end_dim=-1), got start_dim={flatten.start_dim}, "
                             f"end_dim={flatten.end_dim}")
        layers = layers[1:]
    out = OrderedDict()
    features = None     # the width coming into the next layer (None: the (C, H, W) map)
    for name, layer in layers:
        if isinstance(layer, nn.Linear):
            if features is None:
                if layer.in_features != c * h * w:
                    raise ValueError(f"convolutionalize: the first Linear ({name}) takes "
                                     f"{layer.in_features} features but input_shape {shape} "
                                     f"flattens to {c * h * w}")
                kernel = (h, w)
                conv = nn.Conv2d(c, layer.out_features, kernel, bias=layer.bias is not None,
                                 device=layer.weight.device, dtype=layer.weight.dtype)
                weight = layer.weight.detach().reshape(layer.out_features, c, h, w)
            else:
                if layer.in_features != features:
                    raise ValueError(f"convolutionalize: Linear {name} takes "
                                     f"{layer.in_features} features but the layer before gives "
                                     f"{features}")
                conv = nn.Conv2d(features, layer.out_features, 1, bias=layer.bias is not None,
                                 device=layer.weight.device, dtype=layer.weight.dtype)
                weight = layer.weight.detach().reshape(layer.out_features, features, 1, 1)
            with torch.no_grad():
                conv.weight.copy_(weight)
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias.detach())
            conv.weight.requires_grad_(layer.weight.requires_grad)
            if layer.bias is not None:
                conv.bias.requires_grad_(layer.bias.requires_grad)
            features = layer.out_features
            out[name] = conv
        elif isinstance(layer, _POINTWISE):
            # element-wise: the same on the flat (N, C*H*W) input as on the (N, C, H, W) map
            # (AlexNet's classifier starts with Dropout); a per-feature PReLU must see the
            # features of a Linear's output (dim 1 of the map)
            if isinstance(layer, nn.PReLU) and layer.num_parameters != 1 and (
                    features is None or layer.num_parameters != features):
                where = ("the flattened input" if features is None
                         else f"{features} features")
                raise ValueError(f"convolutionalize: PReLU {name} has {layer.num_parameters} "
                                 f"parameters for {where}; only a single-parameter PReLU or "
                                 "one per Linear output feature is supported")
            out[name] = copy.deepcopy(layer)
        elif isinstance(layer, (nn.Softmax, nn.LogSoftmax)) and layer.dim in (1, -1, None):
            # over the features of (N, F): dim 1 of the (N, F, H, W) map
            if features is None:
                raise ValueError(f"convolutionalize: {type(layer).__name__} {name} comes before "
                                 "the first Linear: over the flattened input it is not a "
                                 "per-position operation")
            out[name] = type(layer)(dim=1)
        else:
            what = type(layer).__name__
            hint = (" (only over the features, dim=1)" if isinstance(layer, (nn.Softmax,
                                                                            nn.LogSoftmax))
                    else "; only Flatten first, Linear and element-wise layers are supported")
            raise ValueError(f"convolutionalize: unsupported layer {name} ({what}){hint}")
    if features is None:
        raise ValueError("convolutionalize: the head has no nn.Linear layer")
    return nn.Sequential(out)
