"""fastseg.ops.softmax_cross_entropy against F.cross_entropy (and the pixel-weighted reference).

Runs on the CPU here; with a GPU the same tests run on CUDA tensors (marked `cuda`).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.ops import _reference, softmax_cross_entropy

from conftest import devices, fused_backends

TARGET_DTYPES = [torch.uint8, torch.int32, torch.int64]
# (shape of the logits): 2-D to 5-D, odd sizes, C from 2 to 150.
SHAPES = [(7, 5), (3, 2, 1), (2, 19, 7, 9), (1, 150, 5, 3), (2, 21, 33, 1), (2, 3, 4, 5, 3), (1, 12, 1, 129)]


def make_inputs(shape, device, dtype=torch.float64, target_dtype=torch.int64, ignore_index=-100,
                ignore_fraction=0.2, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    classes = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale)
    target_shape = (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, classes, target_shape, generator=g)
    if ignore_fraction:
        mask = torch.rand(target_shape, generator=g) < ignore_fraction
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return x.to(device=device, dtype=dtype), t.to(device=device, dtype=target_dtype)


def to_layout(x, layout):
    """The same values in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.transpose(0, 1).contiguous().transpose(0, 1)  # class axis innermost-ish
    if layout == "strided":  # non-contiguous: every other element of a bigger buffer
        big = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


def same_strides(a, b):
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def loss_and_grad(fn, x, t, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    # A non-uniform upstream gradient exercises the per-pixel scale of reduction="none".
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * up).sum().backward()
    return loss.detach(), x.grad.detach()


def reference(x, t, **kw):
    return _reference.softmax_cross_entropy(x, t, **kw)


def option_grid(classes, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(classes)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.25).to(device=device, dtype=dtype)
    for reduction, use_weight, smoothing in itertools.product(("none", "mean", "sum"), (False, True), (0.0, 0.1)):
        yield dict(reduction=reduction, weight=weight if use_weight else None, label_smoothing=smoothing)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_cross_entropy_float64_on_cpu_float32_on_cuda(device, shape, layout):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for backend in fused_backends("softmax_cross_entropy", device):
        for target_dtype in TARGET_DTYPES:
            ignore_index = 255 if target_dtype == torch.uint8 else -100
            x, t = make_inputs(shape, device, dtype, target_dtype, ignore_index, seed=len(shape))
            x = to_layout(x, layout)
            for kw in option_grid(shape[1], device, dtype):
                kw["ignore_index"] = ignore_index
                ref_loss, ref_grad = loss_and_grad(reference, x.double(), t, **{**kw, "weight": None if kw["weight"] is None else kw["weight"].double()})
                loss, grad = loss_and_grad(softmax_cross_entropy, x, t, backend=backend, **kw)
                tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
                msg = f"{backend} {target_dtype} {kw['reduction']} w={kw['weight'] is not None} eps={kw['label_smoothing']}"
                assert loss.dtype == x.dtype and loss.shape == ref_loss.shape, msg
                torch.testing.assert_close(loss.double(), ref_loss, **tol, msg=msg)
                torch.testing.assert_close(grad.double(), ref_grad, **tol, msg=msg)
                if layout != "strided":  # the gradient keeps the logits' layout
                    assert same_strides(grad, x), (grad.stride(), x.stride(), msg)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 19, 17, 23), (3, 150, 4, 7), (64, 21)], ids=str)
def test_low_precision_error_at_most_twice_eager(device, dtype, shape):
    """flash-attention's rule: error vs a float64 reference at most 2x eager PyTorch's."""
    for backend in fused_backends("softmax_cross_entropy", device):
        x64, t = make_inputs(shape, device, torch.float64, seed=3)
        x = x64.to(dtype)
        for kw in option_grid(shape[1], device, torch.float32):
            ref_loss, ref_grad = loss_and_grad(reference, x.double(), t, **{**kw, "weight": None if kw["weight"] is None else kw["weight"].double()})
            eager_kw = {**kw, "weight": None if kw["weight"] is None else kw["weight"].to(dtype)}
            eager_loss, eager_grad = loss_and_grad(F.cross_entropy, x, t, **eager_kw)
            loss, grad = loss_and_grad(softmax_cross_entropy, x, t, backend=backend, **kw)
            eps = torch.finfo(dtype).eps
            for ours, eager, ref, what in ((loss, eager_loss, ref_loss, "loss"), (grad, eager_grad, ref_grad, "grad")):
                err = (ours.double() - ref).abs().max().item()
                err_eager = (eager.double() - ref).abs().max().item()
                slack = eps * ref.abs().max().item()
                assert err <= 2 * err_eager + slack, (
                    f"{backend} {dtype} {what} {kw['reduction']} w={kw['weight'] is not None} "
                    f"eps={kw['label_smoothing']}: error {err:.3g} vs eager {err_eager:.3g}")


@pytest.mark.parametrize("device", devices())
def test_pixel_weight_matches_reference(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for backend in fused_backends("softmax_cross_entropy", device):
        x, t = make_inputs((2, 7, 9, 11), device, dtype, ignore_index=-1, seed=5)
        pw = torch.rand(t.shape, dtype=dtype, device=device) * 10
        for kw in option_grid(7, device, dtype):
            kw.update(ignore_index=-1, pixel_weight=pw)
            ref_loss, ref_grad = loss_and_grad(reference, x, t, **kw)
            loss, grad = loss_and_grad(softmax_cross_entropy, x, t, backend=backend, **kw)
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(loss, ref_loss, **tol)
            torch.testing.assert_close(grad, ref_grad, **tol)
        # The "mean" denominator is sum(weight[target] * pixel_weight) over kept pixels.
        w = torch.rand(7, dtype=dtype, device=device) + 0.5
        per_pixel = softmax_cross_entropy(x, t, w, -1, "none", pixel_weight=pw, backend=backend)
        keep = t != -1
        denominator = (w[t.clamp(min=0)] * pw * keep).sum()
        mean = softmax_cross_entropy(x, t, w, -1, "mean", pixel_weight=pw, backend=backend)
        torch.testing.assert_close(mean, per_pixel.sum() / denominator)


def test_reference_pixel_weight_of_ones_is_cross_entropy():
    x, t = make_inputs((2, 5, 3, 4), "cpu", seed=9)
    for kw in option_grid(5, "cpu"):
        ones = torch.ones(t.shape, dtype=torch.float64)
        torch.testing.assert_close(reference(x, t, pixel_weight=ones, **kw), F.cross_entropy(x, t, **kw))


@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device):
    if device != "cpu":
        pytest.skip("float64 gradcheck runs on the CPU kernel")
    for backend in fused_backends("softmax_cross_entropy", "cpu"):
        x, t = make_inputs((2, 4, 3, 5), "cpu", seed=11)
        pw = torch.rand(t.shape, dtype=torch.float64) + 0.5
        for kw in option_grid(4, "cpu"):
            for pixel_weight in (None, pw):
                def fn(inp):
                    return softmax_cross_entropy(inp, t, pixel_weight=pixel_weight, backend=backend, **kw)
                assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", devices())
def test_all_ignored_mean_is_nan_like_torch(device):
    for backend in fused_backends("softmax_cross_entropy", device):
        x = torch.randn(2, 3, 4, 4, device=device)
        t = torch.full((2, 4, 4), -100, device=device)
        for weight in (None, torch.rand(3, device=device)):
            for smoothing in (0.0, 0.2):
                expected = F.cross_entropy(x, t, weight, label_smoothing=smoothing)
                assert torch.isnan(expected)
                loss, grad = loss_and_grad(softmax_cross_entropy, x, t, weight=weight, label_smoothing=smoothing, backend=backend)
                assert torch.isnan(loss)
                assert softmax_cross_entropy(x, t, weight, reduction="sum", backend=backend) == 0
                assert (softmax_cross_entropy(x, t, weight, reduction="none", backend=backend) == 0).all()


@pytest.mark.parametrize("device", devices())
def test_nan_and_huge_logits(device):
    for backend in fused_backends("softmax_cross_entropy", device):
        x, t = make_inputs((2, 5, 6, 7), device, torch.float32, ignore_fraction=0.0, seed=2)
        huge = x * 3e3  # logits up to ~+-1e4: still finite and exact up to float32
        loss, grad = loss_and_grad(softmax_cross_entropy, huge, t, label_smoothing=0.1, backend=backend)
        ref_loss, ref_grad = loss_and_grad(reference, huge.double(), t, label_smoothing=0.1)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        x[0, 2, 3, 4] = float("nan")
        assert torch.isnan(softmax_cross_entropy(x, t, backend=backend))
        per_pixel = softmax_cross_entropy(x, t, reduction="none", backend=backend)
        assert torch.isnan(per_pixel[0, 3, 4]) and torch.isfinite(per_pixel[1]).all()


def test_invalid_target_is_a_value_error_naming_it():
    for backend in fused_backends("softmax_cross_entropy", "cpu"):
        x, t = make_inputs((2, 5, 4, 4), "cpu", torch.float32, ignore_fraction=0.0)
        for bad in (5, 17, -3):
            t_bad = t.clone()
            t_bad[1, 2, 3] = bad
            with pytest.raises(ValueError, match=rf"target contains {bad}\b.*\[0, 5\)"):
                softmax_cross_entropy(x, t_bad, backend=backend)
        # A map big enough for several threads: the error crosses the parallel region.
        x_big, t_big = make_inputs((2, 19, 128, 128), "cpu", torch.float32, ignore_fraction=0.0)
        t_big[1, 100, 77] = 42
        with pytest.raises(ValueError, match="target contains 42"):
            softmax_cross_entropy(x_big, t_big, backend=backend)
        # uint8 ids cannot be negative but can be too large.
        t_bad = t.to(torch.uint8)
        t_bad[0, 0, 0] = 200
        with pytest.raises(ValueError, match="target contains 200"):
            softmax_cross_entropy(x, t_bad, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_invalid_target_on_cuda_never_reads_out_of_bounds():
    """On CUDA a bad id gives NaN (Triton) or a device-side assert at synchronization (CUDA C++)."""
    if "triton" in fused_backends("softmax_cross_entropy", "cuda"):
        x = torch.randn(2, 5, 4, 4, device="cuda")
        t = torch.randint(0, 5, (2, 4, 4), device="cuda")
        t[1, 2, 3] = 7
        assert torch.isnan(softmax_cross_entropy(x, t, backend="triton"))


@pytest.mark.parametrize("device", devices())
def test_unbatched_and_2d_inputs(device):
    for backend in fused_backends("softmax_cross_entropy", device):
        x = torch.randn(11, device=device)
        t = torch.tensor(4, device=device)
        for reduction in ("none", "mean", "sum"):
            torch.testing.assert_close(softmax_cross_entropy(x, t, reduction=reduction, backend=backend),
                                       F.cross_entropy(x, t, reduction=reduction))
        x2 = torch.randn(37, 6, device=device).t().contiguous().t()  # (N, C) with class stride N
        t2 = torch.randint(0, 6, (37,), device=device)
        a, ga = loss_and_grad(softmax_cross_entropy, x2, t2, reduction="none", backend=backend)
        b, gb = loss_and_grad(F.cross_entropy, x2, t2, reduction="none")
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("device", devices())
def test_bitwise_repeatable_and_thread_count_independent(device):
    for backend in fused_backends("softmax_cross_entropy", device):
        x, t = make_inputs((3, 19, 61, 67), device, torch.float32, seed=4)
        w = torch.rand(19, device=device)
        runs = []
        threads = torch.get_num_threads()
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            try:
                runs.append(loss_and_grad(softmax_cross_entropy, x, t, weight=w, label_smoothing=0.1, backend=backend))
            finally:
                torch.set_num_threads(threads)
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
def test_saves_only_per_pixel_state_for_backward(device):
    """Peak extra memory beyond logits and gradient is O(N*H*W): only the per-pixel lse and
    the targets are saved (besides the logits themselves)."""
    for backend in fused_backends("softmax_cross_entropy", device):
        x, t = make_inputs((2, 21, 32, 32), device, torch.float32, seed=6)
        x.requires_grad_(True)
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = softmax_cross_entropy(x, t, backend=backend)
        pixels = t.numel()
        extra = [s for s in saved if s.data_ptr() != x.data_ptr()]
        assert sum(s.numel() for s in extra) <= 4 * pixels + 1, [tuple(s.shape) for s in extra]
        loss.backward()


# --- errors ----------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 3, 4, 5)
    t = torch.randint(0, 3, (2, 4, 5))
    cases = [
        (dict(target=t[:, :3]), ValueError, r"target shape \(2, 3, 5\) does not match input shape \(2, 3, 4, 5\)"),
        (dict(target=t.to(torch.int16)), TypeError, "uint8, int32 or int64"),
        (dict(input=x.long()), TypeError, "floating-point"),
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
        (dict(pixel_weight=torch.ones(2, 4)), ValueError, "pixel_weight shape"),
        (dict(target=t.to("meta")), ValueError, "target is on meta but input is on cpu"),
        (dict(weight=torch.ones(3, device="meta")), ValueError, "weight is on meta"),
        (dict(input=torch.randn(2, 0, 4, 5)), ValueError, "0 classes"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    ]
    for override, error, pattern in cases:
        kw = dict(input=x, target=t)
        kw.update(override)
        with pytest.raises(error, match=pattern):
            softmax_cross_entropy(**kw)


def test_backend_choice_and_its_errors():
    x = torch.randn(2, 3, 4, 5)
    t = torch.randint(0, 3, (2, 4, 5))
    expected = F.cross_entropy(x, t)
    torch.testing.assert_close(softmax_cross_entropy(x, t, backend="reference"), expected)
    with pytest.raises(NotImplementedError) as info:
        softmax_cross_entropy(x, t, backend="cuda")
    text = str(info.value)
    for name in fastseg.BACKENDS:
        assert f"  {name}: " in text
    assert "needs cuda tensors" in text
    with pytest.raises(ValueError, match="backend must be one of"):
        softmax_cross_entropy(x, t, backend="gpu")
    with fastseg.backend("reference"):
        assert fastseg.get_backend() == "reference"
        torch.testing.assert_close(softmax_cross_entropy(x, t), expected)
        with fastseg.backend("cuda"), pytest.raises(NotImplementedError):
            softmax_cross_entropy(x, t)
    assert fastseg.get_backend() == "auto"
    fastseg.set_backend("reference")
    assert fastseg.get_backend() == "reference"
    with pytest.raises(ValueError):
        fastseg.set_backend("fast")


def test_probability_targets_are_served_by_the_reference():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    p = torch.softmax(torch.randn(2, 4, 3, 3, dtype=torch.float64), 1)
    for kw in option_grid(4, "cpu"):
        torch.testing.assert_close(softmax_cross_entropy(x, p, **kw), F.cross_entropy(x, p, **kw))
    if fused_backends("softmax_cross_entropy", "cpu"):
        with pytest.raises(NotImplementedError, match="class-probability"):
            softmax_cross_entropy(x, p, backend="cpu")


def test_auto_picks_the_cpu_kernel_when_built():
    from fastseg.ops.softmax_cross_entropy import OP
    x = torch.randn(2, 3, 4, 5)
    t = torch.randint(0, 3, (2, 4, 5))
    chosen = OP.select(None, "cpu", x, t)
    assert chosen == ("cpu" if fused_backends("softmax_cross_entropy", "cpu") else "reference")


# --- module, torch.library, torch.compile -----------------------------------------------

def test_module_is_a_drop_in_for_nn_cross_entropy_loss():
    w = torch.rand(5) + 0.5
    ours = fastseg.nn.SoftmaxCrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x, t = make_inputs((2, 5, 6, 7), "cpu", torch.float32, ignore_index=2)
    a, ga = loss_and_grad(ours, x, t)
    b, gb = loss_and_grad(theirs, x, t)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    pw = torch.rand(t.shape)
    torch.testing.assert_close(ours(x, t, pw), reference(x, t, weight=w, ignore_index=2, label_smoothing=0.05, pixel_weight=pw))


def _op_samples():
    for reduction in (0, 1, 2):
        x, t = make_inputs((2, 5, 3, 4), "cpu", torch.float32)
        x = x.view(2, 5, 12).requires_grad_(True)
        w = torch.rand(5) + 0.5
        pw = torch.rand(2, 12)
        yield (x, t.view(2, 12), w, pw, -100, reduction, 0.1)
        yield (x, t.view(2, 12), None, None, -100, reduction, 0.0)


def test_opcheck_forward_op():
    if not fused_backends("softmax_cross_entropy", "cpu"):
        pytest.skip("fastseg._C not built")
    for args in _op_samples():
        torch.library.opcheck(torch.ops.fastseg.softmax_cross_entropy_forward.default, args)


def test_opcheck_backward_op():
    if not fused_backends("softmax_cross_entropy", "cpu"):
        pytest.skip("fastseg._C not built")
    for x, t, w, pw, ii, red, eps in _op_samples():
        loss, lse, total = torch.ops.fastseg.softmax_cross_entropy_forward(x.detach(), t, w, pw, ii, red, eps)
        grad = torch.rand_like(loss)
        torch.library.opcheck(torch.ops.fastseg.softmax_cross_entropy_backward.default,
                              (grad, x.detach(), t, lse, total, w, pw, ii, red, eps))


def test_torch_compile_fullgraph_model_plus_loss():
    if not fused_backends("softmax_cross_entropy", "cpu"):
        pytest.skip("fastseg._C not built")
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 7, 3, padding=1)
    loss_fn = fastseg.nn.SoftmaxCrossEntropyLoss(weight=torch.rand(7) + 0.5, label_smoothing=0.1)

    def step(images, labels):
        return loss_fn(model(images), labels)

    images = torch.randn(2, 3, 9, 11)
    labels = torch.randint(0, 7, (2, 9, 11))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(images, labels)
    eager_loss.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    compiled_loss = compiled(images, labels)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(model.weight.grad, eager_grad)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    if not fused_backends("softmax_cross_entropy", "cpu"):
        pytest.skip("fastseg._C not built")
    torch._dynamo.reset()
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    t = torch.randint(0, 5, (2, 6, 7))
    fn = torch.compile(lambda a, b: softmax_cross_entropy(a, b, label_smoothing=0.1) * 2, fullgraph=True)
    out = fn(x, t)
    out.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref_loss = F.cross_entropy(x_ref, t, label_smoothing=0.1) * 2
    ref_loss.backward()
    torch.testing.assert_close(out, ref_loss)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not math.isnan(out.item())


def offset_logits_errors(backend, device):
    """(fused error, eager error) of the float32 gradient for logits shifted by +1000.

    A kernel that saved lse = max + log(sum) as one float would lose ulp(1000) ~ 6e-5 in
    every probability; eager (and fastseg, which keeps max and log-sum apart) does not."""
    x64, t = make_inputs((2, 7, 13, 11), device, torch.float64, seed=8)
    x = (x64 + 1000).float()
    _, ref_grad = loss_and_grad(reference, x.double(), t)
    _, eager_grad = loss_and_grad(F.cross_entropy, x, t)
    _, grad = loss_and_grad(softmax_cross_entropy, x, t, backend=backend)
    return ((grad.double() - ref_grad).abs().max().item(),
            (eager_grad.double() - ref_grad).abs().max().item())


@pytest.mark.parametrize("device", devices())
def test_offset_logits_keep_eager_accuracy(device):
    for backend in fused_backends("softmax_cross_entropy", device):
        err, err_eager = offset_logits_errors(backend, device)
        assert err <= 2 * err_eager + 1e-9, (backend, err, err_eager)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (2, 5, 0, 3), (0, 4), (3, 1000, 5, 7)], ids=str)
def test_empty_inputs_and_many_classes(device, shape):
    """Empty batches or maps give torch's results (mean of nothing is NaN); C = 1000 works."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    for backend in fused_backends("softmax_cross_entropy", device):
        x, t = make_inputs(shape, device, dtype, seed=12)
        for reduction in ("none", "mean", "sum"):
            loss, grad = loss_and_grad(softmax_cross_entropy, x, t, reduction=reduction, backend=backend)
            ref_loss, ref_grad = loss_and_grad(reference, x, t, reduction=reduction)
            assert loss.shape == ref_loss.shape
            torch.testing.assert_close(loss, ref_loss, equal_nan=True)
            torch.testing.assert_close(grad, ref_grad, equal_nan=True)
