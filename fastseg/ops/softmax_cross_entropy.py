"""fastseg.ops.softmax_cross_entropy: F.cross_entropy fused for NCHW segmentation logits.

The public function checks its arguments, picks a backend, reshapes the logits to a
(B, C, S) view (never a copy for NCHW, channels_last or (N, C) logits) and calls the
backend's forward op. The forward saves only the per-pixel logsumexp (as max and log-sum,
float32, O(N*H*W)); the
backward is one more pass over the logits that writes the gradient. (A single pass that
writes the gradient during the forward would need a second full-size pass to apply
grad_output, or a full-size buffer kept alive until backward; two passes read the logits
twice but keep peak memory at logits + gradient.)
"""

from __future__ import annotations

import math
import os

import torch

from fastseg import _backend
from fastseg.ops import _reference
from fastseg.ops._autograd import register_cross_entropy_autograd

_REDUCTIONS = _reference.REDUCTIONS
_TARGET_DTYPES = (torch.uint8, torch.int32, torch.int64)
_FUSED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def softmax_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    pixel_weight: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Exactly ``F.cross_entropy(input, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...)``, fused, plus an optional per-pixel weight map.

    Args:
        input: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``, float32/float16/bfloat16 (and
            float64 on the CPU). NCHW, channels_last and (N, C) layouts are read in place.
        target: class ids ``(N,)`` / ``(N, d1, ..., dk)`` as uint8, int32 or int64, each in
            ``[0, C)`` or equal to ``ignore_index``. Float targets of the input's shape are
            class probabilities (served by the reference backend).
        weight: optional ``(C,)`` class weights.
        pixel_weight: optional ``(N, d1, ..., dk)`` map multiplying each pixel's loss (U-Net's
            border weights); with ``reduction="mean"`` the denominator becomes
            ``sum(weight[target] * pixel_weight)`` over non-ignored pixels.
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference".

    A target id outside ``[0, C)`` that is not ``ignore_index`` raises ValueError on the CPU;
    on CUDA it gives NaN for that pixel and a device-side assertion that surfaces at the next
    synchronization (as in torch's own nll_loss). No backend reads out of bounds.
    """
    input, target, squeeze = _check(input, target, weight, ignore_index, reduction,
                                    label_smoothing, pixel_weight)
    name = OP.select(backend, input.device.type, input, target, weight, pixel_weight)
    if name == "reference":
        loss = _reference.softmax_cross_entropy(input, target, weight, ignore_index, reduction,
                                                label_smoothing, pixel_weight)
        return loss.squeeze(0) if squeeze and reduction == "none" else loss
    logits, ids, pixel_map, acc_dtype = _as_pixels(input, target, pixel_weight)
    class_weight = None if weight is None else weight.to(acc_dtype).contiguous()
    forward = _forward_op(name)
    loss, _, _ = forward(logits, ids, class_weight, pixel_map, int(ignore_index),
                         _REDUCTIONS[reduction], float(label_smoothing))
    if reduction == "none":
        loss = loss.view(target.shape)
        if squeeze:
            loss = loss.squeeze(0)
    return loss


# --- argument checks -----------------------------------------------------------------------

def _check(input, target, weight, ignore_index, reduction, label_smoothing, pixel_weight):
    name = "softmax_cross_entropy"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: target must be a Tensor, got {type(target).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"{name}: input must be a floating-point tensor of logits, got {input.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{name}: label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    squeeze = False
    if input.dim() == 1:  # unbatched (C,) logits with a 0-d target, as F.cross_entropy allows
        input, target, squeeze = input.unsqueeze(0), target.unsqueeze(0), True
        if pixel_weight is not None:
            pixel_weight = pixel_weight.unsqueeze(0)
    if input.dim() < 2:
        raise ValueError(f"{name}: input must be (N, C) or (N, C, d1, ...), got shape {tuple(input.shape)}")
    classes = input.shape[1]
    if classes == 0:
        raise ValueError(f"{name}: input has 0 classes (shape {tuple(input.shape)})")
    if target.device != input.device:
        raise ValueError(f"{name}: target is on {target.device} but input is on {input.device}")
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"{name}: class-probability target must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype not in _TARGET_DTYPES:
            raise TypeError(f"{name}: target must be uint8, int32 or int64 class ids (or float "
                            f"class probabilities), got {target.dtype}")
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"{name}: target shape {tuple(target.shape)} does not match input "
                             f"shape {tuple(input.shape)}: expected {expected}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError(f"{name}: weight must be a floating-point Tensor of shape ({classes},)")
        if tuple(weight.shape) != (classes,):
            raise ValueError(f"{name}: weight must have shape ({classes},) for {classes} classes, "
                             f"got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"{name}: weight is on {weight.device} but input is on {input.device}")
    if pixel_weight is not None:
        if not isinstance(pixel_weight, torch.Tensor) or not pixel_weight.dtype.is_floating_point:
            raise TypeError(f"{name}: pixel_weight must be a floating-point Tensor")
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(pixel_weight.shape) != expected:
            raise ValueError(f"{name}: pixel_weight shape {tuple(pixel_weight.shape)} does not match "
                             f"input shape {tuple(input.shape)}: expected {expected}")
        if pixel_weight.device != input.device:
            raise ValueError(f"{name}: pixel_weight is on {pixel_weight.device} but input is on "
                             f"{input.device}")
    return input, target, squeeze


def _as_pixels(input, target, pixel_weight):
    """(B, C, S) logits view, (B, S) contiguous targets and pixel weights, accumulation dtype."""
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    batch, classes = input.shape[0], input.shape[1]
    pixels = math.prod(input.shape[2:])  # explicit, not -1: empty inputs have no unique -1
    if input.dim() == 2:  # (N, C): the N samples are the pixels of one image
        logits = input.t().unsqueeze(0)
        batch, pixels = 1, input.shape[0]
    elif _spatial_is_mergeable(input):
        logits = input.view(batch, classes, pixels)
    else:
        # Spatial dims that no single stride can walk (e.g. a strided slice of H and W):
        # one copy, made here where it is visible, rather than a slower generic kernel.
        logits = input.reshape(batch, classes, pixels)
    ids = target.reshape(batch, pixels).contiguous()
    pixel_map = None
    if pixel_weight is not None:
        pixel_map = pixel_weight.to(acc_dtype).reshape(batch, pixels).contiguous()
    return logits, ids, pixel_map, acc_dtype


def _spatial_is_mergeable(input) -> bool:
    sizes, strides = input.shape[2:], input.stride()[2:]
    for i in range(len(sizes) - 1):
        if sizes[i] != 1 and sizes[i + 1] != 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            return False
    return True


# --- backends ----------------------------------------------------------------------------

def _common_reasons(target, pixel_weight) -> list[str]:
    reasons = []
    if target.dtype.is_floating_point:
        reasons.append("class-probability (float) targets are served by the reference backend")
    if pixel_weight is not None and pixel_weight.requires_grad:
        reasons.append("pixel_weight requires grad; the fused kernels give no gradient for it")
    return reasons


def _extension_reasons(device_type, input, target, pixel_weight) -> list[str]:
    reasons = []
    err = _backend.extension_error() if device_type == "cpu" else _backend.cuda_kernels_error()
    if err:
        reasons.append(err)
    if input.device.type != device_type:
        reasons.append(f"input is on {input.device.type}, the {device_type} backend needs "
                       f"{device_type} tensors")
    elif input.dtype not in _FUSED_DTYPES[device_type]:
        reasons.append(f"{input.dtype} logits are not supported on {device_type}")
    return reasons + _common_reasons(target, pixel_weight)


def _cpu_reasons(input, target, weight=None, pixel_weight=None):
    return _extension_reasons("cpu", input, target, pixel_weight)


def _cuda_reasons(input, target, weight=None, pixel_weight=None):
    return _extension_reasons("cuda", input, target, pixel_weight)


def _triton_reasons(input, target, weight=None, pixel_weight=None):
    if input.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # Not importing triton here keeps `import fastseg` fast on CPU-only machines (its ops
        # pull in torch._inductor: about 2 s).
        return [f"input is on {input.device.type}: the triton backend needs CUDA tensors "
                "(CPU tensors only under TRITON_INTERPRET=1, for tests)"]
    try:
        from fastseg.triton import softmax_cross_entropy as triton_ce
    except ImportError as e:  # the module itself guards a missing triton; this is a broken one
        return [f"fastseg.triton failed to import ({e})"]
    return triton_ce.not_supported_reasons(input, target) + _common_reasons(target, pixel_weight)


def _reference_reasons(input, target, weight=None, pixel_weight=None):
    return []


# auto's preference. CUDA: the CUDA C++ kernel first - it has no JIT warm-up and no triton
# dependency; the GPU benchmark (scripts/gpu_check.sh) is what should reorder these.
# CPU: the C++ kernel; Triton on CPU tensors is the interpreter, only for tests, so never auto.
OP = _backend.register_op(_backend.OpBackends(
    op="softmax_cross_entropy",
    auto_order={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
))
OP.register("cuda", _cuda_reasons)
OP.register("triton", _triton_reasons)
OP.register("cpu", _cpu_reasons)
OP.register("reference", _reference_reasons)


def _forward_op(name):
    if name == "triton":
        from fastseg.triton import softmax_cross_entropy as triton_ce
        return triton_ce.forward
    return torch.ops.fastseg.softmax_cross_entropy_forward


# --- torch.library: fake implementations and autograd --------------------------------------

def _register_extension_ops() -> None:
    if _backend.extension_error() is not None:
        return

    @torch.library.register_fake("fastseg::softmax_cross_entropy_forward")
    def _(input, target, weight, pixel_weight, ignore_index, reduction, label_smoothing):
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        loss = (input.new_empty(target.shape) if reduction == _REDUCTIONS["none"]
                else input.new_empty(()))
        lse = input.new_empty((2,) + tuple(target.shape), dtype=acc)
        return loss, lse, input.new_empty((), dtype=acc)

    @torch.library.register_fake("fastseg::softmax_cross_entropy_backward")
    def _(grad_output, input, target, lse, total_weight, weight, pixel_weight, ignore_index,
          reduction, label_smoothing):
        return torch.empty_like(input)

    register_cross_entropy_autograd("fastseg::softmax_cross_entropy_forward",
                                    torch.ops.fastseg.softmax_cross_entropy_backward)


_register_extension_ops()
if torch.cuda.is_available():
    # With a GPU, register the Triton ops (and their autograd) now rather than on first use,
    # which may happen inside a torch.compile trace.
    try:
        from fastseg.triton import softmax_cross_entropy as _triton_ce  # noqa: F401
    except ImportError:  # reported by _triton_reasons
        pass
