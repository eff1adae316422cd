"""fastseg.models.unet: geometry, fused vs eager equivalence, state dicts, training, layouts,
autocast, torch.compile and argument errors. Tiny widths and sizes (CPU, seconds)."""

import importlib
import pickle

import pytest
import torch

import fastseg
import fastseg.models
from fastseg.models import unet, unet_output_size, unet_valid_input_size
from fastseg.models.unet import CropConcatConv2dEager, UNet
from fastseg.nn import CropConcatConv2d, SoftmaxCrossEntropyLoss

# (padding, up_mode, batch_norm)
CONFIGS = [(p, u, bn) for p in ("valid", "same") for u in ("deconv", "bilinear")
           for bn in (False, True)]
CONFIG_IDS = [f"{p}-{u}-{'bn' if bn else 'nobn'}" for p, u, bn in CONFIGS]

# input sizes of the tiny depth-3 networks: valid sizes are 44 + 4k at depth 3; the same
# network takes odd sizes (whose pools and up-sampling take the odd-size path at every level)
SIZES = {"valid": (44, 52), "same": (13, 10)}


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _twins(padding, up_mode, batch_norm, dtype=torch.float64, seed=0, **kwargs):
    """A fused model and its eager twin holding the same state."""
    torch.manual_seed(seed)
    args = dict(in_channels=2, num_classes=3, base_channels=3, depth=3, padding=padding,
                up_mode=up_mode, batch_norm=batch_norm)
    args.update(kwargs)
    fused = unet(fused=True, **args).to(dtype)
    eager = unet(fused=False, **args).to(dtype)
    if batch_norm:  # non-trivial BatchNorm state, so eval mode tests it
        with torch.no_grad():
            for m in fused.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    eager.load_state_dict(fused.state_dict(), strict=True)
    return fused, eager


def _forward_backward(model, x, grad_seed=7):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    grad = _rand(*out.shape, dtype=out.dtype, seed=grad_seed)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(out, [x] + params, grad)
    return out.detach(), grads


# --- geometry ------------------------------------------------------------------------------

def test_paper_output_size():
    assert unet_output_size(572) == 388
    assert unet_output_size((572, 572)) == (388, 388)
    assert unet_output_size((572, 636), depth=5) == (388, 452)
    assert unet_output_size([572, 572]) == (388, 388)
    assert unet_output_size(torch.Size([572, 572])) == (388, 388)
    assert unet_output_size(37, 3, padding="same") == 37
    assert unet(fused=True).output_size(572) == 388


# the first valid input size of each depth and its output, and the step between valid sizes
@pytest.mark.parametrize("depth,first,out,step", [(1, 5, 1, 1), (2, 18, 2, 2), (3, 44, 4, 4),
                                                  (4, 92, 4, 8), (5, 188, 4, 16), (6, 380, 4, 32)])
def test_output_size_other_depths(depth, first, out, step):
    assert unet_output_size(first, depth) == out
    assert unet_output_size(first + 3 * step, depth) == out + 3 * step * 2 ** (depth - 1) // step
    assert unet_valid_input_size(1, depth) == first
    if step > 1:
        with pytest.raises(ValueError, match=f"nearest valid sizes are {first} and {first + step}"):
            unet_output_size(first + 1, depth)
    with pytest.raises(ValueError, match=f"smallest valid size is {first}"):
        unet_output_size(first - 1, depth)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_output_size_matches_the_network(depth):
    """unet_output_size agrees with the network's actual output at every valid size in a
    range, and every other size is rejected by the model's forward."""
    model = unet(in_channels=1, num_classes=2, base_channels=1, depth=depth, fused=True).eval()
    valid = [n for n in range(1, 60) if unet_valid_input_size(n, depth) == n]
    assert valid, "no valid size below 60"
    with torch.no_grad():
        for n in valid[:4]:
            out = model(torch.randn(1, 1, n, valid[0]))
            assert tuple(out.shape) == (1, 2, unet_output_size(n, depth),
                                        unet_output_size(valid[0], depth))
    for n in range(valid[0] - 3, valid[0] + 4):
        if n >= 1 and n not in valid:
            with pytest.raises(ValueError, match="does not work"):
                model(torch.randn(1, 1, n, valid[0]))


def test_valid_sizes_are_the_network_geometry():
    """Independently of the implementation: at depth 5 a valid input is 16 * b + 60 for a
    bottom size b >= 8 (each level: two 3x3 valid convs take 4 pixels, then the pool halves;
    the output is 16 * b - 124 >= 1)."""
    expected = [16 * b + 60 for b in range(8, 40)]
    got = [n for n in range(1, expected[-1] + 1) if unet_valid_input_size(n) == n]
    assert got == expected
    assert [unet_output_size(n) for n in expected] == [16 * b - 124 for b in range(8, 40)]


def test_invalid_size_names_the_nearest():
    with pytest.raises(ValueError, match=r"input height 570 does not work.*odd size 279.*"
                                         r"nearest valid sizes are 556 and 572"):
        unet_output_size(570)
    with pytest.raises(ValueError, match=r"input width 573 .*nearest valid sizes are 572 and 588"):
        unet_output_size((572, 573))
    with pytest.raises(ValueError, match="smallest valid size is 188"):
        unet_output_size(100)
    model = unet(base_channels=1, depth=3)
    with pytest.raises(ValueError,
                       match=r"UNet: input width 45 .*nearest valid sizes are 44 and 48"):
        model(torch.randn(1, 1, 44, 45))


def test_valid_input_size():
    assert unet_valid_input_size(572) == 572
    assert unet_valid_input_size(570) == 572
    assert unet_valid_input_size(570, round="down") == 556
    assert unet_valid_input_size((100, 573)) == (188, 588)
    assert unet_valid_input_size((573, 589), 5, round="down") == (572, 588)
    assert unet_valid_input_size((37, 50), 3, padding="same") == (37, 50)
    with pytest.raises(ValueError, match="no valid size <= 100.*smallest valid size is 188"):
        unet_valid_input_size(100, round="down")


@pytest.mark.parametrize("up_mode", ["deconv", "bilinear"])
@pytest.mark.parametrize("size", [(17, 23), (37, 50), (1, 1), (1, 7), (2, 3), (9, 16)])
def test_same_padding_keeps_odd_sizes(up_mode, size):
    torch.manual_seed(0)
    for fused in (True, False):
        model = unet(in_channels=1, num_classes=2, base_channels=2, depth=3, padding="same",
                     up_mode=up_mode, fused=fused).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 1, *size))
        assert tuple(out.shape) == (2, 2, *size)


def test_same_padding_deep_odd_size():
    """Depth 5 on a size that is odd at every level (37 -> 19 -> 10 -> 5 -> 3)."""
    model = unet(base_channels=1, depth=5, padding="same", fused=True).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(1, 1, 37, 50)).shape) == (1, 2, 37, 50)


def test_paper_network_on_meta():
    """The paper's network at full width, shapes only: 572x572 -> 388x388, 64..1024 channels,
    and its parameter count from the layer list (3x3 convs, 2x2 up-convs, 1x1 head)."""
    with torch.device("meta"):
        model = unet()
        out = model(torch.empty(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388) and out.device.type == "meta"
    assert model.channels == (64, 128, 256, 512, 1024)
    c = model.channels
    expected = sum(9 * (1 if i == 0 else c[i - 1]) * c[i] + c[i] + 9 * c[i] * c[i] + c[i]
                   for i in range(5))
    expected += sum(4 * c[i + 1] * c[i] + c[i] + 9 * 2 * c[i] * c[i] + c[i] + 9 * c[i] * c[i] + c[i]
                    for i in range(4))
    expected += 64 * 2 + 2
    assert expected == 31_030_658
    assert sum(p.numel() for p in model.parameters()) == expected
    assert tuple(model.decoder[3].up.weight.shape) == (1024, 512, 2, 2)
    assert tuple(model.decoder[0].conv1.weight.shape) == (64, 128, 3, 3)
    with torch.device("meta"):
        same = unet(padding="same", up_mode="bilinear", batch_norm=True, in_channels=3)
        assert same(torch.empty(2, 3, 511, 512)).shape == (2, 2, 511, 512)


# --- fused vs eager ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("padding,up_mode,batch_norm", CONFIGS, ids=CONFIG_IDS)
def test_fused_matches_eager(padding, up_mode, batch_norm, backend):
    """float64: outputs and the gradients of the input and every parameter agree, in eval
    mode and (BatchNorm) train mode, where the running statistics must agree too. backend
    "cpu" forces fastseg's C++ kernels (auto picks the reference composition on the CPU for
    crop_concat_conv2d)."""
    fused, eager = _twins(padding, up_mode, batch_norm)
    x = _rand(2, 2, *SIZES[padding], seed=1)
    modes = ("eval", "train") if batch_norm else ("eval",)
    for mode in modes:
        fused.train(mode == "train")
        eager.train(mode == "train")
        with fastseg.backend(backend):
            out_f, grads_f = _forward_backward(fused, x)
        out_e, grads_e = _forward_backward(eager, x)
        assert out_f.shape == out_e.shape
        expected = (2, 3, 4, 12) if padding == "valid" else (2, 3, *SIZES["same"])
        assert tuple(out_f.shape) == expected
        torch.testing.assert_close(out_f, out_e, rtol=1e-10, atol=1e-12)
        names = ["input"] + [n for n, _ in fused.named_parameters()]
        for name, gf, ge in zip(names, grads_f, grads_e):
            torch.testing.assert_close(gf, ge, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for (name, bf), be in zip(fused.named_buffers(), eager.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_fused_modules_are_used():
    fused, eager = _twins("valid", "bilinear", False)
    assert fused.fused and not eager.fused
    assert isinstance(fused.decoder[0].conv1, CropConcatConv2d)
    assert isinstance(fused.decoder[0].upsample, fastseg.nn.UpsampleAdd)
    assert type(eager.decoder[0].conv1) is CropConcatConv2dEager
    assert not any(isinstance(m, (CropConcatConv2d, fastseg.nn.UpsampleAdd))
                   for m in eager.modules())


@pytest.mark.parametrize("padding,up_mode,batch_norm", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_interchange(padding, up_mode, batch_norm):
    torch.manual_seed(3)
    args = dict(in_channels=2, num_classes=3, base_channels=2, depth=3, padding=padding,
                up_mode=up_mode, batch_norm=batch_norm)
    fused, eager = unet(fused=True, **args), unet(fused=False, **args)
    sd_f, sd_e = fused.state_dict(), eager.state_dict()
    assert list(sd_f) == list(sd_e)
    assert ({k: tuple(v.shape) for k, v in sd_f.items()}
            == {k: tuple(v.shape) for k, v in sd_e.items()})
    for key in ("encoder.0.conv1.weight", "encoder.2.conv2.weight", "decoder.0.conv1.weight",
                "decoder.1.conv2.weight", "decoder.1.up.weight", "head.weight", "head.bias"):
        assert key in sd_f
    assert ("encoder.0.bn1.running_var" in sd_f) == batch_norm
    assert ("decoder.0.conv1.bias" in sd_f) == (not batch_norm)
    # float64: the fused kernels sum in another order than eager (float32 differs by ~1e-6)
    fused.double(), eager.double()
    x = torch.randn(1, 2, *SIZES[padding], dtype=torch.float64)
    for source, target in ((fused, eager), (eager, fused)):
        torch.nn.init.normal_(source.head.weight)  # make the two differ first
        assert target.load_state_dict(source.state_dict(), strict=True)
        source.eval(), target.eval()
        with torch.no_grad():
            torch.testing.assert_close(target(x), source(x), rtol=1e-10, atol=1e-12)


# --- training, layouts, autocast, compile ---------------------------------------------------

@pytest.mark.parametrize("padding,up_mode,batch_norm", [("valid", "deconv", False),
                                                        ("same", "bilinear", True)])
def test_training_loss_decreases(padding, up_mode, batch_norm):
    torch.manual_seed(0)
    model = unet(in_channels=1, num_classes=2, base_channels=4, depth=2, padding=padding,
                 up_mode=up_mode, batch_norm=batch_norm, fused=True)
    size = 28 if padding == "valid" else 21
    x = torch.randn(4, 1, size, size)
    out_size = model.output_size(size)
    crop = (size - out_size) // 2
    # a learnable target: the sign of a local average of the input, at the output's pixels
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    target = (smooth[:, 0, crop:crop + out_size, crop:crop + out_size] > 0).long()
    loss_fn = SoftmaxCrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("padding,up_mode", [("valid", "deconv"), ("same", "deconv"),
                                             ("same", "bilinear")])
def test_channels_last(padding, up_mode, backend):
    """A channels_last model and input: the same values and gradients (float64, BatchNorm in
    train mode), and the output stays channels_last."""
    fused, _ = _twins(padding, up_mode, True)
    fused.train()
    x = _rand(2, 2, *SIZES[padding], seed=2)
    with fastseg.backend(backend):
        out, grads = _forward_backward(fused, x)
        fused_cl = fused.to(memory_format=torch.channels_last)
        out_cl, grads_cl = _forward_backward(fused_cl, x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_cl, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("padding,up_mode", [("valid", "deconv"), ("same", "bilinear")])
def test_autocast_bfloat16_cpu(fused, padding, up_mode):
    torch.manual_seed(0)
    model = unet(in_channels=2, num_classes=3, base_channels=4, depth=3, padding=padding,
                 up_mode=up_mode, fused=fused)
    x = _rand(2, 2, *SIZES[padding], dtype=torch.float32, seed=4)
    ref = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, err
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("padding,up_mode,batch_norm", [("valid", "deconv", False),
                                                        ("same", "bilinear", True),
                                                        ("same", "deconv", False)])
def test_torch_compile_fullgraph(padding, up_mode, batch_norm):
    """forward + backward of the fused model under torch.compile(fullgraph=True): no graph
    break (fastseg's ops trace through their fake implementations), same values and gradients.
    aot_eager: dynamo + AOTAutograd without Inductor's C++ codegen (seconds on the CPU)."""
    torch._dynamo.reset()
    fused, _ = _twins(padding, up_mode, batch_norm, dtype=torch.float32)
    fused.train()
    x = _rand(2, 2, *SIZES[padding], dtype=torch.float32, seed=5)
    params = list(fused.parameters())

    def step(x):
        return fused(x).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss = step(x)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    """The same with Inductor (C++ codegen on the CPU): about 45 s with a cold compile cache,
    a few seconds with a warm one. Deselect with -m "not slow"."""
    torch._dynamo.reset()
    fused, _ = _twins("valid", "deconv", False, in_channels=1,
                      num_classes=2, base_channels=2, depth=2)
    x = _rand(1, 1, 20, 22, seed=6)  # float64: the comparison can be tight
    params = list(fused.parameters())

    def step(x):
        return fused(x).square().mean()

    loss_c = torch.compile(step, fullgraph=True)(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss = step(x)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss_c, loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- API, errors -----------------------------------------------------------------------------

def test_attributes_and_repr():
    model = unet(in_channels=3, num_classes=5, base_channels=2, depth=3, padding="same",
                 up_mode="bilinear", batch_norm=True, fused=True)
    assert isinstance(model, UNet)
    assert (model.in_channels, model.num_classes, model.base_channels, model.depth) == (3, 5, 2, 3)
    assert (model.padding, model.up_mode, model.batch_norm, model.fused) == ("same", "bilinear",
                                                                             True, True)
    assert model.channels == (2, 4, 8)
    assert len(model.encoder) == 3 and len(model.decoder) == 2
    text = repr(model)
    assert text.startswith("UNet(\n  in_channels=3, num_classes=5, base_channels=2, depth=3, "
                           "padding='same', up_mode='bilinear', batch_norm=True, fused=True")
    assert "CropConcatConv2d(skip_channels=2, x_channels=2" in text
    assert "UpsampleAdd(mode='bilinear', size=the skip's" in text
    eager = repr(unet(base_channels=2, depth=2, up_mode="bilinear", fused=False))
    assert "CropConcatConv2dEager(skip_channels=2" in eager and "fused=False" in eager
    assert "BilinearUpsample(mode='bilinear', scale_factor=2" in eager


def test_import_forms():
    """`fastseg.models.unet` names both the submodule and the factory: every way of reaching
    it builds the network."""
    module = importlib.import_module("fastseg.models.unet")
    assert fastseg.models.unet is module.unet  # the factory, not the submodule
    for factory in (unet, fastseg.models.unet, module.unet):
        assert isinstance(factory(base_channels=1, depth=1), UNet)
    assert fastseg.models.unet_output_size is module.unet_output_size
    model = unet(base_channels=1, depth=2, padding="same", up_mode="bilinear", batch_norm=True)
    copy = pickle.loads(pickle.dumps(model))  # torch.save(model) pickles the classes by name
    assert type(copy) is UNet and copy.state_dict().keys() == model.state_dict().keys()


def test_paper_initialization():
    torch.manual_seed(0)
    model = unet(base_channels=16, depth=2)
    w = model.encoder[1].conv2.weight  # 32 x 32 x 3 x 3: std sqrt(2 / 288)
    assert abs(w.std().item() / (2 / 288) ** 0.5 - 1) < 0.05
    w = model.decoder[0].up.weight  # ConvTranspose2d(32, 16, 2, 2): std sqrt(2 / 32)
    assert abs(w.std().item() / (2 / 32) ** 0.5 - 1) < 0.1
    assert all(m.bias.abs().max() == 0 for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.bias is not None)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_channels=0), ValueError, r"unet: in_channels must be an int >= 1, got 0"),
    (dict(in_channels=1.0), TypeError, r"unet: in_channels must be an int >= 1, got float 1.0"),
    (dict(num_classes=True), TypeError, r"unet: num_classes must be an int >= 1, got bool"),
    (dict(base_channels=-4), ValueError, r"unet: base_channels must be an int >= 1, got -4"),
    (dict(depth=0), ValueError, r"unet: depth must be an int >= 1, got 0"),
    (dict(depth="5"), TypeError, r"unet: depth must be an int >= 1, got str '5'"),
    (dict(padding="reflect"), ValueError,
     r"unet: padding must be 'valid' or 'same', got 'reflect'"),
    (dict(padding=1), ValueError, r"unet: padding must be 'valid' or 'same', got 1"),
    (dict(up_mode="nearest"), ValueError,
     r"unet: up_mode must be 'deconv' or 'bilinear', got 'nearest'"),
    (dict(batch_norm=1), TypeError, r"unet: batch_norm must be a bool, got int 1"),
    (dict(fused="yes"), TypeError, r"unet: fused must be a bool, got str 'yes'"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        unet(**kwargs)


def test_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        unet(1, 2)


@pytest.mark.parametrize("call,error,match", [
    (lambda: unet_output_size(572, 0), ValueError, r"unet_output_size: depth must be an int >= 1"),
    (lambda: unet_output_size("572"), TypeError, r"in_size must be an int or a pair of ints"),
    (lambda: unet_output_size((572, 572, 3)), TypeError, r"in_size must be an int or a pair"),
    (lambda: unet_output_size(0), ValueError, r"in_size must be >= 1, got 0"),
    (lambda: unet_output_size(572, padding="full"), ValueError,
     r"padding must be 'valid' or 'same'"),
    (lambda: unet_valid_input_size(570, round="nearest"), ValueError,
     r"unet_valid_input_size: round must be 'up' or 'down', got 'nearest'"),
])
def test_bad_size_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("x,error,match", [
    ([[1.0]], TypeError, r"UNet: the input must be a Tensor, got list"),
    (torch.randn(1, 44, 44), ValueError,
     r"UNet: the input must be 4-D \(N, C, H, W\), got shape \(1, 44, 44\)"),
    (torch.randn(1, 3, 44, 44), ValueError,
     r"UNet: the input has 3 channels but the network takes in_channels=1"),
    (torch.ones(1, 1, 44, 44, dtype=torch.long), TypeError,
     r"floating-point tensor, got torch.int64"),
    (torch.randn(1, 1, 46, 44), ValueError, r"input height 46 does not work.*44 and 48"),
    (torch.randn(1, 1, 0, 44), ValueError, r"empty spatial size"),
])
def test_bad_input(x, error, match):
    model = unet(base_channels=1, depth=3)
    with pytest.raises(error, match=match):
        model(x)
