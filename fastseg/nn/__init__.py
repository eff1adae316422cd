"""Drop-in torch.nn modules backed by the fused ops."""

from fastseg.nn.loss import SoftmaxCrossEntropyLoss

__all__ = ["SoftmaxCrossEntropyLoss"]
