"""Accuracy on real data: U-Net on ISBI 2012 membranes, FCN-32s/16s/8s on CamVid.

Each row is one ``fastseg train`` run followed by ``fastseg eval`` of its last checkpoint on the
validation split; the command lines, the device, the wall time and the metrics go into
``results.json`` and ``results.md`` under --out. The CPU configurations are reduced (width,
image scale, steps) to finish on a 2-core machine; ``--full`` gives the papers' networks for a
GPU. Nothing is downloaded: the data is ../shared/data (see its README), and the FCNs start
from random weights (the paper fine-tunes ImageNet VGG16; load one with
``fastseg.models.load_vgg16_backbone`` where you have it).

    python benchmarks/accuracy/run.py --data ../shared/data --out benchmarks/accuracy/cpu
    python benchmarks/accuracy/run.py --only unet-isbi --steps-scale 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def runs(data: str, full: bool) -> dict[str, list[str]]:
    isbi = os.path.join(data, "isbi2012_membrane")
    camvid = os.path.join(data, "camvid")
    if full:   # the papers' networks (a GPU)
        unet = ["--model", "unet", "--base-channels", "64", "--depth", "5", "--crop", "388",
                "--batch-size", "1", "--steps", "4000", "--optimizer", "sgd", "--lr", "0.01",
                "--momentum", "0.99", "--val-every", "1000"]
        fcn = ["--width-mult", "1.0", "--crop", "352", "--batch-size", "8", "--steps", "8000",
               "--optimizer", "sgd", "--lr", "1e-4", "--momentum", "0.99", "--weight-decay",
               "5e-4", "--val-every", "2000", "--learnable-upsampling"]
    else:      # reduced for a 2-core CPU: 10-12 minutes a row
        unet = ["--model", "unet", "--base-channels", "16", "--depth", "5", "--crop", "132",
                "--batch-size", "2", "--steps", "1500", "--optimizer", "adam", "--lr", "1e-3",
                "--schedule", "cosine", "--val-every", "500"]
        fcn = ["--width-mult", "0.25", "--crop", "160", "--batch-size", "4", "--steps", "700",
               "--optimizer", "adam", "--lr", "1e-3", "--schedule", "cosine",
               "--val-every", "350"]
    # ISBI at full resolution (its membranes are 2-4 px wide); CamVid at half on the CPU.
    common_unet = ["--dataset", "isbi2012", "--data-root", isbi, "--padding", "valid",
                   "--weight-map", "--w0", "10", "--sigma", "5", "--elastic", "--rotate", "10"]
    common_fcn = ["--dataset", "camvid", "--data-root", camvid,
                  "--scale", "1.0" if full else "0.5", "--class-weights", "auto"]
    table = {"unet-isbi": unet + common_unet}
    for variant in ("fcn32s", "fcn16s", "fcn8s"):
        table[f"{variant}-camvid"] = ["--model", variant] + fcn + common_fcn
    return table


def _scaled_steps(args: list[str], factor: float) -> list[str]:
    out = list(args)
    for flag in ("--steps", "--val-every"):
        i = out.index(flag)
        out[i + 1] = str(max(1, round(int(out[i + 1]) * factor)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--out", default=os.path.join(HERE, "cpu"))
    parser.add_argument("--full", action="store_true", help="the papers' configurations (GPU)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every run's steps (and validation interval)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"no data at {args.data}: nothing to run", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    for name, train_args in runs(args.data, args.full).items():
        if args.only and name not in args.only:
            continue
        train_args = _scaled_steps(train_args, args.steps_scale)
        run_dir = os.path.join(args.out, "runs", name)
        if os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
            print(f"{name}: {run_dir} already holds a run; remove it to rerun", file=sys.stderr)
            continue
        command = [sys.executable, "-m", "fastseg", "train", *train_args, "--device",
                   args.device, "--out", run_dir, "--no-progress"]
        print("$ " + " ".join(command[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        report = os.path.join(run_dir, "eval.json")
        subprocess.run([sys.executable, "-m", "fastseg", "eval",
                        os.path.join(run_dir, "checkpoints", "last.pt"), "--device", args.device,
                        "--json", report, "--no-progress"], check=True)
        metrics = json.load(open(report))
        device = ("cuda: " + torch.cuda.get_device_name()) if (
            args.device != "cpu" and torch.cuda.is_available()) else (
            f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        results[name] = {"command": "fastseg train " + " ".join(train_args), "device": device,
                         "train_seconds": round(seconds, 1), "commit": commit,
                         "torch": torch.__version__, "metrics": {
                             k: metrics[k] for k in ("pixel_accuracy", "mean_accuracy",
                                                     "mean_iou", "fw_iou", "pixel_error",
                                                     "rand_error", "per_class_iou", "class_names")
                             if k in metrics}}
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
        # The pictures worth keeping beside the numbers (the run folder itself is not committed).
        keep = os.path.join(args.out, name)
        os.makedirs(keep, exist_ok=True)
        shutil.copy(os.path.join(run_dir, "curves.png"), keep)
        shutil.copy(os.path.join(run_dir, "metrics.jsonl"), keep)
        pictures = sorted(os.listdir(os.path.join(run_dir, "pictures")))[:2]
        for picture in pictures:
            shutil.copy(os.path.join(run_dir, "pictures", picture), keep)
    write_markdown(results, os.path.join(args.out, "results.md"))
    return 0


def write_markdown(results: dict, path: str) -> None:
    lines = ["| run | val pixel acc. | val mean IU | pixel error | Rand error | train time | "
             "device |", "|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda m, k: f"{m[k]:.4f}" if k in m else "-"  # noqa: E731
    for name, row in results.items():
        m = row["metrics"]
        lines.append(f"| {name} | {fmt(m, 'pixel_accuracy')} | {fmt(m, 'mean_iou')} | "
                     f"{fmt(m, 'pixel_error')} | {fmt(m, 'rand_error')} | "
                     f"{row['train_seconds'] / 60:.1f} min | {row['device']} |")
    fcn = {v: results.get(f"{v}-camvid", {}).get("metrics", {}).get("mean_iou")
           for v in ("fcn8s", "fcn16s", "fcn32s")}
    if all(v is not None for v in fcn.values()):
        held = fcn["fcn8s"] >= fcn["fcn16s"] >= fcn["fcn32s"]
        lines += ["", f"FCN-8s >= FCN-16s >= FCN-32s (mean IU): {'held' if held else 'did not hold'}"
                  f" ({fcn['fcn8s']:.4f} / {fcn['fcn16s']:.4f} / {fcn['fcn32s']:.4f})."]
    lines += ["", "Commands (run from the repository root with `python -m fastseg`):", ""]
    lines += [f"- {name}: `{row['command']}`" for name, row in results.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
