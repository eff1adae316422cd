"""Autograd registration shared by the C++ ops and their Triton twins."""

from __future__ import annotations

import torch


def register_cross_entropy_autograd(forward_name: str, backward) -> None:
    """Autograd for a forward op whose outputs are (loss, lse, total_weight)."""

    def setup_context(ctx, inputs, output):
        input, target, weight, pixel_weight, ignore_index, reduction, label_smoothing = inputs
        _, lse, total_weight = output
        ctx.save_for_backward(input, target, weight, pixel_weight, lse, total_weight)
        ctx.options = (ignore_index, reduction, label_smoothing)

    def backward_fn(ctx, grad_loss, grad_lse, grad_total_weight):
        input, target, weight, pixel_weight, lse, total_weight = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad = grad_loss.contiguous() if grad_loss.dim() else grad_loss
            grad_input = backward(grad, input, target, lse, total_weight, weight, pixel_weight,
                                  *ctx.options)
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)


def register_fused_op(op: str, fake_forward, fake_backward, register_autograd) -> None:
    """Registers the fakes and autograd of fastseg::<op>_forward / <op>_backward (when
    fastseg._C is loaded) and, with a GPU, imports the op's Triton twins now rather than on
    first use, which may happen inside a torch.compile trace."""
    import importlib

    from fastseg import _backend

    if _backend.extension_error() is None:
        torch.library.register_fake(f"fastseg::{op}_forward")(fake_forward)
        torch.library.register_fake(f"fastseg::{op}_backward")(fake_backward)
        register_autograd(f"fastseg::{op}_forward", getattr(torch.ops.fastseg, f"{op}_backward"))
    if torch.cuda.is_available():
        try:
            importlib.import_module(f"fastseg.triton.{op}")
        except ImportError:  # reported by the op's triton reasons
            pass
