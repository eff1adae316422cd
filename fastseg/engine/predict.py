"""Whole-image inference for fastseg's U-Net and FCN, tiled to a memory budget.

    predict_logits(model, image, *, mean, std, tile=None, max_pixels=None, halo=None,
                   device=None, dtype=None) -> (num_classes, H, W) logits
    predict_mask(...)                          -> (H, W) int64 class ids (argmax)
    predict_probability(model, image, class_index, ...) -> (H, W) softmax probability
    max_pixels_for_memory(model, memory_mib=DEFAULT_MEMORY_MIB, *, dtype=None) -> int

``image`` is one (C, H, W) tensor with values in [0, 1], any H, W >= 1; it is normalized as
``(image - mean) / std`` per channel and run with ``model.eval()`` under
``torch.inference_mode()`` (the model's training flag is restored afterwards).

How each network is run:

- **Valid (unpadded) U-Net** - the paper's overlap-tile strategy. The image is mirror-padded
  by the network's context margin ``m`` (its output is ``2m`` smaller than its input) with
  ``reflect`` mirroring: the border pixel is the mirror axis and is not repeated, as
  ``np.pad(mode="reflect")``; a pad larger than the image keeps reflecting (the image
  extended periodically by its mirror image). The *untiled reference* is one model call on the
  image padded by ``m`` at the top/left and by ``m`` plus the few rows/columns ``e`` that make
  the size valid at the bottom/right, its output cropped to H x W. Tiles reproduce it exactly:
  each tile's output origin is a multiple of ``2**(depth-1)`` (the deepest pooling grid; a
  shifted grid pools different pixel pairs), the last tile of a row/column ends where the
  reference's output ends (H + e, so its origin is aligned too), and each tile is fed its
  ``t + 2m`` input window of the same padded image. When the padded image fits the budget the
  single tile *is* the reference call. With ``up_mode="bilinear"`` the interpolation clamps at
  a map's edge, which alters the ``2**(depth-1) - 1`` outermost output pixels of a tile; tiles
  then overlap and drop that band at inner seams, so the result stays exact.
- **Same-padded U-Net and FCN** run the whole image in one call when it fits. Otherwise they
  are tiled with a *halo*: overlapping windows of the image whose outer ``halo`` pixels are
  dropped at inner seams (windows never reach past the image, where these networks zero-pad).
  Window origins are multiples of the network's stride (``2**(depth-1)``, FCN 32) so the
  pooling grids agree. This is *approximate*: near a seam the window's zero padding replaces
  real context. It is exact where the halo covers the receptive field: the same-padded U-Net's
  default halo is its receptive-field radius (computed from the layer geometry, rounded up to
  the stride), so deconv same U-Nets are exact too. In bilinear mode an odd-sized map is not
  upsampled by exactly 2, so the tiles' sampling differs from the whole image's: approximate.
  FCN's receptive field (~400 px) is too wide to cover, its default halo is 128 px (4 strides):
  approximate at seams.

Memory: ``max_pixels`` is the largest tile *input* area (pixels) run in one call; tiles are
chosen as large as that allows (fewest tiles, then least computation). The default comes from
``DEFAULT_MEMORY_MIB`` through :func:`max_pixels_for_memory`, a rough per-model estimate of the
activation bytes per input pixel (see there). Tiles run one at a time (no batching: the budget
is per call).

The result is on the CPU, float32 (float64 when the model's parameters are float64, so a
float64 comparison keeps its precision).
"""

from __future__ import annotations

import bisect
import contextlib
import math
from numbers import Real

import torch
from torch import nn

from fastseg.data.transforms import mirror_pad
from fastseg.models.fcn import FCN
from fastseg.models.unet import UNet, unet_output_size, unet_valid_input_size

__all__ = ["DEFAULT_MEMORY_MIB", "FCN_DEFAULT_HALO", "max_pixels_for_memory", "predict_logits",
           "predict_mask", "predict_probability"]

DEFAULT_MEMORY_MIB = 1024
FCN_DEFAULT_HALO = 128
FCN_STRIDE = 32          # five 2x2 stride-2 pools
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


# --- argument checks -------------------------------------------------------------------------

def _check_model(where: str, model) -> None:
    if not isinstance(model, (UNet, FCN)):
        raise TypeError(f"{where}: model must be a fastseg.models UNet or FCN (its geometry "
                        f"decides the tiling), got {type(model).__name__}")


def _positive_int(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int >= 1, got {type(value).__name__} "
                        f"{value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
    return value


def _pair(where: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where}: {name} must be an int or a pair of ints (h, w), got "
                        f"{value!r}")
    return _positive_int(where, name, value[0]), _positive_int(where, name, value[1])


def _channel_values(where: str, name: str, value, channels: int) -> list[float]:
    """mean / std: one number per channel (a single number is used for every channel)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten().tolist()
    if isinstance(value, Real) and not isinstance(value, bool):
        value = [value] * channels
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a sequence of {channels} numbers (one per "
                        f"channel), got {value!r}") from None
    if len(values) != channels:
        raise ValueError(f"{where}: {name} must have one value per channel ({channels}), got "
                         f"{len(values)}: {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: {name} must be finite, got {values}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"{where}: std must be > 0, got {values}")
    return values


def _check_image(where: str, image, channels: int) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where}: image must be a torch.Tensor (C, H, W), got "
                        f"{type(image).__name__}")
    if image.dim() != 3:
        raise ValueError(f"{where}: image must be 3-D (C, H, W), got shape {tuple(image.shape)}")
    if not image.dtype.is_floating_point:
        raise TypeError(f"{where}: image must be a floating-point tensor with values in [0, 1], "
                        f"got {image.dtype} (divide uint8 images by 255)")
    if image.shape[0] != channels:
        raise ValueError(f"{where}: image has {image.shape[0]} channels but the model takes "
                         f"in_channels={channels} (image shape {tuple(image.shape)})")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{where}: image is empty (shape {tuple(image.shape)}); H and W must "
                         "be >= 1")
    # values outside [0, 1] usually mean an unscaled image: normalizing it would be wrong
    low, high = image.min().item(), image.max().item()
    if not (0.0 <= low and high <= 1.0):  # also false for NaN
        raise ValueError(f"{where}: image values must lie in [0, 1], got min {low}, max {high}")


def _resolve_device(where: str, model: nn.Module, device) -> torch.device:
    param = next(model.parameters())
    if device is None:
        return param.device
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: device must be a torch.device or a device string, got "
                         f"{device!r} ({error})") from None


def _check_dtype(where: str, dtype):
    if dtype is not None and dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"{where}: dtype (the autocast dtype) must be None, torch.float16 or "
                         f"torch.bfloat16, got {dtype!r}")
    return dtype


# --- network geometry ------------------------------------------------------------------------

def _unet_margin(depth: int) -> int:
    """m: the valid U-Net's output is 2m smaller than its (valid) input."""
    first = unet_valid_input_size(1, depth)
    margin = first - unet_output_size(first, depth)
    return margin // 2


def _same_unet_radius(depth: int, up_mode: str) -> int:
    """How far (input pixels) the same-padded U-Net's output pixel reads, at worst.

    Dependencies are followed backwards as intervals of positions at each level (level l's
    pixel r covers input pixels 2**l r .. 2**l r + 2**l - 1): a 3x3 convolution widens an
    interval by 1 on each side, a pool maps [a, b] at level l+1 to [2a, 2b+1] at level l, an
    up-sampling maps [a, b] at level l to [floor(a/2), floor(b/2)] at level l+1 (the kernel-2
    stride-2 deconvolution) or one more on each side (bilinear reads two neighbours)."""
    extra = 1 if up_mode == "bilinear" else 0

    def encoder(level: int, a: int, b: int) -> tuple[int, int]:
        a, b = a - 2, b + 2  # the level's two 3x3 convolutions
        if level == 0:
            return a, b
        return encoder(level - 1, 2 * a, 2 * b + 1)  # through the pool from level - 1

    def decoder(level: int, a: int, b: int) -> tuple[int, int]:
        if level == depth - 1:
            return encoder(level, a, b)  # the bottom: the encoder's deepest output
        a, b = a - 2, b + 2  # conv2, then conv1 over the concatenation
        skip = encoder(level, a, b)
        below = decoder(level + 1, a // 2 - extra, b // 2 + extra)
        return min(skip[0], below[0]), max(skip[1], below[1])

    radius = 0
    for y in range(2 ** (depth - 1)):  # one period of the pooling grid
        a, b = decoder(0, y, y)
        radius = max(radius, y - a, b - y)
    return radius


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --- the tiling ------------------------------------------------------------------------------

class _Axis:
    """Tiling of one axis: windows of size ``t`` in a coordinate range [0, end) with origins
    that are multiples of ``align``; neighbours overlap so that each drops ``band`` pixels at
    an inner seam. ``length`` (<= end) pixels are kept. ``extra`` is added to a window's size
    to get the model's input size (2m for the valid U-Net, 0 otherwise)."""

    def __init__(self, length: int, end: int, align: int, band: int, extra: int) -> None:
        self.length, self.end, self.align, self.band, self.extra = length, end, align, band, extra

    def stride(self, t: int) -> int:
        return (t - 2 * self.band) // self.align * self.align

    def origins(self, t: int) -> list[int]:
        if t >= self.end:
            return [0]
        last = _round_up(self.end - t, self.align)  # shifted back to end at the border
        return list(range(0, last, self.stride(t))) + [last]

    def count(self, t: int) -> int:
        """len(self.origins(t)), without building the list."""
        if t >= self.end:
            return 1
        return -(-_round_up(self.end - t, self.align) // self.stride(t)) + 1

    def extent(self, t: int) -> int:
        """The model's input size for a window of size t."""
        return min(t, self.end) + self.extra

    def plan(self, t: int) -> list[tuple[int, int, int, int]]:
        """(window start, window stop, keep start, keep stop) per tile, in window
        coordinates (= output coordinates)."""
        starts = self.origins(t)
        keeps = [0] + [o + self.band for o in starts[1:]] + [self.length]
        return [(o, min(o + t, self.end), keeps[i], keeps[i + 1]) for i, o in enumerate(starts)]


def _axis_candidates(axis: _Axis, sizes) -> list[tuple[int, int, int]]:
    """(input extent, tile count, t) for the window sizes `sizes`: the ones worth choosing
    (no smaller extent gives as few tiles), sorted by extent, so counts fall as extents grow."""
    entries = sorted((axis.extent(t), axis.count(t), t) for t in sizes)
    out: list[tuple[int, int, int]] = []
    for entry in entries:
        if not out or entry[1] < out[-1][1]:
            out.append(entry)
    return out


def _choose_tiles(where: str, axes: tuple[_Axis, _Axis], sizes, max_pixels: int,
                  ) -> tuple[int, int]:
    """The window sizes (th, tw) of the fewest tiles whose input area fits max_pixels (ties:
    the least total input area)."""
    cand_h = _axis_candidates(axes[0], sizes[0])
    cand_w = _axis_candidates(axes[1], sizes[1])
    extents_w = [c[0] for c in cand_w]
    best = None
    for ext_h, n_h, t_h in cand_h:
        # the largest width window that fits next to this height (counts fall as extents grow)
        i = bisect.bisect_right(extents_w, max_pixels // ext_h) - 1
        if i < 0:
            continue
        ext_w, n_w, t_w = cand_w[i]
        key = (n_h * n_w, n_h * n_w * ext_h * ext_w)
        if best is None or key < best[0]:
            best = (key, (t_h, t_w))
    if best is None:
        smallest = cand_h[0][0] * cand_w[0][0]
        raise ValueError(f"{where}: max_pixels={max_pixels} is too small: the smallest tile "
                         f"this model can run on this image takes {cand_h[0][0]} x "
                         f"{cand_w[0][0]} = {smallest} input pixels")
    return best[1]


def _forced_tile(where: str, sizes: list[int], tile: int, name: str) -> int:
    """The largest allowed window size <= the requested one."""
    fitting = [t for t in sizes if t <= max(tile, 0)]
    if not fitting:
        raise ValueError(f"{where}: tile {name} {tile} is too small for this model; the "
                         f"smallest is {min(sizes)}")
    return max(fitting)


# --- memory estimate -------------------------------------------------------------------------

def max_pixels_for_memory(model, memory_mib: float = DEFAULT_MEMORY_MIB, *,
                          dtype: torch.dtype | None = None) -> int:
    """The tile input area (pixels) that keeps one forward call near ``memory_mib`` MiB.

    A rough estimate of the activations alive at the peak of an inference call, per input
    pixel, times the element size (the autocast ``dtype``'s, else the parameters'):

    - U-Net: every skip map kept for the decoder (level l: ``c_l / 4**l`` values per input
      pixel) plus about four maps of the top level's ``c_0`` channels in flight (a
      convolution's input and output, the up-sampled map and the concatenation), plus the
      scores;
    - FCN: about three maps of the first block's width in flight, doubled for the 100-pixel
      padding of conv1_1 (a 500 x 500 tile runs at 698 x 698), plus a few score maps.

    Weights and library workspaces are not counted; lower the budget (or give ``max_pixels``)
    if a device runs out of memory.
    """
    where = "max_pixels_for_memory"
    _check_model(where, model)
    if isinstance(memory_mib, bool) or not isinstance(memory_mib, Real) or not (
            math.isfinite(memory_mib) and memory_mib > 0):
        raise ValueError(f"{where}: memory_mib must be a finite number > 0, got {memory_mib!r}")
    _check_dtype(where, dtype)
    element = (dtype if dtype is not None else next(model.parameters()).dtype).itemsize
    if isinstance(model, UNet):
        skips = sum(c / 4 ** level for level, c in enumerate(model.channels))
        values = skips + 4 * model.channels[0] + model.num_classes
    else:
        first = model.conv1_1.out_channels
        values = 2 * (3 * first) + 4 * model.num_classes
    return max(1, int(memory_mib * 2 ** 20 / (values * element)))


# --- inference -------------------------------------------------------------------------------

def _plan(where: str, model, height: int, width: int, tile, max_pixels, halo, dtype):
    """The tiling: (image padding (top, bottom, left, right), row plan, column plan, how much
    larger a model input is than its window: 2m for the valid U-Net, else 0)."""
    if isinstance(model, UNet) and model.padding == "valid":
        if halo is not None:
            raise ValueError(f"{where}: halo applies to same-padded U-Nets and FCNs; the valid "
                             "U-Net's overlap-tile inference is exact without one (halo=None)")
        depth, margin = model.depth, _unet_margin(model.depth)
        align = 2 ** (depth - 1)
        band = align - 1 if model.up_mode == "bilinear" else 0
        ends = [unet_valid_input_size(n + 2 * margin, depth) - 2 * margin
                for n in (height, width)]
        axes = tuple(_Axis(n, end, align, band, 2 * margin) for n, end in zip((height, width),
                                                                            ends))
        smallest = unet_valid_input_size(1, depth) - 2 * margin
        # valid output sizes (smallest + k align); more than one tile needs a stride of at
        # least one grid step
        sizes = [[t for t in range(smallest, ax.end + 1, align)
                  if t == ax.end or ax.stride(t) >= align] for ax in axes]
        padding = (margin, ends[0] - height + margin, margin, ends[1] - width + margin)
    else:
        if isinstance(model, UNet):
            align = 2 ** (model.depth - 1)
            default = _round_up(_same_unet_radius(model.depth, model.up_mode), align)
        else:
            align, default = FCN_STRIDE, FCN_DEFAULT_HALO
        if halo is None:
            halo = default
        elif isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"{where}: halo must be an int >= 0 (pixels), got {halo!r}")
        halo = _round_up(halo, align)  # seams on the pooling grid
        axes = tuple(_Axis(n, n, align, halo, 0) for n in (height, width))
        # the whole axis, or windows whose kept core is a multiple of the stride
        sizes = [sorted({ax.end} | set(range(2 * halo + align, ax.end, align))) for ax in axes]
        padding = (0, 0, 0, 0)

    if tile is not None:
        tile = _pair(where, "tile", tile)
        chosen = tuple(_forced_tile(where, s, t, name)
                       for s, t, name in zip(sizes, tile, ("height", "width")))
        area = axes[0].extent(chosen[0]) * axes[1].extent(chosen[1])
        if max_pixels is not None and area > max_pixels:
            raise ValueError(f"{where}: tile {tile} needs {area} input pixels per call, more "
                             f"than max_pixels={max_pixels}")
    else:
        if max_pixels is None:
            max_pixels = max_pixels_for_memory(model, dtype=dtype)
        chosen = _choose_tiles(where, axes, sizes, max_pixels)
    return padding, axes[0].plan(chosen[0]), axes[1].plan(chosen[1]), axes[0].extra


def predict_logits(model: nn.Module, image: torch.Tensor, *, mean, std, tile=None,
                   max_pixels: int | None = None, halo: int | None = None, device=None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's class scores for one image of any size, tiled to a memory budget.

    Args:
        model: a ``fastseg.models`` UNet (valid or same padding) or FCN; it is moved to
            ``device`` when one is given (``nn.Module.to``, in place) and run in eval mode.
        image: (C, H, W) floating-point tensor, values in [0, 1], C = ``model.in_channels``,
            H, W >= 1.
        mean, std: per-channel normalization (sequences of C numbers; a single number serves
            every channel): the model sees ``(image - mean) / std``.
        tile: force the tile size instead of choosing it from the budget: an int or (h, w),
            the output pixels per tile (for same-padded U-Nets and FCNs, the window including
            its halo), rounded down to the nearest size the network allows.
        max_pixels: the largest tile input area (pixels) to run in one call; default
            ``max_pixels_for_memory(model, DEFAULT_MEMORY_MIB, dtype=dtype)``.
        halo: same-padded U-Net and FCN only: pixels of context dropped at each inner tile
            seam, rounded up to a multiple of the stride; default the same U-Net's receptive
            radius (exact), FCN 128 (approximate). See the module docstring.
        device: where the model runs (default: where its parameters are).
        dtype: autocast dtype (torch.float16 / torch.bfloat16), or None: the parameters' dtype.

    Returns (num_classes, H, W) logits on the CPU, float32 (float64 for a float64 model).
    Raises TypeError / ValueError naming the argument for a wrong model, image, normalization,
    tile, halo or a budget below the smallest tile.
    """
    where = "predict_logits"
    _check_model(where, model)
    _check_image(where, image, model.in_channels)
    mean_values = _channel_values(where, "mean", mean, model.in_channels)
    std_values = _channel_values(where, "std", std, model.in_channels)
    if max_pixels is not None:
        _positive_int(where, "max_pixels", max_pixels)
    dtype = _check_dtype(where, dtype)
    device = _resolve_device(where, model, device)
    _, height, width = image.shape
    padding, rows, cols, extra = _plan(where, model, height, width, tile, max_pixels, halo,
                                       dtype)

    param_dtype = next(model.parameters()).dtype
    out_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    work_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = image.to(device=device, dtype=work_dtype)
            shape = (-1, 1, 1)
            x = (x - torch.tensor(mean_values, dtype=work_dtype, device=device).view(shape)) \
                / torch.tensor(std_values, dtype=work_dtype, device=device).view(shape)
            if any(padding):
                x = mirror_pad(x, *padding)
            x = x.to(param_dtype)
            result = torch.empty((model.num_classes, height, width), dtype=out_dtype)
            for r0, r1, keep_r0, keep_r1 in rows:
                for c0, c1, keep_c0, keep_c1 in cols:
                    # output pixel j of a window starting at o is output coordinate o + j
                    # (for the valid U-Net the input window is `extra` = 2m larger)
                    window = x[:, r0:r1 + extra, c0:c1 + extra]
                    with (torch.autocast(device.type, dtype=dtype) if dtype is not None
                          else contextlib.nullcontext()):
                        scores = model(window.unsqueeze(0))[0]
                    result[:, keep_r0:keep_r1, keep_c0:keep_c1] = scores[
                        :, keep_r0 - r0:keep_r1 - r0, keep_c0 - c0:keep_c1 - c0].to(
                            device="cpu", dtype=out_dtype)
    finally:
        model.train(was_training)
    return result


def predict_mask(model: nn.Module, image: torch.Tensor, **kwargs) -> torch.Tensor:
    """The predicted class of every pixel: ``predict_logits(model, image, **kwargs)``'s
    argmax over the classes, an (H, W) int64 tensor (ties: the lowest class)."""
    return predict_logits(model, image, **kwargs).argmax(dim=0)


def predict_probability(model: nn.Module, image: torch.Tensor, class_index: int,
                        **kwargs) -> torch.Tensor:
    """The softmax probability of class ``class_index`` at every pixel, (H, W), from
    ``predict_logits(model, image, **kwargs)`` (same dtype)."""
    where = "predict_probability"
    _check_model(where, model)
    if isinstance(class_index, bool) or not isinstance(class_index, int):
        raise TypeError(f"{where}: class_index must be an int, got "
                        f"{type(class_index).__name__} {class_index!r}")
    if not 0 <= class_index < model.num_classes:
        raise ValueError(f"{where}: class_index must be in [0, {model.num_classes}) (the "
                         f"model's num_classes), got {class_index}")
    logits = predict_logits(model, image, **kwargs)
    return torch.softmax(logits, dim=0)[class_index]
