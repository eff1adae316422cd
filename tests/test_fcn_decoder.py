"""FCN's decoders end to end on a 500x500 input, fused vs the eager chain.

The reference FCN-8s (Long, Shelhamer, Darrell; Caffe release) pads conv1_1 by 100, so for a
500x500 image the VGG16 maps are: conv1 698, pool1 349, pool2 175, pool3 88, pool4 44,
pool5 22 (ceil-mode pooling), fc6 (7x7, no padding) 16. Its decoder:

    score_fr      (N, 21, 16, 16)
    upscore2      = deconv(score_fr, k4 s2)                      34x34
    fuse_pool4    = upscore2 + score_pool4[:, :, 5:39, 5:39]      (score_pool4: 44x44)
    upscore_pool4 = deconv(fuse_pool4, k4 s2)                    70x70
    fuse_pool3    = upscore_pool4 + score_pool3[:, :, 9:79, 9:79] (score_pool3: 88x88)
    upscore8      = deconv(fuse_pool3, k16 s8)                   568x568
    score         = upscore8[:, :, 31:531, 31:531]               500x500

fastseg runs it as three DeconvAdd calls (skip + skip_offset, then crop + output_size).
torchvision-style decoders instead upsample bilinearly to the skip's size: UpsampleAdd.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastseg.nn import DeconvAdd, UpsampleAdd

from conftest import HAS_CUDA, fused_backends

C = 21


def device_backends(op):
    """(device, fused backend) params; the reference backend is the eager chain itself."""
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in fused_backends(op, "cpu")]
    cuda_marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
    for name in (fused_backends(op, "cuda") if HAS_CUDA else ["cuda"]):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=cuda_marks))
    return params


def rand(shape, device, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.1).to(device=device, dtype=dtype)


def fcn8s_geometry(size=500):
    """The map sizes of FCN-8s' VGG16 trunk for a square input (Caffe arithmetic)."""
    conv1 = size + 2 * 100 - 3 + 1           # conv1_1: 3x3, pad 100
    pools = []
    n = conv1
    for _ in range(5):                        # 3x3 convs (pad 1) keep the size; 2x2/2 ceil pools
        n = math.ceil(n / 2)
        pools.append(n)
    fc6 = pools[4] - 7 + 1                    # fc6: 7x7, no padding
    up2 = (fc6 - 1) * 2 + 4
    up4 = (up2 - 1) * 2 + 4
    up8 = (up4 - 1) * 8 + 16
    return dict(conv1=conv1, pool3=pools[2], pool4=pools[3], pool5=pools[4], fc6=fc6,
                up2=up2, up4=up4, up8=up8)


def test_fcn8s_geometry():
    g = fcn8s_geometry(500)
    assert g == dict(conv1=698, pool3=88, pool4=44, pool5=22, fc6=16, up2=34, up4=70, up8=568)
    # the release's crop offsets (5, 9, 31: from the layers' receptive-field alignment) fit
    assert 5 + g["up2"] <= g["pool4"] and 9 + g["up4"] <= g["pool3"] and 31 + 500 <= g["up8"]


def fcn8s_inputs(batch, device, dtype, seed=0):
    score_fr = rand((batch, C, 16, 16), device, dtype, seed)
    score_pool4 = rand((batch, C, 44, 44), device, dtype, seed + 1, scale=0.5)
    score_pool3 = rand((batch, C, 88, 88), device, dtype, seed + 2, scale=0.25)
    return score_fr, score_pool4, score_pool3


def fcn8s_modules(device, dtype, backend, seed=0):
    mods = [DeconvAdd(C, 4, 2, backend=backend), DeconvAdd(C, 4, 2, backend=backend),
            DeconvAdd(C, 16, 8, backend=backend)]
    with torch.no_grad():  # bilinear init, then as after some training
        for i, m in enumerate(mods):
            m.weight.add_(rand(m.weight.shape, "cpu", torch.float64, seed + 10 + i, scale=0.05).to(m.weight.dtype))
    return [m.to(device=device, dtype=dtype) for m in mods]


def fused_fcn8s(mods, score_fr, score_pool4, score_pool3):
    up2, up4, up8 = mods
    fuse_pool4 = up2(score_fr, score_pool4, skip_offset=(5, 5))
    fuse_pool3 = up4(fuse_pool4, score_pool3, skip_offset=(9, 9))
    return up8(fuse_pool3, crop=(31, 31), output_size=(500, 500))


def eager_fcn8s(weights, score_fr, score_pool4, score_pool3):
    w2, w4, w8 = weights
    upscore2 = F.conv_transpose2d(score_fr, w2, stride=2, groups=C)
    assert upscore2.shape[-2:] == (34, 34)
    fuse_pool4 = upscore2 + score_pool4[:, :, 5:5 + 34, 5:5 + 34]
    upscore_pool4 = F.conv_transpose2d(fuse_pool4, w4, stride=2, groups=C)
    assert upscore_pool4.shape[-2:] == (70, 70)
    fuse_pool3 = upscore_pool4 + score_pool3[:, :, 9:9 + 70, 9:9 + 70]
    upscore8 = F.conv_transpose2d(fuse_pool3, w8, stride=8, groups=C)
    assert upscore8.shape[-2:] == (568, 568)
    return upscore8[:, :, 31:31 + 500, 31:31 + 500]


def values_and_grads(fn, params, weights, inputs, grad):
    """fn(params, *inputs) and the gradients of the inputs and of `weights` (its leaves)."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(params, *inputs)
    grads = torch.autograd.grad(out, inputs + list(weights), grad)
    return [out.detach()] + list(grads)


NAMES = ["score", "d_score_fr", "d_score_pool4", "d_score_pool3", "d_w2", "d_w4", "d_w8"]


@pytest.mark.parametrize("device,backend", device_backends("deconv_add"))
@pytest.mark.parametrize("dtype,batch", [(torch.float64, 1), (torch.float32, 2)], ids=["f64-N1", "f32-N2"])
def test_fcn8s_deconv_decoder_matches_eager(device, backend, dtype, batch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU")
    mods = fcn8s_modules(device, dtype, backend)
    inputs = fcn8s_inputs(batch, device, dtype, seed=batch)
    grad = rand((batch, C, 500, 500), device, dtype, seed=99)
    weights = [m.weight for m in mods]
    ours = values_and_grads(fused_fcn8s, mods, weights, inputs, grad)
    # the same weights are the leaves of the eager chain
    w64 = [w.detach().double().requires_grad_(True) for w in weights]
    ref = values_and_grads(eager_fcn8s, w64, w64, [t.double() for t in inputs], grad.double())
    assert ours[0].shape == (batch, C, 500, 500) and ours[0].dtype == dtype
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9, msg=lambda m: f"{backend} {name}: {m}")
        return
    # float32: at most twice eager float32's error against float64 (+ one ulp of the max)
    w32 = [w.detach().clone().requires_grad_(True) for w in weights]
    theirs = values_and_grads(eager_fcn8s, w32, w32, inputs, grad)
    for name, a, e, r in zip(NAMES, ours, theirs, ref):
        assert a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        floor = torch.finfo(dtype).eps * r.abs().max().item()
        assert err <= 2 * err_eager + floor, f"{backend} {name}: error {err:.3g} vs eager {err_eager:.3g}"


# --- bilinear (UpsampleAdd) decoders ---------------------------------------------------------

def fused_bilinear_fcn8s(score_fr, score_pool4, score_pool3, backend):
    """The FCN-8s geometry with bilinear upsampling to the same sizes and crops."""
    up = UpsampleAdd(backend=backend)
    fuse_pool4 = up(score_fr, score_pool4, skip_offset=(5, 5), output_size=(34, 34))
    fuse_pool3 = up(fuse_pool4, score_pool3, skip_offset=(9, 9), output_size=(70, 70))
    return up(fuse_pool3, output_size=(500, 500))


def eager_bilinear_fcn8s(score_fr, score_pool4, score_pool3):
    up = F.interpolate(score_fr, size=(34, 34), mode="bilinear", align_corners=False)
    fuse_pool4 = up + score_pool4[:, :, 5:39, 5:39]
    up = F.interpolate(fuse_pool4, size=(70, 70), mode="bilinear", align_corners=False)
    fuse_pool3 = up + score_pool3[:, :, 9:79, 9:79]
    return F.interpolate(fuse_pool3, size=(500, 500), mode="bilinear", align_corners=False)


def fused_torchvision_style(score, mid, fine, backend):
    """torchvision-style: upsample to each skip's size (no crop), then to the image size."""
    to_skip = UpsampleAdd(backend=backend)                       # size = the skip's
    to_image = UpsampleAdd(size=(500, 500), backend=backend)
    return to_image(to_skip(to_skip(score, mid), fine))


def eager_torchvision_style(score, mid, fine):
    up = F.interpolate(score, size=mid.shape[-2:], mode="bilinear", align_corners=False) + mid
    up = F.interpolate(up, size=fine.shape[-2:], mode="bilinear", align_corners=False) + fine
    return F.interpolate(up, size=(500, 500), mode="bilinear", align_corners=False)


def _grads(fn, inputs, grad, *extra):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs, *extra)
    return [out.detach()] + list(torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("device,backend", device_backends("upsample_add"))
@pytest.mark.parametrize("style", ["fcn8s-crops", "torchvision"])
@pytest.mark.parametrize("dtype,batch", [(torch.float64, 1), (torch.float32, 1)], ids=["f64-N1", "f32-N1"])
def test_bilinear_decoder_matches_eager(device, backend, style, dtype, batch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU")
    if style == "fcn8s-crops":
        inputs = fcn8s_inputs(batch, device, dtype, seed=5)
        fused, eager = fused_bilinear_fcn8s, eager_bilinear_fcn8s
    else:  # a 500x500 image through an output-stride-32 backbone: 16, 32, 63
        inputs = (rand((batch, C, 16, 16), device, dtype, 6), rand((batch, C, 32, 32), device, dtype, 7),
                  rand((batch, C, 63, 63), device, dtype, 8))
        fused, eager = fused_torchvision_style, eager_torchvision_style
    grad = rand((batch, C, 500, 500), device, dtype, seed=98)
    ours = _grads(fused, inputs, grad, backend)
    ref = _grads(eager, [t.double() for t in inputs], grad.double())
    names = ["score", "d_in0", "d_in1", "d_in2"]
    assert ours[0].shape == (batch, C, 500, 500) and ours[0].dtype == dtype
    if dtype == torch.float64:
        for name, a, b in zip(names, ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend} {name}: {m}")
        return
    theirs = _grads(eager, inputs, grad)
    for name, a, e, r in zip(names, ours, theirs, ref):
        err = (a.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        floor = torch.finfo(dtype).eps * r.abs().max().item()
        assert err <= 2 * err_eager + floor, f"{backend} {style} {name}: error {err:.3g} vs eager {err_eager:.3g}"
