"""fastseg.data: segmentation datasets, augmentations and U-Net's weight map.

- datasets: :class:`SegmentationDataset` (the base: sample format, (seed, epoch, index)
  determinism, cached weight maps), :class:`SegmentationFolder` (image/mask folders) and the
  presets :func:`isbi2012_membrane` and :func:`camvid`; :func:`read_image` (one image file
  as the datasets read it);
- synthetic: :class:`SyntheticMembranes`, :class:`SyntheticShapes`, :func:`make_synthetic`;
- transforms: :class:`Compose`, :class:`RandomFlip`, :class:`RandomRotation`,
  :class:`RandomScale`, :class:`Resize`, :class:`RandomCrop`, :class:`CenterCrop`,
  :class:`MirrorPad`, :class:`IntensityJitter`, :class:`ElasticDeformation`;
- :func:`unet_weight_map`.
"""

from fastseg.data.datasets import (CAMVID_CLASS_NAMES, CAMVID_CLASS_WEIGHTS, IMAGE_EXTENSIONS,
                                   ISBI2012_CLASS_NAMES, SegmentationDataset,
                                   SegmentationFolder, camvid, isbi2012_membrane, mix_seed,
                                   read_image)
from fastseg.data.synthetic import (SYNTHETIC_DATASETS, SyntheticMembranes, SyntheticShapes,
                                    make_synthetic)
from fastseg.data.transforms import (CenterCrop, Compose, ElasticDeformation, IntensityJitter,
                                     MirrorPad, RandomCrop, RandomFlip, RandomRotation,
                                     RandomScale, Resize)
from fastseg.data.weight_map import unet_weight_map

__all__ = ["SegmentationDataset", "SegmentationFolder", "isbi2012_membrane", "camvid",
           "read_image", "mix_seed",
           "IMAGE_EXTENSIONS", "ISBI2012_CLASS_NAMES", "CAMVID_CLASS_NAMES",
           "CAMVID_CLASS_WEIGHTS", "SyntheticMembranes", "SyntheticShapes", "make_synthetic",
           "SYNTHETIC_DATASETS", "Compose", "RandomFlip", "RandomRotation", "RandomScale",
           "Resize", "RandomCrop", "CenterCrop", "MirrorPad", "IntensityJitter",
           "ElasticDeformation", "unet_weight_map"]
