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


# --- the FCN decoder suite (fastseg/bench/upsample_add.py) ----------------------------------

from fastseg.bench import upsample_add as decoder_bench  # noqa: E402

# One tiny level with a cropped skip (k4 s2 deconvolution of 5x6 -> 12x14, cropped at 1 to
# 10x11; the skip 13x14 read from (2, 1)) and one without a skip (k16 s8, centre crop 4).
TINY_LEVELS = [
    ("tiny", {"x": (2, 3, 5, 6), "skip": (2, 3, 13, 14), "out": (10, 11), "kernel": 4,
              "stride": 2, "skip_offset": (2, 1), "crop": (1, 1)}),
    ("tiny-x8", decoder_bench.final_x8(1, 2, 16, 24)),
]
DECODER_PROBLEMS = {f"{name}-{form}" for name, _ in TINY_LEVELS for form in decoder_bench.FORMS}


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-decoder")
    suite = decoder_bench.UpsampleAddSuite(levels_cpu=TINY_LEVELS)
    result = harness.run([suite], tiny_config(), str(out), argv=["test_bench"],
                         print_markdown=False)
    return result, out


def test_decoder_json_has_one_ok_record_per_run(decoder_run):
    result, out = decoder_run
    with open(out / harness.RESULTS_JSON) as f:
        saved = json.load(f)
    assert saved["schema"] == harness.SCHEMA and saved["header"]["complete"] is True
    info = saved["suites"]["upsample_add"]
    assert info["baseline"] == "eager" and "forward = e*(X + V + K + O)" in info["bytes_model"]
    assert {"eager", "compile"} <= set(info["providers"])
    records = saved["records"]
    keys = [(r["op"], r["problem"], r["dtype"], r["mode"], r["provider"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert set(keys) == {("upsample_add", name, "float32", mode, provider)
                         for name in DECODER_PROBLEMS for mode in MODES for provider in PROVIDERS}
    for r in records:
        assert r["status"] == "ok", r
        for field in ("time_ms", "time_ms_p20", "time_ms_p80", "gbps", "floor_fraction"):
            assert isinstance(r[field], float), (field, r)
        assert isinstance(r["peak_bytes"], int), r
        params = r["params"]
        assert params["form"] in decoder_bench.FORMS
        assert params["op"] == decoder_bench.OPS[params["form"]]
        assert r["problem"] == f"{params['level']}-{params['form']}"
        if r["provider"] == "reference":
            # The reference composition is the eager one: the check must agree exactly.
            assert r["check"]["ok"] and r["check"]["rel_err"] <= 1e-6, r["check"]


def test_decoder_min_bytes_by_hand():
    """The stated model on FCN-8s' upscore_pool4 level of a 500x500 VOC image, batch 2, fp32:
    x 2x21x34x34 (X = 48552), output 70x70 (O = 205800), skip 88x88 (S = 325248) read at 9,
    weight 21x1x4x4 (K = 336)."""
    suite = decoder_bench.SUITE
    problems = {p.name: p for p in suite.problems(CPU, quick=True)}
    bilinear = problems["voc500-pool3-bilinear"]
    deconv = problems["voc500-pool3-deconv"]
    assert bilinear.shape == deconv.shape == (2, 21, 34, 34)
    assert bilinear.params["skip_shape"] == [2, 21, 88, 88]
    assert bilinear.params["skip_offset"] == [9, 9] and bilinear.params["output_size"] == [70, 70]
    assert deconv.params["kernel"] == 4 and deconv.params["stride"] == 2
    assert deconv.params["fcn_layer"] == "upscore_pool4"
    # bilinear: forward 4 * (X + V + O) = 4 * (48552 + 205800 + 205800)
    #           backward 4 * (O + X + S) = 4 * (205800 + 48552 + 325248)
    assert suite.min_bytes(bilinear, "forward") == 1_840_608
    assert suite.min_bytes(bilinear, "backward") == 2_318_400
    assert suite.min_bytes(bilinear, "full") == 1_840_608 + 2_318_400
    # deconv: + 4 * K in the forward; + 4 * (X + 2K) in the backward
    assert suite.min_bytes(deconv, "forward") == 1_840_608 + 1_344
    assert suite.min_bytes(deconv, "backward") == 2_318_400 + 196_896
    assert suite.min_bytes(deconv, "full") == 1_841_952 + 2_515_296


def test_decoder_records_carry_the_suite_bytes(decoder_run):
    result, _ = decoder_run
    suite = decoder_bench.UpsampleAddSuite(levels_cpu=TINY_LEVELS)
    problems = {p.name: p for p in suite.problems(CPU, quick=False)}
    for r in result["records"]:
        assert r["min_bytes"] == suite.min_bytes(problems[r["problem"]], r["mode"]), r
    # e.g. tiny-deconv full: X = 2*3*5*6 = 180, O = 2*3*10*11 = 660, S = 2*3*13*14 = 1092,
    # K = 3*4*4 = 48
    assert suite.min_bytes(problems["tiny-deconv"], "full") == 4 * (
        (180 + 660 + 48 + 660) + (660 + 180 + 1092) + (180 + 2 * 48))


def test_fcn8s_geometry():
    """The reference FCN-8s' sizes: conv1 pad 100, ceil-mode pools, fc6 7x7, crops 5/9/31."""
    assert decoder_bench.fcn8s_sizes(500) == {
        "input": 500, "pool3": 88, "pool4": 44, "score_fr": 16, "upscore2": 34,
        "upscore_pool4": 70, "upscore8": 568}
    assert decoder_bench.fcn8s_sizes(512) == {
        "input": 512, "pool3": 89, "pool4": 45, "score_fr": 17, "upscore2": 36,
        "upscore_pool4": 74, "upscore8": 600}
    levels = dict(decoder_bench.fcn8s_levels(16, 21, 500, 500))
    assert levels["upscore2"]["x"] == (16, 21, 16, 16)
    assert levels["upscore2"]["skip"] == (16, 21, 44, 44)
    assert levels["upscore_pool4"]["skip_offset"] == (9, 9)
    assert levels["upscore8"]["crop"] == (31, 31) and levels["upscore8"]["out"] == (500, 500)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_every_level_composes_to_its_output_size(device_type):
    """Each problem's eager composition (on meta tensors: no memory) gives (N, C, Ho, Wo),
    and the skip window and the crop fit."""
    suite = decoder_bench.SUITE
    for problem in suite.problems(torch.device(device_type), quick=False):
        p = problem.params
        inputs = suite.make_inputs(problem, torch.device("meta"), None)
        out = decoder_bench.eager_fn(p)(*inputs.args)
        assert tuple(out.shape) == (*problem.shape[:2], *p["output_size"]), problem.label
        if p["skip_shape"] is not None:
            assert all(o + n <= s for o, n, s in
                       zip(p["skip_offset"], p["output_size"], p["skip_shape"][2:]))


def test_decoder_suite_is_registered_and_listed(capsys):
    assert "upsample_add" in SUITES
    assert main(["--device", "cpu", "--ops", "upsample_add", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "voc500-x8-deconv 2x21x70x70 fp32" in listing
    assert "provider eager" in listing and "provider compile" in listing
    quick = {p.name for p in decoder_bench.SUITE.problems(CPU, quick=True)}
    assert quick == {f"{level}-{form}" for level in decoder_bench.CPU_QUICK
                     for form in decoder_bench.FORMS}


# --- the U-Net decoder suite (fastseg/bench/crop_concat_conv.py) ----------------------------

from fastseg.bench import crop_concat_conv as unet_bench  # noqa: E402

# A valid level with an odd crop (skip 11x12 -> x 6x7: offset (2, 2)) and a 'same' one.
TINY_UNET = [
    ("tiny-l1", {"net": "tiny", "level": 1, "batch": 2, "padding": 0, "skip": (2, 3, 11, 12),
                 "x": (2, 3, 6, 7), "weight": (4, 6, 3, 3)}),
    ("tiny-l2", {"net": "tiny", "level": 2, "batch": 2, "padding": 1, "skip": (2, 2, 5, 5),
                 "x": (2, 4, 5, 5), "weight": (3, 6, 3, 3)}),
]
UNET_PROVIDERS = ("eager", "reference", "fastseg-fake", *unet_bench.PARTS)


class _FakeFused(unet_bench.CropConcatConvSuite):
    """The reference composition as a 'fused' provider, so the targets table has a row."""

    def providers(self, device):
        return super().providers(device) + [harness.Provider(
            "fastseg-fake", "fused", lambda p: unet_bench.fastseg_fn(p.params, None))]


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-unet")
    suite = _FakeFused(levels_cpu=TINY_UNET)
    result = harness.run([suite], tiny_config(providers=list(UNET_PROVIDERS)), str(out),
                         argv=["test_bench"], print_markdown=False)
    return result, out


def test_unet_records_flops_and_parts(unet_run):
    result, out = unet_run
    with open(out / harness.RESULTS_JSON) as f:
        saved = json.load(f)
    keys = {(r["problem"], r["mode"], r["provider"]) for r in saved["records"]}
    assert keys == {(name, mode, p) for name, _ in TINY_UNET for mode in MODES
                    for p in UNET_PROVIDERS}
    suite = unet_bench.CropConcatConvSuite(levels_cpu=TINY_UNET)
    problems = {p.name: p for p in suite.problems(CPU, quick=False)}
    for r in saved["records"]:
        assert r["status"] == "ok", r
        assert r["flops"] == suite.flops(problems[r["problem"]], r["mode"]), r
        assert isinstance(r["tflops"], float) and isinstance(r["peak_bytes"], int), r
        if r["provider"] in unet_bench.PARTS:
            assert "check" not in r, r  # a part computes something else than the op
            assert r["provider_kind"] == "part"
        elif r["provider"] != "eager":
            assert r["check"]["ok"] and r["check"]["rel_err"] <= 1e-6, r["check"]
    # tiny-l1 forward: 2 * N * Cout * Ho * Wo * Cin * 9 = 2 * 2 * 4 * 4 * 5 * 6 * 9
    assert suite.flops(problems["tiny-l1"], "forward") == 17_280
    assert suite.flops(problems["tiny-l1"], "full") == 3 * 17_280
    p = problems["tiny-l1"].params
    assert p["crop_offset"] == [2, 2] and p["concat_shape"] == [2, 6, 6, 7]
    assert p["concat_bytes"] == 2 * 6 * 6 * 7 * 4


def test_unet_min_bytes_by_hand():
    suite = unet_bench.CropConcatConvSuite(levels_cpu=TINY_UNET)
    problem = suite.problems(CPU, quick=False)[0]
    # Sw = 2*3*6*7 = 252, S = 2*3*11*12 = 792, X = 252, O = 2*4*4*5 = 160, K = 4*6*9 = 216, B = 4
    forward = 4 * (252 + 252 + 216 + 4 + 160)
    backward = 4 * (2 * 160 + 252 + 252 + 216 + 792 + 252 + 216 + 4)
    assert suite.min_bytes(problem, "forward") == forward
    assert suite.min_bytes(problem, "backward") == backward
    assert suite.min_bytes(problem, "full") == forward + backward


def test_unet_report_has_concat_split_and_targets(unet_run, tmp_path):
    result, out = unet_run
    text = (out / harness.RESULTS_MD).read_text()
    assert text == harness.render_markdown(result)
    assert "### concatenation vs peak memory" in text
    assert "### eager's time split: crop + cat vs conv + ReLU (full step, ms)" in text
    assert "### targets" in text and "| tiny batch 2 | fp32 | fastseg-fake |" in text
    assert "- (2 of 4 levels)" in text  # the tiny decoder has two levels, not four
    assert "TFLOP/s" in text
    # The summary travels in the JSON: --from-json renders the same report.
    again = tmp_path / "again"
    assert main(["--from-json", str(out / harness.RESULTS_JSON), "--out", str(again),
                 "--no-plot"]) == 0
    assert (again / harness.RESULTS_MD).read_text() == text


def test_unet_geometry():
    """The original U-Net (572 input): skips 568 / 280 / 136 / 64 cropped to 392 / 200 / 104 /
    56; the CPU's smaller valid U-Net (316)."""
    assert unet_bench.unet_sizes(572) == [(568, 392), (280, 200), (136, 104), (64, 56)]
    assert unet_bench.unet_sizes(316) == [(312, 136), (152, 72), (72, 40), (32, 24)]
    with pytest.raises(ValueError):
        unet_bench.unet_sizes(512)
    levels = dict(unet_bench.unet_levels("unet572", 572, 8))
    assert levels["unet572-l1"]["skip"] == (8, 64, 568, 568)
    assert levels["unet572-l1"]["x"] == (8, 64, 392, 392)
    assert levels["unet572-l1"]["weight"] == (64, 128, 3, 3)
    assert levels["unet572-l4"]["weight"] == (512, 1024, 3, 3)
    same = dict(unet_bench.unet_levels("same512", 512, 1, padding=1))
    assert same["same512-l3"]["skip"] == same["same512-l3"]["x"] == (1, 256, 128, 128)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_every_unet_level_composes(device_type):
    """Each problem's eager composition and both parts (on meta tensors: no memory) give the
    conv's output shape; GPU: 2 nets x 4 levels x 3 batches x 3 dtypes."""
    suite = unet_bench.SUITE
    problems = suite.problems(torch.device(device_type), quick=False)
    if device_type == "cuda":
        assert len(problems) == 2 * 4 * 3 * 3
        assert problems[0].dtype == torch.bfloat16
    for problem in problems:
        p = problem.params
        inputs = suite.make_inputs(problem, torch.device("meta"), None)
        out = unet_bench.eager_fn(p)(*inputs.args)
        want = (p["batch"], p["weight_shape"][0], *unet_bench.output_hw(p))
        assert tuple(out.shape) == want, problem.label
        conv = unet_bench.conv_only_inputs(inputs)
        assert list(conv.args[0].shape) == p["concat_shape"]
        assert tuple(unet_bench.conv_only_fn(p)(*conv.args).shape) == want
        assert list(unet_bench.cat_only(*inputs.args[:2]).shape) == p["concat_shape"]


def test_unet_suite_is_registered_and_listed(capsys):
    assert "crop_concat_conv" in SUITES
    assert main(["--device", "cpu", "--ops", "crop_concat_conv", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "unet316-l1 1x8x136x136 fp32" in listing
    for name in ("eager", "compile", "eager-cat-only", "conv-only"):
        assert f"provider {name} " in listing
    quick = {p.name for p in unet_bench.SUITE.problems(CPU, quick=True)}
    assert quick == set(unet_bench.CPU_QUICK)
    gpu_quick = {p.name for p in unet_bench.SUITE.problems(torch.device("cuda"), quick=True)}
    assert gpu_quick == set(unet_bench.GPU_QUICK)
