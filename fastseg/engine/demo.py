"""``fastseg demo``: a small U-Net on synthetic membranes and a small FCN-8s on synthetic shapes,
trained with the fused ops, evaluated, timed against the same networks in eager PyTorch, drawn.

Sized to finish in a few minutes on a 2-core CPU after set-up; on a GPU the same command uses
it (larger steps per second, same settings). Output folder:

    unet-membranes/   a training run (checkpoints, metrics.jsonl, curves.png, pictures/)
    fcn8s-shapes/     the same for FCN-8s
    speed.json, speed.md   fused vs eager training-step time, measured side by side
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from fastseg.engine import build
from fastseg.engine.config import TrainConfig
from fastseg.engine.train import train

__all__ = ["demo_configs", "run_demo", "time_training_steps"]


def demo_configs(out: str, device: str = "auto", quick: bool = False) -> dict[str, TrainConfig]:
    """The demo's two runs. ``quick``: a handful of steps (a smoke test of the whole path)."""
    unet = TrainConfig(
        model="unet", base_channels=8, depth=3, padding="valid", dataset="synthetic-membranes",
        synthetic_train=48, synthetic_val=4, synthetic_size=128, crop=68, flip=True,
        elastic=True, weight_map=True, w0=5.0, sigma=3.0, optimizer="adam", lr=3e-3,
        schedule="cosine", steps=6 if quick else 300, batch_size=4, val_every=0 if quick else 100,
        log_every=2 if quick else 10, device=device, out=os.path.join(out, "unet-membranes"))
    fcn = TrainConfig(
        model="fcn8s", width_mult=1 / 16, dataset="synthetic-shapes", synthetic_train=48,
        synthetic_val=4, synthetic_size=96, crop=96, flip=True, optimizer="adam", lr=2e-3,
        schedule="cosine", steps=6 if quick else 700, batch_size=4,
        val_every=0 if quick else 350, log_every=2 if quick else 10, device=device,
        out=os.path.join(out, "fcn8s-shapes"))
    return {"unet-membranes": unet, "fcn8s-shapes": fcn}


def time_training_steps(config: TrainConfig, *, repeats: int = 5, warmup: int = 2) -> dict:
    """Median training-step time of the fused and the eager network on one real batch, the same
    weights, loss and optimizer settings, interleaved (fused, eager, fused, ...) so that machine
    noise hits both alike."""
    from fastseg.engine.distributed import resolve_device

    device = resolve_device(config.device)
    train_set, _ = build.build_datasets(config)
    build.describe_data(config, train_set)
    batch = torch.utils.data.default_collate([train_set[i] for i in range(config.batch_size)])
    mean = torch.tensor(config.mean or [0.5] * config.in_channels, device=device).view(1, -1, 1, 1)
    std = torch.tensor(config.std or [0.25] * config.in_channels, device=device).view(1, -1, 1, 1)
    images = ((batch["image"].to(device) - mean) / std)
    masks = batch["mask"].to(device)
    weight = batch["weight"].to(device) if "weight" in batch else None
    runs = {}
    torch.manual_seed(config.seed)
    reference = build.build_model(config).state_dict()
    for fused in (True, False):
        variant = TrainConfig.from_dict({**config.to_dict(), "fused": fused})
        model = build.build_model(variant).to(device)
        model.load_state_dict(reference)
        runs[fused] = (model, build.build_loss(variant, None, device),
                       build.build_optimizer(variant, model))

    def step(fused: bool) -> float:
        model, loss_fn, optimizer = runs[fused]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(model(images), masks, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = {True: [], False: []}
    for i in range(warmup + repeats):
        for fused in (True, False):
            t = step(fused)
            if i >= warmup:
                times[fused].append(t)
    fused_ms = statistics.median(times[True]) * 1e3
    eager_ms = statistics.median(times[False]) * 1e3
    return {"model": config.model, "dataset": config.dataset, "batch": config.batch_size,
            "input": list(images.shape), "device": str(device), "fused_ms": fused_ms,
            "eager_ms": eager_ms, "speedup": eager_ms / fused_ms, "repeats": repeats}


def run_demo(out: str = "demo-out", *, device: str = "auto", quick: bool = False,
             progress: bool = True) -> dict:
    """Train both demo networks, print their metrics and the speed table; returns
    {"metrics": {run: metrics}, "speed": [rows]}."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    results, speed = {}, []
    for name, config in demo_configs(out, device, quick).items():
        print(f"\n== {name} ==")
        _clear_previous_demo(config)
        results[name] = train(config, progress=progress)
        speed.append(time_training_steps(config, repeats=2 if quick else 5))
    lines = ["| run | input (N, C, H, W) | device | fused step (ms) | eager step (ms) | speed-up |",
             "|---|---|---|---:|---:|---:|"]
    for name, row in zip(results, speed):
        lines.append(f"| {name} | {tuple(row['input'])} | {row['device']} | "
                     f"{row['fused_ms']:.1f} | {row['eager_ms']:.1f} | {row['speedup']:.2f}x |")
    table = "\n".join(lines)
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump(speed, f, indent=2)
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write("Training step (forward + loss + backward + optimizer), median of interleaved "
                "repeats, same weights and batch:\n\n" + table + "\n")
    print("\n== metrics (validation, full images) ==")
    for name, metrics in results.items():
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in
                          ("pixel_accuracy", "mean_iou", "rand_error") if k in metrics)
        print(f"{name}: {shown}")
    print("\n== fused vs eager ==\n" + table)
    print(f"\npictures, curves and checkpoints in {out}/ "
          f"({time.perf_counter() - start:.0f} s)")
    return {"metrics": results, "speed": speed}


def _clear_previous_demo(config: TrainConfig) -> None:
    """Rerunning the demo into the same folder starts over rather than refusing: the demo's own
    earlier checkpoints (only those, under its run folder) are removed."""
    for name in ("last.pt", "best.pt"):
        path = os.path.join(config.out, "checkpoints", name)
        if os.path.exists(path):
            os.remove(path)
