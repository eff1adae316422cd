"""fastseg.ops.deconv_add (and nn.DeconvAdd, nn.init.bilinear_) against the eager composition

    F.conv_transpose2d(x, weight, stride=stride, groups=C)[:, :, cy:cy + Ho, cx:cx + Wo]
      + skip[:, :, oy:oy + Ho, ox:ox + Wo]

Runs on the CPU here; with a GPU the same tests run on CUDA tensors (marked `cuda`).
Every test is parametrized over (device, backend): the fused backends expected on the
device (conftest.fused_backends) and, on the CPU, the "reference" backend too.
"""

import functools
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.nn import DeconvAdd
from fastseg.nn.init import bilinear_, bilinear_kernel
from fastseg.ops import deconv_add

from conftest import HAS_CUDA, devices, fused_backends
import decoder_helpers
from decoder_helpers import (
    assert_bitwise_repeatable, assert_error_at_most_twice_eager, assert_layout_results_close,
    assert_results_close, assert_same_under_deterministic_algorithms, check_format,
    compiled_matches_uncompiled, has_kernel, parametrize_layouts, rand, to_layout,
)

OP = "deconv_add"
device_backends = functools.partial(decoder_helpers.device_backends, OP)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def eager(x, weight, stride, skip=None, crop=(0, 0), skip_offset=(0, 0), output_size=None):
    """The contract, written independently of fastseg.ops._reference."""
    full = F.conv_transpose2d(x, weight, stride=stride, groups=x.shape[1])
    cy, cx = crop
    ho, wo = output_size if output_size is not None else (full.shape[2] - cy, full.shape[3] - cx)
    out = full[:, :, cy:cy + ho, cx:cx + wo]
    if skip is None:
        return out
    oy, ox = skip_offset
    return out + skip[:, :, oy:oy + ho, ox:ox + wo]


def run(fn, x, weight, skip, grad, **kw):
    """Output and gradients (x, weight, skip) for a given output gradient."""
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    skip = None if skip is None else skip.detach().requires_grad_(True)
    out = fn(x, weight, skip=skip, **kw)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad, None if skip is None else skip.grad


def make_case(x_shape, k, stride, crop, output_size, skip_spec, device, dtype, seed):
    kh, kw = pair(k)
    sh, sw = pair(stride)
    x = rand(x_shape, device, dtype, seed)
    weight = rand((x_shape[1], 1, kh, kw), device, dtype, seed + 1, scale=0.5)
    full = ((x_shape[2] - 1) * sh + kh, (x_shape[3] - 1) * sw + kw)
    ho, wo = output_size if output_size is not None else (full[0] - crop[0], full[1] - crop[1])
    shape = (x_shape[0], x_shape[1], ho, wo)
    if skip_spec is None:
        return x, weight, None, (0, 0), shape
    oy, ox, eh, ew = skip_spec
    skip = rand((x_shape[0], x_shape[1], oy + ho + eh, ox + wo + ew), device, dtype, seed + 2)
    return x, weight, skip, (oy, ox), shape


# (id, x shape, kernel, stride, crop, output_size, skip spec (oy, ox, extra_h, extra_w) or None)
CASES = [
    ("k4s2", (2, 3, 5, 6), 4, 2, (0, 0), None, (0, 0, 0, 0)),
    ("k4s2-noskip", (2, 3, 5, 6), 4, 2, (0, 0), None, None),
    ("k4s2-crop-size-offset", (1, 2, 5, 6), 4, 2, (1, 1), (9, 10), (2, 1, 1, 0)),
    ("k16s8-crop", (1, 2, 3, 4), 16, 8, (4, 3), None, (1, 0, 0, 0)),
    ("k32s16", (1, 2, 2, 3), 32, 16, (8, 8), (20, 30), None),
    ("k64s32", (1, 2, 2, 2), 64, 32, (31, 31), (50, 60), (0, 0, 0, 0)),
    ("k3s2", (2, 2, 5, 4), 3, 2, (0, 0), None, (1, 1, 0, 0)),
    ("k5s3", (1, 3, 4, 3), 5, 3, (2, 1), None, None),
    ("k1s1", (1, 3, 4, 5), 1, 1, (0, 0), None, (0, 0, 2, 2)),
    ("k2s3-gaps", (1, 2, 4, 3), 2, 3, (0, 0), None, (0, 0, 0, 0)),
    ("k2s3-gaps-crop", (1, 2, 4, 3), 2, 3, (1, 2), (8, 5), None),
    ("rect-k(3,5)s(2,3)", (1, 2, 4, 5), (3, 5), (2, 3), (0, 0), None, (1, 0, 0, 1)),
    ("rect-k(4,2)s(1,2)", (2, 2, 3, 4), (4, 2), (1, 2), (1, 0), None, None),
    ("rect-k(2,5)s(3,2)", (1, 3, 3, 3), (2, 5), (3, 2), (0, 0), (7, 8), (0, 0, 0, 0)),
    ("crop-only", (1, 2, 5, 5), 4, 2, (3, 2), None, None),
    ("output_size-only", (1, 2, 5, 5), 4, 2, (0, 0), (7, 9), (1, 1, 1, 1)),
    ("output-1x1", (1, 2, 3, 3), 3, 2, (2, 2), (1, 1), (1, 0, 0, 0)),
    ("1x1-in", (2, 3, 1, 1), 4, 2, (0, 0), None, (0, 0, 0, 0)),
    ("1xN", (1, 2, 1, 9), 4, 2, (1, 0), None, (0, 1, 0, 0)),
    ("7x33", (1, 2, 7, 33), 4, 2, (1, 1), (14, 66), (0, 0, 0, 0)),
    ("C1", (3, 1, 5, 4), 4, 2, (0, 0), None, (0, 1, 0, 0)),
    ("C21", (2, 21, 4, 5), 4, 2, (1, 1), None, (1, 1, 0, 0)),
    ("C21-k16s8", (1, 21, 3, 2), 16, 8, (5, 5), None, None),
    ("C150", (1, 150, 2, 3), 4, 2, (0, 0), None, (0, 0, 1, 1)),
]


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


NAMES = ("out", "grad_x", "grad_weight", "grad_skip")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_eager(device, backend, case):
    """Values and gradients (x, weight, skip): float64 on the CPU, float32 on CUDA."""
    name, x_shape, k, stride, crop, output_size, skip_spec = case
    dtype = torch.float64 if device == "cpu" else torch.float32
    seed = zlib.crc32(name.encode()) % 10_000
    x, w, skip, offset, shape = make_case(x_shape, k, stride, crop, output_size, skip_spec,
                                          device, dtype, seed)
    grad = rand(shape, device, dtype, seed + 3)
    opts = dict(stride=stride, crop=crop, skip_offset=offset, output_size=output_size)
    ref = run(eager, x.double(), w.double(), None if skip is None else skip.double(),
              grad.double(), **opts)
    got = run(deconv_add, x, w, skip, grad, backend=backend, **opts)
    msg = f"{backend} {name} {dtype}"
    assert got[0].shape == shape and got[0].dtype == dtype, msg
    assert_results_close(NAMES, got, ref, tol(dtype), msg, dtype=dtype)
    if backend != "reference":
        check_format(got[0], x, msg)


LOW_CASES = [
    ("C21-k4s2-skip", (2, 21, 9, 11), 4, 2, (1, 1), None, (5, 5, 0, 0)),
    ("C21-k16s8-crop", (1, 21, 4, 5), 16, 8, (7, 7), (24, 30), None),
    ("C150-k4s2", (1, 150, 3, 4), 4, 2, (0, 0), None, (0, 0, 0, 0)),
    ("k3s2-7x33", (2, 3, 7, 33), 3, 2, (0, 1), None, (1, 0, 0, 0)),
]


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_CASES, ids=[c[0] for c in LOW_CASES])
def test_low_precision_error_at_most_twice_eager(device, backend, dtype, case):
    """Error vs a float64 reference at most 2x eager's at that dtype (+ one ulp of the max);
    the weight gradient is a reduction over N, H, W, where float32 accumulation matters."""
    name, x_shape, k, stride, crop, output_size, skip_spec = case
    x, w, skip, offset, shape = make_case(x_shape, k, stride, crop, output_size, skip_spec,
                                          device, dtype, seed=41)
    grad = rand(shape, device, dtype, seed=42)
    opts = dict(stride=stride, crop=crop, skip_offset=offset, output_size=output_size)
    ref = run(eager, x.double(), w.double(), None if skip is None else skip.double(),
              grad.double(), **opts)
    theirs = run(eager, x, w, skip, grad, **opts)
    ours = run(deconv_add, x, w, skip, grad, backend=backend, **opts)
    assert_error_at_most_twice_eager(NAMES, ours, theirs, ref, dtype, f"{backend} {name} {dtype}")


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@parametrize_layouts
def test_layouts(device, backend, x_layout, skip_layout, grad_layout):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, skip, offset, shape = make_case((2, 3, 5, 4), 4, 2, (1, 2), None, (2, 1, 1, 0),
                                          device, dtype, seed=7)
    x = to_layout(x, x_layout)
    skip = None if skip_layout == "none" else to_layout(skip, skip_layout)
    grad = to_layout(rand(shape, device, dtype, seed=8), grad_layout)
    opts = dict(stride=2, crop=(1, 2), skip_offset=offset)
    ref = run(eager, x.double().contiguous(), w.double(), None if skip is None else skip.double().contiguous(),
              grad.double().contiguous(), **opts)
    got = run(deconv_add, x, w, skip, grad, backend=backend, **opts)
    msg = f"{backend} x={x_layout} skip={skip_layout} grad={grad_layout}"
    assert_layout_results_close(NAMES, got, ref, tol(dtype), msg)
    if backend != "reference":
        check_format(got[0], x, msg)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("weight_layout", ["transposed", "sliced"])
def test_non_contiguous_weight(device, backend, weight_layout):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, w, skip, offset, shape = make_case((2, 4, 3, 5), (4, 3), (2, 3), (0, 0), None, (0, 0, 0, 0),
                                          device, dtype, seed=9)
    if weight_layout == "transposed":
        w_in = w.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        big = torch.empty(4, 2, 4, 3, dtype=dtype, device=device)
        big[:, :1] = w
        w_in = big[:, :1]
    assert not w_in.is_contiguous()
    grad = rand(shape, device, dtype, seed=10)
    opts = dict(stride=(2, 3), skip_offset=offset)
    ref = run(eager, x, w, skip, grad, **opts)
    got = run(deconv_add, x, w_in, skip, grad, backend=backend, **opts)
    for what, a, b in zip(NAMES, got, ref):
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_empty_batch(device, backend):
    """N = 0: an empty output, zero weight gradient (a sum over nothing)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    for with_skip in (False, True):
        x = torch.randn(0, 3, 5, 6, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(3, 1, 4, 4, dtype=dtype, device=device, requires_grad=True)
        skip = torch.randn(0, 3, 13, 14, dtype=dtype, device=device, requires_grad=True) if with_skip else None
        out = deconv_add(x, w, 2, skip, skip_offset=(1, 0), backend=backend)
        assert out.shape == (0, 3, 12, 14)
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert w.grad.shape == w.shape and (w.grad == 0).all()
        if with_skip:
            assert skip.grad.shape == skip.shape


@pytest.mark.parametrize("device,backend", device_backends())
def test_output_is_new_and_inputs_untouched(device, backend):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = rand((1, 2, 4, 5), device, dtype, seed=11).requires_grad_(True)
    w = rand((2, 1, 1, 1), device, dtype, seed=12).requires_grad_(True)
    skip = rand((1, 2, 6, 7), device, dtype, seed=13).requires_grad_(True)
    saved = [t.detach().clone() for t in (x, w, skip)]
    out = deconv_add(x, w, 1, skip, skip_offset=(1, 2), backend=backend)
    grad = rand(out.shape, device, dtype, seed=14)
    grad0 = grad.clone()
    out.backward(grad)
    for t, t0 in zip((x, w, skip), saved):
        assert torch.equal(t.detach(), t0)
    assert torch.equal(grad, grad0)
    plain = deconv_add(x, torch.ones_like(w), 1, backend=backend)  # k = 1, s = 1: a copy of x
    assert plain.data_ptr() != x.data_ptr()
    torch.testing.assert_close(plain, x.detach(), rtol=0, atol=0)


# --- gradcheck, determinism ---------------------------------------------------------------

GRADCHECK_CASES = [
    ((1, 2, 3, 3), 4, 2, (1, 1), None, (1, 2, 0, 1)),
    ((2, 1, 2, 3), 3, 2, (0, 0), (4, 5), None),
    ((1, 2, 3, 2), (2, 3), (3, 2), (0, 1), None, (0, 0, 0, 0)),  # k < s on H: gaps
    ((1, 1, 2, 2), 1, 1, (0, 0), None, (1, 1, 0, 0)),
]


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_gradcheck_float64(device, backend):
    if device != "cpu":
        pytest.skip("float64 gradcheck runs on the CPU")
    for x_shape, k, stride, crop, output_size, skip_spec in GRADCHECK_CASES:
        x, w, skip, offset, _ = make_case(x_shape, k, stride, crop, output_size, skip_spec,
                                          "cpu", torch.float64, seed=15)
        inputs = (x.requires_grad_(True), w.requires_grad_(True))
        if skip is not None:
            inputs += (skip.requires_grad_(True),)

        def fn(*t):
            return deconv_add(t[0], t[1], stride, t[2] if len(t) > 2 else None, crop, offset,
                              output_size, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8), (x_shape, k, stride)


def _float32_run(backend, device, x_shape, k, stride, crop, skip_spec, seed):
    """run() of one float32 case (output gradient of seed + 1) as a call without arguments."""
    x, w, skip, offset, shape = make_case(x_shape, k, stride, crop, None, skip_spec,
                                          device, torch.float32, seed)
    grad = rand(shape, device, torch.float32, seed=seed + 1)
    return lambda: run(deconv_add, x, w, skip, grad, backend=backend, stride=stride, crop=crop,
                       skip_offset=offset)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_bitwise_repeatable_and_thread_count_independent(device, backend):
    """Including the weight gradient, a reduction over N, H, W in a fixed order."""
    compute = _float32_run(backend, device, (2, 21, 30, 40), 4, 2, (1, 1), (5, 5, 0, 0), seed=16)
    assert_bitwise_repeatable(NAMES, compute, device)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_runs_under_deterministic_algorithms(device, backend):
    compute = _float32_run(backend, device, (2, 5, 9, 7), 16, 8, (4, 4), (2, 2, 0, 0), seed=18)
    assert_same_under_deterministic_algorithms(NAMES, compute)


# --- errors ---------------------------------------------------------------------------

def _error_cases():
    # x (2, 3, 5, 6), k 4, s 2: the full deconvolution is (12, 14)
    x = torch.randn(2, 3, 5, 6)
    w = torch.randn(3, 1, 4, 4)
    skip = torch.randn(2, 3, 12, 14)
    return x, w, skip, [
        (dict(weight=torch.randn(3, 2, 4, 4)), ValueError,
         r"weight must be depthwise \(3, 1, kh, kw\) for x with 3 channels, got \(3, 2, 4, 4\)"),
        (dict(weight=torch.randn(4, 1, 4, 4)), ValueError,
         r"weight must be depthwise \(3, 1, kh, kw\) for x with 3 channels, got \(4, 1, 4, 4\)"),
        (dict(weight=torch.randn(3, 1, 0, 4)), ValueError, "weight has an empty kernel"),
        (dict(weight=torch.randn(3, 4, 4)), ValueError, "weight must be 4-D"),
        (dict(weight=w.double()), TypeError, "weight has dtype torch.float64 but x has torch.float32"),
        (dict(weight=w.long()), TypeError, "weight must be a floating-point tensor"),
        (dict(weight=w.to("meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=(2, -1)), ValueError, "stride must be >= 1"),
        (dict(stride=2.0), TypeError, "stride must be an int or a pair of ints"),
        (dict(crop=(-1, 0)), ValueError, "crop must be non-negative"),
        (dict(crop=(12, 0), skip=None), ValueError,
         r"crop \(12, 0\) leaves nothing of the deconvolution of size \(12, 14\)"),
        (dict(output_size=(12, 14), crop=(1, 0)), ValueError,
         r"output_size \(12, 14\) at crop \(1, 0\) does not fit in the deconvolution of size \(12, 14\)"),
        (dict(output_size=(5, 15)), ValueError, "does not fit in the deconvolution"),
        (dict(output_size=(0, 5)), ValueError, "output_size must be >= 1"),
        (dict(skip=torch.randn(2, 4, 12, 14)), ValueError,
         r"skip has \(N, C\) = \(2, 4\) but x has \(2, 3\)"),
        (dict(skip=torch.randn(1, 3, 12, 14)), ValueError,
         r"skip has \(N, C\) = \(1, 3\) but x has \(2, 3\)"),
        (dict(skip_offset=(0, 1)), ValueError,
         r"skip of spatial size \(12, 14\) is too small for an output of \(12, 14\) at skip_offset \(0, 1\)"),
        (dict(skip_offset=(-2, 0)), ValueError, "skip_offset must be non-negative"),
        (dict(skip=skip.double()), TypeError, "skip has dtype torch.float64 but x has torch.float32"),
        (dict(skip=skip.to("meta")), ValueError, "skip is on meta but x is on cpu"),
        (dict(skip=skip.int()), TypeError, "skip must be a floating-point tensor"),
        (dict(x=x.int()), TypeError, "x must be a floating-point tensor, got torch.int32"),
        (dict(x=torch.randn(2, 3, 5, 0)), ValueError, "x must have a non-empty spatial size"),
        (dict(x=x[0]), ValueError, r"x must be 4-D \(N, C, H, W\)"),
    ]


@pytest.mark.parametrize("index", range(len(_error_cases()[3])))
def test_bad_arguments_raise_clear_errors(index):
    x, w, skip, cases = _error_cases()
    override, error, pattern = cases[index]
    kw = dict(x=x, weight=w, stride=2, skip=skip)
    kw.update(override)
    with pytest.raises(error, match=pattern):
        deconv_add(**kw)
    for name in fused_backends(OP, "cpu"):
        with pytest.raises(error, match=pattern):
            deconv_add(**kw, backend=name)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (meta covers a second device on the CPU)")
def test_mixed_devices_on_cuda():
    x = torch.randn(1, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        deconv_add(x, torch.randn(2, 1, 4, 4), 2)


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x, w = torch.randn(1, 2, 3, 4), torch.randn(2, 1, 4, 4)
    with pytest.raises(NotImplementedError) as info:
        deconv_add(x, w, 2, backend="cuda")
    text = str(info.value)
    assert "deconv_add" in text and "backend 'cuda' cannot serve" in text
    for name in fastseg.BACKENDS:
        assert f"  {name}: " in text, text
    assert "needs cuda tensors" in text
    with pytest.raises(NotImplementedError, match="triton"):
        deconv_add(x, w, 2, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        deconv_add(x, w, 2, backend="gpu")


def test_auto_picks_the_cpu_kernel_when_built():
    from fastseg.ops.deconv_add import OP as registry
    x, w = torch.randn(1, 2, 3, 4), torch.randn(2, 1, 4, 4)
    expected = "cpu" if fused_backends(OP, "cpu") else "reference"
    assert registry.select(None, "cpu", x, w, None) == expected


# --- torch.library ------------------------------------------------------------------------

def _op_samples(device):
    """(x, weight, skip, stride, crop, skip_offset, output_size) for the forward op."""
    for layout, with_skip, k, stride, crop, size in (
            ("contiguous", True, (4, 4), (2, 2), (1, 1), (9, 10)),
            ("channels_last", True, (4, 4), (2, 2), (0, 0), (12, 14)),
            ("contiguous", False, (3, 5), (2, 3), (0, 2), (8, 12)),
            ("channels_last", False, (2, 2), (3, 3), (5, 5), (8, 12))):
        x = to_layout(rand((2, 3, 5, 6), device, torch.float32, seed=20), layout)
        w = rand((3, 1, *k), device, torch.float32, seed=21)
        skip, offset = None, (0, 0)
        if with_skip:
            offset = (2, 1)
            skip = to_layout(rand((2, 3, size[0] + 3, size[1] + 1), device, torch.float32, seed=22),
                             layout)
        yield x, w, skip, list(stride), list(crop), list(offset), list(size)


@pytest.mark.parametrize("device", devices())
def test_opcheck_forward_op(device):
    if not has_kernel("deconv_add_forward", device):
        pytest.skip(f"fastseg::deconv_add_forward has no {device} kernel in this build")
    for x, w, skip, stride, crop, offset, size in _op_samples(device):
        x.requires_grad_(True)
        w.requires_grad_(True)
        if skip is not None:
            skip.requires_grad_(True)
        torch.library.opcheck(torch.ops.fastseg.deconv_add_forward.default,
                              (x, w, skip, stride, crop, offset, size))


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward_op(device):
    if not has_kernel("deconv_add_backward", device):
        pytest.skip(f"fastseg::deconv_add_backward has no {device} kernel in this build")
    for i, (x, w, _, stride, crop, _, size) in enumerate(_op_samples(device)):
        layout = ("contiguous", "channels_last", "contiguous", "strided")[i]  # vs x's layout
        grad = to_layout(rand((2, 3, *size), device, torch.float32, seed=23), layout)
        torch.library.opcheck(torch.ops.fastseg.deconv_add_backward.default,
                              (grad, x, w, stride, crop))


@pytest.mark.parametrize("device", devices())
def test_direct_op_calls_check_their_arguments(device):
    """The C++ checks guard torch.ops.fastseg calls that bypass the Python layer."""
    if not has_kernel("deconv_add_forward", device):
        pytest.skip(f"fastseg::deconv_add_forward has no {device} kernel in this build")
    x = torch.randn(1, 2, 3, 4, device=device)
    w = torch.randn(2, 1, 4, 4, device=device)
    op = torch.ops.fastseg.deconv_add_forward
    with pytest.raises(ValueError, match="does not fit"):
        op(x, w, None, [2, 2], [1, 0], [0, 0], [8, 10])
    with pytest.raises(ValueError, match="weight"):
        op(x, torch.randn(2, 2, 4, 4, device=device), None, [2, 2], [0, 0], [0, 0], [8, 10])
    with pytest.raises(ValueError, match="weight"):
        op(x, w.transpose(2, 3), None, [2, 2], [0, 0], [0, 0], [8, 10])
    with pytest.raises(ValueError, match="too small"):
        op(x, w, torch.randn(1, 2, 8, 10, device=device), [2, 2], [0, 0], [1, 0], [8, 10])
    with pytest.raises(ValueError, match="stride"):
        op(x, w, None, [0, 2], [0, 0], [0, 0], [8, 10])


# --- torch.compile ------------------------------------------------------------------------

def _two_steps(x, w1, w2, skip, backend):
    a = deconv_add(x, w1, 2, skip, crop=(1, 1), skip_offset=(2, 0), backend=backend)
    return deconv_add(a, w2, (3, 2), crop=(0, 1), output_size=(20, 15), backend=backend)


@pytest.mark.parametrize("device,backend", device_backends())
def test_torch_compile_fullgraph_matches_eager(device, backend):
    x = rand((2, 3, 4, 5), device, torch.float32, seed=24)
    w1 = rand((3, 1, 4, 4), device, torch.float32, seed=25)
    w2 = rand((3, 1, 3, 3), device, torch.float32, seed=26)
    skip = rand((2, 3, 11, 11), device, torch.float32, seed=27)  # window (9, 11) at (2, 0)
    leaves = [t.requires_grad_(True) for t in (x, w1, w2, skip)]
    out = compiled_matches_uncompiled(_two_steps, leaves, backend)
    eager_out = eager(eager(x, w1, 2, skip, (1, 1), (2, 0)), w2, (3, 2), None, (0, 1), (0, 0), (20, 15))
    torch.testing.assert_close(out, eager_out, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_torch_compile_fullgraph_module(device, backend):
    torch._dynamo.reset()
    up = DeconvAdd(3, 4, 2, backend=backend).to(device)

    def step(x, skip):
        return up(x, skip, crop=(1, 1), skip_offset=(0, 1)).square().sum()

    x = rand((2, 3, 5, 6), device, torch.float32, seed=28).requires_grad_(True)
    skip = rand((2, 3, 11, 14), device, torch.float32, seed=29)  # window (11, 13) at (0, 1)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, skip)
    loss.backward()
    got = (loss.detach(), up.weight.grad.clone(), x.grad.clone())
    up.weight.grad, x.grad = None, None
    loss = step(x, skip)
    loss.backward()
    for a, b in zip(got, (loss.detach(), up.weight.grad, x.grad)):
        torch.testing.assert_close(a, b)


# --- bilinear init and the module ----------------------------------------------------------

def test_bilinear_kernel_known_values():
    tent4 = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(bilinear_kernel(4, dtype=torch.float64), torch.outer(tent4, tent4),
                               rtol=0, atol=0)
    tent3 = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(bilinear_kernel(3, dtype=torch.float64), torch.outer(tent3, tent3),
                               rtol=0, atol=0)
    tent2 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(bilinear_kernel(4, 2, dtype=torch.float64), torch.outer(tent4, tent2),
                               rtol=0, atol=0)
    assert bilinear_kernel(1).tolist() == [[1.0]]
    # FCN's upsample_filt(16): taps (2i + 1) / 16 up and down; each 1-D tent sums to the stride
    k16 = bilinear_kernel(16, dtype=torch.float64)
    tent16 = torch.tensor([(2 * i + 1) / 16 for i in range(8)] + [(15 - 2 * i) / 16 for i in range(8)],
                          dtype=torch.float64)
    torch.testing.assert_close(k16, torch.outer(tent16, tent16), rtol=0, atol=1e-15)
    assert bilinear_kernel(64).sum().item() == pytest.approx(32.0 ** 2)
    assert bilinear_kernel(4).dtype == torch.float32


def test_bilinear_init_on_full_conv_transpose_is_diagonal():
    conv = torch.nn.ConvTranspose2d(5, 5, 4, stride=2, bias=False)
    bilinear_(conv.weight)
    kernel = bilinear_kernel(4)
    for i in range(5):
        for j in range(5):
            expected = kernel if i == j else torch.zeros(4, 4)
            assert torch.equal(conv.weight[i, j].detach(), expected), (i, j)
    # the FCN release's ConvTranspose2d(C, C) with this init == the per-class DeconvAdd
    x = rand((2, 5, 4, 3), dtype=torch.float32, seed=30)
    torch.testing.assert_close(DeconvAdd(5, 4, 2)(x), conv(x))
    with pytest.raises(ValueError, match=r"\(C, 1, kh, kw\) or \(C, C, kh, kw\)"):
        bilinear_(torch.empty(3, 2, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        bilinear_(torch.empty(3, 4, 4))


@pytest.mark.parametrize("device,backend", device_backends())
def test_module_bilinear_init_learnable_and_state_dict(device, backend):
    m = DeconvAdd(3, 4, 2, backend=backend).to(device)
    tent = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert m.weight.shape == (3, 1, 4, 4)
    for c in range(3):
        assert torch.equal(m.weight[c, 0].detach().cpu(), torch.outer(tent, tent))
    assert isinstance(m.weight, torch.nn.Parameter) and m.weight.requires_grad
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    x = rand((2, 3, 4, 5), device, torch.float32, seed=31).requires_grad_(True)
    skip = rand((2, 3, 11, 13), device, torch.float32, seed=32)
    out = m(x, skip, crop=(1, 1), skip_offset=(1, 2))
    torch.testing.assert_close(out, eager(x, m.weight, 2, skip, (1, 1), (1, 2)))
    out.square().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0

    fixed = DeconvAdd(3, 4, 2, learnable=False, backend=backend).to(device)
    assert list(fixed.parameters()) == []
    assert "weight" in dict(fixed.named_buffers()) and "weight" in fixed.state_dict()
    assert not fixed.weight.requires_grad
    x.grad = None
    fixed(x, skip, crop=(1, 1), skip_offset=(1, 2)).sum().backward()
    assert fixed.weight.grad is None and x.grad is not None

    # state_dict round trip (also between the learnable and the fixed form)
    with torch.no_grad():
        m.weight.add_(rand(m.weight.shape, device, torch.float32, seed=33, scale=0.1))
    again = DeconvAdd(3, 4, 2, backend=backend).to(device)
    again.load_state_dict(m.state_dict())
    fixed.load_state_dict(m.state_dict())
    for other in (again, fixed):
        assert torch.equal(other.weight.detach(), m.weight.detach())
        torch.testing.assert_close(other(x, skip, (1, 1), (1, 2)), m(x, skip, (1, 1), (1, 2)), rtol=0, atol=0)


def test_module_arguments_and_repr():
    m = DeconvAdd(21, 16, 8)
    assert repr(m) == "DeconvAdd(21, kernel_size=(16, 16), stride=(8, 8), learnable=True)"
    m = DeconvAdd(2, (4, 6), (2, 3), learnable=False, dtype=torch.float64)
    assert repr(m) == "DeconvAdd(2, kernel_size=(4, 6), stride=(2, 3), learnable=False)"
    assert m.weight.dtype == torch.float64
    torch.testing.assert_close(m.weight[1, 0], bilinear_kernel(4, 6, dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        DeconvAdd(0, 4, 2)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        DeconvAdd(3, 0, 2)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        DeconvAdd(3, 4, 0)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("k,s", [(4, 2), (16, 8), (32, 16), ((4, 16), (2, 8))], ids=str)
def test_bilinear_deconv_of_a_constant_is_constant_inside(device, backend, k, s):
    """Invariant: FCN's kernel with k = 2s is a partition of unity at stride s, so a constant
    map gives the same constant wherever two taps per axis overlap: D-indices [s, n * s)."""
    (kh, kw), (sh, sw) = pair(k), pair(s)
    m = DeconvAdd(3, k, s, backend=backend).to(device)
    x = torch.full((2, 3, 5, 4), 1.75, device=device)
    n_h, n_w = x.shape[2:]
    out = m(x, crop=(sh, sw), output_size=((n_h - 1) * sh, (n_w - 1) * sw))
    torch.testing.assert_close(out, torch.full_like(out, 1.75), rtol=1e-6, atol=1e-6)
    # and a linear ramp stays linear there (bilinear reproduces linear functions)
    ramp = torch.arange(n_w, dtype=torch.float32, device=device).expand(2, 3, n_h, n_w).contiguous()
    out = m(ramp, crop=(sh, sw), output_size=((n_h - 1) * sh, (n_w - 1) * sw))
    steps = out[..., 1:] - out[..., :-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 1.0 / sw), rtol=1e-5, atol=1e-5)


def test_autocast_casts_like_conv_transpose2d():
    """Under autocast a bfloat16 x with FCN's float32 bilinear weight works (cast as
    F.conv_transpose2d's inputs are) and gives bfloat16."""
    import fastseg

    x = torch.randn(1, 3, 5, 6).bfloat16()
    w = fastseg.nn.init.bilinear_(torch.empty(3, 1, 4, 4))
    skip = torch.randn(1, 3, 12, 14).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastseg.ops.deconv_add(x, w, 2, skip, crop=(1, 1), output_size=(10, 11))
        ref = (torch.nn.functional.conv_transpose2d(x, w, stride=2, groups=3)[:, :, 1:11, 1:12]
               + skip[:, :, :10, :11])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
