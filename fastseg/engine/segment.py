"""``fastseg predict``: a checkpoint on image files of any size -> PNG masks, overlays and
class heat maps.

The image goes through the preprocessing the network was trained with (the checkpoint's resize
factor and normalization), then :func:`fastseg.engine.predict.predict_logits` (the U-Net
paper's overlap-tile strategy for the valid U-Net, tiles within a memory budget); scores of a
resized input are interpolated back to the image's own size.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["predict_files", "class_index", "dense_heatmap"]


def class_index(spec, class_names, num_classes: int) -> int:
    """A class given by index ("3") or by name ("cell") -> its index (ValueError otherwise)."""
    names = list(class_names or [])
    text = str(spec)
    if text.lstrip("-").isdigit():
        index = int(text)
    elif text in names:
        index = names.index(text)
    else:
        raise ValueError(f"heatmap class {spec!r} is neither an index in [0, {num_classes}) nor "
                         f"one of the class names {names}")
    if not 0 <= index < num_classes:
        raise ValueError(f"heatmap class {index} is outside [0, {num_classes})")
    return index


def _scores(model, config, image: torch.Tensor, max_pixels, device) -> torch.Tensor:
    from fastseg.engine.predict import predict_logits

    height, width = image.shape[-2:]
    x = image
    if config.scale != 1.0:
        size = (max(1, round(height * config.scale)), max(1, round(width * config.scale)))
        x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp(0, 1)
    logits = predict_logits(model, x, mean=config.mean, std=config.std, max_pixels=max_pixels,
                            device=device)
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits[None], size=(height, width), mode="bilinear",
                               align_corners=False)[0]
    return logits


def predict_files(model: nn.Module, config, paths, out: str, *, heatmap=None,
                  max_pixels: int | None = None, max_memory_mb: float | None = None,
                  progress: bool = True) -> list[str]:
    """Segment each image file; write ``<stem>_mask.png`` (class ids), ``<stem>_overlay.png``
    (the classes' colours over the image) and, with ``heatmap`` (a class index or name),
    ``<stem>_heatmap_<class>.png`` (its softmax probability, blue 0 to red 1). Returns the
    written paths."""
    import numpy as np

    from fastseg.data import read_image
    from fastseg.engine.predict import max_pixels_for_memory
    from fastseg.engine.visualize import heatmap as heat_colours
    from fastseg.engine.visualize import overlay, palette, save_png

    names = config.extra.get("class_names")
    heat = None if heatmap is None else class_index(heatmap, names, config.num_classes)
    if max_pixels is None and max_memory_mb is not None:
        max_pixels = max_pixels_for_memory(model, max_memory_mb)
    device = next(model.parameters()).device
    colours = palette(config.num_classes)
    os.makedirs(out, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ValueError(f"several input images share the names {repeated}: their outputs would "
                         f"overwrite each other; predict them into separate folders")
    written = []
    iterator = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="predict", unit="img")
    for path, stem in zip(iterator, stems):
        image = read_image(path, channels=config.in_channels)
        logits = _scores(model, config, image, max_pixels, device)
        mask = logits.argmax(0)
        dtype = np.uint8 if config.num_classes <= 256 else np.uint16
        targets = {f"{stem}_mask.png": mask.numpy().astype(dtype),
                   f"{stem}_overlay.png": overlay(image, mask, colours)}
        if heat is not None:
            probability = torch.softmax(logits.float(), dim=0)[heat]
            targets[f"{stem}_heatmap_{heat}.png"] = heat_colours(probability)
        for name, picture in targets.items():
            target = os.path.join(out, name)
            save_png(picture, target)
            written.append(target)
    return written


def dense_heatmap(model: nn.Module, image: torch.Tensor, class_index: int, *, mean, std,
                  device=None) -> torch.Tensor:
    """The class probability map of any fully convolutional network - e.g. a classifier turned
    into one by ``fastseg.models.convolutionalize`` - over a whole image: the softmax of its
    (N, K, h, w) score map for ``class_index``, interpolated bilinearly to the image's (H, W).
    This is the FCN paper's "tabby cat" heat map: where in a large image the classifier sees
    the class."""
    if image.dim() != 3:
        raise ValueError(f"dense_heatmap: image must be (C, H, W), got {tuple(image.shape)}")
    parameter = next(model.parameters())
    device, dtype = device or parameter.device, parameter.dtype
    channels = image.shape[0]
    m = torch.as_tensor(mean, dtype=dtype).reshape(-1, 1, 1).expand(channels, 1, 1)
    s = torch.as_tensor(std, dtype=dtype).reshape(-1, 1, 1).expand(channels, 1, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = ((image.to(dtype) - m) / s)[None].to(device)
            scores = model(x)
            if scores.dim() == 2:          # a plain classifier on a map of exactly its size
                scores = scores[:, :, None, None]
            if not 0 <= class_index < scores.shape[1]:
                raise ValueError(f"dense_heatmap: class_index {class_index} outside "
                                 f"[0, {scores.shape[1]})")
            probability = torch.softmax(scores.float(), dim=1)[:, class_index:class_index + 1]
            probability = F.interpolate(probability, size=image.shape[-2:], mode="bilinear",
                                        align_corners=False)
    finally:
        model.train(was_training)
    return probability[0, 0].cpu()
