"""The fused ops. Each is exactly an eager composition (see fastseg.ops._reference)."""

from fastseg.ops.crop_concat_conv2d import crop_concat_conv2d
from fastseg.ops.deconv_add import deconv_add
from fastseg.ops.softmax_cross_entropy import softmax_cross_entropy
from fastseg.ops.upsample_add import upsample_add

__all__ = ["crop_concat_conv2d", "deconv_add", "softmax_cross_entropy", "upsample_add"]
