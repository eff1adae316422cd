"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only (so the safe
``weights_only=True`` loader reads it): the run's config (a dict of str / int / float / bool /
None / lists), the model's state dict, the optimizer's, the scheduler's, the grad scaler's, the
step and epoch, and the RNG states. ``save_checkpoint`` writes a temporary file beside the target,
flushes it to disk and renames it over the target, so a crash or a full disk mid-write leaves
the previous checkpoint intact and never a half-written one under the real name.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping

import torch

__all__ = ["FORMAT", "MODEL_KEYS", "save_checkpoint", "load_checkpoint", "check_compatible",
           "rng_state", "set_rng_state"]

FORMAT = "fastseg-checkpoint-1"
# Config entries that define the network: a checkpoint only loads into a run that agrees on
# all of them (anything else, e.g. the learning rate, may change on resume).
MODEL_KEYS = ("model", "num_classes", "in_channels", "base_channels", "depth", "padding",
              "up_mode", "batch_norm", "width_mult", "learnable_upsampling")


def save_checkpoint(path: str | os.PathLike, state: Mapping) -> None:
    """Write ``state`` (with ``"format"`` added) to ``path`` atomically: a temporary file in
    the same folder, fsync, then ``os.replace``. On any error the temporary file is removed
    and whatever was at ``path`` before is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = dict(state)
    payload["format"] = FORMAT
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is made durable by syncing the folder (where the OS allows it).
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a fastseg
    checkpoint (unreadable, truncated, or another format), naming the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path!r} cannot be read (truncated, corrupt, or not a "
                         f"torch.save file of plain tensors): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {path!r} is not a fastseg training checkpoint "
                         f"(format {found!r}, expected {FORMAT!r})")
    return state


def check_compatible(checkpoint_config: Mapping, config: Mapping, path: str = "checkpoint") -> None:
    """Raise ValueError when the network described by ``config`` differs from the checkpoint's
    in any of :data:`MODEL_KEYS`, listing every difference."""
    diffs = [f"{key}: checkpoint {checkpoint_config.get(key)!r}, this run {config.get(key)!r}"
             for key in MODEL_KEYS if checkpoint_config.get(key) != config.get(key)]
    if diffs:
        raise ValueError(f"{path} was trained for another model and cannot be loaded here: "
                         + "; ".join(diffs))


def rng_state() -> dict:
    """The RNG states a training step consumes (dropout: torch's CPU and CUDA generators;
    Python's ``random`` for completeness). Data augmentation does not use them: datasets seed
    their own generators from (seed, epoch, index)."""
    state = {"torch": torch.get_rng_state(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
