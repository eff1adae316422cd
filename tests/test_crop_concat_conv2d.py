"""fastseg.ops.crop_concat_conv2d (and nn.CropConcatConv2d) against crop + cat + F.conv2d + relu.

The contract (DESIGN.md, "Op contracts"):

    crop_concat_conv2d(skip, x, weight, bias, padding, activation)
      == act(F.conv2d(torch.cat([center_crop(skip, x.shape[-2:]), x], 1), weight, bias,
                      padding=padding))

center_crop's offset is ((Hs - H) // 2, (Ws - W) // 2) (floor); 3x3 or 1x1 kernels, padding 0
or 1 (3x3 only), stride 1, activation None or "relu".

Runs on the CPU here; with a GPU the same tests run on CUDA tensors (marked `cuda`). Every
test is parametrized over (device, backend), taken from the op's own registry: a backend is
tested on a device when `OP.not_supported_reasons(name, ...)` is empty for float32 inputs
there (today: "cpu" and "reference" on the CPU, "reference" on CUDA; the fused CUDA / Triton
kernels join automatically once their reasons go empty). The reference backend is tested too:
it checks the Python layer (argument handling, dispatch) against the independent eager
composition written here.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg import _backend
from fastseg.ops import _checks, _reference, crop_concat_conv2d
from fastseg.ops.crop_concat_conv2d import OP as REGISTRY

from conftest import HAS_CUDA, fused_backends
from decoder_helpers import (
    GRAD_LAYOUTS, LAYOUTS, assert_error_at_most_twice_eager, assert_results_close, check_format,
    compiled_matches_uncompiled, expect_channels_last, has_kernel, rand, to_layout,
)

OP = "crop_concat_conv2d"
NAMES = ("out", "grad_skip", "grad_x", "grad_weight", "grad_bias")
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]


# --- (device, backend) parameters from the registry -----------------------------------------

def _sample(device, dtype=torch.float32):
    return (torch.zeros(1, 2, 6, 6, device=device, dtype=dtype),
            torch.zeros(1, 2, 4, 4, device=device, dtype=dtype),
            torch.zeros(3, 4, 3, 3, device=device, dtype=dtype))


def _served(device, dtype=torch.float32):
    """The backends whose reasons are empty for `dtype` inputs on `device`."""
    return [name for name in _backend.BACKENDS
            if not REGISTRY.not_supported_reasons(name, *_sample(device, dtype))]


def device_backends(reference=True):
    """pytest params (device, backend) for float32 inputs; a placeholder (skipped) CUDA
    param when there is no GPU, so that the CUDA cases show up as skipped."""
    params = []
    for device in ("cpu", "cuda"):
        marks = CUDA_MARKS if device == "cuda" else []
        names = _served(device) if device == "cpu" or HAS_CUDA else ["reference"]
        if not reference:
            names = [n for n in names if n != "reference"]
            if device == "cuda" and not names:
                names = ["fused"]  # placeholder: skipped below (no GPU here)
        for name in names:
            params.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return params


def skip_unless_served(device, backend, dtype):
    if backend == "fused":
        pytest.skip("no CUDA device: the fused GPU backends (cuda, triton) are not tested here")
    if backend not in _served(device, dtype):
        pytest.skip(f"backend {backend!r} does not take {dtype} on {device}")


def fused(backend):
    return backend != "reference"


# --- the contract, written independently of fastseg.ops._reference ------------------------

def eager(skip, x, weight, bias=None, padding=0, activation=None):
    h, w = x.shape[2], x.shape[3]
    oy, ox = (skip.shape[2] - h) // 2, (skip.shape[3] - w) // 2
    out = F.conv2d(torch.cat([skip[:, :, oy:oy + h, ox:ox + w], x], dim=1), weight, bias,
                   padding=padding)
    return torch.relu(out) if activation == "relu" else out


def make_case(n, cs, cx, cout, skip_hw, x_hw, k, with_bias, device, dtype, seed):
    skip = rand((n, cs) + tuple(skip_hw), device, dtype, seed)
    x = rand((n, cx) + tuple(x_hw), device, dtype, seed + 1)
    # zero-mean, scaled like nn.Conv2d's init, so that ReLU keeps a mix of signs
    weight = rand((cout, cs + cx, k, k), device, dtype, seed + 2, scale=(cs + cx) ** -0.5) - 0.25
    bias = rand((cout,), device, dtype, seed + 3) - 0.25 if with_bias else None
    return skip, x, weight, bias


def out_hw(x_hw, k, padding):
    return (x_hw[0] + 2 * padding - k + 1, x_hw[1] + 2 * padding - k + 1)


def run(fn, skip, x, weight, bias, grad_out, **kw):
    """Output and gradients (skip, x, weight, bias or None) for a given output gradient."""
    leaves = [t.detach().requires_grad_(True) for t in (skip, x, weight)]
    b = None if bias is None else bias.detach().requires_grad_(True)
    out = fn(*leaves, b, **kw)
    out.backward(grad_out)
    return (out.detach(),) + tuple(t.grad for t in leaves) + (None if b is None else b.grad,)


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


KP = [pytest.param(3, 0, id="3x3-p0"), pytest.param(3, 1, id="3x3-p1"),
      pytest.param(1, 0, id="1x1-p0")]
BIAS_ACT = [pytest.param(b, a, id=f"{'bias' if b else 'nobias'}-{a or 'linear'}")
            for b in (True, False) for a in (None, "relu")]

# (id, N, Cs, Cx, Cout, skip (Hs, Ws), x (H, W))
GEOMETRY_CASES = [
    # U-Net's four decoder levels (568->392, 280->200, 136->104, 64->56), spatially / 8
    # (the offsets 11, 5, 2 and 0 (floor of 1/2) instead of 88, 40, 16, 4)
    ("unet-l1/8", 1, 3, 3, 2, (71, 71), (49, 49)),
    ("unet-l2/8", 2, 4, 4, 3, (35, 35), (25, 25)),
    ("unet-l3/8", 1, 5, 3, 4, (17, 17), (13, 13)),
    ("unet-l4/8", 2, 3, 5, 2, (8, 8), (7, 7)),
    ("odd-both", 1, 2, 3, 3, (12, 9), (7, 4)),       # offset (2, 2), both differences odd
    ("odd-W-only", 1, 2, 2, 2, (7, 11), (7, 6)),     # offset (0, 2)
    ("1xN", 1, 2, 2, 3, (5, 12), (3, 9)),            # H = 3: the smallest valid 3x3-p0 input
    # more output channels than one vector (the CPU kernel's channel-vectorized tile; narrower
    # outputs take its pixel-vectorized one), for the forward and the input gradient
    ("wide", 2, 19, 21, 37, (13, 12), (9, 8)),
    ("wide-out", 1, 5, 6, 35, (10, 11), (8, 7)),
]
# these run every (bias, activation) combination too
OPTION_CASES = [
    ("odd-diff", 2, 3, 2, 4, (9, 10), (6, 6)),       # offset (1, 2)
    ("equal", 2, 3, 4, 5, (6, 7), (6, 7)),           # no crop
    ("C1", 3, 1, 1, 1, (9, 9), (5, 5)),
    ("Cs0", 1, 0, 3, 2, (8, 8), (5, 5)),             # no skip channels (skip_channels=0)
]
TWO_OPTIONS = [pytest.param(True, "relu", id="bias-relu"),
               pytest.param(False, None, id="nobias-linear")]


def _matrix():
    for case in GEOMETRY_CASES:
        for opts in TWO_OPTIONS:
            yield pytest.param(case, *opts.values, id=f"{case[0]}-{opts.id}")
    for case in OPTION_CASES:
        for opts in BIAS_ACT:
            yield pytest.param(case, *opts.values, id=f"{case[0]}-{opts.id}")


# --- values and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("k,padding", KP)
@pytest.mark.parametrize("case,with_bias,activation", list(_matrix()))
def test_matches_eager_float64(device, backend, k, padding, with_bias, activation, case):
    """Output and gradients (skip, x, weight, bias) vs the eager composition, float64."""
    skip_unless_served(device, backend, torch.float64)
    _, n, cs, cx, cout, skip_hw, x_hw = case
    dtype = torch.float64
    skip, x, weight, bias = make_case(n, cs, cx, cout, skip_hw, x_hw, k, with_bias, device, dtype,
                                      seed=10 * k + padding)
    grad = rand((n, cout) + out_hw(x_hw, k, padding), device, dtype, seed=7)
    kw = dict(padding=padding, activation=activation)
    ref = run(eager, skip, x, weight, bias, grad, **kw)
    got = run(crop_concat_conv2d, skip, x, weight, bias, grad, backend=backend, **kw)
    msg = f"{backend} {case[0]} k={k} p={padding} bias={with_bias} act={activation}"
    assert_results_close(NAMES, got, ref, tol(dtype), msg, dtype=dtype)
    if activation == "relu":  # the mask is exercised: some outputs clipped, some not
        assert (ref[0] == 0).any() and (ref[0] > 0).any(), msg
    if fused(backend):
        check_format(got[0], x, msg)


FLOAT32_CASES = [
    ("unet-l3-like", 2, 16, 16, 8, (26, 26), (20, 20)),
    ("odd", 1, 12, 20, 16, (23, 19), (16, 14)),
    ("wide", 1, 24, 24, 40, (18, 18), (14, 14)),
]


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("activation", [None, "relu"], ids=["linear", "relu"])
@pytest.mark.parametrize("k,padding", KP)
@pytest.mark.parametrize("case", FLOAT32_CASES, ids=[c[0] for c in FLOAT32_CASES])
def test_float32_error_at_most_twice_eager(device, backend, k, padding, activation, case):
    """float32: the max error vs float64 at most 2x eager float32's (same device)."""
    skip_unless_served(device, backend, torch.float32)
    _, n, cs, cx, cout, skip_hw, x_hw = case
    inputs64 = make_case(n, cs, cx, cout, skip_hw, x_hw, k, True, device, torch.float64, seed=31)
    grad64 = rand((n, cout) + out_hw(x_hw, k, padding), device, torch.float64, seed=32)
    inputs32 = [t.float() for t in inputs64]
    kw = dict(padding=padding, activation=activation)
    ref = run(eager, *inputs64, grad64, **kw)
    theirs = run(eager, *inputs32, grad64.float(), **kw)
    ours = run(crop_concat_conv2d, *inputs32, grad64.float(), backend=backend, **kw)
    assert_error_at_most_twice_eager(NAMES, ours, theirs, ref, torch.float32,
                                     f"{device}-{backend} {case[0]} k={k} p={padding} {activation}")


# bf16 / fp16 on the GPU: channel counts that are multiples of 8 take the CUDA kernel's
# cp.async path in channels_last, the odd ones its element loader; Cout % 8 != 0; one source
# without channels.
LOW_PRECISION_CASES = [
    ("wide-8s", 2, 8, 16, 24, (30, 29), (20, 20)),
    ("odd", 1, 5, 11, 13, (23, 19), (16, 14)),
    ("Cx0", 1, 8, 0, 16, (12, 12), (10, 10)),
    ("Cs0", 2, 0, 8, 8, (10, 10), (10, 10)),
]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k,padding", KP)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[c[0] for c in LOW_PRECISION_CASES])
def test_low_precision_gpu_error_at_most_twice_eager(dtype, backend, layout, k, padding, case):
    """bf16 / fp16 on CUDA: values and gradients within twice eager's error at that dtype
    (float64 reference), in both layouts; ReLU on (its mask is the backward's hard part;
    the linear op is the same kernels without it)."""
    activation = "relu"
    skip_unless_served("cuda", backend, dtype)
    _, n, cs, cx, cout, skip_hw, x_hw = case
    inputs64 = make_case(n, cs, cx, cout, skip_hw, x_hw, k, True, "cuda", torch.float64, seed=41)
    grad64 = rand((n, cout) + out_hw(x_hw, k, padding), "cuda", torch.float64, seed=42)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    low = [t.to(dtype) for t in inputs64[:3]]
    low = [t.contiguous(memory_format=fmt) for t in low[:2]] + [low[2], inputs64[3].to(dtype)]
    kw = dict(padding=padding, activation=activation)
    ref = run(eager, *inputs64, grad64, **kw)
    theirs = run(eager, *low, grad64.to(dtype), **kw)
    ours = run(crop_concat_conv2d, *low, grad64.to(dtype), backend=backend, **kw)
    assert_error_at_most_twice_eager(NAMES, ours, theirs, ref, dtype,
                                     f"cuda-{backend} {case[0]} {layout} k={k} p={padding} {activation}")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("activation", [None, "relu"], ids=["linear", "relu"])
def test_real_size_unet_level(device, backend, activation):
    """U-Net's last decoder level at its real size: skip 64x64 cropped (offset 4) to 56x56."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(1, 2, 2, 3, (64, 64), (56, 56), 3, True, device, dtype, seed=41)
    grad = rand((1, 3, 54, 54), device, dtype, seed=42)
    kw = dict(padding=0, activation=activation)
    got = run(crop_concat_conv2d, skip, x, weight, bias, grad, backend=backend, **kw)
    if dtype == torch.float64:
        ref = run(eager, skip, x, weight, bias, grad, **kw)
        assert_results_close(NAMES, got, ref, tol(dtype), "real-size", dtype=dtype)
    else:
        ref = run(eager, *[t.double() for t in (skip, x, weight, bias, grad)], **kw)
        theirs = run(eager, skip, x, weight, bias, grad, **kw)
        assert_error_at_most_twice_eager(NAMES, got, theirs, ref, dtype, "real-size")
    assert got[0].shape == (1, 3, 54, 54)
    # the skip's border of 4 outside the 56x56 window gets no gradient
    border = torch.ones_like(got[1], dtype=torch.bool)
    border[:, :, 4:60, 4:60] = False
    assert torch.equal(got[1][border], torch.zeros_like(got[1][border]))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("skip_hw,x_hw,offset", [
    ((9, 8), (6, 5), (1, 1)), ((10, 7), (7, 4), (1, 1)), ((7, 7), (4, 6), (1, 0)),
    ((6, 9), (6, 4), (0, 2)), ((5, 5), (5, 5), (0, 0)), ((71, 35), (49, 25), (11, 5)),
], ids=["9x8-6x5", "10x7-7x4", "7x7-4x6", "6x9-6x4", "equal", "71x35-49x25"])
def test_center_crop_window_is_floor(device, backend, skip_hw, x_hw, offset):
    """With an identity 1x1 weight the output is cat([crop, x]): the crop's window is pinned
    to hard-coded offsets (floor of half the difference), not only to a formula."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip = rand((2, 3) + skip_hw, device, dtype, seed=51)
    x = rand((2, 2) + x_hw, device, dtype, seed=52)
    eye = torch.eye(5, dtype=dtype, device=device)[:, :, None, None]
    out = crop_concat_conv2d(skip, x, eye, backend=backend)
    oy, ox = offset
    assert _reference.center_crop_offset(skip_hw, x_hw) == offset
    assert torch.equal(out[:, :3], skip[:, :, oy:oy + x_hw[0], ox:ox + x_hw[1]])
    assert torch.equal(out[:, 3:], x)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("k,padding", KP)
def test_skip_gradient_zero_outside_the_window(device, backend, k, padding):
    """grad_skip is exactly 0 outside the crop window and the eager value inside."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(2, 3, 2, 4, (15, 12), (8, 7), k, True, device, dtype, seed=61)
    grad = rand((2, 4) + out_hw((8, 7), k, padding), device, dtype, seed=62)
    got = run(crop_concat_conv2d, skip, x, weight, bias, grad, padding=padding,
              activation="relu", backend=backend)[1]
    ref = run(eager, skip, x, weight, bias, grad, padding=padding, activation="relu")[1]
    oy, ox = 3, 2  # ((15 - 8) // 2, (12 - 7) // 2)
    inside = torch.zeros_like(got, dtype=torch.bool)
    inside[:, :, oy:oy + 8, ox:ox + 7] = True
    assert torch.equal(got[~inside], torch.zeros_like(got[~inside]))
    assert (got[inside] != 0).float().mean() > 0.5  # the window does get gradient
    torch.testing.assert_close(got[inside], ref[inside], **tol(dtype))


@pytest.mark.parametrize("device,backend", device_backends())
def test_partial_requires_grad(device, backend):
    """Only the inputs that require grad get one (frozen weight / bias, constant skip)."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(1, 2, 3, 2, (9, 9), (6, 6), 3, True, device, dtype, seed=65)
    x.requires_grad_(True)
    out = crop_concat_conv2d(skip, x, weight, bias, 1, "relu", backend=backend)
    out.sum().backward()
    assert skip.grad is None and weight.grad is None and bias.grad is None
    x_ref = x.detach().requires_grad_(True)
    eager(skip, x_ref, weight, bias, 1, "relu").sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))


@pytest.mark.parametrize("device,backend", device_backends())
def test_zero_x_channels(device, backend, request):
    """x with no channels (the module accepts x_channels=0): the skip's convolution alone."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(1, 3, 0, 2, (9, 9), (6, 6), 3, True, device, dtype, seed=66)
    grad = rand((1, 2, 4, 4), device, dtype, seed=67)
    got = run(crop_concat_conv2d, skip, x, weight, bias, grad, backend=backend)
    ref = run(eager, skip, x, weight, bias, grad)
    assert_results_close(NAMES, got, ref, tol(dtype), "Cx=0", dtype=dtype)


# --- layouts ----------------------------------------------------------------------------

def _layout_matrix():
    """Every (x, skip) layout pair; the grad_output layouts cycle through the pairs."""
    for i, x_layout in enumerate(LAYOUTS):
        for j, skip_layout in enumerate(LAYOUTS):
            grad_layout = GRAD_LAYOUTS[(i + j) % len(GRAD_LAYOUTS)]
            yield pytest.param(x_layout, skip_layout, grad_layout,
                               id=f"x={x_layout}-skip={skip_layout}-grad={grad_layout}")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("x_layout,skip_layout,grad_layout", list(_layout_matrix()))
def test_layouts(device, backend, x_layout, skip_layout, grad_layout):
    """Any strides of skip, x and grad_output; the output is channels_last iff x is (and
    not also contiguous)."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(2, 3, 4, 5, (11, 10), (7, 8), 3, True, device, dtype, seed=71)
    skip, x = to_layout(skip, skip_layout), to_layout(x, x_layout)
    grad = to_layout(rand((2, 5, 7, 8), device, dtype, seed=72), grad_layout)
    kw = dict(padding=1, activation="relu")
    ref = run(eager, *[t.contiguous() for t in (skip, x, weight, bias, grad)], **kw)
    got = run(crop_concat_conv2d, skip, x, weight, bias, grad, backend=backend, **kw)
    msg = f"{backend} x={x_layout} skip={skip_layout} grad={grad_layout}"
    assert_results_close(NAMES, got, ref, tol(dtype), msg, dtype=dtype)
    if fused(backend):
        check_format(got[0], x, msg)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("weight_layout", ["channels_last", "strided", "transposed", "channel_sliced"])
def test_weight_layouts(device, backend, weight_layout):
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(1, 3, 2, 4, (10, 9), (6, 6), 3, True, device, dtype, seed=75)
    grad = rand((1, 4, 4, 4), device, dtype, seed=76)
    ref = run(eager, skip, x, weight, bias, grad, activation="relu")
    got = run(crop_concat_conv2d, skip, x, to_layout(weight, weight_layout), bias, grad,
              activation="relu", backend=backend)
    assert_results_close(NAMES, got, ref, tol(dtype), weight_layout, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("skip_layout", ["contiguous", "channels_last", "transposed"])
def test_kernel_output_formats(device, x_layout, skip_layout, request):
    """The op's outputs (called directly, below autograd, which would re-stride leaf grads):
    out and grad_x follow x's format, grad_skip skip's, grad_weight contiguous - the formats
    the fake (meta) functions promise."""
    if not has_kernel("crop_concat_conv2d_forward", device):
        pytest.skip(f"fastseg::crop_concat_conv2d_forward has no {device} kernel in this build")
    skip, x, weight, bias = make_case(2, 3, 4, 5, (9, 9), (6, 7), 3, True, device, torch.float32,
                                      seed=77)
    skip, x = to_layout(skip, skip_layout), to_layout(x, x_layout)
    out = torch.ops.fastseg.crop_concat_conv2d_forward(skip, x, weight, bias, 1, 1)
    check_format(out, x, "out")
    grads = torch.ops.fastseg.crop_concat_conv2d_backward(torch.ones_like(out), out, skip, x,
                                                          weight, 1, 1)
    check_format(grads[1], x, "grad_x")
    assert grads[2].is_contiguous() and grads[3].shape == (5,)
    check_format(grads[0], skip, "grad_skip")
    assert _checks.channels_last_output(x) == expect_channels_last(x)


# --- edge sizes, aliasing -----------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("k,padding", KP)
def test_empty_batch(device, backend, k, padding):
    """N = 0 is supported: an empty output, empty skip / x gradients, zero weight / bias
    gradients."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip = torch.randn(0, 2, 9, 9, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(0, 3, 6, 6, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(4, 5, k, k, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, device=device, requires_grad=True)
    out = crop_concat_conv2d(skip, x, weight, bias, padding, "relu", backend=backend)
    assert out.shape == (0, 4) + out_hw((6, 6), k, padding)
    out.sum().backward()
    assert skip.grad.shape == skip.shape and x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device,backend", device_backends())
def test_output_is_new_and_inputs_untouched(device, backend):
    """No aliasing and no in-place writes: an identity 1x1 on equal sizes still returns a
    new tensor; forward and backward leave skip, x, weight, bias and grad_output alone."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    skip, x, weight, bias = make_case(1, 2, 2, 3, (6, 6), (6, 6), 3, True, device, dtype, seed=81)
    eye = torch.eye(4, dtype=dtype, device=device)[:, :, None, None]
    out = crop_concat_conv2d(skip, x, eye, backend=backend)
    assert out.data_ptr() not in (skip.data_ptr(), x.data_ptr(), eye.data_ptr())
    leaves = [t.requires_grad_(True) for t in (skip, x, weight, bias)]
    before = [t.detach().clone() for t in leaves]
    out = crop_concat_conv2d(*leaves, 1, "relu", backend=backend)
    grad = rand(out.shape, device, dtype, seed=82)
    grad0 = grad.clone()
    out.backward(grad)
    for t, t0 in zip(leaves, before):
        assert torch.equal(t.detach(), t0)
    assert torch.equal(grad, grad0)


# --- gradcheck ----------------------------------------------------------------------------

GRADCHECK_CASES = [  # (N, Cs, Cx, Cout, skip hw, x hw): odd and even crop differences
    (1, 2, 1, 2, (6, 6), (3, 4)),
    (2, 1, 1, 1, (5, 4), (4, 3)),
]


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@pytest.mark.parametrize("activation", [None, "relu"], ids=["linear", "relu"])
@pytest.mark.parametrize("k,padding", KP)
def test_gradcheck_float64(device, backend, k, padding, activation):
    if device != "cpu":
        pytest.skip("float64 gradcheck runs on the CPU")
    for i, (n, cs, cx, cout, skip_hw, x_hw) in enumerate(GRADCHECK_CASES):
        inputs = make_case(n, cs, cx, cout, skip_hw, x_hw, k, i == 0, "cpu", torch.float64, seed=91)
        inputs = [t for t in inputs if t is not None]
        for t in inputs:
            t.requires_grad_(True)

        def fn(skip, x, weight, bias=None):
            return crop_concat_conv2d(skip, x, weight, bias, padding, activation, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7), (i, k, padding)


# --- errors ---------------------------------------------------------------------------

def _error_cases():
    skip = torch.randn(2, 3, 10, 12)
    x = torch.randn(2, 2, 6, 8)
    weight = torch.randn(4, 5, 3, 3)
    bias = torch.randn(4)
    return dict(skip=skip, x=x, weight=weight, bias=bias), [
        (dict(skip=torch.randn(2, 3, 5, 12)), ValueError,
         r"skip of spatial size \(5, 12\) is smaller than x's \(6, 8\)"),
        (dict(skip=torch.randn(2, 3, 10, 7)), ValueError,
         r"skip of spatial size \(10, 7\) is smaller than x's \(6, 8\)"),
        (dict(skip=torch.randn(1, 3, 10, 12)), ValueError, "skip has batch 1 but x has 2"),
        (dict(weight=torch.randn(4, 4, 3, 3)), ValueError,
         r"weight has 4 input channels but skip \+ x have 3 \+ 2 = 5"),
        (dict(weight=torch.randn(4, 5, 5, 5)), NotImplementedError,
         r"only 3x3 and 1x1 kernels are supported, got \(5, 5\)"),
        (dict(weight=torch.randn(4, 5, 3, 2)), NotImplementedError,
         r"only 3x3 and 1x1 kernels are supported, got \(3, 2\)"),
        (dict(padding=2), NotImplementedError, r"padding must be 0 \(valid\) or 1 \(same\), got 2"),
        (dict(padding=-1), NotImplementedError, r"padding must be 0 \(valid\) or 1 \(same\), got -1"),
        (dict(padding=True), NotImplementedError, r"padding must be 0 .* got True"),
        (dict(padding="same"), NotImplementedError, r"padding must be 0 .* got 'same'"),
        (dict(padding=1, weight=torch.randn(4, 5, 1, 1)), NotImplementedError,
         "padding 1 is for 3x3 kernels; a 1x1 kernel takes padding 0"),
        (dict(stride=2), TypeError, "unexpected keyword argument 'stride'"),
        (dict(activation="gelu"), ValueError, "activation must be None or 'relu', got 'gelu'"),
        (dict(activation="ReLU"), ValueError, "activation must be None or 'relu', got 'ReLU'"),
        (dict(activation=1), ValueError, "activation must be None or 'relu', got 1"),
        (dict(skip=skip.double()), TypeError, "skip has dtype torch.float64 but x has torch.float32"),
        (dict(weight=weight.double()), TypeError,
         "weight has dtype torch.float64 but x has torch.float32"),
        (dict(weight=weight.half()), TypeError,
         "weight has dtype torch.float16 but x has torch.float32"),
        (dict(bias=bias.double()), TypeError, "bias has dtype torch.float64 but x has torch.float32"),
        (dict(skip=skip.to("meta")), ValueError, "skip is on meta but x is on cpu"),
        (dict(weight=weight.to("meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(bias=bias.to("meta")), ValueError, "bias is on meta but x is on cpu"),
        (dict(x=x.long(), skip=skip.long()), TypeError,
         "skip must be a floating-point tensor, got torch.int64"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor, got torch.int64"),
        (dict(weight=weight.int()), TypeError, "weight must be a floating-point tensor, got torch.int32"),
        (dict(x=x.bool()), TypeError, "x must be a floating-point tensor, got torch.bool"),
        (dict(bias=bias.long()), TypeError, "bias has dtype torch.int64 but x has torch.float32"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must be a \(4,\) tensor, got torch.Size\(\[5\]\)"),
        (dict(bias=torch.randn(1, 4)), ValueError, r"bias must be a \(4,\) tensor, got torch.Size\(\[1, 4\]\)"),
        (dict(bias=[0.0] * 4), ValueError, r"bias must be a \(4,\) tensor, got list"),
        (dict(x=torch.randn(2, 2, 2, 8), skip=torch.randn(2, 3, 4, 12)), ValueError,
         r"x of spatial size \(2, 8\) is smaller than the 3x3 kernel with padding 0"),
        (dict(x=torch.randn(2, 2, 6, 0), skip=torch.randn(2, 3, 10, 2),
              weight=torch.randn(4, 5, 1, 1)), ValueError,
         r"x of spatial size \(6, 0\) is smaller than the 1x1 kernel with padding 0"),
        (dict(x=x[0]), ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(2, 6, 8\)"),
        (dict(skip=skip[0]), ValueError, r"skip must be 4-D \(N, C, H, W\)"),
        (dict(weight=weight[0]), ValueError, r"weight must be 4-D \(N, C, H, W\)"),
        (dict(x="x"), TypeError, "x must be a Tensor, got str"),
        (dict(skip=None), TypeError, "skip must be a Tensor, got NoneType"),
    ]


@pytest.mark.parametrize("index", range(len(_error_cases()[1])))
def test_bad_arguments_raise_clear_errors(index):
    base, cases = _error_cases()
    override, error, pattern = cases[index]
    kw = dict(base, padding=0, activation=None)
    kw.update(override)
    for name in [None, "reference"] + fused_backends(OP, "cpu"):  # checked before any kernel
        with pytest.raises(error, match=pattern):
            crop_concat_conv2d(**kw, backend=name)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (meta covers a second device on the CPU)")
def test_mixed_devices_on_cuda():
    x = torch.randn(1, 2, 4, 4, device="cuda")
    w = torch.randn(3, 4, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="skip is on cpu but x is on cuda"):
        crop_concat_conv2d(torch.randn(1, 2, 6, 6), x, w)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        crop_concat_conv2d(torch.randn(1, 2, 6, 6, device="cuda"), x, w.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_direct_op_calls_check_their_arguments(device):
    """The C++ checks guard torch.ops.fastseg calls that bypass the Python layer."""
    if not has_kernel("crop_concat_conv2d_forward", device):
        pytest.skip(f"fastseg::crop_concat_conv2d_forward has no {device} kernel in this build")
    op = torch.ops.fastseg.crop_concat_conv2d_forward
    skip = torch.randn(1, 2, 8, 8, device=device)
    x = torch.randn(1, 3, 6, 6, device=device)
    w = torch.randn(4, 5, 3, 3, device=device)
    with pytest.raises(ValueError, match="at least its spatial size"):
        op(torch.randn(1, 2, 5, 8, device=device), x, w, None, 0, 0)
    with pytest.raises(ValueError, match="x's batch"):
        op(torch.randn(2, 2, 8, 8, device=device), x, w, None, 0, 0)
    with pytest.raises(ValueError, match="must have skip \\+ x = 5 input channels"):
        op(skip, x, torch.randn(4, 4, 3, 3, device=device), None, 0, 0)
    with pytest.raises(ValueError, match="kernel must be 3x3 or 1x1"):
        op(skip, x, torch.randn(4, 5, 5, 5, device=device), None, 0, 0)
    with pytest.raises(ValueError, match="padding must be 0, or 1 with a 3x3 kernel"):
        op(skip, x, torch.randn(4, 5, 1, 1, device=device), None, 1, 0)
    with pytest.raises(ValueError, match="padding must be 0, or 1"):
        op(skip, x, w, None, 2, 0)
    with pytest.raises(ValueError, match="activation must be 0 or 1"):
        op(skip, x, w, None, 0, 2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        op(torch.randn(1, 2, 8, 8, device=device), torch.randn(1, 3, 2, 6, device=device), w, None, 0, 0)
    with pytest.raises(ValueError, match="bias must be \\(4,\\)"):
        op(skip, x, w, torch.randn(5, device=device), 0, 0)
    with pytest.raises(TypeError, match="skip has dtype"):
        op(skip.double(), x, w, None, 0, 0)
    with pytest.raises(TypeError, match="weight has dtype"):
        op(skip, x, w.double(), None, 0, 0)
    out = op(skip, x, w, None, 0, 0)
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.fastseg.crop_concat_conv2d_backward(torch.randn(1, 4, 3, 3, device=device), out,
                                                      skip, x, w, 0, 0)


# --- backends ---------------------------------------------------------------------------

def test_registry_serves_float32_cpu_with_the_cpu_kernel():
    """The registry-driven parametrization really tests the C++ kernel when it is built;
    auto takes the first backend of the op's CPU order that can serve (the order itself is a
    performance decision, not pinned here); a backend="reference" override wins."""
    skip, x, w = _sample("cpu")
    if fused_backends(OP, "cpu"):
        assert "cpu" in _served("cpu") and "cpu" in _served("cpu", torch.float64)
    first = next(n for n in REGISTRY.auto_order["cpu"] if n in _served("cpu"))
    assert REGISTRY.select(None, "cpu", skip, x, w) == first
    with fastseg.backend("reference"):
        assert REGISTRY.select(None, "cpu", skip, x, w) == "reference"
    # the GPU auto order ends at the reference backend while the fused kernels are missing
    assert REGISTRY.auto_order["cuda"][-1] == "reference"


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    skip, x, w = rand((1, 2, 6, 6), dtype=torch.float32), rand((1, 2, 4, 4), dtype=torch.float32), \
        rand((3, 4, 3, 3), dtype=torch.float32)
    for name in ("cuda", "triton"):
        with pytest.raises(NotImplementedError) as info:
            crop_concat_conv2d(skip, x, w, backend=name)
        text = str(info.value)
        assert f"fastseg.ops.crop_concat_conv2d: backend {name!r} cannot serve" in text, text
        for other in fastseg.BACKENDS:
            assert f"\n  {other}: " in text, text
        assert "needs cuda tensors" in text or "needs CUDA tensors" in text, text
        assert "  reference: supported" in text
    with pytest.raises(ValueError, match="backend must be one of"):
        crop_concat_conv2d(skip, x, w, backend="gpu")
    with fastseg.backend("cuda"), pytest.raises(NotImplementedError, match="cannot serve"):
        crop_concat_conv2d(skip, x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_cpu_goes_to_the_reference(dtype):
    skip, x, w, b = make_case(1, 3, 2, 4, (9, 8), (6, 6), 3, True, "cpu", dtype, seed=101)
    assert REGISTRY.select(None, "cpu", skip, x, w) == "reference"
    for kw in (dict(padding=0, activation=None), dict(padding=1, activation="relu")):
        out = crop_concat_conv2d(skip, x, w, b, **kw)
        assert out.dtype == dtype
        assert torch.equal(out, _reference.crop_concat_conv2d(skip, x, w, b, **kw))
        assert torch.equal(out, eager(skip, x, w, b, **kw))
        assert torch.equal(crop_concat_conv2d(skip, x, w, b, backend="reference", **kw), out)
    with pytest.raises(NotImplementedError) as info:
        crop_concat_conv2d(skip, x, w, b, backend="cpu")
    text = str(info.value)
    assert "backend 'cpu' cannot serve" in text
    assert f"{dtype} is served by the reference backend on the CPU" in text, text
    for name in fastseg.BACKENDS:
        assert f"\n  {name}: " in text, text


# --- torch.library ------------------------------------------------------------------------

def _op_samples(device):
    """(skip, x, weight, bias, padding, activation) for the forward op."""
    for i, (layout, with_bias, k, padding, activation) in enumerate((
            ("contiguous", True, 3, 1, 1), ("channels_last", False, 1, 0, 0),
            ("channels_last", True, 3, 0, 1))):
        skip, x, w, b = make_case(2, 3, 2, 4, (8, 9), (5, 6), k, with_bias, device, torch.float32,
                                  seed=111 + i)
        yield (to_layout(skip, layout), to_layout(x, layout), w, b, padding, activation)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_opcheck_forward_op(device):
    if not has_kernel("crop_concat_conv2d_forward", device):
        pytest.skip(f"fastseg::crop_concat_conv2d_forward has no {device} kernel in this build")
    for skip, x, w, b, padding, activation in _op_samples(device):
        for t in (skip, x, w, b):
            if t is not None:
                t.requires_grad_(True)
        torch.library.opcheck(torch.ops.fastseg.crop_concat_conv2d_forward.default,
                              (skip, x, w, b, padding, activation))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("index", range(3), ids=["nchw-relu", "cl-1x1", "cl-relu"])
def test_opcheck_backward_op(device, index, request):
    if not has_kernel("crop_concat_conv2d_backward", device):
        pytest.skip(f"fastseg::crop_concat_conv2d_backward has no {device} kernel in this build")
    skip, x, w, b, padding, activation = list(_op_samples(device))[index]
    out = torch.ops.fastseg.crop_concat_conv2d_forward(skip, x, w, b, padding, activation)
    layout = ("strided", "channels_last", "expanded")[index]
    grad = to_layout(rand(out.shape, device, torch.float32, seed=120 + index), layout)
    torch.library.opcheck(torch.ops.fastseg.crop_concat_conv2d_backward.default,
                          (grad, out, skip, x, w, padding, activation))


# --- torch.compile ------------------------------------------------------------------------

def _two_levels(skip1, x1, w1, b1, skip2, w2, backend):
    h = crop_concat_conv2d(skip1, x1, w1, b1, 0, "relu", backend=backend)
    return crop_concat_conv2d(skip2, h, w2, None, 1, None, backend=backend) * 2


@pytest.mark.parametrize("device,backend", device_backends())
def test_torch_compile_fullgraph_matches_eager(device, backend):
    skip_unless_served(device, backend, torch.float32)
    skip1, x1, w1, b1 = make_case(2, 3, 2, 4, (11, 12), (8, 9), 3, True, device, torch.float32, seed=131)
    skip2 = rand((2, 2, 9, 8), device, torch.float32, seed=135)  # cropped to h's (6, 7)
    w2 = rand((3, 6, 3, 3), device, torch.float32, seed=136, scale=0.4)
    leaves = [t.requires_grad_(True) for t in (skip1, x1, w1, b1, skip2, w2)]
    out = compiled_matches_uncompiled(_two_levels, leaves, backend)
    expected = eager(skip2, eager(skip1, x1, w1, b1, 0, "relu"), w2, None, 1) * 2
    close = 2e-5 if device == "cpu" else 2e-3  # CUDA float32 convolutions may use TF32
    torch.testing.assert_close(out, expected, rtol=close, atol=close)


@pytest.mark.parametrize("device,backend", device_backends())
def test_torch_compile_fullgraph_module(device, backend):
    skip_unless_served(device, backend, torch.float32)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastseg.nn.CropConcatConv2d(3, 2, 4, kernel_size=3, padding=1, backend=backend).to(device)
    skip = rand((2, 3, 10, 9), device, torch.float32, seed=141).requires_grad_(True)
    x = rand((2, 2, 7, 6), device, torch.float32, seed=142).requires_grad_(True)

    def step(skip, x):
        return m(skip, x).square().sum()

    leaves = [skip, x, m.weight, m.bias]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(skip, x)
    got = (loss.detach(),) + torch.autograd.grad(loss, leaves)
    loss = step(skip, x)
    expected = (loss.detach(),) + torch.autograd.grad(loss, leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# --- the module -----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("k,padding", KP)
@pytest.mark.parametrize("bias,activation", TWO_OPTIONS)
def test_module_is_a_conv2d(device, backend, k, padding, bias, activation):
    """Same parameters, initialization and state_dict as nn.Conv2d(Cs + Cx, Cout, k, padding,
    bias); weights move both ways; the output is the eager chain through that Conv2d."""
    dtype = torch.float64  # on every device: CUDA convolutions in float32 may use TF32
    skip_unless_served(device, backend, dtype)
    cs, cx, cout = 3, 2, 4
    torch.manual_seed(5)
    m = fastseg.nn.CropConcatConv2d(cs, cx, cout, k, padding=padding, activation=activation,
                                    bias=bias, backend=backend, device=device, dtype=dtype)
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(cs + cx, cout, k, padding=padding, bias=bias, device=device, dtype=dtype)
    assert isinstance(m, torch.nn.Conv2d)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in conv.named_parameters()]
    for (_, p), (_, q) in zip(m.named_parameters(), conv.named_parameters()):
        assert p.shape == q.shape and p.dtype == dtype and p.device.type == device
        assert torch.equal(p, q)  # the same init, from the same RNG draws
    assert list(m.state_dict()) == list(conv.state_dict())

    conv2 = torch.nn.Conv2d(cs + cx, cout, k, padding=padding, bias=bias, device=device, dtype=dtype)
    m.load_state_dict(conv2.state_dict())  # Conv2d -> module
    for p, q in zip(m.parameters(), conv2.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        m.weight.mul_(0.5)
    conv.load_state_dict(m.state_dict())  # module -> Conv2d
    for p, q in zip(m.parameters(), conv.parameters()):
        assert torch.equal(p, q)

    skip = rand((2, cs, 11, 10), device, dtype, seed=151)
    x = rand((2, cx, 6, 7), device, dtype, seed=152)
    out = m(skip, x)
    crop = skip[:, :, 2:8, 1:8]  # ((11 - 6) // 2, (10 - 7) // 2) = (2, 1)
    expected = conv(torch.cat([crop, x], 1))
    if activation == "relu":
        expected = torch.relu(expected)
    torch.testing.assert_close(out, expected, **tol(dtype))
    out.sum().backward()
    expected.sum().backward()
    for p, q in zip(m.parameters(), conv.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol(dtype))


def test_module_arguments_and_repr():
    m = fastseg.nn.CropConcatConv2d(64, 64, 64)
    assert (m.skip_channels, m.x_channels, m.in_channels, m.out_channels) == (64, 64, 128, 64)
    assert m.kernel_size == (3, 3) and m.padding == (0, 0) and m.activation == "relu"
    assert m.bias is not None and m.backend is None
    conv_repr = repr(torch.nn.Conv2d(128, 64, 3))[len("Conv2d("):-1]
    assert repr(m) == f"CropConcatConv2d(skip_channels=64, x_channels=64, {conv_repr}, activation='relu')"
    m = fastseg.nn.CropConcatConv2d(2, 3, 4, kernel_size=1, activation=None, bias=False)
    assert repr(m) == ("CropConcatConv2d(skip_channels=2, x_channels=3, 5, 4, kernel_size=(1, 1), "
                       "stride=(1, 1), bias=False, activation=None)")
    m = fastseg.nn.CropConcatConv2d(2, 3, 4, padding=1)
    assert "padding=(1, 1)" in repr(m)
    with pytest.raises(NotImplementedError, match="kernel_size must be 3 or 1, got 5"):
        fastseg.nn.CropConcatConv2d(2, 3, 4, kernel_size=5)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        fastseg.nn.CropConcatConv2d(2, 3, 4, activation="gelu")
    with pytest.raises(ValueError, match="skip_channels must be a non-negative int, got -1"):
        fastseg.nn.CropConcatConv2d(-1, 3, 4)
    with pytest.raises(ValueError, match="x_channels must be a non-negative int, got 2.0"):
        fastseg.nn.CropConcatConv2d(2, 2.0, 4)
    with pytest.raises(TypeError, match="stride"):
        fastseg.nn.CropConcatConv2d(2, 3, 4, stride=2)
    # the op's checks apply at forward time: padding 1 with a 1x1 kernel
    m = fastseg.nn.CropConcatConv2d(1, 1, 1, kernel_size=1, padding=1)
    with pytest.raises(NotImplementedError, match="padding 1 is for 3x3 kernels"):
        m(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))


def test_module_backend_argument():
    m = fastseg.nn.CropConcatConv2d(2, 2, 3, backend="cpu")
    skip, x = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 6, 6)
    if fused_backends(OP, "cpu"):
        torch.testing.assert_close(m(skip, x), eager(skip, x, m.weight, m.bias, 0, "relu"))
    with pytest.raises(NotImplementedError, match="is served by the reference backend"):
        m.to(torch.bfloat16)(skip.bfloat16(), x.bfloat16())
    m = fastseg.nn.CropConcatConv2d(2, 2, 3, backend="cuda")
    with pytest.raises(NotImplementedError, match="backend 'cuda' cannot serve"):
        m(skip, x)


def test_autocast_casts_like_conv2d():
    """Under autocast the op casts as F.conv2d does: a bfloat16 x with a float32 weight works
    and gives the autocast dtype; float64 is left alone."""
    skip, x, w, b = make_case(1, 3, 2, 4, (9, 8), (6, 6), 3, True, "cpu", torch.float32, seed=111)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crop_concat_conv2d(skip, x.bfloat16(), w, b, padding=1, activation="relu")
        ref = eager(skip, x.bfloat16(), w, b, padding=1, activation="relu")
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)
    m = fastseg.nn.CropConcatConv2d(3, 2, 4, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(skip, x).dtype == torch.bfloat16
        d = [t.double() for t in (skip, x, w, b)]
        assert crop_concat_conv2d(*d).dtype == torch.float64
