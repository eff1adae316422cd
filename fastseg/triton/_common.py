"""Launcher, op-registration and ahead-of-time helpers shared by the triton kernel modules.

Imports neither triton (except, guarded, in :func:`import_triton`, and in :func:`traceable`,
which only a launch reaches) nor a kernel module:
every kernel module still imports cleanly without triton (and says why through its
``not_supported_reasons``), and each one reads ``TRITON_INTERPRET`` itself when its kernels
are defined (its ``INTERPRET = _common.interpret_flag()``), passing the value here where it
matters.
"""

import os
from typing import Callable, Optional, Tuple

import torch

# Compiled and checked (tests/test_triton_aot*.py) for these devices; older GPUs untested.
MIN_CAPABILITY = (8, 0)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = CUDA_DTYPES + (torch.float64,)

INT32_LIMIT = 2**31 - 1


def import_triton():
    """(triton, triton.language, None), or (None, None, why) where triton cannot be
    imported (ImportError, or a broken install raising something else)."""
    try:  # pragma: no cover - exercised by the environments that lack triton
        import triton
        import triton.language as tl
    except Exception as error:
        return None, None, f"{type(error).__name__}: {error}"
    return triton, tl, None


def interpret_flag() -> bool:
    """Whether kernels defined now are defined in interpreter mode. triton decides this
    when a kernel is decorated, so a kernel module calls this at import, before its
    kernels, and keeps the value (its ``INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def needs_int64(*tensors: Optional[torch.Tensor], margin: int = 0) -> bool:
    """Whether an element offset of one of the tensors (plus `margin` elements of masked
    tail lanes along every axis) can pass 2^31 - 1."""
    for t in tensors:
        if t is None:
            continue
        if sum((n - 1 + margin) * abs(s) for n, s in zip(t.shape, t.stride())) > INT32_LIMIT:
            return True
        if t.numel() > INT32_LIMIT:
            return True
    return False


def interpreted_fake(tensor: torch.Tensor, interpret: bool) -> bool:
    """Whether this is a fake (metadata only) pass under the interpreter (`interpret`: the
    kernel module's INTERPRET), where the interpreted kernel would run on fake tensors
    (tracing by torch.compile or opcheck) and fail; the fake pass only needs the outputs'
    metadata."""
    if not interpret:
        return False
    if tensor.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def device_guard(tensor: torch.Tensor):
    """Make `tensor`'s GPU the current one while launching (triton launches there)."""
    if tensor.is_cuda and tensor.device.index is not None \
            and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NullContext()


def traceable(kernel):
    """The kernel as torch.library.wrap_triton gives it on the GPU (traceable by
    torch.compile inside a triton_op); an interpreted kernel (TRITON_INTERPRET=1 when it was
    defined) as it is: torch 2.14's wrap_triton returns it unchanged, torch 2.11's refuses it
    ("wrap_triton only works on functions annotated with triton.jit")."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def launch_tiled(kernel, config, programs: int, device_of: torch.Tensor, *args,
                 int64_index: bool, **constexprs) -> None:
    """Launch a tiled FCN decoder kernel (upsample_add, deconv_add) on ``programs``
    programs, on `device_of`'s GPU: the positional kernel arguments, the op's own
    constexprs, and those of the tile config (CHANNELS_LAST, BLOCK_R, BLOCK_I, warps,
    stages) with INT64_INDEX = `int64_index`."""
    with device_guard(device_of):
        traceable(kernel)[(programs,)](
            *args,
            **constexprs,
            CHANNELS_LAST=config.channels_last,
            INT64_INDEX=int64_index,
            BLOCK_R=config.block_r,
            BLOCK_I=config.block_i,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def define_ops(forward_name: str, forward_impl: Callable, backward_name: str,
               backward_impl: Callable, ops_module, interpret: bool) -> Tuple[object, object]:
    """The (forward, backward) torch ops of a kernel module whose public layer
    `ops_module` provides ``fake_forward`` / ``fake_backward`` and ``register_autograd``.

    On the GPU triton ops, so that torch.compile traces into them and sees the kernels.
    Under the interpreter (`interpret`: the module's INTERPRET) wrap_triton returns the
    bare interpreted kernel, so a traced triton_op would drop the launch: opaque custom ops
    instead. The fakes are the metadata rules of the C++ ops; autograd is registered here,
    where the ops are defined, so that importing the kernel module is enough.
    """
    define = torch.library.custom_op if interpret else torch.library.triton_op
    forward = define(forward_name, forward_impl, mutates_args=())
    backward = define(backward_name, backward_impl, mutates_args=())
    forward.register_fake(ops_module.fake_forward)
    backward.register_fake(ops_module.fake_backward)
    ops_module.register_autograd(forward_name, backward)
    return forward, backward


def unknown_kernel(kernel_name: str) -> ValueError:
    """The error of compile_ahead_of_time for a kernel name other than the two."""
    return ValueError(f"kernel_name must be 'forward' or 'backward', got {kernel_name!r}")


def apply_overrides(constexprs: dict, overrides: Optional[dict], kernel_name: str) -> dict:
    """Replace constexprs of the `kernel_name` kernel (an unknown name is an error)."""
    for name, value in (overrides or {}).items():
        if name not in constexprs:
            raise ValueError(f"{name!r} is not a constexpr of the {kernel_name} kernel")
        constexprs[name] = value
    return constexprs
