"""Segmentation metrics: the FCN paper's confusion-matrix scores and the ISBI 2012 Rand error.

``ConfusionMatrix`` accumulates a K x K pixel count matrix on the device of the predictions
and computes pixel accuracy, mean accuracy, mean IU and frequency-weighted IU as defined by
Long et al., "Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015, sec. 5).

``rand_error`` / ``RandError`` score binary membrane maps with the foreground-restricted Rand
F-score of the ISBI 2012 challenge (Arganda-Carreras et al., "Crowdsourcing the creation of
image segmentation algorithms for connectomics", Front. Neuroanat. 2015).

Both accumulators work under ``torch.distributed``: ``update`` never communicates and
``compute`` all-reduces (SUM) the accumulated counts when a process group is initialized, so
``compute`` is a collective call that every rank must make.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "rand_error", "RandError"]

_NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_int(op: str, name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_ignore(op: str, value) -> int | None:
    return None if value is None else _check_int(op, "ignore_index", value)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    """Integer class ids (bool counts as 0/1)."""
    return not dtype.is_floating_point and not dtype.is_complex


def _predictions(op: str, logits_or_preds, target, num_classes: int | None = None,
                 min_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, target) as int64 tensors of the same shape, (N, H, W) or (H, W).

    logits (N, C, H, W) floating are reduced by argmax over C (C must equal num_classes when it
    is given, and exceed min_channels - 1 when that is given); integer predictions are taken
    as they are.
    """
    for name, value in (("logits_or_preds", logits_or_preds), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    if not _is_integer_dtype(target.dtype):
        raise TypeError(f"{op}: target must hold integer class ids, got dtype {target.dtype}")
    if logits_or_preds.device != target.device:
        raise ValueError(f"{op}: logits_or_preds is on {logits_or_preds.device} but target is "
                         f"on {target.device}")
    x = logits_or_preds
    if x.dtype.is_floating_point:
        if x.dim() != 4:
            raise ValueError(f"{op}: floating-point logits_or_preds must be logits of shape "
                             f"(N, C, H, W), got shape {tuple(x.shape)}; pass integer class "
                             "ids for predictions")
        channels = x.shape[1]
        if num_classes is not None and channels != num_classes:
            raise ValueError(f"{op}: logits have {channels} channels (shape {tuple(x.shape)}) "
                             f"but num_classes is {num_classes}")
        if min_channels is not None and channels < min_channels:
            raise ValueError(f"{op}: logits have {channels} channels (shape {tuple(x.shape)}); "
                             f"at least {min_channels} are needed for foreground class "
                             f"{min_channels - 1}")
        preds = x.argmax(dim=1)
    elif _is_integer_dtype(x.dtype):
        if x.dim() not in (2, 3):
            raise ValueError(f"{op}: integer logits_or_preds must be predictions of shape "
                             f"(N, H, W) or (H, W), got shape {tuple(x.shape)}")
        preds = x
    else:
        raise TypeError(f"{op}: logits_or_preds must be floating logits or integer class ids, "
                        f"got dtype {x.dtype}")
    if preds.shape != target.shape:
        source = f" (argmax of logits of shape {tuple(x.shape)})" if preds is not x else ""
        raise ValueError(f"{op}: target shape {tuple(target.shape)} does not match the "
                         f"predictions' shape {tuple(preds.shape)}{source}")
    return preds.long(), target.long()


def _some_values(values: torch.Tensor, limit: int = 10) -> str:
    """A short listing of the distinct values (error messages only)."""
    distinct = torch.unique(values).tolist()
    shown = ", ".join(str(v) for v in distinct[:limit])
    return shown + (f", ... ({len(distinct)} distinct)" if len(distinct) > limit else "")


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of tensor summed over all processes when torch.distributed is initialized (a
    collective: every rank must call it); a plain copy otherwise."""
    out = tensor.clone()
    if not (dist.is_available() and dist.is_initialized()):
        return out
    if dist.get_backend() == "nccl" and out.device.type != "cuda":
        # NCCL only reduces CUDA tensors: go through this rank's current GPU.
        on_gpu = out.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return on_gpu.to(out.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (no warning printed)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (and no warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else _NAN


# ---------------------------------------------------------------------------------------------
# confusion matrix


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` classes and the FCN paper's scores.

    ``matrix[i, j]`` counts the pixels of true class i predicted as class j (``n_ij`` in
    Long et al. 2015, sec. 5). Pixels whose target equals ``ignore_index`` (None: ignore
    nothing) are not counted.

    The matrix lives on ``device``; with ``device=None`` it is created on the device of the
    first ``update`` (and again after ``reset``). Updates on another device raise ValueError.

    Distributed: ``update`` never communicates. When ``torch.distributed`` is initialized,
    ``compute`` (and ``table``) sum a copy of the matrix over all processes first, so every rank
    must call them (a collective, like ``all_reduce``); each rank then gets the global scores.
    With NCCL the matrix is reduced on the current CUDA device.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, *,
                 device: torch.device | str | None = None) -> None:
        self.num_classes = _check_int("ConfusionMatrix", "num_classes", num_classes, 1)
        self.ignore_index = _check_ignore("ConfusionMatrix", ignore_index)
        self._fixed_device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        k = self.num_classes
        self._matrix = torch.zeros(k, k, dtype=torch.int64, device=self._fixed_device or "cpu")
        self._placed = self._fixed_device is not None

    @property
    def matrix(self) -> torch.Tensor:
        """A copy of the K x K int64 matrix [true, pred] (this process's counts only)."""
        return self._matrix.clone()

    @property
    def device(self) -> torch.device:
        return self._matrix.device

    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        logits_or_preds: logits (N, C, H, W) floating with C == num_classes (argmax over C),
        or integer predictions (N, H, W) / (H, W) in [0, num_classes).
        target: integer class ids of the predictions' shape; values in [0, num_classes) or
        ignore_index.

        Counting is one scatter-add of ``target * K + pred`` on the inputs' device. The range
        check of the inputs is one reduction read back to the host (the only sync).
        """
        op = "ConfusionMatrix.update"
        k = self.num_classes
        preds, target = _predictions(op, logits_or_preds, target, num_classes=k)
        if not self._placed:
            self._matrix = self._matrix.to(target.device)
            self._placed = True
        if target.device != self._matrix.device:
            raise ValueError(f"{op}: inputs are on {target.device} but the matrix is on "
                             f"{self._matrix.device}")

        if self.ignore_index is None:
            ignored = torch.zeros_like(target, dtype=torch.bool)
        else:
            ignored = target == self.ignore_index
        bad_target = ~ignored & ((target < 0) | (target >= k))
        bad = bad_target
        if not logits_or_preds.dtype.is_floating_point:  # argmax of logits is always in range
            bad = bad | (preds < 0) | (preds >= k)
        if bool(bad.any()):
            self._raise_out_of_range(op, preds, target, bad_target)

        # Ignored pixels go to one extra bin (K*K) that is dropped: no boolean indexing, whose
        # data-dependent size would sync with the host.
        index = torch.where(ignored, k * k, target * k + preds).reshape(-1)
        counts = torch.zeros(k * k + 1, dtype=torch.int64, device=target.device)
        counts.index_add_(0, index, torch.ones((), dtype=torch.int64,
                                               device=target.device).expand(index.numel()))
        self._matrix += counts[: k * k].view(k, k)

    def _raise_out_of_range(self, op, preds, target, bad_target) -> None:
        k = self.num_classes
        ignore = "" if self.ignore_index is None else f" or ignore_index ({self.ignore_index})"
        if bool(bad_target.any()):
            raise ValueError(f"{op}: target has values outside [0, {k}){ignore}: "
                             f"{_some_values(target[bad_target])}")
        wrong = (preds < 0) | (preds >= k)
        raise ValueError(f"{op}: logits_or_preds has predicted class ids outside [0, {k}): "
                         f"{_some_values(preds[wrong])}")

    def compute(self) -> dict:
        """The scores of the counts so far (summed over processes under torch.distributed).

        With n_ij the pixels of class i predicted j, t_i = sum_j n_ij and k classes:
          pixel_accuracy  = sum_i n_ii / sum_i t_i
          mean_accuracy   = (1/k) sum_i n_ii / t_i
          mean_iou        = (1/k) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
          fw_iou          = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
          per_class_iou, per_class_accuracy: the K terms (lists of floats)
          pixel_error     = 1 - pixel_accuracy (only when num_classes == 2)
        A class absent from both truth and prediction has IoU NaN; a class absent from the
        truth has accuracy NaN; the means leave NaN terms out (k counts the rest). With no
        pixels counted every value is NaN.
        """
        return self._scores(_all_reduce_sum(self._matrix).cpu().numpy())

    def _scores(self, counts: np.ndarray) -> dict:
        """compute()'s dict for a K x K count matrix."""
        n = counts.astype(np.float64)
        diagonal = np.diag(n)
        true_total = n.sum(axis=1)   # t_i
        pred_total = n.sum(axis=0)   # sum_j n_ji
        total = true_total.sum()
        accuracy = _ratio(diagonal, true_total)
        iou = _ratio(diagonal, true_total + pred_total - diagonal)
        # Classes with t_i == 0 add nothing to the frequency-weighted sum (their IoU may be
        # NaN or 0), so they are left out rather than turning the sum into NaN.
        present = true_total > 0
        fw_iou = _ratio((true_total[present] * iou[present]).sum(), total)
        pixel_accuracy = _ratio(diagonal.sum(), total)
        scores = {
            "pixel_accuracy": float(pixel_accuracy),
            "mean_accuracy": _nanmean(accuracy),
            "mean_iou": _nanmean(iou),
            "fw_iou": float(fw_iou),
            "per_class_iou": [float(v) for v in iou],
            "per_class_accuracy": [float(v) for v in accuracy],
        }
        if self.num_classes == 2:
            scores["pixel_error"] = float(1.0 - pixel_accuracy)
        return scores

    def table(self, class_names=None) -> str:
        """A fixed-width text table: per class pixels (truth), IoU and accuracy, then the
        summary scores. NaN prints as "-". A collective under torch.distributed, like
        compute."""
        k = self.num_classes
        if class_names is None:
            names = [str(i) for i in range(k)]
        else:
            names = [str(name) for name in class_names]
            if len(names) != k:
                raise ValueError(f"ConfusionMatrix.table: class_names has {len(names)} names "
                                 f"but num_classes is {k}")
        counts = _all_reduce_sum(self._matrix).cpu().numpy()
        scores = self._scores(counts)
        pixels = counts.sum(axis=1).tolist()

        def fmt(value: float) -> str:
            return "-" if math.isnan(value) else f"{value:.4f}"

        summary = [("pixel accuracy", scores["pixel_accuracy"]),
                   ("mean accuracy", scores["mean_accuracy"]),
                   ("mean IoU", scores["mean_iou"]),
                   ("f.w. IoU", scores["fw_iou"])]
        if "pixel_error" in scores:
            summary.append(("pixel error", scores["pixel_error"]))
        width = max(len("class"), max(len(n) for n in names), max(len(s) for s, _ in summary))
        count_width = max(len("pixels"), len(str(max(pixels))))
        header = f"{'class':<{width}}  {'pixels':>{count_width}}  {'IoU':>8}  {'accuracy':>8}"
        lines = [header, "-" * len(header)]
        for name, count, iou, acc in zip(names, pixels, scores["per_class_iou"],
                                         scores["per_class_accuracy"]):
            lines.append(f"{name:<{width}}  {count:>{count_width}}  {fmt(iou):>8}  "
                         f"{fmt(acc):>8}")
        lines.append("-" * len(header))
        # Summary values sit at the table's right edge, below the per-class rule.
        value_width = len(header) - width - 2
        lines.extend(f"{label:<{width}}  {fmt(value):>{value_width}}" for label, value in summary)
        return "\n".join(lines)

    def state_dict(self) -> dict:
        """The counts (on CPU) and the settings they were counted with."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self._matrix.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore counts saved by state_dict (num_classes and ignore_index must match)."""
        op = "ConfusionMatrix.load_state_dict"
        for key in ("num_classes", "ignore_index", "matrix"):
            if key not in state:
                raise ValueError(f"{op}: state has no {key!r} entry")
        if state["num_classes"] != self.num_classes or state["ignore_index"] != self.ignore_index:
            raise ValueError(f"{op}: state was counted with num_classes={state['num_classes']}, "
                             f"ignore_index={state['ignore_index']} but this matrix has "
                             f"num_classes={self.num_classes}, ignore_index={self.ignore_index}")
        matrix = state["matrix"]
        k = self.num_classes
        if (not isinstance(matrix, torch.Tensor) or matrix.dtype != torch.int64
                or matrix.shape != (k, k)):
            raise ValueError(f"{op}: matrix must be an int64 tensor of shape ({k}, {k}), got "
                             f"{getattr(matrix, 'dtype', type(matrix).__name__)} "
                             f"{tuple(getattr(matrix, 'shape', ()))}")
        if bool((matrix < 0).any()):
            raise ValueError(f"{op}: matrix has negative counts")
        self._matrix = matrix.to(self._matrix.device, copy=True)

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}, device={self.device})")


# ---------------------------------------------------------------------------------------------
# Rand error (ISBI 2012)


def _as_label_map(op: str, name: str, value) -> np.ndarray:
    """A 2-D integer numpy array from a tensor or an array."""
    if isinstance(value, torch.Tensor):
        if not _is_integer_dtype(value.dtype):
            raise TypeError(f"{op}: {name} must hold integer class ids, got dtype {value.dtype}")
        value = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
            raise TypeError(f"{op}: {name} must hold integer class ids, got dtype {value.dtype}")
    else:
        raise TypeError(f"{op}: {name} must be a Tensor or a numpy array, "
                        f"got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{op}: {name} must be a 2-D map (H, W), got shape {value.shape}")
    return value


def _rand_error_of_segments(true_segments: np.ndarray, pred_segments: np.ndarray) -> float:
    """1 - V_rand for segment id maps of one shape.

    true_segments: > 0 for the scored pixels (their truth segment), 0 elsewhere.
    pred_segments: > 0 for a predicted segment, 0 for pixels that each form their own
    singleton segment.
    Returns NaN when no pixel is scored.
    """
    scored = true_segments > 0
    truth = true_segments[scored].astype(np.int64)
    pred = pred_segments[scored].astype(np.int64)
    if truth.size == 0:
        return _NAN
    in_segment = pred > 0
    singletons = int(np.count_nonzero(~in_segment))  # each adds 1 to sum n_ij^2 and sum s_j^2
    t = np.unique(truth, return_counts=True)[1]
    s = np.unique(pred[in_segment], return_counts=True)[1]
    pairs = truth[in_segment] * (int(pred.max()) + 1) + pred[in_segment]
    n = np.unique(pairs, return_counts=True)[1]
    sum_n2 = float((n * n).sum() + singletons)
    precision = sum_n2 / float((s * s).sum() + singletons)
    recall = sum_n2 / float((t * t).sum())
    return 1.0 - 2.0 * precision * recall / (precision + recall)


def rand_error(pred, target, *, foreground: int = 1, ignore_index: int | None = 255) -> float:
    """The ISBI 2012 foreground-restricted Rand error of one 2-D binary map pair.

    pred, target: 2-D (H, W) integer maps (tensors or numpy arrays). A pixel is foreground
    (cell interior) where its value equals ``foreground``; every other value is background
    (membrane), except target pixels equal to ``ignore_index`` (None: none), which are not
    scored.

    Definition (Arganda-Carreras et al. 2015, the ISBI 2012 challenge's V_rand):
      - segments are the 4-connected components of the foreground, in the truth and in the
        prediction separately (``scipy.ndimage.label``);
      - only the pixels that are foreground in the truth are scored;
      - a scored pixel predicted as background is a segment of its own (it is merged with
        nothing);
      - n_ij = scored pixels in truth segment i and predicted segment j,
        t_i = sum_j n_ij, s_j = sum_i n_ij;
      - precision = sum_ij n_ij^2 / sum_j s_j^2, recall = sum_ij n_ij^2 / sum_i t_i^2,
        V_rand = 2 * precision * recall / (precision + recall);
      - rand error = 1 - V_rand, in [0, 1); 0 for a perfect prediction. Splitting a cell lowers
        recall, merging cells lowers precision.
    Returns NaN when the truth has no (non-ignored) foreground pixel.
    """
    op = "rand_error"
    foreground = _check_int(op, "foreground", foreground)
    ignore_index = _check_ignore(op, ignore_index)
    if foreground == ignore_index:
        raise ValueError(f"{op}: foreground and ignore_index are both {foreground}")
    pred = _as_label_map(op, "pred", pred)
    target = _as_label_map(op, "target", target)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred shape {pred.shape} does not match target shape "
                         f"{target.shape}")
    try:
        from scipy import ndimage
    except ImportError as error:  # pragma: no cover - scipy is a declared dependency
        raise ImportError("rand_error needs scipy (pip install scipy)") from error
    four_connected = ndimage.generate_binary_structure(2, 1)
    # Ignored target pixels are not foreground, so they belong to no truth segment.
    true_segments = ndimage.label(target == foreground, structure=four_connected)[0]
    pred_segments = ndimage.label(pred == foreground, structure=four_connected)[0]
    return _rand_error_of_segments(true_segments, pred_segments)


class RandError:
    """Mean ISBI 2012 Rand error (see ``rand_error``) over the images seen by ``update``.

    Images whose truth has no foreground pixel have no Rand error and are not counted.
    Under torch.distributed ``compute`` sums the per-process error sums and image counts
    over all processes (a collective: every rank must call it); ``update`` never
    communicates. Scoring runs on the host (connected components), so ``update`` copies the
    predictions and targets to the CPU.
    """

    def __init__(self, foreground: int = 1, ignore_index: int | None = 255) -> None:
        op = "RandError"
        self.foreground = _check_int(op, "foreground", foreground)
        self.ignore_index = _check_ignore(op, ignore_index)
        if self.foreground == self.ignore_index:
            raise ValueError(f"{op}: foreground and ignore_index are both {self.foreground}")
        self.reset()

    def reset(self) -> None:
        """Forget all images."""
        self._sum = 0.0
        self._count = 0

    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> list[float]:
        """Score a batch: logits (N, C, H, W) floating (argmax over C, C > foreground) or
        integer predictions (N, H, W) / (H, W); target of the predictions' shape. Returns the
        per-image errors (NaN for an image without truth foreground)."""
        preds, target = _predictions("RandError.update", logits_or_preds, target,
                                     min_channels=self.foreground + 1)
        if preds.dim() == 2:
            preds, target = preds[None], target[None]
        errors = []
        for pred_map, target_map in zip(preds.cpu().numpy(), target.cpu().numpy()):
            error = rand_error(pred_map, target_map, foreground=self.foreground,
                               ignore_index=self.ignore_index)
            errors.append(error)
            if not math.isnan(error):
                self._sum += error
                self._count += 1
        return errors

    def compute(self) -> float:
        """The mean error over the counted images of all processes; NaN when there are none."""
        totals = _all_reduce_sum(torch.tensor([self._sum, float(self._count)],
                                              dtype=torch.float64))
        error_sum, count = totals.tolist()
        return error_sum / count if count > 0 else _NAN

    def __repr__(self) -> str:
        return f"RandError(foreground={self.foreground}, ignore_index={self.ignore_index})"
