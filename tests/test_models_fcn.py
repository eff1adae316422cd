"""fastseg.models' FCN-32s / 16s / 8s: geometry, fused vs eager, state dicts, VGG16 loading,
convolutionalize, training, torch.compile.

Tiny widths (width_mult=1/64: VGG widths 1..8, fc 64) keep every test on CPU; conv1_1's
padding of 100 makes even a 1x1 input give valid maps all the way to fc6.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg
import fastseg.models
from fastseg.models.fcn import (FCN, convolutionalize, fcn8s, fcn16s, fcn32s, fcn_crop_offsets,
                                load_vgg16_backbone)
from fastseg.nn import DeconvAdd, SoftmaxCrossEntropyLoss

TINY = 1 / 64
BUILDERS = {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s}
VARIANTS = list(BUILDERS)
REFERENCE_OFFSETS = {"score_pool4": 5, "score_pool3": 9, "upscore": 19, "upscore16": 27,
                     "upscore8": 31}


def build(variant, **kwargs):
    kwargs.setdefault("width_mult", TINY)
    return BUILDERS[variant](**kwargs)


@torch.no_grad()
def randomize(model, seed=0):
    """Every parameter and buffer random (the scoring layers start at zero, which would hide
    the trunk's gradients), the upsampling kernels near bilinear."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64).to(tensor.dtype)
        if name.startswith("upscore"):
            tensor.add_(0.05 * noise)
        else:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            tensor.copy_(noise * (1.5 / math.sqrt(fan_in)) + (0.02 if tensor.dim() == 1 else 0))
    return model


def pair(variant, learnable=False, dtype=torch.float64, seed=0, **kwargs):
    """(fused, eager) with the same weights."""
    fused = randomize(build(variant, fused=True, learnable_upsampling=learnable, **kwargs),
                      seed).to(dtype)
    eager = build(variant, fused=False, learnable_upsampling=learnable, **kwargs).to(dtype)
    eager.load_state_dict(fused.state_dict(), strict=True)
    return fused, eager


def rand_input(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def test_public_names():
    """fastseg.models exports the FCN API (fastseg/models/__init__.py)."""
    import fastseg.models.fcn as fcn
    for name in ("fcn32s", "fcn16s", "fcn8s", "load_vgg16_backbone", "convolutionalize",
                 "fcn_crop_offsets"):
        assert getattr(fastseg.models, name, None) is getattr(fcn, name), name


# --- geometry ----------------------------------------------------------------------------

def test_crop_offsets_are_the_reference_values():
    offsets = fcn_crop_offsets()
    assert offsets == REFERENCE_OFFSETS
    assert tuple(sorted(offsets.values())) == (5, 9, 19, 27, 31)
    assert fcn_crop_offsets("fcn32s") == {"upscore": 19}
    assert fcn_crop_offsets("fcn16s") == {"score_pool4": 5, "upscore16": 27}
    assert fcn_crop_offsets("fcn8s") == {"score_pool4": 5, "score_pool3": 9, "upscore8": 31}
    for variant in VARIANTS:
        model = build(variant)
        assert model.crop_offsets == fcn_crop_offsets(variant)


def test_crop_offsets_follow_the_geometry():
    # 32 more pixels of padding shift the input by 32 in conv1 coordinates: by 32 in the
    # full-resolution scores; the pool maps and the upsampled scores they are added to move
    # together (2 at pool4, 4 at pool3), so the skip crops stay.
    assert fcn_crop_offsets(first_padding=132) == {
        "score_pool4": 5, "score_pool3": 9, "upscore": 51, "upscore16": 59, "upscore8": 63}
    # a 5x5 fc6 centres its output one pool5 pixel later (32 input pixels); the upsampled
    # scores move with it (2 pool4 pixels, 4 pool3 pixels), the pool maps do not
    assert fcn_crop_offsets(fc6_kernel=5) == {
        "score_pool4": 3, "score_pool3": 5, "upscore": 51, "upscore16": 59, "upscore8": 63}
    with pytest.raises(ValueError, match="offset -45 is not"):      # 11x11: scores start early
        fcn_crop_offsets(fc6_kernel=11)
    # padding moves only the final crops (99: 18) ...
    assert fcn_crop_offsets(first_padding=99)["upscore"] == 18
    # ... and too little of it leaves the input outside the upsampled scores
    with pytest.raises(ValueError, match="upscore: the crop offset -31 is not"):
        fcn_crop_offsets(first_padding=50)
    with pytest.raises(ValueError, match="variant"):
        fcn_crop_offsets("fcn4s")
    with pytest.raises(ValueError, match="first_padding"):
        fcn_crop_offsets(first_padding=-1)
    with pytest.raises(ValueError, match="fc6_kernel"):
        fcn_crop_offsets(fc6_kernel=2.0)


def test_reference_map_sizes_for_500x500():
    """The release's numbers for a 500x500 image (see tests/test_fcn_decoder.py)."""
    model = build("fcn8s").eval()
    sizes = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[2:])))
        for name in ("conv1_1", "pool3", "pool4", "pool5", "score_fr", "upscore2",
                     "upscore_pool4")]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 500, 500))
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 21, 500, 500)
    assert sizes == {"conv1_1": (698, 698), "pool3": (88, 88), "pool4": (44, 44),
                     "pool5": (22, 22), "score_fr": (16, 16), "upscore2": (34, 34),
                     "upscore_pool4": (70, 70)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(1, 1), (17, 23), (37, 45), (100, 61), (1, 33)])
def test_output_size_equals_input_size(variant, fused, size):
    model = build(variant, fused=fused, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_size_modulo_32_fits(variant):
    """Every residue of H and of W mod 32 (the total stride): the crops always fit."""
    model = build(variant, num_classes=2).eval()
    with torch.no_grad():
        for h in range(1, 33):
            w = 34 - h
            assert model(torch.randn(1, 3, h, w)).shape == (1, 2, h, w)


def test_widths_and_layer_names():
    model = fcn8s(width_mult=0.125, num_classes=7, in_channels=1)
    assert model.conv1_1.weight.shape == (8, 1, 3, 3)
    assert model.conv1_1.padding == (100, 100)
    assert model.conv3_3.weight.shape == (32, 32, 3, 3)
    assert model.conv5_3.weight.shape == (64, 64, 3, 3)
    assert model.fc6.weight.shape == (512, 64, 7, 7) and model.fc6.padding == (0, 0)
    assert model.fc7.weight.shape == (512, 512, 1, 1)
    assert model.score_fr.weight.shape == (7, 512, 1, 1)
    assert model.score_pool4.weight.shape == (7, 64, 1, 1)
    assert model.score_pool3.weight.shape == (7, 32, 1, 1)
    assert fcn32s(width_mult=1 / 3).conv1_1.out_channels == 21     # round(64 / 3)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.ceil_mode and p.kernel_size == 2 and p.stride == 2
                                   for p in pools)
    assert [type(m) for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))] \
        == [nn.Dropout, nn.Dropout]
    tiny = fcn32s(width_mult=1e-6)
    assert tiny.conv1_1.out_channels == 1 and tiny.fc6.out_channels == 1
    names = set(build("fcn16s").state_dict())
    assert {"upscore2.weight", "upscore16.weight", "score_pool4.weight"} <= names
    assert not any(n.startswith(("score_pool3", "upscore8")) for n in names)


def test_upsampling_modules_and_init():
    for learnable in (False, True):
        fused = build("fcn8s", learnable_upsampling=learnable)
        eager = build("fcn8s", fused=False, learnable_upsampling=learnable)
        for name, (k, s) in (("upscore2", (4, 2)), ("upscore_pool4", (4, 2)),
                             ("upscore8", (16, 8))):
            f, e = getattr(fused, name), getattr(eager, name)
            assert isinstance(f, DeconvAdd) and f.stride == (s, s) and f.kernel_size == (k, k)
            assert type(e) is nn.ConvTranspose2d and e.groups == 21 and e.bias is None
            assert e.stride == (s, s) and e.kernel_size == (k, k)
            assert f.weight.shape == e.weight.shape == (21, 1, k, k)
            kernel = fastseg.nn.init.bilinear_kernel(k)
            assert torch.equal(f.weight, kernel.expand(21, 1, k, k))
            assert torch.equal(e.weight, f.weight)
            for m in (f, e):
                assert isinstance(m.weight, nn.Parameter) == learnable
                assert ("weight" in dict(m.named_buffers())) == (not learnable)
    model = build("fcn16s")
    assert torch.count_nonzero(model.score_fr.weight) == 0       # the paper's zero init
    assert torch.count_nonzero(model.score_pool4.weight) == 0


def test_attributes_and_repr():
    model = fcn16s(num_classes=3, width_mult=0.25, fused=False, learnable_upsampling=True)
    assert isinstance(model, FCN) and model.variant == "fcn16s"
    assert model.fused is False and model.learnable_upsampling is True
    assert model.num_classes == 3 and model.in_channels == 3 and model.width_mult == 0.25
    assert model.crop_offsets == {"score_pool4": 5, "upscore16": 27}
    assert model.upsampling_layers == ("upscore2", "upscore16")
    text = repr(model)
    for piece in ("variant='fcn16s'", "fused=False", "learnable_upsampling=True",
                  "'score_pool4': 5", "'upscore16': 27", "(conv1_1)", "(upscore16)",
                  "ConvTranspose2d"):
        assert piece in text, piece
    assert "DeconvAdd" in repr(fcn32s(width_mult=TINY))


# --- argument and input checks ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=2.0), TypeError, "num_classes"),
    (dict(num_classes=True), TypeError, "num_classes"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(in_channels="3"), TypeError, "in_channels"),
    (dict(width_mult=0), ValueError, "width_mult"),
    (dict(width_mult=-0.5), ValueError, "width_mult"),
    (dict(width_mult=float("nan")), ValueError, "width_mult"),
    (dict(width_mult=float("inf")), ValueError, "width_mult"),
    (dict(width_mult="1"), TypeError, "width_mult"),
    (dict(width_mult=True), TypeError, "width_mult"),
    (dict(fused="yes"), TypeError, "fused"),
    (dict(learnable_upsampling=1), TypeError, "learnable_upsampling"),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_arguments(variant, kwargs, error, match):
    with pytest.raises(error, match=match):
        BUILDERS[variant](**kwargs)


def test_keyword_only_and_bad_variant():
    with pytest.raises(TypeError):
        fcn8s(21)
    with pytest.raises(ValueError, match="variant"):
        FCN("fcn4s")


@pytest.mark.parametrize("x, error, match", [
    ([[1.0]], TypeError, "Tensor"),
    (torch.randn(3, 8, 8), ValueError, "4-D"),
    (torch.randn(1, 2, 8, 8), ValueError, "in_channels=3"),
    (torch.randn(1, 3, 0, 8), ValueError, "H, W >= 1"),
    (torch.randn(1, 3, 8, 0), ValueError, "H, W >= 1"),
    (torch.ones(1, 3, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(1, 3, 8, 8, dtype=torch.float64), TypeError, "dtype"),
])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_bad_inputs(fused, x, error, match):
    model = build("fcn8s", fused=fused)
    with pytest.raises(error, match=match):
        model(x)


# --- fused vs eager -----------------------------------------------------------------------

def forward_backward(model, x, params_of=None):
    """model(x), the gradients of a fixed linear function of it for x and for the parameters
    of `params_of` (default: model)."""
    params_of = model if params_of is None else params_of
    x = x.detach().clone().requires_grad_(True)
    params_of.zero_grad(set_to_none=True)
    out = model(x)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in params_of.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_eager_float64(variant, learnable):
    fused, eager = pair(variant, learnable)
    fused.eval(), eager.eval()
    for shape in ((2, 3, 37, 45), (1, 3, 17, 23)):
        x = rand_input(shape)
        out_f, gx_f, grads_f = forward_backward(fused, x)
        out_e, gx_e, grads_e = forward_backward(eager, x)
        assert out_f.shape == (shape[0], 21, *shape[2:])
        assert out_f.abs().max() > 1e-3        # a non-trivial output
        torch.testing.assert_close(out_f, out_e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx_f, gx_e, rtol=1e-10, atol=1e-12)
        assert grads_f.keys() == grads_e.keys()
        assert any(n.startswith("upscore") for n in grads_f) == learnable
        for name in grads_f:
            assert grads_f[name] is not None, name
            assert grads_f[name].abs().max() > 0, name
            torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_fused_matches_eager_in_train_mode_with_dropout():
    fused, eager = pair("fcn8s", learnable=True)
    fused.train(), eager.train()
    x = rand_input((2, 3, 29, 31))
    torch.manual_seed(5)
    out_f, gx_f, grads_f = forward_backward(fused, x)
    torch.manual_seed(5)
    out_e, gx_e, grads_e = forward_backward(eager, x)
    torch.testing.assert_close(out_f, out_e)
    torch.testing.assert_close(gx_f, gx_e)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_e[name])


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_eager_float32(variant):
    fused, eager = pair(variant, learnable=True, dtype=torch.float32)
    fused.eval(), eager.eval()
    x = rand_input((2, 3, 64, 64), torch.float32)
    out_f, gx_f, grads_f = forward_backward(fused, x)
    out_e, gx_e, grads_e = forward_backward(eager, x)
    torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-4, atol=1e-4)
    for name in grads_f:
        scale = grads_e[name].abs().max()
        assert (grads_f[name] - grads_e[name]).abs().max() <= 1e-4 * scale + 1e-6, name


def test_autocast_bfloat16_cpu():
    """Under autocast the scores are bf16 and the fixed kernels float32: the fused path casts
    the kernel (the fused op takes one dtype) and agrees with the eager net."""
    fused, eager = pair("fcn8s", learnable=True, dtype=torch.float32)
    fused.eval(), eager.eval()
    x = rand_input((1, 3, 33, 40), torch.float32)
    outs = []
    for model in (fused, eager):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        assert model.upscore8.weight.grad.dtype == torch.float32
        outs.append(out.float())
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 0.05 * scale


# --- state dicts --------------------------------------------------------------------------

@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_interchange(variant, learnable):
    x = rand_input((1, 3, 21, 27), torch.float32)
    for source_fused in (True, False):
        source = randomize(build(variant, fused=source_fused, learnable_upsampling=learnable),
                           seed=3).eval()
        target = build(variant, fused=not source_fused, learnable_upsampling=learnable).eval()
        sd_source, sd_target = source.state_dict(), target.state_dict()
        assert list(sd_source) == list(sd_target)
        assert all(sd_source[k].shape == sd_target[k].shape for k in sd_source)
        assert [n for n, _ in source.named_parameters()] == \
            [n for n, _ in target.named_parameters()]
        assert [n for n, _ in source.named_buffers()] == [n for n, _ in target.named_buffers()]
        target.load_state_dict(sd_source, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_state_dict_between_fixed_and_learnable_upsampling():
    fixed = randomize(build("fcn16s", learnable_upsampling=False), seed=4)
    learnable = build("fcn16s", fused=False, learnable_upsampling=True)
    learnable.load_state_dict(fixed.state_dict(), strict=True)
    assert torch.equal(learnable.upscore16.weight, fixed.upscore16.weight)


# --- convolutionalize ---------------------------------------------------------------------

def make_head(c, h, w, flatten=True, classes=5):
    torch.manual_seed(0)
    layers = ([nn.Flatten()] if flatten else []) + [
        nn.Linear(c * h * w, 32), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(32, 16), nn.GELU(), nn.Linear(16, classes)]
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "no-flatten"])
def test_convolutionalize_reproduces_the_classifier(flatten):
    c, h, w = 4, 3, 5
    head = make_head(c, h, w, flatten)
    before = copy.deepcopy(head.state_dict())
    conv = convolutionalize(head, (c, h, w)).eval()
    assert isinstance(conv, nn.Sequential)
    convs = [m for m in conv if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(h, w), (1, 1), (1, 1)]
    assert not any(isinstance(m, (nn.Linear, nn.Flatten)) for m in conv)
    assert any(isinstance(m, nn.Dropout) for m in conv) and any(isinstance(m, nn.GELU)
                                                                for m in conv)
    x = rand_input((3, c, h, w))
    flat = x if flatten else x.flatten(1)
    out = conv(x)
    assert out.shape == (3, 5, 1, 1)
    torch.testing.assert_close(out.flatten(1), head(flat), rtol=1e-12, atol=1e-12)
    # copies: the head is untouched and shares no tensors with the result
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        convs[0].weight.add_(1.0)
    assert torch.equal(head.state_dict()[next(iter(before))], before[next(iter(before))])


def test_convolutionalize_gives_a_dense_map_on_a_larger_input():
    c, h, w = 3, 4, 4
    head = make_head(c, h, w)
    conv = convolutionalize(head, (c, h, w)).eval()
    x = rand_input((2, c, 11, 9))
    out = conv(x)
    assert out.shape == (2, 5, 11 - h + 1, 9 - w + 1)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            torch.testing.assert_close(out[:, :, i, j], head(x[:, :, i:i + h, j:j + w]),
                                       rtol=1e-12, atol=1e-12)


def test_convolutionalize_vgg_classifier_shape():
    """torchvision's VGG16 classifier as fc6/fc7 (reduced widths), requires_grad kept."""
    head = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(16, 16), nn.PReLU(16), nn.Dropout(), nn.Linear(16, 10),
                         nn.Softmax(dim=-1))
    head[0].weight.requires_grad_(False)
    conv = convolutionalize(head, (8, 7, 7)).eval()
    assert conv[0].weight.shape == (16, 8, 7, 7) and not conv[0].weight.requires_grad
    assert conv[3].weight.shape == (16, 16, 1, 1) and conv[3].weight.requires_grad
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(conv(x).flatten(1), head.eval()(x.flatten(1)))
    assert conv(torch.randn(1, 8, 20, 30)).shape == (1, 10, 14, 24)
    assert conv[-1].dim == 1


def test_convolutionalize_alexnet_style_head():
    """torchvision AlexNet's classifier starts with Dropout (element-wise: allowed)."""
    head = nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(6 * 2 * 3, 8), nn.ReLU(),
                         nn.Dropout(), nn.Linear(8, 4)).eval()
    conv = convolutionalize(head, (6, 2, 3)).eval()
    x = torch.randn(2, 6, 2, 3)
    torch.testing.assert_close(conv(x).flatten(1), head(x))


@pytest.mark.parametrize("head, shape, error, match", [
    (nn.Linear(12, 3), (3, 2, 2), TypeError, "nn.Sequential"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2), ValueError, "input_shape"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 0), ValueError, "input_shape"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 3), ValueError, "flattens to 18"),
    (nn.Sequential(nn.Flatten(0), nn.Linear(12, 3)), (3, 2, 2), ValueError, "start_dim"),
    (nn.Sequential(nn.Flatten(), nn.Softmax(1), nn.Linear(12, 3)), (3, 2, 2), ValueError,
     "before the first Linear"),
    (nn.Sequential(nn.Flatten(), nn.PReLU(12), nn.Linear(12, 3)), (3, 2, 2), ValueError,
     "PReLU"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.PReLU(4)), (3, 2, 2), ValueError,
     "PReLU"),
    (nn.Sequential(nn.Flatten()), (3, 2, 2), ValueError, "no nn.Linear"),
    (nn.Sequential(nn.Flatten(), nn.ReLU()), (3, 2, 2), ValueError, "no nn.Linear"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Flatten(), nn.Linear(4, 2)), (3, 2, 2),
     ValueError, "Flatten"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
     (3, 2, 2), ValueError, "BatchNorm1d"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Linear(5, 2)), (3, 2, 2), ValueError,
     "takes 5 features"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Softmax(dim=0)), (3, 2, 2), ValueError,
     "Softmax"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(12, 2)), (3, 2, 2), ValueError,
     "Conv2d"),
])
def test_convolutionalize_rejects_unsupported_heads(head, shape, error, match):
    with pytest.raises(error, match=match):
        convolutionalize(head, shape)


# --- VGG16 weights ------------------------------------------------------------------------

VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512)]
FCN_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]


def vgg16_state_dict():
    """A randomly initialized torchvision VGG16 state dict: torchvision's own when it is
    installed, else built by hand with its key names and shapes."""
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None:
        return torchvision.models.vgg16(weights=None).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for index, cin, cout in VGG16_CONVS:
        sd[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        sd[f"features.{index}.bias"] = torch.randn(cout, generator=g)
    for index, cin, cout in ((0, 25088, 4096), (3, 4096, 4096), (6, 4096, 1000)):
        sd[f"classifier.{index}.weight"] = torch.randn(cout, cin, generator=g) * 0.01
        sd[f"classifier.{index}.bias"] = torch.randn(cout, generator=g)
    return sd


@pytest.fixture(scope="module")
def vgg_and_fcn():
    return vgg16_state_dict(), fcn32s(num_classes=4)


def test_load_vgg16_backbone(vgg_and_fcn):
    sd, model = vgg_and_fcn
    score_before = model.score_fr.weight.clone()
    assert load_vgg16_backbone(model, sd) is model
    for (index, _, _), name in zip(VGG16_CONVS, FCN_CONVS):
        assert torch.equal(getattr(model, name).weight, sd[f"features.{index}.weight"])
        assert torch.equal(getattr(model, name).bias, sd[f"features.{index}.bias"])
    assert torch.equal(model.fc6.weight.flatten(1), sd["classifier.0.weight"])
    assert torch.equal(model.fc6.bias, sd["classifier.0.bias"])
    assert torch.equal(model.fc7.weight.flatten(1), sd["classifier.3.weight"])
    assert torch.equal(model.fc7.bias, sd["classifier.3.bias"])
    assert torch.equal(model.score_fr.weight, score_before)       # classifier.6 ignored
    # fc6 is the convolutionalized classifier.0: on pool5's 7x7 map it gives the Linear's output
    pool5 = torch.randn(1, 512, 7, 7)
    torch.testing.assert_close(model.fc6(pool5).flatten(1),
                               F.linear(pool5.flatten(1), sd["classifier.0.weight"],
                                        sd["classifier.0.bias"]), rtol=1e-4, atol=1e-4)


def test_load_vgg16_backbone_errors(vgg_and_fcn, tmp_path):
    sd, model = vgg_and_fcn
    before = model.conv1_1.weight.clone()

    partial = {k: v for k, v in sd.items() if k not in ("features.0.weight", "classifier.3.bias")}
    partial["features.1.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as info:
        load_vgg16_backbone(model, partial)
    message = str(info.value)
    assert "missing keys ['features.0.weight', 'classifier.3.bias']" in message
    assert "unexpected keys ['features.1.weight']" in message

    prefixed = {"module." + k: v for k, v in list(sd.items())[:2]}
    with pytest.raises(KeyError, match="unexpected keys \\['module.features.0.weight'"):
        load_vgg16_backbone(model, prefixed)

    wrong = dict(sd)
    wrong["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    with pytest.raises(ValueError, match=r"features\.28\.weight.*conv5_3"):
        load_vgg16_backbone(model, wrong)
    wrong = dict(sd)
    wrong["classifier.0.weight"] = torch.zeros(4096, 512, 7, 7)     # right numel, not a Linear
    with pytest.raises(ValueError, match=r"classifier\.0\.weight.*fc6"):
        load_vgg16_backbone(model, wrong)
    wrong = dict(sd)
    wrong["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    wrong["features.2.bias"] = torch.zeros(63)
    with pytest.raises(ValueError, match=r"features\.2\.bias"):
        load_vgg16_backbone(model, wrong)
    assert torch.equal(model.conv1_1.weight, before)              # nothing copied on error

    path = tmp_path / "partial.pt"
    torch.save(partial, path)                                      # paths are read too
    with pytest.raises(KeyError, match="missing keys"):
        load_vgg16_backbone(model, str(path))
    with pytest.raises(TypeError, match="mapping"):
        load_vgg16_backbone(model, [1, 2])
    with pytest.raises(TypeError, match="FCN"):
        load_vgg16_backbone(nn.Conv2d(3, 3, 1), sd)
    with pytest.raises(ValueError, match="width_mult=1.0"):
        load_vgg16_backbone(fcn8s(width_mult=TINY), sd)


# --- training -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant, fused", [("fcn32s", True), ("fcn16s", True),
                                            ("fcn8s", True), ("fcn8s", False)])
def test_short_training_run_loss_decreases(variant, fused):
    """A few Adam steps (train mode: dropout on) on one synthetic batch with ignored pixels;
    the loss on that batch, measured in eval mode before and after, drops."""
    torch.manual_seed(0)
    model = build(variant, fused=fused, num_classes=3, learnable_upsampling=True)
    images = torch.randn(2, 3, 24, 28)
    labels = torch.ones(2, 24, 28, dtype=torch.long)
    labels[:, 18:, :14] = 0
    labels[:, 18:, 14:] = 2
    labels[1, 6:10, 4:20] = 2
    labels[:, :2, :] = 255                                                # ignored pixels
    labels[0, 10:14, 5:9] = 255
    loss_fn = SoftmaxCrossEntropyLoss(ignore_index=255)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    upsampling = getattr(model, model.upsampling_layers[0])
    upsample_before = upsampling.weight.clone()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return loss_fn(model(images), labels).item()

    before = eval_loss()
    assert before == pytest.approx(math.log(3), rel=1e-5)      # the zero-initialized scores
    model.train()
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
    after = eval_loss()
    assert after < 0.95 * before, (before, after)
    assert not torch.equal(upsampling.weight, upsample_before)        # learnable: trained


def test_fixed_upsampling_is_not_trained():
    model = build("fcn8s", num_classes=3).train()
    randomize(model)
    assert not any(n.startswith("upscore") for n, _ in model.named_parameters())
    before = model.upscore8.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = SoftmaxCrossEntropyLoss(ignore_index=255)(model(torch.randn(1, 3, 16, 16)),
                                                    torch.randint(0, 3, (1, 16, 16)))
    loss.backward()
    optimizer.step()
    assert torch.equal(model.upscore8.weight, before)


# --- torch.compile and channels_last -----------------------------------------------------

def compiled_step_matches_eager(model, x, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, gx_c, grads_c = forward_backward(compiled, x, params_of=model)
    out_e, gx_e, grads_e = forward_backward(model, x)
    for a, b in ((out_c, out_e), (gx_c, gx_e)):     # relative to the map's scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    for name in grads_e:
        scale = grads_e[name].abs().max()
        assert (grads_c[name] - grads_e[name]).abs().max() <= 1e-4 * scale + 1e-6, name


def test_torch_compile_fullgraph_matches_eager():
    """FCN-8s: its decoder has both kinds of DeconvAdd call (skip-add, final crop)."""
    model = randomize(build("fcn8s", learnable_upsampling=True)).eval()
    compiled_step_matches_eager(model, rand_input((2, 3, 37, 45), torch.float32), "aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_matches_eager():
    model = randomize(build("fcn16s", learnable_upsampling=True)).eval()
    compiled_step_matches_eager(model, rand_input((1, 3, 37, 45), torch.float32), "inductor")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_input_same_result(variant, fused):
    model = randomize(build(variant, fused=fused, learnable_upsampling=True)).eval()
    x = rand_input((2, 3, 37, 45), torch.float32)
    out, gx, grads = forward_backward(model, x)
    x_cl = x.to(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for net in (model, model_cl):          # a channels_last input, then the model too
        out_cl, gx_cl, grads_cl = forward_backward(net, x_cl)
        for a, b in ((out_cl, out), (gx_cl, gx)):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        for name in grads:
            scale = grads[name].abs().max()
            assert (grads_cl[name] - grads[name]).abs().max() <= 1e-4 * scale + 1e-6, name
