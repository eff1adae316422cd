"""Triton forward of crop_concat_conv2d (fastseg.triton.crop_concat_conv2d) under triton's
interpreter, on CPU, with its PyTorch backward (zero-copy views + convolution_backward).

Run in its own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 pytest -m triton_interpret tests/test_triton_interpret_ccc.py

Values and gradients (skip, x, weight, bias) are compared with
fastseg.ops._reference.crop_concat_conv2d through torch.autograd, in float64 (tl.dot runs in
float64 under the interpreter) and float32, on tiny shapes: tl.dot is slow when interpreted.
"""

import zlib

import pytest
import torch

from conftest import require_triton_interpreter

pytestmark = pytest.mark.triton_interpret

require_triton_interpreter()

from fastseg.ops import _reference  # noqa: E402
from fastseg.triton import crop_concat_conv2d as ccc  # noqa: E402

# Small tiles: several programs along M and Cout and several channel steps per source.
TINY = ccc.KernelConfig(None, 0, 16, 16, 16, 16, 1, 1)


def _seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _tensor(shape, layout, dtype):
    t = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "sliced":  # no unit stride anywhere along W
        N, C, H, W = shape
        return torch.randn(N, C, H, 2 * W, dtype=dtype)[:, :, :, ::2]
    return t


def _inputs(N, Cs, Cx, Cout, H, W, dh, dw, k, bias, layout, dtype):
    skip = _tensor((N, Cs, H + dh, W + dw), layout, dtype)
    x = _tensor((N, Cx, H, W), layout, dtype)
    weight = torch.randn(Cout, Cs + Cx, k, k, dtype=dtype) / (Cs + Cx) ** 0.5 / k
    b = torch.randn(Cout, dtype=dtype) if bias else None
    return skip, x, weight, b


def _close(ours, expected, what, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert ours.shape == expected.shape, (what, ours.shape, expected.shape)
    torch.testing.assert_close(ours.double(), expected.double(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


# (N, Cs, Cx, Cout, H, W, extra rows, extra columns, k, padding, bias, relu, layout)
_CASES = [
    pytest.param(1, 3, 5, 4, 5, 6, 3, 1, 3, 1, True, True, "nchw", id="3x3-same-odd-relu"),
    pytest.param(2, 4, 2, 3, 4, 5, 2, 5, 3, 0, False, False, "channels_last", id="3x3-valid-cl"),
    pytest.param(1, 2, 3, 5, 3, 4, 1, 0, 1, 0, True, False, "channels_last", id="1x1-bias-cl"),
    pytest.param(1, 3, 2, 2, 4, 4, 0, 0, 1, 0, False, True, "sliced", id="1x1-nocrop-sliced"),
    pytest.param(1, 2, 2, 3, 3, 3, 4, 2, 3, 1, True, False, "sliced", id="3x3-same-sliced"),
]


def _run(skip, x, weight, bias, padding, relu):
    return ccc.forward(skip, x, weight, bias, padding, 1 if relu else 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("N,Cs,Cx,Cout,H,W,dh,dw,k,padding,bias,relu,layout", _CASES)
def test_forward_and_gradients(N, Cs, Cx, Cout, H, W, dh, dw, k, padding, bias, relu, layout,
                               dtype):
    _seed(N, Cs, Cx, Cout, H, W, dh, dw, k, padding, bias, relu, layout, str(dtype))
    skip, x, weight, b = _inputs(N, Cs, Cx, Cout, H, W, dh, dw, k, bias, layout, dtype)
    assert ccc.not_supported_reasons(skip, x, weight) == []
    leaves = [t.requires_grad_() for t in (skip, x, weight, b) if t is not None]
    out = _run(skip, x, weight, b, padding, relu)
    activation = "relu" if relu else None
    expected = _reference.crop_concat_conv2d(skip, x, weight, b, padding, activation)
    _close(out, expected, "out", dtype)
    channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(expected, leaves, grad)
    for name, g, e in zip(("skip", "x", "weight", "bias"), ours, theirs):
        _close(g, e, f"grad {name}", dtype)


@pytest.mark.parametrize("k,padding,layout", [(3, 1, "channels_last"), (3, 0, "nchw"),
                                              (1, 0, "nchw")])
def test_tiled_forward_many_programs(k, padding, layout):
    """Tiny tiles: several M / Cout tiles and channel steps (Cs, Cx > BLOCK_K), masked
    tails everywhere."""
    _seed("tiled", k, padding, layout)
    skip, x, weight, b = _inputs(1, 20, 17, 18, 5, 4, 3, 2, k, True, layout, torch.float64)
    out = ccc._ops.fake_forward(skip, x, weight, b, padding, 1)
    ccc.launch_forward(out, skip, x, weight, b, padding, 1, config=TINY)
    expected = _reference.crop_concat_conv2d(skip, x, weight, b, padding, "relu")
    _close(out, expected, "out", torch.float64)


def test_padding_is_zero_outside_the_crop_window():
    """The skip has pixels around the crop window: padding must still read zeros there."""
    _seed("window")
    skip, x, weight, _ = _inputs(1, 2, 1, 2, 3, 3, 4, 4, 3, False, "nchw", torch.float64)
    skip[:, :, :, :] = 1000.0
    out = _run(skip, x, weight, None, 1, False)
    expected = _reference.crop_concat_conv2d(skip, x, weight, None, 1, None)
    _close(out, expected, "out", torch.float64)


def test_select_config():
    w64 = torch.empty(64, 128, 3, 3)
    w512 = torch.empty(512, 1024, 3, 3)
    big = torch.empty(1, 64, 128, 128)
    small = torch.empty(1, 512, 16, 16)
    assert ccc.select_config(big, w64, 1) == ccc.SHIPPED_CONFIGS[0]
    assert ccc.select_config(big, w512, 1) == ccc.SHIPPED_CONFIGS[1]
    assert ccc.select_config(small, w512, 1) == ccc.SHIPPED_CONFIGS[2]
    assert ccc.input_precision(torch.float32) == "ieee"  # never tf32 when interpreted


def test_not_supported_reasons():
    x = torch.empty(1, 2, 3, 3)
    assert ccc.not_supported_reasons(x, x, x) == []
    assert ccc.not_supported_reasons(x.int(), x.int()) != []
    assert any("dtype" in r for r in ccc.not_supported_reasons(x, x.double()))


def test_opcheck():
    _seed("opcheck")
    skip, x, weight, b = _inputs(1, 2, 3, 2, 3, 4, 1, 2, 3, True, "channels_last",
                                 torch.float64)
    for t in (skip, x, weight, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastseg.crop_concat_conv2d_forward_triton,
                          (skip, x, weight, b, 1, 1))
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, 1, 1)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastseg.crop_concat_conv2d_backward_triton,
                          (grad, out, skip.detach(), x.detach(), weight.detach(), 1, 1))
