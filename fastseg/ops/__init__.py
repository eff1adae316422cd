"""The fused ops. Each is exactly an eager composition (see fastseg.ops._reference)."""

from fastseg.ops.deconv_add import deconv_add
from fastseg.ops.softmax_cross_entropy import softmax_cross_entropy
from fastseg.ops.upsample_add import upsample_add

__all__ = ["deconv_add", "softmax_cross_entropy", "upsample_add"]
