"""Triton kernels of crop_concat_conv2d (fastseg.triton.crop_concat_conv2d) under triton's
interpreter, on CPU: the forward implicit GEMM and both backward modes ("kernels": the dgrad /
wgrad implicit GEMMs; "views": PyTorch on zero-copy views).

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

from fastseg.ops import _checks, _reference  # noqa: E402
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
    bf16 = x.bfloat16()
    assert any("11584" in r for r in ccc.not_supported_reasons(bf16, bf16, bf16))
    assert ccc.not_supported_reasons(x.half(), x.half(), x.half()) == []


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


# --- backward ---------------------------------------------------------------------------------

@pytest.fixture
def backward_mode():
    """Set the backward mode for one test, restored afterwards."""
    saved = ccc.get_backward_mode()
    yield ccc.set_backward_mode
    ccc.set_backward_mode(saved)


def _expected_backward(skip, x, weight, b, padding, relu, grad):
    """torch autograd of the reference composition (crop + cat + conv2d + relu)."""
    leaves = [t.detach().clone().requires_grad_() for t in (skip, x, weight)]
    bias = (b if b is not None else torch.zeros(weight.shape[0], dtype=x.dtype))
    bias = bias.detach().clone().requires_grad_()
    expected = _reference.crop_concat_conv2d(*leaves, bias, padding, "relu" if relu else None)
    return expected, torch.autograd.grad(expected, leaves + [bias], grad)


def _check_backward(ours, expected, skip, x, weight, dtype):
    for name, g, e in zip(("skip", "x", "weight", "bias"), ours, expected):
        _close(g, e, f"grad {name}", dtype)
    grad_skip, grad_x, grad_weight, grad_bias = ours
    fmt = lambda t: (torch.channels_last if _checks.channels_last_output(t)  # noqa: E731
                     else torch.contiguous_format)
    assert grad_skip.is_contiguous(memory_format=fmt(skip)), grad_skip.stride()
    assert grad_x.is_contiguous(memory_format=fmt(x)), grad_x.stride()
    assert grad_weight.is_contiguous() and grad_bias.shape == (weight.shape[0],)
    # Exactly zero outside the crop window.
    oy, ox = ccc.crop_offset(skip, x)
    border = torch.ones(skip.shape[2:], dtype=torch.bool)
    border[oy:oy + x.shape[2], ox:ox + x.shape[3]] = False
    assert not grad_skip[:, :, border].any(), "grad_skip is not zero outside the crop window"


# (N, Cs, Cx, Cout, H, W, extra rows, extra columns, k, padding, relu, layout)
_BACKWARD_CASES = [
    pytest.param(1, 3, 5, 4, 5, 6, 3, 1, 3, 1, True, "nchw", id="3x3-same-odd-crop-relu"),
    pytest.param(2, 4, 2, 3, 4, 5, 2, 5, 3, 0, False, "channels_last", id="3x3-valid-cl"),
    pytest.param(1, 2, 3, 5, 3, 4, 1, 0, 1, 0, True, "channels_last", id="1x1-relu-cl"),
    pytest.param(1, 3, 0, 4, 4, 3, 1, 3, 3, 1, True, "nchw", id="3x3-cx0-relu"),
    pytest.param(1, 2, 2, 3, 3, 5, 0, 0, 3, 0, True, "sliced", id="3x3-nocrop-sliced-relu"),
]


@pytest.mark.parametrize("mode", ccc.BACKWARD_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("N,Cs,Cx,Cout,H,W,dh,dw,k,padding,relu,layout", _BACKWARD_CASES)
def test_backward_matches_autograd(N, Cs, Cx, Cout, H, W, dh, dw, k, padding, relu, layout,
                                   dtype, mode, backward_mode):
    """Both backward modes against torch autograd of the reference composition."""
    backward_mode(mode)
    _seed("backward", N, Cs, Cx, Cout, H, W, dh, dw, k, padding, relu, layout, str(dtype))
    skip, x, weight, b = _inputs(N, Cs, Cx, Cout, H, W, dh, dw, k, True, layout, dtype)
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, padding, 1 if relu else 0)
    grad = torch.randn_like(out)
    expected_out, expected = _expected_backward(skip, x, weight, b, padding, relu, grad)
    _close(out, expected_out, "out", dtype)
    if relu:
        assert (out == 0).any() and (out > 0).any(), "the ReLU mask should matter"
    ours = ccc.backward(grad, out, skip, x, weight, padding, 1 if relu else 0)
    _check_backward(ours, expected, skip, x, weight, dtype)


def test_backward_strided_grad_and_output_layouts(backward_mode):
    """grad_output with zero strides (an expanded gradient) and output in another layout
    than grad_output: the kernels read both through their own strides."""
    backward_mode("kernels")
    _seed("strided-grad")
    skip, x, weight, b = _inputs(1, 3, 2, 4, 5, 4, 2, 3, 3, True, "nchw", torch.float64)
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, 1, 1).to(memory_format=torch.channels_last)
    grad = torch.randn(1, 4, 1, 1, dtype=torch.float64).expand_as(out)
    _, expected = _expected_backward(skip, x, weight, b, 1, True, grad)
    ours = ccc.backward(grad, out, skip, x, weight, 1, 1)
    _check_backward(ours, expected, skip, x, weight, torch.float64)


# Tiny tiles (16 x 16 x 16, one warp) so that every dimension has several tiles and a tail:
# pixels (M = 40, P = 40 or 24 or 60), skip channels (17: two tiles), x channels (5), Cout
# (18: two tiles in the wgrad, two chunks in the dgrad reduction), and the wgrad split
# (split_len 32 over P pixels: the last split is partial).
@pytest.mark.parametrize("k,padding,relu,layout", [
    (3, 1, True, "nchw"), (3, 0, False, "channels_last"), (1, 0, True, "channels_last")])
def test_backward_tiny_tiles_every_tail(k, padding, relu, layout):
    _seed("tiny-backward", k, padding, relu, layout)
    skip, x, weight, b = _inputs(2, 17, 5, 18, 5, 4, 3, 2, k, True, layout, torch.float64)
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, padding, int(relu))
    grad = torch.randn_like(out)
    _, expected = _expected_backward(skip, x, weight, b, padding, relu, grad)
    ours = ccc.backward_kernels(grad, out, skip, x, weight, padding, int(relu),
                                dgrad_config=TINY, wgrad_config=TINY, split_len=32)
    _check_backward(ours, expected, skip, x, weight, torch.float64)
    again = ccc.backward_kernels(grad, out, skip, x, weight, padding, int(relu),
                                 dgrad_config=TINY, wgrad_config=TINY, split_len=32)
    for first, second in zip(ours, again):
        assert torch.equal(first, second), "the backward is not bit-for-bit repeatable"


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
def test_backward_low_precision_error_within_twice_eager(dtype):
    """16-bit inputs: the kernels' gradient errors against a float64 reference are at most
    twice (plus a rounding floor) those of eager PyTorch at the same dtype. (bfloat16 only on
    a GPU: the interpreter's tl.dot multiplies its raw bits, triton-lang/triton#11584.)"""
    _seed("low-precision", str(dtype))
    skip, x, weight, b = _inputs(1, 6, 5, 7, 6, 5, 2, 3, 3, True, "channels_last",
                                 torch.float64)
    grad = torch.randn(1, 7, 6, 5, dtype=torch.float64)
    _, exact = _expected_backward(skip, x, weight, b, 1, False, grad)
    low = [t.to(dtype) for t in (skip, x, weight, b, grad)]
    _, eager = _expected_backward(*low[:4], 1, False, low[4])
    with torch.no_grad():
        out = ccc.forward(*low[:4], 1, 0)
    ours = ccc.backward_kernels(low[4], out, low[0], low[1], low[2], 1, 0)
    floor = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for name, o, e, ref in zip(("skip", "x", "weight", "bias"), ours, eager, exact):
        assert o.dtype == dtype
        ours_error = (o.double() - ref).abs().max().item()
        eager_error = (e.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert ours_error <= 2 * eager_error + floor * scale, (name, ours_error, eager_error)


def test_zero_outside_window():
    grad_skip = torch.full((2, 3, 9, 8), float("nan"), dtype=torch.float64)
    x = torch.empty(2, 1, 4, 3)
    ccc.zero_outside_window(grad_skip, x)
    oy, ox = ccc.crop_offset(grad_skip, x)
    assert (oy, ox) == (2, 2)
    window = grad_skip[:, :, oy:oy + 4, ox:ox + 3]
    assert window.isnan().all(), "the window must be left to the kernel"
    window.zero_()
    assert not grad_skip.isnan().any() and not grad_skip.any()
    # channels_last and no crop at all
    grad_skip = torch.full((1, 2, 4, 3), float("nan")).to(memory_format=torch.channels_last)
    ccc.zero_outside_window(grad_skip, x)
    assert grad_skip.isnan().all()


def test_backward_mode_setting(backward_mode):
    assert ccc.BACKWARD_MODES == ("kernels", "views")
    assert ccc.backward_mode_from_env({}) == "kernels"
    assert ccc.backward_mode_from_env({"FASTSEG_TRITON_CCC_BACKWARD": ""}) == "kernels"
    assert ccc.backward_mode_from_env({"FASTSEG_TRITON_CCC_BACKWARD": "views"}) == "views"
    with pytest.raises(ValueError, match="'kernels', 'views'"):
        ccc.backward_mode_from_env({"FASTSEG_TRITON_CCC_BACKWARD": "cudnn"})
    with pytest.raises(ValueError, match="'kernels', 'views'"):
        ccc.set_backward_mode("kernel")
    backward_mode("views")
    assert ccc.get_backward_mode() == "views"
    assert ccc.autotune_from_env({}) is True
    assert ccc.autotune_from_env({"FASTSEG_TRITON_CCC_AUTOTUNE": "0"}) is False
    with pytest.raises(ValueError, match="FASTSEG_TRITON_CCC_AUTOTUNE"):
        ccc.autotune_from_env({"FASTSEG_TRITON_CCC_AUTOTUNE": "yes"})
    # never under the interpreter (nor for CPU tensors)
    assert not ccc.uses_autotune(torch.empty(1), None)


def test_wgrad_split():
    quantum = ccc.WGRAD_SPLIT_QUANTUM
    for config in ccc.WGRAD_AUTOTUNE_CONFIGS + (TINY,):
        for dtype in (torch.bfloat16, torch.float32):
            assert quantum % config.block_k_for(dtype) == 0, config
    for pixels, cout, cin, k in [(8 * 388 * 388, 64, 128, 3), (8 * 28 * 28, 512, 1024, 3),
                                 (1, 1, 1, 1), (0, 4, 4, 3), (100_000, 2, 64, 1)]:
        splits, length = ccc.wgrad_split(pixels, cout, cin, k)
        assert length % quantum == 0 and splits >= 1
        assert (splits - 1) * length < max(pixels, 1) <= splits * length
        assert (splits, length) == ccc.wgrad_split(pixels, cout, cin, k)
    assert ccc.wgrad_split(8 * 388 * 388, 64, 128, 3)[0] > 1  # U-Net level 1 is split
    assert ccc.wgrad_split(8 * 28 * 28, 512, 1024, 3)[0] == 1  # deep levels have tiles enough


def test_select_backward_configs():
    w64 = torch.empty(64, 128, 3, 3)
    w512 = torch.empty(512, 1024, 3, 3)
    s64, x64 = torch.empty(1, 64, 140, 140), torch.empty(1, 64, 128, 128)
    s512, x512 = torch.empty(1, 512, 20, 20), torch.empty(1, 512, 16, 16)
    assert ccc.select_dgrad_config(s64, x64) == ccc.DGRAD_CONFIGS[0]
    assert ccc.select_dgrad_config(s512, torch.empty(1, 512, 128, 128)) == ccc.DGRAD_CONFIGS[1]
    assert ccc.select_dgrad_config(s512, x512) == ccc.DGRAD_CONFIGS[2]
    assert ccc.select_wgrad_config(s64, x64, w64) == ccc.WGRAD_CONFIGS[0]
    assert ccc.select_wgrad_config(s512, x512, w512) == ccc.WGRAD_CONFIGS[1]
    for name, configs in ccc.AUTOTUNE_CONFIGS.items():
        assert len(set(configs)) == len(configs), name
    assert ccc.FORWARD_AUTOTUNE_CONFIGS[:len(ccc.SHIPPED_CONFIGS)] == ccc.SHIPPED_CONFIGS
    assert ccc.DGRAD_AUTOTUNE_CONFIGS[:len(ccc.DGRAD_CONFIGS)] == ccc.DGRAD_CONFIGS
    assert ccc.WGRAD_AUTOTUNE_CONFIGS[:len(ccc.WGRAD_CONFIGS)] == ccc.WGRAD_CONFIGS


def test_opcheck_backward_views(backward_mode):
    """The views backward through opcheck too (test_opcheck covers the default, kernels)."""
    backward_mode("views")
    _seed("opcheck-views")
    skip, x, weight, b = _inputs(1, 2, 3, 2, 3, 4, 1, 2, 3, True, "nchw", torch.float64)
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, 1, 1)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastseg.crop_concat_conv2d_backward_triton,
                          (grad, out, skip, x, weight, 1, 1))


def test_backward_int64_index_path(monkeypatch):
    """The INT64_INDEX variants of the dgrad / wgrad kernels (normally only for tensors
    past 2^31 elements), forced."""
    monkeypatch.setattr(ccc, "needs_int64", lambda *tensors, margin=0: True)
    _seed("int64")
    skip, x, weight, b = _inputs(1, 3, 2, 4, 4, 5, 3, 2, 3, True, "channels_last",
                                 torch.float64)
    with torch.no_grad():
        out = ccc.forward(skip, x, weight, b, 1, 1)
    grad = torch.randn_like(out)
    _, expected = _expected_backward(skip, x, weight, b, 1, True, grad)
    ours = ccc.backward_kernels(grad, out, skip, x, weight, 1, 1)
    _check_backward(ours, expected, skip, x, weight, torch.float64)


@pytest.mark.parametrize("mode", ccc.BACKWARD_MODES)
def test_backward_empty_batch(mode, backward_mode):
    backward_mode(mode)
    for N, Cout in ((0, 3),):
        skip = torch.randn(N, 2, 6, 5, dtype=torch.float64)
        x = torch.randn(N, 3, 4, 4, dtype=torch.float64)
        weight = torch.randn(Cout, 5, 3, 3, dtype=torch.float64)
        out = ccc.forward(skip, x, weight, None, 1, 1)
        grad = torch.randn_like(out)
        grad_skip, grad_x, grad_weight, grad_bias = ccc.backward(grad, out, skip, x, weight,
                                                                 1, 1)
        assert grad_skip.shape == skip.shape and not grad_skip.any()
        assert grad_x.shape == x.shape and not grad_x.any()
        assert grad_weight.shape == weight.shape and not grad_weight.any()
        assert grad_bias.shape == (Cout,) and not grad_bias.any()


def test_wgrad_split_len_must_fit_the_config():
    skip, x, weight, _ = _inputs(1, 2, 2, 2, 3, 3, 0, 0, 3, False, "nchw", torch.float64)
    out = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of BLOCK_K 16"):
        ccc.launch_wgrad(out, out, skip, x, weight, 1, 0, config=TINY, split_len=24)
