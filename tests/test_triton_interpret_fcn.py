"""Triton kernels of the FCN decoder ops (upsample_add, deconv_add), run by triton's
interpreter on CPU.

Run in their own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 pytest -m triton_interpret tests/test_triton_interpret_fcn.py

Values and gradients (x, skip, weight) are compared with fastseg.ops._reference through
torch.autograd, in float64 on fresh random data with tiny odd shapes (the interpreter runs
every program in Python: a few programs per launch), through the public API
(``backend="triton"``) and through the kernel modules' own functions.
"""

import zlib

import pytest
import torch

from conftest import require_triton_interpreter

pytestmark = pytest.mark.triton_interpret

require_triton_interpreter()

import fastseg.ops as ops  # noqa: E402
from fastseg.ops import _checks, _reference  # noqa: E402
from fastseg.triton import deconv_add as dc  # noqa: E402
from fastseg.triton import upsample_add as up  # noqa: E402


def _seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _tensor(shape, layout, dtype=torch.float64):
    """Fresh random data: "nchw", "channels_last" or "sliced" (every other column of a
    wider map, and a channel-sliced batch: no unit stride along W)."""
    if layout == "nchw":
        return torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":
        N, C, H, W = shape
        return torch.randn(N, C + 1, H, 2 * W, dtype=dtype)[:, 1:, :, ::2]
    raise ValueError(layout)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)


def _assert_close(ours, expected, what, rtol=2e-6, atol=2e-6):
    assert ours.shape == expected.shape, (what, ours.shape, expected.shape)
    torch.testing.assert_close(ours.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# --- upsample_add -------------------------------------------------------------------------

# (x shape, size, scale_factor, align_corners, x layout, skip: None or (extra rows, extra
# columns, layout), skip_offset)
_UPSAMPLE_CASES = [
    pytest.param((2, 1, 5, 7), None, 2, False, "nchw", (1, 2, "nchw"), (1, 2), id="x2"),
    pytest.param((1, 2, 4, 3), None, 3, True, "channels_last", (0, 0, "channels_last"), (0, 0),
                 id="x3-align-cl"),
    pytest.param((1, 1, 2, 3), None, 8, False, "nchw", None, (0, 0), id="x8-noskip"),
    pytest.param((1, 2, 3, 4), None, 1.7, False, "sliced", (2, 1, "sliced"), (2, 1),
                 id="x1.7-sliced"),
    pytest.param((1, 2, 9, 11), None, 0.6, True, "nchw", None, (0, 0), id="x0.6-down-align"),
    pytest.param((1, 2, 8, 7), None, (0.6, 1.7), False, "channels_last", (1, 0, "nchw"),
                 (1, 0), id="x0.6-1.7-cl"),
    pytest.param((1, 2, 1, 1), None, 4, False, "nchw", (0, 3, "nchw"), (0, 3), id="1x1"),
    pytest.param((1, 2, 1, 5), (3, 9), None, True, "channels_last", (2, 2, "nchw"), (1, 2),
                 id="1x5-size-align-cl"),
    pytest.param((2, 1, 5, 6), (5, 6), None, False, "nchw", (0, 0, "nchw"), (0, 0),
                 id="equal-size"),
    pytest.param((1, 2, 3, 4), (1, 1), None, True, "nchw", None, (0, 0), id="to-1x1-align"),
]


@pytest.mark.parametrize("shape,size,scale_factor,align_corners,layout,skip,offset",
                         _UPSAMPLE_CASES)
def test_upsample_add_matches_reference(shape, size, scale_factor, align_corners, layout,
                                        skip, offset):
    _seed("up", shape, size, scale_factor, align_corners, layout, skip, offset)
    x = _tensor(shape, layout).requires_grad_(True)
    ref_up = _reference.upsample_add(x.detach(), None, size, scale_factor, align_corners)
    Ho, Wo = ref_up.shape[2:]
    s = None
    if skip is not None:
        extra_h, extra_w, skip_layout = skip
        s = _tensor((shape[0], shape[1], offset[0] + Ho + extra_h, offset[1] + Wo + extra_w),
                    skip_layout).requires_grad_(True)
    out = ops.upsample_add(x, s, size, scale_factor, align_corners, offset, backend="triton")
    ref = _reference.upsample_add(x, s, size, scale_factor, align_corners, offset)
    _assert_close(out, ref, "out")
    assert out.dtype == x.dtype
    assert _checks.channels_last_output(out) == _checks.channels_last_output(x)
    g = torch.randn_like(ref)
    for ours, expected, name in zip(_grads(out, (x, s), g), _grads(ref, (x, s), g),
                                    ("grad x", "grad skip")):
        _assert_close(ours, expected, name)


def test_upsample_add_size_from_skip():
    """Neither size nor scale_factor: the rest of the skip after the offset."""
    _seed("up-skip-size")
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64)
    s = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    out = ops.upsample_add(x, s, skip_offset=(2, 1), backend="triton")
    expected = _reference.upsample_add(x, s, (7, 7), None, False, (2, 1))
    _assert_close(out, expected, "out")


def test_upsample_add_module_functions_any_strides():
    """The low-level ops straight: a transposed (non-contiguous) grad_output and x."""
    _seed("up-direct")
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64).transpose(2, 3)  # (1, 2, 5, 6)
    Ho, Wo = 9, 13
    scales = [5 / Ho, 6 / Wo]
    out = up.forward(x, None, [0, 0], [Ho, Wo], scales, False)
    expected = _reference.upsample_add(x, None, (Ho, Wo), None, False)
    _assert_close(out, expected, "out")
    assert out.is_contiguous()
    g = torch.randn(1, 2, Wo, Ho, dtype=torch.float64).transpose(2, 3)
    grad_x = up.backward(g, [5, 6], scales, False)
    xr = x.detach().clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(
        _reference.upsample_add(xr, None, (Ho, Wo), None, False), xr, g)
    _assert_close(grad_x, expected_grad, "grad x")
    assert grad_x.is_contiguous()


# --- deconv_add ---------------------------------------------------------------------------

# (x shape, kernel, stride, crop, output_size, x layout, skip: None or (extra rows, extra
# columns, layout), skip_offset)
_DECONV_CASES = [
    pytest.param((1, 2, 3, 5), 4, 2, (1, 1), None, "nchw", (1, 2, "nchw"), (1, 2), id="k4s2"),
    pytest.param((1, 2, 2, 3), 16, 8, (4, 3), (9, 11), "channels_last", None, (0, 0),
                 id="k16s8-cl-size"),
    pytest.param((1, 2, 3, 4), 3, 2, (0, 0), None, "nchw", None, (0, 0), id="k3s2"),
    pytest.param((1, 2, 2, 3), 5, 3, (2, 1), (5, 6), "sliced", (0, 1, "channels_last"), (0, 1),
                 id="k5s3-sliced-size"),
    pytest.param((1, 3, 1, 1), 4, 2, (1, 0), None, "channels_last", (2, 0, "channels_last"),
                 (2, 0), id="1x1-cl"),
    pytest.param((2, 1, 1, 4), (3, 4), (1, 2), (0, 2), (2, 7), "nchw", (0, 0, "nchw"), (0, 0),
                 id="1x4-rect"),
]


def _deconv_args(shape, kernel, stride, crop, output_size, layout, skip, offset):
    x = _tensor(shape, layout).requires_grad_(True)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(shape[1], 1, kh, kw, dtype=torch.float64, requires_grad=True)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    full = ((shape[2] - 1) * sh + kh, (shape[3] - 1) * sw + kw)
    Ho, Wo = output_size or (full[0] - crop[0], full[1] - crop[1])
    s = None
    if skip is not None:
        extra_h, extra_w, skip_layout = skip
        s = _tensor((shape[0], shape[1], offset[0] + Ho + extra_h, offset[1] + Wo + extra_w),
                    skip_layout).requires_grad_(True)
    return x, w, s


@pytest.mark.parametrize("shape,kernel,stride,crop,output_size,layout,skip,offset",
                         _DECONV_CASES)
def test_deconv_add_matches_reference(shape, kernel, stride, crop, output_size, layout, skip,
                                      offset):
    _seed("dc", shape, kernel, stride, crop, output_size, layout, skip, offset)
    x, w, s = _deconv_args(shape, kernel, stride, crop, output_size, layout, skip, offset)
    out = ops.deconv_add(x, w, stride, s, crop, offset, output_size, backend="triton")
    ref = _reference.deconv_add(x, w, stride, s, crop, offset, output_size)
    _assert_close(out, ref, "out")
    assert _checks.channels_last_output(out) == _checks.channels_last_output(x)
    g = torch.randn_like(ref)
    ours = _grads(out, (x, w, s), g)
    expected = _grads(ref, (x, w, s), g)
    for a, b, name in zip(ours, expected, ("grad x", "grad weight", "grad skip")):
        _assert_close(a, b, name)
    assert ours[1].is_contiguous() and ours[1].dtype == w.dtype


def test_deconv_add_module_functions():
    """The low-level ops straight; grad_x in x's memory format, grad_weight (C, 1, kh, kw)."""
    _seed("dc-direct")
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = dc.forward(x, w, None, [2, 2], [1, 1], [0, 0], [7, 8])
    _assert_close(out, _reference.deconv_add(x, w, 2, None, (1, 1), (0, 0), (7, 8)), "out")
    g = torch.randn(1, 2, 8, 7, dtype=torch.float64).transpose(2, 3)  # not contiguous
    grad_x, grad_w = dc.backward(g, x, w, [2, 2], [1, 1])
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = _reference.deconv_add(xr, wr, 2, None, (1, 1), (0, 0), (7, 8))
    ex, ew = torch.autograd.grad(ref, (xr, wr), g)
    _assert_close(grad_x, ex, "grad x")
    _assert_close(grad_w, ew, "grad weight")
    assert grad_x.stride() == x.stride()
    assert grad_w.shape == (2, 1, 4, 4) and grad_w.is_contiguous()


# --- low precision, determinism, layouts, empty inputs ------------------------------------

def _error(ours, ref):
    return (ours.double() - ref.double()).abs().max().item()


def _check_not_worse_than_eager(ours, eager, ref, what):
    ours_err, eager_err = _error(ours, ref), _error(eager, ref)
    # One rounding of the float32 result to the output dtype is allowed on top.
    eps = torch.finfo(ours.dtype).eps
    slack = ref.abs().max().item() * eps + 1e-9
    assert ours_err <= 2 * eager_err + slack, (what, ours_err, eager_err, slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upsample_add_low_precision_not_worse_than_eager(dtype, layout):
    _seed("up-lp", dtype, layout)
    x64 = _tensor((1, 2, 5, 6), layout)
    s64 = _tensor((1, 2, 11, 13), layout)
    results = {}
    for name, dt in (("ref", torch.float64), ("eager", dtype), ("ours", dtype)):
        x = x64.to(dt).requires_grad_(True)
        s = s64.to(dt).requires_grad_(True)
        if name == "ours":
            out = ops.upsample_add(x, s, scale_factor=2, skip_offset=(1, 0), backend="triton")
        else:
            out = _reference.upsample_add(x, s, None, 2, False, (1, 0))
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(dt)
        results[name] = (out, *_grads(out, (x, s), g))
    for i, what in enumerate(("out", "grad x", "grad skip")):
        assert results["ours"][i].dtype == dtype
        _check_not_worse_than_eager(results["ours"][i], results["eager"][i], results["ref"][i],
                                    what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deconv_add_low_precision_not_worse_than_eager(dtype, layout):
    _seed("dc-lp", dtype, layout)
    x64 = _tensor((1, 2, 3, 4), layout)
    w64 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s64 = _tensor((1, 2, 9, 9), layout)
    results = {}
    for name, dt in (("ref", torch.float64), ("eager", dtype), ("ours", dtype)):
        x = x64.to(dt).requires_grad_(True)
        w = w64.to(dt).requires_grad_(True)
        s = s64.to(dt).requires_grad_(True)
        if name == "ours":
            out = ops.deconv_add(x, w, 2, s, (1, 1), (1, 0), (7, 9), backend="triton")
        else:
            out = _reference.deconv_add(x, w, 2, s, (1, 1), (1, 0), (7, 9))
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(dt)
        results[name] = (out, *_grads(out, (x, w, s), g))
    for i, what in enumerate(("out", "grad x", "grad weight", "grad skip")):
        assert results["ours"][i].dtype == dtype
        _check_not_worse_than_eager(results["ours"][i], results["eager"][i], results["ref"][i],
                                    what)


def test_backward_is_bitwise_repeatable():
    _seed("repeat")
    g = torch.randn(1, 2, 10, 9)
    first = up.backward(g, [3, 4], [0.3, 4 / 9], False)
    assert torch.equal(first, up.backward(g, [3, 4], [0.3, 4 / 9], False))
    x = torch.randn(1, 2, 3, 4)
    w = torch.randn(2, 1, 4, 4)
    gd = torch.randn(1, 2, 7, 9)
    first = dc.backward(gd, x, w, [2, 2], [1, 0])
    second = dc.backward(gd, x, w, [2, 2], [1, 0])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_int64_index_path(monkeypatch):
    """The 64-bit offset variants (tensors beyond 2^31 elements) compute the same values."""
    monkeypatch.setattr(up, "needs_int64", lambda *args, **kwargs: True)
    _seed("int64")
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = ops.upsample_add(x, None, scale_factor=2, backend="triton")
    ref = _reference.upsample_add(x, None, None, 2, False)
    _assert_close(out, ref, "out")
    g = torch.randn_like(ref)
    _assert_close(_grads(out, (x,), g)[0], _grads(ref, (x,), g)[0], "grad x")
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    out = ops.deconv_add(xc, w, 2, backend="triton")
    ref = _reference.deconv_add(xc, w, 2)
    _assert_close(out, ref, "out")
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (xc, w), g), _grads(ref, (xc, w), g)):
        _assert_close(a, b, "grads")


def test_empty_inputs_return_empty_outputs():
    x = torch.randn(0, 2, 3, 4)
    out = up.forward(x, None, [0, 0], [6, 8], [0.5, 0.5], False)
    assert out.shape == (0, 2, 6, 8)
    assert up.backward(out, [3, 4], [0.5, 0.5], False).shape == (0, 2, 3, 4)
    x = torch.randn(2, 0, 3, 4)
    w = torch.randn(0, 1, 4, 4)
    out = dc.forward(x, w, None, [2, 2], [0, 0], [0, 0], [8, 10])
    assert out.shape == (2, 0, 8, 10)
    grad_x, grad_w = dc.backward(out, x, w, [2, 2], [0, 0])
    assert grad_x.shape == x.shape and grad_w.shape == w.shape


def test_config_selection():
    nchw = torch.empty(1, 21, 8, 500)
    assert up.select_config(nchw).layout == "nchw" and up.select_config(nchw).max_inner is None
    assert up.select_config(torch.empty(1, 21, 8, 20)).max_inner == 32
    cl = torch.empty(1, 21, 8, 9).to(memory_format=torch.channels_last)
    assert up.select_config(cl) == up.KernelConfig("channels_last", 32, 16, 32)
    cl150 = torch.empty(1, 150, 8, 9).to(memory_format=torch.channels_last)
    assert up.select_config(cl150).max_inner is None
    assert dc.SHIPPED_CONFIGS is up.SHIPPED_CONFIGS


def test_not_supported_reasons():
    x = torch.randn(1, 2, 3, 4)
    assert up.not_supported_reasons(x, None) == []
    assert up.not_supported_reasons(x, x) == []
    assert up.not_supported_reasons(x.double(), None) == []
    assert any("dtype" in r for r in up.not_supported_reasons(x.to(torch.complex64)))
    assert any("skip" in r for r in up.not_supported_reasons(x, x.double()))
    w = torch.randn(2, 1, 4, 4)
    assert dc.not_supported_reasons(x, w, None) == []
    assert any("weight" in r for r in dc.not_supported_reasons(x, w.half(), None))


def test_ops_are_registered_and_opcheck():
    """Schema, fake implementation and autograd registration of the four ops (under the
    interpreter the ops are opaque custom ops whose fake pass skips the launch)."""
    assert torch.ops.fastseg.upsample_add_forward_triton.default is not None
    assert torch.ops.fastseg.deconv_add_backward_triton.default is not None
    _seed("opcheck")
    x = torch.randn(1, 2, 3, 4)
    s = torch.randn(1, 2, 7, 9)
    torch.library.opcheck(up.forward, (x, s, [1, 1], [6, 8], [0.5, 0.5], False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(up.backward, (torch.randn(1, 2, 6, 8), [3, 4], [0.5, 0.5], True),
                          test_utils=("test_schema", "test_faketensor"))
    w = torch.randn(2, 1, 4, 4)
    torch.library.opcheck(dc.forward, (x, w, s, [2, 2], [1, 1], [0, 0], [7, 9]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(dc.backward, (torch.randn(1, 2, 7, 9), x, w, [2, 2], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))
