"""fastseg.nn.convert: exact drop-in replacements, weights and state_dict kept, a report."""

import pytest
import torch
from torch import nn

import fastseg
from fastseg.nn import DeconvAdd, SoftmaxCrossEntropyLoss, UpsampleAdd, convert


class TinyFCN(nn.Module):
    """A user's own FCN-like head: per-class deconvolution, a bilinear upsample, a loss."""

    def __init__(self, classes=3):
        super().__init__()
        self.score = nn.Conv2d(4, classes, 1)
        self.up2 = nn.ConvTranspose2d(classes, classes, 4, 2, groups=classes, bias=False)
        fastseg.nn.init.bilinear_(self.up2.weight)
        self.up_fixed = nn.ConvTranspose2d(classes, classes, 4, 2, groups=classes, bias=False)
        self.up_fixed.weight.requires_grad_(False)
        self.resize = nn.Upsample(scale_factor=2, mode="bilinear")
        self.nearest = nn.Upsample(scale_factor=2, mode="nearest")      # no fused equivalent
        self.dense = nn.ConvTranspose2d(classes, classes, 2, 2)           # not per-class
        self.head = nn.Sequential(nn.UpsamplingBilinear2d(size=(40, 44)))
        self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=255,
                                        label_smoothing=0.1)

    def forward(self, x, target):
        s = self.score(x)
        y = self.up2(s)[:, :, 1:-1, 1:-1] + self.up_fixed(s)[:, :, 1:-1, 1:-1]
        y = self.nearest(self.resize(y))[:, :, ::4, ::4] + self.dense(s)
        y = self.head(y)
        return y, self.loss(y, target)


def test_convert_replaces_exact_equivalents_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = TinyFCN().double()
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 40, 44))
    target[0, :3] = 255
    converted = convert(model)
    assert converted is not model and isinstance(model.loss, nn.CrossEntropyLoss)  # a copy
    assert type(converted.loss) is SoftmaxCrossEntropyLoss
    assert type(converted.up2) is DeconvAdd and converted.up2.learnable
    assert type(converted.up_fixed) is DeconvAdd and not converted.up_fixed.learnable
    assert type(converted.resize) is UpsampleAdd and type(converted.head[0]) is UpsampleAdd
    assert type(converted.nearest) is nn.Upsample and type(converted.dense) is nn.ConvTranspose2d
    assert set(converted.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    report = "\n".join(converted.fastseg_conversions)
    for line in ("loss: CrossEntropyLoss -> SoftmaxCrossEntropyLoss", "up2: ConvTranspose2d -> DeconvAdd",
                 "resize: Upsample -> UpsampleAdd", "head.0: UpsamplingBilinear2d -> UpsampleAdd",
                 "nearest: Upsample kept: mode 'nearest'", "dense: ConvTranspose2d kept: not a per-class"):
        assert line in report, report

    outs = []
    for m in (model, converted):
        leaves = [p for p in m.parameters() if p.requires_grad]
        y, loss = m(x, target)
        grads = torch.autograd.grad(loss, leaves)
        outs.append((y, loss, grads))
    (y0, l0, g0), (y1, l1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a saved state dict loads into the converted model (strict)
    converted.load_state_dict(model.state_dict(), strict=True)


def test_convert_inplace_single_layer_backend_and_verbose(capsys):
    loss = nn.CrossEntropyLoss(reduction="sum")
    new = convert(loss, backend="reference", verbose=True)
    assert type(new) is SoftmaxCrossEntropyLoss and new.reduction == "sum" and new.backend == "reference"
    assert "(root): CrossEntropyLoss -> SoftmaxCrossEntropyLoss" in capsys.readouterr().out
    seq = nn.Sequential(nn.Conv2d(1, 2, 1), nn.CrossEntropyLoss())
    same = convert(seq, inplace=True)
    assert same is seq and type(seq[1]) is SoftmaxCrossEntropyLoss
    again = convert(same)  # nothing left to replace
    assert again.fastseg_conversions == []
    model = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear")).eval()
    assert not convert(model)[0].training


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="convert: module must be an nn.Module, got int"):
        convert(3)
