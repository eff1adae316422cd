"""Drop-in torch.nn modules backed by the fused ops."""

from fastseg.nn import init
from fastseg.nn.loss import SoftmaxCrossEntropyLoss
from fastseg.nn.upsample import DeconvAdd, UpsampleAdd

__all__ = ["DeconvAdd", "SoftmaxCrossEntropyLoss", "UpsampleAdd", "init"]
