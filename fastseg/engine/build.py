"""From a TrainConfig to the objects of a run: datasets, model, loss, optimizer, schedule.

Shared by ``fastseg train`` (fastseg/engine/train.py), ``fastseg eval`` and ``fastseg predict``,
so the three always rebuild the same network and the same preprocessing from a checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastseg.engine.config import TrainConfig

__all__ = ["build_datasets", "build_model", "build_loss", "build_optimizer", "build_schedule",
           "unet_context", "normalization", "class_weights"]

# How many raw training images the mean / std are measured on (deterministic: the first ones).
_STATS_IMAGES = 32


def unet_context(config: TrainConfig) -> int:
    """The valid U-Net's context margin m: its output is smaller than its input by 2m on each
    axis (92 for the paper's depth 5). 0 for the other networks."""
    if config.model != "unet" or config.padding != "valid":
        return 0
    from fastseg.models import unet_output_size, unet_valid_input_size

    smallest = unet_valid_input_size(1, config.depth)
    return (smallest - unet_output_size(smallest, config.depth)) // 2


def training_crop(config: TrainConfig) -> int:
    """The training crop (output pixels per side). The valid U-Net takes only some input
    sizes: the crop is rounded up to the nearest one that works."""
    m = unet_context(config)
    if m == 0:
        return config.crop
    from fastseg.models import unet_valid_input_size

    return unet_valid_input_size(config.crop + 2 * m, config.depth, round="up") - 2 * m


def _augmentations(config: TrainConfig):
    from fastseg.data import transforms as T

    steps = []
    ignore = config.ignore_index   # pixels brought in from outside the image are not trained on
    if config.flip:
        steps.append(T.RandomFlip(horizontal=True, vertical=config.model == "unet"))
    if config.rotate:
        steps.append(T.RandomRotation(degrees=(-config.rotate, config.rotate), ignore_index=ignore))
    if config.elastic:
        steps.append(T.ElasticDeformation(sigma=10.0, grid=3, ignore_index=ignore))
    m = unet_context(config)
    if m:
        steps.append(T.MirrorPad(m))
    steps.append(T.RandomCrop(training_crop(config), context=m, ignore_index=ignore))
    if config.jitter:
        steps.append(T.IntensityJitter(brightness=config.jitter, contrast=config.jitter))
    return steps


def build_datasets(config: TrainConfig, *, train: bool = True, augment: bool = True):
    """(train dataset or None, validation dataset). The training set carries the
    augmentations and the crop (``augment=False``: only the resize, as validation - for
    evaluating on the training images); the validation set only the resize, at full image
    size (validation runs through ``predict_logits``, which handles any size)."""
    from fastseg import data
    from fastseg.data import transforms as T

    resize = [T.Resize(scale=config.scale)] if config.scale != 1.0 else []
    val_tf = T.Compose(resize) if resize else None
    train_tf = T.Compose(resize + _augmentations(config)) if train and augment else val_tf
    weight_map = {"w0": config.w0, "sigma": config.sigma} if config.weight_map else None
    kind = config.dataset
    if kind.startswith("synthetic-"):
        size = (config.synthetic_size, config.synthetic_size)
        make = lambda n, seed, tf, wm: data.make_synthetic(  # noqa: E731
            kind, length=n, size=size, seed=seed, transform=tf, weight_map=wm)
        # Disjoint seeds: the validation images are never training images.
        train_ds = make(config.synthetic_train, config.seed, train_tf, weight_map) if train else None
        val_ds = make(config.synthetic_val, config.seed + 1_000_003, val_tf, None)
    elif kind == "isbi2012":
        train_ds = (data.isbi2012_membrane(config.data_root, "train", transform=train_tf,
                                           seed=config.seed, weight_map=weight_map)
                    if train else None)
        val_ds = data.isbi2012_membrane(config.data_root, "val", transform=val_tf)
    elif kind == "camvid":
        train_ds = (data.camvid(config.data_root, "train", transform=train_tf, seed=config.seed,
                                weight_map=weight_map) if train else None)
        val_ds = data.camvid(config.data_root, "val", transform=val_tf)
    else:  # folder
        common = dict(num_classes=config.num_classes, label_map=config.label_map,
                      ignore_index=config.ignore_index)
        train_ds = (data.SegmentationFolder(config.train_images, config.train_masks,
                                            transform=train_tf, seed=config.seed,
                                            weight_map=weight_map, **common)
                    if train else None)
        val_ds = (data.SegmentationFolder(config.val_images, config.val_masks, transform=val_tf,
                                          **common)
                  if config.val_images and config.val_masks else None)
    for ds, name in ((train_ds, "training"), (val_ds, "validation")):
        if ds is not None and len(ds) == 0:
            raise ValueError(f"the {name} set of dataset {kind!r} is empty")
    return train_ds, val_ds


def describe_data(config: TrainConfig, dataset) -> None:
    """Fill the config's num_classes / in_channels / ignore_index from the dataset, checking
    any that were given."""
    for name in ("num_classes", "in_channels"):
        have = getattr(dataset, name)
        want = getattr(config, name)
        if want is not None and want != have:
            raise ValueError(f"{name}={want} was asked for but the dataset has {have}")
        setattr(config, name, int(have))
    config.ignore_index = int(dataset.ignore_index)
    # Kept for eval / predict, which see only the checkpoint.
    config.extra["class_names"] = [str(name) for name in dataset.class_names]


def build_model(config: TrainConfig) -> nn.Module:
    from fastseg import models

    if config.num_classes is None or config.in_channels is None:
        raise ValueError("build_model: num_classes and in_channels must be known (from the data)")
    if config.model == "unet":
        return models.unet(in_channels=config.in_channels, num_classes=config.num_classes,
                           base_channels=config.base_channels, depth=config.depth,
                           padding=config.padding, up_mode=config.up_mode,
                           batch_norm=config.batch_norm, fused=config.fused)
    factory = getattr(models, config.model)
    return factory(num_classes=config.num_classes, in_channels=config.in_channels,
                   width_mult=config.width_mult, fused=config.fused,
                   learnable_upsampling=config.learnable_upsampling)


def normalization(config: TrainConfig, dataset) -> tuple[list, list]:
    """Per-channel mean and std: the config's, else measured on the first raw training
    images (no augmentation), so the same numbers serve eval and predict from the checkpoint."""
    if config.mean is not None and config.std is not None:
        return list(config.mean), list(config.std)
    total = torch.zeros(dataset.in_channels, dtype=torch.float64)
    square = torch.zeros_like(total)
    count = 0
    for i in range(min(len(dataset), _STATS_IMAGES)):
        image = dataset.load(i)["image"].double()
        total += image.sum(dim=(1, 2))
        square += (image * image).sum(dim=(1, 2))
        count += image.shape[1] * image.shape[2]
    mean = total / count
    std = (square / count - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def class_weights(config: TrainConfig, dataset) -> list | None:
    """None, the config's list, or "auto": median frequency balancing (Eigen & Fergus, as in
    SegNet) over the raw training masks: w_c = median(f) / f_c with f_c the pixel count of
    class c over the pixels of the images where c appears."""
    spec = config.class_weights
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        values = [float(v) for v in spec]
        if len(values) != config.num_classes:
            raise ValueError(f"class_weights has {len(values)} values but there are "
                             f"{config.num_classes} classes")
        if any(not (v >= 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"class_weights must be finite and >= 0, got {values}")
        return values
    k = config.num_classes
    counts = torch.zeros(k, dtype=torch.float64)
    present = torch.zeros(k, dtype=torch.float64)
    for i in range(len(dataset)):
        mask = dataset.load(i)["mask"].flatten()
        mask = mask[(mask >= 0) & (mask < k)]
        c = torch.bincount(mask, minlength=k).double()
        counts += c
        present += (c > 0).double() * mask.numel()
    seen = counts > 0
    freq = torch.where(seen, counts / present.clamp_min(1), torch.zeros_like(counts))
    median = freq[seen].median()
    weights = torch.where(seen, median / freq.clamp_min(1e-12), torch.zeros_like(freq))
    return [round(float(w), 6) for w in weights]


def build_loss(config: TrainConfig, weights: list | None, device) -> nn.Module:
    """The fused loss (fastseg.nn.SoftmaxCrossEntropyLoss) or, with fused=False, the same loss
    computed by the eager reference; both take ``(logits, target, pixel_weight=None)``."""
    from fastseg.nn import SoftmaxCrossEntropyLoss

    w = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    backend = config.backend if config.fused else "reference"
    return SoftmaxCrossEntropyLoss(weight=w, ignore_index=config.ignore_index, backend=backend)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_schedule(config: TrainConfig, optimizer, total_steps: int):
    """Poly ((1 - t/T)^power, as in DeepLab / FCN follow-ups), cosine, or constant, per step."""
    if config.schedule == "poly":
        power = config.poly_power
        factor = lambda step: max(0.0, 1.0 - step / total_steps) ** power  # noqa: E731
    elif config.schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps)  # noqa: E731
                                                     / total_steps))
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
