"""Triton kernels of the fused softmax cross-entropy, run by triton's interpreter on CPU.

Run in their own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 pytest -m triton_interpret tests/test_triton_interpret.py

Forward values and the backward gradients are compared with fastseg.ops._reference (F.cross_entropy
plus pixel_weight) in float64, on fresh random data with tiny odd shapes.
"""

import itertools
import math
import zlib

import numpy
import pytest
import torch

from conftest import require_triton_interpreter

pytestmark = pytest.mark.triton_interpret

require_triton_interpreter()

from fastseg.ops._reference import REDUCTIONS  # noqa: E402
from fastseg.ops._reference import softmax_cross_entropy as reference  # noqa: E402
from fastseg.triton import softmax_cross_entropy as sce  # noqa: E402

LAYOUTS = ("nchw", "channels_last", "2d", "strided")


def _logits(layout, B, C, S, dtype, scale=1.0):
    """Fresh random (B, C, S) logits in the memory layout the public layer hands over."""
    if layout == "nchw":
        x = torch.randn(B, C, S, dtype=torch.float64)
    elif layout == "channels_last":  # (B, H, W, C) memory, viewed as (B, C, S)
        x = torch.randn(B, S, C, dtype=torch.float64).permute(0, 2, 1)
    elif layout == "2d":  # an (N, C) input arrives as (1, C, N) with strides (0, 1, C)
        x2 = torch.randn(B * S, C, dtype=torch.float64)
        x = x2.as_strided((1, C, B * S), (0, 1, C))
    elif layout == "strided":  # neither stride is 1: every other pixel of a wider map
        x = torch.randn(B, C, 2 * S, dtype=torch.float64)[:, :, ::2]
    else:
        raise ValueError(layout)
    x = x * scale
    # Cast without changing the layout (x.to(dtype) keeps strides for dense tensors only).
    out = torch.empty_strided(x.shape, x.stride(), dtype=dtype) if layout != "strided" \
        else torch.empty(B, C, 2 * S, dtype=dtype)[:, :, ::2]
    out.copy_(x)
    return out


def _target(B, S, C, dtype, ignore_index, ignore_fraction=0.25):
    t = torch.randint(0, C, (B, S), dtype=torch.int64)
    if ignore_index is not None:
        ignored = torch.rand(B, S) < ignore_fraction
        t = torch.where(ignored, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def _reference_loss_and_grad(x, target, weight, pixel_weight, ignore_index, reduction,
                             label_smoothing, grad_output, dtype=torch.float64):
    """(loss, grad) of the reference at `dtype`, via autograd."""
    xr = x.detach().to(dtype).requires_grad_(True)
    w = None if weight is None else weight.to(dtype)
    pw = None if pixel_weight is None else pixel_weight.to(dtype)
    loss = reference(xr, target, w, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, pixel_weight=pw)
    loss.backward(grad_output.to(dtype))
    return loss.detach(), xr.grad


def _run(x, target, weight, pixel_weight, ignore_index, reduction, label_smoothing,
         grad_output):
    r = REDUCTIONS[reduction]
    loss, lse, total_weight = sce.forward(x, target, weight, pixel_weight, ignore_index, r,
                                          label_smoothing)
    grad = sce.backward(grad_output, x, target, lse, total_weight, weight, pixel_weight,
                        ignore_index, r, label_smoothing)
    return loss, lse, total_weight, grad


def _case(layout, B, C, S, dtype, reduction, *, use_weight, use_pixel_weight, smoothing,
          target_dtype, ignore_index, scale=1.0):
    x = _logits(layout, B, C, S, dtype, scale)
    target = _target(x.shape[0], x.shape[2], C, target_dtype, ignore_index)
    weight = torch.rand(C) + 0.5 if use_weight else None
    pixel_weight = torch.rand(x.shape[0], x.shape[2]) + 0.5 if use_pixel_weight else None
    if reduction == "none":
        grad_output = torch.randn(x.shape[0], x.shape[2]).to(dtype)
    else:
        grad_output = torch.randn(()).to(dtype)
    ii = -100 if ignore_index is None else ignore_index
    return x, target, weight, pixel_weight, ii, reduction, smoothing, grad_output


def _expected_total_weight(target, weight, pixel_weight, ignore_index, C):
    valid = (target.long() != ignore_index) & (target.long() >= 0) & (target.long() < C)
    w = torch.ones(target.shape, dtype=torch.float64) if weight is None else \
        weight.double()[torch.where(valid, target.long(), 0)]
    if pixel_weight is not None:
        w = w * pixel_weight.double()
    return (w * valid).sum()


def _check_float32(args, rtol=1e-5, atol=1e-6):
    x, target, weight, pixel_weight, ii, reduction, eps, go = args
    C = x.shape[1]
    loss, lse, total_weight, grad = _run(*args)
    ref_loss, ref_grad = _reference_loss_and_grad(x, target, weight, pixel_weight, ii,
                                                  reduction, eps, go)
    assert loss.dtype == x.dtype
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    assert lse.dtype == torch.float32 and lse.shape == target.shape + (2,)
    lse = lse[..., 0] + lse[..., 1]  # saved as max and log(sum exp)
    valid = target.long() != ii
    ref_lse = torch.logsumexp(x.double(), dim=1)
    torch.testing.assert_close(lse.double()[valid], ref_lse[valid], rtol=rtol, atol=atol)
    assert total_weight.dtype == torch.float32 and total_weight.dim() == 0
    torch.testing.assert_close(total_weight.double(),
                               _expected_total_weight(target, weight, pixel_weight, ii, C),
                               rtol=rtol, atol=atol)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert grad.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


# A focused grid: every layout x class count x reduction, with the options (weights,
# smoothing, target dtype, pixel count) rotated over the cases so each shows up everywhere.
_CLASS_COUNTS = (2, 5, 21, 37)  # 37 > 32 walks the classes in chunks
_S_VALUES = (1, 7, 33)
_OPTIONS = [
    # use_weight, use_pixel_weight, smoothing, target dtype, ignore_index
    (False, False, 0.0, torch.int64, -100),
    (True, False, 0.1, torch.int32, 3),
    (False, True, 0.1, torch.uint8, 255),
    (True, True, 0.0, torch.int64, 1),
    (True, True, 0.1, torch.int32, -100),
    (False, False, 0.1, torch.int64, None),
]
_CASES = [
    (layout, C, reduction, _S_VALUES[i % 3], *_OPTIONS[i % len(_OPTIONS)])
    for i, (layout, C, reduction) in enumerate(
        itertools.product(LAYOUTS, _CLASS_COUNTS, ("none", "mean", "sum")))
]


@pytest.mark.parametrize(
    "layout,C,reduction,S,use_weight,use_pixel_weight,smoothing,target_dtype,ignore_index",
    _CASES)
def test_float32_matches_reference(layout, C, reduction, S, use_weight, use_pixel_weight,
                                   smoothing, target_dtype, ignore_index):
    torch.manual_seed(zlib.crc32(f"{layout}-{C}-{reduction}-{S}".encode()))
    args = _case(layout, 2, C, S, torch.float32, reduction, use_weight=use_weight,
                 use_pixel_weight=use_pixel_weight, smoothing=smoothing,
                 target_dtype=target_dtype, ignore_index=ignore_index)
    _check_float32(args)


def _shipped_config_cases():
    cases = []
    for config in sce.SHIPPED_CONFIGS:
        # A looping config serves C > 32: give it a partial last chunk.
        C = config.max_classes if config.max_classes is not None else max(33, config.block_c + 5)
        layout = {"pixel": "nchw", "class": "channels_last", "strided": "strided"}[config.layout]
        cases.append(pytest.param(config, layout, C, id=config.name))
    return cases


@pytest.mark.parametrize("config,layout,C", _shipped_config_cases())
def test_every_shipped_config(config, layout, C):
    """Each shipped tile configuration runs (one with all options on, one tail tile)."""
    torch.manual_seed(C)
    S = config.block_p + 3 if config.block_p <= 64 else 37
    args = _case(layout, 1, C, S, torch.float32, "mean", use_weight=True,
                 use_pixel_weight=True, smoothing=0.1, target_dtype=torch.int64,
                 ignore_index=-100)
    assert sce.select_config(args[0])[0] == config
    _check_float32(args)


def _bf16_error_vs_eager(args):
    x, target, weight, pixel_weight, ii, reduction, eps, go = args
    loss, _, _, grad = _run(*args)
    ref_loss, ref_grad = _reference_loss_and_grad(x, target, weight, pixel_weight, ii,
                                                  reduction, eps, go)
    eager_loss, eager_grad = _reference_loss_and_grad(x, target, weight, pixel_weight, ii,
                                                      reduction, eps, go, dtype=x.dtype)
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    for ours, eager, ref in ((loss, eager_loss, ref_loss), (grad, eager_grad, ref_grad)):
        ours_err = (ours.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        # Half a bfloat16 ulp of the largest value: rounding the float32 result once.
        slack = ref.abs().max().item() * 2.0**-8 + 1e-6
        assert ours_err <= 2 * eager_err + slack, (ours_err, eager_err, slack)


@pytest.mark.parametrize("layout,C,reduction", [
    ("nchw", 21, "mean"), ("nchw", 37, "none"), ("channels_last", 5, "sum"),
    ("2d", 21, "none"), ("strided", 5, "mean"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_not_worse_than_eager(layout, C, reduction, dtype):
    torch.manual_seed(C)
    args = _case(layout, 2, C, 33, dtype, reduction, use_weight=True,
                 use_pixel_weight=True, smoothing=0.1, target_dtype=torch.int64,
                 ignore_index=-100)
    _bf16_error_vs_eager(args)


def test_float64_input():
    """float64 is accepted under the interpreter (accumulated in float32, like the rest)."""
    torch.manual_seed(0)
    args = _case("nchw", 2, 5, 7, torch.float64, "mean", use_weight=True,
                 use_pixel_weight=False, smoothing=0.1, target_dtype=torch.int64,
                 ignore_index=-100)
    _check_float32(args)


@pytest.mark.parametrize("layout,C", [("nchw", 21), ("channels_last", 21), ("nchw", 37),
                                      ("channels_last", 70)])
def test_large_logits_stay_finite_and_exact(layout, C):
    """+-1e4 logits: exact only when every exponent is taken relative to the true max
    (37 and 70 classes walk the classes in chunks: the max must cover all of them)."""
    torch.manual_seed(1)
    for reduction in ("none", "mean"):
        args = _case(layout, 2, C, 33, torch.float32, reduction, use_weight=True,
                     use_pixel_weight=True, smoothing=0.1, target_dtype=torch.int64,
                     ignore_index=-100, scale=1e4)
        loss, lse, total_weight, grad = _run(*args)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # Losses are ~1e4 here: a relative tolerance on the loss, absolute on p_c.
        _check_float32(args, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
def test_all_ignored_mean_is_nan(target_dtype):
    torch.manual_seed(2)
    x = _logits("nchw", 2, 5, 7, torch.float32)
    target = torch.full((2, 7), 4, dtype=target_dtype)
    # grad_output / total_weight is 1 / 0 here: numpy (the interpreter) would warn.
    with numpy.errstate(divide="ignore", invalid="ignore"):
        loss, lse, total_weight, grad = _run(x, target, None, None, 4, "mean", 0.1,
                                             torch.tensor(1.0))
    expected = reference(x.double(), target, ignore_index=4, label_smoothing=0.1)
    assert torch.isnan(expected) and torch.isnan(loss)
    assert total_weight.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    loss_sum = sce.forward(x, target, None, None, 4, REDUCTIONS["sum"], 0.1)[0]
    assert loss_sum.item() == 0.0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_invalid_target_gives_nan_without_crash(layout):
    torch.manual_seed(3)
    C, S = 5, 33
    x = _logits(layout, 2, C, S, torch.float32)
    for target_dtype, bad, ii in ((torch.int64, C, -100), (torch.int64, -7, -100),
                                  (torch.int64, 2**33 + 1, -100), (torch.int32, 2**31 - 1, -100),
                                  (torch.uint8, 200, 255)):
        target = _target(2, S, C, target_dtype, ii)
        target[1, 4] = bad
        pw = torch.rand(2, S) + 0.5
        for reduction in ("none", "mean", "sum"):
            go = torch.ones(2, S) if reduction == "none" else torch.tensor(1.0)
            loss, _, total_weight, grad = _run(x, target, torch.rand(C), pw, ii,
                                               reduction, 0.1, go)
            if reduction == "none":
                assert torch.isnan(loss[1, 4])
                loss[1, 4] = 0
                assert torch.isfinite(loss).all()
            else:
                assert torch.isnan(loss), (target_dtype, bad, reduction)
            assert torch.isfinite(total_weight)
            assert torch.isnan(grad[1, :, 4]).all()
            grad[1, :, 4] = 0
            assert torch.isfinite(grad).all()


def test_nan_logit_gives_nan_like_torch():
    torch.manual_seed(4)
    x = _logits("nchw", 1, 5, 7, torch.float32)
    x[0, 2, 3] = float("nan")
    target = _target(1, 7, 5, torch.int64, None)
    loss, _, _, grad = _run(x, target, None, None, -100, "none", 0.0, torch.ones(1, 7))
    expected = reference(x.double(), target, reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(expected))
    assert torch.isnan(grad[0, :, 3]).all()


def test_bitwise_deterministic():
    torch.manual_seed(5)
    args = _case("nchw", 2, 21, 33, torch.float32, "mean", use_weight=True,
                 use_pixel_weight=True, smoothing=0.1, target_dtype=torch.int64,
                 ignore_index=-100)
    first = _run(*args)
    second = _run(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_int64_index_path(monkeypatch):
    """The 64-bit offset variant (images beyond 2^31 elements) computes the same values."""
    monkeypatch.setattr(sce, "_needs_int64", lambda *args: True)
    torch.manual_seed(6)
    for layout in ("nchw", "channels_last"):
        args = _case(layout, 2, 5, 7, torch.float32, "sum", use_weight=True,
                     use_pixel_weight=True, smoothing=0.1, target_dtype=torch.int64,
                     ignore_index=-100)
        _check_float32(args)


def test_grad_input_layout():
    """grad_input is torch.empty_like(input): channels_last strides kept, views densified."""
    torch.manual_seed(7)
    for layout in LAYOUTS:
        x = _logits(layout, 2, 5, 7, torch.float32)
        target = _target(x.shape[0], x.shape[2], 5, torch.int64, -100)
        loss, lse, tw = sce.forward(x, target, None, None, -100, REDUCTIONS["sum"], 0.0)
        grad = sce.backward(torch.tensor(1.0), x, target, lse, tw, None, None, -100,
                            REDUCTIONS["sum"], 0.0)
        assert grad.shape == x.shape
        assert grad.stride() == torch.empty_like(x).stride()
        if layout == "channels_last":
            assert grad.stride() == x.stride()


def test_ops_are_registered():
    forward = torch.ops.fastseg.softmax_cross_entropy_forward_triton.default
    backward = torch.ops.fastseg.softmax_cross_entropy_backward_triton.default
    assert "Tensor? weight" in str(forward._schema)
    assert "Tensor? pixel_weight" in str(backward._schema)
    torch.manual_seed(8)
    x = _logits("nchw", 1, 3, 7, torch.float32)
    target = _target(1, 7, 3, torch.int64, None)
    loss, lse, tw = forward(x, target, None, None, -100, 1, 0.0)
    expected = reference(x.double(), target)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_not_supported_reasons():
    x = torch.randn(1, 3, 7)
    t = torch.zeros(1, 7, dtype=torch.int64)
    assert sce.not_supported_reasons(x, t) == []
    assert sce.not_supported_reasons(x.double(), t) == []
    reasons = sce.not_supported_reasons(x, t.to(torch.int16))
    assert any("target dtype" in r for r in reasons)
    reasons = sce.not_supported_reasons(x.to(torch.complex64), t)
    assert any("dtype" in r for r in reasons)
    # The public layer asks with the user-facing (N, C, H, W) tensors.
    assert sce.not_supported_reasons(torch.randn(2, 3, 4, 5),
                                     torch.zeros(2, 4, 5, dtype=torch.uint8)) == []


def _opcheck_cases():
    torch.manual_seed(9)
    x = _logits("nchw", 2, 5, 7, torch.float32)
    xl = _logits("channels_last", 2, 5, 7, torch.float32)
    t = _target(2, 7, 5, torch.int64, -100)
    w, pw = torch.rand(5) + 0.5, torch.rand(2, 7) + 0.5
    return [(x, t, None, None, -100, 1, 0.0), (x, t, w, pw, -100, 0, 0.1),
            (xl, _target(2, 7, 5, torch.int32, 2), w, None, 2, 2, 0.1)]


def test_opcheck():
    """Schema, fake implementation and AOT dispatch of both ops (under the interpreter the
    ops are opaque custom ops whose fake pass skips the launch)."""
    for args in _opcheck_cases():
        torch.library.opcheck(sce.forward, args)
        loss, lse, total_weight = sce.forward(*args)
        r = args[5]
        go = torch.randn(lse.shape) if r == 0 else torch.randn(())
        torch.library.opcheck(sce.backward, (go, args[0], args[1], lse, total_weight,
                                             args[2], args[3], args[4], r, args[6]))


def test_torch_compile_fullgraph():
    torch.manual_seed(10)
    x = _logits("channels_last", 2, 21, 7, torch.float32)
    t = _target(2, 7, 21, torch.uint8, 255)
    w, pw = torch.rand(21) + 0.5, torch.rand(2, 7) + 0.5

    def loss_and_grad(x, t, w, pw):
        loss, lse, total_weight = sce.forward(x, t, w, pw, 255, 1, 0.1)
        grad = sce.backward(torch.ones((), dtype=x.dtype), x, t, lse, total_weight, w, pw,
                            255, 1, 0.1)
        return loss, grad

    compiled = torch.compile(loss_and_grad, fullgraph=True, backend="aot_eager")
    loss, grad = compiled(x, t, w, pw)
    expected_loss, expected_grad = loss_and_grad(x, t, w, pw)
    assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)


@pytest.mark.triton_interpret
def test_offset_logits_keep_eager_accuracy_triton():
    from test_softmax_cross_entropy import offset_logits_errors
    err, err_eager = offset_logits_errors("triton", "cpu")
    assert err <= 2 * err_eager + 1e-9, (err, err_eager)
