"""Backend registry and selection.

Four backends can serve an op: "cuda" (CUDA C++ in csrc/cuda), "triton" (fastseg/triton),
"cpu" (C++ in csrc/cpu) and "reference" (fastseg/ops/_reference.py). Each op registers, per
backend, a function that lists why that backend cannot serve given inputs (empty: it can).

The backend is chosen by, in order: the op's `backend=` argument, the innermost
`with fastseg.backend(name):`, `fastseg.set_backend(name)`, the FASTSEG_BACKEND environment
variable (read at import), else "auto". "auto" takes the first backend of the op's
preference order for the inputs' device that can serve them. An explicit backend that cannot
serve the inputs raises NotImplementedError listing every backend's reasons.

The state is plain module globals (not thread-locals or contextvars) so that torch.compile
traces the selection without a graph break.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

BACKENDS = ("cuda", "triton", "cpu", "reference")
CHOICES = BACKENDS + ("auto",)


def _validated(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    return name


_default = _validated(os.environ.get("FASTSEG_BACKEND", "auto") or "auto", "FASTSEG_BACKEND")
_overrides: list[str] = []


def set_backend(name: str) -> None:
    """Sets the process-wide default backend ("auto" restores automatic choice)."""
    global _default
    _default = _validated(name, "backend")


def get_backend() -> str:
    """The backend in force: the innermost `with backend(...)`, else set_backend / env / auto."""
    return _overrides[-1] if _overrides else _default


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with fastseg.backend("triton"):` - use that backend for fastseg ops inside the block."""
    _overrides.append(_validated(name, "backend"))
    try:
        yield
    finally:
        _overrides.pop()


# --- what is installed ---------------------------------------------------------------

_extension_error: str | None = None
_cuda_kernels_error: str | None = None
_extensions_checked = False


def _load_extensions() -> None:
    """Imports fastseg._C (the op schemas and CPU kernels) and, where they were built,
    fastseg._C_cuda (the CUDA kernels), once; records why either is missing."""
    global _extension_error, _cuda_kernels_error, _extensions_checked
    if _extensions_checked:
        return
    _extensions_checked = True
    try:
        from fastseg import _C  # noqa: F401  (registers the schemas and the CPU kernels)
    except ImportError as e:
        _extension_error = f"fastseg._C is not available ({e})"
    except OSError as e:  # a broken shared library
        _extension_error = f"fastseg._C failed to load ({e})"
    info = build_info()
    if _extension_error:
        _cuda_kernels_error = _extension_error
    elif not info.get("cuda_kernels"):
        _cuda_kernels_error = (f"fastseg was built without CUDA kernels "
                               f"({info.get('cuda_reason', 'unknown')})")
    else:
        try:
            from fastseg import _C_cuda  # noqa: F401  (registers the CUDA kernels)
        except (ImportError, OSError) as e:
            _cuda_kernels_error = f"fastseg._C_cuda failed to load ({e})"


def extension_error() -> str | None:
    """None if fastseg._C is loaded, else why not."""
    _load_extensions()
    return _extension_error


def cuda_kernels_error() -> str | None:
    """None if the CUDA C++ kernels (fastseg._C_cuda) were built and loaded, else why not."""
    _load_extensions()
    return _cuda_kernels_error


def build_info() -> dict:
    try:
        from fastseg._build_info import BUILD_INFO
    except ImportError:
        return {"extension": False, "reason": "no build information (not built by setup.py)"}
    return dict(BUILD_INFO)


# --- per-op registry -------------------------------------------------------------------

ReasonsFn = Callable[..., "list[str]"]


@dataclass
class OpBackends:
    """The backends of one op: why each cannot serve given inputs, and the auto order."""

    op: str
    auto_order: dict[str, tuple[str, ...]]  # device type -> backends to try, in order
    reasons: dict[str, ReasonsFn] = field(default_factory=dict)

    def register(self, name: str, reasons: ReasonsFn) -> None:
        assert name in BACKENDS, name
        self.reasons[name] = reasons

    def not_supported_reasons(self, name: str, *args, **kwargs) -> list[str]:
        return list(self.reasons[name](*args, **kwargs))

    def select(self, requested: str | None, device_type: str, *args, **kwargs) -> str:
        """The backend that will serve these inputs."""
        choice = get_backend() if requested is None else _validated(requested, "backend")
        if choice != "auto":
            if not self.not_supported_reasons(choice, *args, **kwargs):
                return choice
            raise NotImplementedError(self._explain(f"backend {choice!r} cannot serve", args, kwargs))
        for name in self.auto_order.get(device_type, ("reference",)):
            if not self.not_supported_reasons(name, *args, **kwargs):
                return name
        raise NotImplementedError(self._explain("no backend can serve", args, kwargs))

    def _explain(self, headline: str, args, kwargs) -> str:
        lines = [f"fastseg.ops.{self.op}: {headline} these inputs:"]
        for name in BACKENDS:
            why = self.not_supported_reasons(name, *args, **kwargs)
            lines.append(f"  {name}: " + ("; ".join(why) if why else "supported"))
        return "\n".join(lines)


_OPS: dict[str, OpBackends] = {}


def register_op(op: OpBackends) -> OpBackends:
    _OPS[op.op] = op
    return op


def registered_ops() -> dict[str, OpBackends]:
    return dict(_OPS)


# --- reasons shared by the ops ------------------------------------------------------------

FUSED_DTYPES = {
    "cpu": ("float32", "float64", "float16", "bfloat16"),
    "cuda": ("float32", "float16", "bfloat16"),
}


def extension_reasons(device_type: str, tensor) -> list[str]:
    """Why the C++ kernels for `device_type` ("cpu" or "cuda") cannot take `tensor`."""
    reasons = []
    err = extension_error() if device_type == "cpu" else cuda_kernels_error()
    if err:
        reasons.append(err)
    if tensor.device.type != device_type:
        reasons.append(f"input is on {tensor.device.type}, the {device_type} backend needs "
                       f"{device_type} tensors")
    elif str(tensor.dtype).removeprefix("torch.") not in FUSED_DTYPES[device_type]:
        reasons.append(f"{tensor.dtype} is not supported on {device_type}")
    return reasons


def triton_reasons(module: str, tensor, *args) -> list[str]:
    """Why fastseg.triton.<module> cannot take these inputs (its not_supported_reasons)."""
    import importlib
    import os

    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # Not importing triton here keeps `import fastseg` fast on CPU-only machines (its ops
        # pull in torch._inductor: about 2 s).
        return [f"input is on {tensor.device.type}: the triton backend needs CUDA tensors "
                "(CPU tensors only under TRITON_INTERPRET=1, for tests)"]
    try:
        kernels = importlib.import_module(f"fastseg.triton.{module}")
    except ImportError as e:  # the module itself guards a missing triton; this is a broken one
        return [f"fastseg.triton.{module} failed to import ({e})"]
    return list(kernels.not_supported_reasons(tensor, *args))
