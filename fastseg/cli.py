"""The `fastseg` command.

    fastseg train    train FCN-8s/16s/32s or U-Net (synthetic data, a folder, ISBI 2012, CamVid)
    fastseg eval     a checkpoint on a dataset -> the metrics table (and JSON)
    fastseg predict  a checkpoint on images of any size -> masks, overlays, heat maps (PNG)
    fastseg demo     train a small U-Net and FCN-8s on synthetic data, pictures + speed table
    fastseg info     versions, build, and which backends serve each op
    fastseg bench    benchmark the fused ops against eager and torch.compile

Multi-GPU: ``torchrun --nproc_per_node=N -m fastseg train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# `fastseg train` flags: config field -> help. Types and defaults come from TrainConfig.
_TRAIN_HELP = {
    "model": "network: unet, fcn8s, fcn16s, fcn32s",
    "fused": "fastseg's fused modules and loss (--no-fused: the same network in eager PyTorch)",
    "base_channels": "U-Net: channels of the first level (64 in the paper)",
    "depth": "U-Net: resolution levels (5 in the paper)",
    "padding": "U-Net: valid (the paper's, output smaller than input) or same",
    "up_mode": "U-Net: deconv (2x2 up-convolution) or bilinear",
    "batch_norm": "U-Net: BatchNorm after each convolution",
    "width_mult": "FCN: scale every VGG16 / fc width (1.0 is the paper's net)",
    "learnable_upsampling": "FCN: learn the bilinear deconvolutions",
    "num_classes": "classes (default: from the dataset)",
    "backend": "pin a fastseg backend: cuda, triton, cpu, reference (default auto)",
    "dataset": "synthetic-membranes, synthetic-shapes, isbi2012, camvid or folder",
    "data_root": "isbi2012 / camvid: the dataset folder",
    "train_images": "folder: training image directory",
    "train_masks": "folder: training mask directory",
    "val_images": "folder: validation image directory",
    "val_masks": "folder: validation mask directory",
    "label_map": "folder: mask value to class id, e.g. 0:0,255:1",
    "ignore_index": "mask value that is not trained on",
    "synthetic_train": "synthetic: training images",
    "synthetic_val": "synthetic: validation images",
    "synthetic_size": "synthetic: image size",
    "scale": "resize real images by this factor first (e.g. 0.5 for CPU runs)",
    "crop": "training crop in output pixels (the valid U-Net rounds it up to a size it takes)",
    "flip": "random flips",
    "rotate": "random rotation up to this many degrees",
    "elastic": "the U-Net paper's elastic deformation",
    "jitter": "brightness / contrast jitter",
    "weight_map": "U-Net border weight map (w0, sigma) as per-pixel loss weights",
    "w0": "weight map: border weight",
    "sigma": "weight map: border width in pixels",
    "class_weights": "loss class weights: auto (median frequency) or a comma list",
    "mean": "per-channel mean, comma list (default: measured on the training images)",
    "std": "per-channel std, comma list",
    "optimizer": "sgd, adam or adamw",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "schedule": "learning-rate schedule: poly, cosine or constant",
    "poly_power": "poly schedule power",
    "epochs": "epochs to train",
    "steps": "steps to train (overrides epochs)",
    "batch_size": "images per step (per process)",
    "workers": "data loader worker processes",
    "amp": "automatic mixed precision: none, bf16, fp16 (with a grad scaler)",
    "channels_last": "channels_last memory format",
    "compile": "torch.compile the model",
    "grad_clip": "clip the gradient norm to this value",
    "val_every": "validate every N steps (0: at the end)",
    "log_every": "log the loss every N steps",
    "checkpoint_every": "checkpoint every N steps (0: at validations and the end)",
    "max_val_pixels": "largest tile (input pixels) run at once when validating / predicting",
    "seed": "random seed",
    "device": "auto, cpu, cuda, cuda:1 ...",
    "out": "output folder (checkpoints, metrics.jsonl, curves.png, pictures/)",
}


def _float_list(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _class_weights(text: str):
    return text if text in ("auto", "none") else _float_list(text)


def _label_map(text: str) -> dict:
    pairs = {}
    for item in text.split(","):
        try:
            key, value = item.split(":")
            pairs[int(key)] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected value:class pairs like 0:0,255:1, got {text!r}")
    return pairs


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastseg.engine.config import TrainConfig

    special = {"mean": _float_list, "std": _float_list, "class_weights": _class_weights,
               "label_map": _label_map}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _TRAIN_HELP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _TRAIN_HELP[f.name] + (f" (default: {default})" if default is not None else "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=_TRAIN_HELP[f.name])
        elif f.name in special:
            parser.add_argument(flag, type=special[f.name], default=default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    parser.add_argument("--resume", default=None,
                        help="continue a run: a checkpoint path, or 'auto' for OUT/checkpoints/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_train(args) -> int:
    from fastseg.engine.config import TrainConfig
    from fastseg.engine.train import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name in _TRAIN_HELP}
    if values["class_weights"] == "none":
        values["class_weights"] = None
    metrics = train(TrainConfig(**values), resume=args.resume, progress=not args.no_progress)
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        print(_metrics_lines(metrics))
    return 0


def _metrics_lines(metrics: dict, class_names=None) -> str:
    keys = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "pixel_error", "rand_error")
    lines = [f"  {k:<15} {metrics[k]:.4f}" for k in keys if k in metrics]
    per_class = metrics.get("per_class_iou")
    if per_class:
        names = class_names or [str(i) for i in range(len(per_class))]
        lines.append("  per-class IoU: " + ", ".join(f"{n} {v:.3f}"
                                                     for n, v in zip(names, per_class)))
    return "\n".join(lines)


def _checkpoint_model(path: str, device_name: str):
    from fastseg.engine.checkpoint import load_checkpoint
    from fastseg.engine.distributed import resolve_device
    from fastseg.engine.evaluate import load_model

    device = resolve_device(device_name)
    model, config = load_model(load_checkpoint(path), device)
    return model, config, device


def _eval_dataset(config, split: str):
    """The checkpoint's validation set, or its training images without augmentation."""
    from fastseg.engine.build import build_datasets

    if split == "val":
        return build_datasets(config, train=False)[1]
    return build_datasets(config, augment=False)[0]


def _cmd_eval(args) -> int:
    from fastseg.engine.evaluate import evaluate

    model, config, device = _checkpoint_model(args.checkpoint, args.device)
    for name in ("dataset", "data_root", "val_images", "val_masks", "scale"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    dataset = _eval_dataset(config, args.split)
    if dataset is None:
        raise ValueError("no validation set: pass --val-images and --val-masks")
    metrics = evaluate(model, dataset, num_classes=config.num_classes,
                       ignore_index=config.ignore_index, mean=config.mean, std=config.std,
                       max_pixels=args.max_pixels, progress=not args.no_progress, table=True)
    names = getattr(dataset, "class_names", None)
    print(f"{args.checkpoint}: {config.model} on {config.dataset} ({args.split}, "
          f"{len(dataset)} images)")
    print(metrics.pop("table"))
    if "rand_error" in metrics:
        print(f"Rand error: {metrics['rand_error']:.4f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "split": args.split,
                       "dataset": config.dataset, "class_names": names, **metrics}, f, indent=2)
    return 0


def _image_paths(inputs: list[str]) -> list[str]:
    exts = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item)
                            if n.lower().endswith(exts))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"fastseg predict: {item!r} is neither an image file nor a folder")
    if not paths:
        raise SystemExit(f"fastseg predict: no images found in {inputs}")
    return paths


def _cmd_predict(args) -> int:
    from fastseg.engine.segment import predict_files

    model, config, device = _checkpoint_model(args.checkpoint, args.device)
    paths = _image_paths(args.images)
    written = predict_files(model, config, paths, args.out, heatmap=args.heatmap,
                            max_pixels=args.max_pixels, max_memory_mb=args.max_memory_mb,
                            progress=not args.no_progress)
    print(f"wrote {len(written)} files for {len(paths)} images to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from fastseg.engine.demo import run_demo

    run_demo(args.out, device=args.device, quick=args.quick, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, build, and which backends serve each op")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("bench", help="benchmark fused ops against eager and torch.compile",
                   add_help=False)

    p_train = sub.add_parser("train", help="train a segmentation network")
    _add_train_arguments(p_train)

    p_eval = sub.add_parser("eval", help="evaluate a checkpoint: metrics table and JSON")
    p_eval.add_argument("checkpoint", help="a checkpoint written by fastseg train")
    p_eval.add_argument("--split", choices=("val", "train"), default="val")
    p_eval.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    p_eval.add_argument("--data-root", default=None)
    p_eval.add_argument("--val-images", default=None)
    p_eval.add_argument("--val-masks", default=None)
    p_eval.add_argument("--scale", type=float, default=None)
    p_eval.add_argument("--max-pixels", type=int, default=None,
                        help="largest tile (input pixels) run at once")
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p_eval.add_argument("--no-progress", action="store_true")

    p_pred = sub.add_parser("predict", help="segment images of any size with a checkpoint")
    p_pred.add_argument("checkpoint", help="a checkpoint written by fastseg train")
    p_pred.add_argument("images", nargs="+", help="image files or folders")
    p_pred.add_argument("--out", required=True, help="output folder")
    p_pred.add_argument("--heatmap", default=None,
                        help="also write this class' probability map (class index or name)")
    p_pred.add_argument("--max-pixels", type=int, default=None,
                        help="largest tile (input pixels) run at once")
    p_pred.add_argument("--max-memory-mb", type=float, default=None,
                        help="memory budget for one forward (sets the tile size)")
    p_pred.add_argument("--device", default="auto")
    p_pred.add_argument("--no-progress", action="store_true")

    p_demo = sub.add_parser("demo", help="train small U-Net and FCN-8s on synthetic data")
    p_demo.add_argument("--out", default="demo-out")
    p_demo.add_argument("--device", default="auto")
    p_demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p_demo.add_argument("--no-progress", action="store_true")

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from fastseg import bench
        return bench.main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import fastseg
        print(json.dumps(fastseg.info(), indent=2, default=str) if args.json
              else fastseg.info(as_text=True))
        return 0
    commands = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict,
                "demo": _cmd_demo}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        # User errors (bad data, bad settings, wrong checkpoint): one clear line, exit 2.
        print(f"fastseg {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
