"""What the build produced, checked against what `make test` asked for."""

import os
import subprocess
import sys

import pytest
import torch

import fastseg
from fastseg import _backend


def test_extension_loaded_when_expected():
    if os.environ.get("FASTSEG_EXPECT_EXTENSION") != "1":
        pytest.skip("FASTSEG_EXPECT_EXTENSION is not 1")
    assert _backend.extension_error() is None, _backend.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastseg::softmax_cross_entropy_forward", "CPU")


def test_cuda_kernels_built_when_expected():
    if os.environ.get("FASTSEG_EXPECT_CUDA_KERNELS") != "1":
        pytest.skip("FASTSEG_EXPECT_CUDA_KERNELS is not 1")
    info = _backend.build_info()
    assert info["cuda_kernels"], info
    assert info["cuda_archs"] == os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    for op in ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastseg::{op}", "CUDA"), op


def test_build_info_records_versions():
    info = _backend.build_info()
    if not info.get("extension"):
        pytest.skip("pure-Python install")
    assert info["torch"] == torch.__version__
    assert "DEFAULT" in info["cpu_capabilities"]


def test_info_reports_every_backend_for_every_op():
    report = fastseg.info()
    assert report["torch"] == torch.__version__
    per_device = report["backends"]["softmax_cross_entropy"]
    assert set(per_device["cpu"]) == set(fastseg.BACKENDS)
    assert per_device["cpu"]["reference"] == "live"
    text = fastseg.info(as_text=True)
    assert "softmax_cross_entropy" in text and "reference" in text


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "fastseg", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "fastseg " + fastseg.__version__ in out


def test_env_backend_is_honoured_and_validated():
    code = "import fastseg; print(fastseg.get_backend())"
    env = dict(os.environ, FASTSEG_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["FASTSEG_BACKEND"] = "gpu"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTSEG_BACKEND must be one of" in bad.stderr


def test_works_without_the_extension():
    """With fastseg._C unavailable the package imports and the reference backend serves."""
    code = (
        "import sys; sys.modules['fastseg._C'] = None\n"
        "import torch, fastseg\n"
        "x = torch.randn(2, 3, 4, 4); t = torch.randint(0, 3, (2, 4, 4))\n"
        "out = fastseg.ops.softmax_cross_entropy(x, t)\n"
        "assert torch.allclose(out, torch.nn.functional.cross_entropy(x, t))\n"
        "print(fastseg.info(as_text=True))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fastseg._C is not available" in out
