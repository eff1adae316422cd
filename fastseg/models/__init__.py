"""fastseg.models: the FCN and U-Net networks of the papers, built on the fused ops.

    fastseg.models.fcn32s / fcn16s / fcn8s (fastseg/models/fcn.py)
    fastseg.models.unet (fastseg/models/unet.py)

Each takes ``fused=True`` (fastseg's modules) or ``fused=False`` (the same network from eager
PyTorch modules, with identical parameter names, so state dicts move between the two).
"""

# Imported eagerly: importing the submodule fastseg.models.unet binds the package attribute
# `unet` to the module; the from-import below rebinds it to the factory function.
from fastseg.models.fcn import (  # noqa: E402
    FCN, convolutionalize, fcn8s, fcn16s, fcn32s, fcn_crop_offsets, load_vgg16_backbone,
)
from fastseg.models.unet import UNet, unet, unet_output_size, unet_valid_input_size  # noqa: E402

__all__ = ["FCN", "UNet", "convolutionalize", "fcn8s", "fcn16s", "fcn32s", "fcn_crop_offsets",
           "load_vgg16_backbone", "unet", "unet_output_size", "unet_valid_input_size"]
