"""Argument checks shared by the public ops: each error names the argument and what was
expected."""

from __future__ import annotations

import torch


def tensor4d(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(value.shape)}")
    return value


def like(op: str, name: str, value: torch.Tensor, x: torch.Tensor) -> None:
    """value is on x's device with x's dtype."""
    if value.device != x.device:
        raise ValueError(f"{op}: {name} is on {value.device} but x is on {x.device}")
    if value.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {value.dtype} but x has {x.dtype}; "
                        "convert one of them")


def int_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum."""
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if (len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items)):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        what = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return items


def float_pair(op: str, name: str, value) -> tuple[float, float]:
    """A positive number or a pair of them."""
    items = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise TypeError(f"{op}: {name} must be a number or a pair of numbers, got {value!r}")
    if not all(v > 0 and v != float("inf") for v in items):
        raise ValueError(f"{op}: {name} must be positive and finite, got {value!r}")
    return float(items[0]), float(items[1])


def skip_window(op: str, skip, x: torch.Tensor, offset, out_size) -> tuple[int, int]:
    """Checks that skip[:, :, oy:oy + Ho, ox:ox + Wo] exists; returns the offset."""
    offset = int_pair(op, "skip_offset", offset, 0)
    if skip is None:
        return offset
    tensor4d(op, "skip", skip)
    like(op, "skip", skip, x)
    if skip.shape[:2] != x.shape[:2]:
        raise ValueError(f"{op}: skip has (N, C) = {tuple(skip.shape[:2])} but x has "
                         f"{tuple(x.shape[:2])}: the skip scores must have x's batch and channels")
    need = (offset[0] + out_size[0], offset[1] + out_size[1])
    if skip.shape[2] < need[0] or skip.shape[3] < need[1]:
        raise ValueError(f"{op}: skip of spatial size {tuple(skip.shape[2:])} is too small for an "
                         f"output of {tuple(out_size)} at skip_offset {offset}: needs at least {need}")
    return offset


def channels_last_output(x: torch.Tensor) -> bool:
    """The memory format the kernels write (the same rule in C++, CUDA and Triton)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def empty_like_format(reference: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if channels_last_output(reference) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or reference.dtype, device=reference.device,
                       memory_format=fmt)


def paste(grad: torch.Tensor, shape, offset, channels_last: bool) -> torch.Tensor:
    """The gradient of skip[:, :, oy:oy + Ho, ox:ox + Wo]: grad inside, zeros elsewhere."""
    if tuple(shape) == tuple(grad.shape):
        return grad
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=fmt).zero_()
    oy, ox = offset
    out[:, :, oy:oy + grad.shape[2], ox:ox + grad.shape[3]].copy_(grad)
    return out


# Whether autocast exists for a device type, asked once per type: torch.compile (Dynamo)
# of torch 2.11 cannot trace torch.amp.is_autocast_available (a graph break in every model),
# but reads this dict, filled at import for the device types fastseg's ops meet.
_AUTOCAST_AVAILABLE = {device_type: torch.amp.is_autocast_available(device_type)
                       for device_type in ("cpu", "cuda", "meta")}


def autocast_inputs(device_type: str, *tensors):
    """The tensors as an autocast region would give them to a convolution: floating-point
    ones other than float64 cast to the region's dtype (None and the rest untouched); as they
    are outside autocast."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:  # another device type: asked here, once
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    if not (available and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)
