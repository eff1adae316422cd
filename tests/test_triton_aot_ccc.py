"""Ahead-of-time compile of the crop_concat_conv2d Triton kernels (forward, dgrad and wgrad
implicit GEMMs) for sm_80 and sm_90, no GPU needed (triton's ptxas; registers and spills from
the cuobjdump it ships).

Every shipped tile configuration (``SHIPPED_CONFIGS``, ``DGRAD_CONFIGS``, ``WGRAD_CONFIGS``
of fastseg.triton.crop_concat_conv2d) must compile for both targets in bfloat16, float16 and
float32 (TF32) - 3x3 same padding, ReLU (+ bias for the forward), channels_last (the
heaviest variant) - with no register spills, and the SASS must use tensor cores: HMMA on
sm_80, HGMMA (wgmma) or HMMA on sm_90. The other configs of the autotuning lists
(``*_AUTOTUNE_CONFIGS``) likewise (marked slow: about a hundred compiles).

    pytest -q -s tests/test_triton_aot_ccc.py     # -s prints the register table
"""

import pytest
import torch

from conftest import require_aot_compiler

require_aot_compiler()

from fastseg.triton import crop_concat_conv2d as ccc  # noqa: E402

CAPABILITIES = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHIPPED = {"forward": ccc.SHIPPED_CONFIGS, "dgrad": ccc.DGRAD_CONFIGS,
           "wgrad": ccc.WGRAD_CONFIGS}


def _compile(config, dtype, capability, **kwargs):
    compiled = ccc.compile_ahead_of_time(config, dtype, capability, **kwargs)
    usage = ccc.resource_usage(compiled)
    sass = ccc.sass(compiled)
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    kernel = kwargs.pop("kernel_name", "forward")
    print(f"{kernel:7s} {config.name:36s} {str(dtype)[6:]:8s} sm_{capability} {kwargs or ''}: "
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


def _params(configs_by_kernel):
    return [pytest.param(kernel, config, id=f"{kernel}-{config.name}")
            for kernel, configs in configs_by_kernel.items() for config in configs]


def _check_compiles_without_spills(kernel, config, dtype, capability):
    compiled, usage, sass = _compile(config, dtype, capability, kernel_name=kernel)
    what = f"{kernel} {config.name} {dtype} sm_{capability}"
    assert compiled.asm.get("cubin"), f"{what}: no cubin"
    assert compiled.metadata.num_warps == config.num_warps
    assert usage["spills"] == 0, f"{what}: {usage}"
    assert _uses_tensor_cores(sass, capability), f"{what}: no HMMA/HGMMA in the SASS"


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("dtype", list(ALL_DTYPES.values()), ids=list(ALL_DTYPES))
@pytest.mark.parametrize("kernel,config", _params({k: SHIPPED[k] for k in ("dgrad", "wgrad")}))
def test_backward_shipped_configs_compile_without_spills(kernel, config, dtype, capability):
    _check_compiles_without_spills(kernel, config, dtype, capability)


_EXTRA = {kernel: tuple(c for c in configs if c not in SHIPPED[kernel])
          for kernel, configs in ccc.AUTOTUNE_CONFIGS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("dtype", list(ALL_DTYPES.values()), ids=list(ALL_DTYPES))
@pytest.mark.parametrize("kernel,config", _params(_EXTRA))
def test_autotune_configs_compile_without_spills(kernel, config, dtype, capability):
    """The autotuning lists' configs beyond the shipped ones (those are tested above and,
    for the forward, by test_shipped_config_compiles_without_spills)."""
    _check_compiles_without_spills(kernel, config, dtype, capability)


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
def test_forward_shipped_configs_compile_in_float16(capability):
    """fp16 for the forward's shipped configs (bf16 / fp32: the test above)."""
    for config in ccc.SHIPPED_CONFIGS:
        _check_compiles_without_spills("forward", config, torch.float16, capability)


@pytest.mark.parametrize("kernel", ["dgrad", "wgrad"])
def test_backward_nchw_1x1_and_ieee_variants(kernel):
    """NCHW 1x1 without ReLU (tensor cores, no spills), and float32 without TF32 (FFMA, no
    HMMA, no spills)."""
    config = SHIPPED[kernel][-1]
    _, usage, sass = _compile(config, torch.bfloat16, 80, kernel_name=kernel, ksize=1,
                              padding=0, relu=False, channels_last=False)
    assert usage["spills"] == 0 and "HMMA" in sass
    _, usage, sass = _compile(config, torch.float16, 90, kernel_name=kernel, ksize=3,
                              padding=0, channels_last=False)
    assert usage["spills"] == 0 and ("HGMMA" in sass or "HMMA" in sass)
    _, usage, sass = _compile(config, torch.float32, 80, kernel_name=kernel,
                              overrides={"INPUT_PRECISION": "ieee"})
    assert usage["spills"] == 0
    assert "HMMA" not in sass and "FFMA" in sass


def test_compile_ahead_of_time_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="'forward', 'dgrad', 'wgrad'"):
        ccc.compile_ahead_of_time(ccc.SHIPPED_CONFIGS[0], torch.bfloat16, 80,
                                  kernel_name="backward")


@pytest.mark.parametrize("kernel", ccc.KERNEL_NAMES)
def test_autotuners(kernel):
    """One triton Autotuner per kernel and dtype class, over the AOT-checked configs, keyed on
    the problem dimensions; torch.library.wrap_triton accepts it (the launchers pass it a
    grid function of the config's META and no BLOCK_* / num_warps / num_stages kwargs)."""
    from triton.runtime.autotuner import Autotuner

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tuner = ccc.autotuner(kernel, dtype)
        assert isinstance(tuner, Autotuner)
        assert tuner is ccc.autotuner(kernel, dtype), "autotuners must be kept (their cache)"
        assert list(tuner.keys) == list(ccc.AUTOTUNE_KEY)
        assert all(k in tuner.fn.arg_names for k in ccc.AUTOTUNE_KEY)
        configs = ccc.AUTOTUNE_CONFIGS[kernel]
        assert len(tuner.configs) == len(configs)
        for ours, theirs in zip(configs, tuner.configs):
            assert theirs.kwargs == {"BLOCK_M": ours.block_m, "BLOCK_N": ours.block_n,
                                     "BLOCK_K": ours.block_k_for(dtype)}
            assert (theirs.num_warps, theirs.num_stages) == (ours.num_warps, ours.num_stages)
            assert theirs.pre_hook is None
        torch.library.wrap_triton(tuner)
    assert ccc.autotuner(kernel, torch.bfloat16) is ccc.autotuner(kernel, torch.float16)
    assert ccc.autotuner(kernel, torch.bfloat16) is not ccc.autotuner(kernel, torch.float32)


def test_autotune_switches():
    x = torch.empty(1)
    assert not ccc.uses_autotune(x, None), "CPU tensors never autotune"
    saved = ccc.get_autotune()
    try:
        ccc.set_autotune(False)
        assert not ccc.get_autotune()
    finally:
        ccc.set_autotune(saved)
    assert ccc.m_bucket(1) == 16 and ccc.m_bucket(17) == 32 and ccc.m_bucket(1024) == 1024
    assert ccc.m_bucket(8 * 388 * 388) == 2 ** 21


def _trace_forward_and_backward(monkeypatch):
    """make_fx of the forward + "kernels" backward implementations on fake CUDA tensors (no
    GPU needed): the launches become triton_kernel_wrapper_mutation nodes, as when
    torch.compile traces the triton ops. Returns [(kernel, grids)] in launch order."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastseg.triton import _common

    # device_guard asks the CUDA driver for the current device: there is none here.
    monkeypatch.setattr(_common, "device_guard", lambda tensor: _common._NullContext())
    with FakeTensorMode():
        kw = dict(device="cuda", dtype=torch.bfloat16)
        skip, x = torch.empty(2, 64, 20, 21, **kw), torch.empty(2, 64, 16, 16, **kw)
        weight, bias = torch.empty(64, 128, 3, 3, **kw), torch.empty(64, **kw)

    def step(skip, x, weight, bias):
        out = ccc._forward_impl(skip, x, weight, bias, 1, 1)
        return ccc.backward_kernels(torch.ones_like(out), out, skip, x, weight, 1, 1)

    graph = make_fx(step, tracing_mode="fake")(skip, x, weight, bias).graph
    launches = []
    for node in graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            launches.append((kernel, node.kwargs["grid"]))
    return launches


def test_autotuned_launches_trace_through_wrap_triton(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    launches = _trace_forward_and_backward(monkeypatch)
    assert [type(k) for k, _ in launches] == [Autotuner] * 3, launches
    for (kernel, grids), name in zip(launches, ccc.KERNEL_NAMES):
        assert kernel is ccc.autotuner(name, torch.bfloat16)
        assert len(grids) == len(ccc.AUTOTUNE_CONFIGS[name])  # one grid per config
    # Forward: M = 2 * 16 * 16 = 512 pixels x Cout 64, per config.
    assert launches[0][1][0] == (4, 1, 1) and launches[0][1][2] == (8, 1, 1)


def test_explicit_launches_without_autotune(monkeypatch):
    """Autotuning off, or deterministic algorithms requested: the shipped configs (torch's
    tracer wraps a plain kernel launched with num_warps / num_stages into a one-config
    Autotuner of its own)."""
    for switch in ("autotune", "deterministic"):
        if switch == "autotune":
            monkeypatch.setattr(ccc, "_autotune", False)
        else:
            monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        launches = _trace_forward_and_backward(monkeypatch)
        assert len(launches) == 3
        for (kernel, grids), name in zip(launches, ccc.KERNEL_NAMES):
            assert kernel is not ccc.autotuner(name, torch.bfloat16)
            assert getattr(kernel, "fn", kernel) is ccc._KERNELS[name]
            assert len(grids) == 1
        # M = 512 < 8192: the forward's and dgrad's small-map config (64 x 64 tiles).
        assert launches[0][1] == [(8, 1, 1)] and launches[1][1] == [(8, 2, 1)]
        monkeypatch.undo()
