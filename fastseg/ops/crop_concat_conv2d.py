"""fastseg.ops.crop_concat_conv2d: U-Net's crop + concat + convolution, never materializing
the crop or the concatenation.

    crop_concat_conv2d(skip, x, weight, bias, padding, activation)
      == act(F.conv2d(torch.cat([center_crop(skip, x.shape[-2:]), x], 1), weight, bias,
                      padding=padding))

A convolution is linear in its input channels, so the fused kernels read the two sources
directly: the crop is an offset into the skip, and the reduction over input channels is split
between the skip's window (weight[:, :Cs]) and x (weight[:, Cs:]). The backward writes the
skip's gradient into its crop window (zero elsewhere) and x's directly, and the ReLU mask is
read from the saved output.
"""

from __future__ import annotations

import torch

from fastseg import _backend
from fastseg.ops import _checks, _reference
from fastseg.ops._autograd import register_fused_op

_OP = "crop_concat_conv2d"
_ACTIVATIONS = {None: 0, "relu": 1}
_CPU_DTYPES = (torch.float32, torch.float64)


def crop_concat_conv2d(
    skip: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 0,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(F.conv2d(torch.cat([center_crop(skip, x.shape[-2:]), x], 1), weight, bias,
    padding=padding))``, fused.

    Args:
        skip: the encoder map ``(N, Cs, Hs, Ws)``, at least x's spatial size; it is cropped at
            its center, offset ``((Hs - H) // 2, (Ws - W) // 2)`` (floor for odd differences).
        x: the up-convolved decoder map ``(N, Cx, H, W)``, skip's dtype and device.
        weight: ``(Cout, Cs + Cx, k, k)`` with k = 3 or 1 (the skip's channels first, as in
            the concatenation); bias: optional ``(Cout,)``.
        padding: 0 (valid, the original U-Net) or 1 (same, for 3x3); stride 1.
        activation: None or "relu".
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference".

    Under autocast the inputs are cast as for ``F.conv2d`` (to the region's dtype; float64
    left alone).
    """
    if isinstance(x, torch.Tensor):
        skip, x, weight, bias = _checks.autocast_inputs(x.device.type, skip, x, weight, bias)
    _check(skip, x, weight, bias, padding, activation)
    name = OP.select(backend, x.device.type, skip, x, weight)
    if name == "reference":
        return _reference.crop_concat_conv2d(skip, x, weight, bias, padding, activation)
    return _forward_op(name)(skip, x, weight, bias, padding, _ACTIVATIONS[activation])


def _check(skip, x, weight, bias, padding, activation) -> None:
    skip = _checks.tensor4d(_OP, "skip", skip)
    x = _checks.tensor4d(_OP, "x", x)
    _checks.like(_OP, "skip", skip, x)
    weight = _checks.tensor4d(_OP, "weight", weight)
    _checks.like(_OP, "weight", weight, x)
    if skip.shape[0] != x.shape[0]:
        raise ValueError(f"{_OP}: skip has batch {skip.shape[0]} but x has {x.shape[0]}")
    if skip.shape[2] < x.shape[2] or skip.shape[3] < x.shape[3]:
        raise ValueError(f"{_OP}: skip of spatial size {tuple(skip.shape[2:])} is smaller than x's "
                         f"{tuple(x.shape[2:])}: the skip is center-cropped to x's size")
    channels = skip.shape[1] + x.shape[1]
    if weight.shape[1] != channels:
        raise ValueError(f"{_OP}: weight has {weight.shape[1]} input channels but skip + x have "
                         f"{skip.shape[1]} + {x.shape[1]} = {channels}")
    k = weight.shape[2]
    if weight.shape[3] != k or k not in (1, 3):
        raise NotImplementedError(f"{_OP}: only 3x3 and 1x1 kernels are supported, got "
                                  f"{tuple(weight.shape[2:])}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding not in (0, 1):
        raise NotImplementedError(f"{_OP}: padding must be 0 (valid) or 1 (same), got {padding!r}")
    if padding == 1 and k != 3:
        raise NotImplementedError(f"{_OP}: padding 1 is for 3x3 kernels; a 1x1 kernel takes padding 0")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be None or 'relu', got {activation!r}")
    if min(x.shape[2], x.shape[3]) + 2 * padding < k:
        raise ValueError(f"{_OP}: x of spatial size {tuple(x.shape[2:])} is smaller than the "
                         f"{k}x{k} kernel with padding {padding}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_OP}: bias must be a ({weight.shape[0]},) tensor, got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        _checks.like(_OP, "bias", bias, x)


# --- backends ----------------------------------------------------------------------------

def _cpu_reasons(skip, x, weight=None):
    reasons = _backend.extension_reasons("cpu", x)
    if not reasons and x.dtype not in _CPU_DTYPES:
        reasons.append(f"{x.dtype} is served by the reference backend on the CPU (the CPU "
                       "kernel takes float32 and float64)")
    return reasons


_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def _cuda_reasons(skip, x, weight=None):
    reasons = _backend.extension_reasons("cuda", x)
    if reasons:
        return reasons
    if x.dtype not in _CUDA_DTYPES:
        reasons.append(f"{x.dtype}: the CUDA C++ kernel (tensor cores) takes bfloat16 and float16; "
                       "the triton backend serves float32")
    major, minor = torch.cuda.get_device_capability(x.device)
    if (major, minor) < (8, 0):
        reasons.append(f"compute capability {major}.{minor} of {x.device} is below 8.0 "
                       "(mma.sync bf16/fp16 tensor cores)")
    return reasons


def _triton_reasons(skip, x, weight=None):
    return _backend.triton_reasons(_OP, skip, x, weight)


# auto. CPU: the CPU kernel (a direct convolution from both sources, no concatenation) first:
# over the U-Net decoder levels it measured 1.20x (valid) and 1.56x (same) eager's fwd+bwd in
# all (per level 0.89-2.31x: fastest at the narrow top levels, about at parity elsewhere)
# with 20-22% (valid) and 1.5-2.5x (same) less peak memory (benchmarks/results/
# cpu-xeon-avx512-2core/crop_concat_conv, AVX-512); float16 / bfloat16 go to the reference.
# CUDA: Triton (autotuned implicit GEMM, forward and backward) before the CUDA C++ mma.sync
# kernel (bf16/fp16, untuned, cuDNN backward): neither has been measured on a GPU yet -
# scripts/gpu_check.sh times both and should confirm or reorder this.
OP = _backend.register_op(_backend.OpBackends(
    op=_OP, auto_order={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}))
OP.register("cuda", _cuda_reasons)
OP.register("triton", _triton_reasons)
OP.register("cpu", _cpu_reasons)
OP.register("reference", lambda skip, x, weight=None: [])


def _forward_op(name):
    if name == "triton":
        from fastseg.triton import crop_concat_conv2d as kernels
        return kernels.forward
    return torch.ops.fastseg.crop_concat_conv2d_forward


# --- torch.library: fake implementations and autograd --------------------------------------

def _output_shape(x, weight, padding):
    k = weight.shape[2]
    return (x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - k + 1,
            x.shape[3] + 2 * padding - k + 1)


def fake_forward(skip, x, weight, bias, padding, activation):
    return _checks.empty_like_format(x, _output_shape(x, weight, padding))


def fake_backward(grad_output, output, skip, x, weight, padding, activation):
    return (_checks.empty_like_format(skip, skip.shape), _checks.empty_like_format(x, x.shape),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0]))


def register_autograd(forward_name: str, backward) -> None:
    def setup_context(ctx, inputs, output):
        skip, x, weight, bias, padding, activation = inputs
        ctx.save_for_backward(skip, x, weight, output)
        ctx.options = (padding, activation)
        ctx.has_bias = bias is not None

    def backward_fn(ctx, grad):
        skip, x, weight, output = ctx.saved_tensors
        grad_skip, grad_x, grad_weight, grad_bias = backward(grad, output, skip, x, weight,
                                                             *ctx.options)
        needs = ctx.needs_input_grad
        return (grad_skip if needs[0] else None, grad_x if needs[1] else None,
                grad_weight if needs[2] else None,
                grad_bias if ctx.has_bias and needs[3] else None, None, None)

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)


register_fused_op(_OP, fake_forward, fake_backward, register_autograd)
