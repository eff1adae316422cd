"""Benchmark suite: whole models - FCN-8s, U-Net (valid) and U-Net (same) - fused vs eager.

    fastseg bench --ops models [--device cpu|cuda] [--quick] [--out DIR]

Each problem is one model and one task:

  <model>-train   one training step: optimizer.zero_grad(set_to_none=True), forward, loss,
                  loss.backward(), SGD(lr=1e-3, momentum=0.9).step()
  <model>-infer   one inference forward (model.eval(), torch.no_grad())

A provider's fn(x, target) is that whole step, so the suite runs the harness' "forward" mode
only (the inputs carry no grad leaves; the backward and the optimizer are inside the step):
in the tables "forward" means *one call of the step* - a full training step for -train.
Time and peak memory are the harness' (median over interleaved repeats; CUDA
max_memory_allocated / the CPU profiler's allocation events over one step).

Providers (each builds its own model per problem from the SAME weights: the eager model is
built under a fixed seed and its state_dict loaded into the others, strict):
  fastseg       the model with fused=True (DeconvAdd for FCN's upsampling + crop + skip-add;
                CropConcatConv2d for U-Net's crop + concat + conv + ReLU) and
                fastseg.nn.SoftmaxCrossEntropyLoss, every fastseg module on backend "auto"
  fastseg-cpu   (CPU only) the same with every fastseg module pinned to backend="cpu" (auto
                picks the pure-PyTorch reference for some ops on the CPU)
  eager         the model with fused=False + torch.nn.CrossEntropyLoss (the baseline)
  compile       torch.compile (default options) of the eager step function (train: forward +
                loss + backward + optimizer step; infer: the model), compiled afresh per
                problem in the untimed setup (recorded as setup_s)

The check (harness) compares each provider's first step with eager's on the same inputs and
weights: train -> (loss, logits, grad of the first conv's weight); infer -> the logits.
Dropout (FCN's fc6/fc7) draws its masks from the global RNG, which every step reseeds, so
the masks agree between providers.

Amdahl (the summary): for each problem, PROFILED_STEPS (3) extra steps of the eager model (and of
the fastseg models) are run under torch.profiler and averaged (CPU activities; on CUDA also CUDA activities), on a
separate copy of the model, after one warm-up step. The parts fastseg replaces are tagged
without touching the model files, by wrapping (instance attributes, not class edits):
  FCN-8s    FCN._upsample (all three upscore* calls: the ConvTranspose2d, its crop slice,
            the skip's crop slice and the add; fused: the DeconvAdd call)
  U-Net     every decoder block's conv1 module (CropConcatConv2dEager: crop slice + torch.cat
            + Conv2d + ReLU; fused: CropConcatConv2d)
  loss      the criterion call (nn.CrossEntropyLoss / SoftmaxCrossEntropyLoss)
in torch.profiler.record_function ranges. A part's time = the forward range's duration + the
backward: every "autograd::engine::evaluate_function: <Node>" event whose sequence number is
that of a forward op recorded inside the range (autograd tags each backward node with the
sequence number of the forward op that made it). The step's time = an outer range around
the whole step. share = part time / step time (profiled; the profiler's overhead is in both);
recovered = (eager time - fastseg time) / eager's part time, from the harness' medians.
Peak memory share per part is not attributed (the peak memory of eager vs fastseg is in the
tables).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any

import torch
from torch import nn

from fastseg.bench.harness import (
    DTYPE_SHORT,
    Inputs,
    Problem,
    Provider,
    Suite,
    element_size,
)

LR = 1e-3
MOMENTUM = 0.9
SEED = 0
STEP_SEED = 1234
PART_PREFIX = "fastseg.bench.models:"
STEP_RANGE = PART_PREFIX + "step"
PROFILED_STEPS = 3   # profiled steps per model (after one warm-up step), averaged

# name -> model spec. model: "fcn8s" | "unet"; kwargs go to the factory.
GPU_MODELS = [
    ("fcn8s", dict(model="fcn8s", batch=8, size=512, classes=21, in_channels=3,
                   kwargs=dict(width_mult=1.0))),
    ("unet-valid", dict(model="unet", batch=4, size=572, classes=2, in_channels=1,
                        kwargs=dict(base_channels=64, depth=5, padding="valid"))),
    ("unet-same", dict(model="unet", batch=8, size=512, classes=2, in_channels=1,
                       kwargs=dict(base_channels=64, depth=5, padding="same"))),
]
CPU_MODELS = [
    ("fcn8s", dict(model="fcn8s", batch=2, size=128, classes=21, in_channels=3,
                   kwargs=dict(width_mult=1 / 16))),
    ("unet-valid", dict(model="unet", batch=1, size=188, classes=2, in_channels=1,
                        kwargs=dict(base_channels=8, depth=4, padding="valid"))),
    ("unet-same", dict(model="unet", batch=2, size=128, classes=2, in_channels=1,
                       kwargs=dict(base_channels=8, depth=4, padding="same"))),
]
# --quick: one tiny training problem per model.
QUICK_GPU_MODELS = [
    ("fcn8s", dict(model="fcn8s", batch=1, size=256, classes=21, in_channels=3,
                   kwargs=dict(width_mult=0.25))),
    ("unet-valid", dict(model="unet", batch=1, size=188, classes=2, in_channels=1,
                        kwargs=dict(base_channels=16, depth=4, padding="valid"))),
    ("unet-same", dict(model="unet", batch=1, size=128, classes=2, in_channels=1,
                       kwargs=dict(base_channels=16, depth=4, padding="same"))),
]
QUICK_CPU_MODELS = [
    ("fcn8s", dict(model="fcn8s", batch=1, size=64, classes=21, in_channels=3,
                   kwargs=dict(width_mult=1 / 32))),
    ("unet-valid", dict(model="unet", batch=1, size=60, classes=2, in_channels=1,
                        kwargs=dict(base_channels=4, depth=3, padding="valid"))),
    ("unet-same", dict(model="unet", batch=1, size=64, classes=2, in_channels=1,
                       kwargs=dict(base_channels=4, depth=3, padding="same"))),
]
TASKS = ("train", "infer")
GPU_DTYPES = (torch.bfloat16, torch.float32)   # bf16 = autocast; weights stay fp32
CPU_DTYPES = (torch.float32,)


def _valid_size(spec: dict) -> int:
    if spec["model"] != "unet" or spec["kwargs"].get("padding") != "valid":
        return spec["size"]
    from fastseg.models.unet import unet_valid_input_size

    return unet_valid_input_size(spec["size"], spec["kwargs"]["depth"], round="up")


def build_model(params: dict, fused: bool) -> nn.Module:
    """The model of a problem, built under a fixed seed (so every build has the same weights)."""
    import fastseg.models as models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if params["model"] == "fcn8s":
            return models.fcn8s(num_classes=params["classes"], in_channels=params["in_channels"],
                                fused=fused, **params["kwargs"])
        return models.unet(num_classes=params["classes"], in_channels=params["in_channels"],
                           fused=fused, **params["kwargs"])


def _pin_backend(module: nn.Module, backend: str) -> None:
    for m in module.modules():
        if m.__class__.__module__.startswith("fastseg.nn") and hasattr(m, "backend"):
            m.backend = backend


def _first_weight(model: nn.Module) -> nn.Parameter:
    for p in model.parameters():
        if p.dim() == 4:
            return p
    return next(model.parameters())


class _Net:
    """One provider's model + loss + optimizer for one problem."""

    def __init__(self, params: dict, device: torch.device, kind: str,
                 backend: str | None = None):
        eager = build_model(params, fused=False)
        if kind == "fused":
            model = build_model(params, fused=True)
            model.load_state_dict(eager.state_dict(), strict=True)
            from fastseg.nn import SoftmaxCrossEntropyLoss

            criterion: nn.Module = SoftmaxCrossEntropyLoss()
            if backend is not None:
                _pin_backend(model, backend)
                criterion.backend = backend
        else:
            model, criterion = eager, nn.CrossEntropyLoss()
        self.params, self.device = params, device
        self.model = model.to(device)
        self.criterion = criterion.to(device)
        self.train = params["task"] == "train"
        self.model.train(self.train)
        self.optimizer = (torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
                          if self.train else None)
        self.first = _first_weight(self.model)
        dtype = params["autocast"]
        self.autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype))
                         if dtype is not None else None)

    def _ctx(self):
        return self.autocast if self.autocast is not None else contextlib.nullcontext()

    def train_step(self, x, target):
        self.optimizer.zero_grad(set_to_none=True)
        with self._ctx():
            out = self.model(x)
            loss = self.criterion(out, target)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach(), self.first.grad

    def infer_step(self, x, target=None):
        with torch.no_grad(), self._ctx():
            return self.model(x)

    def step_fn(self, compiled: bool = False):
        if self.train:
            inner = torch.compile(self.train_step) if compiled else self.train_step
        else:
            if compiled:
                self.model = torch.compile(self.model)
            inner = self.infer_step

        def step(x, target):
            torch.manual_seed(STEP_SEED)  # the same dropout masks in every provider
            return inner(x, target)

        return step


# --------------------------------------------------------------------------------------------
# Amdahl: which share of a step the replaced parts take
# --------------------------------------------------------------------------------------------


def _tag(net: _Net) -> None:
    """Wrap the parts fastseg replaces in record_function ranges (instance attributes only)."""
    from torch.profiler import record_function

    def wrap(fn, label):
        @functools.wraps(fn)
        def tagged(*args, **kwargs):
            with record_function(PART_PREFIX + label):
                return fn(*args, **kwargs)
        return tagged

    model = net.model
    if net.params["model"] == "fcn8s":
        model._upsample = wrap(model._upsample, "upsample_add")
    else:
        for block in model.decoder:
            block.conv1.forward = wrap(block.conv1.forward, "crop_concat_conv")
    net.criterion.forward = wrap(net.criterion.forward, "loss")


def profile_parts(params: dict, device: torch.device, kind: str,
                  backend: str | None = None, inputs: Inputs | None = None) -> dict[str, Any]:
    """PROFILED_STEPS profiled steps (after one warm-up step) of a fresh model, averaged:
    {"step_ms", "forward_ms": {part: ms}, "backward_ms": {part: ms}, "parts_ms": {part: ms}}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from fastseg.bench.harness import _quiet_stderr

    net = _Net(params, device, kind, backend)
    _tag(net)
    step = net.step_fn()
    x, target = inputs.args
    step(x, target)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with _quiet_stderr():
        with profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                with record_function(STEP_RANGE):
                    step(x, target)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
    events = prof.events()
    use_cuda = device.type == "cuda"

    def duration(e) -> float:  # ms; on CUDA the device time of the ops under e where known
        if use_cuda:
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t:
                return t / 1e3
        return e.cpu_time_total / 1e3

    parts: dict[str, float] = {}
    seq_to_part: dict[int, str] = {}
    step_ms = 0.0
    for e in events:
        if e.name == STEP_RANGE:
            step_ms += e.cpu_time_total / 1e3
            continue
        if not e.name.startswith(PART_PREFIX):
            continue
        label = e.name[len(PART_PREFIX):]
        parts[label] = parts.get(label, 0.0) + duration(e)
        stack = list(e.cpu_children)
        while stack:
            child = stack.pop()
            if child.sequence_nr is not None and child.sequence_nr >= 0:
                seq_to_part.setdefault(child.sequence_nr, label)
            stack.extend(child.cpu_children)
    backward: dict[str, float] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in seq_to_part:
            label = seq_to_part[e.sequence_nr]
            backward[label] = backward.get(label, 0.0) + duration(e)
    if use_cuda:  # the step's device time: the sum over top-level ops
        step_ms = sum(duration(e) for e in events if e.cpu_parent is not None
                      and e.cpu_parent.name == STEP_RANGE) or step_ms
    n = PROFILED_STEPS
    parts = {k: v / n for k, v in parts.items()}
    backward = {k: v / n for k, v in backward.items()}
    result = {"step_ms": step_ms / n, "forward_ms": parts, "backward_ms": backward,
              "time_base": "cuda" if use_cuda else "cpu", "profiled_steps": n}
    result["parts_ms"] = {k: parts.get(k, 0.0) + backward.get(k, 0.0)
                          for k in sorted(set(parts) | set(backward))}
    return result


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


class ModelsSuite(Suite):
    op = "models"
    title = ("Whole models: FCN-8s, U-Net valid, U-Net same - training step (forward + loss + "
             "backward + SGD) and inference; 'forward' = one call of the step")
    modes = ("forward",)
    baseline = "eager"
    bytes_model = (
        "a loose lower bound, not a roofline: infer = e*(input + logits) + 4*params (the "
        "weights read once); train = infer + 4*params*4 (grad written, weight and momentum "
        "read and written) - the activations are not counted."
    )

    def __init__(self, models_gpu=None, models_cpu=None, quick_gpu=None, quick_cpu=None,
                 gpu_dtypes=None, cpu_dtypes=None, tasks=None, amdahl: bool = True):
        self.models_gpu = list(models_gpu or GPU_MODELS)
        self.models_cpu = list(models_cpu or CPU_MODELS)
        self.quick_gpu = list(quick_gpu or QUICK_GPU_MODELS)
        self.quick_cpu = list(quick_cpu or QUICK_CPU_MODELS)
        self.gpu_dtypes = tuple(gpu_dtypes or GPU_DTYPES)
        self.cpu_dtypes = tuple(cpu_dtypes or CPU_DTYPES)
        self.tasks = tuple(tasks or TASKS)
        self.amdahl = amdahl
        self._profiles: dict[tuple[str, str, str], dict] = {}
        self._param_counts: dict[str, int] = {}

    def problems(self, device: torch.device, quick: bool) -> list[Problem]:
        cuda = device.type == "cuda"
        table = (self.quick_gpu if cuda else self.quick_cpu) if quick else (
            self.models_gpu if cuda else self.models_cpu)
        dtypes = self.gpu_dtypes if cuda else self.cpu_dtypes
        if quick:
            dtypes = dtypes[:1]
        tasks = ("train",) if quick else self.tasks
        problems = []
        for dtype in dtypes:
            for name, spec in table:
                size = _valid_size(spec)
                for task in tasks:
                    params = dict(copy.deepcopy(spec), size=size, task=task,
                                  autocast=None if dtype == torch.float32
                                  else str(dtype).replace("torch.", ""))
                    shape = (spec["batch"], spec["in_channels"], size, size)
                    problems.append(Problem(f"{name}-{task}", shape, dtype, params))
        return problems

    def providers(self, device: torch.device) -> list[Provider]:
        def maker(kind, backend=None, compiled=False, profiled=True, label=""):
            def make(problem: Problem):
                if compiled:
                    torch._dynamo.reset()
                net = _Net(problem.params, device, kind, backend)
                if self.amdahl and profiled:
                    self._profile(problem, device, kind, backend, label)
                return net.step_fn(compiled=compiled)
            return make

        providers = [
            Provider("fastseg", "fused", maker("fused", None, label="fastseg"),
                     note="fused=True model + fastseg.nn.SoftmaxCrossEntropyLoss, backend auto"),
        ]
        if device.type == "cpu":
            providers.append(Provider(
                "fastseg-cpu", "fused", maker("fused", "cpu", label="fastseg-cpu"),
                note="fused=True model + SoftmaxCrossEntropyLoss, every fastseg module pinned "
                     "to backend='cpu'"))
        providers.append(Provider(
            "eager", "eager", maker("eager", label="eager"),
            note="fused=False model + torch.nn.CrossEntropyLoss (same weights)"))
        providers.append(Provider(
            "compile", "compile", maker("eager", compiled=True, profiled=False),
            note="torch.compile (default options) of the eager step (train: forward + loss + "
                 "backward + SGD step; infer: the model), compiled once per problem"))
        return providers

    def _profile(self, problem, device, kind, backend, label):
        key = (problem.name, str(problem.dtype), label)
        try:
            gen = torch.Generator(device=device).manual_seed(SEED)
            self._profiles[key] = profile_parts(problem.params, device, kind, backend,
                                                self.make_inputs(problem, device, gen))
        except Exception as e:  # noqa: BLE001 - the profile must not stop the benchmark
            self._profiles[key] = {"error": f"{type(e).__name__}: {e}"[:300]}

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        p = problem.params
        n, c, h, w = problem.shape
        x = torch.randn((n, c, h, w), device=device, generator=generator)
        if p["model"] == "unet" and p["kwargs"].get("padding") == "valid":
            from fastseg.models.unet import unet_output_size

            h, w = unet_output_size((h, w), p["kwargs"]["depth"], padding="valid")
        target = torch.randint(0, p["classes"], (n, h, w), device=device, generator=generator)
        return Inputs(args=(x, target))

    def _params_count(self, problem: Problem) -> int:
        key = repr(problem.params["kwargs"]) + problem.params["model"] + str(problem.params["classes"])
        if key not in self._param_counts:
            model = build_model(problem.params, fused=False)
            self._param_counts[key] = sum(t.numel() for t in model.state_dict().values())
        return self._param_counts[key]

    def min_bytes(self, problem: Problem, mode: str) -> int:
        p = problem.params
        n, c, h, w = problem.shape
        e = element_size(problem.dtype)
        weights = 4 * self._params_count(problem)
        total = e * n * c * h * w + e * n * p["classes"] * h * w + weights
        if p["task"] == "train":
            total += 4 * weights
        return int(total)

    def tolerance(self, problem: Problem) -> float:
        # Whole networks: fp32 reductions in a different order (and TF32 convolutions on a
        # GPU) through ~20 layers; bf16 autocast as in the other suites.
        return 5e-2 if problem.dtype != torch.float32 else 2e-3

    # -- the report ----------------------------------------------------------------------

    def summary(self, records: list[dict], header: dict) -> list[str]:
        index = {(r["problem"], r["dtype"], r["provider"]): r for r in records
                 if r["status"] == "ok" and r.get("time_ms")}
        groups = []
        for r in records:
            g = (r["problem"], r["dtype"])
            if g not in groups:
                groups.append(g)
        fused = [p for p in ("fastseg", "fastseg-cpu")
                 if any(k[2] == p for k in index)]

        def ratio(a, b):
            return f"{a / b:.2f}x" if a and b else "-"

        lines = ["### models: speedup and peak memory vs eager (and vs compile)", "",
                 "speedup = eager time / provider time (> 1: faster); memory = provider "
                 "peak / eager peak (< 1: less). CPU target: >= 1.05x eager and lower peak.",
                 ""]
        head = ["problem", "dtype", "eager ms", "eager peak MiB"]
        for f in fused:
            head += [f"{f} speedup", f"{f} mem", f"{f} vs compile"]
        head += ["compile speedup", "compile mem"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for problem, dtype in groups:
            e = index.get((problem, dtype, "eager"))
            c = index.get((problem, dtype, "compile"))
            row = [problem, DTYPE_SHORT.get(getattr(torch, dtype, None), dtype),
                   f"{e['time_ms']:.1f}" if e else "-",
                   f"{e['peak_bytes'] / 2**20:.1f}" if e and e.get("peak_bytes") else "-"]
            for f in fused:
                r = index.get((problem, dtype, f))
                row += [ratio(e and e["time_ms"], r and r["time_ms"]),
                        ratio(r and r.get("peak_bytes"), e and e.get("peak_bytes")),
                        ratio(c and c["time_ms"], r and r["time_ms"])]
            row += [ratio(e and e["time_ms"], c and c["time_ms"]),
                    ratio(c and c.get("peak_bytes"), e and e.get("peak_bytes"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

        if not self._profiles:
            return lines
        lines += ["### models: Amdahl - eager's step time in the parts fastseg replaces", "",
                  f"{PROFILED_STEPS} profiled steps per model, averaged (torch.profiler, after a warm-up step, a fresh "
                  "copy of the model). Parts tagged by record_function ranges around "
                  "FCN._upsample (deconv + crops + add), each U-Net decoder conv1 "
                  "(crop + cat + conv + ReLU) and the loss; their backward = the "
                  "autograd evaluate_function events whose sequence number belongs to a "
                  "forward op inside the range. share = parts / step (profiled ms); "
                  "parts saved = (eager parts - fastseg parts) / eager parts, both profiled (the "
                  "same ranges in the fused model); recovered = (eager - fastseg median time) / "
                  "eager's parts time (profiled share x eager median) - the whole-step "
                  "difference, within the timing noise when it is a few percent.",
                  ""]
        lines += ["| problem | dtype | eager step ms (prof.) | eager part ms: fwd+bwd each | "
                  "share | provider | its part ms | parts saved (prof.) | "
                  "recovered of the share (medians) |",
                  "|---|---|---:|---|---:|---|---|---:|---:|"]
        for problem, dtype in groups:
            prof = self._profiles.get((problem, str(getattr(torch, dtype, dtype)), "eager"))
            if prof is None:
                continue
            if "error" in prof:
                lines.append(f"| {problem} | {dtype} | profile failed: {prof['error']} "
                             "| | | | | | |")
                continue
            step = prof["step_ms"] or 0.0
            part_total = sum(prof["parts_ms"].values())
            share = part_total / step if step else None
            parts = ", ".join(f"{k} {v:.1f}" for k, v in prof["parts_ms"].items())
            e = index.get((problem, dtype, "eager"))
            for f in fused or ["fastseg"]:
                fp = self._profiles.get((problem, str(getattr(torch, dtype, dtype)), f)) or {}
                fparts = ", ".join(f"{k} {v:.1f}" for k, v in fp.get("parts_ms", {}).items()) \
                    or fp.get("error", "-")
                saved = "-"
                if fp.get("parts_ms") and part_total:
                    saved = f"{(part_total - sum(fp['parts_ms'].values())) / part_total:+.0%}"
                r = index.get((problem, dtype, f))
                recovered = "-"
                if e and r and share:
                    part_ms = share * e["time_ms"]
                    recovered = f"{(e['time_ms'] - r['time_ms']) / part_ms:+.0%}"
                lines.append(
                    f"| {problem} | {DTYPE_SHORT.get(getattr(torch, dtype, None), dtype)} | "
                    f"{step:.1f} | {parts} | "
                    f"{'-' if share is None else f'{share:.0%}'} | {f} | {fparts} | "
                    f"{saved} | {recovered} |")
        lines.append("")
        return lines


SUITE = ModelsSuite()
