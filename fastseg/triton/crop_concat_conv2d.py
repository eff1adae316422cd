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
  -> (grad_skip, grad_x, grad_weight, grad_bias)``: grad_skip in skip's memory format (zero
  outside the crop window), grad_x in x's, grad_weight contiguous, grad_bias (Cout,).
- float32 / float16 / bfloat16 on CUDA (sm_80+); float64 / float32 / float16 under the
  interpreter (not bfloat16: the interpreter's tl.dot gets it wrong, triton-lang/triton#11584).

Forward: an implicit GEMM. M = N * Ho * Wo output pixels, N_gemm = Cout, K = (Cs + Cx) *
k * k. A program owns a BLOCK_M x BLOCK_N output tile (pixels x output channels) and
accumulates in float32 (float64 for float64 inputs) with ``tl.dot``, in two phases: first
the skip's channels, then x's, each one flat loop over (tap, BLOCK_K channel chunk) so that
the software pipeline runs across the k * k taps (64 channels are only two chunks per tap)
and the code is not unrolled k * k times. The crop is only an offset: the skip is passed as
the zero-copy view of its crop window (``skip[:, :, oy:oy + H, ox:ox + W]``, the kernel
takes its data pointer and strides), so the padding taps are masked against the CROP window
(zero there even where the skip itself has pixels), exactly as the concatenation would be.
The weight is read as (Cout, Cin, k, k) through its strides, the skip's phase at input
channels [0, Cs), x's at [Cs, Cs + Cx). Bias and ReLU are applied in the epilogue.
channels_last is the fast layout (the channel = reduction axis is contiguous, so the A tiles
are contiguous loads); NCHW is accepted. float32 uses TF32 tensor cores only when
``torch.backends.cudnn.allow_tf32`` allows it (the flag PyTorch's own convolutions obey),
else IEEE fp32 FMA; bf16/fp16 always use tensor cores (HMMA on sm_80, HMMA/HGMMA on sm_90).
int64 offsets only when a tensor can pass 2^31 elements.

Backward, two implementations (``BACKWARD_MODES``), chosen by the environment variable
``FASTSEG_TRITON_CCC_BACKWARD`` (read at import) or :func:`set_backward_mode`:

- ``"kernels"`` (default): two Triton implicit GEMMs. G = grad_output, masked by
  (output > 0) for ReLU IN THE KERNELS' LOADS (no masked gradient is materialized).

  * dgrad, the transposed convolution:
    grad_in[n, c, y, x] = sum_{co, ky, kx} G[n, co, y + p - ky, x + p - kx] * W[co, c, ky, kx]
    (terms outside the output are zero). M = N * H * W source pixels, N_gemm = the source's
    channels, K = Cout * k * k (one flat loop over (tap, BLOCK_K output channels)). The
    channel tiles of the grid cover both sources: tiles [0, cdiv(Cs, BLOCK_N)) read W[:, c]
    and store into grad_skip's crop window (its zero-copy view: data pointer + grad_skip's
    strides), the others read W[:, Cs + c] and store into grad_x. grad_skip is allocated
    empty and only its border (the pixels outside the crop window, up to four strided fills)
    is zeroed: the kernel writes every element of the window, so zeroing the whole tensor
    would write the window twice.
  * wgrad: grad_weight[co, c, ky, kx] = sum_{n, y, x} G[n, co, y, x] * in_c[n, y + ky - p,
    x + kx - p] (in = the crop window for c < Cs, x for c >= Cs, zero outside). One program
    per (BLOCK_M output channels x BLOCK_N input channels of one source, one tap, one split):
    tl.dot of the G^T tile (BLOCK_M x BLOCK_K pixels) with the shifted input tile (BLOCK_K x
    BLOCK_N). The pixel reduction (up to ~1.2M at batch 8, 392 x 392) is split into S fixed
    ranges of L pixels (:func:`wgrad_split`: a function of the shape only, L a multiple of
    ``WGRAD_SPLIT_QUANTUM``, which every wgrad BLOCK_K divides, so the split does not depend
    on the tile config); each program stores float32 partials (float64 for float64) into a
    (S, Cout, Cin, k, k) buffer that ``torch.sum`` reduces over S in a fixed order: no
    atomics, bit-for-bit repeatable for a given shape and config.
  * grad_bias: computed in the same wgrad launch by cdiv(Cout, BLOCK_M) extra programs per
    split that only read the (masked) G tiles of their pixel range and sum them in float32
    (the other programs of that split read the same tiles at the same time, so they come
    from L2), into a (S, Cout) partial buffer reduced like the weight's. Exact float32 sums
    (no tensor-core rounding of G, which TF32 would add), no branch inside the GEMM loops.

- ``"views"``: PyTorch on zero-copy views (the crop window of the skip, weight[:, :Cs] and
  weight[:, Cs:]): the ReLU mask from the saved output (``aten.threshold_backward``),
  grad_bias a sum, ``aten.convolution_backward`` (cuDNN on the GPU) once per source, grad_skip
  zeros with the window's gradient pasted in.

The default ("kernels") is NOT yet confirmed by a GPU measurement (none exists yet): the GPU
benchmark should time both modes (``set_backward_mode``) and the default follow the result.
Under torch.compile the mode in force when the backward is traced is compiled in.

Configs: ``SHIPPED_CONFIGS`` (forward), ``DGRAD_CONFIGS`` and ``WGRAD_CONFIGS`` are chosen
from the ahead-of-time register / spill results (tests/test_triton_aot_ccc.py: none spills on
sm_80 or sm_90 at bf16 / fp16 / fp32) and picked by :func:`select_config` /
:func:`select_dgrad_config` / :func:`select_wgrad_config`. On a real GPU (not under the
interpreter) the launchers autotune instead (``triton.autotune`` over ``*_AUTOTUNE_CONFIGS``:
the shipped configs plus a few more, all AOT-checked), keyed on (Cs, Cx, Cout, M_BUCKET =
the next power of two of the GEMM's pixel count, KSIZE) plus the dtypes (triton adds those):
one Autotuner per kernel and dtype class (16-bit / float32, whose BLOCK_K differ). The
Autotuner goes through ``torch.library.wrap_triton`` like a plain kernel (torch >= 2.6 accepts
``triton.autotune`` with only configs and key, the grid a function of the config's META).
Explicit selection is used instead under the interpreter, when a launcher gets ``config=``,
with ``torch.use_deterministic_algorithms(True)`` (an autotuned choice may differ from one
process to the next, and so may the bits), and when autotuning is switched off
(``FASTSEG_TRITON_CCC_AUTOTUNE=0`` or :func:`set_autotune`). Autotuning costs, on the first
call per key, a compile and a benchmark of every config (seconds).

The module imports without triton; then :func:`not_supported_reasons` says why it cannot
serve, and ``forward`` / ``backward`` are None (no op is registered).
"""

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastseg.ops import _checks, _reference
from fastseg.triton import _common
from fastseg.triton._common import (  # noqa: F401 - shared, re-exported
    CUDA_DTYPES, INTERPRETER_DTYPES, MIN_CAPABILITY, needs_int64,
)

# (None, None, why) without a usable triton: then not_supported_reasons says why.
triton, tl, _TRITON_IMPORT_ERROR = _common.import_triton()

# Whether the kernels below are defined in interpreter mode (decided at import, as triton).
INTERPRET = _common.interpret_flag()

# Every tl.dot names its accumulator's dtype as out_dtype: triton 3.6 asserts that they match,
# and its default (float32) does not for float64 inputs.
# The interpreter's tl.dot multiplies the raw bit patterns of bfloat16 operands (triton 3.8;
# triton-lang/triton#11584, "not supported yet"): bfloat16 is served on the GPU only.
INTERPRETER_DOT_DTYPES = tuple(d for d in INTERPRETER_DTYPES if d != torch.bfloat16)

FORWARD_OP_NAME = "fastseg::crop_concat_conv2d_forward_triton"
BACKWARD_OP_NAME = "fastseg::crop_concat_conv2d_backward_triton"

# --- settings ------------------------------------------------------------------------------

BACKWARD_MODES = ("kernels", "views")
BACKWARD_ENV = "FASTSEG_TRITON_CCC_BACKWARD"
AUTOTUNE_ENV = "FASTSEG_TRITON_CCC_AUTOTUNE"


def _validated_mode(mode, what: str) -> str:
    if not isinstance(mode, str) or mode not in BACKWARD_MODES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKWARD_MODES))}, "
                         f"got {mode!r}")
    return mode


def backward_mode_from_env(environ=None) -> str:
    """The backward mode that ``FASTSEG_TRITON_CCC_BACKWARD`` asks for ("kernels" when unset
    or empty); ValueError naming the allowed values otherwise."""
    environ = os.environ if environ is None else environ
    return _validated_mode(environ.get(BACKWARD_ENV, "") or "kernels", BACKWARD_ENV)


def autotune_from_env(environ=None) -> bool:
    """Whether ``FASTSEG_TRITON_CCC_AUTOTUNE`` allows autotuning ("1", the default, or "0")."""
    environ = os.environ if environ is None else environ
    value = environ.get(AUTOTUNE_ENV, "") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


_backward_mode = backward_mode_from_env()
_autotune = autotune_from_env()


def set_backward_mode(mode: str) -> None:
    """Select the backward implementation: "kernels" (the Triton dgrad / wgrad) or "views"
    (PyTorch on zero-copy views). Takes effect at the next backward call (under torch.compile:
    at the next trace)."""
    global _backward_mode
    _backward_mode = _validated_mode(mode, "backward mode")


def get_backward_mode() -> str:
    return _backward_mode


def set_autotune(enabled: bool) -> None:
    """Allow (True) or forbid (False) autotuning on the GPU; forbidden, the shipped configs
    are used."""
    global _autotune
    _autotune = bool(enabled)


def get_autotune() -> bool:
    return _autotune


# --- tile configurations ---------------------------------------------------------------------

class KernelConfig(NamedTuple):
    """One tile configuration: BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step
    (``block_k`` for 16-bit inputs, ``block_k_fp32`` for float32 / float64: 4-byte operands
    need half the K to stay below 255 registers without spilling).

    forward: BLOCK_M output pixels x BLOCK_N output channels, K = input channels;
    dgrad: BLOCK_M source pixels x BLOCK_N source channels, K = output channels;
    wgrad: BLOCK_M output channels x BLOCK_N input channels, K = pixels.

    max_cout: serves problems whose selection size (forward: Cout; dgrad: max(Cs, Cx);
    wgrad: max(Cout, Cs, Cx)) is <= max_cout (None: any); min_m: serves M = N * Ho * Wo
    >= min_m.
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


# Forward. The first entry whose max_cout covers Cout and whose min_m <= M is used.
# - U-Net level 1 (Cout 64): 128 x 64 tiles, 4 warps.
# - Cout >= 128 (levels 2..5, up to 512): 128 x 128 tiles, 8 warps.
# - small maps (M < 8192: the deep levels at small resolutions): 64 x 64, 4 warps, so that
#   enough programs are in flight.
# 3 pipeline stages. BLOCK_K 32 for bf16/fp16 (two k16 MMA steps), 16 for float32 (TF32 k8):
# with K 32 the float32 128-row tiles spilled on sm_80 (255 registers, 176..264 spill bytes,
# also with 2 stages; measured with the earlier k x k-unrolled tap loop). AOT on triton 3.8,
# channels_last 3x3 same padding, bias + ReLU (registers sm_80 / sm_90, no spills anywhere;
# shared memory <= 64 KiB; HMMA on sm_80, HGMMA on sm_90):
#   128x64  w4s3   bf16 202 / 123   fp16 202 / 123   fp32 168 / 166
#   128x128 w8s3   bf16 184 / 128   fp16 184 / 128   fp32 176 / 171
#   64x64   w4s3   bf16 121 /  70   fp16 121 /  70   fp32 128 /  75
SHIPPED_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig(64, 8192, 128, 64, 32, 16, 4, 3),
    KernelConfig(None, 8192, 128, 128, 32, 16, 8, 3),
    KernelConfig(None, 0, 64, 64, 32, 16, 4, 3),
)

# dgrad (the ReLU mask adds a second A-operand load per step: the output tile). Selected by
# max(Cs, Cx) and M = N * H * W, like the forward by Cout and M. 128 x 64 tiles with 8
# warps: with 4 (w4s3, also w4s2 / w4s4) bf16 / fp16 spill 16..24 bytes on sm_80 with
# triton 3.6's ptxas (168 registers). AOT on triton 3.8, channels_last 3x3 same padding, ReLU
# (registers sm_80 / sm_90, no spills; HMMA / HGMMA):
#   128x64  w8s3   bf16 100 /  69   fp16  96 /  69   fp32 110 /  80
#   128x128 w8s3   bf16 128 / 119   fp16 174 / 119   fp32 148 / 128
#   64x64   w4s3   bf16  96 /  70   fp16  96 /  70   fp32  80 /  94
DGRAD_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig(64, 8192, 128, 64, 32, 16, 8, 3),
    KernelConfig(None, 8192, 128, 128, 32, 16, 8, 3),
    KernelConfig(None, 0, 64, 64, 32, 16, 4, 3),
)

# wgrad: BLOCK_M output channels x BLOCK_N input channels of one source, BLOCK_K pixels per
# step. Selected by max(Cout, Cs, Cx) only: the pixel split keeps enough programs in flight.
# AOT on triton 3.8, channels_last 3x3 same padding, ReLU (registers sm_80 / sm_90, no
# spills; HMMA / HGMMA; shared memory 48 / 56 KiB and 96 / 120 KiB):
#   64x64   w4s3   bf16 127 /  82   fp16 128 / 118   fp32 125 / 112
#   128x128 w8s3   bf16 223 / 169   fp16 209 / 169   fp32 248 / 183
WGRAD_CONFIGS: Tuple[KernelConfig, ...] = (
    KernelConfig(64, 0, 64, 64, 32, 16, 4, 3),
    KernelConfig(None, 0, 128, 128, 32, 16, 8, 3),
)

# Autotuning lists: the shipped configs first, then a few more (max_cout / min_m unused
# there). Every one compiles without spills for sm_80 and sm_90 at bf16 / fp16 / fp32
# (tests/test_triton_aot_ccc.py, slow). AOT on triton 3.8, registers sm_80 / sm_90 for
# bf16 | fp16 | fp32, same variants as above:
#   forward 64x128 w4s3  168/123 | 168/123 | 168/149    dgrad 128/118 | 168/118 | 128/128
#   forward 128x64 w8s3  121/72  | 121/72  | 124/96     dgrad 100/69  |  96/69  | 110/80
#   forward 128x64 K16/16 w4s2 128/124 | 128/124 | 168/168    dgrad 128/112 | 127/112 | 148/155
#   (K32/16 w4s2: the bf16 / fp16 dgrad spills 16 bytes on sm_80 with triton 3.6's ptxas)
#   forward 128x128 w8s4 194/128 | 194/128 | 178/170    dgrad 128/123 | 174/123 | 148/128
#   forward 64x64 w4s4   124/66  | 124/66  | 128/80     dgrad  96/70  |  96/70  |  80/94
#   wgrad 64x128 w4s3 168/128 | 168/128 | 168/128;  128x64 w8s3 128/116 | 128/121 | 125/121
#   wgrad 128x64 w8s4 128/116 | 128/121 | 125/121 (120 / 128 KiB shared);
#   wgrad 64x64 K64/32 w4s3 128/90 | 128/96 | 141/95;  64x64 w4s4 127/82 | 128/118 | 125/112
# The pixel x channel tiles of the forward and the dgrad share their extra candidates.
_PIXEL_TILE_EXTRAS: Tuple[KernelConfig, ...] = (
    KernelConfig(None, 0, 64, 128, 32, 16, 4, 3),
    KernelConfig(None, 0, 128, 64, 32, 16, 8, 3),
    KernelConfig(None, 0, 128, 64, 16, 16, 4, 2),
    KernelConfig(None, 0, 128, 128, 32, 16, 8, 4),
    KernelConfig(None, 0, 64, 64, 32, 16, 4, 4),
)
FORWARD_AUTOTUNE_CONFIGS: Tuple[KernelConfig, ...] = SHIPPED_CONFIGS + _PIXEL_TILE_EXTRAS
DGRAD_AUTOTUNE_CONFIGS: Tuple[KernelConfig, ...] = DGRAD_CONFIGS + _PIXEL_TILE_EXTRAS
WGRAD_AUTOTUNE_CONFIGS: Tuple[KernelConfig, ...] = WGRAD_CONFIGS + (
    KernelConfig(None, 0, 64, 128, 32, 16, 4, 3),
    KernelConfig(None, 0, 128, 64, 32, 16, 8, 3),
    KernelConfig(None, 0, 128, 64, 32, 16, 8, 4),
    KernelConfig(None, 0, 64, 64, 64, 32, 4, 3),
    KernelConfig(None, 0, 64, 64, 32, 16, 4, 4),
)

AUTOTUNE_CONFIGS = {
    "forward": FORWARD_AUTOTUNE_CONFIGS,
    "dgrad": DGRAD_AUTOTUNE_CONFIGS,
    "wgrad": WGRAD_AUTOTUNE_CONFIGS,
}

# The wgrad pixel split: L (pixels per split) is a multiple of this, which every wgrad
# BLOCK_K divides, so the split (and the partial buffer) does not depend on the config.
WGRAD_SPLIT_QUANTUM = 256
# Targets of wgrad_split: enough programs for ~4 per SM of a 132-SM GPU (a constant, not a
# device query: the split depends on the shape only), at least this many pixels per split,
# at most this many splits.
_WGRAD_TARGET_PROGRAMS = 4 * 132
_WGRAD_MIN_SPLIT_PIXELS = 4096
_WGRAD_MAX_SPLITS = 128


def _first(configs: Sequence[KernelConfig], size: int, m: int) -> KernelConfig:
    for config in configs:
        if (config.max_cout is None or size <= config.max_cout) and m >= config.min_m:
            return config
    raise AssertionError(f"no shipped config for size {size}, M {m}")  # unreachable


def _output_hw(x: torch.Tensor, k: int, padding: int) -> Tuple[int, int]:
    return x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1


def select_config(x: torch.Tensor, weight: torch.Tensor, padding: int,
                  configs=None) -> KernelConfig:
    """The shipped forward config for this problem (Cout and M = N * Ho * Wo)."""
    ho, wo = _output_hw(x, weight.shape[2], padding)
    return _first(configs or SHIPPED_CONFIGS, weight.shape[0], x.shape[0] * ho * wo)


def select_dgrad_config(skip: torch.Tensor, x: torch.Tensor, configs=None) -> KernelConfig:
    """The shipped dgrad config (max(Cs, Cx) and M = N * H * W)."""
    return _first(configs or DGRAD_CONFIGS, max(skip.shape[1], x.shape[1]),
                  x.shape[0] * x.shape[2] * x.shape[3])


def select_wgrad_config(skip: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        configs=None) -> KernelConfig:
    """The shipped wgrad config (max(Cout, Cs, Cx))."""
    return _first(configs or WGRAD_CONFIGS, max(weight.shape[0], skip.shape[1], x.shape[1]),
                  0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wgrad_split(pixels: int, cout: int, cin: int, k: int) -> Tuple[int, int]:
    """(S, L): the wgrad's pixel reduction over `pixels` = N * Ho * Wo in S ranges of L
    pixels (the last one shorter), L a multiple of WGRAD_SPLIT_QUANTUM. A function of the
    shape only: about _WGRAD_TARGET_PROGRAMS programs at 64 x 64 tiles, no split shorter than
    _WGRAD_MIN_SPLIT_PIXELS, at most _WGRAD_MAX_SPLITS splits."""
    tiles = _cdiv(cout, 64) * (_cdiv(cin, 64) * k * k + 1)
    splits = min(_cdiv(_WGRAD_TARGET_PROGRAMS, max(tiles, 1)),
                 _cdiv(pixels, _WGRAD_MIN_SPLIT_PIXELS), _WGRAD_MAX_SPLITS)
    splits = max(splits, 1)
    length = _cdiv(_cdiv(max(pixels, 1), splits), WGRAD_SPLIT_QUANTUM) * WGRAD_SPLIT_QUANTUM
    return _cdiv(max(pixels, 1), length), length


def m_bucket(m: int) -> int:
    """The autotuning key's size bucket: the next power of two of m (at least 16)."""
    return max(16, 1 << max(int(m) - 1, 0).bit_length())


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
        elif x.dtype not in INTERPRETER_DOT_DTYPES:
            reasons.append(f"x dtype {x.dtype} is not supported under the interpreter"
                           + (" (its tl.dot multiplies the raw bits of bfloat16 operands: "
                              "triton-lang/triton#11584)" if x.dtype == torch.bfloat16 else ""))
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

    # --- forward -------------------------------------------------------------------------

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
        c_base + [0, C)) over the k x k taps; positions outside [0, H) x [0, W) are zero
        (the forward's A operand: source pixels x channels; B: weight channels x Cout)."""
        kk = tl.arange(0, BLOCK_K)
        if INT64_INDEX:
            kk = kk.to(tl.int64)
        a_pix = src_ptr + (n * s_n + oh * s_h + ow * s_w)[:, None]
        b_co = w_ptr + co[None, :] * sw_o
        # One flat loop over (tap, channel chunk): the software pipeline runs across the taps
        # (64 channels are only two chunks per tap) instead of draining at each of them, and
        # the code is not unrolled k * k times (registers, compile time).
        chunks = tl.cdiv(C, BLOCK_K)
        for it in range(0, KSIZE * KSIZE * chunks):
            tap = it // chunks
            c = (it - tap * chunks) * BLOCK_K + kk
            kh = tap // KSIZE
            kw = tap - kh * KSIZE
            dy = kh - PADDING
            dx = kw - PADDING
            iy = oh + dy
            ix = ow + dx
            valid = m_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            c_mask = c < C
            a = tl.load(a_pix + (dy * s_h + dx * s_w) + c[None, :] * s_c,
                        mask=valid[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(b_co + (kh * sw_h + kw * sw_w) + (c_base + c)[:, None] * sw_i,
                        mask=c_mask[:, None] & co_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def crop_concat_conv2d_forward_kernel(
        skip_ptr,  # (N, Cs, H, W): the skip's crop window (skip strides)
        x_ptr,     # (N, Cx, H, W)
        w_ptr,     # (Cout, Cs + Cx, k, k)
        bias_ptr,  # (Cout,) (HAS_BIAS)
        out_ptr,   # (N, Cout, Ho, Wo)
        Cs, Cx, H, W, Cout, Ho, Wo, M,
        M_BUCKET,  # autotuning key only (next power of two of M), unused in the body
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
        """One BLOCK_M x BLOCK_N tile of out (pixels x output channels)."""
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

    # --- backward --------------------------------------------------------------------------

    @triton.jit
    def _masked_grad(gout_ptr, out_ptr, g_offs, o_offs, mask, RELU: tl.constexpr):
        """A tile of G = grad_output, times (output > 0) when RELU (0 where ~mask)."""
        g = tl.load(gout_ptr + g_offs, mask=mask, other=0.0)
        if RELU:
            o = tl.load(out_ptr + o_offs, mask=mask, other=0.0)
            g = tl.where(o > 0, g, tl.zeros_like(g))
        return g

    @triton.jit
    def crop_concat_conv2d_dgrad_kernel(
        gout_ptr,  # (N, Cout, Ho, Wo) grad_output
        out_ptr,   # (N, Cout, Ho, Wo) the forward's output, read for the ReLU mask (RELU)
        w_ptr,     # (Cout, Cs + Cx, k, k)
        gs_ptr,    # (N, Cs, H, W): the crop window of grad_skip (grad_skip's strides)
        gx_ptr,    # (N, Cx, H, W) grad_x
        Cs, Cx, H, W, Cout, Ho, Wo, M,
        M_BUCKET,  # autotuning key only (next power of two of M), unused in the body
        sg_n, sg_c, sg_h, sg_w,
        so_n, so_c, so_h, so_w,
        sw_o, sw_i, sw_h, sw_w,
        sgs_n, sgs_c, sgs_h, sgs_w,
        sgx_n, sgx_c, sgx_h, sgx_w,
        KSIZE: tl.constexpr,
        PADDING: tl.constexpr,
        RELU: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ACC_FP64: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One BLOCK_M x BLOCK_N tile (source pixels x channels of ONE source) of
        grad_in[n, c, y, x] = sum_{co, ky, kx} G[n, co, y + p - ky, x + p - kx] W[co, c, ky, kx].
        Channel tiles [0, cdiv(Cs, BLOCK_N)) are the skip's (weight channels [0, Cs), stored
        into the grad_skip window), the others x's (weight channels Cs + [0, Cx))."""
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        tiles_s = tl.cdiv(Cs, BLOCK_N)
        in_skip = pid_c < tiles_s
        c_tile = tl.where(in_skip, pid_c, pid_c - tiles_s)
        C = tl.where(in_skip, Cs, Cx)
        c_base = tl.where(in_skip, 0, Cs)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = c_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        if INT64_INDEX:
            m = m.to(tl.int64)
            c = c.to(tl.int64)
            kk = kk.to(tl.int64)
        m_mask = m < M
        c_mask = c < C
        xw = m % W
        t = m // W
        yh = t % H
        n = t // H
        if ACC_FP64:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # One flat loop over (tap, Cout chunk), so that the software pipeline runs across the
        # taps (Cout = 64 is only two chunks per tap) instead of draining at every tap.
        g_pix = (n * sg_n + yh * sg_h + xw * sg_w)[:, None]
        o_pix = (n * so_n + yh * so_h + xw * so_w)[:, None]
        w_c = w_ptr + (c_base + c)[None, :] * sw_i
        chunks = tl.cdiv(Cout, BLOCK_K)
        for it in range(0, KSIZE * KSIZE * chunks):
            tap = it // chunks
            co = (it - tap * chunks) * BLOCK_K + kk
            ky = tap // KSIZE
            kx = tap - ky * KSIZE
            dy = PADDING - ky
            dx = PADDING - kx
            oy = yh + dy
            ox = xw + dx
            valid = m_mask & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
            co_mask = co < Cout
            g = _masked_grad(gout_ptr, out_ptr,
                             g_pix + (dy * sg_h + dx * sg_w) + co[None, :] * sg_c,
                             o_pix + (dy * so_h + dx * so_w) + co[None, :] * so_c,
                             valid[:, None] & co_mask[None, :], RELU)
            w = tl.load(w_c + (ky * sw_h + kx * sw_w) + co[:, None] * sw_o,
                        mask=co_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        mask = m_mask[:, None] & c_mask[None, :]
        if in_skip:
            offs = (n * sgs_n + yh * sgs_h + xw * sgs_w)[:, None] + c[None, :] * sgs_c
            tl.store(gs_ptr + offs, acc.to(gs_ptr.dtype.element_ty), mask=mask)
        else:
            offs = (n * sgx_n + yh * sgx_h + xw * sgx_w)[:, None] + c[None, :] * sgx_c
            tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _wgrad_source(
        acc, gout_ptr, out_ptr, src_ptr,
        co, co_mask, c, c_mask, dy, dx, start, end,
        H, W, Ho, Wo, P,
        sg_n, sg_c, sg_h, sg_w,
        so_n, so_c, so_h, so_w,
        s_n, s_c, s_h, s_w,
        RELU: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """acc[co, c] += sum over the pixels p in [start, end) of G[p, co] * src[p + (dy, dx),
        c] (zero outside the H x W source)."""
        kp = tl.arange(0, BLOCK_K)
        if INT64_INDEX:
            kp = kp.to(tl.int64)
        g_co = co[:, None] * sg_c
        o_co = co[:, None] * so_c
        a_c = c[None, :] * s_c
        for p0 in range(start, end, BLOCK_K):
            p = p0 + kp
            p_mask = p < P
            ow = p % Wo
            t = p // Wo
            oh = t % Ho
            n = t // Ho
            g = _masked_grad(gout_ptr, out_ptr, g_co + (n * sg_n + oh * sg_h + ow * sg_w)[None, :],
                             o_co + (n * so_n + oh * so_h + ow * so_w)[None, :],
                             co_mask[:, None] & p_mask[None, :], RELU)
            iy = oh + dy
            ix = ow + dx
            valid = p_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a = tl.load(src_ptr + (n * s_n + iy * s_h + ix * s_w)[:, None] + a_c,
                        mask=valid[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def crop_concat_conv2d_wgrad_kernel(
        gout_ptr,  # (N, Cout, Ho, Wo) grad_output
        out_ptr,   # (N, Cout, Ho, Wo) the forward's output, read for the ReLU mask (RELU)
        skip_ptr,  # (N, Cs, H, W): the skip's crop window (skip strides)
        x_ptr,     # (N, Cx, H, W)
        gw_ptr,    # (S, Cout, Cs + Cx, k, k) contiguous partial sums (float32; float64)
        gb_ptr,    # (S, Cout) contiguous partial bias sums
        Cs, Cx, H, W, Cout, Ho, Wo, P,
        SPLIT_LEN,  # pixels per split (a multiple of BLOCK_K)
        M_BUCKET,   # autotuning key only (next power of two of P), unused in the body
        sg_n, sg_c, sg_h, sg_w,
        so_n, so_c, so_h, so_w,
        ss_n, ss_c, ss_h, ss_w,
        sx_n, sx_c, sx_h, sx_w,
        KSIZE: tl.constexpr,
        PADDING: tl.constexpr,
        RELU: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ACC_FP64: tl.constexpr,
        INT64_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Axis 1: the split (pixels [split * SPLIT_LEN, +SPLIT_LEN) of P = N * Ho * Wo).
        Axis 0: first cdiv(Cout, BLOCK_M) x tiles_ci x k * k weight programs (output-channel
        tile fastest, then the input-channel tile over both sources, then the tap), each
        storing gw[split, co, c, ky, kx] = sum_p G[p, co] * in_c[p + (ky - pad, kx - pad)];
        then cdiv(Cout, BLOCK_M) bias programs storing gb[split, co] = sum_p G[p, co]."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        tiles_co = tl.cdiv(Cout, BLOCK_M)
        tiles_s = tl.cdiv(Cs, BLOCK_N)
        tiles_ci = tiles_s + tl.cdiv(Cx, BLOCK_N)
        weight_programs = tiles_co * tiles_ci * (KSIZE * KSIZE)
        co_tile = pid % tiles_co
        rest = pid // tiles_co
        co = co_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        if INT64_INDEX:
            co = co.to(tl.int64)
            start = split.to(tl.int64) * SPLIT_LEN
        else:
            start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, P)
        co_mask = co < Cout
        cin = Cs + Cx
        if pid < weight_programs:
            ci_tile = rest % tiles_ci
            tap = rest // tiles_ci
            in_skip = ci_tile < tiles_s
            c = tl.where(in_skip, ci_tile, ci_tile - tiles_s) * BLOCK_N + tl.arange(0, BLOCK_N)
            if INT64_INDEX:
                c = c.to(tl.int64)
            c_mask = c < tl.where(in_skip, Cs, Cx)
            c_glob = tl.where(in_skip, 0, Cs) + c
            dy = tap // KSIZE - PADDING
            dx = tap % KSIZE - PADDING
            if ACC_FP64:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if in_skip:
                acc = _wgrad_source(acc, gout_ptr, out_ptr, skip_ptr, co, co_mask, c, c_mask,
                                    dy, dx, start, end, H, W, Ho, Wo, P,
                                    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
                                    ss_n, ss_c, ss_h, ss_w,
                                    RELU, INPUT_PRECISION, INT64_INDEX, BLOCK_K)
            else:
                acc = _wgrad_source(acc, gout_ptr, out_ptr, x_ptr, co, co_mask, c, c_mask,
                                    dy, dx, start, end, H, W, Ho, Wo, P,
                                    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
                                    sx_n, sx_c, sx_h, sx_w,
                                    RELU, INPUT_PRECISION, INT64_INDEX, BLOCK_K)
            # gw[split, co, c_glob, tap], contiguous (S, Cout, Cin, k, k).
            taps = KSIZE * KSIZE
            offs = ((split * Cout + co[:, None]) * cin + c_glob[None, :]) * taps + tap
            tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty),
                     mask=co_mask[:, None] & c_mask[None, :])
        else:
            kp = tl.arange(0, BLOCK_K)
            if INT64_INDEX:
                kp = kp.to(tl.int64)
            if ACC_FP64:
                bacc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64)
            else:
                bacc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            g_co = co[:, None] * sg_c
            o_co = co[:, None] * so_c
            for p0 in range(start, end, BLOCK_K):
                p = p0 + kp
                p_mask = p < P
                ow = p % Wo
                t = p // Wo
                oh = t % Ho
                n = t // Ho
                g = _masked_grad(gout_ptr, out_ptr,
                                 g_co + (n * sg_n + oh * sg_h + ow * sg_w)[None, :],
                                 o_co + (n * so_n + oh * so_h + ow * so_w)[None, :],
                                 co_mask[:, None] & p_mask[None, :], RELU)
                bacc += g.to(bacc.dtype)
            tl.store(gb_ptr + split * Cout + co, tl.sum(bacc, axis=1).to(gb_ptr.dtype.element_ty),
                     mask=co_mask)


def crop_offset(skip: torch.Tensor, x: torch.Tensor) -> Tuple[int, int]:
    return _reference.center_crop_offset(skip.shape[-2:], x.shape[-2:])


def crop_view(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The zero-copy view of the skip's center crop window (x's spatial size)."""
    oy, ox = crop_offset(skip, x)
    return skip[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]]


def zero_outside_window(grad_skip: torch.Tensor, x: torch.Tensor) -> None:
    """Zero the pixels of grad_skip outside the crop window (at most four strided fills:
    the rows above and below, the columns left and right of it)."""
    oy, ox = crop_offset(grad_skip, x)
    h, w = x.shape[2], x.shape[3]
    hs, ws = grad_skip.shape[2], grad_skip.shape[3]
    if grad_skip.numel() == 0 or (hs == h and ws == w):
        return
    for part in (grad_skip[:, :, :oy], grad_skip[:, :, oy + h:],
                 grad_skip[:, :, oy:oy + h, :ox], grad_skip[:, :, oy:oy + h, ox + w:]):
        if part.numel():
            part.zero_()


def _dtype_class(dtype: torch.dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "32bit"


def _triton_config(config: KernelConfig, dtype_class: str):
    block_k = config.block_k if dtype_class == "16bit" else config.block_k_fp32
    return triton.Config({"BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                          "BLOCK_K": block_k},
                         num_warps=config.num_warps, num_stages=config.num_stages)


# Autotuning key (kernel argument names; triton appends the tensors' dtypes).
AUTOTUNE_KEY = ("Cs", "Cx", "Cout", "M_BUCKET", "KSIZE")

_AUTOTUNERS: dict = {}


def autotuner(kernel_name: str, dtype: torch.dtype):
    """The triton Autotuner of `kernel_name` ("forward", "dgrad", "wgrad") for `dtype`'s
    class (one per kernel and class, created on first use and kept: it caches its choices)."""
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    key = (kernel_name, _dtype_class(dtype))
    if key not in _AUTOTUNERS:
        kernel = _KERNELS[kernel_name]
        configs = [_triton_config(c, key[1]) for c in AUTOTUNE_CONFIGS[kernel_name]]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=list(AUTOTUNE_KEY))(kernel)
    return _AUTOTUNERS[key]


def uses_autotune(tensor: torch.Tensor, config: Optional[KernelConfig]) -> bool:
    """Whether a launch for `tensor` autotunes: a real GPU (not the interpreter), no explicit
    config, autotuning allowed, deterministic algorithms not requested."""
    return (config is None and _autotune and not INTERPRET and tensor.is_cuda
            and not torch.are_deterministic_algorithms_enabled())


def _max_block(kernel_name: str, dtype: torch.dtype, config: Optional[KernelConfig]) -> int:
    configs = (config,) if config is not None else AUTOTUNE_CONFIGS[kernel_name]
    return max(max(c.block_m, c.block_n, c.block_k_for(dtype)) for c in configs)


def _launch(kernel_name: str, tensor: torch.Tensor, config: Optional[KernelConfig],
            select, grid, args, constexprs) -> None:
    """Launch `kernel_name` on grid(BLOCK_M, BLOCK_N): autotuned (see uses_autotune) or at
    `config` (default: select())."""
    wrap = _common.traceable
    with _common.device_guard(tensor):
        if uses_autotune(tensor, config):
            tuner = autotuner(kernel_name, tensor.dtype)
            wrap(tuner)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](
                *args, **constexprs)
            return
        config = config or select()
        wrap(_KERNELS[kernel_name])[grid(config.block_m, config.block_n)](
            *args, **constexprs,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k_for(tensor.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


if triton is not None:
    import importlib

    _ops = importlib.import_module("fastseg.ops.crop_concat_conv2d")

    _KERNELS = {
        "forward": crop_concat_conv2d_forward_kernel,
        "dgrad": crop_concat_conv2d_dgrad_kernel,
        "wgrad": crop_concat_conv2d_wgrad_kernel,
    }

    def launch_forward(out, skip, x, weight, bias, padding, activation,
                       config: Optional[KernelConfig] = None):
        """Run the forward kernel into `out` (exposed for tests: `config` overrides the
        shipped selection and autotuning)."""
        N, Cs, _, _ = skip.shape
        _, Cx, H, W = x.shape
        Cout, _, k, _ = weight.shape
        Ho, Wo = out.shape[2], out.shape[3]
        M = N * Ho * Wo
        window = crop_view(skip, x)
        margin = _max_block("forward", x.dtype, config)
        _launch(
            "forward", x, config, lambda: select_config(x, weight, padding),
            lambda bm, bn: (triton.cdiv(M, bm), triton.cdiv(Cout, bn)),
            (window, x, weight, bias if bias is not None else out, out,
             Cs, Cx, H, W, Cout, Ho, Wo, M, m_bucket(M),
             *window.stride(), *x.stride(), *weight.stride(), *out.stride()),
            dict(KSIZE=k, PADDING=int(padding), HAS_BIAS=bias is not None,
                 RELU=int(activation) == 1, INPUT_PRECISION=input_precision(x.dtype),
                 ACC_FP64=x.dtype == torch.float64,
                 INT64_INDEX=needs_int64(skip, x, weight, out, margin=margin)))
        return out

    def launch_dgrad(grad_skip_window, grad_x, grad_output, output, skip, x, weight, padding,
                     activation, config: Optional[KernelConfig] = None):
        """Run the dgrad kernel: grad_skip_window (the crop window view of grad_skip) and
        grad_x are written in full (`config` overrides the selection and autotuning)."""
        N, Cs, H, W = grad_skip_window.shape
        Cx = grad_x.shape[1]
        Cout, _, k, _ = weight.shape
        Ho, Wo = grad_output.shape[2], grad_output.shape[3]
        M = N * H * W
        if M == 0 or Cs + Cx == 0:
            return
        if Cout == 0:  # no output channel: nothing flows back
            grad_skip_window.zero_()
            grad_x.zero_()
            return
        relu = int(activation) == 1
        out = output if relu else grad_output
        margin = _max_block("dgrad", x.dtype, config)
        _launch(
            "dgrad", x, config, lambda: select_dgrad_config(skip, x),
            lambda bm, bn: (triton.cdiv(M, bm), triton.cdiv(Cs, bn) + triton.cdiv(Cx, bn)),
            (grad_output, out, weight, grad_skip_window, grad_x,
             Cs, Cx, H, W, Cout, Ho, Wo, M, m_bucket(M),
             *grad_output.stride(), *out.stride(), *weight.stride(),
             *grad_skip_window.stride(), *grad_x.stride()),
            dict(KSIZE=k, PADDING=int(padding), RELU=relu,
                 INPUT_PRECISION=input_precision(x.dtype), ACC_FP64=x.dtype == torch.float64,
                 INT64_INDEX=needs_int64(grad_output, out, weight, grad_skip_window, grad_x,
                                         margin=margin)))

    def launch_wgrad(grad_output, output, skip, x, weight, padding, activation,
                     config: Optional[KernelConfig] = None,
                     split_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the wgrad kernel (with grad_bias) and reduce its split partials: returns
        (grad_weight contiguous, grad_bias), in weight's dtype. `config` overrides the
        selection and autotuning; `split_len` (a multiple of the BLOCK_K of every config that
        may run) the pixels per split (tests)."""
        window = crop_view(skip, x)
        N, Cs, H, W = window.shape
        Cx = x.shape[1]
        Cout, Cin, k, _ = weight.shape
        Ho, Wo = grad_output.shape[2], grad_output.shape[3]
        P = N * Ho * Wo
        splits, length = wgrad_split(P, Cout, Cin, k)
        if split_len is not None:
            candidates = (config,) if config is not None else WGRAD_AUTOTUNE_CONFIGS
            block_k = max(c.block_k_for(x.dtype) for c in candidates)
            if split_len <= 0 or split_len % block_k:
                raise ValueError(f"split_len {split_len} must be a positive multiple of "
                                 f"BLOCK_K {block_k}")
            length = split_len
            splits = _cdiv(max(P, 1), length)
        if Cout == 0 or P == 0:  # nothing to reduce
            return (torch.zeros_like(weight, memory_format=torch.contiguous_format),
                    weight.new_zeros(Cout))
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        part_w = torch.empty((splits, Cout, Cin, k, k), dtype=acc_dtype, device=x.device)
        part_b = torch.empty((splits, Cout), dtype=acc_dtype, device=x.device)
        relu = int(activation) == 1
        out = output if relu else grad_output
        # The pixel tails (p < P + BLOCK_K) stay within one image past the last: margin.
        margin = _max_block("wgrad", x.dtype, config)
        _launch(
            "wgrad", x, config, lambda: select_wgrad_config(skip, x, weight),
            lambda bm, bn: (triton.cdiv(Cout, bm) * ((triton.cdiv(Cs, bn) + triton.cdiv(Cx, bn))
                                                     * k * k + 1), splits),
            (grad_output, out, window, x, part_w, part_b,
             Cs, Cx, H, W, Cout, Ho, Wo, P, length, m_bucket(P),
             *grad_output.stride(), *out.stride(), *window.stride(), *x.stride()),
            dict(KSIZE=k, PADDING=int(padding), RELU=relu,
                 INPUT_PRECISION=input_precision(x.dtype), ACC_FP64=x.dtype == torch.float64,
                 INT64_INDEX=needs_int64(grad_output, out, window, x, part_w, part_b,
                                         margin=margin)))
        grad_weight = part_w.sum(dim=0).to(weight.dtype)
        grad_bias = part_b.sum(dim=0).to(weight.dtype)
        return grad_weight, grad_bias

    def backward_kernels(grad_output, output, skip, x, weight, padding, activation,
                         dgrad_config: Optional[KernelConfig] = None,
                         wgrad_config: Optional[KernelConfig] = None,
                         split_len: Optional[int] = None):
        """The "kernels" backward (module doc); the configs / split_len override the
        selection (tests)."""
        grad_skip = _checks.empty_like_format(skip, skip.shape)
        grad_x = _checks.empty_like_format(x, x.shape)
        zero_outside_window(grad_skip, x)
        launch_dgrad(crop_view(grad_skip, x), grad_x, grad_output, output, skip, x, weight,
                     padding, activation, config=dgrad_config)
        grad_weight, grad_bias = launch_wgrad(grad_output, output, skip, x, weight, padding,
                                              activation, config=wgrad_config,
                                              split_len=split_len)
        return grad_skip, grad_x, grad_weight, grad_bias

    def backward_views(
        grad_output: torch.Tensor,
        output: torch.Tensor,
        skip: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: int,
        activation: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "views" backward: torch ops on zero-copy views."""
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
        """(grad_skip, grad_x, grad_weight, grad_bias) by the backward mode in force."""
        if _backward_mode == "views":
            return backward_views(grad_output, output, skip, x, weight, padding, activation)
        if _common.interpreted_fake(x, INTERPRET):
            return _ops.fake_backward(grad_output, output, skip, x, weight, padding,
                                      activation)
        return backward_kernels(grad_output, output, skip, x, weight, padding, activation)

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
    launch_dgrad = None
    launch_wgrad = None
    backward_kernels = None
    backward_views = None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): tests/test_triton_aot_ccc.py.
# ---------------------------------------------------------------------------------------

KERNEL_NAMES = ("forward", "dgrad", "wgrad")


def compile_ahead_of_time(config: KernelConfig, dtype: torch.dtype, capability: int, *,
                          kernel_name: str = "forward",
                          ksize: int = 3, padding: int = 1, has_bias: bool = True,
                          relu: bool = True, channels_last: bool = True,
                          overrides: Optional[dict] = None,
                          ones: Optional[Tuple[str, ...]] = None):
    """Compile the `kernel_name` kernel ("forward", "dgrad" or "wgrad") at ``config`` for
    sm_<capability> (no GPU needed).

    Defaults to what the launcher passes for densely stored channels_last tensors (the unit
    channel strides become constants, as in the JIT; ``channels_last=False``: unit W strides
    of NCHW maps, unit kw stride of a contiguous weight). float32 compiles with TF32 (the
    PyTorch default for convolutions); ``overrides`` replaces constexprs; ``has_bias`` is
    the forward's only. Returns triton's CompiledKernel.
    """
    from fastseg.triton import upsample_add as _up

    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if kernel_name not in KERNEL_NAMES:
        raise ValueError(f"kernel_name must be one of {', '.join(map(repr, KERNEL_NAMES))}, "
                         f"got {kernel_name!r}")
    t = "*" + _up.TRITON_TYPES[dtype]
    kernel = _KERNELS[kernel_name]
    constexprs = dict(KSIZE=ksize, PADDING=padding, RELU=relu,
                      INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      ACC_FP64=dtype == torch.float64, INT64_INDEX=False,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_K=config.block_k_for(dtype))
    # Map sizes are not divisible by 16 in general (the channel counts of U-Net are).
    sizes = ("M", "Ho", "Wo", "H", "W", "P")
    if kernel_name == "forward":
        constexprs["HAS_BIAS"] = has_bias
        pointers = dict(skip_ptr=t, x_ptr=t, w_ptr=t, bias_ptr=t, out_ptr=t)
        default_ones = (("ss_c", "sx_c", "so_c", "sw_i") if channels_last
                        else ("ss_w", "sx_w", "so_w", "sw_w"))
    elif kernel_name == "dgrad":
        pointers = dict(gout_ptr=t, out_ptr=t, w_ptr=t, gs_ptr=t, gx_ptr=t)
        default_ones = (("sg_c", "so_c", "sw_i", "sgs_c", "sgx_c") if channels_last
                        else ("sg_w", "so_w", "sw_w", "sgs_w", "sgx_w"))
    else:
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        pointers = dict(gout_ptr=t, out_ptr=t, skip_ptr=t, x_ptr=t, gw_ptr=acc, gb_ptr=acc)
        default_ones = (("sg_c", "so_c", "ss_c", "sx_c") if channels_last
                        else ("sg_w", "so_w", "ss_w", "sx_w"))
    _common.apply_overrides(constexprs, overrides, kernel_name)
    if ones is None:
        ones = default_ones
    divisible = tuple(n for n in kernel.arg_names if n not in ones and n not in pointers
                      and n not in constexprs and n not in sizes)
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
    "FORWARD_OP_NAME", "BACKWARD_OP_NAME", "SHIPPED_CONFIGS", "DGRAD_CONFIGS", "WGRAD_CONFIGS",
    "FORWARD_AUTOTUNE_CONFIGS", "DGRAD_AUTOTUNE_CONFIGS", "WGRAD_AUTOTUNE_CONFIGS",
    "AUTOTUNE_CONFIGS", "AUTOTUNE_KEY", "BACKWARD_MODES", "KernelConfig", "INTERPRET",
    "WGRAD_SPLIT_QUANTUM", "KERNEL_NAMES",
    "forward", "backward", "not_supported_reasons", "select_config", "select_dgrad_config",
    "select_wgrad_config", "wgrad_split", "m_bucket", "launch_forward", "launch_dgrad",
    "launch_wgrad", "backward_kernels", "backward_views", "set_backward_mode",
    "get_backward_mode", "backward_mode_from_env", "set_autotune", "get_autotune",
    "autotune_from_env", "autotuner", "uses_autotune", "zero_outside_window",
    "compile_ahead_of_time", "resource_usage", "sass", "input_precision",
]
