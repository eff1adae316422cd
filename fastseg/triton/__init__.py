"""Triton kernels of fastseg and their launchers (the "triton" backend).

One module per op, with the same stem as ``csrc/cpu/<op>.cpp`` and ``fastseg/ops/<op>.py``:

- :mod:`fastseg.triton.softmax_cross_entropy`
- :mod:`fastseg.triton.upsample_add` (bilinear upsampling + skip-add; its tile configs and
  helpers are shared by deconv_add)
- :mod:`fastseg.triton.deconv_add` (depthwise deconvolution + crop + skip-add)

Nothing is imported here on purpose: importing a kernel module imports triton, and whether
triton runs its interpreter (``TRITON_INTERPRET=1``) is decided when the kernels are
defined. Every kernel module imports cleanly without triton and then explains, through its
``not_supported_reasons``, why it cannot serve.
"""

__all__ = ["deconv_add", "softmax_cross_entropy", "upsample_add"]
