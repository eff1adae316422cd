"""Ahead-of-time compile of the Triton kernels (softmax cross-entropy, upsample_add,
deconv_add) for sm_80 and sm_90.

No GPU needed: triton compiles to PTX and runs the ptxas it ships; registers and spills are
read from the cubin with the cuobjdump it ships. Every shipped tile configuration
(``SHIPPED_CONFIGS`` of fastseg.triton.softmax_cross_entropy and of
fastseg.triton.upsample_add, shared by deconv_add) must compile for both targets, in float32
and bfloat16, forward and backward, with no register spills.

    pytest -q -s tests/test_triton_aot.py     # -s prints the register table
"""

import pytest
import torch

from conftest import require_aot_compiler

require_aot_compiler()

from fastseg.triton import softmax_cross_entropy as sce  # noqa: E402

CAPABILITIES = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _compile(kernel, config, dtype, capability, **kwargs):
    compiled = sce.compile_ahead_of_time(kernel, config, dtype, capability, **kwargs)
    usage = sce.resource_usage(compiled)
    print(f"{config.name:30s} {kernel:8s} {str(dtype)[6:]:8s} sm_{capability}: "
          f"{usage['regs']} registers, {usage['spills']} spill bytes, "
          f"{usage.get('shared', '?')} shared bytes")
    return compiled, usage


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("config", sce.SHIPPED_CONFIGS, ids=lambda c: c.name)
def test_shipped_config_compiles_without_spills(config, dtype, capability):
    """The heaviest variant (weights, pixel weights, smoothing, mean) of both kernels."""
    for kernel in ("forward", "backward"):
        compiled, usage = _compile(kernel, config, dtype, capability)
        assert compiled.asm.get("cubin"), f"{kernel} {config.name}: no cubin"
        assert compiled.metadata.num_warps == config.num_warps
        assert usage["spills"] == 0, f"{kernel} {config.name} {dtype} sm_{capability}: {usage}"
        ptx = compiled.asm["ptx"]
        if config.layout == "pixel":
            # NCHW rows are read (and the gradient written) with 16-byte vector accesses.
            assert "ld.global.v4" in ptx, f"{kernel} {config.name}: no 16-byte loads"
            if kernel == "backward":
                assert "st.global.v4" in ptx, f"{kernel} {config.name}: no 16-byte stores"


def _variants():
    """Other constexpr combinations the launchers use, once per layout (sm_90, bfloat16)."""
    by_layout = {}
    for config in sce.SHIPPED_CONFIGS:  # the looping config of each layout
        if config.max_classes is None:
            by_layout[config.layout] = config
    single = next(c for c in sce.SHIPPED_CONFIGS if c.layout == "pixel" and c.single_chunk)
    plain = dict(reduction=sce.REDUCTION_NONE, has_weight=False, has_pixel_weight=False,
                 smoothing=False)
    cases = []
    for layout, config in sorted(by_layout.items()):
        cases += [
            pytest.param("forward", config, dict(plain, target_dtype=torch.uint8),
                         id=f"{layout}-forward-plain-u8"),
            pytest.param("backward", config, dict(plain, target_dtype=torch.int32),
                         id=f"{layout}-backward-plain-i32"),
            pytest.param("forward", config, dict(reduction=sce.REDUCTION_SUM,
                                                 overrides={"INT64_INDEX": True}),
                         id=f"{layout}-forward-sum-int64-index"),
            pytest.param("backward", config, dict(reduction=sce.REDUCTION_SUM,
                                                  overrides={"INT64_INDEX": True}),
                         id=f"{layout}-backward-sum-int64-index"),
        ]
    cases += [
        pytest.param("backward", single, dict(overrides={"GRAD_SAME_STRIDES": False}),
                     id="pixel-backward-other-grad-strides"),
        pytest.param("backward", by_layout["strided"], dict(overrides={"GRAD_SAME_STRIDES": True}),
                     id="strided-backward-same-grad-strides"),
        pytest.param("forward", single, dict(plain, reduction=sce.REDUCTION_MEAN),
                     id="pixel-forward-single-chunk-plain-mean"),
    ]
    # Integer arguments equal to 1 become constants in triton's JIT: one pixel per image,
    # one class, a unit stride, ignore_index=1.
    ones = {"S": ("S", "stride_s", "ignore_index"), "C": ("C", "stride_c")}
    for kernel in ("forward", "backward"):
        for what, names in ones.items():
            layout = "class" if what == "S" else "pixel"
            if kernel == "backward":
                names += ("grad_stride_s",) if what == "S" else ("grad_stride_c",)
            cases.append(pytest.param(kernel, by_layout[layout], dict(ones=names),
                                      id=f"{layout}-{kernel}-{what}-is-1"))
    return cases
    return cases


@pytest.mark.parametrize("kernel,config,kwargs", _variants())
def test_variant_compiles_without_spills(kernel, config, kwargs):
    compiled, usage = _compile(kernel, config, torch.bfloat16, 90, **kwargs)
    assert usage["spills"] == 0, f"{kernel} {config.name} {kwargs}: {usage}"


def test_float16_compiles():
    config = next(c for c in sce.SHIPPED_CONFIGS if c.layout == "pixel" and c.max_classes == 32)
    for kernel in ("forward", "backward"):
        _, usage = _compile(kernel, config, torch.float16, 80)
        assert usage["spills"] == 0


def test_config_selection_covers_layouts():
    """The launcher's choice for the layouts the public layer hands over."""
    def pick(x):
        config, pixel_unit, class_unit = sce.select_config(x)
        assert config in sce.SHIPPED_CONFIGS
        return config.layout, pixel_unit, class_unit, config.max_classes

    nchw = torch.empty(2, 21, 35)
    assert pick(nchw) == ("pixel", True, False, 32)
    assert pick(torch.empty(2, 150, 35))[:2] == ("pixel", True)
    assert pick(torch.empty(2, 150, 35))[3] is None
    channels_last = torch.empty(2, 35, 21).permute(0, 2, 1)
    assert pick(channels_last) == ("class", False, True, 32)
    flat = torch.empty(100, 5).as_strided((1, 5, 100), (0, 1, 5))  # a 2-D (N, C) input
    assert pick(flat) == ("class", False, True, 8)
    sliced = torch.empty(2, 21, 70)[:, :, ::2]
    assert pick(sliced) == ("strided", False, False, None)
    for C in (2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 1000):
        config = sce.select_config(torch.empty(1, C, 7))[0]
        assert config.max_classes is None or C <= config.max_classes
        assert config.single_chunk == (config.max_classes is not None)
        assert config.max_classes is not None or C > 32


def test_not_supported_reasons_without_interpreter():
    x = torch.randn(1, 3, 7)
    t = torch.zeros(1, 7, dtype=torch.int64)
    reasons = sce.not_supported_reasons(x, t)
    assert any("TRITON_INTERPRET" in r for r in reasons), reasons


# --- FCN decoder kernels (fastseg.triton.upsample_add / deconv_add) ------------------------

from fastseg.triton import deconv_add as dca  # noqa: E402
from fastseg.triton import upsample_add as upa  # noqa: E402

FCN_MODULES = {"upsample_add": upa, "deconv_add": dca}


def _compile_fcn(op, kernel, config, dtype, capability, **kwargs):
    module = FCN_MODULES[op]
    compiled = module.compile_ahead_of_time(kernel, config, dtype, capability, **kwargs)
    usage = upa.resource_usage(compiled)
    print(f"{op:13s} {config.name:34s} {kernel:8s} {str(dtype)[6:]:8s} sm_{capability}: "
          f"{usage['regs']} registers, {usage['spills']} spill bytes")
    return compiled, usage


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("config", upa.SHIPPED_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("op", list(FCN_MODULES))
def test_fcn_shipped_config_compiles_without_spills(op, config, dtype, capability):
    """Forward (with a skip) and backward at every shipped tile configuration."""
    for kernel in ("forward", "backward"):
        compiled, usage = _compile_fcn(op, kernel, config, dtype, capability)
        assert compiled.asm.get("cubin"), f"{op} {kernel} {config.name}: no cubin"
        assert compiled.metadata.num_warps == config.num_warps
        assert usage["spills"] == 0, f"{op} {kernel} {config.name} {dtype} sm_{capability}: {usage}"
        assert usage["regs"] <= 128, f"{op} {kernel} {config.name}: {usage}"
        ptx = compiled.asm["ptx"]
        # The output (forward) / gradient (backward) tile is written along the contiguous
        # axis with vector stores (aligned maps: W or C a multiple of 16).
        assert "st.global.v" in ptx, f"{op} {kernel} {config.name}: no vector stores"
        if config.channels_last:  # the skip / x / gradient reads along C are vectors too
            assert "ld.global.v" in ptx, f"{op} {kernel} {config.name}: no vector loads"


def _fcn_variants():
    nchw = next(c for c in upa.SHIPPED_CONFIGS if c.layout == "nchw" and c.max_inner is None)
    cl = next(c for c in upa.SHIPPED_CONFIGS if c.layout == "channels_last"
              and c.max_inner is None)
    cases = []
    for op in FCN_MODULES:
        for config in (nchw, cl):
            cases += [
                pytest.param(op, "forward", config, dict(has_skip=False),
                             id=f"{op}-{config.layout}-forward-noskip"),
                pytest.param(op, "forward", config, dict(overrides={"INT64_INDEX": True}),
                             id=f"{op}-{config.layout}-forward-int64"),
                pytest.param(op, "backward", config, dict(overrides={"INT64_INDEX": True}),
                             id=f"{op}-{config.layout}-backward-int64"),
                # Sliced inputs: no unit stride at all (runtime strides only).
                pytest.param(op, "forward", config, dict(ones=()),
                             id=f"{op}-{config.layout}-forward-strided"),
                pytest.param(op, "backward", config, dict(ones=()),
                             id=f"{op}-{config.layout}-backward-strided"),
            ]
    for kernel in ("forward", "backward"):
        cases.append(pytest.param("upsample_add", kernel, nchw, dict(align_corners=True),
                                  id=f"upsample_add-{kernel}-align-corners"))
    return cases


@pytest.mark.parametrize("op,kernel,config,kwargs", _fcn_variants())
def test_fcn_variant_compiles_without_spills(op, kernel, config, kwargs):
    _, usage = _compile_fcn(op, kernel, config, torch.bfloat16, 90, **kwargs)
    assert usage["spills"] == 0, f"{op} {kernel} {config.name} {kwargs}: {usage}"


def test_fcn_float16_compiles():
    for op in FCN_MODULES:
        for kernel in ("forward", "backward"):
            _, usage = _compile_fcn(op, kernel, upa.SHIPPED_CONFIGS[0], torch.float16, 80)
            assert usage["spills"] == 0


def test_fcn_not_supported_reasons_without_interpreter():
    x = torch.randn(1, 2, 3, 4)
    assert any("TRITON_INTERPRET" in r for r in upa.not_supported_reasons(x, None))
    assert any("TRITON_INTERPRET" in r for r in dca.not_supported_reasons(
        x, torch.randn(2, 1, 4, 4), None))
