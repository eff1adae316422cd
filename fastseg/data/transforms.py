"""Segmentation augmentations that move the image, the mask and the weight map together.

A transform is a callable ``t(sample, generator) -> sample``: ``sample`` is a dict with
"image" (float (C, H, W), values in [0, 1]), "mask" (int64 (H', W') class ids), optionally
"weight" (float32 (H', W')) and any other keys (passed through). All randomness comes from the
``torch.Generator`` passed in, so the same generator state gives the same result in any
process; deterministic transforms accept ``generator=None``. The input dict and its tensors
are never modified; a new dict is returned.

Geometry. The image is interpolated bilinearly, the mask by nearest neighbour, the weight
bilinearly. Output pixels whose source lies outside the input get ``ignore_index`` in the mask
(they do not train), 0 in the weight and a reflection of the input in the image.

Overlap-tile context. After :class:`MirrorPad` the image is larger than the mask by
2 * context on each axis and both share the same centre (the mask is the image's central
window), the input layout of U-Net's unpadded ("valid") network. Flips, rotations, elastic
deformation and crops keep that layout (the image's extra border moves with the same
geometry); :class:`Resize` and :class:`RandomScale` need image and mask of one size, so apply
them before :class:`MirrorPad`. Typical training pipeline for a valid U-Net::

    Compose([RandomFlip(vertical=True), RandomRotation(right_angles=True),
             ElasticDeformation(sigma=10.0, grid=3), IntensityJitter(),
             MirrorPad(context), RandomCrop(out_size, context=context)])

``ignore_index`` (default 255) is a constructor keyword of every transform that can create
pixels without a source; set it to the dataset's ``ignore_index`` when that differs.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["Compose", "RandomFlip", "RandomRotation", "RandomScale", "Resize", "RandomCrop",
           "CenterCrop", "MirrorPad", "IntensityJitter", "ElasticDeformation"]


# --- argument checks (also used by the datasets) ----------------------------------------------

def _int_arg(where: str, name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:  # numpy / torch integer scalars
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} "
                            f"{value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _float_arg(where: str, name: str, value, minimum: float | None = None,
               maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{where}: {name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{where}: {name} must lie in [{minimum}, {maximum}], got {value!r}")
    return float(value)


def _size_arg(where: str, name: str, value, minimum: int = 1) -> tuple[int, int]:
    """An int (square) or an (h, w) pair of ints >= minimum."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be an int or an (h, w) pair, got {value!r}")
        return (_int_arg(where, name, value[0], minimum), _int_arg(where, name, value[1], minimum))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int or an (h, w) pair of ints, got {value!r}")
    size = _int_arg(where, name, value, minimum)
    return size, size


def _range_arg(where: str, name: str, value, center: float,
               minimum: float | None = None) -> tuple[float, float]:
    """A (lo, hi) pair, or a number d meaning (center - d, center + d)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be a number or a (lo, hi) pair, got {value!r}")
        lo, hi = (_float_arg(where, name, v) for v in value)
    else:
        spread = _float_arg(where, name, value, minimum=0.0)
        lo, hi = center - spread, center + spread
    if lo > hi or (minimum is not None and lo < minimum):
        low = "" if minimum is None else f" and lo >= {minimum}"
        raise ValueError(f"{where}: {name} must give lo <= hi{low}, got ({lo}, {hi})")
    return lo, hi


def _probability(where: str, p) -> float:
    return _float_arg(where, "p", p, 0.0, 1.0)


# --- sample helpers ---------------------------------------------------------------------------

def _context(sample, where: str) -> tuple[int, int]:
    """Check the sample's layout; return the image's border around the mask (ch, cw)."""
    if not isinstance(sample, dict) or "image" not in sample or "mask" not in sample:
        raise TypeError(f"{where}: sample must be a dict with 'image' and 'mask' tensors, got "
                        f"{type(sample).__name__}"
                        + (f" with keys {sorted(sample)}" if isinstance(sample, dict) else ""))
    image, mask, weight = sample["image"], sample["mask"], sample.get("weight")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"{where}: sample['image'] must be a float tensor (C, H, W), got "
                         f"{_describe(image)}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point():
        raise ValueError(f"{where}: sample['mask'] must be an integer tensor (H, W), got "
                         f"{_describe(mask)}")
    if weight is not None and (not isinstance(weight, torch.Tensor)
                               or weight.shape != mask.shape):
        raise ValueError(f"{where}: sample['weight'] must be a tensor of the mask's shape "
                         f"{tuple(mask.shape)}, got {_describe(weight)}")
    (h, w), (mh, mw) = image.shape[1:], mask.shape
    if h < mh or w < mw or (h - mh) % 2 or (w - mw) % 2:
        raise ValueError(f"{where}: the image ({h}x{w}) must have the mask's size ({mh}x{mw}) "
                         f"or exceed it by 2 * context on each axis (after MirrorPad)")
    return (h - mh) // 2, (w - mw) // 2


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _replace(sample: dict, **tensors) -> dict:
    """A new sample dict with some entries replaced (None entries stay absent)."""
    out = dict(sample)
    for key, value in tensors.items():
        if value is not None:
            out[key] = value
    return out


def _map_planes(sample: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Apply one spatial operation on the last two dims of image, mask and weight."""
    weight = sample.get("weight")
    return _replace(sample, image=fn(sample["image"]), mask=fn(sample["mask"]),
                    weight=None if weight is None else fn(weight))


def _need_generator(where: str, generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator (all randomness comes "
                        f"from it, for reproducible samples), got {type(generator).__name__}")
    return generator


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _happens(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def _reflect_index(n: int, before: int, after: int, device=None) -> torch.Tensor:
    """Source indices of a reflection padding (edge not repeated, like numpy's "reflect"),
    repeating the reflection when a pad is longer than the input."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - i)


def mirror_pad(image: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``image`` (..., H, W) mirror-padded as ``np.pad(mode="reflect")`` (the border pixel is
    the mirror axis, not repeated), the reflection repeated as far as the pads need: the
    U-Net paper's overlap-tile border, shared by MirrorPad and inference."""
    h, w = image.shape[-2:]
    rows = _reflect_index(h, top, bottom, image.device)
    cols = _reflect_index(w, left, right, image.device)
    return image.index_select(-2, rows).index_select(-1, cols)


def _to_grid(ys: torch.Tensor, xs: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's normalized grid (align_corners=False)."""
    return torch.stack(((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1), dim=-1)[None]


def _remap(sample: dict, src_y: torch.Tensor, src_x: torch.Tensor, ignore_index: int,
           context: tuple[int, int]) -> dict:
    """Resample a sample: output image pixel (y, x) takes the input at (src_y, src_x) (image
    pixel coordinates, shape = the image's (H, W)). The mask and weight use the central
    window of the same map, shifted into their frame."""
    image, mask, weight = sample["image"], sample["mask"], sample.get("weight")
    h, w = image.shape[1:]
    ch, cw = context
    mh, mw = mask.shape
    grid = _to_grid(src_y, src_x, h, w).to(image.dtype)
    new_image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)[0]
    mgrid = _to_grid(src_y[ch:ch + mh, cw:cw + mw] - ch, src_x[ch:ch + mh, cw:cw + mw] - cw,
                     mh, mw)
    # A second channel of ones comes back 0 where the source is outside (zeros padding).
    planes = torch.stack((mask.double(), torch.ones(mask.shape, dtype=torch.float64)))
    ids, inside = F.grid_sample(planes[None], mgrid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[0]
    outside = inside == 0
    new_mask = ids.to(mask.dtype).masked_fill_(outside, ignore_index)
    new_weight = None
    if weight is not None:
        new_weight = F.grid_sample(weight[None, None].float(), mgrid.float(), mode="bilinear",
                                   padding_mode="zeros", align_corners=False)[0, 0]
        # 0 on every pixel without source, also where the bilinear footprint still reached in
        new_weight = new_weight.masked_fill_(outside, 0.0).to(weight.dtype)
    return _replace(sample, image=new_image, mask=new_mask, weight=new_weight)


def _pixel_coords(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    return ys, xs


# --- transforms -------------------------------------------------------------------------------

class Transform:
    """Base class: ``__call__(sample, generator)``; the repr lists the constructor values."""

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order, all drawing from the one generator."""

    def __init__(self, transforms: Iterable[Callable]) -> None:
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not callable(t):
                raise TypeError(f"Compose: transforms[{i}] must be callable as "
                                f"t(sample, generator), got {type(t).__name__}")

    def __call__(self, sample, generator=None):
        for t in self.transforms:
            sample = t(sample, generator)
        return sample


class RandomFlip(Transform):
    """Flip left-right (``horizontal``) and/or up-down (``vertical``), each with probability
    ``p``, independently."""

    def __init__(self, horizontal: bool = True, vertical: bool = False, p: float = 0.5) -> None:
        self.horizontal, self.vertical = bool(horizontal), bool(vertical)
        self.p = _probability("RandomFlip", p)

    def __call__(self, sample, generator=None):
        _context(sample, "RandomFlip")
        g = _need_generator("RandomFlip", generator)
        dims = [d for d, on in ((-1, self.horizontal), (-2, self.vertical))
                if on and _happens(g, self.p)]
        if not dims:
            return dict(sample)
        return _map_planes(sample, lambda t: torch.flip(t, dims))


class RandomRotation(Transform):
    """Rotate by an angle drawn uniformly from ``degrees`` ((lo, hi), or d for (-d, d)) about
    the centre, with probability ``p``; positive angles turn the picture counter-clockwise
    as displayed (row 0 at the top), like ``torch.rot90``. The corners that come from outside
    the input are ``ignore_index`` in the mask and 0 in the weight.

    ``right_angles=True`` instead turns by k * 90 degrees, k uniform in {0, 1, 2, 3}, exactly
    (``torch.rot90``; no interpolation, no pixels without source; H and W swap for odd k);
    ``degrees`` is then unused.
    """

    def __init__(self, degrees=(-15.0, 15.0), *, right_angles: bool = False, p: float = 1.0,
                 ignore_index: int = 255) -> None:
        self.degrees = _range_arg("RandomRotation", "degrees", degrees, 0.0)
        self.right_angles = bool(right_angles)
        self.p = _probability("RandomRotation", p)
        self.ignore_index = _int_arg("RandomRotation", "ignore_index", ignore_index)

    def __call__(self, sample, generator=None):
        context = _context(sample, "RandomRotation")
        g = _need_generator("RandomRotation", generator)
        if not _happens(g, self.p):
            return dict(sample)
        if self.right_angles:
            k = int(torch.randint(0, 4, (), generator=g).item())
            return _map_planes(sample, lambda t: torch.rot90(t, k, dims=(-2, -1)))
        angle = math.radians(_uniform(g, *self.degrees))
        h, w = sample["image"].shape[1:]
        ys, xs = _pixel_coords(h, w)
        dy, dx = ys - (h - 1) / 2, xs - (w - 1) / 2
        cos, sin = math.cos(angle), math.sin(angle)
        src_x = cos * dx - sin * dy + (w - 1) / 2
        src_y = sin * dx + cos * dy + (h - 1) / 2
        return _remap(sample, src_y, src_x, self.ignore_index, context)


class ElasticDeformation(Transform):
    """U-Net's elastic deformation: displacement vectors drawn from N(0, sigma**2) pixels on a
    coarse ``grid`` x ``grid`` lattice spanning the image (corner nodes on the corner pixels),
    upsampled to a smooth per-pixel field by bicubic interpolation; output pixel x takes the
    input at x + displacement(x). Applied with probability ``p``. Image bilinear (reflection
    at the border), weight bilinear (0 outside), mask nearest (``ignore_index`` outside).
    With a context border (after MirrorPad) the field spans the whole image and the mask
    uses its central window, so the two stay aligned.
    """

    def __init__(self, sigma: float = 10.0, grid: int = 3, p: float = 1.0, *,
                 ignore_index: int = 255) -> None:
        self.sigma = _float_arg("ElasticDeformation", "sigma", sigma, minimum=0.0)
        self.grid = _int_arg("ElasticDeformation", "grid", grid, minimum=2)
        self.p = _probability("ElasticDeformation", p)
        self.ignore_index = _int_arg("ElasticDeformation", "ignore_index", ignore_index)

    def __call__(self, sample, generator=None):
        context = _context(sample, "ElasticDeformation")
        g = _need_generator("ElasticDeformation", generator)
        if not _happens(g, self.p):
            return dict(sample)
        h, w = sample["image"].shape[1:]
        coarse = torch.randn((1, 2, self.grid, self.grid), generator=g,
                             dtype=torch.float64) * self.sigma
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
        ys, xs = _pixel_coords(h, w)
        return _remap(sample, ys + field[0], xs + field[1], self.ignore_index, context)


def _no_context(sample: dict, where: str, hint: str | None = None) -> None:
    """Check that image and mask have one size (no MirrorPad border yet)."""
    if _context(sample, where) != (0, 0):
        raise ValueError(f"{where}: the image {tuple(sample['image'].shape)} is larger than "
                         f"the mask {tuple(sample['mask'].shape)} (a MirrorPad context "
                         f"border); " + (hint or f"apply {where} before MirrorPad"))


def _resize(sample: dict, size: tuple[int, int], where: str) -> dict:
    """Resize image (bilinear, antialiased), weight (bilinear) and mask (nearest, pixel
    centres aligned like the bilinear resize) to ``size``."""
    _no_context(sample, where)
    image, mask, weight = sample["image"], sample["mask"], sample.get("weight")
    new_image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0.0, 1.0)
    new_mask = F.interpolate(mask[None, None].double(), size=size,
                             mode="nearest-exact")[0, 0].to(mask.dtype)
    new_weight = None
    if weight is not None:
        new_weight = F.interpolate(weight[None, None].float(), size=size, mode="bilinear",
                                   align_corners=False, antialias=True)[0, 0].to(weight.dtype)
    return _replace(sample, image=new_image, mask=new_mask, weight=new_weight)


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h * scale)), max(1, round(w * scale))


class Resize(Transform):
    """Deterministic resize to ``size`` (an int for a square, or (h, w)) or by ``scale`` (a
    factor, keeping the aspect ratio; sizes rounded): image bilinear with antialiasing,
    weight bilinear, mask nearest. Use it to downscale CamVid / ISBI for CPU runs. Give
    exactly one of ``size`` and ``scale``. Needs image and mask of one size (before
    MirrorPad)."""

    def __init__(self, size=None, *, scale: float | None = None) -> None:
        if (size is None) == (scale is None):
            raise ValueError(f"Resize: give exactly one of size and scale, got size={size!r}, "
                             f"scale={scale!r}")
        self.size = None if size is None else _size_arg("Resize", "size", size)
        self.scale = None if scale is None else _float_arg("Resize", "scale", scale)
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"Resize: scale must be > 0, got {scale!r}")

    def __call__(self, sample, generator=None):
        size = self.size or _scaled_size(*sample["image"].shape[1:], self.scale)
        return _resize(sample, size, "Resize")


class RandomScale(Transform):
    """Resize by a factor drawn uniformly from ``scale`` (lo, hi), with probability ``p``; the
    output size changes (round(s * H), round(s * W)). Same interpolation as :class:`Resize`,
    and also before MirrorPad."""

    def __init__(self, scale=(0.75, 1.25), p: float = 1.0) -> None:
        self.scale = _range_arg("RandomScale", "scale", scale, 1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"RandomScale: scale factors must be > 0, got {scale!r}")
        self.p = _probability("RandomScale", p)

    def __call__(self, sample, generator=None):
        g = _need_generator("RandomScale", generator)
        _no_context(sample, "RandomScale")  # also when p skips, so a bad pipeline always fails
        if not _happens(g, self.p):
            return dict(sample)
        s = _uniform(g, *self.scale)
        return _resize(sample, _scaled_size(*sample["image"].shape[1:], s), "RandomScale")


class _Crop(Transform):
    """Crop the mask (and weight) to ``size`` and the image to size + 2 * context at the
    matching position. Subclasses choose the position."""

    def __init__(self, size, *, context: int = 0, ignore_index: int = 255) -> None:
        where = type(self).__name__
        self.size = _size_arg(where, "size", size)
        self.context = _int_arg(where, "context", context, minimum=0)
        self.ignore_index = _int_arg(where, "ignore_index", ignore_index)

    def _offset(self, room: int, generator) -> int:
        raise NotImplementedError

    def __call__(self, sample, generator=None):
        where = type(self).__name__
        context = _context(sample, where)
        c = self.context
        if context != (c, c):
            image_shape = tuple(sample["image"].shape)
            mask_shape = tuple(sample["mask"].shape)
            raise ValueError(
                f"{where}(context={c}) needs the image larger than the mask by 2 * context = "
                f"{2 * c} on each axis (apply MirrorPad({c}) first); got image {image_shape} "
                f"and mask {mask_shape}")
        sample = self._pad_to_size(sample)
        (h, w), (mh, mw) = self.size, sample["mask"].shape
        top, left = self._offset(mh - h, generator), self._offset(mw - w, generator)
        image, weight = sample["image"], sample.get("weight")
        # clone: the crops are views; a new sample must not share memory with its input
        return _replace(
            sample,
            image=image[:, top:top + h + 2 * c, left:left + w + 2 * c].clone(),
            mask=sample["mask"][top:top + h, left:left + w].clone(),
            weight=None if weight is None else weight[top:top + h, left:left + w].clone())

    def _pad_to_size(self, sample: dict) -> dict:
        """Pad a mask smaller than ``size`` (centred): mask ignore_index, weight 0, image by
        reflection."""
        (h, w), (mh, mw) = self.size, sample["mask"].shape
        ph, pw = max(h - mh, 0), max(w - mw, 0)
        if ph == 0 and pw == 0:
            return sample
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
        weight = sample.get("weight")
        return _replace(
            sample,
            image=mirror_pad(sample["image"], pads[2], pads[3], pads[0], pads[1]),
            mask=F.pad(sample["mask"], pads, value=self.ignore_index),
            weight=None if weight is None else F.pad(weight, pads, value=0.0))


class RandomCrop(_Crop):
    """Crop the mask (and weight) to ``size`` (int or (h, w)) at a uniformly random position
    and the image to size + 2 * ``context`` at the matching position (the image must already
    be larger than the mask by 2 * context on each axis, as MirrorPad(context) makes it). A
    mask smaller than ``size`` is first padded (centred): mask ``ignore_index``, weight 0,
    image by reflection."""

    def _offset(self, room, generator):
        g = _need_generator("RandomCrop", generator)
        return int(torch.randint(0, room + 1, (), generator=g).item())


class CenterCrop(_Crop):
    """The deterministic twin of :class:`RandomCrop` (validation): the central window
    (offset (H' - h) // 2)."""

    def _offset(self, room, generator):
        return room // 2


class MirrorPad(Transform):
    """Pad the image only, by ``context`` pixels on each side, by reflection (repeated when
    context exceeds the image size, so tiny images work): U-Net's overlap-tile border for
    the unpadded network, whose output is smaller than its input by 2 * context. The mask
    and weight keep their size. Needs image and mask of one size."""

    def __init__(self, context: int) -> None:
        self.context = _int_arg("MirrorPad", "context", context, minimum=0)

    def __call__(self, sample, generator=None):
        _no_context(sample, "MirrorPad", "pad once")
        c = self.context
        return _replace(sample, image=mirror_pad(sample["image"], c, c, c, c))


class IntensityJitter(Transform):
    """Photometric jitter of the image only (mask and weight untouched), each part drawn
    from the generator: a gamma exponent (``gamma``: None, g for (1 - g, 1 + g), or (lo, hi);
    exponent > 0), a contrast factor about the image mean (``contrast``: c for (1 - c, 1 + c)
    or (lo, hi)), an added brightness offset (``brightness``: b for (-b, b) or (lo, hi)),
    then Gaussian noise of std ``noise``; the result is clamped to [0, 1]. Applied with
    probability ``p``."""

    def __init__(self, brightness=0.1, contrast=0.1, gamma=None, noise: float = 0.0,
                 p: float = 1.0) -> None:
        self.brightness = _range_arg("IntensityJitter", "brightness", brightness, 0.0)
        self.contrast = _range_arg("IntensityJitter", "contrast", contrast, 1.0, minimum=0.0)
        self.gamma = (None if gamma is None
                      else _range_arg("IntensityJitter", "gamma", gamma, 1.0, minimum=0.0))
        if self.gamma is not None and self.gamma[0] <= 0:
            raise ValueError(f"IntensityJitter: gamma exponents must be > 0, got {gamma!r}")
        self.noise = _float_arg("IntensityJitter", "noise", noise, minimum=0.0)
        self.p = _probability("IntensityJitter", p)

    def __call__(self, sample, generator=None):
        _context(sample, "IntensityJitter")
        g = _need_generator("IntensityJitter", generator)
        if not _happens(g, self.p):
            return dict(sample)
        image = sample["image"].clamp(0.0, 1.0)  # a new tensor: pow of negatives is NaN
        if self.gamma is not None:
            image = image.pow(_uniform(g, *self.gamma))
        contrast, brightness = _uniform(g, *self.contrast), _uniform(g, *self.brightness)
        image = (image - image.mean()) * contrast + image.mean() + brightness
        if self.noise > 0:
            image = image + self.noise * torch.randn(image.shape, generator=g, dtype=image.dtype)
        return _replace(sample, image=image.clamp_(0.0, 1.0))
