"""Validation: whole images through ``predict_logits`` (overlap-tile for the valid U-Net),
accumulated in a ConfusionMatrix (and the Rand error for two classes), reduced across processes.
"""

from __future__ import annotations

import torch
from torch import nn

from fastseg.engine.distributed import Context

__all__ = ["evaluate", "load_model", "load_trained_model"]


def evaluate(model: nn.Module, dataset, *, num_classes: int, ignore_index: int, mean, std,
             ctx: Context | None = None, max_pixels: int | None = None, amp: str = "none",
             progress: bool = False, table: bool = False) -> dict:
    """Metrics of ``model`` on every image of ``dataset`` at its full size (the
    ConfusionMatrix's, "rand_error" for two classes, "images"; with ``table`` also "table",
    the per-class text table named with the dataset's class_names).

    Under DDP each process takes every world_size-th image and the metrics are all-reduced,
    so every rank returns the same numbers (every rank must call this)."""
    from fastseg.engine.predict import predict_logits
    from fastseg.metrics import ConfusionMatrix, RandError

    ctx = ctx or Context()
    device = next(model.parameters()).device
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    rand = RandError(ignore_index=ignore_index) if num_classes == 2 else None
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    indices = range(ctx.rank, len(dataset), ctx.world_size)
    was_training = model.training
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="validate", unit="img", leave=False)
    try:
        for i in indices:
            sample = dataset[i]
            logits = predict_logits(model, sample["image"], mean=mean, std=std,
                                    max_pixels=max_pixels, device=device, dtype=dtype).to(device)
            target = sample["mask"].to(device)
            matrix.update(logits[None], target[None])
            if rand is not None:
                rand.update(logits[None], target[None])
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    metrics = matrix.compute()
    if table:
        metrics["table"] = matrix.table(getattr(dataset, "class_names", None))
    if rand is not None:
        metrics["rand_error"] = rand.compute()
    metrics["images"] = len(dataset)
    return metrics


def load_model(checkpoint: dict, device) -> tuple[nn.Module, "TrainConfig"]:  # noqa: F821
    """Rebuild a checkpoint's network (from its config) and load its weights."""
    from fastseg.engine.build import build_model
    from fastseg.engine.config import TrainConfig

    config = TrainConfig.from_dict(checkpoint["config"])
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def load_trained_model(path, device="cpu") -> tuple[nn.Module, "TrainConfig"]:  # noqa: F821
    """A trained network from a ``fastseg train`` checkpoint file, in eval mode, with its
    TrainConfig (``config.mean`` / ``config.std`` are the normalization it was trained with)."""
    from fastseg.engine.checkpoint import load_checkpoint

    return load_model(load_checkpoint(path), device)
