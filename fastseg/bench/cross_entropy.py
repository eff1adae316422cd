"""Benchmark suite: per-pixel softmax cross-entropy over NCHW logits.

Providers:
  fastseg-<backend>  fastseg.ops.softmax_cross_entropy(..., backend=<backend>), one per backend
                     that serves a tiny probe on this device (an explicit backend that cannot
                     serve the inputs raises NotImplementedError: that one is not live)
  eager              F.cross_entropy
  compile            torch.compile of a function calling F.cross_entropy
  reference          fastseg.ops._reference.softmax_cross_entropy (run by default only when
                     no fused backend is live, else on request: --providers reference)

Every problem: reduction="mean", ignore_index=255 with 5% of the pixels ignored (as in
Cityscapes / VOC labels), int64 targets (what F.cross_entropy takes), random logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.bench.harness import (
    Inputs,
    Problem,
    DeviceTables,
    Provider,
    TabledSuite,
    compile_provider,
    discover_fused,
    fused_backend_names,
    eager_provider,
    element_size,
    reference_provider,
)

IGNORE_INDEX = 255
IGNORED_FRACTION = 0.05
TARGET_DTYPE = torch.int64
LSE_BYTES = 8  # the per-pixel float32 max and log-sum-exp a fused forward saves for backward

# Segmentation workloads users run (N, C, H, W).
GPU_PROBLEMS = [
    ("cityscapes", (8, 19, 512, 1024)),
    ("ade20k", (16, 150, 512, 512)),
    ("voc", (16, 21, 512, 512)),
    ("camvid", (8, 12, 360, 480)),
    ("isbi", (4, 2, 388, 388)),          # U-Net's 388x388 output of a 572x572 tile
]
GPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_QUICK = ("cityscapes", "ade20k")

# CPU: the same workloads at batch 1-2 and a quarter of the resolution (same C), plus the
# CPU target shape.
CPU_PROBLEMS = [
    ("cpu-target", (4, 19, 256, 256)),
    ("cityscapes-s", (2, 19, 128, 256)),
    ("ade20k-s", (2, 150, 128, 128)),
    ("voc-s", (2, 21, 128, 128)),
    ("camvid-s", (2, 12, 90, 120)),
    ("isbi-s", (1, 2, 97, 97)),
]
CPU_DTYPES = (torch.float32,)
CPU_QUICK = ("cpu-target", "ade20k-s")



def eager_cross_entropy(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(input, target, ignore_index=IGNORE_INDEX, reduction="mean")


def _reference_fn():
    try:
        from fastseg.ops import _reference
    except Exception:  # noqa: BLE001 - a broken package still leaves eager and compile
        return None
    return getattr(_reference, "softmax_cross_entropy", None)


def _fastseg_fn():
    try:
        from fastseg import ops
    except Exception:  # noqa: BLE001
        return None
    return getattr(ops, "softmax_cross_entropy", None)


_backend_names = fused_backend_names


class CrossEntropySuite(TabledSuite):
    op = "cross_entropy"
    title = "softmax cross-entropy (NCHW logits, mean, ignore_index=255)"
    baseline = "eager"
    bytes_model = (
        "P = N*H*W pixels, C classes, e = logit element size, t = 8 (int64 targets), "
        "lse = 8 (float32 max and log-sum-exp per pixel). forward = P*C*e (read logits) + P*t "
        "(read targets) + loss write; backward = P*C*e (read logits) + P*t + P*lse (read the "
        "saved logsumexp) + P*C*e (write the gradient); full = forward + backward, i.e. "
        "logits read twice and the gradient written once. Ignored pixels are counted."
    )

    def __init__(self, problems_gpu=None, problems_cpu=None, quick_gpu=None, quick_cpu=None,
                 gpu_dtypes=None, cpu_dtypes=None):
        super().__init__(DeviceTables.of(
            problems_gpu or GPU_PROBLEMS, problems_cpu or CPU_PROBLEMS, quick_gpu or GPU_QUICK,
            quick_cpu or CPU_QUICK, gpu_dtypes or GPU_DTYPES, cpu_dtypes or CPU_DTYPES))

    # -- what to run ---------------------------------------------------------------------

    def problems(self, device: torch.device, quick: bool) -> list[Problem]:
        table, dtypes = self.tables.select(device, quick)
        params = {"reduction": "mean", "ignore_index": IGNORE_INDEX,
                  "ignored_fraction": IGNORED_FRACTION, "target_dtype": "int64"}
        return [
            Problem(name, shape, dtype, dict(params))
            for dtype in dtypes
            for name, shape in table
        ]

    def _discover(self, device: torch.device) -> tuple[list[str], dict[str, str]]:
        def compute() -> tuple[list[str], dict[str, str]]:
            fn = _fastseg_fn()

            def probe(backend: str) -> None:
                x = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
                t = torch.randint(0, 3, (2, 5, 7), device=device)
                t[0, 0, 0] = IGNORE_INDEX
                loss = fn(x, t, ignore_index=IGNORE_INDEX, backend=backend)
                loss.backward()

            missing = "fastseg.ops.softmax_cross_entropy is not available" if fn is None else None
            return discover_fused(probe, missing, _backend_names())

        return self.discovered(device, compute)

    def providers(self, device: torch.device) -> list[Provider]:
        providers: list[Provider] = []
        live, _ = self._discover(device)
        fn = _fastseg_fn()
        for backend in live:
            def fused(input, target, _backend=backend):
                return fn(input, target, ignore_index=IGNORE_INDEX, backend=_backend)

            providers.append(Provider(
                name=f"fastseg-{backend}", kind="fused", make=lambda problem, f=fused: f,
                note=f"fastseg.ops.softmax_cross_entropy(backend={backend!r})"))
        providers.append(eager_provider(eager_cross_entropy, note="F.cross_entropy"))
        providers.append(compile_provider(
            eager_cross_entropy, note="torch.compile of a function calling F.cross_entropy "
            "(default options, static shapes, compiled once per problem)"))
        reference = _reference_fn()
        if reference is not None:
            def ref(input, target):
                return reference(input, target, ignore_index=IGNORE_INDEX, reduction="mean")

            providers.append(reference_provider(
                lambda problem: ref, "fastseg.ops._reference.softmax_cross_entropy (pure PyTorch)",
                default=not live))
        return providers

    # -- inputs and bytes ----------------------------------------------------------------

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        n, c, *spatial = problem.shape
        logits = torch.randn(problem.shape, dtype=problem.dtype, device=device,
                             generator=generator).requires_grad_()
        target = torch.randint(0, c, (n, *spatial), dtype=TARGET_DTYPE, device=device,
                               generator=generator)
        ignored = torch.rand((n, *spatial), device=device, generator=generator) < IGNORED_FRACTION
        target.masked_fill_(ignored, IGNORE_INDEX)
        return Inputs(args=(logits, target), grad_tensors=(logits,))

    def min_bytes(self, problem: Problem, mode: str) -> int:
        n, c, *spatial = problem.shape
        pixels = n
        for s in spatial:
            pixels *= s
        e = element_size(problem.dtype)
        t = element_size(TARGET_DTYPE)
        loss = e  # reduction="mean": one scalar
        forward = pixels * c * e + pixels * t + loss
        backward = pixels * c * e + pixels * t + pixels * LSE_BYTES + pixels * c * e
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


SUITE = CrossEntropySuite()
