"""Benchmark suite: FCN's decoder - upsample (bilinear or deconvolution) + crop + skip-add.

Every problem is one decoder level in one of two forms, run side by side:

  bilinear  fastseg.ops.upsample_add(x, skip, size=(Ho, Wo), skip_offset=(oy, ox))
            vs  F.interpolate(x, size=(Ho, Wo), mode="bilinear") + skip[:, :, oy:oy+Ho, ox:ox+Wo]
  deconv    fastseg.ops.deconv_add(x, weight, stride, skip, crop, skip_offset, (Ho, Wo))
            vs  F.conv_transpose2d(x, weight, stride=s, groups=C)[:, :, cy:cy+Ho, cx:cx+Wo]
                + skip[:, :, oy:oy+Ho, ox:ox+Wo]

Providers:
  fastseg-<backend>  the fused op with backend=<backend>, one per backend that serves a tiny
                     probe of upsample_add or deconv_add on this device (cpu on the CPU; cuda
                     and triton on a GPU); a form whose op that backend cannot serve is
                     recorded "unsupported"
  eager              the eager composition above
  compile            torch.compile of that eager composition (compiled once per problem)
  reference          fastseg.ops._reference.upsample_add / deconv_add (run by default only
                     when no fused backend is live, else on request: --providers reference)

Shapes: the three decoder levels of FCN-8s (the reference Caffe net: conv1_1 pad 100, 2x2
ceil-mode pools, fc6 7x7 unpadded; crops 5, 9, 31) for VOC at 500x500 and 512x512, batch 16,
21 classes (see `fcn8s_levels`):

    input   score_fr  upscore2 + score_pool4   upscore_pool4 + score_pool3   upscore8
    500     16x16     34x34  + 44x44 at 5      70x70  + 88x88 at 9          568x568 at 31 -> 500
    512     17x17     36x36  + 45x45 at 5      74x74  + 89x89 at 9          600x600 at 31 -> 512

(upscore2 / upscore_pool4: deconvolution k4 s2; upscore8: k16 s8, no skip; the problems
voc500-pool4, voc500-pool3, voc500-x8 and voc512-*), plus the final x8 of ADE20K (ade20k-x8:
16, 150, 64x64 -> 512x512) and Cityscapes (city-x8: 8, 19, 64x128 -> 512x1024), whose k16 s8
deconvolution (520x520 / 520x1032) is centre-cropped at 4. The bilinear form of a level has
the same x, skip, window and output size as its deconvolution form, so both move the same
bytes. The deconvolution weight is FCN's bilinear kernel, learnable (requires grad, as
fastseg.nn.DeconvAdd's default), so its gradient is part of every backward. The CPU runs the
same levels at batch 2 (the x8 finals at half the height and width, from 32x32 / 32x64, and
Cityscapes' also at 128x256); the GPU runs float32 and bfloat16, the CPU float32.

Minimal bytes (e = element size; X = N*C*H*W elements of x, O = N*C*Ho*Wo of the output,
S = N*C*Hs*Ws of the whole skip and V = O of its window (0 without a skip), K = C*kh*kw of
the weight (0 for bilinear)):
  forward  = e * (X + V + K + O)          x, the skip window and the weight read once, the
                                          output written once
  backward = e * (O + X + S) + deconv: e * (X + 2K)
                                          the output gradient read once, grad x and the whole
                                          grad skip (zeros outside the window included)
                                          written once; a deconvolution also reads x and the
                                          weight again (grad weight needs x) and writes
                                          grad weight
  full     = forward + backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fastseg.bench.harness import (
    Inputs,
    Problem,
    DeviceTables,
    Provider,
    TabledSuite,
    discover_backends,
    fused_backend_names,
    element_size,
    params_compile_provider,
    params_eager_provider,
    reference_provider,
)

FORMS = ("bilinear", "deconv")
OPS = {"bilinear": "upsample_add", "deconv": "deconv_add"}

# FCN-8s (Long et al., voc-fcn8s): the crop offsets of its Crop layers.
FCN8S_CROPS = {"upscore2": 5, "upscore_pool4": 9, "upscore8": 31}
FCN8S_DECONV = {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)}  # (k, s)


def fcn8s_sizes(size: int) -> dict[str, int]:
    """The spatial sizes (one axis) inside the reference FCN-8s for an input of `size`:
    conv1_1 3x3 pad 100 (+198), 3x3 pad-1 convs keep the size, five 2x2 stride-2 ceil-mode
    pools, fc6 7x7 unpadded (-6); the decoder's k4 s2 / k16 s8 deconvolutions."""
    s = size + 2 * 100 - 2
    pools = []
    for _ in range(5):
        s = math.ceil((s - 2) / 2) + 1
        pools.append(s)
    score_fr = pools[4] - 6
    upscore2 = (score_fr - 1) * 2 + 4
    upscore_pool4 = (upscore2 - 1) * 2 + 4
    upscore8 = (upscore_pool4 - 1) * 8 + 16
    return {"pool3": pools[2], "pool4": pools[3], "score_fr": score_fr, "upscore2": upscore2,
            "upscore_pool4": upscore_pool4, "upscore8": upscore8, "input": size}


def fcn8s_levels(batch: int, classes: int, height: int, width: int) -> list[tuple[str, dict]]:
    """FCN-8s' three decoder levels as (level, geometry) for a (height, width) input."""
    h, w = fcn8s_sizes(height), fcn8s_sizes(width)
    levels = []
    for level, x_key, skip_key, out_key in (
        ("upscore2", "score_fr", "pool4", "upscore2"),
        ("upscore_pool4", "upscore2", "pool3", "upscore_pool4"),
        ("upscore8", "upscore_pool4", None, "input"),
    ):
        k, s = FCN8S_DECONV[level]
        crop = FCN8S_CROPS[level]
        geometry = {
            "x": (batch, classes, h[x_key], w[x_key]),
            "skip": None if skip_key is None else (batch, classes, h[skip_key], w[skip_key]),
            "out": (h[out_key], w[out_key]),
            "kernel": k, "stride": s,
            # With a skip, the skip is cropped at the offset and the whole deconvolution is
            # kept; upscore8 (no skip) crops the deconvolution itself.
            "skip_offset": (crop, crop) if skip_key else (0, 0),
            "crop": (0, 0) if skip_key else (crop, crop),
        }
        levels.append((level, geometry))
    return levels


def final_x8(batch: int, classes: int, height: int, width: int) -> dict:
    """The last x8 upsampling of a (height, width) prediction from (height/8, width/8): a k16
    s8 deconvolution, centre-cropped at 4, no skip."""
    return {"level": "final_x8", "x": (batch, classes, height // 8, width // 8), "skip": None,
            "out": (height, width),
            "kernel": 16, "stride": 8, "skip_offset": (0, 0), "crop": (4, 4)}


# Short names of the levels (by what each adds), so that the chart's labels stay legible.
LEVEL_NAMES = {"upscore2": "pool4", "upscore_pool4": "pool3", "upscore8": "x8"}


def _voc(prefix: str, batch: int, size: int) -> list[tuple[str, dict]]:
    return [(f"{prefix}-{LEVEL_NAMES[level]}", dict(g, level=level))
            for level, g in fcn8s_levels(batch, 21, size, size)]


# name -> geometry. Problem names are "<level name>-<form>": voc500-pool4 is upscore2 + the
# cropped score_pool4, voc500-pool3 upscore_pool4 + score_pool3, voc500-x8 upscore8.
GPU_LEVELS = [
    *_voc("voc500", 16, 500),
    *_voc("voc512", 16, 512),
    ("ade20k-x8", final_x8(16, 150, 512, 512)),
    ("city-x8", final_x8(8, 19, 512, 1024)),
]
GPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_QUICK = ("voc500-pool3", "ade20k-x8")

CPU_LEVELS = [
    *_voc("voc500", 2, 500),
    *_voc("voc512", 2, 512),
    ("ade20k-x8-s", final_x8(2, 150, 256, 256)),
    ("city-x8-s", final_x8(2, 19, 256, 512)),
    ("city-x8-xs", final_x8(2, 19, 128, 256)),
]
CPU_DTYPES = (torch.float32,)
# --quick on the CPU (`fastseg bench --quick`, `make demo`): one real FCN-8s skip level and a
# final x8 capped at 128x256 (eager's depthwise conv_transpose2d backward alone takes about a
# second at 256x512 here).
CPU_QUICK = ("voc500-pool3", "city-x8-xs")


def problem_name(level: str, form: str) -> str:
    return f"{level}-{form}"


def _params(form: str, name: str, g: dict) -> dict[str, Any]:
    params: dict[str, Any] = {
        "form": form, "op": OPS[form], "level": name, "fcn_layer": g.get("level", name),
        "skip_shape": None if g["skip"] is None else list(g["skip"]),
        "skip_offset": list(g["skip_offset"]), "output_size": list(g["out"]),
    }
    if form == "bilinear":
        params["align_corners"] = False
    else:
        params.update(kernel=g["kernel"], stride=g["stride"], crop=list(g["crop"]),
                      weight_requires_grad=True)
    return params


# --- the eager compositions and the fused calls --------------------------------------------


def eager_fn(params: dict) -> Any:
    """The eager composition of one problem: fn(x, skip) or fn(x, weight, skip)."""
    ho, wo = params["output_size"]
    oy, ox = params["skip_offset"]
    if params["form"] == "bilinear":
        align_corners = params["align_corners"]

        def bilinear(x, skip=None):
            up = F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=align_corners)
            return up if skip is None else up + skip[:, :, oy:oy + ho, ox:ox + wo]

        return bilinear
    stride = params["stride"]
    cy, cx = params["crop"]

    def deconv(x, weight, skip=None):
        full = F.conv_transpose2d(x, weight, stride=stride, groups=x.shape[1])
        out = full[:, :, cy:cy + ho, cx:cx + wo]
        return out if skip is None else out + skip[:, :, oy:oy + ho, ox:ox + wo]

    return deconv


def fastseg_fn(params: dict, backend: str | None) -> Any:
    """The fused call of one problem (backend=None: fastseg's reference composition)."""
    from fastseg import ops

    size = tuple(params["output_size"])
    offset = tuple(params["skip_offset"])
    if params["form"] == "bilinear":
        if backend is None:
            from fastseg.ops import _reference

            return lambda x, skip=None: _reference.upsample_add(
                x, skip, size, None, params["align_corners"], offset)
        return lambda x, skip=None: ops.upsample_add(
            x, skip, size=size, align_corners=params["align_corners"], skip_offset=offset,
            backend=backend)
    stride, crop = params["stride"], tuple(params["crop"])
    if backend is None:
        from fastseg.ops import _reference

        return lambda x, weight, skip=None: _reference.deconv_add(
            x, weight, stride, skip, crop, offset, size)
    return lambda x, weight, skip=None: ops.deconv_add(
        x, weight, stride, skip, crop, offset, size, backend=backend)


def _fastseg_ops() -> dict[str, Any]:
    try:
        from fastseg import ops
    except Exception:  # noqa: BLE001 - a broken package still leaves eager and compile
        return {}
    return {form: getattr(ops, op, None) for form, op in OPS.items()
            if getattr(ops, op, None) is not None}


def _reference_available() -> bool:
    try:
        from fastseg.ops import _reference
    except Exception:  # noqa: BLE001
        return False
    return all(hasattr(_reference, op) for op in OPS.values())


_backend_names = fused_backend_names


def _probe(form: str, backend: str, device: torch.device) -> None:
    """A tiny forward + backward of one form with an explicit backend."""
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    skip = torch.randn(2, 3, 11, 12, device=device, requires_grad=True)
    if form == "bilinear":
        fn = fastseg_fn({"form": form, "output_size": [8, 10], "skip_offset": [1, 2],
                         "align_corners": False}, backend)
        out = fn(x, skip)
        inputs = (x, skip)
    else:
        weight = torch.randn(3, 1, 4, 4, device=device, requires_grad=True)
        fn = fastseg_fn({"form": form, "output_size": [9, 11], "skip_offset": [1, 1],
                         "stride": 2, "crop": [1, 1]}, backend)
        out = fn(x, weight, skip)
        inputs = (x, weight, skip)
    torch.autograd.grad(out, inputs, torch.ones_like(out))


class UpsampleAddSuite(TabledSuite):
    op = "upsample_add"
    title = "FCN decoder: upsample (bilinear / deconvolution) + crop + skip-add"
    baseline = "eager"
    bytes_model = (
        "e = element size; X = N*C*H*W (x), O = N*C*Ho*Wo (output), V = O (the skip window "
        "read; 0 without a skip), S = N*C*Hs*Ws (the whole skip, whose gradient is written in "
        "full), K = C*kh*kw (deconv weight; 0 for bilinear). forward = e*(X + V + K + O); "
        "backward = e*(O + X + S) (grad out read, grad x and grad skip written) + for deconv "
        "e*(X + 2K) (x and the weight read again for grad weight, grad weight written); "
        "full = forward + backward."
    )

    def __init__(self, levels_gpu=None, levels_cpu=None, quick_gpu=None, quick_cpu=None,
                 gpu_dtypes=None, cpu_dtypes=None, forms=FORMS):
        super().__init__(DeviceTables.of(
            levels_gpu or GPU_LEVELS, levels_cpu or CPU_LEVELS, quick_gpu or GPU_QUICK,
            quick_cpu or CPU_QUICK, gpu_dtypes or GPU_DTYPES, cpu_dtypes or CPU_DTYPES))
        self.forms = tuple(forms)

    # -- what to run ---------------------------------------------------------------------

    def problems(self, device: torch.device, quick: bool) -> list[Problem]:
        levels, dtypes = self.tables.select(device, quick)
        # Level-major, then dtype, then form: the two forms of a level sit side by side, and
        # a run cut short by --max-time still has every dtype of the levels it reached.
        return [
            Problem(problem_name(level, form), tuple(g["x"]), dtype, _params(form, level, g))
            for level, g in levels
            for dtype in dtypes
            for form in self.forms
        ]

    def _discover(self, device: torch.device) -> dict[str, tuple[list[str], dict[str, str]]]:
        """Per form: (live backends, {backend: why not})."""
        def compute() -> dict[str, tuple[list[str], dict[str, str]]]:
            fns = _fastseg_ops()
            found = {}
            for form in self.forms:
                if form not in fns:
                    found[form] = ([], {"fastseg": f"fastseg.ops.{OPS[form]} is not available"})
                    continue
                found[form] = discover_backends(
                    lambda backend, _form=form: _probe(_form, backend, device), _backend_names())
            return found

        return self.discovered(device, compute)

    def _live(self, device: torch.device) -> list[str]:
        live: list[str] = []
        for names, _ in self._discover(device).values():
            live += [n for n in names if n not in live]
        return live

    def unavailable(self, device: torch.device) -> dict[str, str]:
        out: dict[str, str] = {}
        found = self._discover(device)
        names = []
        for _, reasons in found.values():
            names += [n for n in reasons if n not in names]
        for name in names:
            why = {form: reasons[name] for form, (_, reasons) in found.items() if name in reasons}
            label = name if name == "fastseg" else f"fastseg-{name}"
            if len(why) == len(found) and len(set(why.values())) == 1:
                out[label] = next(iter(why.values()))
            else:
                for form, reason in why.items():
                    out[f"{label} ({OPS[form]})"] = reason
        return out

    def providers(self, device: torch.device) -> list[Provider]:
        providers: list[Provider] = []
        found = self._discover(device)
        for backend in self._live(device):
            def make(problem: Problem, _backend=backend) -> Any:
                form = problem.params["form"]
                live, reasons = found.get(form, ([], {}))
                if _backend not in live:
                    raise NotImplementedError(
                        f"fastseg.ops.{OPS[form]}: backend {_backend!r} is not live here "
                        f"({reasons.get(_backend, 'not probed')})")
                return fastseg_fn(problem.params, _backend)

            providers.append(Provider(
                name=f"fastseg-{backend}", kind="fused", make=make,
                note=f"fastseg.ops.upsample_add / deconv_add(backend={backend!r})"))

        providers.append(params_eager_provider(
            eager_fn, note="F.interpolate(mode='bilinear') + the cropped skip; "
                           "F.conv_transpose2d(groups=C) + slice + the cropped skip"))
        providers.append(params_compile_provider(
            eager_fn, note="torch.compile of the eager composition (default options, static "
            "shapes, compiled once per problem)"))
        if _reference_available():
            providers.append(reference_provider(
                lambda problem: fastseg_fn(problem.params, None),
                "fastseg.ops._reference.upsample_add / deconv_add (pure PyTorch)",
                default=not self._live(device)))
        return providers

    # -- inputs and bytes ----------------------------------------------------------------

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        p = problem.params

        def randn(shape):
            return torch.randn(tuple(shape), dtype=problem.dtype, device=device,
                               generator=generator).requires_grad_()

        x = randn(problem.shape)
        skip = None if p["skip_shape"] is None else randn(p["skip_shape"])
        if p["form"] == "bilinear":
            args: tuple = (x,) if skip is None else (x, skip)
        else:
            c = problem.shape[1]
            try:
                from fastseg.nn.init import bilinear_kernel

                kernel = bilinear_kernel(p["kernel"], dtype=problem.dtype, device=device)
                weight = kernel.expand(c, 1, p["kernel"], p["kernel"]).clone()
            except Exception:  # noqa: BLE001 - any weight times the same
                weight = torch.rand((c, 1, p["kernel"], p["kernel"]), dtype=problem.dtype,
                                    device=device, generator=generator)
            weight.requires_grad_(p.get("weight_requires_grad", True))
            args = (x, weight) if skip is None else (x, weight, skip)
        return Inputs(args=args, grad_tensors=tuple(a for a in args if a.requires_grad))

    def min_bytes(self, problem: Problem, mode: str) -> int:
        p = problem.params
        e = element_size(problem.dtype)
        n, c, h, w = problem.shape
        ho, wo = p["output_size"]
        x = n * c * h * w
        out = n * c * ho * wo
        window = out if p["skip_shape"] is not None else 0
        skip = math.prod(p["skip_shape"]) if p["skip_shape"] is not None else 0
        deconv = p["form"] == "deconv"
        k = c * p["kernel"] * p["kernel"] if deconv else 0
        forward = e * (x + window + k + out)
        backward = e * (out + x + skip) + (e * (x + 2 * k) if deconv else 0)
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


SUITE = UpsampleAddSuite()
