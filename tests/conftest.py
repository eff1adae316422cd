import os

import pytest
import torch

import fastseg
from fastseg import _backend

HAS_CUDA = torch.cuda.is_available()
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def devices():
    """cpu always; cuda (marked) when a GPU is present."""
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]))
    return out


def require_triton_interpreter():
    """At the top of a triton_interpret test module: skip the module unless TRITON_INTERPRET=1
    was set before triton was imported (the flag is read when the kernels are defined) and
    triton is importable."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (run this file in "
                    "its own process: TRITON_INTERPRET=1 pytest -m triton_interpret ...)",
                    allow_module_level=True)
    pytest.importorskip("triton")


def require_aot_compiler():
    """At the top of an ahead-of-time compile test module: skip the module unless triton is
    importable, can compile for NVIDIA targets (no GPU needed) and TRITON_INTERPRET is not 1
    (the interpreter has no compiler)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("ahead-of-time compilation is not available under TRITON_INTERPRET=1",
                    allow_module_level=True)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except Exception as error:  # pragma: no cover - an unusual triton build
        pytest.skip(f"triton cannot compile for NVIDIA targets here: {error}",
                    allow_module_level=True)


def fused_backends(op: str, device: str) -> list[str]:
    """The fused backends expected to serve float32 inputs on `device` in this process."""
    if device == "cpu":
        return ["cpu"] if _backend.extension_error() is None else []
    names = []
    if _backend.cuda_kernels_error() is None:
        names.append("cuda")
    try:
        import triton  # noqa: F401
        names.append("triton")
    except ImportError:
        pass
    return names


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts from backend "auto" with no active overrides."""
    saved = (_backend._default, list(_backend._overrides))
    fastseg.set_backend("auto")
    _backend._overrides.clear()
    yield
    _backend._default, _backend._overrides[:] = saved[0], saved[1]
