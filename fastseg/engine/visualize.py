"""Pictures of segmentations: colour palettes, coloured masks, overlays, heat maps, side-by-side
panels, PNG files and training curves (Pillow + numpy; matplotlib only for the curves).

    palette(num_classes) -> (K, 3) uint8
    colorize(mask, palette, ignore_index=255) -> (H, W, 3) uint8
    overlay(image, mask, palette, alpha=0.5, ignore_index=255) -> (H, W, 3) uint8
    to_rgb(image) -> (H, W, 3) uint8
    heatmap(prob) -> (H, W, 3) uint8
    save_png(array_or_tensor, path) -> path
    panel(images, labels=None, gap=4) -> (H', W', 3) uint8
    plot_curves(records, path, *, x="step", keys=("loss",), title=None) -> path

Pictures are numpy uint8 arrays, (H, W, 3) RGB. Masks may be numpy arrays or tensors.
"""

from __future__ import annotations

import os
from numbers import Real

import numpy as np
import torch

__all__ = ["IGNORE_COLOR", "colorize", "heatmap", "overlay", "palette", "panel", "plot_curves",
           "save_png", "to_rgb"]

# Ignored pixels are drawn white: palette colours are never white (see palette) and class 0
# is black, so black would be ambiguous.
IGNORE_COLOR = (255, 255, 255)
_MAX_CLASSES = 2 ** 24 - 1   # the palette has 24 bits; the last code would be white


def _to_numpy(where: str, name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{where}: {name} must be a numpy array or a torch.Tensor, got "
                    f"{type(value).__name__}")


def palette(num_classes: int) -> np.ndarray:
    """``num_classes`` distinct colours, (K, 3) uint8, the same every time.

    PASCAL VOC's palette: the bits of the class id are dealt out in turn to red, green and blue,
    most significant colour bit first (id bit 0 -> red bit 7, bit 1 -> green bit 7, bit 2 ->
    blue bit 7, bit 3 -> red bit 6, ...). Distinct ids give distinct colours; class 0 is black,
    1 dark red, 2 dark green. White (the ignore colour) would need id 2**24 - 1, so at most
    2**24 - 1 classes.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"palette: num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"palette: num_classes must be in [1, {_MAX_CLASSES}], got "
                         f"{num_classes}")
    ids = np.arange(num_classes, dtype=np.int64)
    colors = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):                      # colour bit 7 - bit gets id bits 3*bit .. 3*bit+2
        for channel in range(3):
            colors[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return colors.astype(np.uint8)


def _check_palette(where: str, colors) -> np.ndarray:
    colors = _to_numpy(where, "palette", colors)
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] < 1 or colors.dtype != np.uint8:
        raise ValueError(f"{where}: palette must be a (K, 3) uint8 array (see palette()), got "
                         f"shape {colors.shape} {colors.dtype}")
    return colors


def _class_mask(where: str, mask, num_colors: int, ignore_index) -> tuple[np.ndarray, np.ndarray]:
    """(mask as int64, ignored pixels) after checking every id has a colour."""
    mask = _to_numpy(where, "mask", mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}: mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_ or not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"{where}: mask must hold integer class ids, got {mask.dtype}")
    mask = mask.astype(np.int64)
    ignored = (mask == ignore_index) if ignore_index is not None else np.zeros(mask.shape, bool)
    bad = ~ignored & ((mask < 0) | (mask >= num_colors))
    if bad.any():
        raise ValueError(f"{where}: mask holds ids {np.unique(mask[bad])[:10].tolist()} outside "
                         f"the palette's [0, {num_colors}) (ignore_index={ignore_index})")
    return mask, ignored


def colorize(mask, palette, ignore_index: int | None = 255) -> np.ndarray:
    """A class-id mask (H, W) as an RGB picture (H, W, 3) uint8: each id gets its palette
    colour; pixels equal to ``ignore_index`` (None: none) are white (``IGNORE_COLOR``), even
    when the palette has a colour at that index. Other ids outside the palette raise
    ValueError."""
    where = "colorize"
    colors = _check_palette(where, palette)
    mask, ignored = _class_mask(where, mask, len(colors), ignore_index)
    out = colors[np.where(ignored, 0, mask)]
    out[ignored] = IGNORE_COLOR
    return out


def _image_rgb(where: str, image) -> np.ndarray:
    """A (C, H, W) image in [0, 1] (C = 1 or 3) as (H, W, 3) float64 in [0, 1]."""
    image = _to_numpy(where, "image", image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"{where}: image must be (C, H, W) with C = 1 or 3, got shape "
                         f"{image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"{where}: image must be floating point with values in [0, 1], got "
                        f"{image.dtype}")
    image = image.astype(np.float64)
    if not (image.min() >= 0.0 and image.max() <= 1.0):  # also catches NaN
        raise ValueError(f"{where}: image values must lie in [0, 1], got min {image.min()}, "
                         f"max {image.max()}")
    return np.repeat(image, 3 // image.shape[0], axis=0).transpose(1, 2, 0)


def to_rgb(image) -> np.ndarray:
    """A (C, H, W) image in [0, 1] (C = 1 or 3) as an (H, W, 3) uint8 picture."""
    return np.rint(_image_rgb("to_rgb", image) * 255).astype(np.uint8)


def overlay(image, mask, palette, alpha: float = 0.5, ignore_index: int | None = 255,
            ) -> np.ndarray:
    """The image (C, H, W) in [0, 1] (grayscale repeated to RGB) with the mask's colours
    blended on top: ``(1 - alpha) * image + alpha * colour`` per pixel, (H, W, 3) uint8
    (rounded). Ignored pixels show the image alone."""
    where = "overlay"
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha must be a number in [0, 1], got {alpha!r}")
    rgb = _image_rgb(where, image) * 255.0
    colors = _check_palette(where, palette)
    mask, ignored = _class_mask(where, mask, len(colors), ignore_index)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{where}: mask {mask.shape} and image {rgb.shape[:2]} must have the "
                         "same H, W")
    colored = colors[np.where(ignored, 0, mask)].astype(np.float64)
    blend = (1.0 - alpha) * rgb + alpha * colored
    blend[ignored] = rgb[ignored]
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


# A rainbow colour map: blue -> cyan -> green -> yellow -> red at 0, 1/4, 1/2, 3/4, 1.
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_COLORS = np.array([[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]],
                        dtype=np.float64)


def heatmap(prob) -> np.ndarray:
    """A probability map (H, W), values in [0, 1], as an RGB picture (H, W, 3) uint8: linear
    between blue (0), cyan (1/4), green (1/2), yellow (3/4) and red (1)."""
    where = "heatmap"
    prob = _to_numpy(where, "prob", prob)
    if prob.ndim != 2:
        raise ValueError(f"{where}: prob must be 2-D (H, W), got shape {prob.shape}")
    if not (np.issubdtype(prob.dtype, np.floating) or np.issubdtype(prob.dtype, np.integer)):
        raise TypeError(f"{where}: prob must be numeric, got {prob.dtype}")
    prob = prob.astype(np.float64)
    if prob.size and not (prob.min() >= 0.0 and prob.max() <= 1.0):
        raise ValueError(f"{where}: prob values must lie in [0, 1], got min {prob.min()}, max "
                         f"{prob.max()}")
    channels = [np.interp(prob, _HEAT_STOPS, _HEAT_COLORS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def _as_picture(where: str, value) -> np.ndarray:
    """An (H, W) or (H, W, 1 | 3 | 4) uint8 array from an array or tensor (see save_png)."""
    array = _to_numpy(where, "array", value)
    if isinstance(value, torch.Tensor) and array.ndim == 3:
        array = array.transpose(1, 2, 0)  # torch pictures are (C, H, W)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        shape = tuple(value.shape)
        raise ValueError(f"{where}: array must be (H, W) or (H, W, 1|3|4) (a tensor: (C, H, W)),"
                         f" got shape {shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{where}: array is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not (array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"{where}: a floating-point array must lie in [0, 1] (it is scaled "
                             f"by 255), got min {array.min()}, max {array.max()}")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{where}: an integer array must lie in [0, 255], got min "
                             f"{array.min()}, max {array.max()}")
        return array.astype(np.uint8)
    raise TypeError(f"{where}: unsupported dtype {array.dtype}")


def save_png(array_or_tensor, path) -> str:
    """Writes a picture as a PNG file (creating missing parent folders); returns the path.

    numpy arrays are (H, W) grayscale or (H, W, 3) RGB / (H, W, 4) RGBA; a 3-D torch tensor is
    (C, H, W) with C = 1, 3 or 4. uint8 values are written as they are, bool as 0 / 255,
    floating point values in [0, 1] scaled by 255 and rounded, other integers (a class-id mask)
    must lie in [0, 255].
    """
    where = "save_png"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    from PIL import Image

    picture = _as_picture(where, array_or_tensor)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(picture)).save(path, format="PNG")
    return path


def panel(images, labels=None, gap: int = 4) -> np.ndarray:
    """Equal-height RGB pictures side by side, ``gap`` white pixels apart, as one (H', W', 3)
    uint8 picture of width ``sum(widths) + gap * (len(images) - 1)`` - the
    "input | truth | prediction" picture. With ``labels`` (one string per picture) each label
    is written in black above its picture with Pillow's default font, in a white band that
    adds to the height; without, H' = H."""
    where = "panel"
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"{where}: images must be a non-empty list of (H, W, 3) uint8 arrays, "
                         f"got {type(images).__name__}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"{where}: gap must be an int >= 0, got {gap!r}")
    pictures = []
    for i, image in enumerate(images):
        array = _to_numpy(where, f"images[{i}]", image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"{where}: images[{i}] must be an (H, W, 3) uint8 RGB array, got "
                             f"shape {array.shape} {array.dtype}")
        pictures.append(array)
    heights = {p.shape[0] for p in pictures}
    if len(heights) != 1:
        raise ValueError(f"{where}: images must have the same height, got "
                         f"{[p.shape[0] for p in pictures]}")
    if labels is not None:
        if (not isinstance(labels, (list, tuple)) or len(labels) != len(pictures)
                or not all(isinstance(s, str) for s in labels)):
            raise ValueError(f"{where}: labels must be None or a list of {len(pictures)} "
                             f"strings (one per image), got {labels!r}")
    height = pictures[0].shape[0]
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    band = 0
    if labels is not None:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        band = max(probe.textbbox((0, 0), s or " ", font=font)[3] for s in labels) + 4
    out = np.full((band + height, width, 3), 255, dtype=np.uint8)
    x = 0
    for picture in pictures:
        out[band:, x:x + picture.shape[1]] = picture
        x += picture.shape[1] + gap
    if labels is not None:
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        x = 0
        for picture, label in zip(pictures, labels):
            draw.text((x + 2, 1), label, fill=(0, 0, 0), font=font)
            x += picture.shape[1] + gap
        out = np.asarray(canvas).copy()
    return out


def plot_curves(records, path, *, x: str = "step", keys=("loss",), title: str | None = None,
                ) -> str:
    """Training curves as a PNG (matplotlib, Agg canvas; no pyplot state); returns the path.

    ``records``: a list of dicts, e.g. ``{"step": 100, "loss": 0.4, "miou": 0.6}``. ``keys``: the
    subplots, one per item: a key (``"loss"``) or a group of keys drawn together
    (``("loss", "val_loss")``). Each curve uses the records that have both ``x`` and its key
    (with a value that is not None); a subplot with no such record says so.
    """
    where = "plot_curves"
    if not isinstance(records, (list, tuple)) or not all(isinstance(r, dict) for r in records):
        raise TypeError(f"{where}: records must be a list of dicts, got "
                        f"{type(records).__name__}")
    if not isinstance(x, str):
        raise TypeError(f"{where}: x must be a key (str), got {x!r}")
    if isinstance(keys, str):
        keys = (keys,)
    groups = []
    for group in keys:
        group = (group,) if isinstance(group, str) else tuple(group)
        if not group or not all(isinstance(k, str) for k in group):
            raise ValueError(f"{where}: keys must be keys (str) or groups of keys, got {keys!r}")
        groups.append(group)
    if not groups:
        raise ValueError(f"{where}: keys must name at least one key")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3 * len(groups)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, group in zip(axes, groups):
        drawn = False
        for key in group:
            points = [(r[x], r[key]) for r in records
                      if r.get(x) is not None and r.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            try:
                ax.plot(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64),
                        label=key)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: the values of {x!r} and {key!r} must be numbers") \
                    from None
            drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no records with {x!r} and {', '.join(map(repr, group))}",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(x)
        ax.set_ylabel(" / ".join(group))
        ax.grid(True, alpha=0.3)
    if title is not None:
        figure.suptitle(str(title))
    figure.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, format="png")
    return path
