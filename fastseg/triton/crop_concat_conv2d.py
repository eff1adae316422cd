"""Triton backend of the fused U-Net crop + concat + convolution (``fastseg.ops.crop_concat_conv2d``).

Low-level contract (the same one as the C++ ops ``fastseg::crop_concat_conv2d_forward`` /
``_backward``, schemas in csrc/fastseg.cpp; the public layer fastseg/ops/crop_concat_conv2d.py
validates the arguments):

- ``forward(skip, x, weight, bias, padding, activation) -> out``
  == act(conv2d(cat([center_crop(skip, x.shape[-2:]), x], 1), weight, bias, padding)),
  crop offset ((Hs - H) // 2, (Ws - W) // 2), k in {1, 3}, padding 0 or 1 (3x3), stride 1,
  activation 0 (none) / 1 (relu). ``out`` in x's memory format
  (``fastseg.ops._checks.empty_like_format``). ANY strides: nothing is copied.
- ``backward(grad_output, output, skip, x, weight, padding, activation)
  -> (grad_skip, grad_x, grad_weight, grad_bias)``.
- float32 / float16 / bfloat16 on CUDA (sm_80+), float64 too under the interpreter.

Forward: an implicit GEMM. M = N * Ho * Wo output pixels, N_gemm = Cout,
K = (Cs + Cx) * k * k. A program owns a BLOCK_M x BLOCK_N output tile (pixels x output
channels) and accumulates in float32 (float64 for float64 inputs) with ``tl.dot``, looping
over the k * k taps (unrolled) and, per tap, over K in two phases: first the skip's channels,
then x's. The crop is only an offset: the skip is passed as the zero-copy view of its crop
window (``skip[:, :, oy:oy + H, ox:ox + W]``, the kernel takes its data pointer and strides), so
the padding taps are masked against the CROP window (zero there even where the skip itself
has pixels), exactly as the concatenation would be. The weight is read as (Cout, Cin, k, k)
through its strides, the skip's phase at input channels [0, Cs), x's at [Cs, Cs + Cx).
Bias and ReLU are applied in the epilogue. channels_last is the fast layout (the channel =
reduction axis is contiguous, so the A tiles are contiguous loads); NCHW is accepted.
float32 uses TF32 tensor cores only when ``torch.backends.cudnn.allow_tf32`` allows it (the
flag PyTorch's own convolutions obey), else IEEE fp32 FMA; bf16/fp16 always use tensor cores
(HMMA on sm_80, HMMA/HGMMA on sm_90). int64 offsets only when a tensor can pass 2^31 elements.

Backward: for now in PyTorch on zero-copy views (the crop window of the skip, weight[:, :Cs]
and weight[:, Cs:]), never materializing the crop or the concatenation: the ReLU mask is taken
from the saved output (``aten.threshold_backward``), grad_bias is a sum, and
``aten.convolution_backward`` (cuDNN on the GPU) runs once per source; grad_skip is zeros with
the crop window's gradient pasted in. A Triton backward (implicit-GEMM dgrad / wgrad) is a
later step.

Configs: ``SHIPPED_CONFIGS`` are chosen from the ahead-of-time register / spill results
(tests/test_triton_aot_ccc.py) and picked by :func:`select_config` from Cout and M; autotuning
over them (and more) on the GPU is the next step.

The module imports without triton; then :func:`not_supported_reasons` says why it cannot
serve, and ``forward`` / ``backward`` are None (no op is registered).
"""

import os
from typing import List, NamedTuple, Optional, Tuple

import torch

from fastseg.ops import _checks
from fastseg.triton import _common
from fastseg.triton._common import (  # noqa: F401 - shared, re-exported
    CUDA_DTYPES, INTERPRETER_DTYPES, MIN_CAPABILITY, needs_int64,
)

# (None, None, why) without a usable triton: then not_supported_reasons says why.
triton, tl, _TRITON_IMPORT_ERROR = _common.import_triton()

# Whether the kernels below are defined in interpreter mode (decided at import, as triton).
INTERPRET = _common.interpret_flag()

FORWARD_OP_NAME = "fastseg::crop_concat_conv2d_forward_triton"
BACKWARD_OP_NAME = "fastseg::crop_concat_conv2d_backward_triton"


class KernelConfig(NamedTuple):
    """One forward tile configuration: BLOCK_M output pixels x BLOCK_N output channels,
    BLOCK_K input channels per reduction step (``block_k`` for 16-bit inputs,
    ``block_k_fp32`` for float32 / float64: 4-byte operands need half the K to stay below
    255 registers without spilling).

    max_cout: serves Cout <= max_cout (None: any); min_m: serves M = N * Ho * Wo >= min_m.
    """

    max_cout: Optional[int]
    min_m: int
    block_m: int
    block_n: int
    block_k: int
    block_k_fp32: int
    num_warps: int = 4
    num_stages: int = 3

    def block_k_for(self, dtype: torch.dtype) -> int:
        return self.block_k if dtype in (torch.float16, torch.bfloat16) else self.block_k_fp32

    @property
    def name(self) -> str:
        cout = "any" if self.max_cout is None else f"le{self.max_cout}"
        return (f"Co{cout}-M{self.min_m}-{self.block_m}x{self.block_n}"
                f"xK{self.block_k}/{self.block_k_fp32}-w{self.num_warps}s{self.num_stages}")


# The first entry whose max_cout covers Cout and whose min_m <= M is used.
# - U-Net level 1 (Cout 64): 128 x 64 tiles, 4 warps.
# - Cout >= 128 (levels 2..5, up to 512): 128 x 128 tiles, 8 warps.
# - small maps (M < 8192: the deep levels at small resolutions): 64 x 64, 4 warps, so that
#   enough programs are in flight.
# 3 pipeline stages. BLOCK_K 32 for bf16/fp16 (two k16 MMA steps), 16 for float32 (TF32 k8):
# with K 32 the float32 128-row tiles spill on sm_80 (255 registers, 176..264 spill bytes,
# also with 2 stages). AOT on triton 3.8 (regs sm_80 / sm_90, no spills anywhere):
#   128x64   bf16 222 / 244   fp32 226 / 244
#   128x128  bf16 216 / 176   fp32 230 / 178
#   64x64    bf16 172 / 134   fp32 168 / 134
# (shared memory <= 64 KiB; tensor cores everywhere: HMMA on sm_80, HGMMA on sm_90).
SHIPPED_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig(64, 8192, 128, 64, 32, 16, 4, 3),
    KernelConfig(None, 8192, 128, 128, 32, 16, 8, 3),
    KernelConfig(None, 0, 64, 64, 32, 16, 4, 3),
)


def select_config(x: torch.Tensor, weight: torch.Tensor, padding: int,
                  configs=None) -> KernelConfig:
    """The shipped config for this problem (Cout and M = N * Ho * Wo)."""
    k = weight.shape[2]
    m = x.shape[0] * (x.shape[2] + 2 * padding - k + 1) * (x.shape[3] + 2 * padding - k + 1)
    cout = weight.shape[0]
    for config in configs or SHIPPED_CONFIGS:
        if (config.max_cout is None or cout <= config.max_cout) and m >= config.min_m:
            return config
    raise AssertionError(f"no shipped config for Cout {cout}, M {m}")  # unreachable


def not_supported_reasons(skip: torch.Tensor, x: torch.Tensor,
                          weight: Optional[torch.Tensor] = None) -> List[str]:
    """Why this backend cannot serve these tensors; empty when it can."""
    reasons: List[str] = []
    if _TRITON_IMPORT_ERROR is not None:
        reasons.append(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    device = x.device
    if device.type == "cuda" and not INTERPRET:
        if x.dtype not in CUDA_DTYPES:
            reasons.append(f"x dtype {x.dtype} on cuda is not supported "
                           f"(supported: {', '.join(str(d) for d in CUDA_DTYPES)})")
        try:
            capability = torch.cuda.get_device_capability(device)
        except Exception as error:  # pragma: no cover - a broken CUDA setup
            reasons.append(f"cannot query the compute capability of {device}: {error}")
        else:
            if capability < MIN_CAPABILITY:
                reasons.append(
                    f"compute capability {capability[0]}.{capability[1]} of {device} is below "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (tl.dot needs tensor cores)")
    elif device.type == "cpu" or (device.type == "cuda" and INTERPRET):
        if not INTERPRET:
            reasons.append("x is on cpu and TRITON_INTERPRET was not 1 when "
                           "fastseg.triton.crop_concat_conv2d was imported")
        elif x.dtype not in INTERPRETER_DTYPES:
            reasons.append(f"x dtype {x.dtype} is not supported")
    else:
        reasons.append(f"x is on {device.type}: the triton backend runs on cuda "
                       "(and on cpu under TRITON_INTERPRET=1)")
    for name, t in (("skip", skip), ("weight", weight)):
        if t is None:
            continue
        if t.device != device:
            reasons.append(f"{name} is on {t.device}, x on {device}")
        if t.dtype != x.dtype:
            reasons.append(f"{name} has dtype {t.dtype}, x {x.dtype}")
    return reasons


def input_precision(dtype: torch.dtype) -> str:
    """The tl.dot input precision: "tf32" for float32 only when cuDNN convolutions may use
    TF32 (``torch.backends.cudnn.allow_tf32``) and never under the interpreter; "ieee"
    otherwise (16-bit inputs run on tensor cores either way)."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


if triton is not None:

    @triton.jit
    def _accumulate_source(
        acc, src_ptr, w_ptr,
        n, oh, ow, m_mask, co, co_mask,
        C, c_base, H, W,
        s_n, s_c, s_h, s_w,
        sw_o, sw_i, sw_h, sw_w,
        KSIZE: tl.constexpr,
        PADDING: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """acc += the contribution of one source (C channels at weight input channels
        c_base + [0, C)) over the k x k taps; positions outside [0, H) x [0, W) are zero."""
        kk = tl.arange(0, BLOCK_K)
        if INT64_INDEX:
            kk = kk.to(tl.int64)
        base_n = n * s_n
        w_co = co[None, :] * sw_o
        for kh in tl.static_range(KSIZE):
            for kw in tl.static_range(KSIZE):
                iy = oh + (kh - PADDING)
                ix = ow + (kw - PADDING)
                valid = m_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                a_base = src_ptr + (base_n + iy * s_h + ix * s_w)[:, None]
                b_base = w_ptr + w_co + kh * sw_h + kw * sw_w
                for c0 in range(0, C, BLOCK_K):
                    c = c0 + kk
                    c_mask = c < C
                    a = tl.load(a_base + c[None, :] * s_c, mask=valid[:, None] & c_mask[None, :],
                                other=0.0)
                    b = tl.load(b_base + (c_base + c)[:, None] * sw_i,
                                mask=c_mask[:, None] & co_mask[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def crop_concat_conv2d_forward_kernel(
        skip_ptr, x_ptr, w_ptr, bias_ptr, out_ptr,
        Cs, Cx, H, W, Cout, Ho, Wo, M,
        ss_n, ss_c, ss_h, ss_w,
        sx_n, sx_c, sx_h, sx_w,
        sw_o, sw_i, sw_h, sw_w,
        so_n, so_c, so_h, so_w,
        KSIZE: tl.constexpr,
        PADDING: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ACC_FP64: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One BLOCK_M x BLOCK_N tile of out (pixels x output channels); skip_ptr points at
        the skip's crop window (H x W, skip strides)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INT64_INDEX:
            m = m.to(tl.int64)
            co = co.to(tl.int64)
        m_mask = m < M
        co_mask = co < Cout
        ow = m % Wo
        t = m // Wo
        oh = t % Ho
        n = t // Ho
        if ACC_FP64:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _accumulate_source(acc, skip_ptr, w_ptr, n, oh, ow, m_mask, co, co_mask,
                                 Cs, 0, H, W, ss_n, ss_c, ss_h, ss_w, sw_o, sw_i, sw_h, sw_w,
                                 KSIZE, PADDING, INPUT_PRECISION, INT64_INDEX, BLOCK_K)
        acc = _accumulate_source(acc, x_ptr, w_ptr, n, oh, ow, m_mask, co, co_mask,
                                 Cx, Cs, H, W, sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w,
                                 KSIZE, PADDING, INPUT_PRECISION, INT64_INDEX, BLOCK_K)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + co, mask=co_mask, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        offs = (n * so_n + oh * so_h + ow * so_w)[:, None] + co[None, :] * so_c
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & co_mask[None, :])


def crop_offset(skip: torch.Tensor, x: torch.Tensor) -> Tuple[int, int]:
    return (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2


def crop_view(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The zero-copy view of the skip's center crop window (x's spatial size)."""
    oy, ox = crop_offset(skip, x)
    return skip[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]]


if triton is not None:
    import importlib

    _ops = importlib.import_module("fastseg.ops.crop_concat_conv2d")

    def launch_forward(out, skip, x, weight, bias, padding, activation,
                       config: Optional[KernelConfig] = None):
        """Run the forward kernel into `out` (exposed for tests: `config` overrides the
        shipped selection)."""
        N, Cs, _, _ = skip.shape
        _, Cx, H, W = x.shape
        Cout, _, k, _ = weight.shape
        Ho, Wo = out.shape[2], out.shape[3]
        M = N * Ho * Wo
        config = config or select_config(x, weight, padding)
        window = crop_view(skip, x)
        block_k = config.block_k_for(x.dtype)
        margin = max(config.block_m, config.block_n, block_k)
        grid = (triton.cdiv(M, config.block_m), triton.cdiv(Cout, config.block_n))
        with _common.device_guard(x):
            torch.library.wrap_triton(crop_concat_conv2d_forward_kernel)[grid](
                window, x, weight, bias if bias is not None else out, out,
                Cs, Cx, H, W, Cout, Ho, Wo, M,
                *window.stride(), *x.stride(), *weight.stride(), *out.stride(),
                KSIZE=k,
                PADDING=int(padding),
                HAS_BIAS=bias is not None,
                RELU=int(activation) == 1,
                INPUT_PRECISION=input_precision(x.dtype),
                ACC_FP64=x.dtype == torch.float64,
                INT64_INDEX=needs_int64(skip, x, weight, out, margin=margin),
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=block_k,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        return out

    def _forward_impl(
        skip: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        padding: int,
        activation: int,
    ) -> torch.Tensor:
        """act(conv2d(cat([crop(skip), x], 1), weight, bias, padding)) (see module doc)."""
        out = _ops.fake_forward(skip, x, weight, bias, padding, activation)
        if out.numel() == 0 or _common.interpreted_fake(x, INTERPRET):
            return out
        return launch_forward(out, skip, x, weight, bias, padding, activation)

    def _backward_impl(
        grad_output: torch.Tensor,
        output: torch.Tensor,
        skip: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: int,
        activation: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_skip, grad_x, grad_weight, grad_bias) with torch ops on zero-copy views."""
        Cs = skip.shape[1]
        if int(activation) == 1:
            grad = torch.ops.aten.threshold_backward(grad_output, output, 0)
        else:
            grad = grad_output
        grad_bias = grad.sum(dim=(0, 2, 3))
        window = crop_view(skip, x)
        w_skip = weight[:, :Cs]
        w_x = weight[:, Cs:]
        stride, pad, dilation = [1, 1], [int(padding)] * 2, [1, 1]
        gw_skip_in, gw_skip, _ = torch.ops.aten.convolution_backward(
            grad, window, w_skip, None, stride, pad, dilation, False, [0, 0], 1,
            [True, True, False])
        grad_x, gw_x, _ = torch.ops.aten.convolution_backward(
            grad, x, w_x, None, stride, pad, dilation, False, [0, 0], 1, [True, True, False])
        grad_weight = torch.cat([gw_skip, gw_x], dim=1).contiguous()
        grad_skip = _checks.paste(gw_skip_in, skip.shape, crop_offset(skip, x),
                                  _checks.channels_last_output(skip))
        # The fakes' layouts: grad_skip like skip, grad_x like x (convolution_backward may
        # pick its own), grad_weight contiguous.
        grad_skip = _like_format(grad_skip, skip)
        grad_x = _like_format(grad_x, x)
        return grad_skip, grad_x, grad_weight, grad_bias

    def _like_format(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        fmt = (torch.channels_last if _checks.channels_last_output(reference)
               else torch.contiguous_format)
        if t.is_contiguous(memory_format=fmt):
            return t
        return t.contiguous(memory_format=fmt)

    forward, backward = _common.define_ops(FORWARD_OP_NAME, _forward_impl, BACKWARD_OP_NAME,
                                           _backward_impl, _ops, INTERPRET)

else:
    forward = None
    backward = None
    launch_forward = None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): tests/test_triton_aot_ccc.py.
# ---------------------------------------------------------------------------------------

def compile_ahead_of_time(config: KernelConfig, dtype: torch.dtype, capability: int, *,
                          ksize: int = 3, padding: int = 1, has_bias: bool = True,
                          relu: bool = True, channels_last: bool = True,
                          overrides: Optional[dict] = None,
                          ones: Optional[Tuple[str, ...]] = None):
    """Compile the forward kernel at ``config`` for sm_<capability> (no GPU needed).

    Defaults to what the launcher passes for densely stored channels_last tensors (the unit
    channel strides become constants, as in the JIT; ``channels_last=False``: unit W strides
    of NCHW maps, unit kw stride of a contiguous weight). float32 compiles with TF32 (the
    PyTorch default for convolutions); ``overrides`` replaces constexprs. Returns triton's
    CompiledKernel.
    """
    from fastseg.triton import upsample_add as _up

    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    t = "*" + _up.TRITON_TYPES[dtype]
    kernel = crop_concat_conv2d_forward_kernel
    constexprs = dict(KSIZE=ksize, PADDING=padding, HAS_BIAS=has_bias, RELU=relu,
                      INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      ACC_FP64=dtype == torch.float64, INT64_INDEX=False,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k_for(dtype))
    _common.apply_overrides(constexprs, overrides, "forward")
    pointers = dict(skip_ptr=t, x_ptr=t, w_ptr=t, bias_ptr=t, out_ptr=t)
    if ones is None:
        ones = ("ss_c", "sx_c", "so_c", "sw_i") if channels_last else ("ss_w", "sx_w", "so_w", "sw_w")
    divisible = tuple(n for n in kernel.arg_names if n not in ones and n not in pointers
                      and n not in constexprs and n not in ("M", "Ho", "Wo", "H", "W"))
    return _up.aot_compile(kernel, config, capability, pointers, {}, constexprs, ones=ones,
                           divisible=divisible)


def resource_usage(compiled) -> dict:
    """Registers, spills (bytes) and shared memory of a compiled kernel (cuobjdump)."""
    from fastseg.triton import softmax_cross_entropy as _sce

    return _sce.resource_usage(compiled)


def sass(compiled) -> str:
    """The SASS of a compiled kernel (``cuobjdump -sass`` of the cubin, from the triton
    wheel)."""
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


__all__ = [
    "FORWARD_OP_NAME", "BACKWARD_OP_NAME", "SHIPPED_CONFIGS", "KernelConfig", "INTERPRET",
    "forward", "backward", "not_supported_reasons", "select_config", "launch_forward",
    "compile_ahead_of_time", "resource_usage", "sass", "input_precision",
]
