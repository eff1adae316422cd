"""fastseg: fused CUDA, Triton and CPU kernels for FCN and U-Net semantic segmentation."""

__version__ = "0.1.0"

from fastseg._backend import BACKENDS, backend, get_backend, set_backend  # noqa: E402
from fastseg._info import info  # noqa: E402
from fastseg import ops, nn  # noqa: E402

__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "info", "ops", "nn", "models", "__version__"]


def __getattr__(name):
    # fastseg.models on first use (it builds on nn and ops; `import fastseg` stays light).
    if name == "models":
        import importlib

        return importlib.import_module("fastseg.models")
    raise AttributeError(f"module 'fastseg' has no attribute {name!r}")
