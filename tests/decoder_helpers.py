"""Helpers shared by the FCN decoder op tests (test_upsample_add.py, test_deconv_add.py).

Imported as ``from decoder_helpers import ...``: pytest's default (prepend) import mode puts
tests/ on sys.path, as for ``from conftest import ...``.
"""

import pytest
import torch

from conftest import HAS_CUDA, fused_backends


def device_backends(op, reference=True):
    """pytest params (device, backend): the fused backends per device, plus cpu-reference."""
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in fused_backends(op, "cpu")]
    if reference:
        params.append(pytest.param("cpu", "reference", id="cpu-reference"))
    cuda_marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
    for name in (fused_backends(op, "cuda") if HAS_CUDA else ["cuda"]):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=cuda_marks))
    return params


# --- data --------------------------------------------------------------------------------

def rand(shape, device="cpu", dtype=torch.float64, seed=0, scale=1.0):
    """Fresh random values (never zeros), built in float64 on the CPU for reproducibility."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.25
    return t.to(device=device, dtype=dtype)


def to_layout(t, layout):
    """The same values in another memory layout (of a new buffer)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a bigger buffer
        big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":  # W stride > H stride
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "channel_sliced":  # every other channel of a bigger buffer
        big = torch.empty((t.shape[0], 2 * t.shape[1]) + t.shape[2:], dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    if layout == "expanded":  # stride 0 along N (as from a broadcast); values of sample 0
        return t[:1].expand(t.shape)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "strided", "transposed", "channel_sliced"]
GRAD_LAYOUTS = ["contiguous", "channels_last", "strided", "expanded"]


def parametrize_layouts(test):
    """test_layouts' parameters x_layout, skip_layout (or "none") and grad_layout."""
    test = pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)(test)
    test = pytest.mark.parametrize("skip_layout", LAYOUTS + ["none"])(test)
    return pytest.mark.parametrize("x_layout", LAYOUTS)(test)


def expect_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def check_format(out, x, msg=""):
    """The fused outputs are channels_last iff x is (and not also contiguous)."""
    if expect_channels_last(x):
        assert out.is_contiguous(memory_format=torch.channels_last), (out.stride(), x.stride(), msg)
    else:
        assert out.is_contiguous(), (out.stride(), x.stride(), msg)


# --- comparisons -------------------------------------------------------------------------

def assert_results_close(names, got, ref, tol, msg, dtype=None):
    """Output and gradients `got` against the float64 `ref` (None: no such gradient, in both),
    shapes equal (and dtypes `dtype` when given)."""
    for what, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, msg
            continue
        assert a.shape == b.shape and (dtype is None or a.dtype == dtype), (what, msg)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{what} {msg}: {m}")


def assert_layout_results_close(names, got, ref, tol, msg):
    """As assert_results_close for the layout tests (a None reference gradient is skipped)."""
    for what, a, b in zip(names, got, ref):
        if b is not None:
            torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{what} {msg}: {m}")


def assert_error_at_most_twice_eager(names, ours, theirs, ref, dtype, label):
    """flash-attention's rule: the max error vs a float64 reference `ref` at most 2x eager's
    (`theirs`) at that dtype, plus one ulp of the reference's max."""
    eps = torch.finfo(dtype).eps
    for what, a, e, r in zip(names, ours, theirs, ref):
        if r is None:
            continue
        assert a.dtype == dtype and a.shape == r.shape, what
        err = (a.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        floor = eps * r.abs().max().item()
        assert err <= 2 * err_eager + floor, (
            f"{label} {what}: max error {err:.3g} vs eager {err_eager:.3g} (floor {floor:.3g})")


def assert_bitwise_repeatable(names, compute, device):
    """compute() gives the same bits twice, and (on the CPU) with one thread."""
    first = compute()
    runs = [compute()]
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            runs.append(compute())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        for what, a, b in zip(names, first, other):
            assert torch.equal(a, b), what


def assert_same_under_deterministic_algorithms(names, compute):
    """compute() runs under torch.use_deterministic_algorithms(True), with the same bits."""
    expected = compute()
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = compute()
    finally:
        torch.use_deterministic_algorithms(enabled)
    for what, a, b in zip(names, got, expected):
        assert torch.equal(a, b), what


def compiled_matches_uncompiled(fn, leaves, backend):
    """fn(*leaves, backend) under torch.compile(fullgraph, aot_eager): output and gradients
    of out.square().sum() equal the uncompiled call's; returns the compiled output."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, backend)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = fn(*leaves, backend)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    return out


# --- torch.library ------------------------------------------------------------------------

def has_kernel(op_name, device):
    key = "CUDA" if device == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastseg::{op_name}", key)
    except RuntimeError:
        return False
