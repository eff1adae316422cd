"""fastseg.metrics: ConfusionMatrix against a numpy reference of the FCN paper's formulas, the
ISBI 2012 Rand error against brute-force pair counting, and both under a 2-process gloo group."""

import math
import os
import warnings
from collections import deque

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import SHARED_DATA, devices
from fastseg.metrics import ConfusionMatrix, RandError, _rand_error_of_segments, rand_error

pytest.importorskip("scipy")


# ---------------------------------------------------------------------------------------------
# numpy reference for the confusion matrix scores (Long et al. 2015, sec. 5)


def reference_matrix(pred, target, k, ignore_index):
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel().astype(np.int64)
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (target[keep], pred[keep]), 1)
    return matrix


def reference_scores(matrix):
    """The paper's formulas, one class at a time in plain Python."""
    k = matrix.shape[0]
    total = int(matrix.sum())
    acc, iou = [], []
    for i in range(k):
        n_ii, t_i, predicted_i = int(matrix[i, i]), int(matrix[i].sum()), int(matrix[:, i].sum())
        acc.append(n_ii / t_i if t_i else math.nan)
        union = t_i + predicted_i - n_ii
        iou.append(n_ii / union if union else math.nan)

    def mean(values):
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    fw = (sum(int(matrix[i].sum()) * iou[i] for i in range(k) if matrix[i].sum() > 0) / total
          if total else math.nan)
    out = {"pixel_accuracy": np.trace(matrix) / total if total else math.nan,
           "mean_accuracy": mean(acc), "mean_iou": mean(iou), "fw_iou": fw,
           "per_class_iou": iou, "per_class_accuracy": acc}
    if k == 2:
        out["pixel_error"] = 1 - out["pixel_accuracy"]
    return out


def assert_scores_equal(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[key], dtype=float), np.asarray(value, float),
                                   rtol=1e-12, atol=1e-12, err_msg=key)  # NaN == NaN here


def random_batch(k, shape, generator, ignore_index=255, ignore_fraction=0.1, hit=0.6):
    """(pred, target) int64: pred equals target for about `hit` of the pixels (so scores are
    not all near chance); about `ignore_fraction` of the targets are ignore_index."""
    target = torch.randint(0, k, shape, generator=generator)
    noise = torch.randint(0, k, shape, generator=generator)
    pred = torch.where(torch.rand(shape, generator=generator) < hit, target, noise)
    ignored = torch.rand(shape, generator=generator) < ignore_fraction
    return pred, target.masked_fill(ignored, ignore_index)


# ---------------------------------------------------------------------------------------------
# ConfusionMatrix


@pytest.mark.parametrize("k", [2, 5, 21])
@pytest.mark.parametrize("form", ["logits", "preds"])
def test_confusion_matches_numpy_reference(k, form):
    g = torch.Generator().manual_seed(k)
    pred, target = random_batch(k, (3, 7, 9), g)
    # uint8 targets as read from annotation PNGs: target * K must not wrap around in uint8.
    target = target.to(torch.uint8)
    cm = ConfusionMatrix(k)
    if form == "logits":
        logits = torch.randn(3, k, 7, 9, generator=g, dtype=torch.float64)
        logits += 4.0 * torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2)
        cm.update(logits.float(), target)
        pred = logits.float().numpy().argmax(axis=1)  # numpy's argmax, not torch's
    else:
        cm.update(pred, target)
    expected = reference_matrix(pred, target.numpy(), k, 255)
    assert cm.matrix.dtype == torch.int64
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    assert expected.sum() == int((target != 255).sum())
    assert_scores_equal(cm.compute(), reference_scores(expected))


def test_confusion_updates_accumulate_like_one_call():
    k = 5
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(k, (n, 6, 8), g) for n in (1, 3, 2)]
    single_map = random_batch(k, (6, 8), g)  # an (H, W) pair counts as a batch of one
    many = ConfusionMatrix(k)
    for pred, target in batches + [single_map]:
        many.update(pred, target)
    once = ConfusionMatrix(k)
    once.update(torch.cat([p for p, _ in batches] + [single_map[0][None]]),
                torch.cat([t for _, t in batches] + [single_map[1][None]]))
    assert torch.equal(many.matrix, once.matrix)
    assert int(once.matrix.sum()) == sum(int((t != 255).sum()) for _, t in batches + [single_map])
    assert_scores_equal(many.compute(), once.compute())


def test_confusion_relabelling_permutes_per_class_scores():
    k = 6
    g = torch.Generator().manual_seed(2)
    pred, target = random_batch(k, (2, 9, 9), g, ignore_index=-1)
    perm = torch.randperm(k, generator=g)
    relabel = lambda x: torch.where(x >= 0, perm[x.clamp(min=0)], x)  # noqa: E731
    a, b = ConfusionMatrix(k, ignore_index=-1), ConfusionMatrix(k, ignore_index=-1)
    a.update(pred, target)
    b.update(relabel(pred), relabel(target))
    sa, sb = a.compute(), b.compute()
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-12)
    for key in ("per_class_iou", "per_class_accuracy"):
        np.testing.assert_allclose(np.asarray(sb[key])[perm.numpy()], sa[key], rtol=1e-12)


def test_confusion_nan_rules_hand_built():
    # K = 4: truth has classes 0 and 1 only; class 2 is predicted (IoU 0, accuracy NaN);
    # class 3 is neither in truth nor prediction (IoU NaN, accuracy NaN).
    target = torch.tensor([[0, 0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 0, 2, 1, 0, 3]])  # the 3 sits on an ignored pixel
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    s = cm.compute()
    # n_00 = 2, n_02 = 1, n_11 = 1, n_10 = 1
    assert s["per_class_accuracy"][:2] == [2 / 3, 1 / 2]
    assert all(math.isnan(v) for v in s["per_class_accuracy"][2:])
    assert s["per_class_iou"][:3] == [2 / 4, 1 / 2, 0.0]
    assert math.isnan(s["per_class_iou"][3])
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["mean_iou"] == pytest.approx((2 / 4 + 1 / 2 + 0) / 3)
    assert s["fw_iou"] == pytest.approx((3 * 2 / 4 + 2 * 1 / 2) / 5)
    assert "pixel_error" not in s


@pytest.mark.parametrize("case", ["empty", "all_ignored"])
def test_confusion_without_pixels_is_all_nan_and_silent(case):
    cm = ConfusionMatrix(2)
    if case == "all_ignored":
        cm.update(torch.zeros(2, 3, 3, dtype=torch.long), torch.full((2, 3, 3), 255))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = cm.compute()
        cm.table()
    assert set(s) == {"pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "per_class_iou",
                      "per_class_accuracy", "pixel_error"}
    assert all(math.isnan(v) for key in ("per_class_iou", "per_class_accuracy") for v in s[key])
    assert all(math.isnan(s[key]) for key in ("pixel_accuracy", "mean_accuracy", "mean_iou",
                                                "fw_iou", "pixel_error"))


def test_confusion_ignore_index_none_and_in_range():
    pred = torch.tensor([[0, 1, 2, 2]])
    target = torch.tensor([[0, 1, 1, 2]])
    everything = ConfusionMatrix(3, ignore_index=None)
    everything.update(pred, target)
    assert int(everything.matrix.sum()) == 4
    no_zero = ConfusionMatrix(3, ignore_index=0)  # a real class id may be the ignored one
    no_zero.update(pred, target)
    np.testing.assert_array_equal(no_zero.matrix.numpy(), reference_matrix(pred, target, 3, 0))
    assert math.isnan(no_zero.compute()["per_class_accuracy"][0])
    with pytest.raises(ValueError, match=r"outside \[0, 3\): 255"):
        everything.update(pred, torch.tensor([[0, 1, 255, 2]]))


def test_confusion_errors():
    cm = ConfusionMatrix(3)
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target shape \(2, 4, 4\).*predictions' shape "
                                         r"\(2, 4, 5\)"):
        cm.update(torch.randn(2, 3, 4, 5), target[..., :4])
    with pytest.raises(ValueError, match=r"target shape \(4, 5\).*\(2, 4, 5\)"):
        cm.update(target, target[0])
    with pytest.raises(ValueError, match="4 channels.*num_classes is 3"):
        cm.update(torch.randn(2, 4, 4, 5), target)
    with pytest.raises(ValueError, match=r"target has values outside \[0, 3\) or ignore_index "
                                         r"\(255\): -1, 3, 7"):
        bad = target.clone()
        bad[0, 0, :4] = torch.tensor([3, 7, -1, 255])
        cm.update(target, bad)
    with pytest.raises(ValueError, match=r"logits_or_preds has predicted class ids outside "
                                         r"\[0, 3\): 5"):
        cm.update(target + 5, target)
    with pytest.raises(TypeError, match="target must hold integer class ids.*float32"):
        cm.update(target, target.float())
    with pytest.raises(ValueError, match=r"floating-point logits_or_preds must be logits.*"
                                         r"\(2, 4, 5\)"):
        cm.update(target.float(), target)
    with pytest.raises(ValueError, match=r"integer logits_or_preds.*\(2, 1, 4, 5\)"):
        cm.update(target[:, None], target)
    with pytest.raises(TypeError, match="logits_or_preds must be a Tensor, got ndarray"):
        cm.update(target.numpy(), target)
    # Nothing of the failed calls was counted.
    assert int(cm.matrix.sum()) == 0
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ConfusionMatrix(0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        ConfusionMatrix(2.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ConfusionMatrix(2, ignore_index="void")


def test_confusion_matrix_copy_reset_and_state_dict():
    g = torch.Generator().manual_seed(3)
    cm = ConfusionMatrix(4)
    cm.update(*random_batch(4, (2, 5, 5), g))
    before = cm.matrix
    cm.matrix.zero_()  # a copy: the counts stay
    assert torch.equal(cm.matrix, before)

    restored = ConfusionMatrix(4)
    restored.load_state_dict(cm.state_dict())
    assert torch.equal(restored.matrix, before)
    assert_scores_equal(restored.compute(), cm.compute())
    with pytest.raises(ValueError, match="num_classes=4.*num_classes=5"):
        ConfusionMatrix(5).load_state_dict(cm.state_dict())
    with pytest.raises(ValueError, match=r"int64 tensor of shape \(4, 4\)"):
        restored.load_state_dict({**cm.state_dict(), "matrix": torch.zeros(4, 4)})

    cm.reset()
    assert int(cm.matrix.sum()) == 0 and cm.matrix.shape == (4, 4)


def test_confusion_table_shows_the_scores():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]))
    s = cm.compute()
    text = cm.table(["sky", "building", "pole"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["sky"] == ["sky", "3", f"{s['per_class_iou'][0]:.4f}",
                           f"{s['per_class_accuracy'][0]:.4f}"]
    assert rows["pole"] == ["pole", "0", "-", "-"]  # absent class: NaN shown as "-"
    assert "mean IoU" in text and f"{s['mean_iou']:.4f}" in lines[-2]
    assert lines[-1].split()[-1] == f"{s['fw_iou']:.4f}"
    assert "pixel error" not in text
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 3"):
        cm.table(["sky", "building"])


@pytest.mark.parametrize("device", devices())
def test_confusion_counts_on_the_input_device(device):
    g = torch.Generator().manual_seed(4)
    pred, target = random_batch(5, (2, 16, 16), g)
    cm = ConfusionMatrix(5)
    cm.update(pred.to(device), target.to(device))
    assert cm.matrix.device.type == device
    np.testing.assert_array_equal(cm.matrix.cpu().numpy(), reference_matrix(pred, target, 5, 255))
    fixed = ConfusionMatrix(5, device="cpu")
    if device != "cpu":
        with pytest.raises(ValueError, match="inputs are on cuda.*matrix is on cpu"):
            fixed.update(pred.to(device), target.to(device))


# ---------------------------------------------------------------------------------------------
# Rand error


def brute_force_components(mask):
    """4-connected components of a boolean map by breadth-first search (ids from 1)."""
    labels = np.zeros(mask.shape, np.int64)
    current = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                        and not labels[ny, nx]):
                    labels[ny, nx] = current
                    queue.append((ny, nx))
    return labels


def brute_force_rand_error(pred, target, foreground=1, ignore_index=255):
    """Counts ordered pixel pairs (p, q), p == q included, inside the truth foreground:
    same truth segment and/or same predicted segment (predicted background: only p == q)."""
    truth = brute_force_components((target == foreground) & (target != ignore_index))
    predicted = brute_force_components(pred == foreground)
    scored = truth > 0
    t, s = truth[scored], predicted[scored]
    same_truth = t[:, None] == t[None, :]
    same_pred = (s[:, None] == s[None, :]) & (s[:, None] > 0) | np.eye(len(s), dtype=bool)
    both = np.count_nonzero(same_truth & same_pred)
    precision = both / np.count_nonzero(same_pred)
    recall = both / np.count_nonzero(same_truth)
    return 1 - 2 * precision * recall / (precision + recall)


def test_rand_error_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(5)
    for trial in range(25):
        h, w = rng.integers(3, 9, size=2)
        target = (rng.random((h, w)) < 0.65).astype(np.int64)
        target[rng.random((h, w)) < 0.1] = 255
        if not (target == 1).any():
            target[0, 0] = 1
        pred = np.where(rng.random((h, w)) < 0.8, target == 1, rng.random((h, w)) < 0.5)
        pred = pred.astype(np.uint8)
        got = rand_error(pred, target)
        assert got == pytest.approx(brute_force_rand_error(pred, target), abs=1e-12), trial
        assert 0 <= got < 1


def test_rand_error_perfect_merge_split_hand_built():
    # Two cells of 4 pixels, a membrane column between them.
    two_cells = np.array([[1, 1, 0, 1, 1],
                          [1, 1, 0, 1, 1]])
    assert rand_error(two_cells, two_cells) == 0.0
    # Merge: everything predicted as cell. sum n^2 = 4^2 + 4^2 = 32, sum s^2 = 8^2,
    # sum t^2 = 32: precision 1/2, recall 1, V = 2/3.
    merged = np.ones_like(two_cells)
    assert rand_error(merged, two_cells) == pytest.approx(1 / 3, abs=1e-15)
    # Split: one cell of 8 pixels predicted as 4 + 2 pixels and 2 background singletons.
    # sum n^2 = sum s^2 = 16 + 4 + 1 + 1 = 22, sum t^2 = 64: precision 1, recall 22/64,
    # V = 44/86, error 21/43.
    one_cell = np.ones((2, 4), np.int64)
    split = np.array([[1, 1, 0, 1],
                      [1, 1, 0, 1]])
    assert rand_error(split, one_cell) == pytest.approx(21 / 43, abs=1e-15)
    # Diagonal neighbours are not connected (4-connectivity): a checkerboard of 2 cells of 2
    # predicted as one blob splits them, not merges them.
    diagonal = np.array([[1, 0], [0, 1]])
    assert rand_error(np.ones((2, 2), np.int64), diagonal) == pytest.approx(1 / 3)
    assert brute_force_rand_error(np.ones((2, 2), np.int64), diagonal) == pytest.approx(1 / 3)


def test_rand_error_ignores_pixels_and_background_values():
    rng = np.random.default_rng(6)
    target = (rng.random((8, 8)) < 0.6).astype(np.int64)
    pred = (rng.random((8, 8)) < 0.6).astype(np.int64)
    base = rand_error(pred, target)
    # Other background values (relabelled membrane) change nothing, in truth or prediction.
    assert rand_error(np.where(pred == 1, 1, rng.integers(2, 9, (8, 8))), target) == base
    assert rand_error(pred, np.where(target == 1, 1, 7), ignore_index=None) == base
    # Another foreground code, torch inputs, transposed / flipped maps: the same score.
    assert rand_error(torch.from_numpy(pred * 3), torch.from_numpy(target * 3),
                      foreground=3) == pytest.approx(base, abs=1e-15)
    assert rand_error(pred.T, target.T) == pytest.approx(base, abs=1e-15)
    assert rand_error(pred[::-1], target[::-1]) == pytest.approx(base, abs=1e-15)
    # An ignored truth pixel is left out of the scoring (and out of the truth's segments).
    ignored = target.copy()
    ignored[rng.random((8, 8)) < 0.2] = 255
    assert rand_error(pred, ignored) == pytest.approx(brute_force_rand_error(pred, ignored))
    assert rand_error(pred, ignored) != pytest.approx(base)


def test_rand_error_of_segments_is_invariant_to_relabelling():
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 5, (10, 10))
    pred = rng.integers(0, 6, (10, 10))
    base = _rand_error_of_segments(truth, pred)
    truth_ids = np.concatenate([[0], rng.permutation(np.arange(100, 104))])
    pred_ids = np.concatenate([[0], rng.permutation(np.arange(1, 6)) * 1000])
    assert _rand_error_of_segments(truth_ids[truth], pred_ids[pred]) == pytest.approx(base,
                                                                                     abs=1e-15)
    assert 0 < base < 1


def test_rand_error_undefined_without_truth_foreground():
    target = np.full((4, 4), 255)
    target[0] = 0
    assert math.isnan(rand_error(np.ones((4, 4), np.int64), target))
    acc = RandError()
    errors = acc.update(torch.ones(2, 4, 4, dtype=torch.long),
                        torch.from_numpy(np.stack([target, np.ones((4, 4), np.int64)])))
    assert math.isnan(errors[0]) and errors[1] == 0.0
    assert acc.compute() == 0.0  # the undefined image is not counted
    acc.reset()
    assert math.isnan(acc.compute())


def test_rand_error_accumulator_is_the_mean_of_images():
    g = torch.Generator().manual_seed(8)
    target = (torch.rand(3, 12, 12, generator=g) < 0.6).long()
    logits = torch.randn(3, 2, 12, 12, generator=g)
    logits[:, 1] += 1.5 * (2 * target - 1)  # mostly right, not perfect
    acc = RandError()
    errors = acc.update(logits, target)
    expected = [rand_error(logits[i].argmax(0), target[i]) for i in range(3)]
    assert errors == expected and 0 < min(expected)
    acc.update(logits[0].argmax(0), target[0])  # (H, W) predictions
    assert acc.compute() == pytest.approx((sum(expected) + expected[0]) / 4, abs=1e-15)


def test_rand_error_errors():
    m = np.ones((4, 4), np.int64)
    with pytest.raises(ValueError, match=r"pred shape \(4, 3\) does not match target shape"):
        rand_error(m[:, :3], m)
    with pytest.raises(ValueError, match=r"target must be a 2-D map.*\(1, 4, 4\)"):
        rand_error(m, m[None])
    with pytest.raises(TypeError, match="pred must hold integer class ids.*float"):
        rand_error(m.astype(np.float32), m)
    with pytest.raises(TypeError, match="target must be a Tensor or a numpy array, got list"):
        rand_error(m, m.tolist())
    with pytest.raises(ValueError, match="foreground and ignore_index are both 255"):
        rand_error(m, m, foreground=255)
    with pytest.raises(ValueError, match="foreground and ignore_index are both 1"):
        RandError(ignore_index=1)
    with pytest.raises(ValueError, match="at least 2 are needed for foreground class 1"):
        RandError().update(torch.randn(1, 1, 4, 4), torch.from_numpy(m)[None])
    with pytest.raises(ValueError, match=r"target shape \(4, 4\).*\(1, 4, 4\)"):
        RandError().update(torch.randn(1, 2, 4, 4), torch.from_numpy(m))


def isbi_label(index):
    path = os.path.join(SHARED_DATA, "isbi2012_membrane", "labels", f"{index:02d}.png")
    if not os.path.exists(path):
        pytest.skip(f"shared data not found: {path}")
    from PIL import Image

    return np.asarray(Image.open(path))


def test_rand_error_on_isbi_labels():
    label = isbi_label(0)  # 255 = cell interior, 0 = membrane
    assert rand_error(label, label, foreground=255, ignore_index=None) == 0.0
    # A crop small enough for the brute force, with its real cell shapes; a prediction that
    # loses the thin membranes (a 3x3 max filter of the cells) merges neighbouring cells.
    crop = label[100:130, 200:230]
    from scipy import ndimage

    thick = ndimage.maximum_filter(crop, size=3)
    got = rand_error(thick, crop, foreground=255, ignore_index=None)
    assert got == pytest.approx(brute_force_rand_error(thick, crop, 255, None), abs=1e-12)
    whole = rand_error(ndimage.maximum_filter(label, size=3), label, foreground=255,
                       ignore_index=None)
    assert 0 < whole < 1


# ---------------------------------------------------------------------------------------------
# two processes, gloo


def _distributed_worker(rank, world_size, init_file, pred, target, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        mine = slice(rank, None, world_size)  # each rank: its own half of the images
        cm = ConfusionMatrix(5)
        cm.update(pred[mine], target[mine])
        local = cm.matrix
        binary = RandError()
        binary.update((pred[mine] > 2).long(), (target[mine] > 2).long())
        result = {"scores": cm.compute(), "table": cm.table(), "local": local,
                  "matrix_after": cm.matrix, "rand": binary.compute()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_all_reduce_equals_single_process(tmp_path):
    g = torch.Generator().manual_seed(9)
    pred, target = random_batch(5, (4, 10, 10), g)
    target[target == 255] = 0  # the Rand half thresholds the ids; keep the ignore out of it
    target[0, 0, :3] = 255
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), pred, target, str(tmp_path)),
             nprocs=2, join=True)
    single = ConfusionMatrix(5)
    single.update(pred, target)
    single_rand = RandError()
    single_rand.update((pred > 2).long(), (target > 2).long())
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not torch.equal(results[0]["local"], single.matrix)  # each saw only its half
    assert torch.equal(results[0]["local"] + results[1]["local"], single.matrix)
    for result in results:
        assert_scores_equal(result["scores"], single.compute())
        assert result["table"] == single.table()
        assert torch.equal(result["matrix_after"], result["local"])  # compute reduced a copy
        assert result["rand"] == pytest.approx(single_rand.compute(), abs=1e-15)
