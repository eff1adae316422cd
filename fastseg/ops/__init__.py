"""The fused ops. Each is exactly an eager composition (see fastseg.ops._reference)."""

from fastseg.ops.softmax_cross_entropy import softmax_cross_entropy

__all__ = ["softmax_cross_entropy"]
