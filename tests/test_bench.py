"""Smoke test of the benchmark harness (fastseg.bench) on tiny shapes, on the CPU.

Runs a tiny cross-entropy suite with the reference and eager providers and checks the JSON
records, the markdown and the chart. It asserts nothing about how fast anything is.
"""

import json
import os

import pytest
import torch

from fastseg.bench import SUITES, harness, main
from fastseg.bench.cross_entropy import CrossEntropySuite

CPU = torch.device("cpu")
TINY = [("tiny", (2, 5, 9, 11)), ("odd", (1, 3, 7, 1))]
MODES = ("forward", "backward", "full")
PROVIDERS = ("reference", "eager")


def tiny_config(**overrides):
    settings = dict(providers=list(PROVIDERS), warmup_ms=1.0, rep_ms=1.0, min_reps=2,
                    max_reps=3, copy_bytes=2**20)
    settings.update(overrides)
    return harness.RunConfig.for_device(CPU, quick=False, **settings)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    suite = CrossEntropySuite(problems_cpu=TINY)
    result = harness.run([suite], tiny_config(), str(out), argv=["test_bench"],
                         print_markdown=False)
    return result, out


def test_json_has_header_and_one_record_per_run(tiny_run):
    result, out = tiny_run
    with open(out / harness.RESULTS_JSON) as f:
        saved = json.load(f)
    assert saved["schema"] == harness.SCHEMA
    header = saved["header"]
    for key in ("device", "device_name", "torch", "triton", "cuda", "fastseg", "git_commit",
                "date", "command", "copy_bandwidth_GBps"):
        assert key in header, f"header lacks {key!r}: {sorted(header)}"
    assert header["device"] == "cpu"
    assert header["complete"] is True
    assert header["command"] == "test_bench"

    records = saved["records"]
    keys = [(r["op"], r["problem"], r["dtype"], r["mode"], r["provider"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    expected = {("cross_entropy", name, "float32", mode, provider)
                for name, _ in TINY for mode in MODES for provider in PROVIDERS}
    assert set(keys) == expected
    for r in records:
        assert r["status"] == "ok", r
        for field in ("time_ms", "time_ms_p20", "time_ms_p80", "gbps", "floor_fraction"):
            assert isinstance(r[field], float), (field, r)
        assert r["reps"] >= 2 and r["copies"] >= 2
        assert r["shape"] in [list(shape) for _, shape in TINY]
        assert r["params"]["ignore_index"] == 255


def test_min_bytes_follow_the_stated_model(tiny_run):
    result, _ = tiny_run
    n, c, h, w = TINY[0][1]
    pixels = n * h * w
    logits = pixels * c * 4
    forward = logits + pixels * 8 + 4
    backward = 2 * logits + pixels * 8 + pixels * 8  # + the saved float32 max and log-sum
    want = {"forward": forward, "backward": backward, "full": forward + backward}
    for r in result["records"]:
        if r["problem"] == "tiny":
            assert r["min_bytes"] == want[r["mode"]], r


def test_memory_and_check_are_recorded(tiny_run):
    result, _ = tiny_run
    for r in result["records"]:
        assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0, r
        if r["mode"] == "full":
            # The step allocates at least the gradient of the logits.
            n, c, h, w = r["shape"]
            assert r["peak_bytes"] >= n * c * h * w * 4, r
        if r["provider"] == "reference":
            assert r["check"]["ok"], r["check"]
        else:
            assert "check" not in r  # the baseline is not checked against itself


def test_markdown_report(tiny_run):
    result, out = tiny_run
    text = (out / harness.RESULTS_MD).read_text()
    assert text == harness.render_markdown(result)
    assert "## softmax cross-entropy" in text
    assert "### full step (forward + backward): time, ms" in text
    assert "| problem | shape | dtype | eager | reference | reference vs eager |" in text
    for name, _ in TINY:
        assert f"| {name} |" in text


def test_png_chart(tiny_run):
    pytest.importorskip("matplotlib")
    _, out = tiny_run
    png = out / "cross_entropy.png"
    assert png.exists()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_failing_provider_is_recorded_and_the_run_goes_on(tmp_path):
    class Broken(CrossEntropySuite):
        def providers(self, device):
            def make(problem):
                def fn(input, target):
                    raise RuntimeError("kernel exploded")
                return fn

            return super().providers(device) + [
                harness.Provider("fastseg-broken", "fused", make),
                harness.Provider("fastseg-nope", "fused",
                                 lambda p: (lambda i, t: (_ for _ in ()).throw(
                                     NotImplementedError("dtype not served")))),
            ]

    suite = Broken(problems_cpu=TINY[:1])
    cfg = tiny_config(providers=["eager", "fastseg-broken", "fastseg-nope"],
                      measure_memory=False)
    result = harness.run([suite], cfg, None, argv=["t"], print_markdown=False)
    status = {(r["mode"], r["provider"]): r["status"] for r in result["records"]}
    for mode in MODES:
        assert status[(mode, "eager")] == "ok"
        assert status[(mode, "fastseg-broken")] == "error"
        assert status[(mode, "fastseg-nope")] == "unsupported"
    failed = harness.failures(result)
    assert failed and all("fastseg-broken" in line for line in failed)
    markdown = harness.render_markdown(result)
    assert "kernel exploded" in markdown


def test_discover_backends():
    def probe(name):
        if name == "cuda":
            raise NotImplementedError("fastseg.ops.x: backend 'cuda' cannot serve these inputs:"
                                      "\n  cuda: needs cuda tensors\n  cpu: supported")
        if name == "triton":
            raise ValueError("broken")

    live, unavailable = harness.discover_backends(probe, ["cuda", "triton", "cpu"])
    assert live == ["cpu"]
    assert unavailable["cuda"] == "needs cuda tensors"
    assert unavailable["triton"].startswith("error: ValueError")


def test_cli_list_and_rerender(tiny_run, tmp_path, capsys):
    assert "cross_entropy" in SUITES
    assert main(["--device", "cpu", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "cpu-target 4x19x256x256 fp32" in listing
    assert "provider eager" in listing and "provider compile" in listing

    _, out = tiny_run
    again = tmp_path / "again"
    assert main(["--from-json", str(out / harness.RESULTS_JSON), "--out", str(again)]) == 0
    assert (again / harness.RESULTS_MD).read_text() == (out / harness.RESULTS_MD).read_text()
    assert "## softmax cross-entropy" in capsys.readouterr().out
    assert os.path.exists(again / harness.RESULTS_JSON)


def test_cli_rejects_unknown_op():
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--ops", "no_such_op", "--list"])
