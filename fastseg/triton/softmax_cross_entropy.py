"""Triton kernels of the fused per-pixel softmax cross-entropy (forward and backward).

Low-level contract (the same one the C++ CPU/CUDA kernels implement; the public layer in
``fastseg/ops/softmax_cross_entropy.py`` validates, reshapes and registers autograd):

- ``input``  (B, C, S) logits, float16 / bfloat16 / float32 (float64 under the interpreter),
  ANY strides (NCHW: (C*S, S, 1); channels_last: (S*C, 1, C); a 2-D (N, C) input arrives as
  (1, C, N)). It is never copied: the kernels take its strides.
- ``target`` (B, S) contiguous uint8 / int32 / int64 class ids in [0, C) or ``ignore_index``.
- ``weight`` None or (C,) float32; ``pixel_weight`` None or (B, S) float32, both contiguous.
- ``reduction`` 0 none / 1 mean / 2 sum; ``label_smoothing`` eps in [0, 1].

Per pixel, in float32 and relative to the maximum m so that logits of +-1e4 stay exact:

    m = max_c x_c,  s = sum_c exp(x_c - m),  lse = m + log(s)
    nll    = w_t * (log(s) - (x_t - m))
    smooth = W * log(s) - sum_c w_c * (x_c - m)            (W = sum_c w_c)
    loss   = pw * ((1 - eps) * nll + eps / C * smooth)
    dloss/dx_c = scale * (p_c * ((1 - eps) * w_t + eps / C * W) - eps / C * w_c)
                 - [c == t] * scale * (1 - eps) * w_t       (p_c = exp((x_c - m) - log(s)))

with scale = g * pw (g = grad_output, divided by total_weight for "mean"). Ignored pixels
have loss 0, weight 0 and gradient 0; a target that is neither a class nor ``ignore_index``
is never used as an index: that pixel's loss and gradient are NaN (and its weight 0).

Kernel design. A program owns a tile of BLOCK_P consecutive pixels of one image and walks the
classes in chunks of BLOCK_C: the forward pass reads the tile twice (the max, then the
exp-sum and the weighted sum; the target logit is one gathered load), except when all
classes fit in one chunk (SINGLE_CHUNK), where the tile is loaded once and kept in
registers. The backward pass reads
each chunk once (lse is saved). The tile shapes are chosen per layout (``SHIPPED_CONFIGS``):
with the pixel stride 1 (NCHW) rows of BLOCK_P contiguous pixels are read with wide loads
along the pixels; with the class stride 1 (channels_last, (N, C)) the class axis is the
contiguous one. For "sum" and "mean" every program writes its partial sums (loss, weight) to
a float32 buffer that torch sums afterwards: deterministic, no atomics, no host sync.

The module imports without triton; then :func:`not_supported_reasons` says why it cannot
serve, and ``forward`` / ``backward`` are None (no op is registered).
"""

import os
from typing import List, NamedTuple, Optional, Tuple

import torch

from fastseg.triton import _common
from fastseg.triton._common import (  # noqa: F401 - shared, re-exported
    CUDA_DTYPES, INTERPRETER_DTYPES, MIN_CAPABILITY,
)

# (None, None, why) without a usable triton: then not_supported_reasons says why.
triton, tl, _TRITON_IMPORT_ERROR = _common.import_triton()

# Whether the kernels below are defined in interpreter mode. triton decides this when a
# kernel is decorated, so this is the value of the environment at import time.
INTERPRET = _common.interpret_flag()

FORWARD_OP_NAME = "fastseg::softmax_cross_entropy_forward_triton"
BACKWARD_OP_NAME = "fastseg::softmax_cross_entropy_backward_triton"

TARGET_DTYPES = (torch.uint8, torch.int32, torch.int64)

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2

_INT32_LIMIT = _common.INT32_LIMIT


class KernelConfig(NamedTuple):
    """One shipped tile configuration of both kernels.

    layout: "pixel" (pixel stride 1, e.g. NCHW), "class" (class stride 1, e.g.
    channels_last or a 2-D (N, C) input) or "strided" (neither: runtime strides only).
    max_classes: serves C <= max_classes; None serves any C by looping over class chunks.
    """

    layout: str
    max_classes: Optional[int]
    block_p: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 1

    @property
    def single_chunk(self) -> bool:
        """All classes fit in one BLOCK_C chunk: the forward pass loads the tile once."""
        return self.max_classes is not None and self.max_classes <= self.block_c

    @property
    def name(self) -> str:
        classes = "any" if self.max_classes is None else f"le{self.max_classes}"
        return (f"{self.layout}-C{classes}-P{self.block_p}xC{self.block_c}"
                f"-w{self.num_warps}s{self.num_stages}")


# The tile configurations the launchers use and the AOT test compiles for sm_80 and sm_90.
# The first entry whose layout matches and whose max_classes covers C is used. Sizes come
# from the register counts of the AOT compile (tests/test_triton_aot.py prints them): no
# spills, at most ~128 registers (two or more programs per SM), wide loads where possible.
# - "pixel" (NCHW): a chunk is BLOCK_C class rows of BLOCK_P contiguous pixels each, read
#   with 16-byte loads (4 float32 or 8 bfloat16 pixels per load). Up to 32 classes sit in
#   one chunk (BLOCK_C = the next power of two of C, 8-16 elements per thread); beyond that
#   the classes are walked in chunks of 16 (ADE20K's 150 classes: 10 chunks, 94% used).
# - "class" (channels_last, (N, C)): the class axis is contiguous; a row starts at p * C,
#   which is not 16-byte aligned in general, so loads are scalar but coalesced across
#   lanes; 4 elements per thread keep the per-element pointers in registers.
# - "strided": neither stride is 1 (a sliced view); runtime strides, chunks of 16.
SHIPPED_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig("pixel", 2, 1024, 2, num_warps=4),  # w8: 8-byte spill (triton 3.6, fp32 sm_80)
    KernelConfig("pixel", 4, 512, 4, num_warps=8),
    KernelConfig("pixel", 8, 256, 8, num_warps=8),
    KernelConfig("pixel", 16, 128, 16, num_warps=4),
    KernelConfig("pixel", 32, 128, 32, num_warps=8),
    KernelConfig("pixel", None, 256, 16, num_warps=8),
    KernelConfig("class", 2, 512, 2, num_warps=8),
    KernelConfig("class", 4, 256, 4, num_warps=8),
    KernelConfig("class", 8, 128, 8, num_warps=8),
    KernelConfig("class", 16, 64, 16, num_warps=8),
    KernelConfig("class", 32, 32, 32, num_warps=8),
    KernelConfig("class", None, 16, 64, num_warps=8),
    KernelConfig("strided", None, 64, 16, num_warps=8),
)


def _layout(input: torch.Tensor) -> Tuple[str, bool, bool]:
    """(layout, PIXEL_UNIT, CLASS_UNIT) of a (B, C, S) input.

    A stride along a dimension of size 1 never matters (its index is always 0), so such a
    dimension counts as having stride 1.
    """
    _, C, S = input.shape
    _, stride_c, stride_s = input.stride()
    pixel_unit = stride_s == 1 or S == 1
    class_unit = stride_c == 1 or C == 1
    if pixel_unit and S > 1:
        return "pixel", True, class_unit
    if class_unit:
        return "class", pixel_unit, True
    return "strided", pixel_unit, False


def select_config(input: torch.Tensor) -> Tuple[KernelConfig, bool, bool]:
    """The shipped config for a (B, C, S) input, with its unit-stride flags."""
    layout, pixel_unit, class_unit = _layout(input)
    C = input.shape[1]
    for config in SHIPPED_CONFIGS:
        if config.layout == layout and (config.max_classes is None or C <= config.max_classes):
            if layout == "strided":  # the strided kernel never assumes a unit stride
                pixel_unit = class_unit = False
            return config, pixel_unit, class_unit
    raise AssertionError(f"no shipped config for layout {layout!r} and C={C}")  # unreachable


def _needs_int64(shape, strides, block_p: int) -> bool:
    """Whether an image's element offsets (masked tail lanes included) can pass 2^31 - 1."""
    _, C, S = shape
    _, stride_c, stride_s = strides
    return (C - 1) * stride_c + (S + block_p) * stride_s > _INT32_LIMIT or S + block_p > _INT32_LIMIT


def not_supported_reasons(input: torch.Tensor, target: torch.Tensor) -> List[str]:
    """Why this backend cannot serve these tensors; empty when it can.

    Takes the user-facing (N, C, d1, ...) / (N, C) tensors or the normalized (B, C, S) ones:
    only devices, dtypes and the triton install matter here (shapes are fastseg.ops' job).
    """
    reasons: List[str] = []
    if _TRITON_IMPORT_ERROR is not None:
        reasons.append(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    device = input.device
    if device.type == "cuda":
        if INTERPRET:
            pass  # the interpreter runs CUDA tensors too (slowly); nothing more to check
        else:
            if input.dtype not in CUDA_DTYPES:
                reasons.append(f"input dtype {input.dtype} on cuda is not supported "
                               f"(supported: {', '.join(str(d) for d in CUDA_DTYPES)})")
            try:
                capability = torch.cuda.get_device_capability(device)
            except Exception as error:  # pragma: no cover - a broken CUDA setup
                reasons.append(f"cannot query the compute capability of {device}: {error}")
            else:
                if capability < MIN_CAPABILITY:
                    reasons.append(
                        f"compute capability {capability[0]}.{capability[1]} of {device} is "
                        f"below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (untested)")
    elif device.type == "cpu":
        if not INTERPRET:
            reasons.append("input is on cpu and TRITON_INTERPRET was not 1 when "
                           "fastseg.triton.softmax_cross_entropy was imported")
    else:
        reasons.append(f"input is on {device.type}: the triton backend runs on cuda "
                       "(and on cpu under TRITON_INTERPRET=1)")
    if (device.type != "cuda" or INTERPRET) and input.dtype not in INTERPRETER_DTYPES:
        reasons.append(f"input dtype {input.dtype} is not supported")
    if target.dtype not in TARGET_DTYPES:
        reasons.append(f"target dtype {target.dtype} is not supported "
                       f"(supported: {', '.join(str(d) for d in TARGET_DTYPES)})")
    if target.device != device:
        reasons.append(f"target is on {target.device}, input on {device}")
    return reasons


if triton is not None:

    @triton.jit
    def _weight_total(
        weight_ptr,  # (C,) float32 class weights
        C,
        BLOCK_C: tl.constexpr,
    ):
        # W = sum_c weight[c], in a fixed order (every program gets the same bits).
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            acc += tl.load(weight_ptr + offs_c, mask=offs_c < C, other=0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _load_logits(
        x_base,   # pointer to logit (b, 0, 0)
        pix_off,  # (BLOCK_P,) pixel offsets (pixel index * pixel stride)
        mask_p,   # (BLOCK_P,) pixel in range
        c0,
        C,
        stride_c,
        other,
        CLASS_UNIT: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One (BLOCK_P, BLOCK_C) tile of logits as float32; `other` where out of range.
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if CLASS_UNIT:
            cls_off = offs_c
        else:
            cls_off = offs_c * stride_c
        ptrs = x_base + pix_off[:, None] + cls_off[None, :]
        mask = mask_p[:, None] & mask_c[None, :]
        x = tl.load(ptrs, mask=mask, other=other).to(tl.float32)
        return x, offs_c, mask_c

    @triton.jit
    def _chunk_sums(
        x,           # (BLOCK_P, BLOCK_C) float32 logits, -inf out of range
        m,           # (BLOCK_P,) float32 row max
        offs_c,      # (BLOCK_C,) class ids of the chunk
        mask_c,      # (BLOCK_C,) class in range
        weight_ptr,  # (C,) float32 class weights (dummy without HAS_WEIGHT)
        HAS_WEIGHT: tl.constexpr,
        SMOOTHING: tl.constexpr,
    ):
        # Per pixel, over one chunk: sum_c exp(x_c - m) and sum_c w_c * (x_c - m).
        xm = x - m[:, None]
        s = tl.sum(tl.exp(xm), axis=1)
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0)
                swx = tl.sum(tl.where(mask_c[None, :], xm, 0.0) * w[None, :], axis=1)
            else:
                swx = tl.sum(tl.where(mask_c[None, :], xm, 0.0), axis=1)
        else:
            swx = tl.zeros_like(s)
        return s, swx

    # Forward. For the pixels p of one tile of image b, with x = input[b, :, p]:
    #   m = max_c x_c; s = sum_c exp(x_c - m); lse = m + log(s)
    #   loss = pw * ((1 - eps) * w_t * (log(s) - (x_t - m))
    #                + eps / C * (W * log(s) - sum_c w_c * (x_c - m)))
    # stored per pixel (REDUCTION 0) and summed per program with w_t * pw (all reductions).
    @triton.jit
    def _tile_pixels(S, stride_s, INT64_INDEX: tl.constexpr, PIXEL_UNIT: tl.constexpr,
                     BLOCK_P: tl.constexpr):
        """This program's image, its BLOCK_P pixel offsets, their mask and element offsets."""
        pid = tl.program_id(0)
        num_p_blocks = tl.cdiv(S, BLOCK_P)
        pid_b = pid // num_p_blocks
        offs_p = (pid - pid_b * num_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < S
        if INT64_INDEX:
            offs_p = offs_p.to(tl.int64)
        if PIXEL_UNIT:
            pix_off = offs_p
        else:
            pix_off = offs_p * stride_s
        return pid_b, offs_p, mask_p, pix_off

    @triton.jit
    def _load_targets(target_ptr, row, offs_p, mask_p, ignore_index, C):
        """Targets: active (a class), invalid (neither a class nor ignored: never used as an
        index) and the class index (0 where not active)."""
        t = tl.load(target_ptr + row + offs_p, mask=mask_p, other=0).to(tl.int64)
        not_ignored = t != ignore_index
        is_class = (t >= 0) & (t < C)
        active = mask_p & not_ignored & is_class
        invalid = mask_p & not_ignored & ((t < 0) | (t >= C))
        return active, invalid, tl.where(is_class, t, 0).to(tl.int32)

    @triton.jit
    def softmax_cross_entropy_forward_kernel(
        input_ptr,         # (B, C, S) logits, strides (stride_b, stride_c, stride_s)
        target_ptr,        # (B, S) uint8 / int32 / int64 class ids, contiguous
        weight_ptr,        # (C,) float32 class weights (dummy without HAS_WEIGHT)
        pixel_weight_ptr,  # (B, S) float32 pixel weights (dummy without HAS_PIXEL_WEIGHT)
        loss_ptr,          # (B, S) loss in the input dtype (written for REDUCTION == 0)
        lse_ptr,           # (B, S, 2) float32: per-pixel max and log(sum exp)
        partial_ptr,       # (2, num_programs) float32: per-program sums of loss, of w_t * pw
        C,
        S,
        stride_b,
        stride_c,
        stride_s,
        ignore_index,
        one_minus_eps,     # 1 - label_smoothing
        eps_over_c,        # label_smoothing / C
        HAS_WEIGHT: tl.constexpr,
        HAS_PIXEL_WEIGHT: tl.constexpr,
        SMOOTHING: tl.constexpr,     # label_smoothing > 0
        REDUCTION: tl.constexpr,     # 0 none, 1 mean, 2 sum
        PIXEL_UNIT: tl.constexpr,    # stride_s is 1 (or S is 1)
        CLASS_UNIT: tl.constexpr,    # stride_c is 1 (or C is 1)
        INT64_INDEX: tl.constexpr,   # element offsets within an image may pass 2^31 - 1
        SINGLE_CHUNK: tl.constexpr,  # C <= BLOCK_C: load the tile once
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_b, offs_p, mask_p, pix_off = _tile_pixels(S, stride_s, INT64_INDEX, PIXEL_UNIT, BLOCK_P)
        x_base = input_ptr + pid_b.to(tl.int64) * stride_b
        row = pid_b.to(tl.int64) * S  # start of image b in the (B, S) tensors

        # Target: ignored, a class, or invalid (never used as an index then).
        active, invalid, t_idx = _load_targets(target_ptr, row, offs_p, mask_p, ignore_index, C)

        if SINGLE_CHUNK:
            x, offs_c, mask_c = _load_logits(x_base, pix_off, mask_p, 0, C, stride_c,
                                             float("-inf"), CLASS_UNIT, BLOCK_C)
            m = tl.where(mask_p, tl.max(x, axis=1), 0.0)
            s, swx = _chunk_sums(x, m, offs_c, mask_c, weight_ptr, HAS_WEIGHT, SMOOTHING)
        else:
            # Loop 1: the row max.
            m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                x, offs_c, mask_c = _load_logits(x_base, pix_off, mask_p, c0, C, stride_c,
                                                 float("-inf"), CLASS_UNIT, BLOCK_C)
                m = tl.maximum(m, tl.max(x, axis=1))
            m = tl.where(mask_p, m, 0.0)
            # Loop 2: exp-sum and weighted sum, relative to m.
            s = tl.zeros([BLOCK_P], dtype=tl.float32)
            swx = tl.zeros([BLOCK_P], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                x, offs_c, mask_c = _load_logits(x_base, pix_off, mask_p, c0, C, stride_c,
                                                 float("-inf"), CLASS_UNIT, BLOCK_C)
                ds, dswx = _chunk_sums(x, m, offs_c, mask_c, weight_ptr, HAS_WEIGHT, SMOOTHING)
                s += ds
                swx += dswx
        # The target logit: one gathered load per pixel, from lines the loops just read
        # (cheaper than a masked reduction over the classes).
        if CLASS_UNIT:
            t_off = t_idx
        else:
            t_off = t_idx * stride_c
        x_t = tl.load(x_base + pix_off + t_off, mask=active, other=0.0).to(tl.float32)
        xt = x_t - m

        log_s = tl.log(tl.where(mask_p, s, 1.0))  # tail lanes: no log(0)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_idx, mask=active, other=0.0)
        else:
            w_t = tl.full([BLOCK_P], 1.0, dtype=tl.float32)
        loss = w_t * (log_s - xt)
        if SMOOTHING:
            if HAS_WEIGHT:
                w_total = _weight_total(weight_ptr, C, BLOCK_C)
            else:
                w_total = C * 1.0
            loss = one_minus_eps * loss + eps_over_c * (w_total * log_s - swx)
        if HAS_PIXEL_WEIGHT:
            # other=1: tail lanes hold inf (the smoothing term of -inf logits); no inf * 0.
            pw = tl.load(pixel_weight_ptr + row + offs_p, mask=mask_p, other=1.0)
            loss = loss * pw
            w_sum = w_t * pw
        else:
            w_sum = w_t
        loss = tl.where(active, loss, tl.where(invalid, float("nan"), 0.0))
        w_sum = tl.where(active, w_sum, 0.0)

        # max and log(sum) kept apart: their float sum would cost ulp(max) in every p_c.
        tl.store(lse_ptr + 2 * (row + offs_p), m, mask=mask_p)
        tl.store(lse_ptr + 2 * (row + offs_p) + 1, log_s, mask=mask_p)
        if REDUCTION == 0:
            tl.store(loss_ptr + row + offs_p, loss.to(loss_ptr.dtype.element_ty), mask=mask_p)
        tl.store(partial_ptr + tl.program_id(0), tl.sum(loss, axis=0))
        tl.store(partial_ptr + tl.num_programs(0) + tl.program_id(0), tl.sum(w_sum, axis=0))

    # Backward. For the pixels p of one tile of image b, with p_c = exp((x_c - m) - log(s)) and
    # scale = g * pw (g = grad_output[b, p] / grad_output / grad_output / total_weight):
    #   grad_c = scale * (p_c * ((1 - eps) * w_t + eps / C * W) - eps / C * w_c)
    #            - [c == t] * scale * (1 - eps) * w_t
    # and 0 for ignored pixels, NaN for invalid targets.
    @triton.jit
    def softmax_cross_entropy_backward_kernel(
        grad_output_ptr,   # (B, S) contiguous for REDUCTION == 0, else 0-d
        input_ptr,         # (B, C, S) logits, strides (stride_b, stride_c, stride_s)
        target_ptr,        # (B, S) uint8 / int32 / int64 class ids, contiguous
        lse_ptr,           # (B, S, 2) float32 max and log(sum exp) from the forward
        total_weight_ptr,  # 0-d float32 sum of w_t * pw (read for REDUCTION == 1)
        weight_ptr,        # (C,) float32 class weights (dummy without HAS_WEIGHT)
        pixel_weight_ptr,  # (B, S) float32 pixel weights (dummy without HAS_PIXEL_WEIGHT)
        grad_input_ptr,    # (B, C, S) like input, strides (grad_stride_b, _c, _s)
        C,
        S,
        stride_b,
        stride_c,
        stride_s,
        grad_stride_b,
        grad_stride_c,
        grad_stride_s,
        ignore_index,
        one_minus_eps,     # 1 - label_smoothing
        eps_over_c,        # label_smoothing / C
        HAS_WEIGHT: tl.constexpr,
        HAS_PIXEL_WEIGHT: tl.constexpr,
        SMOOTHING: tl.constexpr,
        REDUCTION: tl.constexpr,
        PIXEL_UNIT: tl.constexpr,
        CLASS_UNIT: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        SINGLE_CHUNK: tl.constexpr,
        GRAD_SAME_STRIDES: tl.constexpr,  # grad_input has the strides of input
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_b, offs_p, mask_p, pix_off = _tile_pixels(S, stride_s, INT64_INDEX, PIXEL_UNIT, BLOCK_P)
        x_base = input_ptr + pid_b.to(tl.int64) * stride_b
        if GRAD_SAME_STRIDES:
            g_base = grad_input_ptr + pid_b.to(tl.int64) * stride_b
            g_pix_off = pix_off
        else:
            g_base = grad_input_ptr + pid_b.to(tl.int64) * grad_stride_b
            g_pix_off = offs_p * grad_stride_s
        row = pid_b.to(tl.int64) * S

        active, invalid, t_idx = _load_targets(target_ptr, row, offs_p, mask_p, ignore_index, C)
        fill = tl.where(invalid, float("nan"), 0.0)  # gradient of inactive pixels

        if REDUCTION == 0:
            g = tl.load(grad_output_ptr + row + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        elif REDUCTION == 1:
            g = tl.load(grad_output_ptr).to(tl.float32) / tl.load(total_weight_ptr)
        else:
            g = tl.load(grad_output_ptr).to(tl.float32)
        if HAS_PIXEL_WEIGHT:
            scale = g * tl.load(pixel_weight_ptr + row + offs_p, mask=mask_p, other=0.0)
        else:
            scale = g + tl.zeros([BLOCK_P], dtype=tl.float32)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_idx, mask=active, other=0.0)
        else:
            w_t = tl.full([BLOCK_P], 1.0, dtype=tl.float32)
        if SMOOTHING:
            if HAS_WEIGHT:
                w_total = _weight_total(weight_ptr, C, BLOCK_C)
            else:
                w_total = C * 1.0
            p_coef = scale * (one_minus_eps * w_t + eps_over_c * w_total)
            t_term = scale * (one_minus_eps * w_t)
        else:
            p_coef = scale * w_t
            t_term = scale * w_t
        m = tl.load(lse_ptr + 2 * (row + offs_p), mask=mask_p, other=0.0)
        log_s = tl.load(lse_ptr + 2 * (row + offs_p) + 1, mask=mask_p, other=0.0)

        for c0 in range(0, C, BLOCK_C):
            x, offs_c, mask_c = _load_logits(x_base, pix_off, mask_p, c0, C, stride_c,
                                             0.0, CLASS_UNIT, BLOCK_C)
            p = tl.exp((x - m[:, None]) - log_s[:, None])
            grad = p * p_coef[:, None]
            if SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0)
                    grad -= scale[:, None] * (eps_over_c * w)[None, :]
                else:
                    grad -= (scale * eps_over_c)[:, None]
            grad = tl.where(offs_c[None, :] == t_idx[:, None], grad - t_term[:, None], grad)
            grad = tl.where(active[:, None], grad, fill[:, None])
            if GRAD_SAME_STRIDES:
                if CLASS_UNIT:
                    g_cls_off = offs_c
                else:
                    g_cls_off = offs_c * stride_c
            else:
                g_cls_off = offs_c * grad_stride_c
            tl.store(g_base + g_pix_off[:, None] + g_cls_off[None, :],
                     grad.to(grad_input_ptr.dtype.element_ty),
                     mask=mask_p[:, None] & mask_c[None, :])


def _device_guard(tensor: torch.Tensor):
    """Make `tensor`'s GPU the current one while launching (triton launches there)."""
    if tensor.is_cuda and tensor.device.index is not None \
            and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _interpreted_fake(tensor: torch.Tensor) -> bool:
    """Whether this is the fake (metadata only) pass of an interpreted op.

    Under TRITON_INTERPRET=1 the interpreted kernel would run on fake tensors (tracing by
    torch.compile or opcheck) and fail; the fake pass only needs the outputs' metadata.
    """
    return _common.interpreted_fake(tensor, INTERPRET)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension that has more than one element."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _launch_options(config, pixel_unit, class_unit, weight, pixel_weight, label_smoothing,
                    reduction, int64_index) -> dict:
    """The constexprs and launch options both kernels take."""
    return dict(
        HAS_WEIGHT=weight is not None,
        HAS_PIXEL_WEIGHT=pixel_weight is not None,
        SMOOTHING=label_smoothing > 0.0,
        REDUCTION=reduction,
        PIXEL_UNIT=pixel_unit,
        CLASS_UNIT=class_unit,
        INT64_INDEX=int64_index,
        SINGLE_CHUNK=config.single_chunk,
        BLOCK_P=config.block_p,
        BLOCK_C=config.block_c,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


if triton is not None:

    def _forward_impl(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor],
        pixel_weight: Optional[torch.Tensor],
        ignore_index: int,
        reduction: int,
        label_smoothing: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, lse, total_weight) of the fused softmax cross-entropy (see module doc)."""
        B, C, S = input.shape
        config, pixel_unit, class_unit = select_config(input)
        num_programs = B * triton.cdiv(S, config.block_p)
        lse = torch.empty((B, S, 2), dtype=torch.float32, device=input.device)
        partial = torch.empty((2, num_programs), dtype=torch.float32, device=input.device)
        if reduction == REDUCTION_NONE:
            loss = torch.empty((B, S), dtype=input.dtype, device=input.device)
        else:
            loss = lse  # never written: the kernel stores per-pixel losses only for "none"
        if num_programs > 0 and not _interpreted_fake(input):
            with _device_guard(input):
                _common.traceable(softmax_cross_entropy_forward_kernel)[(num_programs,)](
                    input, target,
                    weight if weight is not None else lse,
                    pixel_weight if pixel_weight is not None else lse,
                    loss, lse, partial,
                    C, S, *input.stride(),
                    ignore_index, 1.0 - label_smoothing, label_smoothing / C,
                    **_launch_options(config, pixel_unit, class_unit, weight, pixel_weight,
                                      label_smoothing, reduction,
                                      _needs_int64(input.shape, input.stride(), config.block_p)),
                )
        # Deterministic: fixed-shape reductions on the device, no atomics, no host sync.
        # (Separate reductions so that no two outputs alias one buffer.)
        total_weight = partial[1].sum()
        if reduction == REDUCTION_NONE:
            return loss, lse, total_weight
        loss_sum = partial[0].sum()
        if reduction == REDUCTION_MEAN:
            return (loss_sum / total_weight).to(input.dtype), lse, total_weight
        return loss_sum.to(input.dtype), lse, total_weight

    def _backward_impl(
        grad_output: torch.Tensor,
        input: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        total_weight: torch.Tensor,
        weight: Optional[torch.Tensor],
        pixel_weight: Optional[torch.Tensor],
        ignore_index: int,
        reduction: int,
        label_smoothing: float,
    ) -> torch.Tensor:
        """grad_input (shape and strides of torch.empty_like(input)) of the forward."""
        B, C, S = input.shape
        grad_input = torch.empty_like(input)
        config, pixel_unit, class_unit = select_config(input)
        num_programs = B * triton.cdiv(S, config.block_p)
        same = _same_strides(input, grad_input)
        int64_index = _needs_int64(input.shape, input.stride(), config.block_p) or \
            _needs_int64(grad_input.shape, grad_input.stride(), config.block_p)
        if num_programs > 0 and C > 0 and not _interpreted_fake(input):
            with _device_guard(input):
                _common.traceable(softmax_cross_entropy_backward_kernel)[(num_programs,)](
                    grad_output, input, target, lse, total_weight,
                    weight if weight is not None else lse,
                    pixel_weight if pixel_weight is not None else lse,
                    grad_input,
                    C, S, *input.stride(), *grad_input.stride(),
                    ignore_index, 1.0 - label_smoothing, label_smoothing / C,
                    GRAD_SAME_STRIDES=same,
                    **_launch_options(config, pixel_unit, class_unit, weight, pixel_weight,
                                      label_smoothing, reduction, int64_index),
                )
        return grad_input

    if not INTERPRET:
        # On the GPU: triton ops, so that torch.compile traces into them and sees the kernels.
        forward = torch.library.triton_op(FORWARD_OP_NAME, _forward_impl, mutates_args=())
        backward = torch.library.triton_op(BACKWARD_OP_NAME, _backward_impl, mutates_args=())
    else:
        # Under the interpreter wrap_triton returns the bare interpreted kernel, so a traced
        # triton_op would drop the launch (torch.compile would return uninitialized outputs).
        # Opaque custom ops instead; their fake implementation is the launcher itself, which
        # skips the launch on fake tensors (see _interpreted_fake).
        forward = torch.library.custom_op(FORWARD_OP_NAME, _forward_impl, mutates_args=())
        forward.register_fake(_forward_impl)
        backward = torch.library.custom_op(BACKWARD_OP_NAME, _backward_impl, mutates_args=())
        backward.register_fake(_backward_impl)

    # Autograd here, where the ops are defined, so that importing this module is enough.
    from fastseg.ops._autograd import register_cross_entropy_autograd
    register_cross_entropy_autograd(FORWARD_OP_NAME, backward)

else:
    # No triton: no ops are registered (fastseg.ops checks for None), and
    # not_supported_reasons says why.
    forward = None
    backward = None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): used by tests/test_triton_aot.py and by scripts
# that report registers and spills of the shipped configs.
# ---------------------------------------------------------------------------------------

_TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
    torch.float64: "fp64", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64",
}


def _aot_arguments(kernel_name: str, config: KernelConfig, dtype: torch.dtype,
                   target_dtype: torch.dtype, reduction: int, has_weight: bool,
                   has_pixel_weight: bool, smoothing: bool, overrides: Optional[dict]):
    """(kernel, signature, constexprs, divisible-by-16 argument names) of one variant."""
    x = "*" + _TRITON_TYPES[dtype]
    f32 = "*fp32"
    t = "*" + _TRITON_TYPES[target_dtype]
    unit = {"pixel": (True, False), "class": (False, True), "strided": (False, False)}
    pixel_unit, class_unit = unit[config.layout]
    constexprs = dict(
        HAS_WEIGHT=has_weight, HAS_PIXEL_WEIGHT=has_pixel_weight, SMOOTHING=smoothing,
        REDUCTION=reduction, PIXEL_UNIT=pixel_unit, CLASS_UNIT=class_unit,
        INT64_INDEX=False, SINGLE_CHUNK=config.single_chunk,
        BLOCK_P=config.block_p, BLOCK_C=config.block_c,
    )
    if kernel_name == "forward":
        kernel = softmax_cross_entropy_forward_kernel
        # Without reduction "none" the launcher passes the float32 lse as the unused loss.
        loss = x if reduction == REDUCTION_NONE else f32
        pointers = dict(input_ptr=x, target_ptr=t, weight_ptr=f32, pixel_weight_ptr=f32,
                        loss_ptr=loss, lse_ptr=f32, partial_ptr=f32)
        scalars = dict(C="i32", S="i32", stride_b="i32", stride_c="i32", stride_s="i32",
                       ignore_index="i32", one_minus_eps="fp32", eps_over_c="fp32")
    elif kernel_name == "backward":
        kernel = softmax_cross_entropy_backward_kernel
        pointers = dict(grad_output_ptr=x, input_ptr=x, target_ptr=t, lse_ptr=f32,
                        total_weight_ptr=f32, weight_ptr=f32, pixel_weight_ptr=f32,
                        grad_input_ptr=x)
        scalars = dict(C="i32", S="i32", stride_b="i32", stride_c="i32", stride_s="i32",
                       grad_stride_b="i32", grad_stride_c="i32", grad_stride_s="i32",
                       ignore_index="i32", one_minus_eps="fp32", eps_over_c="fp32")
        # A sliced ("strided") input gets a dense grad_input from empty_like.
        constexprs["GRAD_SAME_STRIDES"] = config.layout != "strided"
    else:
        raise _common.unknown_kernel(kernel_name)
    _common.apply_overrides(constexprs, overrides, kernel_name)
    # What the JIT sees for typical segmentation shapes: 16-byte aligned allocations, and
    # for NCHW an image size S (= the class stride) that is a multiple of 16.
    divisible = list(pointers)
    if config.layout == "pixel":
        divisible += ["S", "stride_b", "stride_c", "grad_stride_b", "grad_stride_c"]
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = scalars[name]
    divisible = [n for n in divisible if n in signature and signature[n] != "constexpr"]
    return kernel, signature, constexprs, divisible


def compile_ahead_of_time(kernel_name: str, config: KernelConfig, dtype: torch.dtype,
                          capability: int, *, target_dtype: torch.dtype = torch.int64,
                          reduction: int = REDUCTION_MEAN, has_weight: bool = True,
                          has_pixel_weight: bool = True, smoothing: bool = True,
                          overrides: Optional[dict] = None, ones: Tuple[str, ...] = ()):
    """Compile one kernel variant for ``GPUTarget("cuda", capability, 32)`` without a GPU.

    Defaults to the heaviest variant (class weights, pixel weights, label smoothing) with
    the constexprs the launcher passes for ``config``; ``overrides`` replaces constexprs
    (e.g. ``{"INT64_INDEX": True}`` or ``{"GRAD_SAME_STRIDES": False}``); ``ones`` names
    integer arguments that equal 1, which triton's JIT turns into constants (S == 1, ...).
    Returns triton's CompiledKernel (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata``).
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if INTERPRET:
        raise RuntimeError("cannot compile ahead of time under TRITON_INTERPRET=1")

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, divisible = _aot_arguments(
        kernel_name, config, dtype, target_dtype, reduction, has_weight, has_pixel_weight,
        smoothing, overrides)
    for name in ones:
        if signature.get(name) != "i32":
            raise ValueError(f"{name!r} is not an integer argument of the {kernel_name} kernel")
        signature[name] = "constexpr"
        constexprs[name] = 1
    divisible = [n for n in divisible if n not in ones]
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    attrs = {(index[n],): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(compiled) -> dict:
    """Registers, spills and stack of a compiled kernel, without loading it on a GPU.

    Uses the metadata when triton provides it (``n_regs`` / ``n_spills`` exist only once a
    kernel is loaded on a device) and otherwise ``cuobjdump --dump-resource-usage`` of the
    cubin (the triton wheel ships it): spilled registers live in the stack frame / local
    memory, so ``spills`` is the STACK + LOCAL bytes there.
    """
    import re
    import subprocess
    import tempfile

    usage = {}
    for key in ("n_regs", "n_spills"):
        value = getattr(compiled, key, None)
        if isinstance(value, int):
            usage[key[2:]] = value
    if "regs" in usage and "spills" in usage:
        return usage
    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    regs, stack, shared, local = (int(v) for v in match.groups())
    return {"regs": regs, "spills": stack + local, "stack": stack, "local": local,
            "shared": compiled.metadata.shared}


__all__ = [
    "FORWARD_OP_NAME", "BACKWARD_OP_NAME", "SHIPPED_CONFIGS", "KernelConfig", "INTERPRET",
    "forward", "backward", "not_supported_reasons", "select_config", "compile_ahead_of_time",
    "resource_usage",
]
