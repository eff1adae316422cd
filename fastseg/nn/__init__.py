"""Drop-in torch.nn modules backed by the fused ops."""

from fastseg.nn import init
from fastseg.nn.conv import CropConcatConv2d
from fastseg.nn.convert import convert
from fastseg.nn.loss import SoftmaxCrossEntropyLoss
from fastseg.nn.upsample import DeconvAdd, UpsampleAdd

__all__ = ["CropConcatConv2d", "DeconvAdd", "SoftmaxCrossEntropyLoss", "UpsampleAdd", "convert", "init"]
