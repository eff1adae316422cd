"""The training run's settings: one dataclass, saved in every checkpoint.

Everything a run needs to be rebuilt (the network, the data and its preprocessing, the
optimization) is a plain field here, so a checkpoint alone is enough for ``fastseg eval`` and
``fastseg predict``, and ``--resume`` can check that it continues the same network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "MODELS", "DATASETS", "OPTIMIZERS", "SCHEDULES", "AMP_MODES"]

MODELS = ("unet", "fcn8s", "fcn16s", "fcn32s")
DATASETS = ("synthetic-membranes", "synthetic-shapes", "isbi2012", "camvid", "folder")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    # --- the network -----------------------------------------------------------------------
    model: str = "unet"
    fused: bool = True                 # fastseg's fused modules and loss, or eager PyTorch
    base_channels: int = 64            # U-Net
    depth: int = 5                     # U-Net
    padding: str = "valid"             # U-Net: "valid" (the paper's) or "same"
    up_mode: str = "deconv"            # U-Net
    batch_norm: bool = False           # U-Net
    width_mult: float = 1.0            # FCN
    learnable_upsampling: bool = False  # FCN
    num_classes: int | None = None     # from the dataset when None
    in_channels: int | None = None     # from the dataset when None
    backend: str | None = None         # pin a fastseg backend (None: auto)

    # --- the data --------------------------------------------------------------------------
    dataset: str = "synthetic-membranes"
    data_root: str | None = None       # isbi2012 / camvid: the folder holding the preset layout
    train_images: str | None = None    # folder: image and mask directories
    train_masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    label_map: dict | None = None      # folder: {mask value: class id}
    ignore_index: int = 255
    synthetic_train: int = 64          # synthetic: number of train / val images and their size
    synthetic_val: int = 8
    synthetic_size: int = 128
    scale: float = 1.0                 # resize real images by this factor first (CPU runs)
    crop: int = 256                    # training crop (output pixels per side)
    flip: bool = True
    rotate: float = 0.0                # max rotation in degrees (0: none)
    elastic: bool = False              # the U-Net paper's elastic deformation
    jitter: float = 0.0                # brightness / contrast jitter
    weight_map: bool = False           # U-Net border weight map as the loss' pixel_weight
    w0: float = 10.0
    sigma: float = 5.0
    class_weights: str | list | None = None   # None, "auto" (median frequency) or a list
    mean: list | None = None           # per-channel normalization; measured on the data if None
    std: list | None = None

    # --- the optimization ------------------------------------------------------------------
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "poly"
    poly_power: float = 0.9
    epochs: int | None = None
    steps: int | None = None           # total steps; overrides epochs
    batch_size: int = 4
    workers: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    val_every: int = 0                 # steps between validations (0: at the end only)
    log_every: int = 10
    checkpoint_every: int = 0          # steps between checkpoints (0: at validations and the end)
    max_val_pixels: int | None = None  # predict's tile budget during validation
    seed: int = 0
    device: str = "auto"
    out: str = "runs/fastseg"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}")
        return cls(**values)

    def validate(self) -> "TrainConfig":
        """Check the choices and ranges; raise ValueError naming the setting."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("model", MODELS)
        choice("dataset", DATASETS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        for name in ("batch_size", "crop", "synthetic_train", "synthetic_val", "synthetic_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "log_every", "checkpoint_every", "workers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps is None and self.epochs is None:
            raise ValueError("give the length of the run: steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.dataset in ("isbi2012", "camvid") and not self.data_root:
            raise ValueError(f"dataset {self.dataset!r} needs data_root (the folder holding it)")
        if self.dataset == "folder" and not (self.train_images and self.train_masks):
            raise ValueError("dataset 'folder' needs train_images and train_masks")
        return self
