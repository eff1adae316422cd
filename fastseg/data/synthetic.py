"""Synthetic segmentation data, generated on the fly from (seed, index): no files, no download.

- :class:`SyntheticMembranes`: EM-like grayscale images of cells separated by dark membranes
  (the ISBI 2012 convention: mask 1 = cell interior, 0 = membrane).
- :class:`SyntheticShapes`: RGB scenes of overlapping filled shapes on a cluttered background,
  one class per shape kind, with a void band (``ignore_index``) along every shape border.

Sample ``i`` depends only on (seed, i); the transform's randomness is a separate stream
(seed, epoch, i), see :class:`~fastseg.data.datasets.SegmentationDataset`.
"""

from __future__ import annotations

import colorsys
import math

import torch
import torch.nn.functional as F

from fastseg.data.datasets import SegmentationDataset, mix_seed
from fastseg.data.transforms import _int_arg, _size_arg

__all__ = ["SyntheticMembranes", "SyntheticShapes", "make_synthetic", "SYNTHETIC_DATASETS"]

# The content generator mixes (salt, seed, index, 0): four values, where the transform stream
# mixes three (seed, epoch, index), so the two streams are unrelated.
_CONTENT_SALT = 0x5EED_DA7A


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W), reflection at the border."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def _smooth_noise(channels: int, size: tuple[int, int], cells: int,
                  g: torch.Generator) -> torch.Tensor:
    """Low-frequency noise (channels, H, W), about unit scale: a cells x cells random lattice
    upsampled bicubically."""
    coarse = torch.randn((1, channels, cells, cells), generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)[0]


def _rand(g: torch.Generator, lo: float = 0.0, hi: float = 1.0, shape=()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


class _Synthetic(SegmentationDataset):
    kind = ""

    def __init__(self, length: int, size, *, seed: int, transform, weight_map) -> None:
        super().__init__(transform=transform, seed=seed, weight_map=weight_map)
        self.length = _int_arg(type(self).__name__, "length", length, minimum=1)
        self.size = _size_arg(type(self).__name__, "size", size, minimum=16)

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> dict:
        g = torch.Generator().manual_seed(mix_seed(_CONTENT_SALT, self.seed, index, 0))
        image, mask = self._generate(g)
        return {"image": image, "mask": mask, "name": f"{self.kind}-{index:05d}"}

    def _generate(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SyntheticMembranes(_Synthetic):
    """EM-like cell images: a Voronoi tessellation of random seed points (a jittered grid of
    random spacing); membranes are the pixels where (distance to the second-nearest seed) -
    (distance to the nearest seed) is below a random thickness in [2, 4] px. The image has
    bright cell interiors (a brightness per cell plus low-frequency texture and a few dark
    vesicles), dark soft-edged membranes, noise and a Gaussian blur. Mask: 0 = membrane,
    1 = cell interior (ISBI 2012's convention). ``length`` samples of ``size`` (H, W)."""

    kind = "synthetic-membranes"

    def __init__(self, length: int = 32, size=(256, 256), *, seed: int = 0, transform=None,
                 weight_map: dict | None = None) -> None:
        super().__init__(length, size, seed=seed, transform=transform, weight_map=weight_map)
        self.num_classes, self.ignore_index, self.in_channels = 2, 255, 1
        self.class_names = ["membrane", "cell"]

    def _generate(self, g):
        h, w = self.size
        spacing = int(torch.randint(18, 35, (), generator=g))  # px; an int, see below
        # Seed points: one per grid cell, two extra cells on each side so that the nearest
        # two seeds of every pixel are among its cell's 5x5 neighbourhood (jitter <= 0.35).
        gh, gw = math.ceil(h / spacing) + 4, math.ceil(w / spacing) + 4
        jitter = _rand(g, -0.35, 0.35, (2, gh, gw))
        seeds_y = (torch.arange(gh)[:, None] - 2 + 0.5 + jitter[0]) * spacing
        seeds_x = (torch.arange(gw)[None, :] - 2 + 0.5 + jitter[1]) * spacing
        # Per seed: y, x and the brightness of its cell, repeated over the cell's pixels
        # (spacing x spacing), so that the seed of the cell di, dj cells away from a pixel's
        # is a fixed shift of this canvas: candidates are slices, no gathers.
        seeds = torch.stack((seeds_y.expand(gh, gw), seeds_x.expand(gh, gw),
                             _rand(g, 0.55, 0.85, (gh, gw))))
        canvas = seeds[:, :, None, :, None].expand(3, gh, spacing, gw, spacing)
        canvas = canvas.reshape(3, gh * spacing, gw * spacing)
        ys = torch.arange(h, dtype=torch.float32)[:, None]
        xs = torch.arange(w, dtype=torch.float32)[None, :]
        # Running nearest / second-nearest squared distances over the 5x5 candidate seeds
        # (cheaper than materializing all 25 distances and sorting them; in place, with
        # preallocated buffers, as this loop is most of the generation time).
        d1 = torch.full((h, w), math.inf)
        d2 = torch.full((h, w), math.inf)
        brightness = torch.zeros((h, w))
        d, tmp = torch.empty((h, w)), torch.empty((h, w))
        closer = torch.empty((h, w), dtype=torch.bool)
        for top in range(0, 5 * spacing, spacing):
            band = canvas[:, top:top + h]
            for left in range(0, 5 * spacing, spacing):
                sy, sx, sb = band[:, :, left:left + w]
                torch.sub(sy, ys, out=d).square_()
                d.add_(torch.sub(sx, xs, out=tmp).square_())
                torch.lt(d, d1, out=closer)
                torch.minimum(d2, torch.maximum(d1, d, out=tmp), out=d2)
                torch.minimum(d1, d, out=d1)
                torch.where(closer, sb, brightness, out=brightness)
        gap = d2.sqrt() - d1.sqrt()
        thickness = float(_rand(g, 2.0, 4.0))
        mask = (gap >= thickness).long()  # 1 = cell interior

        image = brightness + 0.07 * _smooth_noise(1, (h, w), 6, g)[0]
        # Vesicles: small dark discs inside the cells (part of the "cell" class).
        count = max(1, h * w // 3000)
        discs = zip(_rand(g, 0, h, (count,)).tolist(), _rand(g, 0, w, (count,)).tolist(),
                    _rand(g, 1.5, 4.0, (count,)).tolist())
        for cy, cx, radius in discs:
            y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 2, h)
            x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 2, w)
            disc = (ys[y0:y1] - cy) ** 2 + (xs[:, x0:x1] - cx) ** 2 < radius ** 2
            image[y0:y1, x0:x1] -= 0.25 * disc
        # Membranes: dark, with a soft edge over about one pixel.
        darkness = ((thickness + 1.0 - gap) / 2.0).clamp(0.0, 1.0)
        image = image * (1 - darkness) + float(_rand(g, 0.1, 0.25)) * darkness
        image = image + float(_rand(g, 0.02, 0.05)) * torch.randn((h, w), generator=g)
        image = _gaussian_blur(image[None], float(_rand(g, 0.6, 1.2)))
        return image.clamp_(0.0, 1.0), mask


# Shape kinds in class order (class c >= 1 is kind (c - 1) % 6, repeated with other colours).
_KINDS = ("circle", "square", "triangle", "ellipse", "ring", "cross")


def _inside(kind: str, u: torch.Tensor, v: torch.Tensor, aspect: float) -> torch.Tensor:
    """Membership in a shape of unit size centred at (0, 0) in its own (u, v) frame."""
    if kind == "circle":
        return u ** 2 + v ** 2 <= 1
    if kind == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if kind == "triangle":  # equilateral, circumradius 1
        s = math.sqrt(3)
        return (v >= -0.5) & (s * u + v <= 1) & (-s * u + v <= 1)
    if kind == "ellipse":
        return u ** 2 + (v / aspect) ** 2 <= 1
    if kind == "ring":
        r2 = u ** 2 + v ** 2
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    # cross
    return (((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)))


def _class_colour(c: int) -> torch.Tensor:
    """Class c's typical RGB colour: hues spread by the golden ratio; each later cycle
    through the kinds is darker."""
    cycle = (c - 1) // len(_KINDS)
    hue = ((c - 1) * 0.618034 + 0.05) % 1.0
    value = 0.9 - 0.3 * (cycle % 2)
    return torch.tensor(colorsys.hsv_to_rgb(hue, 0.75, value), dtype=torch.float32)


class SyntheticShapes(_Synthetic):
    """RGB scenes: a cluttered textured background (class 0: smooth colour field, noise and
    small random-colour blobs) under 3-7 overlapping filled shapes. Class c >= 1 is one shape
    kind (circle, square, triangle, ellipse, ring, cross, then again with other colours)
    in a class-typical colour with per-shape jitter and shading. A void band along every
    shape border (1 px inside the upper shape, or 2 px straddling the border: chosen per
    image) is ``ignore_index`` = 255, as in PASCAL VOC. ``length`` samples of ``size``."""

    kind = "synthetic-shapes"

    def __init__(self, length: int = 32, size=(128, 128), *, num_classes: int = 6,
                 seed: int = 0, transform=None, weight_map: dict | None = None) -> None:
        super().__init__(length, size, seed=seed, transform=transform, weight_map=weight_map)
        self.num_classes = _int_arg("SyntheticShapes", "num_classes", num_classes, minimum=2)
        self.ignore_index, self.in_channels = 255, 3
        names = ["background"]
        for c in range(1, self.num_classes):
            cycle = (c - 1) // len(_KINDS)
            names.append(_KINDS[(c - 1) % len(_KINDS)] + (f"{cycle + 1}" if cycle else ""))
        self.class_names = names
        self._colours = [None] + [_class_colour(c) for c in range(1, self.num_classes)]

    def _generate(self, g):
        h, w = self.size
        ys = torch.arange(h, dtype=torch.float32)[:, None]
        xs = torch.arange(w, dtype=torch.float32)[None, :]
        image = (0.5 + 0.15 * _smooth_noise(3, (h, w), 4, g)
                 + 0.05 * _smooth_noise(3, (h, w), 16, g))
        # Clutter: small blobs of random colours, part of the background.
        for _ in range(int(torch.randint(4, 12, (), generator=g))):
            cy, cx = float(_rand(g, 0, h)), float(_rand(g, 0, w))
            blob = (ys - cy) ** 2 + (xs - cx) ** 2 <= float(_rand(g, 1.5, 4.0)) ** 2
            image = torch.where(blob, _rand(g, 0.0, 1.0, (3, 1, 1)), image)

        labels = torch.zeros((h, w), dtype=torch.long)
        instances = torch.zeros((h, w), dtype=torch.long)
        size = min(h, w)
        for n in range(1, int(torch.randint(3, 8, (), generator=g)) + 1):
            c = int(torch.randint(1, self.num_classes, (), generator=g))
            cy, cx = float(_rand(g, 0, h)), float(_rand(g, 0, w))
            radius = float(_rand(g, 0.1, 0.22)) * size
            angle = float(_rand(g, 0, 2 * math.pi))
            cos, sin = math.cos(angle), math.sin(angle)
            u = (cos * (xs - cx) + sin * (ys - cy)) / radius
            v = (-sin * (xs - cx) + cos * (ys - cy)) / radius
            inside = _inside(_KINDS[(c - 1) % len(_KINDS)], u, v, float(_rand(g, 0.45, 0.6)))
            colour = (self._colours[c] + _rand(g, -0.08, 0.08, (3,)))[:, None, None]
            shading = 1 + 0.12 * (u * float(_rand(g, -1, 1)) + v * float(_rand(g, -1, 1)))
            image = torch.where(inside, colour * shading, image)
            labels[inside], instances[inside] = c, n

        # Void band: pixels next to a pixel of another instance (3x3 neighbourhood).
        inst = instances.float()[None, None]
        high = F.max_pool2d(inst, 3, stride=1, padding=1)[0, 0]
        low = -F.max_pool2d(-inst, 3, stride=1, padding=1)[0, 0]
        if bool(torch.randint(0, 2, (), generator=g)):
            border = high != low  # both sides: 2 px
        else:
            border = instances.float() > low  # the upper shape's side only: 1 px
        labels[border] = self.ignore_index

        image = image + 0.03 * torch.randn((3, h, w), generator=g)
        image = _gaussian_blur(image, 0.5)
        return image.clamp_(0.0, 1.0), labels


SYNTHETIC_DATASETS = {"synthetic-membranes": SyntheticMembranes,
                      "synthetic-shapes": SyntheticShapes}


def make_synthetic(name: str, **kw) -> SegmentationDataset:
    """The synthetic dataset called ``name`` ("synthetic-membranes" or "synthetic-shapes"),
    built with the keywords ``kw``."""
    if name not in SYNTHETIC_DATASETS:
        raise ValueError(f"make_synthetic: unknown dataset {name!r}; available: "
                         f"{sorted(SYNTHETIC_DATASETS)}")
    return SYNTHETIC_DATASETS[name](**kw)
