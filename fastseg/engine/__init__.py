"""Training, evaluation and inference for fastseg's networks (``fastseg train / eval / predict /
demo``).

    config.py       TrainConfig: every setting of a run (saved in each checkpoint)
    build.py        datasets, model, loss, optimizer and schedule from a TrainConfig
    train.py        the training loop (AMP, DDP, exact resume, progress bars, logs, pictures)
    checkpoint.py   atomic checkpoints read with weights_only=True
    distributed.py  torchrun process groups and the resumable, sharded sampler
    evaluate.py     metrics of a model on a dataset (whole images, overlap-tile)
    predict.py      inference on images of any size within a memory budget
    segment.py      image files -> mask / overlay / heat-map PNGs
    visualize.py    palettes, overlays, heat maps, panels, training curves
    demo.py         ``fastseg demo``
"""

from fastseg.engine.config import TrainConfig  # noqa: E402
from fastseg.engine.evaluate import evaluate, load_trained_model  # noqa: E402
from fastseg.engine.train import Trainer, train  # noqa: E402

__all__ = ["TrainConfig", "Trainer", "evaluate", "load_trained_model", "train"]
