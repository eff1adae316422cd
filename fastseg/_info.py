"""fastseg.info(): versions, how the extension was built, which backends serve which op."""

from __future__ import annotations

import platform

import torch

from fastseg import _backend


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _probe_inputs(op: str, device: str):
    """Small inputs on `device` that each backend is asked about (dtype float32)."""
    if op == "softmax_cross_entropy":
        x = torch.zeros(1, 2, 1, 1, device=device)
        t = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        return (x, t)
    if op == "upsample_add":
        return (torch.zeros(1, 1, 1, 1, device=device), None)
    if op == "deconv_add":
        x = torch.zeros(1, 1, 1, 1, device=device)
        return (x, torch.zeros(1, 1, 2, 2, device=device), None)
    if op == "crop_concat_conv2d":
        x = torch.zeros(1, 1, 3, 3, device=device)
        return (x, x, torch.zeros(1, 2, 3, 3, device=device))
    raise KeyError(op)


def info(as_text: bool = False):
    """A dict (or, with as_text=True, a readable report) of versions, build and backends."""
    import fastseg

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends: dict[str, dict[str, dict[str, str]]] = {}
    for op_name, op in _backend.registered_ops().items():
        backends[op_name] = {}
        for device in devices:
            probe = _probe_inputs(op_name, device)
            backends[op_name][device] = {
                name: ("; ".join(op.not_supported_reasons(name, *probe)) or "live")
                for name in _backend.BACKENDS
            }
    report = {
        "fastseg": fastseg.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backend_in_force": _backend.get_backend(),
        "extension": _backend.extension_error() or "loaded",
        "build": _backend.build_info(),
        "backends": backends,
    }
    return _as_text(report) if as_text else report


def _as_text(r: dict) -> str:
    lines = [f"fastseg {r['fastseg']}  torch {r['torch']} (CUDA {r['torch_cuda']})  "
             f"triton {r['triton']}  python {r['python']}",
             f"device: {r['device']}  (cuda available: {r['cuda_available']}, "
             f"CPU capability: {r['cpu_capability']})",
             f"fastseg._C: {r['extension']}",
             f"backend in force: {r['backend_in_force']}",
             "build:"]
    lines += [f"  {k}: {v}" for k, v in r["build"].items()]
    for op, per_device in r["backends"].items():
        lines.append(f"op {op}:")
        for device, per_backend in per_device.items():
            for name, status in per_backend.items():
                lines.append(f"  [{device}] {name:<9} {status}")
    return "\n".join(lines)
