"""fastseg.engine.predict (tiled inference) and fastseg.engine.visualize (pictures).

References: the untiled inference is a direct model call on the image mirror-padded with
np.pad(mode="reflect") (valid U-Net) or on the whole image (same U-Net, FCN); tiling must
reproduce it (float64 models, exactly or within 1e-12).
"""

import numpy as np
import pytest
import torch

# The data pipeline needs Pillow and scipy (package dependencies; a bare GPU machine may lack them).
pytest.importorskip("PIL")
pytest.importorskip("scipy")
from conftest import HAS_CUDA  # noqa: E402
from fastseg.engine.predict import (
    _same_unet_radius, _unet_margin, max_pixels_for_memory, predict_logits,
    predict_mask, predict_probability,
)
from fastseg.engine.visualize import (
    IGNORE_COLOR, colorize, heatmap, overlay, palette, panel, plot_curves, save_png,
)
from fastseg.data.transforms import mirror_pad as _mirror_pad
from fastseg.models import fcn8s, unet, unet_valid_input_size

MEAN, STD = [0.4], [0.3]


def _unet(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("base_channels", 4)
    kwargs.setdefault("depth", 3)
    return unet(**kwargs).double()


def _fcn(seed=0):
    torch.manual_seed(seed)
    model = fcn8s(num_classes=3, width_mult=1 / 32).double()
    # FCN's scoring layers start at zero (the paper's init): randomize them so the output
    # depends on the input
    for name in ("score_fr", "score_pool4", "score_pool3"):
        torch.nn.init.normal_(getattr(model, name).weight, 0.0, 0.5)
    return model


def _image(channels, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, h, w, generator=g, dtype=torch.float64)


class _Calls:
    """Records the input shape of every forward call of a model."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.register_forward_pre_hook(
            lambda module, args: self.shapes.append(tuple(args[0].shape[2:])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _valid_reference(model, image, mean, std):
    """The untiled valid U-Net inference, written with numpy: normalize, mirror-pad by the
    margin (plus what makes the size valid) with np.pad(mode="reflect"), call the model once,
    crop the output to the image."""
    _, h, w = image.shape
    m = _unet_margin(model.depth)
    ph, pw = (unet_valid_input_size(n + 2 * m, model.depth) for n in (h, w))
    x = (image.numpy() - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    x = np.pad(x, ((0, 0), (m, ph - h - m), (m, pw - w - m)), mode="reflect")
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)[None])[0, :, :h, :w]


# --- mirror padding --------------------------------------------------------------------------

@pytest.mark.parametrize("n,before,after", [(7, 3, 2), (5, 12, 9), (2, 5, 4), (1, 3, 3),
                                            (10, 0, 0)])
def test_mirror_pad_matches_numpy_reflect(n, before, after):
    """The U-Net paper mirrors at the border pixel (not repeated): np.pad's "reflect", with
    repeated reflection when the pad is larger than the image."""
    image = torch.arange(2 * n * 3, dtype=torch.float64).reshape(2, n, 3)
    got = _mirror_pad(image, before, after, 4, 5)
    want = np.pad(image.numpy(), ((0, 0), (before, after), (4, 5)), mode="reflect")
    assert np.array_equal(got.numpy(), want)


# --- valid U-Net: overlap-tile == untiled ----------------------------------------------------

def test_valid_unet_single_tile_is_the_direct_call():
    model = _unet()
    for h, w in [(37, 53), (100, 61), (5, 3), (1, 1)]:
        image = _image(1, h, w)
        with _Calls(model) as calls:
            got = predict_logits(model, image, mean=MEAN, std=STD)
        assert len(calls.shapes) == 1
        assert got.shape == (2, h, w) and got.dtype == torch.float64
        assert torch.equal(got, _valid_reference(model, image, MEAN, STD))


@pytest.mark.parametrize("up_mode", ["deconv", "bilinear"])
@pytest.mark.parametrize("h,w", [(37, 53), (100, 61)])
def test_valid_unet_tiled_equals_untiled(up_mode, h, w):
    model = _unet(up_mode=up_mode)
    image = _image(1, h, w)
    reference = _valid_reference(model, image, MEAN, STD)
    for max_pixels in (56 * 56, 60 * 72, 80 * 64):
        with _Calls(model) as calls:
            got = predict_logits(model, image, mean=MEAN, std=STD, max_pixels=max_pixels)
        assert len(calls.shapes) > 1                               # really tiled
        assert all(a * b <= max_pixels for a, b in calls.shapes)   # within the budget
        assert got.shape == (2, h, w)
        assert (got - reference).abs().max().item() <= 1e-12


def test_valid_unet_forced_tile_size():
    model = _unet()
    image = _image(1, 70, 45)
    reference = _valid_reference(model, image, MEAN, STD)
    margin = _unet_margin(model.depth)
    with _Calls(model) as calls:
        got = predict_logits(model, image, mean=MEAN, std=STD, tile=(18, 13))
    # rounded down to valid output sizes (4 + 4k for depth 3): 16 x 12
    assert set(calls.shapes) == {(16 + 2 * margin, 12 + 2 * margin)}
    assert (got - reference).abs().max().item() <= 1e-12


def test_valid_unet_deeper_and_rgb():
    model = _unet(depth=4, in_channels=3, num_classes=3, base_channels=2)
    image = _image(3, 29, 41)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    reference = _valid_reference(model, image, mean, std)
    assert torch.equal(predict_logits(model, image, mean=mean, std=std), reference)
    got = predict_logits(model, image, mean=mean, std=std, max_pixels=112 * 112)
    assert (got - reference).abs().max().item() <= 1e-12


# --- same-padded U-Net and FCN ---------------------------------------------------------------

def _direct(model, image, mean, std):
    x = (image - torch.tensor(mean, dtype=image.dtype)[:, None, None]) \
        / torch.tensor(std, dtype=image.dtype)[:, None, None]
    with torch.no_grad():
        return model.eval()(x[None])[0]


@pytest.mark.parametrize("depth", [2, 3])
def test_same_unet_receptive_radius(depth):
    """The halo's radius, from the layer geometry, against autograd on the network made linear
    (ReLU -> identity, so no unit is dead): the farthest input pixel an output pixel reads."""
    torch.manual_seed(0)
    model = unet(base_channels=2, depth=depth, padding="same", fused=False).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.forward = lambda x: x
    x = torch.rand(1, 1, 96, 96, dtype=torch.float64, requires_grad=True)
    out = model(x)
    radius = 0
    for y in range(40, 40 + 2 ** (depth - 1)):   # one period of the pooling grid
        grad, = torch.autograd.grad(out[0, 0, y, 48], x, retain_graph=True)
        rows = grad[0, 0].abs().sum(1).nonzero().flatten()
        radius = max(radius, y - rows.min().item(), rows.max().item() - y)
    assert _same_unet_radius(depth, "deconv") == radius


def test_same_unet_whole_and_tiled():
    model = _unet(padding="same")
    image = _image(1, 101, 75)
    reference = _direct(model, image, MEAN, STD)
    assert torch.equal(predict_logits(model, image, mean=MEAN, std=STD), reference)
    # default halo = the receptive radius (23 -> 24 for depth 3): exact
    with _Calls(model) as calls:
        got = predict_logits(model, image, mean=MEAN, std=STD, max_pixels=72 * 72)
    assert len(calls.shapes) > 1 and all(a * b <= 72 * 72 for a, b in calls.shapes)
    assert got.shape == (2, 101, 75)
    assert (got - reference).abs().max().item() <= 1e-12
    # a halo of 4 px is inexact at the seams (zero padding inside the image) but exact far
    # from them, e.g. the top-left corner of the first tile
    with _Calls(model) as calls:
        rough = predict_logits(model, image, mean=MEAN, std=STD, tile=40, halo=4)
    assert max(calls.shapes) == (40, 40) and rough.shape == reference.shape
    assert (rough - reference).abs().max().item() > 1e-3
    assert (rough[:, :8, :8] - reference[:, :8, :8]).abs().max().item() <= 1e-12


def test_fcn_whole_and_tiled():
    model = _fcn()
    image = _image(3, 70, 90)
    mean, std = [0.5] * 3, [0.25] * 3
    reference = _direct(model, image, mean, std)
    assert reference.abs().max() > 0
    assert torch.equal(predict_logits(model, image, mean=mean, std=std), reference)
    # a small halo: approximate (FCN's receptive field is ~400 px), right shape, finite
    # (halos are rounded up to FCN's 32-pixel stride)
    image = _image(3, 100, 130)
    with _Calls(model) as calls:
        rough = predict_logits(model, image, mean=mean, std=std, halo=32, max_pixels=100 * 100)
    assert len(calls.shapes) > 1 and all(a * b <= 100 * 100 for a, b in calls.shapes)
    assert rough.shape == (3, 100, 130) and torch.isfinite(rough).all()


def test_fcn_small_tiles_cover_every_pixel():
    """Halo 0 and one-stride tiles: every pixel comes from the tile containing it, which is
    the model run on that 32 x 32 block alone."""
    model = _fcn()
    image = _image(3, 40, 70)
    mean, std = [0.5] * 3, [0.25] * 3
    got = predict_logits(model, image, mean=mean, std=std, halo=0, tile=32)
    for r0 in (0, 32):
        for c0 in (0, 32, 64):
            block = image[:, r0:r0 + 32, c0:c0 + 32]
            want = _direct(model, block, mean, std)
            assert torch.equal(got[:, r0:r0 + 32, c0:c0 + 32], want)


# --- mask, probability, options --------------------------------------------------------------

def test_mask_and_probability():
    model = _unet(num_classes=4, padding="same")
    image = _image(1, 33, 21)
    logits = predict_logits(model, image, mean=MEAN, std=STD)
    mask = predict_mask(model, image, mean=MEAN, std=STD)
    assert mask.dtype == torch.int64 and mask.shape == (33, 21)
    assert torch.equal(mask, logits.argmax(0))
    probs = torch.stack([predict_probability(model, image, k, mean=MEAN, std=STD)
                         for k in range(4)])
    assert torch.allclose(probs.sum(0), torch.ones(33, 21, dtype=torch.float64), atol=1e-12)
    expected = np.exp(logits.numpy() - logits.numpy().max(0))
    expected /= expected.sum(0)
    assert np.allclose(probs.numpy(), expected, atol=1e-12)


def test_float32_output_autocast_and_training_flag():
    torch.manual_seed(0)
    model = unet(base_channels=4, depth=3)       # float32
    model.train()
    image = torch.rand(1, 30, 30)
    full = predict_logits(model, image, mean=MEAN, std=STD)
    assert full.dtype == torch.float32 and full.device.type == "cpu"
    assert model.training                         # restored
    low = predict_logits(model, image, mean=MEAN, std=STD, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits
    assert (low - full).abs().max().item() <= 0.05 * full.abs().max().item() + 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_tiled_matches_cpu():
    """On the GPU (fused kernels, TF32 convolutions allowed): the tiled result, returned on the
    CPU, matches the CPU's untiled one to ~1% of the score range."""
    torch.manual_seed(0)
    model = unet(base_channels=4, depth=3)
    image = torch.rand(1, 61, 70)
    reference = predict_logits(model, image, mean=MEAN, std=STD)
    got = predict_logits(model, image, mean=MEAN, std=STD, max_pixels=60 * 60, device="cuda")
    assert got.device.type == "cpu" and got.shape == (2, 61, 70)
    scale = reference.abs().max().item()
    assert (got - reference).abs().max().item() <= 1e-2 * scale + 1e-4


def test_memory_budget_estimate():
    model = unet(base_channels=8, depth=3)
    base = max_pixels_for_memory(model, 64)
    assert base > 0
    assert abs(max_pixels_for_memory(model, 128) - 2 * base) <= 2
    assert abs(max_pixels_for_memory(model, 64, dtype=torch.bfloat16) - 2 * base) <= 2
    assert max_pixels_for_memory(unet(base_channels=16, depth=3), 64) < base
    assert max_pixels_for_memory(fcn8s(width_mult=1 / 32), 64) > 0


def test_errors():
    model = _unet()
    image = _image(1, 20, 20)
    kw = dict(mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="image must be 3-D"):
        predict_logits(model, image[0], **kw)
    with pytest.raises(ValueError, match="image has 3 channels.*in_channels=1"):
        predict_logits(model, _image(3, 20, 20), **kw)
    with pytest.raises(ValueError, match="image is empty"):
        predict_logits(model, torch.zeros(1, 0, 5, dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match=r"image values must lie in \[0, 1\]"):
        predict_logits(model, image * 255, **kw)
    with pytest.raises(TypeError, match="image must be a floating-point"):
        predict_logits(model, torch.zeros(1, 5, 5, dtype=torch.uint8), **kw)
    with pytest.raises(ValueError, match="max_pixels=100 is too small"):
        predict_logits(model, image, max_pixels=100, **kw)
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        predict_logits(model, image, mean=[0.1, 0.2], std=STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        predict_logits(model, image, mean=MEAN, std=[0.0])
    with pytest.raises(ValueError, match="halo applies to same-padded"):
        predict_logits(model, image, halo=8, **kw)
    with pytest.raises(ValueError, match="tile height 3 is too small"):
        predict_logits(model, image, tile=(3, 8), **kw)
    with pytest.raises(ValueError, match="dtype"):
        predict_logits(model, image, dtype=torch.float64, **kw)
    with pytest.raises(TypeError, match="model must be a fastseg.models UNet or FCN"):
        predict_logits(torch.nn.Conv2d(1, 2, 3), image, **kw)
    with pytest.raises(ValueError, match=r"class_index must be in \[0, 2\)"):
        predict_probability(model, image, 2, **kw)
    with pytest.raises(ValueError, match="halo must be an int >= 0"):
        predict_logits(_unet(padding="same"), image, halo=-1, **kw)


# --- visualize -------------------------------------------------------------------------------

def test_palette():
    colors = palette(256)
    assert colors.shape == (256, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors}) == 256
    assert not (colors == 255).all(axis=1).any()          # never the ignore colour
    # PASCAL VOC's published first colours
    assert colors[:6].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                   [0, 0, 128], [128, 0, 128]]
    assert colors[15].tolist() == [192, 128, 128] and colors[20].tolist() == [0, 64, 128]
    assert np.array_equal(palette(21), colors[:21])
    with pytest.raises(ValueError, match="num_classes"):
        palette(0)


def test_colorize_and_overlay():
    colors = palette(5)
    mask = np.array([[0, 1, 2], [3, 4, 255]])
    rgb = colorize(mask, colors)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for (i, j), k in np.ndenumerate(mask):
        assert tuple(rgb[i, j]) == (IGNORE_COLOR if k == 255 else tuple(colors[k]))
    assert np.array_equal(colorize(torch.from_numpy(mask), colors), rgb)
    with pytest.raises(ValueError, match="outside the palette"):
        colorize(np.array([[5]]), colors)

    gray = torch.rand(1, 2, 3, dtype=torch.float64)
    base = np.rint(gray[0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(overlay(gray, mask, colors, alpha=0.0), np.stack([base] * 3, -1))
    full = overlay(gray, mask, colors, alpha=1.0)
    assert np.array_equal(full[0], colors[mask[0]])
    assert np.array_equal(full[1, 2], [base[1, 2]] * 3)   # ignored: the image
    half = overlay(torch.rand(3, 2, 3), mask, colors)
    assert half.shape == (2, 3, 3) and half.dtype == np.uint8
    with pytest.raises(ValueError, match="image must be"):
        overlay(torch.rand(2, 2, 3), mask, colors)


def test_heatmap():
    prob = np.array([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]])
    rgb = heatmap(prob)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 255]          # blue
    assert rgb[0, 2].tolist() == [255, 0, 0]          # red
    assert rgb[0, 1].tolist() == [0, 255, 0]          # green
    assert rgb[1, 1].tolist() == [255, 255, 0]        # yellow
    assert np.array_equal(heatmap(torch.from_numpy(prob)), rgb)
    with pytest.raises(ValueError, match="prob values"):
        heatmap(np.array([[1.5]]))


def test_panel():
    a = np.zeros((10, 7, 3), np.uint8)
    b = np.full((10, 5, 3), 100, np.uint8)
    out = panel([a, b], gap=3)
    assert out.shape == (10, 7 + 3 + 5, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :7], a) and np.array_equal(out[:, 10:], b)
    assert (out[:, 7:10] == 255).all()
    labelled = panel([a, b], labels=["input", "truth"])
    assert labelled.shape[1] == 7 + 4 + 5 and labelled.shape[0] > 10
    band = labelled[:-10]
    assert (band < 128).any()                         # some text was drawn
    assert np.array_equal(labelled[-10:, :7], a)
    with pytest.raises(ValueError, match="same height"):
        panel([a, np.zeros((9, 5, 3), np.uint8)])


def test_save_png_round_trip(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = save_png(rgb, tmp_path / "a" / "b" / "rgb.png")
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    gray = torch.rand(1, 4, 5)                         # (C, H, W) in [0, 1]
    back = np.asarray(Image.open(save_png(gray, tmp_path / "gray.png")))
    assert np.array_equal(back, np.rint(gray[0].numpy() * 255).astype(np.uint8))
    mask = np.array([[0, 3], [11, 255]], dtype=np.int64)
    assert np.array_equal(np.asarray(Image.open(save_png(mask, tmp_path / "m.png"))), mask)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        save_png(np.array([[300]]), tmp_path / "bad.png")


def test_plot_curves(tmp_path):
    from PIL import Image

    records = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(10)]
    records += [{"step": 10, "miou": 0.5, "loss": 0.05}, {"epoch": 1}]
    path = plot_curves(records, tmp_path / "plots" / "curves.png",
                       keys=("loss", ("miou", "pixel_acc")), title="run")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] > 100 and picture.size[1] > 100
    with pytest.raises(TypeError, match="records must be a list of dicts"):
        plot_curves([1, 2], tmp_path / "x.png")
