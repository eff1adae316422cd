"""The training loop behind ``fastseg train``.

One call, :func:`train`, runs a whole (or resumed) run from a :class:`TrainConfig`:

    out/
      config.json           the run's settings (also inside every checkpoint)
      metrics.jsonl         one JSON record per logged train interval / validation
      checkpoints/last.pt   the latest state (atomic), best.pt the best validation mean IU
      curves.png            training curves, drawn at the end
      pictures/*.png        input | truth | prediction for the first validation images

Exact resume: the data order comes from (seed, epoch) and each sample's augmentation from
(seed, epoch, index); the model, optimizer, schedule, grad scaler, step and the RNG states
(dropout) are in the checkpoint. A run resumed from step k therefore takes the same batches and
the same random draws as the uninterrupted run from step k on, and on the same machine and
thread count its losses are equal.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from fastseg.engine import build
from fastseg.engine import distributed as dist_utils
from fastseg.engine.checkpoint import (check_compatible, load_checkpoint, rng_state,
                                       save_checkpoint, set_rng_state)
from fastseg.engine.config import TrainConfig
from fastseg.engine.evaluate import evaluate

__all__ = ["train", "Trainer"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)           # DistributedDataParallel
    return getattr(model, "_orig_mod", model)         # torch.compile


class Trainer:
    """A run's state; :func:`train` is the usual entry point. ``progress`` turns the progress
    bars on; ``log`` receives the human-readable lines (print by default, rank 0 only)."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None, progress: bool = True,
                 log=print) -> None:
        self.config = config.validate()
        self.ctx = dist_utils.setup(config.device)
        self.progress = progress and self.ctx.is_main
        self._log = log
        self.out = config.out
        self.checkpoint_dir = os.path.join(self.out, "checkpoints")
        self.last_path = os.path.join(self.checkpoint_dir, "last.pt")
        resume_state = self._resume_state(resume)

        torch.manual_seed(config.seed)   # same initial weights on every rank
        self.train_set, self.val_set = build.build_datasets(config)
        build.describe_data(config, self.train_set)
        if resume_state is not None:
            check_compatible(resume_state["config"], config.to_dict(), resume)
            # The interrupted run's normalization, not one measured again.
            config.mean, config.std = resume_state["config"]["mean"], resume_state["config"]["std"]
        else:
            config.mean, config.std = build.normalization(config, self.train_set)
        if len(config.mean) != config.in_channels:
            raise ValueError(f"mean/std have {len(config.mean)} values but the images have "
                             f"{config.in_channels} channels")
        self.class_weights = build.class_weights(config, self.train_set)

        device = self.ctx.device
        self.model = build.build_model(config).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = build.build_loss(config, self.class_weights, device)
        self.sampler = dist_utils.EpochSampler(
            len(self.train_set), batch_size=config.batch_size, shuffle=True, seed=config.seed,
            rank=self.ctx.rank, world_size=self.ctx.world_size, drop_last=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.optimizer = build.build_optimizer(config, self.model)
        self.scheduler = build.build_schedule(config, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.step = 0
        self.best_miou = -math.inf
        if resume_state is not None:
            self._load(resume_state)
        self.train_model = self.model
        if self.ctx.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.mean = torch.tensor(config.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(config.std, device=device).view(1, -1, 1, 1)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if self.ctx.is_main:
            self._prepare_out(resume_state)
        self.ctx.barrier()

    # --- files -------------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if self.ctx.is_main and self._log is not None:
            self._log(line)

    def _resume_state(self, resume: str | None):
        if resume is None:
            if os.path.exists(self.last_path):
                # Never overwrite a run by accident.
                raise ValueError(f"{self.out!r} already holds a run ({self.last_path}); resume it "
                                 f"with --resume {self.last_path} or choose another --out")
            return None
        if resume == "auto":
            resume = self.last_path
        return load_checkpoint(resume, map_location="cpu")

    def _prepare_out(self, resume_state) -> None:
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        if resume_state is not None and os.path.exists(self.metrics_path):
            # Drop records written after the checkpoint (the interrupted run's tail): the resumed
            # run writes them again.
            with open(self.metrics_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            kept = [r for r in records if r.get("step", 0) <= self.step]
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.metrics_path)
        elif resume_state is None:
            open(self.metrics_path, "w").close()

    def _record(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _state(self) -> dict:
        return {"config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.step // self.steps_per_epoch,
                "best_miou": self.best_miou, "rng": rng_state(),
                "world_size": self.ctx.world_size}

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        set_rng_state(state["rng"])
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            warnings.warn(f"resuming a run of {state.get('world_size')} processes with "
                          f"{self.ctx.world_size}: training continues, but the data shards and "
                          f"batches differ from the interrupted run's (not an exact resume)",
                          UserWarning, stacklevel=2)
        if self.step >= self.total_steps:
            raise ValueError(f"the checkpoint is at step {self.step}, the run has "
                             f"{self.total_steps} steps: nothing left to train (raise steps / "
                             f"epochs to continue it)")

    def save(self, name: str = "last.pt") -> str:
        path = os.path.join(self.checkpoint_dir, name)
        if self.ctx.is_main:
            save_checkpoint(path, self._state())
        self.ctx.barrier()
        return path

    # --- steps -------------------------------------------------------------------------------

    def _autocast(self):
        if self.config.amp == "none":
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=_AMP_DTYPES[self.config.amp])

    def train_step(self, batch: dict) -> torch.Tensor:
        device = self.ctx.device
        images = batch["image"].to(device, non_blocking=True)
        images = (images - self.mean) / self.std
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks = batch["mask"].to(device, non_blocking=True)
        weight = batch.get("weight")
        if weight is not None:
            weight = weight.to(device, non_blocking=True)
        with self._autocast():
            logits = self.train_model(images)
        if logits.shape[-2:] != masks.shape[-2:]:
            raise RuntimeError(f"the network gave {tuple(logits.shape[-2:])} scores for masks of "
                               f"{tuple(masks.shape[-2:])}: the crop / context settings disagree")
        loss = self.criterion(logits, masks, weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # fp16: the scaler skips a step whose gradients overflowed (and lowers its scale);
        # the schedule advances with the optimizer's real steps only.
        if scale is None or self.scaler.get_scale() >= scale:
            self.scheduler.step()
        return loss.detach()

    def validate(self) -> dict:
        metrics = evaluate(self.model, self.val_set, num_classes=self.config.num_classes,
                           ignore_index=self.config.ignore_index, mean=self.config.mean,
                           std=self.config.std, ctx=self.ctx,
                           max_pixels=self.config.max_val_pixels, amp=self.config.amp,
                           progress=self.progress)
        record = {"kind": "val", "step": self.step}
        record.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
        record["per_class_iou"] = metrics["per_class_iou"]
        self._record(record)
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in
                            ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "rand_error")
                            if k in metrics)
        self.log(f"step {self.step}: validation {summary}")
        miou = metrics["mean_iou"]
        if miou == miou and miou > self.best_miou:   # NaN never counts as best
            self.best_miou = miou
            self.save("best.pt")
        return metrics

    def _loader(self, epoch: int, start_batch: int):
        self.sampler.set_epoch(epoch, start_batch)
        self.train_set.set_epoch(epoch)
        # A generator of its own: the loader must not draw from the global RNG (that would
        # shift dropout's draws and break exact resume).
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.config.batch_size, sampler=self.sampler,
            num_workers=self.config.workers, drop_last=True, generator=generator,
            pin_memory=self.ctx.device.type == "cuda")

    def run(self) -> dict:
        """Train to ``total_steps``; returns the last validation's metrics (or {})."""
        config, start = self.config, self.step
        self.log(f"training {config.model} ({'fused' if config.fused else 'eager'}) on "
                 f"{config.dataset}: {len(self.train_set)} images, {self.total_steps} steps of "
                 f"{config.batch_size} x {self.ctx.world_size} on {self.ctx.device}"
                 + (f", resuming at step {start}" if start else ""))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step",
                       dynamic_ncols=True)
        self.model.train()
        metrics: dict = {}
        interval_loss, interval_steps = None, 0
        interval_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                for batch in self._loader(epoch, start_batch):
                    loss = self.train_step(batch)
                    self.step += 1
                    interval_loss = loss if interval_loss is None else interval_loss + loss
                    interval_steps += 1
                    last = self.step == self.total_steps
                    if interval_steps == config.log_every or last:
                        mean_loss = float(interval_loss) / interval_steps   # one sync per log
                        if self.ctx.distributed:
                            t = torch.tensor([mean_loss], device=self.ctx.device)
                            torch.distributed.all_reduce(t)
                            mean_loss = float(t) / self.ctx.world_size
                        seconds = time.perf_counter() - interval_start
                        images_per_s = (interval_steps * config.batch_size * self.ctx.world_size
                                        / max(seconds, 1e-9))
                        self._record({"kind": "train", "step": self.step, "epoch": epoch,
                                      "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                                      "images_per_s": images_per_s})
                        if not math.isfinite(mean_loss):
                            raise FloatingPointError(f"the loss became {mean_loss} at step "
                                                     f"{self.step}; last checkpoint kept")
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.1f}")
                        interval_loss, interval_steps = None, 0
                        interval_start = time.perf_counter()
                    if bar is not None:
                        bar.update()
                    validate = self.val_set is not None and (
                        last or (config.val_every and self.step % config.val_every == 0))
                    if validate:
                        metrics = self.validate()
                    if validate or last or (config.checkpoint_every
                                            and self.step % config.checkpoint_every == 0):
                        self.save()
                    if last:
                        break
        finally:
            if bar is not None:
                bar.close()
        if self.ctx.is_main:
            self._pictures()
            self._curves()
        return metrics

    # --- pictures ----------------------------------------------------------------------------

    def _curves(self) -> None:
        from fastseg.engine.visualize import plot_curves

        with open(self.metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        train_records = [r for r in records if r.get("kind") == "train"]
        val_records = [r for r in records if r.get("kind") == "val"]
        plot_curves(train_records + val_records, os.path.join(self.out, "curves.png"),
                    keys=("loss", "mean_iou", "pixel_accuracy"),
                    title=f"{self.config.model} on {self.config.dataset}")

    def _pictures(self, count: int = 4) -> None:
        if self.val_set is None:
            return
        save_prediction_panels(self.model, self.val_set, self.config,
                               os.path.join(self.out, "pictures"), count=count)


def save_prediction_panels(model, dataset, config: TrainConfig, folder: str, count: int = 4):
    """input | truth | prediction pictures for the first ``count`` images of ``dataset``."""
    from fastseg.engine.predict import predict_logits
    from fastseg.engine.visualize import colorize, palette, panel, save_png, to_rgb

    colours = palette(config.num_classes)
    device = next(model.parameters()).device
    paths = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        logits = predict_logits(model, sample["image"], mean=config.mean, std=config.std,
                                max_pixels=config.max_val_pixels, device=device)
        prediction = logits.argmax(0).cpu()
        picture = panel([to_rgb(sample["image"]),
                         colorize(sample["mask"], colours, ignore_index=config.ignore_index),
                         colorize(prediction, colours)], ["input", "truth", "prediction"])
        path = os.path.join(folder, f"{sample['name']}.png")
        save_png(picture, path)
        paths.append(path)
    return paths


def train(config: TrainConfig, *, resume: str | None = None, progress: bool = True,
          log=print) -> dict:
    """Run (or resume, from a checkpoint path or "auto" = ``out/checkpoints/last.pt``) a training
    run; returns the final validation metrics."""
    trainer = Trainer(config, resume=resume, progress=progress, log=log)
    try:
        return trainer.run()
    finally:
        dist_utils.teardown(trainer.ctx)
