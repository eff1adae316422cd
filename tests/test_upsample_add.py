"""fastseg.ops.upsample_add (and nn.UpsampleAdd) against F.interpolate(bilinear) + a cropped skip.

The contract (DESIGN.md, "Op contracts"):

    upsample_add(x, skip, size, scale_factor, align_corners, skip_offset)
      == F.interpolate(x, size, scale_factor, mode="bilinear", align_corners)
         + skip[:, :, oy:oy + Ho, ox:ox + Wo]

Runs on the CPU here; with a GPU the same tests run on CUDA tensors (marked `cuda`).
Every test is parametrized over (device, backend): the fused backends expected on the
device (conftest.fused_backends) and, on the CPU, the "reference" backend too (which checks
the Python layer's size / scale / offset handling against an independent eager composition).
"""

import functools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.ops import _checks, upsample_add
from fastseg.ops.upsample_add import source_scale

from conftest import HAS_CUDA, devices, fused_backends
import decoder_helpers
from decoder_helpers import (
    assert_bitwise_repeatable, assert_error_at_most_twice_eager, assert_layout_results_close,
    assert_results_close, assert_same_under_deterministic_algorithms, check_format,
    compiled_matches_uncompiled, has_kernel, parametrize_layouts, rand, to_layout,
)

OP = "upsample_add"
device_backends = functools.partial(decoder_helpers.device_backends, OP)
NAMES = ("out", "grad_x", "grad_skip")


def fused(device, backend):
    return backend != "reference"


# --- data --------------------------------------------------------------------------------

def eager(x, skip, size=None, scale_factor=None, align_corners=False, skip_offset=(0, 0)):
    """The contract, written independently of fastseg.ops._reference."""
    oy, ox = skip_offset
    if size is None and scale_factor is None:
        size = (skip.shape[2] - oy, skip.shape[3] - ox)
    up = F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear",
                       align_corners=align_corners)
    if skip is None:
        return up
    return up + skip[:, :, oy:oy + up.shape[2], ox:ox + up.shape[3]]


def out_size(x_shape, kw, skip_spec):
    if "size" in kw:
        s = kw["size"]
        return (s, s) if isinstance(s, int) else tuple(s)
    if "scale_factor" in kw:
        f = kw["scale_factor"]
        f = (f, f) if isinstance(f, (int, float)) else f
        return tuple(int(math.floor(float(n) * float(s))) for n, s in zip(x_shape[2:], f))
    _, hs, ws, oy, ox = skip_spec
    return (hs - oy, ws - ox)


def make_case(x_shape, kw, skip_spec, device, dtype, seed):
    """x, skip (or None), the skip_offset and the output shape of one case."""
    x = rand(x_shape, device, dtype, seed)
    ho, wo = out_size(x_shape, kw, skip_spec)
    if skip_spec is None:
        return x, None, (0, 0), (x_shape[0], x_shape[1], ho, wo)
    if skip_spec[0] == "from":
        _, hs, ws, oy, ox = skip_spec
    else:
        oy, ox, eh, ew = skip_spec
        hs, ws = oy + ho + eh, ox + wo + ew
    skip = rand((x_shape[0], x_shape[1], hs, ws), device, dtype, seed + 1000)
    return x, skip, (oy, ox), (x_shape[0], x_shape[1], ho, wo)


def run(fn, x, skip, grad_out, **kw):
    """Output and gradients (x, skip) for a given output gradient."""
    x = x.detach().requires_grad_(True)
    skip = None if skip is None else skip.detach().requires_grad_(True)
    out = fn(x, skip, **kw)
    out.backward(grad_out)
    return out.detach(), x.grad, None if skip is None else skip.grad


# (id, x shape, size / scale_factor kwargs, skip spec): skip spec None (no skip),
# (oy, ox, extra_h, extra_w) (skip bigger than the window by extra), or
# ("from", Hs, Ws, oy, ox) for the size-from-skip form.
CASES = [
    ("s2", (2, 3, 5, 6), dict(scale_factor=2), (0, 0, 0, 0)),
    ("s2-noskip", (2, 3, 5, 6), dict(scale_factor=2), None),
    ("s4-offset", (1, 2, 4, 3), dict(scale_factor=4), (3, 1, 2, 5)),
    ("s8", (1, 2, 3, 2), dict(scale_factor=8), (5, 5, 0, 1)),
    ("s16", (1, 1, 2, 3), dict(scale_factor=16), None),
    ("s32", (1, 2, 2, 2), dict(scale_factor=32), (0, 0, 0, 0)),
    ("s1.5", (2, 2, 7, 5), dict(scale_factor=1.5), (1, 0, 0, 0)),
    ("s2.3", (1, 3, 7, 33), dict(scale_factor=2.3), (0, 2, 1, 0)),
    ("s0.6-down", (1, 2, 11, 9), dict(scale_factor=0.6), (0, 0, 0, 0)),
    ("s(2,1.5)", (1, 2, 4, 5), dict(scale_factor=(2, 1.5)), None),
    ("s(0.6,3)", (1, 2, 10, 3), dict(scale_factor=(0.6, 3.0)), (2, 2, 0, 0)),
    # floor(6 * 1.1) = 6: an axis whose size does not change is copied (as in eager),
    # even though 1 / scale_factor != 1.
    ("s(2,1.1)-same-W", (1, 2, 3, 6), dict(scale_factor=(2, 1.1)), (0, 0, 0, 0)),
    ("s1.2-same-size", (1, 2, 2, 3), dict(scale_factor=1.2), (1, 0, 0, 0)),
    ("size", (2, 3, 5, 6), dict(size=(9, 13)), (1, 1, 1, 1)),
    ("size-int", (1, 2, 4, 4), dict(size=7), None),
    ("size=input", (1, 2, 5, 6), dict(size=(5, 6)), (2, 3, 0, 0)),
    ("size-same-H", (1, 2, 5, 6), dict(size=(5, 11)), None),
    ("size-down", (1, 2, 9, 8), dict(size=(4, 3)), (0, 1, 0, 0)),
    ("from-skip", (2, 3, 4, 5), {}, ("from", 11, 14, 0, 0)),
    ("from-skip-offset", (1, 2, 4, 5), {}, ("from", 12, 13, 3, 2)),
    ("1x1-in", (2, 3, 1, 1), dict(size=(3, 4)), (0, 0, 0, 0)),
    ("1x1-in-s2", (1, 2, 1, 1), dict(scale_factor=2), None),
    ("1xN", (2, 3, 1, 9), dict(scale_factor=2), (1, 0, 0, 0)),
    ("Nx1", (1, 2, 9, 1), dict(size=(17, 5)), None),
    ("to-1x1", (1, 2, 5, 4), dict(size=(1, 1)), (1, 1, 0, 0)),
    ("7x33", (1, 2, 7, 33), dict(size=(15, 67)), (0, 0, 0, 0)),
    ("C1", (3, 1, 5, 4), dict(scale_factor=2), (0, 1, 0, 0)),
    ("C21", (2, 21, 4, 5), dict(scale_factor=2), (1, 1, 0, 0)),
    ("C150", (1, 150, 3, 2), dict(scale_factor=2), (0, 0, 1, 1)),
]


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_eager(device, backend, align_corners, case):
    """Values and gradients (x, skip): float64 on the CPU, float32 on CUDA (vs float64)."""
    name, x_shape, kw, skip_spec = case
    dtype = torch.float64 if device == "cpu" else torch.float32
    seed = zlib.crc32(name.encode()) % 10_000
    x, skip, offset, shape = make_case(x_shape, kw, skip_spec, device, dtype, seed)
    grad = rand(shape, device, dtype, seed + 7)
    opts = dict(kw, align_corners=align_corners, skip_offset=offset)
    ref = run(eager, x.double(), None if skip is None else skip.double(), grad.double(), **opts)
    got = run(upsample_add, x, skip, grad, backend=backend, **opts)
    msg = f"{backend} {name} align_corners={align_corners} {dtype}"
    assert got[0].shape == shape and got[0].dtype == dtype, msg
    assert_results_close(NAMES, got, ref, tol(dtype), msg)
    if fused(device, backend):
        check_format(got[0], x, msg)


LOW_CASES = [
    ("C21-s2-offset", (2, 21, 9, 11), dict(scale_factor=2), (1, 2, 1, 0)),
    ("C150-s2.3", (1, 150, 3, 4), dict(scale_factor=2.3), None),
    ("7x33-size", (2, 3, 7, 33), dict(size=(15, 67)), (0, 0, 0, 0)),
    ("s8", (1, 5, 6, 5), dict(scale_factor=8), (3, 3, 0, 0)),
    ("s0.6", (1, 4, 20, 17), dict(scale_factor=0.6), None),
]


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("case", LOW_CASES, ids=[c[0] for c in LOW_CASES])
def test_low_precision_error_at_most_twice_eager(device, backend, dtype, align_corners, case):
    """flash-attention's rule: error vs a float64 reference at most 2x eager's at that dtype."""
    name, x_shape, kw, skip_spec = case
    x, skip, offset, shape = make_case(x_shape, kw, skip_spec, device, dtype, seed=31)
    grad = rand(shape, device, dtype, seed=32)
    opts = dict(kw, align_corners=align_corners, skip_offset=offset)
    ref = run(eager, x.double(), None if skip is None else skip.double(), grad.double(), **opts)
    theirs = run(eager, x, skip, grad, **opts)
    ours = run(upsample_add, x, skip, grad, backend=backend, **opts)
    assert_error_at_most_twice_eager(NAMES, ours, theirs, ref, dtype,
                                     f"{backend} {name} {dtype} align_corners={align_corners}")


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@parametrize_layouts
def test_layouts(device, backend, x_layout, skip_layout, grad_layout):
    """Any strides of x, skip and grad_output are read in place; the output is channels_last
    iff x is (and not also contiguous)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    x, skip, offset, shape = make_case((2, 3, 5, 4), dict(scale_factor=2.5), (1, 2, 2, 1),
                                       device, dtype, seed=5)
    x = to_layout(x, x_layout)
    skip = None if skip_layout == "none" else to_layout(skip, skip_layout)
    grad = to_layout(rand(shape, device, dtype, seed=6), grad_layout)
    opts = dict(scale_factor=2.5, skip_offset=offset)
    ref = run(eager, x.double().contiguous(), None if skip is None else skip.double().contiguous(),
              grad.double().contiguous(), **opts)
    got = run(upsample_add, x, skip, grad, backend=backend, **opts)
    msg = f"{backend} x={x_layout} skip={skip_layout} grad={grad_layout}"
    assert_layout_results_close(NAMES, got, ref, tol(dtype), msg)
    if fused(device, backend):
        check_format(got[0], x, msg)


@pytest.mark.parametrize("device,backend", device_backends())
def test_channels_last_output_with_align_corners_and_downsampling(device, backend):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for kw in (dict(size=(7, 9), align_corners=True), dict(scale_factor=0.6)):
        x = to_layout(rand((2, 21, 12, 15), device, dtype, seed=8), "channels_last")
        out = upsample_add(x, None, backend=backend, **kw)
        torch.testing.assert_close(out, eager(x, None, **kw), **tol(dtype))
        if fused(device, backend):
            check_format(out, x)


@pytest.mark.parametrize("device,backend", device_backends())
def test_empty_batch(device, backend):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for skip_shape in (None, (0, 3, 11, 12)):
        x = torch.randn(0, 3, 5, 6, dtype=dtype, device=device, requires_grad=True)
        skip = None if skip_shape is None else torch.randn(skip_shape, dtype=dtype, device=device,
                                                           requires_grad=True)
        out = upsample_add(x, skip, scale_factor=2, skip_offset=(1, 0), backend=backend)
        assert out.shape == (0, 3, 10, 12)
        out.sum().backward()
        assert x.grad.shape == x.shape
        if skip is not None:
            assert skip.grad.shape == skip.shape and (skip.grad == 0).all()


@pytest.mark.parametrize("device,backend", device_backends())
def test_output_is_new_and_inputs_untouched(device, backend):
    """No aliasing: an identity-size call with no skip still returns a new tensor, and
    neither forward nor backward writes into the user's tensors."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = rand((1, 2, 5, 6), device, dtype, seed=9).requires_grad_(True)
    skip = rand((1, 2, 7, 8), device, dtype, seed=10).requires_grad_(True)
    x0, skip0 = x.detach().clone(), skip.detach().clone()
    out = upsample_add(x, None, size=(5, 6), backend=backend)
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, x.detach(), rtol=0, atol=0)
    out2 = upsample_add(x, skip, size=(5, 6), skip_offset=(1, 2), backend=backend)
    grad = rand(out2.shape, device, dtype, seed=11)
    grad0 = grad.clone()
    out2.backward(grad)
    assert torch.equal(x.detach(), x0) and torch.equal(skip.detach(), skip0) and torch.equal(grad, grad0)
    with torch.no_grad():
        out2.add_(1.0)
    assert torch.equal(x.detach(), x0) and torch.equal(skip.detach(), skip0)


@pytest.mark.parametrize("device,backend", device_backends())
def test_constant_input_gives_constant_output(device, backend):
    """An invariant: bilinear weights are convex, so a constant map stays constant."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = torch.full((1, 3, 5, 7), 2.5, dtype=dtype, device=device)
    for kw in (dict(scale_factor=2.3), dict(size=(3, 16), align_corners=True), dict(scale_factor=0.6)):
        out = upsample_add(x, None, backend=backend, **kw)
        torch.testing.assert_close(out, torch.full_like(out, 2.5), **tol(dtype))


# --- gradcheck, determinism ---------------------------------------------------------------

GRADCHECK_CASES = [
    ((1, 2, 3, 4), dict(scale_factor=2), (1, 1, 1, 2)),
    ((2, 1, 3, 2), dict(size=(5, 7)), None),
    ((1, 2, 5, 4), dict(scale_factor=0.6), (0, 1, 0, 0)),
    ((1, 2, 2, 3), dict(scale_factor=(2.3, 1.5)), (2, 0, 0, 0)),
    ((1, 1, 1, 3), {}, ("from", 4, 6, 1, 0)),
]


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
def test_gradcheck_float64(device, backend, align_corners):
    if device != "cpu":
        pytest.skip("float64 gradcheck runs on the CPU")
    for x_shape, kw, skip_spec in GRADCHECK_CASES:
        x, skip, offset, _ = make_case(x_shape, kw, skip_spec, "cpu", torch.float64, seed=13)
        inputs = (x.requires_grad_(True),) + (() if skip is None else (skip.requires_grad_(True),))

        def fn(*t):
            return upsample_add(t[0], t[1] if len(t) > 1 else None, skip_offset=offset,
                                align_corners=align_corners, backend=backend, **kw)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8), (x_shape, kw, skip_spec)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_bitwise_repeatable_and_thread_count_independent(device, backend):
    x, skip, offset, shape = make_case((2, 21, 40, 50), dict(scale_factor=2.3), (1, 1, 0, 0),
                                       device, torch.float32, seed=14)
    grad = rand(shape, device, torch.float32, seed=15)
    kw = dict(scale_factor=2.3, skip_offset=offset)
    assert_bitwise_repeatable(
        NAMES, lambda: run(upsample_add, x, skip, grad, backend=backend, **kw), device)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_runs_under_deterministic_algorithms(device, backend):
    """The fused backward is a gather (no atomics): allowed under deterministic mode, where
    eager's CUDA bilinear backward is rejected."""
    x, skip, offset, shape = make_case((2, 5, 9, 7), dict(scale_factor=2), (1, 0, 0, 0),
                                       device, torch.float32, seed=16)
    grad = rand(shape, device, torch.float32, seed=17)
    kw = dict(scale_factor=2, skip_offset=offset)
    assert_same_under_deterministic_algorithms(
        NAMES, lambda: run(upsample_add, x, skip, grad, backend=backend, **kw))


# --- errors ---------------------------------------------------------------------------

def _error_cases():
    x = torch.randn(2, 3, 5, 6)
    skip = torch.randn(2, 3, 10, 12)
    return x, skip, [
        (dict(skip=torch.randn(2, 4, 10, 12)), ValueError,
         r"skip has \(N, C\) = \(2, 4\) but x has \(2, 3\)"),
        (dict(skip=torch.randn(1, 3, 10, 12)), ValueError,
         r"skip has \(N, C\) = \(1, 3\) but x has \(2, 3\)"),
        (dict(skip=torch.randn(2, 3, 10, 11)), ValueError,
         r"skip of spatial size \(10, 11\) is too small for an output of \(10, 12\) at "
         r"skip_offset \(0, 0\): needs at least \(10, 12\)"),
        (dict(skip_offset=(1, 0)), ValueError,
         r"too small for an output of \(10, 12\) at skip_offset \(1, 0\)"),
        (dict(skip_offset=(-1, 0)), ValueError, "skip_offset must be non-negative"),
        (dict(skip_offset=(0, 1.5)), TypeError, "skip_offset must be an int or a pair of ints"),
        (dict(scale_factor=0), ValueError, "scale_factor must be positive and finite"),
        (dict(scale_factor=(2, -1)), ValueError, "scale_factor must be positive and finite"),
        (dict(scale_factor=float("inf")), ValueError, "scale_factor must be positive and finite"),
        (dict(scale_factor=0.1), ValueError, "scale_factor 0.1 makes an empty output"),
        (dict(scale_factor=2, size=(10, 12)), ValueError, "give only one of size and scale_factor"),
        (dict(scale_factor=None, skip=None), ValueError, "give size or scale_factor"),
        (dict(scale_factor=None, size=(0, 4)), ValueError, "size must be >= 1"),
        (dict(scale_factor=None, size=(4, 5, 6)), TypeError, "size must be an int or a pair"),
        (dict(scale_factor=None, skip_offset=(10, 0)), ValueError,
         r"skip_offset \(10, 0\) leaves no output inside the skip"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor, got torch.int64"),
        (dict(skip=skip.int()), TypeError, "skip must be a floating-point tensor"),
        (dict(skip=skip.double()), TypeError, "skip has dtype torch.float64 but x has torch.float32"),
        (dict(skip=skip.to("meta")), ValueError, "skip is on meta but x is on cpu"),
        (dict(x=x[0]), ValueError, r"x must be 4-D \(N, C, H, W\)"),
        (dict(skip=skip[0]), ValueError, r"skip must be 4-D"),
        (dict(x=torch.randn(2, 3, 0, 6)), ValueError, "x must have a non-empty spatial size"),
        (dict(x="x"), TypeError, "x must be a Tensor"),
        (dict(align_corners=1), TypeError, "align_corners must be a bool"),
    ]


@pytest.mark.parametrize("index", range(len(_error_cases()[2])))
def test_bad_arguments_raise_clear_errors(index):
    x, skip, cases = _error_cases()
    override, error, pattern = cases[index]
    kw = dict(x=x, skip=skip, scale_factor=2)
    kw.update(override)
    with pytest.raises(error, match=pattern):
        upsample_add(**kw)
    for name in fused_backends(OP, "cpu"):  # checked before any kernel runs
        with pytest.raises(error, match=pattern):
            upsample_add(**kw, backend=name)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (meta covers a second device on the CPU)")
def test_mixed_devices_on_cuda():
    with pytest.raises(ValueError, match="skip is on cpu but x is on cuda"):
        upsample_add(torch.randn(1, 2, 3, 3, device="cuda"), torch.randn(1, 2, 6, 6), scale_factor=2)


def test_explicit_backend_that_cannot_serve_lists_every_reason():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError) as info:
        upsample_add(x, scale_factor=2, backend="cuda")
    text = str(info.value)
    assert "upsample_add" in text and "backend 'cuda' cannot serve" in text
    for name in fastseg.BACKENDS:
        assert f"  {name}: " in text, text
    assert "needs cuda tensors" in text
    with pytest.raises(NotImplementedError, match="triton"):
        upsample_add(x, scale_factor=2, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        upsample_add(x, scale_factor=2, backend="gpu")
    with fastseg.backend("cuda"), pytest.raises(NotImplementedError, match="cannot serve"):
        upsample_add(x, scale_factor=2)


def test_auto_picks_the_cpu_kernel_when_built():
    from fastseg.ops.upsample_add import OP as registry
    x = torch.randn(1, 2, 3, 4)
    expected = "cpu" if fused_backends(OP, "cpu") else "reference"
    assert registry.select(None, "cpu", x, None) == expected
    with fastseg.backend("reference"):
        assert registry.select(None, "cpu", x, None) == "reference"


# --- torch.library ------------------------------------------------------------------------

def _op_samples(device):
    """(x, skip, skip_offset, output_size, scales, align_corners) for the forward op."""
    for layout, with_skip, align_corners, size in (
            ("contiguous", True, False, (9, 11)), ("channels_last", True, True, (9, 11)),
            ("contiguous", False, True, (4, 3)), ("channels_last", False, False, (7, 5))):
        x = to_layout(rand((2, 3, 4, 5), device, torch.float32, seed=18), layout)
        skip = None
        offset = (0, 0)
        if with_skip:
            offset = (1, 2)
            skip = to_layout(rand((2, 3, size[0] + 2, size[1] + 3), device, torch.float32, seed=19),
                             layout)
        scales = [source_scale(n, m, align_corners, None) for n, m in zip(x.shape[2:], size)]
        yield x, skip, list(offset), list(size), scales, align_corners


@pytest.mark.parametrize("device", devices())
def test_opcheck_forward_op(device):
    if not has_kernel("upsample_add_forward", device):
        pytest.skip(f"fastseg::upsample_add_forward has no {device} kernel in this build")
    for x, skip, offset, size, scales, ac in _op_samples(device):
        x.requires_grad_(True)
        if skip is not None:
            skip.requires_grad_(True)
        torch.library.opcheck(torch.ops.fastseg.upsample_add_forward.default,
                              (x, skip, offset, size, scales, ac))


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward_op(device):
    if not has_kernel("upsample_add_backward", device):
        pytest.skip(f"fastseg::upsample_add_backward has no {device} kernel in this build")
    for i, (x, _, _, size, scales, ac) in enumerate(_op_samples(device)):
        layout = ("contiguous", "channels_last", "channels_last", "strided")[i]
        grad = to_layout(rand((2, 3, *size), device, torch.float32, seed=20), layout)
        torch.library.opcheck(torch.ops.fastseg.upsample_add_backward.default,
                              (grad, list(x.shape[2:]), scales, ac))


@pytest.mark.parametrize("device", devices())
def test_direct_op_calls_check_their_arguments(device):
    """The C++ checks guard torch.ops.fastseg calls that bypass the Python layer."""
    if not has_kernel("upsample_add_forward", device):
        pytest.skip(f"fastseg::upsample_add_forward has no {device} kernel in this build")
    x = torch.randn(1, 2, 3, 4, device=device)
    op = torch.ops.fastseg.upsample_add_forward
    with pytest.raises(ValueError, match="too small"):
        op(x, torch.randn(1, 2, 6, 8, device=device), [1, 0], [6, 8], [0.5, 0.5], False)
    with pytest.raises(ValueError, match="skip"):
        op(x, torch.randn(1, 3, 6, 8, device=device), [0, 0], [6, 8], [0.5, 0.5], False)
    with pytest.raises(ValueError, match="output_size"):
        op(x, None, [0, 0], [0, 8], [0.5, 0.5], False)
    with pytest.raises(TypeError, match="dtype"):
        op(x, torch.randn(1, 2, 6, 8, device=device, dtype=torch.float64), [0, 0], [6, 8],
           [0.5, 0.5], False)


# --- torch.compile ------------------------------------------------------------------------

def _decoder_step(coarse, mid, fine, backend):
    a = upsample_add(coarse, mid, skip_offset=(1, 1), backend=backend)
    b = upsample_add(a, fine, scale_factor=2, skip_offset=(0, 2), backend=backend)
    return upsample_add(b, None, size=(33, 29), align_corners=True, backend=backend) * 2


@pytest.mark.parametrize("device,backend", device_backends())
def test_torch_compile_fullgraph_matches_eager(device, backend):
    coarse = rand((2, 3, 4, 5), device, torch.float32, seed=21)
    mid = rand((2, 3, 9, 11), device, torch.float32, seed=22)   # window (8, 10) at (1, 1)
    fine = rand((2, 3, 17, 22), device, torch.float32, seed=23)  # window (16, 20) at (0, 2)
    leaves = [t.requires_grad_(True) for t in (coarse, mid, fine)]
    out = compiled_matches_uncompiled(_decoder_step, leaves, backend)
    eager_out = eager(eager(eager(coarse, mid, skip_offset=(1, 1)), fine, scale_factor=2,
                            skip_offset=(0, 2)), None, size=(33, 29), align_corners=True) * 2
    torch.testing.assert_close(out, eager_out, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", device_backends(reference=False))
def test_torch_compile_fullgraph_module(device, backend):
    torch._dynamo.reset()
    up = fastseg.nn.UpsampleAdd(scale_factor=2, backend=backend)
    conv = torch.nn.Conv2d(3, 3, 1).to(device)

    def step(x, skip):
        return up(conv(x), skip, skip_offset=(1, 0)).sum()

    x = rand((2, 3, 5, 6), device, torch.float32, seed=24)
    skip = rand((2, 3, 11, 12), device, torch.float32, seed=25).requires_grad_(True)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, skip)
    loss.backward()
    got = (loss.detach(), conv.weight.grad.clone(), skip.grad.clone())
    conv.weight.grad, skip.grad = None, None
    loss = step(x, skip)
    loss.backward()
    for a, b in zip(got, (loss.detach(), conv.weight.grad, skip.grad)):
        torch.testing.assert_close(a, b)


# --- the module -----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backends())
def test_module_size_scale_and_output_size_override(device, backend):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = rand((2, 3, 4, 5), device, dtype, seed=26)
    skip = rand((2, 3, 12, 14), device, dtype, seed=27)
    by_scale = fastseg.nn.UpsampleAdd(scale_factor=2, backend=backend)
    torch.testing.assert_close(by_scale(x, skip, skip_offset=(2, 1)),
                               eager(x, skip, scale_factor=2, skip_offset=(2, 1)), **tol(dtype))
    by_size = fastseg.nn.UpsampleAdd(size=(7, 9), align_corners=True, backend=backend)
    torch.testing.assert_close(by_size(x), eager(x, None, size=(7, 9), align_corners=True), **tol(dtype))
    # output_size overrides the module's size / scale_factor for one call
    torch.testing.assert_close(by_scale(x, skip, output_size=(11, 13)),
                               eager(x, skip, size=(11, 13)), **tol(dtype))
    torch.testing.assert_close(by_size(x, output_size=5), eager(x, None, size=(5, 5), align_corners=True),
                               **tol(dtype))
    # neither: the rest of the skip
    rest = fastseg.nn.UpsampleAdd(backend=backend)
    torch.testing.assert_close(rest(x, skip, skip_offset=(3, 4)), eager(x, skip, skip_offset=(3, 4)),
                               **tol(dtype))


def test_module_arguments_and_repr():
    m = fastseg.nn.UpsampleAdd(scale_factor=2)
    assert m.scale_factor == (2.0, 2.0) and m.size is None
    assert repr(m) == "UpsampleAdd(scale_factor=(2.0, 2.0), align_corners=False)"
    m = fastseg.nn.UpsampleAdd(size=(64, 48), align_corners=True)
    assert repr(m) == "UpsampleAdd(size=(64, 48), align_corners=True)"
    assert list(m.parameters()) == [] and m.state_dict() == {}
    with pytest.raises(ValueError, match="give only one of size and scale_factor"):
        fastseg.nn.UpsampleAdd(size=4, scale_factor=2)
    with pytest.raises(ValueError, match="scale_factor must be positive"):
        fastseg.nn.UpsampleAdd(scale_factor=-2)
    with pytest.raises(ValueError, match="size must be >= 1"):
        fastseg.nn.UpsampleAdd(size=(0, 3))
    with pytest.raises(ValueError, match="give size or scale_factor"):
        fastseg.nn.UpsampleAdd()(torch.randn(1, 1, 2, 2))


def test_channels_last_output_rule_is_shared():
    """The rule the kernels implement is the one the fake (meta) functions use."""
    x = torch.randn(2, 3, 4, 5)
    assert not _checks.channels_last_output(x)
    assert _checks.channels_last_output(x.contiguous(memory_format=torch.channels_last))
    # C = 1: channels_last and contiguous at once -> contiguous
    assert not _checks.channels_last_output(torch.randn(2, 1, 4, 5).contiguous(memory_format=torch.channels_last))
