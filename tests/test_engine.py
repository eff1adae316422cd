"""The training engine: checkpoints, exact resume, sampler, DDP on gloo, the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# The data pipeline needs Pillow and scipy (package dependencies; a bare GPU machine may lack them).
pytest.importorskip("PIL")
pytest.importorskip("scipy")
import fastseg
from fastseg.engine import checkpoint as ckpt
from fastseg.engine.config import TrainConfig
from fastseg.engine.distributed import EpochSampler
from fastseg.engine.train import Trainer, train

# Where the fastseg under test lives (the source tree for an editable install, site-packages
# for a wheel): the subprocesses import the same one.
FASTSEG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastseg.__file__)))


def tiny_unet(out, **kw) -> TrainConfig:
    values = dict(model="unet", base_channels=4, depth=2, padding="valid",
                  dataset="synthetic-membranes", synthetic_train=8, synthetic_val=2,
                  synthetic_size=48, crop=20, weight_map=True, w0=5.0, sigma=3.0, elastic=True,
                  optimizer="sgd", lr=0.05, momentum=0.9, steps=6, batch_size=2, log_every=1,
                  device="cpu", out=str(out))
    values.update(kw)
    return TrainConfig(**values)


def tiny_fcn(out, **kw) -> TrainConfig:
    values = dict(model="fcn8s", width_mult=1 / 32, dataset="synthetic-shapes",
                  synthetic_train=8, synthetic_val=2, synthetic_size=40, crop=32,
                  optimizer="adam", lr=1e-3, steps=6, batch_size=2, log_every=1, device="cpu",
                  out=str(out))
    values.update(kw)
    return TrainConfig(**values)


def records(out, kind="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# --- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip_uses_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    state = {"config": {"model": "unet"}, "model": {"w": torch.randn(3)}, "step": 4,
             "rng": ckpt.rng_state()}
    ckpt.save_checkpoint(path, state)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["format"] == ckpt.FORMAT


def test_checkpoint_write_that_fails_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]   # no temporary file left behind


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    ckpt.save_checkpoint(good, {"step": 1, "model": {"w": torch.randn(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt.*cannot be read"):
        ckpt.load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a fastseg training checkpoint"):
        ckpt.load_checkpoint(other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": ckpt.FORMAT, "obj": EpochSampler(3, batch_size=1)}, unsafe)
    with pytest.raises(ValueError, match="cannot be read"):   # weights_only refuses objects
        ckpt.load_checkpoint(unsafe)


def test_check_compatible_lists_every_difference():
    a = {"model": "unet", "num_classes": 2, "depth": 3}
    ckpt.check_compatible(a, dict(a))
    with pytest.raises(ValueError, match="num_classes: checkpoint 2, this run 5.*depth"):
        ckpt.check_compatible(a, {"model": "unet", "num_classes": 5, "depth": 4})


# --- sampler -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_shards_are_disjoint_and_reproducible(world):
    n, batch = 23, 2
    shards = []
    for rank in range(world):
        s = EpochSampler(n, batch_size=batch, seed=5, rank=rank, world_size=world)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == s.batches_per_epoch * batch
        assert list(s) == shards[-1]                 # same (seed, epoch): same order
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat)               # no index twice in one epoch
    s = EpochSampler(n, batch_size=batch, seed=5, rank=0, world_size=world)
    s.set_epoch(4)
    assert list(s) != shards[0]
    s.set_epoch(3, start_batch=2)                    # resume mid-epoch
    assert list(s) == shards[0][2 * batch:]


def test_epoch_sampler_rejects_too_small_a_dataset():
    with pytest.raises(ValueError, match="fewer than one step"):
        EpochSampler(3, batch_size=2, world_size=2)


# --- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_unet, tiny_fcn], ids=["unet-weightmap", "fcn8s-dropout"])
def test_resume_continues_exactly(tmp_path, make):
    """Steps 4-6 of a run resumed from its step-3 checkpoint have the uninterrupted run's losses
    (data order, augmentation, dropout, optimizer moments, schedule all restored)."""
    full = tmp_path / "full"
    train(make(full, checkpoint_every=3), progress=False, log=None)
    expected = [r["loss"] for r in records(full)]
    assert len(expected) == 6 and all(v == v for v in expected)

    part = tmp_path / "part"
    trainer = Trainer(make(part, steps=6), progress=False, log=None)
    trainer.total_steps = 3          # the run is cut after step 3 ...
    trainer.run()                    # (it checkpoints at its last step)
    resumed = make(part, steps=6)    # ... and resumed from its last checkpoint
    train(resumed, resume="auto", progress=False, log=None)
    got = [r["loss"] for r in records(part)]
    assert got == expected
    state = ckpt.load_checkpoint(part / "checkpoints" / "last.pt")
    assert state["step"] == 6


def test_training_reduces_the_loss_and_writes_its_files(tmp_path):
    out = tmp_path / "run"
    metrics = train(tiny_unet(out, steps=30, lr=0.1, log_every=5, val_every=15), progress=False,
                    log=None)
    losses = [r["loss"] for r in records(out)]
    assert losses[-1] < losses[0]
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0 and "rand_error" in metrics
    assert len(records(out, "val")) == 2
    for name in ("config.json", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).stat().st_size > 0, name
    assert len(os.listdir(out / "pictures")) == 2


def test_a_finished_run_is_never_overwritten(tmp_path):
    train(tiny_unet(tmp_path, steps=2), progress=False, log=None)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny_unet(tmp_path, steps=2), progress=False, log=None)
    with pytest.raises(ValueError, match="nothing left to train"):
        Trainer(tiny_unet(tmp_path, steps=2), resume="auto", progress=False, log=None)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train(tiny_unet(tmp_path, steps=2), progress=False, log=None)
    with pytest.raises(ValueError, match="another model.*base_channels: checkpoint 4, this run 8"):
        Trainer(tiny_unet(tmp_path, steps=4, base_channels=8), resume="auto", progress=False,
                log=None)


@pytest.mark.parametrize("field, value, match", [
    ("model", "resnet", "model must be one of"), ("batch_size", 0, "batch_size must be >= 1"),
    ("steps", None, "steps or epochs"), ("amp", "fp8", "amp must be one of"),
    ("lr", 0.0, "lr must be > 0")])
def test_config_errors(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(tmp_path, **{field: value}).validate()


@pytest.mark.parametrize("options", [
    dict(amp="bf16", channels_last=True, grad_clip=1.0),
    dict(amp="fp16", grad_clip=1.0),                       # with the grad scaler
    pytest.param(dict(compile=True), marks=pytest.mark.slow, id="compile"),
], ids=["bf16-channels_last-clip", "fp16-scaler-clip", "compile"])
def test_training_options_train(tmp_path, options):
    train(tiny_fcn(tmp_path, steps=2, **options), progress=False, log=None)
    assert all(r["loss"] == r["loss"] for r in records(tmp_path))
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in state["model"])   # the plain module's


# --- processes: DDP and the CLI ----------------------------------------------------------------

def run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=FASTSEG_PARENT)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                            timeout=600, **kw)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TINY_FLAGS = ["--model", "unet", "--base-channels", "4", "--depth", "2", "--dataset",
              "synthetic-membranes", "--synthetic-train", "8", "--synthetic-val", "2",
              "--synthetic-size", "48", "--crop", "20", "--batch-size", "2", "--device", "cpu",
              "--no-progress"]


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tmp_path):
    out = tmp_path / "ddp"
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastseg",
         "train", *TINY_FLAGS, "--steps", "3", "--log-every", "1", "--out", str(out)])
    state = ckpt.load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 3
    assert [r["step"] for r in records(out)] == [1, 2, 3]     # rank 0 alone writes the log
    assert len(records(out, "val")) == 1


@pytest.mark.slow
def test_cli_train_eval_predict(tmp_path):
    out = tmp_path / "run"
    run(["-m", "fastseg", "train", *TINY_FLAGS, "--steps", "4", "--out", str(out)])
    report = tmp_path / "eval.json"
    result = run(["-m", "fastseg", "eval", str(out / "checkpoints" / "last.pt"), "--json",
                  str(report), "--no-progress"])
    assert "mean IoU" in result.stdout and "Rand error" in result.stdout
    metrics = json.loads(report.read_text())
    val = records(out, "val")[-1]
    assert metrics["mean_iou"] == pytest.approx(val["mean_iou"])   # eval == the run's validation

    from PIL import Image
    import numpy as np

    image = tmp_path / "big.png"
    Image.fromarray((np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8)).save(image)
    pred = tmp_path / "pred"
    run(["-m", "fastseg", "predict", str(out / "checkpoints" / "last.pt"), str(image), "--out",
         str(pred), "--heatmap", "1", "--max-pixels", "3000", "--no-progress"])
    mask = np.array(Image.open(pred / "big_mask.png"))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 1}
    assert np.array(Image.open(pred / "big_overlay.png")).shape == (70, 90, 3)
    assert np.array(Image.open(pred / "big_heatmap_1.png")).shape == (70, 90, 3)


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from fastseg.cli import main

    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", "camvid", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "needs data_root" in capsys.readouterr().err


# --- inference helpers -------------------------------------------------------------------------

def test_dense_heatmap_of_a_convolutionalized_classifier():
    """On an image the classifier's size the heat map is its class probability everywhere; on a
    larger one it is a dense map of the image's size (the FCN paper's heat map)."""
    from torch import nn

    from fastseg.engine.segment import dense_heatmap
    from fastseg.models import convolutionalize

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10), nn.ReLU(), nn.Linear(10, 3))
    classifier = nn.Sequential(features, head).double()
    dense = nn.Sequential(features, convolutionalize(head, (4, 8, 8))).double()
    image = torch.rand(3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.softmax(classifier(((image - 0.5) / 0.25)[None]), 1)[0, 2]
    heat = dense_heatmap(dense, image, 2, mean=0.5, std=0.25)
    assert heat.shape == (16, 16)
    torch.testing.assert_close(heat, torch.full((16, 16), float(expected)), rtol=0, atol=1e-6)
    big = dense_heatmap(dense, torch.rand(3, 40, 56), 2, mean=0.5, std=0.25)
    assert big.shape == (40, 56) and float(big.min()) >= 0 and float(big.max()) <= 1
    assert float(big.std()) > 0        # it varies over the image
    with pytest.raises(ValueError, match="class_index 3 outside"):
        dense_heatmap(dense, image, 3, mean=0.5, std=0.25)


def test_predict_files_resizes_like_training_and_names_classes(tmp_path):
    """A network trained on half-size images predicts at half size and answers at full size;
    the heat map class may be given by name; colliding output names are refused."""
    import numpy as np
    from PIL import Image

    from fastseg.engine.evaluate import load_trained_model
    from fastseg.engine.segment import predict_files

    out = tmp_path / "run"
    train(tiny_unet(out, steps=1, scale=0.5, synthetic_size=96), progress=False, log=None)
    model, config = load_trained_model(out / "checkpoints" / "last.pt")
    assert config.scale == 0.5 and config.extra["class_names"] == ["membrane", "cell"]
    image = tmp_path / "a" / "slice.png"
    image.parent.mkdir()
    Image.fromarray((np.random.default_rng(1).random((61, 83)) * 255).astype(np.uint8)).save(image)
    written = predict_files(model, config, [str(image)], str(tmp_path / "pred"), heatmap="cell",
                            progress=False)
    assert sorted(os.path.basename(p) for p in written) == [
        "slice_heatmap_1.png", "slice_mask.png", "slice_overlay.png"]
    assert np.array(Image.open(tmp_path / "pred" / "slice_mask.png")).shape == (61, 83)
    with pytest.raises(ValueError, match="neither an index"):
        predict_files(model, config, [str(image)], str(tmp_path / "p2"), heatmap="nucleus",
                      progress=False)
    twin = tmp_path / "b" / "slice.png"
    twin.parent.mkdir()
    twin.write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match="share the names"):
        predict_files(model, config, [str(image), str(twin)], str(tmp_path / "p3"),
                      progress=False)


def test_evaluate_matches_a_manual_confusion_count(tmp_path):
    """evaluate() == counting predict_mask against the masks by hand."""
    import numpy as np

    from fastseg.engine.evaluate import evaluate, load_trained_model
    from fastseg.engine.predict import predict_mask
    from fastseg.engine.build import build_datasets

    out = tmp_path / "run"
    train(tiny_fcn(out, steps=2), progress=False, log=None)
    model, config = load_trained_model(out / "checkpoints" / "last.pt")
    _, val = build_datasets(config, train=False)
    metrics = evaluate(model, val, num_classes=config.num_classes, ignore_index=255,
                       mean=config.mean, std=config.std)
    correct = total = 0
    for i in range(len(val)):
        sample = val[i]
        pred = predict_mask(model, sample["image"], mean=config.mean, std=config.std).numpy()
        mask = sample["mask"].numpy()
        keep = mask != 255
        correct += int((pred[keep] == mask[keep]).sum())
        total += int(keep.sum())
    assert metrics["pixel_accuracy"] == pytest.approx(correct / total)
    assert metrics["images"] == len(val) and np.isfinite(metrics["fw_iou"])


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    result = run(["-m", "fastseg", "demo", "--quick", "--out", str(tmp_path), "--device", "cpu",
                  "--no-progress"])
    assert "fused vs eager" in result.stdout
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert [row["model"] for row in speed] == ["unet", "fcn8s"]
    assert all(row["fused_ms"] > 0 and row["eager_ms"] > 0 for row in speed)
    for run_name in ("unet-membranes", "fcn8s-shapes"):
        assert (tmp_path / run_name / "curves.png").stat().st_size > 0
        assert len(os.listdir(tmp_path / run_name / "pictures")) == 4


@pytest.mark.slow
def test_cli_eval_on_the_training_split(tmp_path):
    out = tmp_path / "run"
    run(["-m", "fastseg", "train", *TINY_FLAGS, "--steps", "2", "--out", str(out)])
    result = run(["-m", "fastseg", "eval", str(out / "checkpoints" / "last.pt"), "--split",
                  "train", "--no-progress"])
    assert "(train, 8 images)" in result.stdout


def test_unaugmented_training_set_keeps_the_training_resize(tmp_path):
    """`fastseg eval --split train` sees the training images at the training scale, without
    augmentation: the same samples as the validation pipeline would give them."""
    from fastseg.engine.build import build_datasets

    config = tiny_unet(tmp_path, scale=0.5, synthetic_size=48)
    plain, _ = build_datasets(config, augment=False)
    augmented, _ = build_datasets(config)
    sample = plain[3]
    assert sample["image"].shape[-2:] == sample["mask"].shape == (24, 24)
    assert torch.equal(plain[3]["image"], sample["image"])          # no random draw
    assert augmented[3]["mask"].shape != sample["mask"].shape       # the crop / context
