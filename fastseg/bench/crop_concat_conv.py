"""Benchmark suite: U-Net's decoder step - center-crop the skip, concatenate, 3x3 conv + ReLU.

    fastseg.ops.crop_concat_conv2d(skip, x, weight, bias, padding, activation="relu")
    vs  F.relu(F.conv2d(torch.cat([skip[:, :, oy:oy+H, ox:ox+W], x], 1), weight, bias, padding))

The fused op never allocates the concatenation (nor its gradient): the report gives each
level's concatenation size next to the peak memory of every provider, so the saving can be
read against it.

Providers:
  fastseg-<backend>     the fused op with backend=<backend>, one per backend that serves a tiny
                        probe on this device (cpu on the CPU; cuda and triton on a GPU)
  eager                 the eager composition above (crop + cat + F.conv2d + relu)
  compile               torch.compile of it (default options, static shapes, once per problem)
  compile-max-autotune  torch.compile(mode="max-autotune") of it (GPU; on the CPU on request)
  eager-cat-only        eager's crop + cat alone (forward: the cat; backward: its gradient
                        split into the skip's window - zero elsewhere - and x's)
  conv-only             eager's F.conv2d + relu alone, on an input concatenated beforehand
                        (untimed): together with eager-cat-only it splits eager's time into
                        its two parts; eager / conv-only is the ceiling of a fused op that
                        makes the concatenation free but runs the same convolution
  reference             fastseg.ops._reference.crop_concat_conv2d (run by default only when no
                        fused backend is live, else on request: --providers reference)

Shapes (problem names <net>-l<level>[-b<batch>], level 1 = the top, highest-resolution one):
  unet572  the original U-Net (572x572 input, valid 3x3 convs): each decoder level's first
           conv, on the center-cropped skip and the up-convolved map x
             l1  skip 568 -> 392, 64 + 64 -> 64      l2  skip 280 -> 200, 128 + 128 -> 128
             l3  skip 136 -> 104, 256 + 256 -> 256   l4  skip 64 -> 56,   512 + 512 -> 512
           (x is (N, C, s, s) for the crop size s; the output (N, C, s-2, s-2))
  same512  a 'same'-padded U-Net at 512x512 (padding 1, no crop): skip and x both 512 / 256 /
           128 / 64, the same channel counts
GPU: batch 1, 4 and 8, bfloat16, float16 and float32 (dtype first, bfloat16 first: a run cut
short by --max-time still has whole decoders); --quick: unet572 l1 and l4 at batch 8.
CPU: float32, batch 1, the channel counts cut by 8 and the spatial sizes by taking a smaller
valid U-Net (unet316: skips 312 / 152 / 72 / 32 cropped to 136 / 72 / 40 / 24) and a
'same'-padded one at 256 (same256); --quick: unet316 l1 and l4.

Minimal bytes (e = element size; Sw = N*Cs*H*W the skip's window, S = N*Cs*Hs*Ws the whole
skip, X = N*Cx*H*W, O = N*Cout*Ho*Wo, K = Cout*(Cs+Cx)*k*k, B = Cout):
  forward  = e * (Sw + X + K + B + O)          inputs read once, the output written once
  backward = e * (2*O + Sw + X + K + S + X + K + B)
                                               grad out and the saved output (ReLU mask) read,
                                               the inputs and the weight read again, the whole
                                               grad skip, grad x, grad weight and grad bias
                                               written
  full     = forward + backward.
FLOPs: 2 * N * Cout * Ho * Wo * (Cs+Cx) * k * k per forward; the backward twice that (grad
input and grad weight); full = 3x the forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fastseg.bench.harness import (
    DTYPE_SHORT,
    Inputs,
    Problem,
    DeviceTables,
    Provider,
    TabledSuite,
    discover_fused,
    element_size,
    fused_backend_names,
    params_compile_provider,
    params_eager_provider,
    reference_provider,
)
from fastseg.ops import _reference

OP = "crop_concat_conv2d"
ACTIVATION = "relu"
KERNEL = 3

PARTS = ("eager-cat-only", "conv-only")


def unet_sizes(input_size: int) -> list[tuple[int, int]]:
    """(skip size, up-convolved x size) of a valid U-Net's four decoder levels, top first.

    Valid 3x3 convs (-2 each, two per block), 2x2 pools and 2x2 up-convolutions: an input of
    16*b + 124 has a bottleneck of b after its two convs (572 -> 28)."""
    if (input_size - 124) % 16 or input_size <= 124:
        raise ValueError(f"a valid U-Net takes inputs of 16*b + 124 pixels, not {input_size}")
    skips, s = [], input_size
    for _ in range(4):
        s -= 4
        skips.append(s)
        s //= 2
    s -= 4  # the bottleneck
    ups = []
    for skip in reversed(skips):
        s *= 2
        ups.append((skip, s))
        s -= 4
    return list(reversed(ups))


def unet_levels(net: str, input_size: int, batch: int, channels: int = 64,
                padding: int = 0) -> list[tuple[str, dict]]:
    """The four decoder levels as (problem name, geometry); channels at level 1, doubled per
    level. padding=1: a 'same'-padded U-Net (no crop: skip and x both input_size / 2**l)."""
    if padding:
        sizes = [(input_size >> level, input_size >> level) for level in range(4)]
    else:
        sizes = unet_sizes(input_size)
    levels = []
    for level, (s_skip, s_x) in enumerate(sizes, start=1):
        c = channels << (level - 1)
        levels.append((f"{net}-l{level}", {
            "net": net, "level": level, "batch": batch, "padding": padding,
            "skip": (batch, c, s_skip, s_skip), "x": (batch, c, s_x, s_x),
            "weight": (c, 2 * c, KERNEL, KERNEL),
        }))
    return levels


GPU_BATCHES = (1, 4, 8)
GPU_LEVELS = [
    (f"{name}-b{batch}", g)
    for batch in GPU_BATCHES
    for levels in (unet_levels("unet572", 572, batch),
                   unet_levels("same512", 512, batch, padding=1))
    for name, g in levels
]
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GPU_QUICK = ("unet572-l1-b8", "unet572-l4-b8")

CPU_LEVELS = [
    *unet_levels("unet316", 316, 1, channels=8),
    *unet_levels("same256", 256, 1, channels=8, padding=1),
]
CPU_DTYPES = (torch.float32,)
CPU_QUICK = ("unet316-l1", "unet316-l4")


def output_hw(params: dict) -> tuple[int, int]:
    _, _, h, w = params["x_shape"]
    k, p = params["kernel"], params["padding"]
    return h + 2 * p - k + 1, w + 2 * p - k + 1


def _params(name: str, g: dict, dtype: torch.dtype) -> dict[str, Any]:
    n, cs, hs, ws = g["skip"]
    _, cx, h, w = g["x"]
    params = {
        "op": OP, "net": g["net"], "level": g["level"], "batch": g["batch"],
        "skip_shape": list(g["skip"]), "x_shape": list(g["x"]), "weight_shape": list(g["weight"]),
        "kernel": g["weight"][2], "padding": g["padding"], "activation": ACTIVATION,
        "bias": True, "crop_offset": list(_reference.center_crop_offset((hs, ws), (h, w))),
        # what the eager composition allocates and the fused op does not
        "concat_shape": [n, cs + cx, h, w],
        "concat_bytes": n * (cs + cx) * h * w * element_size(dtype),
    }
    return params


# --- the eager composition, its parts and the fused call ----------------------------------


def eager_fn(params: dict):
    padding = params["padding"]

    def eager(skip, x, weight, bias=None):
        oy, ox = _reference.center_crop_offset(skip.shape[-2:], x.shape[-2:])
        crop = skip[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]]
        return F.relu(F.conv2d(torch.cat([crop, x], 1), weight, bias, padding=padding))

    return eager


def cat_only(skip, x):
    oy, ox = _reference.center_crop_offset(skip.shape[-2:], x.shape[-2:])
    return torch.cat([skip[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]], x], 1)


def cat_only_inputs(copy: Inputs) -> Inputs:
    skip, x = copy.args[:2]
    return Inputs(args=(skip, x), grad_tensors=(skip, x))


def conv_only_fn(params: dict):
    padding = params["padding"]

    def conv(cat, weight, bias=None):
        return F.relu(F.conv2d(cat, weight, bias, padding=padding))

    return conv


def conv_only_inputs(copy: Inputs) -> Inputs:
    skip, x, weight, bias = copy.args
    with torch.no_grad():
        cat = cat_only(skip, x).requires_grad_()
    args = (cat, weight, bias)
    return Inputs(args=args, grad_tensors=tuple(a for a in args if a.requires_grad))


def fastseg_fn(params: dict, backend: str | None, triton_backward: str | None = None):
    """The fused op with `backend` (None: the reference). triton_backward: the Triton
    backend's backward mode ("kernels" or "views") - set at every forward call, so that the
    backward that follows it in a timed step runs that mode whichever provider ran before."""
    padding = params["padding"]
    if backend is None:
        from fastseg.ops import _reference

        return lambda skip, x, weight, bias=None: _reference.crop_concat_conv2d(
            skip, x, weight, bias, padding, ACTIVATION)
    from fastseg import ops

    def fn(skip, x, weight, bias=None):
        if triton_backward is not None:
            from fastseg.triton import crop_concat_conv2d as kernels

            kernels.set_backward_mode(triton_backward)
        return ops.crop_concat_conv2d(skip, x, weight, bias, padding, ACTIVATION, backend=backend)

    return fn


def _fastseg_available() -> bool:
    try:
        from fastseg import ops
    except Exception:  # noqa: BLE001 - a broken package still leaves eager and compile
        return False
    return hasattr(ops, OP)


def _reference_available() -> bool:
    try:
        from fastseg.ops import _reference
    except Exception:  # noqa: BLE001
        return False
    return hasattr(_reference, OP)


_backend_names = fused_backend_names


def _probe(backend: str, device: torch.device) -> None:
    """A tiny forward + backward (odd crop, bias, ReLU) with an explicit backend."""
    skip = torch.randn(2, 3, 11, 12, device=device, requires_grad=True)
    x = torch.randn(2, 4, 8, 9, device=device, requires_grad=True)
    weight = torch.randn(5, 7, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    params = {"padding": 0}
    out = fastseg_fn(params, backend)(skip, x, weight, bias)
    torch.autograd.grad(out, (skip, x, weight, bias), torch.ones_like(out))


# --- the report: concatenation vs memory, eager's split, the targets ----------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def _verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "**FAIL**", None: "n/a"}[ok]


class CropConcatConvSuite(TabledSuite):
    op = "crop_concat_conv"
    title = "U-Net decoder: center-crop + concatenate + 3x3 conv + ReLU (crop_concat_conv2d)"
    baseline = "eager"
    bytes_model = (
        "e = element size; Sw = N*Cs*H*W (the skip's window), S = N*Cs*Hs*Ws (the whole skip), "
        "X = N*Cx*H*W, O = N*Cout*Ho*Wo, K = Cout*(Cs+Cx)*k*k, B = Cout. forward = e*(Sw + X + "
        "K + B + O); backward = e*(2*O + Sw + X + K + S + X + K + B) (grad out and the saved "
        "output read, the inputs and weight read again, grad skip in full, grad x, grad weight "
        "and grad bias written); full = forward + backward. FLOPs: 2*N*Cout*Ho*Wo*(Cs+Cx)*k*k "
        "per forward, twice that per backward, three times per full step. The parts "
        "(eager-cat-only, conv-only) are given the whole op's bytes and FLOPs."
    )

    def __init__(self, levels_gpu=None, levels_cpu=None, quick_gpu=None, quick_cpu=None,
                 gpu_dtypes=None, cpu_dtypes=None):
        super().__init__(DeviceTables.of(
            levels_gpu or GPU_LEVELS, levels_cpu or CPU_LEVELS, quick_gpu or GPU_QUICK,
            quick_cpu or CPU_QUICK, gpu_dtypes or GPU_DTYPES, cpu_dtypes or CPU_DTYPES))

    # -- what to run ---------------------------------------------------------------------

    def problems(self, device: torch.device, quick: bool) -> list[Problem]:
        levels, dtypes = self.tables.select(device, quick)
        return [
            Problem(name, tuple(g["x"]), dtype, _params(name, g, dtype))
            for dtype in dtypes
            for name, g in levels
        ]

    def _discover(self, device: torch.device) -> tuple[list[str], dict[str, str]]:
        return self.discovered(device, lambda: discover_fused(
            lambda backend: _probe(backend, device),
            None if _fastseg_available() else f"fastseg.ops.{OP} is not available",
            _backend_names()))

    def providers(self, device: torch.device) -> list[Provider]:
        providers: list[Provider] = []
        live, _ = self._discover(device)
        for backend in live:
            mode = "kernels" if backend == "triton" else None
            providers.append(Provider(
                name=f"fastseg-{backend}", kind="fused",
                make=lambda problem, _b=backend, _m=mode: fastseg_fn(problem.params, _b, _m),
                note=f"fastseg.ops.crop_concat_conv2d(..., activation='relu', "
                     f"backend={backend!r})" + (" with the Triton dgrad / wgrad backward"
                                                if mode else "")))
        if "triton" in live:
            providers.append(Provider(
                name="fastseg-triton-views", kind="fused",
                make=lambda problem: fastseg_fn(problem.params, "triton", "views"),
                note="the Triton forward with the backward on zero-copy views "
                     "(cuDNN's convolution backward per source)"))
        providers.append(params_eager_provider(
            eager_fn, note="center crop (a view) + torch.cat + F.conv2d + F.relu"))
        providers.append(params_compile_provider(
            eager_fn, note="torch.compile of the eager composition (default options, static "
            "shapes, compiled once per problem)"))
        providers.append(params_compile_provider(
            eager_fn, name="compile-max-autotune", mode="max-autotune",
            note="torch.compile(mode='max-autotune') of the eager composition (autotunes "
                 "the convolution's templates: minutes of setup per problem)",
            default=device.type == "cuda"))
        providers.append(Provider(
            name="eager-cat-only", kind="part", make=lambda problem: cat_only,
            inputs=cat_only_inputs, check=False,
            note="eager's part 1: the crop + torch.cat alone (and its backward)"))
        providers.append(Provider(
            name="conv-only", kind="part", make=lambda problem: conv_only_fn(problem.params),
            inputs=conv_only_inputs, check=False,
            note="eager's part 2: F.conv2d + F.relu alone, on an input concatenated "
                 "beforehand (untimed)"))
        if _reference_available():
            providers.append(reference_provider(
                lambda problem: fastseg_fn(problem.params, None),
                "fastseg.ops._reference.crop_concat_conv2d (pure PyTorch)", default=not live))
        return providers

    # -- inputs, bytes, FLOPs ------------------------------------------------------------

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        p = problem.params

        def randn(shape, scale=1.0):
            t = torch.randn(tuple(shape), dtype=problem.dtype, device=device, generator=generator)
            if scale != 1.0:
                t.mul_(scale)
            return t.requires_grad_()

        cin = p["weight_shape"][1] * p["kernel"] ** 2
        skip = randn(p["skip_shape"])
        x = randn(p["x_shape"])
        weight = randn(p["weight_shape"], 1.0 / math.sqrt(cin))  # unit-variance outputs
        bias = randn([p["weight_shape"][0]], 0.1)
        args = (skip, x, weight, bias)
        return Inputs(args=args, grad_tensors=args)

    def _counts(self, problem: Problem) -> dict[str, int]:
        p = problem.params
        n, cs, hs, ws = p["skip_shape"]
        _, cx, h, w = p["x_shape"]
        cout, cin, k, _ = p["weight_shape"]
        ho, wo = output_hw(p)
        return {"Sw": n * cs * h * w, "S": n * cs * hs * ws, "X": n * cx * h * w,
                "O": n * cout * ho * wo, "K": cout * cin * k * k, "B": cout,
                "flops": 2 * n * cout * ho * wo * cin * k * k}

    def min_bytes(self, problem: Problem, mode: str) -> int:
        c = self._counts(problem)
        e = element_size(problem.dtype)
        forward = e * (c["Sw"] + c["X"] + c["K"] + c["B"] + c["O"])
        backward = e * (2 * c["O"] + c["Sw"] + c["X"] + c["K"] + c["S"] + c["X"] + c["K"]
                        + c["B"])
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    def flops(self, problem: Problem, mode: str) -> int:
        f = self._counts(problem)["flops"]
        return {"forward": f, "backward": 2 * f, "full": 3 * f}[mode]

    def tolerance(self, problem: Problem) -> float:
        # Reductions over (Cs+Cx)*9 = up to 9216 terms; cuDNN runs float32 convs in TF32 by
        # default (torch.backends.cudnn.allow_tf32), so eager's float32 is not exact there.
        if problem.dtype == torch.float32:
            return 5e-3
        return super().tolerance(problem)

    # -- the report ----------------------------------------------------------------------

    def summary(self, records: list[dict], header: dict) -> list[str]:
        ok = [r for r in records if r.get("status") == "ok" and r.get("time_ms")]
        if not ok:
            return []
        index = {(r["problem"], r["dtype"], r["mode"], r["provider"]): r for r in ok}
        groups: list[tuple[str, str]] = []
        params: dict[tuple[str, str], dict] = {}
        for r in records:
            key = (r["problem"], r["dtype"])
            if key not in groups:
                groups.append(key)
                params[key] = r["params"]
        fused = []
        for r in records:
            if r.get("provider_kind") == "fused" and r["provider"] not in fused:
                fused.append(r["provider"])
        lines: list[str] = []

        def get(key, mode, provider, field="time_ms"):
            r = index.get((*key, mode, provider))
            return None if r is None else r.get(field)

        def short(dtype):
            for d, s in DTYPE_SHORT.items():
                if str(d).replace("torch.", "") == dtype:
                    return s
            return dtype

        # 1. the concatenation against the peak memory of a full step
        lines += ["### concatenation vs peak memory (full step; forward: kept for backward)",
                  "",
                  "The eager composition allocates the concatenation (N x (Cs+Cx) x H x W) in "
                  "the forward and keeps it for backward, and its gradient in the backward; "
                  "the fused op allocates neither. saved = eager's peak - the fused op's.", ""]
        head = ["problem", "skip -> x", "dtype", "concat MiB", "eager peak MiB",
                "eager kept MiB"]
        for f in fused:
            head += [f"{f} peak MiB", f"{f} kept MiB", f"{f} saved MiB", "saved / concat"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
        for key in groups:
            p = params[key]
            row = [key[0], f"{p['skip_shape'][2]} -> {p['x_shape'][2]}", short(key[1]),
                   _fmt_mib(p["concat_bytes"]), _fmt_mib(get(key, "full", "eager", "peak_bytes")),
                   _fmt_mib(get(key, "forward", "eager", "retained_bytes"))]
            for f in fused:
                e_peak = get(key, "full", "eager", "peak_bytes")
                f_peak = get(key, "full", f, "peak_bytes")
                saved = None if e_peak is None or f_peak is None else e_peak - f_peak
                row += [_fmt_mib(f_peak), _fmt_mib(get(key, "forward", f, "retained_bytes")),
                        "-" if saved is None else f"{saved / 2**20:.1f}",
                        "-" if saved is None else f"{saved / p['concat_bytes']:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

        # 2. eager's time split into its parts: the ceiling of fusing the concatenation away
        lines += ["### eager's time split: crop + cat vs conv + ReLU (full step, ms)", "",
                  "ceiling = eager / conv-only: the speedup of a fused op that makes the "
                  "concatenation free and runs the convolution as fast as cuDNN / oneDNN.", ""]
        head = ["problem", "dtype", "eager", "eager-cat-only", "conv-only", "cat + conv",
                "cat share", "ceiling"] + [f"{f} vs eager" for f in fused]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for key in groups:
            e, c, v = (get(key, "full", p) for p in ("eager", "eager-cat-only", "conv-only"))
            row = [key[0], short(key[1])] + [("-" if t is None else f"{t:.3f}") for t in (e, c, v)]
            row += ["-" if c is None or v is None else f"{c + v:.3f}",
                    "-" if c is None or v is None else f"{100 * c / (c + v):.0f}%",
                    _fmt_x(_ratio(e, v))]
            row += [_fmt_x(_ratio(e, get(key, "full", f))) for f in fused]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

        # 3. the targets
        lines += ["### targets (full step = forward + backward; ratio = eager time / fused "
                  "time)", ""]
        if not fused:
            lines += ["n/a: no fastseg backend ran on this device (see the `not run` lines "
                      "above); nothing to hold against the targets.", ""]
            return lines
        gpu = header.get("device") == "cuda"
        # (net, batch, dtype) -> {level: key}
        decoders: dict[tuple, dict[int, tuple[str, str]]] = {}
        for key in groups:
            p = params[key]
            if gpu and key[1] != "bfloat16":
                continue
            if not gpu and key[1] != "float32":
                continue
            decoders.setdefault((p["net"], p["batch"], key[1]), {})[p["level"]] = key
        if not decoders:
            lines += ["n/a: no " + ("bfloat16" if gpu else "float32") + " problems ran.", ""]
            return lines
        if gpu:
            lines.append("Targets (GPU, bfloat16): >= 1.20x eager at the top level (l1), "
                         ">= 1.10x over the whole decoder (sum of the four levels' times), "
                         "never slower than eager at any level.")
        else:
            lines.append("Targets (CPU, float32): no slower than eager at any level (>= 1.00x), "
                         "and the full step's peak memory lower than eager's by at least the "
                         "concatenation's size (saved / concat >= 1).")
        lines.append("")
        head = ["decoder", "dtype", "provider"] + [f"l{i}" for i in range(1, 5)]
        head += ["whole decoder", "slowest level"]
        head += (["top level >= 1.20x", "whole >= 1.10x", "every level >= 1.00x"] if gpu else
                 ["every level >= 1.00x", "min saved / concat", "memory saved >= concat"])
        lines += ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
        for (net, batch, dtype), levels in decoders.items():
            for f in fused:
                ratios, e_sum, f_sum, complete = {}, 0.0, 0.0, True
                savings = []
                for level in range(1, 5):
                    key = levels.get(level)
                    e = get(key, "full", "eager") if key else None
                    t = get(key, "full", f) if key else None
                    ratios[level] = _ratio(e, t)
                    if e is None or t is None:
                        complete = False
                    else:
                        e_sum += e
                        f_sum += t
                    if key:
                        e_peak = get(key, "full", "eager", "peak_bytes")
                        f_peak = get(key, "full", f, "peak_bytes")
                        if e_peak is not None and f_peak is not None:
                            savings.append((e_peak - f_peak) / params[key]["concat_bytes"])
                measured = [v for v in ratios.values() if v is not None]
                whole = e_sum / f_sum if complete and f_sum else None
                slowest = min(measured) if measured else None
                every = None if not measured else (slowest >= 1.0 if complete else
                                                   (False if slowest < 1.0 else None))
                label = f"{net} batch {batch}"
                row = [label, short(dtype), f] + [_fmt_x(ratios[i]) for i in range(1, 5)]
                row += [_fmt_x(whole) if complete else f"- ({len(measured)} of 4 levels)",
                        _fmt_x(slowest)]
                if gpu:
                    top = ratios[1]
                    row += [_verdict(None if top is None else top >= 1.2),
                            _verdict(None if whole is None else whole >= 1.1),
                            _verdict(every)]
                else:
                    low = min(savings) if savings else None
                    row += [_verdict(every), "-" if low is None else f"{low:.2f}",
                            _verdict(None if low is None else low >= 1.0)]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        return lines


SUITE = CropConcatConvSuite()
