"""Ahead-of-time compile of the crop_concat_conv2d Triton forward (implicit GEMM) for sm_80
and sm_90, no GPU needed (triton's ptxas; registers and spills from the cuobjdump it ships).

Every shipped tile configuration (``fastseg.triton.crop_concat_conv2d.SHIPPED_CONFIGS``)
must compile for both targets in bfloat16 and float32 (TF32) - 3x3 same padding, bias and
ReLU, channels_last (the heaviest variant) - with no register spills, and the SASS must use
tensor cores: HMMA on sm_80, HGMMA (wgmma) or HMMA on sm_90.

    pytest -q -s tests/test_triton_aot_ccc.py     # -s prints the register table
"""

import pytest
import torch

from conftest import require_aot_compiler

require_aot_compiler()

from fastseg.triton import crop_concat_conv2d as ccc  # noqa: E402

CAPABILITIES = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _compile(config, dtype, capability, **kwargs):
    compiled = ccc.compile_ahead_of_time(config, dtype, capability, **kwargs)
    usage = ccc.resource_usage(compiled)
    sass = ccc.sass(compiled)
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    print(f"{config.name:36s} {str(dtype)[6:]:8s} sm_{capability} {kwargs or ''}: "
          f"{usage['regs']} registers, {usage['spills']} spill bytes, "
          f"{usage.get('shared', '?')} shared bytes, {mma}")
    return compiled, usage, sass


def _uses_tensor_cores(sass, capability):
    if capability >= 90:
        return "HGMMA" in sass or "HMMA" in sass
    return "HMMA" in sass


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("config", ccc.SHIPPED_CONFIGS, ids=lambda c: c.name)
def test_shipped_config_compiles_without_spills(config, dtype, capability):
    compiled, usage, sass = _compile(config, dtype, capability)
    assert compiled.asm.get("cubin"), f"{config.name}: no cubin"
    assert compiled.metadata.num_warps == config.num_warps
    assert usage["spills"] == 0, f"{config.name} {dtype} sm_{capability}: {usage}"
    assert _uses_tensor_cores(sass, capability), \
        f"{config.name} {dtype} sm_{capability}: no HMMA/HGMMA in the SASS"
    if capability == 90 and dtype == torch.bfloat16:
        assert "HGMMA" in sass, f"{config.name}: bf16 on sm_90 without wgmma"


def test_float16_and_nchw_1x1_compile():
    """fp16 on Hopper (HGMMA), and an NCHW 1x1 variant without bias and ReLU."""
    config = ccc.SHIPPED_CONFIGS[-1]
    _, usage, sass = _compile(config, torch.float16, 90)
    assert usage["spills"] == 0 and "HGMMA" in sass
    _, usage, sass = _compile(config, torch.bfloat16, 80, ksize=1, padding=0, has_bias=False,
                              relu=False, channels_last=False)
    assert usage["spills"] == 0 and "HMMA" in sass


def test_float32_without_tf32_compiles_to_fma():
    """allow_tf32 off: IEEE float32 (FFMA, no tensor cores), still no spills."""
    config = ccc.SHIPPED_CONFIGS[-1]
    _, usage, sass = _compile(config, torch.float32, 80,
                              overrides={"INPUT_PRECISION": "ieee"})
    assert usage["spills"] == 0
    assert "HMMA" not in sass and "FFMA" in sass


def test_not_supported_reasons_without_interpreter():
    x = torch.empty(1, 2, 3, 3)
    reasons = ccc.not_supported_reasons(x, x, x)
    assert any("TRITON_INTERPRET" in r for r in reasons), reasons
    assert ccc.input_precision(torch.bfloat16) == "ieee"
