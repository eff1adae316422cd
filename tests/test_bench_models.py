"""Smoke test of the whole-model benchmark suite (fastseg.bench.models) on tiny models, CPU.

Tiny FCN-8s / U-Net (valid, same) training and inference steps with the eager and fastseg
providers (compile is left out: its compile time dominates); checks the records, the check
against eager (same weights), the Amdahl attribution and the reports. Nothing about speed.
"""

import json

import pytest
import torch

from fastseg.bench import SUITES, harness
from fastseg.bench import models as models_bench

CPU = torch.device("cpu")
TINY = [
    ("fcn8s", dict(model="fcn8s", batch=1, size=32, classes=3, in_channels=3,
                   kwargs=dict(width_mult=1 / 32))),
    ("unet-valid", dict(model="unet", batch=1, size=44, classes=2, in_channels=1,
                        kwargs=dict(base_channels=4, depth=3, padding="valid"))),
    ("unet-same", dict(model="unet", batch=1, size=24, classes=2, in_channels=1,
                       kwargs=dict(base_channels=4, depth=3, padding="same"))),
]
PROVIDERS = ("eager", "fastseg", "fastseg-cpu")
NAMES = [f"{name}-{task}" for name, _ in TINY for task in models_bench.TASKS]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-models")
    suite = models_bench.ModelsSuite(models_cpu=TINY)
    cfg = harness.RunConfig.for_device(CPU, quick=False, providers=list(PROVIDERS),
                                       warmup_ms=1.0, rep_ms=1.0, min_reps=2, max_reps=2,
                                       copy_bytes=2**20)
    result = harness.run([suite], cfg, str(out), argv=["test_bench_models"],
                         print_markdown=False)
    return suite, result, out


def test_registered():
    assert SUITES["models"] == "fastseg.bench.models"
    assert harness.load_suite(SUITES["models"]).op == "models"


def test_problems_and_providers():
    suite = models_bench.ModelsSuite()
    names = [p.name for p in suite.problems(CPU, quick=False)]
    assert names == [f"{n}-{t}" for n, _ in models_bench.CPU_MODELS for t in models_bench.TASKS]
    assert [p.name for p in suite.problems(CPU, quick=True)] == [
        f"{n}-train" for n, _ in models_bench.QUICK_CPU_MODELS]
    gpu = suite.problems(torch.device("cuda"), quick=False)
    assert {p.dtype for p in gpu} == {torch.float32, torch.bfloat16}
    by_name = {p.name: p for p in gpu if p.dtype == torch.float32}
    assert by_name["fcn8s-train"].shape == (8, 3, 512, 512)
    assert by_name["unet-valid-train"].shape == (4, 1, 572, 572)
    assert by_name["unet-same-infer"].shape == (8, 1, 512, 512)
    assert [p.name for p in suite.providers(CPU)] == ["fastseg", "fastseg-cpu", "eager",
                                                     "compile"]


def test_records_ok_and_checked(tiny_run):
    _, result, out = tiny_run
    with open(out / harness.RESULTS_JSON) as f:
        saved = json.load(f)
    keys = {(r["problem"], r["mode"], r["provider"]) for r in saved["records"]}
    assert keys == {(n, "forward", p) for n in NAMES for p in PROVIDERS}
    for r in saved["records"]:
        assert r["status"] == "ok", r
        assert isinstance(r["time_ms"], float) and isinstance(r["peak_bytes"], int), r
        if r["provider"] != "eager":  # same weights, same inputs: the outputs agree
            assert r["check"]["ok"], r["check"]
    assert harness.failures(result) == []


def test_amdahl_attribution(tiny_run):
    suite, _, _ = tiny_run
    for name in NAMES:
        prof = suite._profiles[(name, "torch.float32", "eager")]
        assert "error" not in prof, prof
        part = "upsample_add" if name.startswith("fcn8s") else "crop_concat_conv"
        assert prof["forward_ms"][part] > 0
        if name.endswith("-train"):
            assert prof["backward_ms"][part] > 0 and prof["backward_ms"]["loss"] > 0
        else:
            assert not prof["backward_ms"]
        assert 0 < sum(prof["parts_ms"].values()) < prof["step_ms"]


def test_reports(tiny_run):
    _, _, out = tiny_run
    md = (out / harness.RESULTS_MD).read_text()
    assert "Amdahl" in md and "fastseg-cpu speedup" in md
    assert (out / "models.png").stat().st_size > 1000
